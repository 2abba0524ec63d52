"""Peak memory of Kwon et al. and of Kprune's calibration on a real LLM, code versions side by side.

Issue 21, item 2: no tensor of (calibration tokens x vocabulary) may exist at once; with
SmolLM2-135M (vocabulary 49,152) and 128 x 512 calibration tokens, Kwon et al. and Kprune each
within 2.5 GB of peak RSS (the whole process).

Each case runs in a child process of its own, so its peak RSS (``ru_maxrss``) is its own: the child
imports torch and prunekit from the variant's ``src`` folder, loads the model (float32), builds the
calibration sample (WikiText-2 validation text, seeded windows) and runs one method:

- ``kwon``: Kwon et al. at 20% of the non-embedding parameters removed, the whole method (Fisher
  pass, search, rearrangement, mask tuning); the peak after the Fisher pass is reported too;
- ``kwon_fisher``: its Fisher pass alone (a forward and backward pass of the task loss per batch);
- ``kprune_prepare``: Kprune's budget-independent start (teacher targets, the teacher's layer 0 and
  the first knowledge pass, a forward and backward pass through all layers): the deepest pass of the
  run and the one holding the most state. A whole Kprune run at this size takes hours on a 2-core CPU.

``--max-batches K`` runs on the first K batches of the sample only (the peak of a per-batch pass is
reached in its first batch; what is held across batches then counts K/N of its size).

The report gives each case's peak RSS, the RSS after the model was loaded, the time, and a summary
of what was computed (Kwon's kept units; Kprune's first-pass statistics), so that versions can be
compared for equal results. A variant is ``NAME=SRC``, SRC a ``src`` folder of a checkout:

    python benchmarks/llm_memory.py --variant before=/work/main/src --variant after=src
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared"
RESULTS = ROOT / "benchmarks" / "results"
MODEL = Path("~/.cache/prunekit/models/smollm2-135m").expanduser()
CASES = ("kwon", "kwon_fisher", "kprune_prepare")


def _rss_gb() -> float:
    """This process's resident set now (Linux /proc), in GB."""
    with open("/proc/self/statm") as handle:
        return int(handle.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 1e9


def _peak_gb() -> float:
    """This process's peak resident set so far (VmHWM), in GB."""
    with open("/proc/self/status") as handle:
        for line in handle:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024 / 1e9
    raise RuntimeError("no VmHWM in /proc/self/status")


def _digest(tensors) -> str:
    """A short hash of tensors' float64 values rounded to 6 significant digits (equal results
    across versions whose sums differ only in the last bits give the same digest)."""
    h = hashlib.sha256()
    for t in tensors:
        values = t.detach().double().cpu().flatten().tolist()
        h.update(",".join(f"{v:.6g}" for v in values).encode())
    return h.hexdigest()[:16]


def child(args: argparse.Namespace) -> None:
    """One case in this process; prints one JSON line."""
    start = time.perf_counter()
    import torch

    from prunekit.io.folders import load_model, load_tokenizer
    from prunekit.tasks import TaskData
    from prunekit.tasks.causal_lm.data import build_lm_calibration_sample

    torch.manual_seed(0)
    imported = _rss_gb()
    model = load_model(args.model, head="causal_lm")
    tokenizer = load_tokenizer(args.model)
    loaded = _rss_gb()
    sample = build_lm_calibration_sample(tokenizer, args.data, num_sequences=args.num_sequences,
                                         seq_len=args.seq_len, seed=0, batch_size=args.batch_size)
    if args.max_batches:
        import dataclasses

        batches = sample.batches[: args.max_batches]
        count = sum(len(b["input_ids"]) for b in batches)
        sample = dataclasses.replace(sample, batches=batches, num_sequences=count, num_tokens=count * args.seq_len,
                                     indices=sample.indices[:count])
    from prunekit.families import get_adapter

    adapter = get_adapter(model)
    data = TaskData(kind="lm", sample=sample)
    run_start = time.perf_counter()
    summary: dict = {}
    if args.case in ("kwon", "kwon_fisher"):
        from prunekit.methods.kwon import KwonConfig, kwon, kwon_fisher

        config = KwonConfig(keep_params=0.8)
        fisher = kwon_fisher(adapter, data, config)
        summary["fisher_peak_rss_gb"] = _peak_gb()
        summary["fisher_digest"] = _digest([fisher.heads[k] for k in sorted(fisher.heads)]
                                           + [fisher.neurons[k] for k in sorted(fisher.neurons)])
        summary["fisher_seconds"] = fisher.seconds
    if args.case == "kwon":
        data.prepared = fisher
        plan, log = kwon(adapter, data, config)
        summary |= {
            "heads": [len(layer.heads) for layer in plan.layers],
            "neurons": [len(layer.neurons) for layer in plan.layers],
            "kept_digest": hashlib.sha256(json.dumps([[layer.heads, layer.neurons] for layer in plan.layers])
                                          .encode()).hexdigest()[:16],
            "scales_digest": _digest([s for layer in plan.layers for s in (layer.head_scales, layer.neuron_scales)
                                      if s is not None]),
        }
    elif args.case == "kprune_prepare":
        from prunekit.methods.kprune import KpruneConfig, kprune_prepare

        # The causal-LM defaults of the pipeline; KPRUNE_LOW_MEMORY=1: the low-memory allocator policy.
        config = KpruneConfig(keep_params=0.8, temperature=1.0, predictive="fisher", refit_check="holdout",
                              low_memory=os.environ.get("KPRUNE_LOW_MEMORY") == "1")
        prepared = kprune_prepare(adapter, data, config)
        stats = prepared.first_stats
        grad = [stats["grad_sq"][key] for key in sorted(stats["grad_sq"])]
        summary |= {
            "grad_sq_sum": float(sum(float(g.sum()) for g in grad)),
            "grad_sq_digest": _digest(grad),
            "gram_trace": float(torch.trace(stats["gram"])),
            "targets_digest": _digest([t["probs"] for t in prepared.targets]),
            "tail_mean": float(torch.cat([t["tail"] for t in prepared.targets]).mean()),
        }
    seconds = time.perf_counter() - run_start
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 1e9  # Linux: KiB
    print(json.dumps({"case": args.case, "peak_rss_gb": peak, "rss_after_import_gb": imported,
                      "rss_after_load_gb": loaded, "seconds": seconds,
                      "total_seconds": time.perf_counter() - start, "summary": summary}))


def run_case(name: str, src: str, case: str, args: argparse.Namespace, work: Path) -> dict:
    env = os.environ | {"PYTHONPATH": str(Path(src).resolve()), "OMP_NUM_THREADS": str(args.threads),
                        "TQDM_DISABLE": "1"}
    cmd = [sys.executable, __file__, "--child", case, "--model", str(args.model), "--data", str(args.data),
           "--num-sequences", str(args.num_sequences), "--seq-len", str(args.seq_len),
           "--batch-size", str(args.batch_size), "--max-batches", str(args.max_batches or 0)]
    log = work / f"{name}-{case}-{args.max_batches or 'all'}.log"
    with open(log, "w") as handle:
        proc = subprocess.run(cmd, env=env, stdout=subprocess.PIPE, stderr=handle, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"{name} {case} failed; see {log}")
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    print(f"{name} {case}: peak {result['peak_rss_gb']:.2f} GB in {result['seconds']:.0f} s", flush=True)
    return result


def write_report(results: dict, args: argparse.Namespace) -> None:
    out = RESULTS / args.name
    out.with_suffix(".json").write_text(json.dumps(results, indent=2) + "\n")
    lines = [
        "# Peak memory of Kwon et al. and Kprune on SmolLM2-135M (issue 21, item 2)",
        "",
        f"SmolLM2-135M (float32, 0.54 GB, vocabulary 49,152), {args.num_sequences} x {args.seq_len} calibration "
        f"tokens of WikiText-2 validation text in batches of {args.batch_size}, CPU, {args.threads} torch "
        f"thread(s). Target: peak RSS at most 2.5 GB. \"N batches\": the first N batches of 8 x 512 only.",
        "",
        "| variant | case | peak RSS (GB) | peak by the end of the Fisher pass (GB) | RSS after loading (GB) | time (s) | "
        "other load on the machine |",
        "|---|---|---:|---:|---:|---:|---|",
    ]
    for name, cases in results["variants"].items():
        for case, r in cases.items():
            fisher = r["summary"].get("fisher_peak_rss_gb")
            lines.append(f"| {name} | {case} | {r['peak_rss_gb']:.2f} | {'' if fisher is None else f'{fisher:.2f}'} | "
                         f"{r['rss_after_load_gb']:.2f} | {r['seconds']:.0f} | {r.get('load', '')} |")
    lines += ["", "What each case computed (equal digests: the same result to 6 significant digits):", ""]
    for name, cases in results["variants"].items():
        for case, r in cases.items():
            lines.append(f"- {name} {case}: `{json.dumps(r['summary'])}`")
    if args.notes:
        lines += ["", Path(args.notes).read_text().rstrip()]
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--variant", action="append", default=[], help="NAME=SRC")
    parser.add_argument("--case", action="append", choices=CASES, help="default: both")
    parser.add_argument("--child", choices=CASES, help=argparse.SUPPRESS)
    parser.add_argument("--model", default=str(MODEL))
    parser.add_argument("--data", default=str(SHARED / "data" / "wikitext2"))
    parser.add_argument("--num-sequences", type=int, default=128)
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--max-batches", type=int, default=0, help="only the first K batches (0: all)")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--load", default="nothing else named", help="what else ran on the machine, for the report")
    parser.add_argument("--work", default=str(ROOT / "runs" / "llm_memory"))
    parser.add_argument("--name", default="llm_memory")
    parser.add_argument("--merge", action="store_true", help="add to the existing results file")
    parser.add_argument("--combine", nargs="+", default=[], help="results files whose variants go into --name")
    parser.add_argument("--notes", help="a Markdown file appended to the report")
    args = parser.parse_args()
    if args.child:
        args.case = args.child
        child(args)
        return
    if args.combine:
        results = {"variants": {}}
        for name in args.combine:
            results["variants"] |= json.loads(Path(name).read_text())["variants"]
        write_report(results, args)
        return
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    path = (RESULTS / args.name).with_suffix(".json")
    results = json.loads(path.read_text()) if args.merge and path.exists() else {"variants": {}}
    for spec in args.variant:
        name, _, src = spec.partition("=")
        for case in args.case or CASES:
            key = case if not args.max_batches else f"{case} ({args.max_batches} batches)"
            results["variants"].setdefault(name, {})[key] = run_case(name, src, case, args, work) | {
                "batches": args.max_batches or "all", "load": args.load}
            write_report(results, args)


if __name__ == "__main__":
    main()
