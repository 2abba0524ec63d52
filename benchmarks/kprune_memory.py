"""Kprune's peak memory and pruning time on the SST-2 teacher, code versions side by side.

Issue 9's target: Kprune's peak RSS at keep 0.5 at most 1.3 GB with pruning time no worse than
before. On a shared 2-core machine a time measured alone says little, so this script starts one
CLI run per variant at the same moment (one torch thread each), waits for all of them, and repeats
that ``--repeats`` times; it reports each variant's median peak RSS (the report's
``peak_rss_bytes``: the whole process, evaluation included) and median pruning time, and each
round's time ratio to the first variant. Every run must keep the same units: the script checks
that all plans are identical, bit for bit, and says so.

A variant is ``NAME=SRC[:EXTRA CLI FLAGS]``, SRC a ``src`` folder of a checkout of prunekit (for
example a ``git worktree`` of an older commit):

    python benchmarks/kprune_memory.py --variant before=../wt-old/src --variant now=src \\
        --variant low-memory=src:--low-memory --repeats 2
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared"
RESULTS = ROOT / "benchmarks" / "results"


def command(out: Path, extra: list[str]) -> list[str]:
    return [
        sys.executable, "-m", "prunekit", "prune",
        "--model", str(SHARED / "models" / "minilm-sst2"), "--task", "sst2", "--data", str(SHARED / "data" / "sst2"),
        "--keep-flops", "0.5", "--seq-len", "25.16", "--no-bench", "--device", "cpu", "--out", str(out), "--overwrite",
        *extra,
    ]  # fmt: skip


def run_round(variants: list[tuple[str, str, list[str]]], work: Path, round_: int) -> dict[str, dict]:
    """All variants started together; returns each one's peak RSS, pruning time and plan."""
    procs = {}
    for name, src, extra in variants:
        out = work / f"{name}-{round_}"
        env = os.environ | {"PYTHONPATH": str(Path(src).resolve()), "OMP_NUM_THREADS": "1", "TQDM_DISABLE": "1"}
        # The child holds its own copy of the descriptor, so ours can close at once.
        with open(work / f"{name}-{round_}.log", "w") as log:
            procs[name] = (subprocess.Popen(command(out, extra), env=env, stdout=log, stderr=log), out)
    results = {}
    for name, (proc, out) in procs.items():
        if proc.wait() != 0:
            raise SystemExit(f"variant {name} failed; see {work / f'{name}-{round_}.log'}")
        report = json.loads((out / "prune_report.json").read_text())
        results[name] = {
            "peak_rss_gb": report["peak_rss_bytes"] / 1e9,
            "prune_seconds": report["prune_seconds"],
            "accuracy": report["eval"]["pruned"]["accuracy"],
            # The plan without the teacher's identity that plans record since issue 20 (replay checks):
            # what the run decided, comparable with older code's plans.
            "plan": json.dumps({key: value for key, value in json.loads((out / "plan.json").read_text()).items()
                                if key not in ("teacher", "uniform")}, sort_keys=True),
            "plan_tensors": (out / "plan.safetensors").read_bytes(),
        }
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--variant", action="append", required=True, help="NAME=SRC[:EXTRA CLI FLAGS]")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--load", default="nothing else named", help="what else ran on the machine, for the report")
    parser.add_argument("--work", default=str(ROOT / "runs" / "kprune_memory"))
    parser.add_argument("--name", default="kprune_memory")
    args = parser.parse_args()
    variants = []
    for spec in args.variant:
        name, _, rest = spec.partition("=")
        src, _, extra = rest.partition(":")
        variants.append((name, src, extra.split()))
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)

    rounds = []
    for r in range(args.repeats):
        print(f"[{time.strftime('%H:%M:%S')}] round {r + 1} of {args.repeats}: {', '.join(v[0] for v in variants)}",
              flush=True)
        rounds.append(run_round(variants, work, r))
    first = variants[0][0]
    plans = {(x["plan"], x["plan_tensors"]) for result in rounds for x in result.values()}
    summary = {}
    for name, src, extra in variants:
        runs = [result[name] for result in rounds]
        summary[name] = {
            "src": src, "flags": extra,
            "peak_rss_gb": [round(x["peak_rss_gb"], 3) for x in runs],
            "prune_seconds": [round(x["prune_seconds"], 1) for x in runs],
            "time_ratio_to_first": [round(x["prune_seconds"] / result[first]["prune_seconds"], 3)
                                    for x, result in zip(runs, rounds, strict=True)],
            "median_peak_rss_gb": round(statistics.median(x["peak_rss_gb"] for x in runs), 3),
            "median_time_ratio_to_first": round(statistics.median(
                x["prune_seconds"] / result[first]["prune_seconds"] for x, result in zip(runs, rounds, strict=True)), 3),
            "accuracy": [round(x["accuracy"], 2) for x in runs],
        }
    meta = {"machine": f"{os.cpu_count()} CPU cores, one torch thread per run, variants started together",
            "load": args.load, "repeats": args.repeats, "identical_plans": len(plans) == 1,
            "run": "prunekit prune minilm-sst2 sst2 --keep-flops 0.5 --seq-len 25.16 --no-bench --device cpu"}
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / f"{args.name}.json").write_text(json.dumps({"meta": meta, "variants": summary}, indent=2) + "\n")
    lines = [f"# Kprune peak memory and time, variants side by side ({args.name})", "",
             f"`{meta['run']}`; {meta['machine']}, {args.repeats} rounds; also running: {args.load}. "
             f"All runs' plans identical bit for bit: {'yes' if meta['identical_plans'] else '**no**'}.", "",
             f"| variant | flags | peak RSS GB per round | median | prune s per round | time / {first}, per round "
             "| median ratio | dev accuracy |",
             "|---|---|---|---|---|---|---|---|"]
    for name, s in summary.items():
        lines.append(f"| {name} | {' '.join(s['flags']) or '–'} | {', '.join(map(str, s['peak_rss_gb']))} | "
                     f"{s['median_peak_rss_gb']} | {', '.join(map(str, s['prune_seconds']))} | "
                     f"{', '.join(map(str, s['time_ratio_to_first']))} | {s['median_time_ratio_to_first']} | "
                     f"{', '.join(map(str, s['accuracy']))} |")
    (RESULTS / f"{args.name}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    if not meta["identical_plans"]:
        raise SystemExit("the variants' plans differ")


if __name__ == "__main__":
    main()
