"""CoFi against Kprune at the same FLOPs on the SST-2 reference teacher (../shared/models/minilm-sst2).

For each CoFi budget (keep_params 0.4 and 0.1, i.e. 60% and 90% sparsity of the prunable encoder
parameters) the script trains CoFi from the teacher (student initialised from the teacher, which
the CoFi authors call "completely fine"), then prunes the same teacher with Kprune to the FLOPs the
CoFi model reached (counted at the reference SST-2 length 25.16), and reports dev accuracy,
parameters, FLOPs, training / pruning wall time and the CPU speedup at batch 32, sequence length 128
(both pruned models and the teacher timed alternately, prunekit.bench.measure_latency).

The reference schedule (cofi.md §5: 20 pruning epochs over 67,349 sentences with a 2-epoch warm-up,
then 20 fine-tuning epochs) is about 84,000 steps: days on a 2-core CPU. The CPU schedule is set by
the flags below and written into the results, e.g.

    python benchmarks/cofi_glue.py --train-samples 32000 --epochs 2 --warmup-epochs 1 --finetune-epochs 1

Models are kept under --work; ``--latency-only`` re-measures the speedups of saved models on a quiet
machine without training again.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared"
SEQ_LEN = 25.16  # reference mean SST-2 dev length, as in benchmarks/kprune_glue.py


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--teacher", default=str(SHARED / "models" / "minilm-sst2"))
    parser.add_argument("--data", default=str(SHARED / "data" / "sst2"))
    parser.add_argument("--budgets", default="0.4,0.1", help="CoFi keep_params values")
    parser.add_argument("--train-samples", type=int, default=None, help="first N training sentences (all: 67,349)")
    parser.add_argument("--epochs", type=float, default=2.0, help="CoFi pruning epochs")
    parser.add_argument("--warmup-epochs", type=float, default=1.0, help="sparsity warm-up epochs")
    parser.add_argument("--finetune-epochs", type=float, default=1.0)
    parser.add_argument("--lr", type=float, default=5e-5)
    parser.add_argument("--finetune-lr", type=float, default=5e-5)
    parser.add_argument("--reg-lr", type=float, default=0.02)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--eval-steps", type=int, default=500)
    parser.add_argument("--distill", default="layer")
    parser.add_argument("--no-kprune", action="store_true", help="skip the Kprune comparison")
    parser.add_argument("--rounds", type=int, default=5, help="alternating latency rounds")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--latency-only", action="store_true", help="re-measure saved models only")
    parser.add_argument("--work", default=str(ROOT / "runs" / "cofi_glue"))
    parser.add_argument("--results-dir", default=str(ROOT / "benchmarks" / "results"))
    parser.add_argument("--name", default="cofi_glue")
    return parser.parse_args()


def main() -> None:
    args = parse_args()
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    for noisy in ("httpx", "urllib3", "accelerate"):
        logging.getLogger(noisy).setLevel(logging.WARNING)

    from prunekit import prune
    from prunekit.core.accounting import count_flops, count_prunable_params, full_flops, full_prunable_params
    from prunekit.deploy.bench import measure_latency
    from prunekit.io.folders import load_pruned, load_tokenizer
    from prunekit.tasks.evaluate import evaluate

    work = Path(args.work)
    results_path = Path(args.results_dir) / f"{args.name}.json"
    teacher = load_pruned(args.teacher).eval()
    tokenizer = load_tokenizer(args.teacher)
    full = {"flops": full_flops(teacher, SEQ_LEN), "prunable_params": full_prunable_params(teacher)}
    previous = json.loads(results_path.read_text()) if results_path.is_file() else None
    teacher_acc = previous["teacher"]["accuracy"] if args.latency_only and previous else \
        evaluate(teacher, tokenizer, "sst2", args.data)["accuracy"]  # fmt: skip
    rows = previous["rows"] if args.latency_only and previous else []

    def describe(model, name: str, folder: Path) -> dict:
        return {
            "model": name, "folder": str(folder),
            "flops_kept": count_flops(model, SEQ_LEN) / full["flops"],
            "prunable_params": count_prunable_params(model),
            "param_sparsity": 1.0 - count_prunable_params(model) / full["prunable_params"],
            "params": sum(p.numel() for p in model.parameters()),
        }  # fmt: skip

    def latency(model) -> dict:
        result = measure_latency(model, baseline=teacher, batch_sizes=[32], seq_lens=[128], device="cpu",
                                 threads=torch.get_num_threads(), rounds=args.rounds)["results"][0]
        return {"latency_ms": result["latency_ms"], "teacher_latency_ms": result["baseline_ms"],
                "speedup": result["speedup"]}

    if args.latency_only:
        for row in rows:
            row.update(latency(load_pruned(row["folder"]).eval()))
            print(json.dumps(row), flush=True)
    else:
        for keep in (float(b) for b in args.budgets.split(",") if b):
            start = time.perf_counter()
            result = prune(args.teacher, data=args.data, task="sst2", method="cofi", keep_params=keep,
                           epochs=args.epochs, warmup_epochs=args.warmup_epochs, finetune_epochs=args.finetune_epochs,
                           lr=args.lr, finetune_lr=args.finetune_lr, reg_lr=args.reg_lr, batch_size=args.batch_size,
                           eval_steps=args.eval_steps, distill=args.distill, max_train_samples=args.train_samples,
                           seq_len=SEQ_LEN, seed=args.seed, device="cpu")  # fmt: skip
            wall = time.perf_counter() - start
            folder = result.save(work / f"cofi-{keep:g}", overwrite=True)
            log = result.report["method_log"]
            row = {
                "method": "cofi", "keep_params": keep, "target_sparsity": 1 - keep,
                **describe(result.model, "cofi", folder),
                "accuracy": evaluate(result.model, tokenizer, "sst2", args.data)["accuracy"],
                "train_seconds": wall, "prune_stage_seconds": log.get("prune_seconds"),
                "finetune_stage_seconds": log.get("finetune_seconds"),
                "expected_sparsity": log["expected_sparsity"], "deterministic_sparsity": log["deterministic_sparsity"],
                "surgery_max_abs_diff": log["surgery_max_abs_diff"],
                "structure": log["gates"], "hidden_size": result.report["hidden_size"],
                "prune_history": log["prune_history"], "finetune_history": log["finetune_history"],
            }  # fmt: skip
            row.update(latency(result.model))
            rows.append(row)
            print(json.dumps({k: v for k, v in row.items() if "history" not in k}), flush=True)
            write(args, rows, teacher_acc, full)
            if args.no_kprune:
                continue
            start = time.perf_counter()
            kp = prune(args.teacher, data=args.data, task="sst2", method="kprune", keep_flops=row["flops_kept"],
                       seq_len=SEQ_LEN, seed=args.seed, device="cpu")
            kp_wall = time.perf_counter() - start
            kp_folder = kp.save(work / f"kprune-as-cofi-{keep:g}", overwrite=True)
            kp_row = {
                "method": "kprune", "keep_params": None, "matched_to": f"cofi keep_params {keep:g}",
                **describe(kp.model, "kprune", kp_folder),
                "accuracy": evaluate(kp.model, tokenizer, "sst2", args.data)["accuracy"],
                "train_seconds": kp_wall, "hidden_size": get_hidden(kp.model),
                "structure": {"heads": [layer["num_heads"] for layer in kp.report["layers"]],
                              "neurons": [layer["intermediate_size"] for layer in kp.report["layers"]]},
            }  # fmt: skip
            kp_row.update(latency(kp.model))
            rows.append(kp_row)
            print(json.dumps(kp_row), flush=True)
            write(args, rows, teacher_acc, full)
    write(args, rows, teacher_acc, full)


def get_hidden(model) -> int:
    from prunekit.families import get_adapter

    return get_adapter(model).hidden_size


def write(args: argparse.Namespace, rows: list[dict], teacher_acc: float, full: dict) -> None:
    import torch

    from prunekit.core.runtime import library_versions

    schedule = (
        f"CoFi on CPU, shortened: {args.train_samples or 67349} training sentences, {args.epochs:g} pruning epoch(s) "
        f"(sparsity warm-up {args.warmup_epochs:g}), {args.finetune_epochs:g} fine-tuning epoch(s), batch "
        f"{args.batch_size}, lr {args.lr:g} / fine-tuning lr {args.finetune_lr:g} (constant), reg lr {args.reg_lr:g}, "
        f"distillation '{args.distill}' (weights 0.1 pred / 0.9 layer, T 2), student initialised from the teacher, "
        f"no pre-pruning stage, dev evaluation every {args.eval_steps} steps keeping the best state; reference: 20 + "
        "20 epochs on all 67,349 sentences, warm-up 2, lr 2e-5, reg lr 0.01"
    )
    meta = {
        "teacher": {"path": args.teacher, "accuracy": teacher_acc, **full},
        "schedule": schedule,
        "flops": f"encoder FLOPs at {SEQ_LEN} tokens (reference SST-2 dev mean), prunekit.core.accounting",
        "sparsity": "1 - prunable encoder params (q/k/v/out/FFN weights and biases) / the teacher's",
        "latency": f"CPU, batch 32, sequence length 128, median of {args.rounds} alternating rounds vs the teacher",
        "machine": f"{os.cpu_count()} CPU cores, torch threads {torch.get_num_threads()}",
        "args": vars(args),
        "versions": library_versions(),
    }
    results = Path(args.results_dir)
    results.mkdir(parents=True, exist_ok=True)
    (results / f"{args.name}.json").write_text(json.dumps({"meta": meta, "teacher": {"accuracy": teacher_acc},
                                                           "rows": rows}, indent=2) + "\n")
    lines = [
        f"# CoFi vs Kprune at the same FLOPs, SST-2 MiniLM teacher ({args.name})", "",
        f"Teacher: {args.teacher}, dev accuracy {teacher_acc:.2f}.", "",
        f"Schedule: {schedule}.", "",
        f"FLOPs: {meta['flops']}. Sparsity: {meta['sparsity']}. Latency: {meta['latency']}. Machine: {meta['machine']}.",
        "",
        "| method | target sparsity | achieved sparsity | FLOPs kept | params (M) | hidden | dev acc | "
        "wall s | latency ms | teacher ms | speedup |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]  # fmt: skip
    for r in rows:
        target = f"{r['target_sparsity']:.2f}" if r.get("target_sparsity") is not None else r.get("matched_to", "")
        lines.append(
            f"| {r['method']} | {target} | {r['param_sparsity']:.4f} | {r['flops_kept']:.4f} | {r['params'] / 1e6:.2f} "
            f"| {r['hidden_size']} | {r['accuracy']:.2f} | {r['train_seconds']:.0f} | {r.get('latency_ms', float('nan')):.1f} "
            f"| {r.get('teacher_latency_ms', float('nan')):.1f} | {r.get('speedup', float('nan')):.2f} |"
        )
    lines += ["", "Structures:", ""]
    lines += [f"- {r['method']} {r.get('keep_params') or r.get('matched_to')}: {json.dumps(r['structure'])}" for r in rows]
    (results / f"{args.name}.md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
