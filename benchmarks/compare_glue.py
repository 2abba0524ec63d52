"""Kprune, Kwon et al. and magnitude pruning compared on the GLUE reference teachers.

For each teacher in ../shared/models (minilm-sst2, minilm-stsb) this runs ``prunekit compare``
(``prunekit.compare.compare``) at keep 0.7, 0.5, 0.4 and 0.3 of the FLOPs: every method prunes
the same teacher from the same calibration sample (100,000 tokens, seed 0) with its defaults,
each method calibrating once for all four budgets; every pruned model is evaluated on the dev set
and timed on the CPU against its teacher (batch 32, sequence length 128, alternating rounds).

FLOPs are counted at the reference's sequence length for each task (SST-2 25.16, STS-B 31.47),
so "FLOPs kept" means what it means in specs/anchors.md, whose reference figures are printed
beside ours. Writes benchmarks/results/compare_glue.{md,json,png}, and each task's own
compare.{json,md,png} under --work.

    python benchmarks/compare_glue.py                      # full run (long on 2 cores)
    python benchmarks/compare_glue.py --tasks sst2 --keep-flops 0.5 --num-sequences 256 \\
        --max-eval-examples 200 --rounds 1 --name compare_glue_smoke   # smoke run
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared"
RESULTS = ROOT / "benchmarks" / "results"

TEACHERS = {"sst2": "minilm-sst2", "stsb": "minilm-stsb"}
# The metric compared with specs/anchors.md, and the reference figures there (dev set).
ANCHOR_METRIC = {"sst2": "accuracy", "stsb": "pearson"}
ANCHORS = {
    ("kprune", "sst2", 0.5): 88.53, ("kprune", "sst2", 0.3): 87.61,
    ("kprune", "stsb", 0.5): 84.79,  # reference code with its regression loss corrected (P3)
    ("kwon", "sst2", 0.5): 87.27, ("kwon", "sst2", 0.3): 80.85, ("kwon", "stsb", 0.5): 81.97,
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tasks", default="sst2,stsb")
    parser.add_argument("--methods", default="kprune,kwon,magnitude,random")
    parser.add_argument("--keep-flops", default="0.7,0.5,0.4,0.3")
    parser.add_argument("--num-tokens", type=int, default=None, help="shared sample size (default 100000)")
    parser.add_argument("--num-sequences", type=int, default=None, help="shared sample size in sequences instead")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--rounds", type=int, default=3, help="alternating latency rounds")
    parser.add_argument("--no-bench", action="store_true")
    parser.add_argument("--max-eval-examples", type=int, default=None, help="smoke runs: first N dev examples")
    parser.add_argument("--work", default=str(ROOT / "runs" / "compare_glue"), help="per-task compare folders")
    parser.add_argument("--name", default="compare_glue", help="results file stem")
    parser.add_argument("--results", default=str(RESULTS), help="folder for the results files")
    args = parser.parse_args()

    import torch

    from prunekit.compare import compare
    from prunekit.io.reports import plot_compare
    from prunekit.tasks.spec import get_task

    methods = args.methods.split(",")
    budgets = [float(b) for b in args.keep_flops.split(",")]
    results = []
    for task in args.tasks.split(","):
        print(f"[{time.strftime('%H:%M:%S')}] comparing {', '.join(methods)} on {task} ...", flush=True)
        start = time.perf_counter()
        result = compare(
            SHARED / "models" / TEACHERS[task], task, SHARED / "data" / task, Path(args.work) / task,
            methods=methods, keep_flops=budgets, num_tokens=args.num_tokens, num_sequences=args.num_sequences,
            seed=args.seed, device="cpu", seq_len=get_task(task).avg_seq_len, run_bench=not args.no_bench,
            bench_rounds=args.rounds, max_eval_examples=args.max_eval_examples, overwrite=True,
        )
        result["whole_seconds"] = time.perf_counter() - start
        results.append(result)

    results_dir = Path(args.results)
    results_dir.mkdir(parents=True, exist_ok=True)
    meta = {
        "machine": f"{os.cpu_count()} CPU cores, torch threads {torch.get_num_threads()}",
        "torch": torch.__version__,
        "methods": methods,
        "budgets": budgets,
        "seed": args.seed,
        "max_eval_examples": args.max_eval_examples,
        "latency": "CPU, batch 32, sequence length 128, median of per-round medians, teacher and pruned alternated",
        "flops_seq_len": "reference accounting: SST-2 25.16, STS-B 31.47 tokens",
    }
    (results_dir / f"{args.name}.json").write_text(json.dumps({"meta": meta, "results": results}, indent=2) + "\n")
    plot_compare(results, results_dir / f"{args.name}.png")
    (results_dir / f"{args.name}.md").write_text(markdown(results, meta, args.name))
    print((results_dir / f"{args.name}.md").read_text())


def markdown(results: list[dict], meta: dict, name: str) -> str:
    lines = [
        f"# Pruning methods compared on the GLUE reference teachers ({name})", "",
        f"Methods with their defaults, one calibration sample per task shared by every method, seed {meta['seed']}. "
        f"Machine: {meta['machine']}. Latency: {meta['latency']}. FLOPs: {meta['flops_seq_len']}."
        + (f" Evaluated on the first {meta['max_eval_examples']} dev examples only." if meta["max_eval_examples"] else ""),
        "",
        "| task | method | keep | FLOPs kept | dev metric | reference (anchors.md) | teacher | Δ teacher | "
        "speedup | prune s |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for result in results:
        task, sample = result["task"], result["sample"]
        metric = ANCHOR_METRIC.get(task, result["metric"])
        teacher = result["teacher"]["metrics"][metric]
        for r in result["rows"]:
            value = r["metrics"][metric]
            shown = f"{metric} {value:.2f}"
            if task == "stsb":
                shown += f" (Spearman {r['metrics']['spearman']:.2f})"
            reference = ANCHORS.get((r["method"], task, r["keep_flops"]))
            speedup = f"{r['speedup']:.2f}" if r.get("speedup") is not None else "–"
            lines.append(
                f"| {task} | {r['method']} | {r['keep_flops']} | {r['flops_kept']:.4f} | {shown} | "
                f"{f'{reference:.2f}' if reference is not None else '–'} | {teacher:.2f} | {value - teacher:+.2f} | "
                f"{speedup} | {r['prune_seconds']:.0f} |"
            )
        lines.append(f"| {task} | sample | | | {sample['num_sequences']} sequences, {sample['num_tokens']} tokens | "
                     f"| | | | whole task {result['whole_seconds']:.0f} s |")
    lines += ["", "Kept heads / neurons per layer:", ""]
    for result in results:
        for r in result["rows"]:
            lines.append(f"- {result['task']} {r['method']} {r['keep_flops']}: heads {r['heads']}, neurons {r['neurons']}")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
