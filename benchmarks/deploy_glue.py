"""Deployment on the SST-2 teacher: Kprune models in eager PyTorch, ONNX Runtime fp32 and int8.

For the teacher (../shared/models/minilm-sst2) and its Kprune models (keep 0.5 and 0.3 of the
FLOPs, pruned beforehand with ``prunekit prune ... --no-bench`` and passed with ``--pruned``) this
exports each model to ONNX (``prunekit.export_onnx``, dynamo exporter, checked against PyTorch
within 1e-4), quantizes each export to int8 (``prunekit.export.quantize_onnx``), scores all nine
variants on the SST-2 dev set (the same ``prunekit.tasks.evaluate`` path; ONNX folders through
``OnnxModel``) and measures latency at batch 1 and 32, length 128.

Latency: every variant is timed once per round, all nine in turn, for ``--rounds`` rounds, with
fixed thread counts (torch.set_num_threads / ORT intra_op_num_threads); the reported value is the
median of the per-round medians and every ratio is between medians of the same run. The machine
(2 cores) is shared with other engineers' jobs; the load average is recorded.

    python -m prunekit prune --model ../shared/models/minilm-sst2 --task sst2 --data ../shared/data/sst2 \\
        --keep-flops 0.5 --out runs/kprune_0.5 --no-bench          # and 0.3
    python benchmarks/deploy_glue.py --pruned runs/kprune_0.5,runs/kprune_0.3
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared"
RESULTS = ROOT / "benchmarks" / "results"
RUNTIMES = ("eager", "ort_fp32", "ort_int8")


def export_all(name: str, model_dir: Path, work: Path) -> dict[str, Path]:
    """fp32 and int8 ONNX folders of one model (reused when a previous run made them from it)."""
    from prunekit.deploy.export import export_onnx, is_export_dir, quantize_onnx, read_export

    fp32, int8 = work / f"{name}-onnx", work / f"{name}-onnx-int8"
    if not (is_export_dir(fp32) and read_export(fp32)["source"] == str(model_dir)):
        start = time.perf_counter()
        export_onnx(model_dir, fp32, overwrite=True)
        print(f"{name}: exported in {time.perf_counter() - start:.0f} s", flush=True)
    if not (is_export_dir(int8) and read_export(int8)["source"] == str(fp32)):
        quantize_onnx(fp32, int8, overwrite=True)
    return {"ort_fp32": fp32, "ort_int8": int8}


def timed(kind: str, model, inputs, threads: int, min_run_time: float) -> float:
    """One round's median ms for an eager model or an OnnxModel."""
    if kind == "eager":
        from prunekit.deploy.bench import _time_once

        return _time_once(model, inputs, threads, min_run_time) * 1e3
    from prunekit.deploy.onnxrt import _time_once

    return _time_once(model, model.feeds(**inputs), min_run_time) * 1e3


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--teacher", default=str(SHARED / "models" / "minilm-sst2"))
    parser.add_argument("--data", default=str(SHARED / "data" / "sst2"))
    parser.add_argument("--pruned", default=str(ROOT / "runs" / "kprune_0.5") + "," + str(ROOT / "runs" / "kprune_0.3"),
                        help="comma-separated pruned model folders (prunekit prune outputs)")
    parser.add_argument("--work", default=str(ROOT / "runs" / "deploy_glue"), help="where the ONNX folders go")
    parser.add_argument("--batch-sizes", default="1,32")
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--threads", type=int, default=1, help="torch and ONNX Runtime threads for latency")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--min-run-time", type=float, default=1.0, help="seconds of calls per timing")
    parser.add_argument("--max-eval-examples", type=int, default=None)
    parser.add_argument("--name", default="deploy_glue")
    parser.add_argument("--accuracy-from", default=None,
                        help="a previous results JSON: reuse its dev accuracies of the same model folders")
    parser.add_argument("--render", default=None, help="only rewrite the .md from this results JSON")
    args = parser.parse_args()
    if args.render:
        result = json.loads(Path(args.render).read_text())
        Path(args.render).with_suffix(".md").write_text(markdown(result))
        return

    import torch

    from prunekit.core.accounting import count_flops
    from prunekit.core.runtime import library_versions
    from prunekit.deploy.bench import _inputs
    from prunekit.deploy.export import export_tokenizer
    from prunekit.deploy.onnxrt import OnnxModel
    from prunekit.io.folders import load_pruned, load_tokenizer, read_report
    from prunekit.tasks.evaluate import evaluate

    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    teacher_dir = Path(args.teacher).resolve()
    models = {"teacher": teacher_dir}
    for folder in (Path(p).resolve() for p in args.pruned.split(",") if p):
        models[f"{read_report(folder)['method']}-{read_report(folder)['keep_flops']}"] = folder
    previous = json.loads(Path(args.accuracy_from).read_text())["models"] if args.accuracy_from else {}
    started = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime())
    load_before = os.getloadavg()

    eager = {name: load_pruned(folder) for name, folder in models.items()}
    onnx_dirs = {name: export_all(name, folder, work) for name, folder in models.items()}
    rows: dict[str, dict] = {}
    tokenizer = load_tokenizer(teacher_dir)
    teacher_flops = {n: count_flops(eager["teacher"], n) for n in (args.seq_len,)}
    for name, folder in models.items():
        report = read_report(folder) if name != "teacher" else {}
        row = rows[name] = {"model": name, "folder": str(folder)}
        if report:
            row["flops_kept"] = report["flops_kept"]
            row["flops_seq_len"] = report["flops_seq_len"]
            row["flops_kept_at_bench_len"] = count_flops(eager[name], args.seq_len) / teacher_flops[args.seq_len]
            row["prune"] = {"method": report["method"], "keep_flops": report["keep_flops"], "seed": report["seed"],
                            "sample": report["sample"], "prune_seconds": report["prune_seconds"],
                            "layers": report["layers"]}
        row["onnx_mb"] = {kind: (path / "model.onnx").stat().st_size / 2**20 for kind, path in onnx_dirs[name].items()}
        row["accuracy"] = {}
        reused = next((r for r in previous.values() if r["folder"] == str(folder)), None)
        if reused is not None and args.max_eval_examples is None:
            # eager and fp32 accuracies do not depend on the quantization; int8 is always scored anew
            row["accuracy"] = {k: reused["accuracy"][k] for k in ("eager", "ort_fp32")}
            row["accuracy_from"] = args.accuracy_from
            print(f"{name}: eager and ORT fp32 dev accuracies from {args.accuracy_from}: {row['accuracy']}", flush=True)
        for kind in [k for k in RUNTIMES if k not in row["accuracy"]]:
            model = eager[name] if kind == "eager" else OnnxModel(onnx_dirs[name][kind])
            tok = tokenizer if kind == "eager" else export_tokenizer(onnx_dirs[name][kind])
            metrics = evaluate(model, tok, "sst2", args.data, max_examples=args.max_eval_examples)
            row["accuracy"][kind] = metrics["accuracy"]
            print(f"{name} {kind}: dev accuracy {metrics['accuracy']:.2f}", flush=True)
        row["int8_check"] = json.loads((onnx_dirs[name]["ort_int8"] / "export.json").read_text())["int8"]

    # ---- latency: all variants in turn, round by round ----
    torch.set_num_threads(args.threads)
    sessions = {(name, kind): OnnxModel(onnx_dirs[name][kind], threads=args.threads)
                for name in models for kind in ("ort_fp32", "ort_int8")}
    latency: dict[str, dict] = {}
    for batch_size in (int(b) for b in args.batch_sizes.split(",")):
        inputs = _inputs(eager["teacher"], batch_size, args.seq_len, torch.device("cpu"), seed=0)
        times: dict[tuple[str, str], list[float]] = {(n, k): [] for n in models for k in RUNTIMES}
        for round_ in range(args.rounds):
            for name in models:
                for kind in RUNTIMES:
                    model = eager[name] if kind == "eager" else sessions[(name, kind)]
                    times[(name, kind)].append(timed(kind, model, inputs, args.threads, args.min_run_time))
            print(f"batch {batch_size} round {round_ + 1}: "
                  + ", ".join(f"{n}/{k} {v[-1]:.1f}" for (n, k), v in times.items()), flush=True)
        latency[str(batch_size)] = {f"{n}/{k}": {"median_ms": statistics.median(v), "rounds_ms": v}
                                    for (n, k), v in times.items()}

    result = {
        "benchmark": args.name, "started": started, "teacher": str(teacher_dir), "data": args.data,
        "seq_len": args.seq_len, "threads": args.threads, "rounds": args.rounds, "min_run_time": args.min_run_time,
        "load_average_before": load_before, "load_average_after": os.getloadavg(),
        "versions": {**library_versions(), **json.loads((onnx_dirs["teacher"]["ort_fp32"] / "export.json")
                                                       .read_text())["versions"]},
        "models": rows, "latency_ms": latency,
    }
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / f"{args.name}.json").write_text(json.dumps(result, indent=2) + "\n")
    (RESULTS / f"{args.name}.md").write_text(markdown(result))
    print((RESULTS / f"{args.name}.md").read_text())


def markdown(result: dict) -> str:
    lat = result["latency_ms"]
    rows = result["models"]
    teacher_acc = rows["teacher"]["accuracy"]["eager"]
    lines = [
        "# Deployment on the SST-2 teacher: eager PyTorch vs ONNX Runtime fp32 vs ONNX Runtime int8 (deploy_glue)",
        "",
        f"Run {result['started']}. Teacher {Path(result['teacher']).name}; Kprune models pruned with "
        "`prunekit prune --method kprune --keep-flops K ... --no-bench` (calibration sample in the table). ONNX: dynamo exporter, each export "
        "checked against PyTorch within 1e-4; int8: ONNX Runtime dynamic quantization of the MatMul/Gemm weights. "
        f"Latency: CPU, sequence length {result['seq_len']}, {result['threads']} thread(s) for torch and ONNX "
        f"Runtime, {result['rounds']} rounds with all nine variants timed in turn in each round, median of the "
        "per-round medians; ratios are between medians of this one run. The 2-core machine was shared with other "
        f"engineers' jobs (load average {result['load_average_before'][0]:.1f} at the start, "
        f"{result['load_average_after'][0]:.1f} at the end), so absolute times are inflated and noisy; the "
        "alternation keeps the ratios fair.",
        "",
        "## Dev accuracy (872 examples)",
        "",
        "| model | calibration sample | FLOPs kept (at the sample's mean length) | FLOPs kept (length 128) | "
        "eager | ORT fp32 | ORT int8 | int8 vs fp32 argmax agreement (12 check sequences) | ONNX MB fp32 / int8 |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for name, row in rows.items():
        acc = row["accuracy"]
        pruned = "flops_kept" in row
        sample = row["prune"]["sample"] if pruned else None
        sample_text = f"{sample['num_tokens']} tokens, {sample['num_sequences']} sequences" if pruned else "–"
        f_prune = f"{row['flops_kept']:.4f} (at {row['flops_seq_len']:.2f})" if pruned else "1"
        f_128 = f"{row['flops_kept_at_bench_len']:.4f}" if pruned else "1"
        lines.append(f"| {name} | {sample_text} | {f_prune} | {f_128} | {acc['eager']:.2f} | {acc['ort_fp32']:.2f} | "
                     f"{acc['ort_int8']:.2f} | {row['int8_check']['argmax_agreement']:.3f} | "
                     f"{row['onnx_mb']['ort_fp32']:.1f} / {row['onnx_mb']['ort_int8']:.1f} |")
    lines += ["", "Kept heads / neurons per layer:", ""]
    for name, row in rows.items():
        if "prune" in row:
            layers = row["prune"]["layers"]
            lines.append(f"- {name}: heads {[s['num_heads'] for s in layers]}, "
                         f"neurons {[s['intermediate_size'] for s in layers]}")
    for batch_size, table in lat.items():
        base = table["teacher/ort_fp32"]["median_ms"]
        lines += ["", f"## Latency, batch {batch_size}, length {result['seq_len']} (ms; speedup over the teacher "
                  "in ONNX Runtime fp32)", "",
                  "| model | eager ms | ORT fp32 ms | ORT int8 ms | eager speedup vs eager teacher | "
                  "ORT fp32 speedup | ORT int8 speedup | target 0.85/F (ORT fp32) |", "|---|---|---|---|---|---|---|---|"]
        for name, row in rows.items():
            ms = {k: table[f"{name}/{k}"]["median_ms"] for k in RUNTIMES}
            eager_speedup = table["teacher/eager"]["median_ms"] / ms["eager"]
            target = f"{0.85 / row['flops_kept']:.2f}" if "flops_kept" in row else "–"
            lines.append(f"| {name} | {ms['eager']:.1f} | {ms['ort_fp32']:.1f} | {ms['ort_int8']:.1f} | "
                         f"{eager_speedup:.2f} | {base / ms['ort_fp32']:.2f} | {base / ms['ort_int8']:.2f} | {target} |")
    lines += ["", "## Targets", ""] + targets(result, teacher_acc)
    return "\n".join(lines) + "\n"


def targets(result: dict, teacher_acc: float) -> list[str]:
    lines = []
    table = result["latency_ms"].get("32")
    if table is None:
        return ["(batch 32 not measured)"]
    base = table["teacher/ort_fp32"]["median_ms"]
    for name, row in result["models"].items():
        if "flops_kept" not in row:
            continue
        speedup = base / table[f"{name}/ort_fp32"]["median_ms"]
        target = 0.85 / row["flops_kept"]
        verdict = "met" if speedup >= target else f"missed by {target - speedup:.2f}x ({speedup / target:.0%} of it)"
        lines.append(f"- {name}: ORT fp32 speedup at batch 32 {speedup:.2f}x vs target 0.85/F = {target:.2f}x: {verdict}")
    row = result["models"].get("kprune-0.5")
    if row is not None:
        speedup = base / table["kprune-0.5/ort_int8"]["median_ms"]
        drop = teacher_acc - row["accuracy"]["ort_int8"]
        fast = "met" if speedup >= 3 else f"missed by {3 - speedup:.2f}x"
        close = "met" if drop <= 1.5 else f"missed by {drop - 1.5:.2f} points"
        lines.append(f"- kprune-0.5 + int8: {speedup:.2f}x faster than the teacher in ORT fp32 (target 3x: {fast}); "
                     f"dev accuracy {row['accuracy']['ort_int8']:.2f} vs teacher {teacher_acc:.2f}, "
                     f"{drop:.2f} points below (target within 1.5: {close})")
    return lines


if __name__ == "__main__":
    main()
