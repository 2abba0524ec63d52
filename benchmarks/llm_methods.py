"""The LLM field's structured-pruning methods side by side with Kprune (issue 23): Kprune, Kwon et al.,
FLAP, Wanda-sp, LLM-Pruner (no LoRA), ShortGPT, magnitude and random on one causal LM, at 10, 20,
30 and 50% of the non-embedding parameters removed (``keep_params`` 0.9, 0.8, 0.7, 0.5).

Model. By default ../shared/models/smollm2-135m (SmolLM2-135M, Llama architecture, 9/3 heads, 30
layers); any causal LM folder prunekit supports with ``--model``.

Calibration. One sample for every method (``prunekit compare``: the same draw, seed 0):
``--num-sequences`` windows (default 1) of ``--calibration-length`` tokens (default 2048, capped at
the model's positions) from the WikiText-2 train text, never the test file.

Evaluation. Perplexity of wiki.test.raw in non-overlapping windows of each of ``--windows``
(default 512 and 2048: the tools disagree, FLAP and LLM-Pruner use 128, SliceGPT and Wanda 2048),
over the first ``--eval-windows`` windows (0: the whole text). The teacher and every pruned model
are scored on the same windows.

Cost. Each method runs in a process of its own (``prunekit compare --methods M``), so the peak RSS
in its models' prune_report.json is its own; prune time is the pipeline's (load and evaluation
excluded).

Output: ``benchmarks/results/llm_methods.{md,json,png}`` (``--results`` to change).

    python benchmarks/llm_methods.py                           # the issue's run (hours on 2 CPU cores)
    python benchmarks/llm_methods.py --quick                   # smoke run on llama-wiki-gqa, minutes
"""

from __future__ import annotations

import argparse
import json
import logging
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared"
MODEL = SHARED / "models" / "smollm2-135m"
DATA = SHARED / "data" / "wikitext2"
RESULTS = ROOT / "benchmarks" / "results" / "llm_methods"
METHODS = ("kprune", "kwon", "flap", "wanda_sp", "llm_pruner", "shortgpt", "magnitude", "random")

logger = logging.getLogger("llm_methods")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=str(MODEL))
    p.add_argument("--data", default=str(DATA))
    p.add_argument("--methods", default=",".join(METHODS))
    p.add_argument("--keep-params", default="0.9,0.8,0.7,0.5")
    p.add_argument("--num-sequences", type=int, default=1)
    p.add_argument("--calibration-length", type=int, default=2048)
    p.add_argument("--windows", default="512,2048")
    p.add_argument("--eval-windows", type=int, default=0, help="first N windows only (0: the whole test text)")
    p.add_argument("--work", default=str(ROOT / "runs" / "llm_methods"), help="folder for the pruned models")
    p.add_argument("--results", default=str(RESULTS), help="path stem of the .md, .json and .png results")
    p.add_argument("--quick", action="store_true", help="llama-wiki-gqa, 4 x 128 tokens, windows 128/256, 4 windows")
    p.add_argument("--mechanics", action="store_true",
                   help="only the mechanics check on a random-weight OPT-125m (see mechanics()); writes "
                        "<results>_mechanics.{md,json}")
    args = p.parse_args(argv)
    if args.quick:
        args.model, args.num_sequences, args.calibration_length = str(SHARED / "models" / "llama-wiki-gqa"), 4, 128
        args.windows, args.eval_windows = "128,256", 4
        args.results = str(ROOT / "runs" / "llm_methods_quick")
    return args


def prune_method(args: argparse.Namespace, method: str, window: int) -> Path:
    """``prunekit compare`` for one method in its own process; returns its output folder."""
    out = Path(args.work) / method
    command = [sys.executable, "-m", "prunekit", "compare", "--model", args.model, "--task", "causal_lm",
               "--data", args.data, "--methods", method, "--keep-params", args.keep_params,
               "--num-sequences", str(args.num_sequences), "--calibration-length", str(args.calibration_length),
               "--window", str(window), "--no-bench", "--save-models", "--out", str(out), "--overwrite"]
    if args.eval_windows:
        command += ["--max-eval-examples", str(args.eval_windows)]
    logger.info("running %s", " ".join(command))
    subprocess.run(command, check=True)
    return out


def perplexity(folder: str | Path, tokenizer_folder: str, args: argparse.Namespace, window: int) -> float:
    from transformers import AutoTokenizer

    from prunekit import load_pruned
    from prunekit.tasks.evaluate import evaluate

    model = load_pruned(folder)
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_folder)
    metrics = evaluate(model, tokenizer, "causal_lm", args.data, window=window,
                       max_examples=args.eval_windows or None)
    return float(metrics["perplexity"])


def mechanics(stem: Path, keep: float = 0.8, num_sequences: int = 2, length: int = 128) -> dict:
    """The papers' one small model, OPT-125m (Kprune's authors report it; FLAP and LLM-Pruner do
    not), is not installable here, so its row cannot be reproduced: this checks the mechanics on a
    random-weight model of its shape instead (12 layers, hidden 768, 12 heads, FFN 3072, biases,
    vocabulary 50,272). Per method: the budget met (non-embedding parameters), the plan replayed
    from the teacher giving the same logits, prune time and the process's peak RSS so far.
    Perplexity of random weights means nothing and is not reported."""
    import copy
    from types import SimpleNamespace

    import torch
    from transformers import OPTConfig, OPTForCausalLM

    from prunekit.core.accounting import count_non_embedding_params
    from prunekit.core.runtime import peak_rss_bytes
    from prunekit.core.surgery import apply_plan
    from prunekit.families import get_adapter
    from prunekit.methods import get_method
    from prunekit.tasks import TaskData

    torch.manual_seed(0)
    teacher = OPTForCausalLM(OPTConfig()).eval()  # OPTConfig's defaults are OPT-125m's shape
    view = get_adapter(teacher)
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(2, teacher.config.vocab_size, (num_sequences, length), generator=gen)
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids}
    sample = SimpleNamespace(batches=[batch], num_sequences=num_sequences, num_tokens=ids.numel(), mean_length=length)
    full = count_non_embedding_params(view)
    rows = []
    for name in ("flap", "wanda_sp", "llm_pruner", "shortgpt"):
        spec = get_method(name)
        start = time.perf_counter()
        plan, _ = spec.run(view, TaskData(kind="lm", sample=sample), spec.make_config(keep_params=keep))
        seconds = time.perf_counter() - start
        pruned = apply_plan(view.of(copy.deepcopy(teacher)), plan)
        replayed = apply_plan(view.of(copy.deepcopy(teacher)), plan)
        with torch.no_grad():
            same = torch.equal(pruned(input_ids=ids).logits, replayed(input_ids=ids).logits)
        kept = count_non_embedding_params(get_adapter(pruned)) / full
        rows.append({"method": name, "keep_params": keep, "non_embedding_params_kept": kept,
                     "within_budget": kept <= keep * (1 + 1e-9), "replay_identical": same,
                     "prune_seconds": seconds, "peak_rss_gb_so_far": peak_rss_bytes() / 1e9,
                     "layers": get_adapter(pruned).num_layers})
        logger.info("mechanics: %s", rows[-1])
    result = {"model": "random-weight OPT-125m shape", "calibration": {"num_sequences": num_sequences,
              "length": length}, "rows": rows}
    stem = Path(str(stem) + "_mechanics")
    stem.parent.mkdir(parents=True, exist_ok=True)
    stem.with_suffix(".json").write_text(json.dumps(result, indent=1) + "\n")
    lines = ["# Mechanics on a random-weight OPT-125m", "",
             f"{num_sequences} x {length} random tokens; keep_params {keep}. Random weights: no perplexity. "
             "Peak RSS is the process's so far (methods run in turn).", "",
             "| method | non-emb. params kept | within budget | replay identical | prune s | peak RSS GB | layers |",
             "|---|---|---|---|---|---|---|"]
    lines += [f"| {r['method']} | {r['non_embedding_params_kept']:.4f} | {r['within_budget']} | "
              f"{r['replay_identical']} | {r['prune_seconds']:.1f} | {r['peak_rss_gb_so_far']:.2f} | {r['layers']} |"
              for r in rows]
    stem.with_suffix(".md").write_text("\n".join(lines) + "\n")
    return result


def main(argv: list[str] | None = None) -> dict:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    args = parse_args(argv)
    if args.mechanics:
        return mechanics(Path(args.results))
    windows = [int(w) for w in args.windows.split(",")]
    methods = args.methods.split(",")
    teacher = {f"ppl_{w}": perplexity(args.model, args.model, args, w) for w in windows}
    rows = []
    for method in methods:
        out = prune_method(args, method, windows[0])
        compare = json.loads((out / "compare.json").read_text())
        for row in compare["rows"]:
            folder = out / "models" / f"{method}-keep-params-{row['keep_params']:g}"
            report = json.loads((folder / "prune_report.json").read_text())
            rows.append({
                "method": method, "keep_params": row["keep_params"],
                "non_embedding_params_kept": row["non_embedding_params_kept"], "flops_kept": row["flops_kept"],
                f"ppl_{windows[0]}": row["metrics"]["perplexity"],
                **{f"ppl_{w}": perplexity(folder, args.model, args, w) for w in windows[1:]},
                "prune_seconds": row["prune_seconds"], "peak_rss_gb": report.get("peak_rss_bytes", 0) / 1e9,
                "layers": len(row["heads"]), "heads": row["heads"], "neurons": row["neurons"],
            })
    result = {"model": args.model, "data": args.data, "windows": windows, "eval_windows": args.eval_windows,
              "calibration": {"num_sequences": args.num_sequences, "length": args.calibration_length},
              "teacher": teacher, "rows": rows, "date": time.strftime("%Y-%m-%d %H:%M")}
    write(result, Path(args.results))
    return result


def write(result: dict, stem: Path) -> None:
    """The JSON, a Markdown table (perplexity lower is better) and a plot per window."""
    stem.parent.mkdir(parents=True, exist_ok=True)
    stem.with_suffix(".json").write_text(json.dumps(result, indent=1) + "\n")
    windows = result["windows"]
    head = ["method", "keep params", "non-emb. params kept", "FLOPs kept", *[f"ppl @{w}" for w in windows],
            "prune s", "peak RSS GB", "layers"]
    lines = [f"# LLM structured-pruning methods on {Path(result['model']).name}", "",
             f"One calibration sample for every method ({result['calibration']['num_sequences']} x "
             f"{result['calibration']['length']} tokens); WikiText-2 test perplexity, lower is better, "
             f"in non-overlapping windows of {', '.join(map(str, windows))} tokens"
             + (f" (first {result['eval_windows']} windows)" if result["eval_windows"] else "") + ".", "",
             "| " + " | ".join(head) + " |", "|" + "---|" * len(head),
             "| teacher | 1 | 1 | 1 | " + " | ".join(f"{result['teacher'][f'ppl_{w}']:.2f}" for w in windows)
             + " | | | |"]
    for row in result["rows"]:
        lines.append(f"| {row['method']} | {row['keep_params']:g} | {row['non_embedding_params_kept']:.4f} | "
                     f"{row['flops_kept']:.4f} | " + " | ".join(f"{row[f'ppl_{w}']:.2f}" for w in windows)
                     + f" | {row['prune_seconds']:.1f} | {row['peak_rss_gb']:.2f} | {row['layers']} |")
    stem.with_suffix(".md").write_text("\n".join(lines) + "\n")
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(windows), figsize=(6 * len(windows), 4.5), squeeze=False)
    for ax, window in zip(axes[0], windows, strict=True):
        for method in dict.fromkeys(row["method"] for row in result["rows"]):
            points = sorted((1 - r["keep_params"], r[f"ppl_{window}"]) for r in result["rows"] if r["method"] == method)
            ax.plot([100 * x for x, _ in points], [y for _, y in points], marker="o", label=method)
        ax.axhline(result["teacher"][f"ppl_{window}"], color="grey", linestyle="--", label="teacher")
        ax.set_yscale("log")
        ax.set_xlabel("non-embedding parameters removed (%)")
        ax.set_ylabel(f"perplexity, window {window} (lower is better)")
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(stem.with_suffix(".png"), dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    main()
