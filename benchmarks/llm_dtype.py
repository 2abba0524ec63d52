"""Half precision on a real LLM (issue 21 item 3): SmolLM2-135M saved in float32 and in bfloat16,
each pruned by Kwon et al. to keep 0.8 of its non-embedding parameters, and the perplexity of both
results.

Model. ~/.cache/prunekit/models/smollm2-135m (float32, built from ../shared/models/smollm2-135m);
its bfloat16 copy is written here with ``save_pretrained`` after ``.to(torch.bfloat16)``, so the
copy's config.json says ``"dtype": "bfloat16"``.

Pruning. ``prunekit prune --method kwon --keep-params 0.8`` on each folder, each in a subprocess
of its own (its report's peak RSS is its own), with the same calibration sample: ``--num-sequences``
windows of ``--seq-len`` tokens of ../shared/data/wikitext2's validation text, seed 0, on the CPU.
The CPU computes in float32 whatever the folder holds (prunekit.core.runtime.compute_dtype), and
the bfloat16 folder's result is saved in bfloat16; both facts are read back from the folders.

Evaluation. Perplexity of the first ``--eval-tokens`` tokens of wiki.test.raw (tokenized once with
the model's tokenizer) in non-overlapping windows of ``--window`` tokens, on: the float32 teacher,
the bfloat16 teacher (run in bfloat16), the pruned float32 folder, the pruned bfloat16 folder as
loaded (bfloat16 arithmetic) and the same widened to float32 (which separates the rounding of the
weights from the arithmetic). The two plans are compared unit by unit.

Speed. The matmul throughput of float32, bfloat16 and float16 on this CPU at the shape of one
SmolLM2 FFN projection (tokens x 576 by 576 x 1536), which is the measurement behind keeping float32
as the CPU's compute dtype.

    python benchmarks/llm_dtype.py            # about 15-25 minutes on a shared 2-core CPU
    python benchmarks/llm_dtype.py --quick    # smoke run
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

import torch

ROOT = Path(__file__).resolve().parents[1]
MODEL = Path.home() / ".cache" / "prunekit" / "models" / "smollm2-135m"
DATA = Path("/work/shared/data/wikitext2") if not (ROOT.parent / "shared").is_dir() else ROOT.parent / "shared" / "data" / "wikitext2"
RESULTS = ROOT / "benchmarks" / "results"

logger = logging.getLogger("llm_dtype")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=str(MODEL))
    p.add_argument("--data", default=str(DATA))
    p.add_argument("--work-dir", default=str(Path.home() / ".cache" / "prunekit" / "llm_dtype"))
    p.add_argument("--keep-params", type=float, default=0.8)
    p.add_argument("--num-sequences", type=int, default=8)
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--window", type=int, default=512)
    p.add_argument("--eval-tokens", type=int, default=8192)
    p.add_argument("--name", default="llm_dtype")
    p.add_argument("--results-dir", default=str(RESULTS))
    p.add_argument("--quick", action="store_true", help="tiny settings for a smoke run")
    p.add_argument("--reuse", action="store_true",
                   help="keep the pruned folders and perplexity rows of an earlier run of the same settings")
    p.add_argument("--skip-missing", action="store_true",
                   help="with --reuse: score what is there and prune nothing (a prune still running elsewhere)")
    p.add_argument("--note", default="", help="a sentence for the results (e.g. why a setting was reduced)")
    p.add_argument("--speed-only", action="store_true",
                   help="measure the matmul speeds again (on a quieter machine) into the existing results")
    args = p.parse_args(argv)
    if args.quick:
        args.num_sequences, args.seq_len, args.eval_tokens, args.name = 2, 64, 1024, args.name + "_quick"
    return args


def _cpu_flags() -> str:
    try:
        return Path("/proc/cpuinfo").read_text()
    except OSError:
        return ""


def matmul_speed(tokens: int = 2048, d: int = 576, d_ff: int = 1536, reps: int = 10) -> dict[str, float]:
    """GFLOP/s of (tokens, d) x (d, d_ff) in each dtype, the best of three timings of ``reps``."""
    speeds = {}
    for name, dtype in (("float32", torch.float32), ("bfloat16", torch.bfloat16), ("float16", torch.float16)):
        x, w = torch.randn(tokens, d, dtype=dtype), torch.randn(d_ff, d, dtype=dtype)
        torch.nn.functional.linear(x, w)  # warm-up: kernel selection
        best = float("inf")
        for _ in range(3):
            start = time.perf_counter()
            for _ in range(reps):
                torch.nn.functional.linear(x, w)
            best = min(best, (time.perf_counter() - start) / reps)
        speeds[name] = 2 * tokens * d * d_ff / best / 1e9
    return speeds


def bf16_copy(model: Path, folder: Path) -> Path:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if (folder / "config.json").is_file():
        return folder
    AutoModelForCausalLM.from_pretrained(model, dtype=torch.float32).to(torch.bfloat16).save_pretrained(folder)
    AutoTokenizer.from_pretrained(model).save_pretrained(folder)
    return folder


def prune_folder(teacher: Path, out: Path, args: argparse.Namespace) -> dict:
    """``prunekit prune`` in a subprocess; returns its report and wall time."""
    command = [sys.executable, "-m", "prunekit", "prune", "--model", str(teacher), "--task", "causal_lm",
               "--data", args.data, "--method", "kwon", "--keep-params", str(args.keep_params),
               "--num-sequences", str(args.num_sequences), "--seq-len", str(args.seq_len), "--no-eval",
               "--no-bench", "--device", "cpu", "--out", str(out), "--overwrite"]
    start = time.perf_counter()
    done = subprocess.run(command, capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"prune of {teacher} failed:\n{done.stderr[-3000:]}")
    report = json.loads((out / "prune_report.json").read_text())
    report["wall_seconds"] = time.perf_counter() - start
    return report


def kept_overlap(a: dict, b: dict) -> dict:
    """How many kept heads and neurons the two plans share (plan.json's layers)."""
    same_heads = same_neurons = heads = neurons = 0
    for la, lb in zip(a["layers"], b["layers"], strict=True):
        ha, hb = set(la.get("heads") or []), set(lb.get("heads") or [])
        na, nb = set(la.get("neurons") or []), set(lb.get("neurons") or [])
        same_heads += len(ha & hb)
        same_neurons += len(na & nb)
        heads += max(len(ha), len(hb))
        neurons += max(len(na), len(nb))
    return {"heads_shared": same_heads, "heads_kept": heads, "neurons_shared": same_neurons, "neurons_kept": neurons}


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    from prunekit.io.folders import load_pruned, load_tokenizer
    from prunekit.tasks.causal_lm.data import perplexity, read_text, tokenize_text

    out = Path(args.results_dir)
    if args.speed_only:
        result = json.loads((out / f"{args.name}.json").read_text())
        result["matmul_gflops"] = matmul_speed()
        (out / f"{args.name}.json").write_text(json.dumps(result, indent=2) + "\n")
        (out / f"{args.name}.md").write_text(markdown(result))
        return result
    work = Path(args.work_dir)
    work.mkdir(parents=True, exist_ok=True)
    speeds = matmul_speed()
    logger.info("matmul GFLOP/s: %s", speeds)
    teachers = {"float32": Path(args.model), "bfloat16": bf16_copy(Path(args.model), work / "teacher-bf16")}
    pruned, reports = {}, {}
    for name, folder in teachers.items():
        target = work / f"kwon-{name}"
        if args.reuse and (target / "prune_report.json").is_file():
            reports[name] = json.loads((target / "prune_report.json").read_text())
            reports[name]["wall_seconds"] = None  # not measured by this run
        elif args.skip_missing:
            continue
        else:
            logger.info("pruning %s", folder)
            reports[name] = prune_folder(folder, target, args)
        pruned[name] = target

    tokenizer = load_tokenizer(args.model)
    tokens = tokenize_text(tokenizer, read_text(args.data, "test"))[: args.eval_tokens]
    earlier = out / f"{args.name}.json"
    rows: list[dict] = json.loads(earlier.read_text())["rows"] if args.reuse and earlier.is_file() else []
    saved = {name: json.loads((folder / "config.json").read_text()).get("dtype") for name, folder in pruned.items()}
    plans = {name: json.loads((folder / "plan.json").read_text()) for name, folder in pruned.items()}
    result = {
        "settings": {k: v for k, v in vars(args).items() if k not in ("quick", "speed_only", "reuse")},
        "machine": {"cpu": platform.processor() or platform.machine(), "threads": torch.get_num_threads(),
                    "cpu_capability": torch.backends.cpu.get_cpu_capability(), "torch": torch.__version__,
                    "load_average_at_start": os.getloadavg()},
        "matmul_gflops": speeds,
        "saved_config_dtype": saved,
        "weights_bytes": {name: (folder / "model.safetensors").stat().st_size for name, folder in pruned.items()},
        "report_dtype": {name: report.get("dtype") for name, report in reports.items()},
        "prune": {name: {"prune_seconds": report["prune_seconds"], "wall_seconds": report["wall_seconds"],
                         "peak_rss_bytes": report["peak_rss_bytes"],
                         "non_embedding_params_kept": report["non_embedding_params_kept"]}
                  for name, report in reports.items()},
        "plans_overlap": kept_overlap(plans["float32"], plans["bfloat16"]) if len(plans) == 2 else None,
        "rows": rows,
    }

    def write() -> None:
        # After every row: the machine is shared, and a partial table beats none.
        ppl = {row["model"]: row["perplexity"] for row in rows}
        for key, (a, b) in {"pruned_bf16_vs_f32": ("kwon from bfloat16 (as saved)", "kwon from float32"),
                            "teacher_bf16_vs_f32": ("teacher bfloat16", "teacher float32")}.items():
            result[key] = ppl[a] / ppl[b] - 1 if a in ppl and b in ppl else None
        out.mkdir(parents=True, exist_ok=True)
        (out / f"{args.name}.json").write_text(json.dumps(result, indent=2) + "\n")
        (out / f"{args.name}.md").write_text(markdown(result))

    def score(label: str, folder: Path | None, dtype: torch.dtype | str = "auto") -> None:
        if folder is None or any(row["model"] == label for row in rows):
            return
        model = load_pruned(folder, dtype=dtype)
        start = time.perf_counter()
        scored = perplexity(model, tokens, window=args.window, batch_size=1, desc=label)
        held = str(next(model.parameters()).dtype).removeprefix("torch.")
        rows.append({"model": label, "folder": str(folder), "weights": held, "perplexity": scored["perplexity"],
                     "tokens_scored": scored["num_scored"], "seconds": time.perf_counter() - start})
        logger.info("%s: perplexity %.3f (%s)", label, scored["perplexity"], held)
        write()

    # The comparison the issue asks for first, then the teachers, then the arithmetic split.
    score("kwon from float32", pruned.get("float32"))
    score("kwon from bfloat16 (as saved)", pruned.get("bfloat16"))
    score("teacher float32", teachers["float32"])
    score("teacher bfloat16", teachers["bfloat16"])
    score("kwon from bfloat16, run in float32", pruned.get("bfloat16"), torch.float32)
    logger.info("wrote %s", out / f"{args.name}.md")
    return result


def markdown(r: dict) -> str:
    s = r["settings"]
    speeds = r["matmul_gflops"]
    lines = [
        "# Half precision on SmolLM2-135M (issue 21 item 3)",
        "",
        f"Kwon et al. at keep_params {s['keep_params']} with {s['num_sequences']} x {s['seq_len']} calibration "
        f"tokens (WikiText-2 validation, seed 0) on the CPU, from the float32 folder and from its bfloat16 copy; "
        f"perplexity of the first {s['eval_tokens']} tokens of wiki.test.raw in windows of {s['window']}. "
        f"Machine: {r['machine']['cpu']} ({r['machine']['cpu_capability']}), {r['machine']['threads']} threads, "
        f"torch {r['machine']['torch']}. Produced by `benchmarks/llm_dtype.py`.",
        *(["", f"Note: {s['note']}"] if s.get("note") else []),
        "",
        "| model | weights | perplexity | vs teacher float32 | tokens scored |",
        "|---|---|---:|---:|---:|",
    ]
    base = next((row["perplexity"] for row in r["rows"] if row["model"] == "teacher float32"), None)
    for row in r["rows"]:
        versus = f"{row['perplexity'] / base - 1:+.2%}" if base else "(not yet scored)"
        lines.append(f"| {row['model']} | {row['weights']} | {row['perplexity']:.3f} | {versus} | "
                     f"{row['tokens_scored']} |")

    def change(value: float | None) -> str:
        return f"{value:+.2%}" if value is not None else "(not measured)"

    lines += [
        "",
        f"- Pruned from bfloat16 (saved and run in bfloat16) vs pruned from float32: "
        f"**{change(r.get('pruned_bf16_vs_f32'))}** (target: within 1%); the teachers differ by "
        f"{change(r.get('teacher_bf16_vs_f32'))}.",
        f"- Saved config.json `dtype`: {r['saved_config_dtype']}; the reports say {r['report_dtype']}.",
        "- The two plans: not both made yet." if r["plans_overlap"] is None else
        f"- The two plans share {r['plans_overlap']['heads_shared']} of {r['plans_overlap']['heads_kept']} kept "
        f"heads and {r['plans_overlap']['neurons_shared']} of {r['plans_overlap']['neurons_kept']} kept neurons "
        "(the bfloat16 teacher's weights are the float32 ones rounded, so the scores differ slightly).",
        "- Prune time and peak RSS (each run in its own process): " + "; ".join(
            f"{name}: {p['prune_seconds']:.0f} s, {p['peak_rss_bytes'] / 1e9:.2f} GB"
            for name, p in r["prune"].items()) + f" (a shared 2-core machine, load average "
        f"{r['machine']['load_average_at_start'][0]:.0f} at the start: the times are inflated). The CPU computes in "
        "float32 in both runs, so the bfloat16 folder costs the same memory while pruning; on disk the pruned "
        "weights take " + ", ".join(f"{b / 1e6:.0f} MB ({name})" for name, b in r["weights_bytes"].items()) + ".",
        "",
        "## Compute dtype on this CPU",
        "",
        f"Matmul throughput at one SmolLM2 FFN projection (2048 x 576 by 576 x 1536): float32 "
        f"{speeds['float32']:.0f} GFLOP/s, bfloat16 {speeds['bfloat16']:.0f} GFLOP/s, float16 "
        f"{speeds['float16']:.0f} GFLOP/s: bfloat16 runs at {speeds['bfloat16'] / speeds['float32']:.1f}x and "
        f"float16 at {speeds['float16'] / speeds['float32']:.1f}x the speed of float32 here (bfloat16 is "
        f"{'not slow' if speeds['bfloat16'] >= speeds['float32'] else 'slow'} on this CPU, which has "
        f"{'AVX512-BF16' if 'avx512_bf16' in _cpu_flags() else 'no AVX512-BF16'}). "
        "prunekit still computes in float32 on every CPU: the Fisher gradients, Gram matrices "
        "and least squares need float32 inputs, a plan then does not depend on which CPU made it, and a "
        "bfloat16 model's plan is exactly the plan of the float32 model with the same (widened) weights "
        "(tests/test_api_dtype.py). On a GPU the methods compute in the model's dtype with float32/float64 "
        "accumulators.",
        "",
    ]
    return "\n".join(lines)


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    main()
