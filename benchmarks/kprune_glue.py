"""Kprune on the GLUE reference teachers: accuracy, FLOPs, params, pruning cost, CPU speedup.

For each teacher in ../shared/models (minilm-sst2, minilm-stsb) and each budget (keep 0.7, 0.5,
0.4, 0.3 of the FLOPs) this prunes with Kprune's defaults (100,000 tokens, T 2, lam_pred 1,
lam_rep 2.5e-4, mu 64, sublayer tuning, seed 0) through the CLI, one process per run so that peak
RSS is that run's own (as the reference figures in specs/anchors.md were measured), then measures
CPU latency of every pruned model against its teacher at batch 32, sequence length 128, teacher
and pruned model timed alternately round by round.

FLOPs are counted at the reference's sequence length for each task (SST-2 25.16, STS-B 31.47) so
that "FLOPs kept" means what it means in anchors.md.

    python benchmarks/kprune_glue.py                 # full run (about an hour on 2 cores)
    python benchmarks/kprune_glue.py --budgets 0.5 --tasks sst2 --num-tokens 5000   # smoke run
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared"
RESULTS = ROOT / "benchmarks" / "results"

TEACHERS = {"sst2": "minilm-sst2", "stsb": "minilm-stsb"}
# Reference implementation on the same teachers and machine kind (specs/anchors.md).
ANCHORS = {
    ("sst2", 0.5): {"metric": 88.53, "prune_seconds": 537, "peak_rss_gb": 4.28},
    ("sst2", 0.3): {"metric": 87.61, "prune_seconds": 447, "peak_rss_gb": 4.24},
    # STS-B: the reference code with its regression loss corrected (P3); Pearson.
    ("stsb", 0.5): {"metric": 84.79, "prune_seconds": None, "peak_rss_gb": 7.01,
                    "whole_process_seconds": 811},
}
TEACHER_METRIC = {"sst2": "accuracy", "stsb": "pearson"}  # the metric compared with anchors.md


def prune_run(task: str, keep: float, args: argparse.Namespace, out: Path) -> dict:
    from prunekit.tasks.spec import get_task

    cmd = [
        sys.executable, "-m", "prunekit", "prune",
        "--model", str(SHARED / "models" / TEACHERS[task]),
        "--task", task, "--data", str(SHARED / "data" / task),
        "--method", "kprune", "--keep-flops", str(keep),
        "--num-tokens", str(args.num_tokens), "--seq-len", str(get_task(task).avg_seq_len),
        "--seed", str(args.seed), "--out", str(out), "--overwrite", "--no-bench", "--device", "cpu",
    ]
    start = time.perf_counter()
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL, stderr=open(out.parent / f"{out.name}.log", "w"))
    whole = time.perf_counter() - start
    report = json.loads((out / "prune_report.json").read_text())
    report["whole_process_seconds"] = whole
    return report


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tasks", default="sst2,stsb")
    parser.add_argument("--budgets", default="0.7,0.5,0.4,0.3")
    parser.add_argument("--num-tokens", type=int, default=100_000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--rounds", type=int, default=5, help="alternating latency rounds")
    parser.add_argument("--work", default=str(ROOT / "runs" / "kprune_glue"), help="where pruned models go")
    parser.add_argument("--name", default="kprune_glue", help="results file stem")
    args = parser.parse_args()

    import torch

    from prunekit.deploy.bench import measure_latency
    from prunekit.io.folders import load_pruned

    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    rows = []
    for task in args.tasks.split(","):
        teacher = load_pruned(SHARED / "models" / TEACHERS[task])
        metric = TEACHER_METRIC[task]
        for keep in [float(b) for b in args.budgets.split(",")]:
            out = work / f"{task}-{keep}"
            print(f"[{time.strftime('%H:%M:%S')}] pruning {task} keep {keep} ...", flush=True)
            report = prune_run(task, keep, args, out)
            pruned = load_pruned(out)
            latency = measure_latency(pruned, baseline=teacher, batch_sizes=[32], seq_lens=[128], device="cpu",
                                      threads=torch.get_num_threads(), rounds=args.rounds)["results"][0]
            value = report["eval"]["pruned"][metric]
            anchor = ANCHORS.get((task, keep), {})
            row = {
                "task": task, "keep_flops": keep, "metric": metric,
                "teacher_metric": report["eval"]["teacher"][metric], "pruned_metric": value,
                "spearman": report["eval"]["pruned"].get("spearman"),
                "reference_metric": anchor.get("metric"),
                "flops_kept": report["flops_kept"], "params_kept": report["params_kept"],
                "heads": [layer["num_heads"] for layer in report["layers"]],
                "neurons": [layer["intermediate_size"] for layer in report["layers"]],
                "prune_seconds": report["prune_seconds"], "whole_process_seconds": report["whole_process_seconds"],
                "reference_prune_seconds": anchor.get("prune_seconds"),
                "peak_rss_gb": report["peak_rss_bytes"] / 1e9, "reference_peak_rss_gb": anchor.get("peak_rss_gb"),
                "latency_ms": latency["latency_ms"], "teacher_latency_ms": latency["baseline_ms"],
                "speedup": latency["speedup"], "speedup_target": 0.85 / report["flops_kept"],
                "sample": report["sample"],
            }
            rows.append(row)
            print(json.dumps({k: v for k, v in row.items() if k not in ("sample",)}), flush=True)

    RESULTS.mkdir(parents=True, exist_ok=True)
    meta = {
        "machine": f"{os.cpu_count()} CPU cores, torch threads {torch.get_num_threads()}",
        "torch": torch.__version__,
        "num_tokens": args.num_tokens,
        "seed": args.seed,
        "latency": "CPU, batch 32, sequence length 128, median of per-round medians, teacher and pruned alternated",
        "flops_seq_len": "reference accounting: SST-2 25.16, STS-B 31.47 tokens",
    }
    (RESULTS / f"{args.name}.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=2) + "\n")
    lines = [
        f"# Kprune on the GLUE reference teachers ({args.name})", "",
        "Defaults: 100,000 tokens, T 2, lam_pred 1, lam_rep 2.5e-4, mu 64, sublayer tuning, seed 0. "
        f"Machine: {meta['machine']}. Latency: {meta['latency']}. FLOPs: {meta['flops_seq_len']}.", "",
        "| task | keep | FLOPs kept | params kept | dev metric | reference | teacher | prune s | ref. s | "
        "peak RSS GB | ref. GB | latency ms | teacher ms | speedup | target 0.85/F |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        ref = f"{r['reference_metric']:.2f}" if r["reference_metric"] is not None else "–"
        ref_s = f"{r['reference_prune_seconds']}" if r["reference_prune_seconds"] else "–"
        ref_gb = f"{r['reference_peak_rss_gb']:.2f}" if r["reference_peak_rss_gb"] else "–"
        metric = f"{r['metric']} {r['pruned_metric']:.2f}"
        if r["spearman"] is not None:
            metric += f" (Spearman {r['spearman']:.2f})"
        lines.append(
            f"| {r['task']} | {r['keep_flops']} | {r['flops_kept']:.4f} | {r['params_kept']:.3f} | {metric} | {ref} | "
            f"{r['teacher_metric']:.2f} | {r['prune_seconds']:.0f} | {ref_s} | {r['peak_rss_gb']:.2f} | {ref_gb} | "
            f"{r['latency_ms']:.0f} | {r['teacher_latency_ms']:.0f} | {r['speedup']:.2f} | {r['speedup_target']:.2f} |"
        )
    lines += ["", "Kept heads / neurons per layer:", ""]
    lines += [f"- {r['task']} {r['keep_flops']}: heads {r['heads']}, neurons {r['neurons']}" for r in rows]
    (RESULTS / f"{args.name}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
