"""The ``prunekit`` command line. Thin: each subcommand parses its flags, calls one public
function that a Python user would call, and formats the result. prunekit's own errors print as
one line with a non-zero exit status, never as a traceback.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from prunekit.core.errors import PrunekitError
from prunekit.core.preflight import json_text

logger = logging.getLogger("prunekit")


def _add_common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--device", default="auto", help="cpu, cuda, cuda:N or auto (default: auto)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")


def _fraction(text: str) -> float:
    try:
        value = float(text)
    except ValueError as err:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from err
    if not 0.0 < value < 1.0:
        raise argparse.ArgumentTypeError(f"{value} is out of range: give a fraction in (0, 1), e.g. 0.5")
    return value


def _fractions(text: str) -> list[float]:
    """A comma-separated list of fractions in (0, 1), e.g. ``0.7,0.5,0.3``."""
    try:
        values = [_fraction(part.strip()) for part in text.split(",") if part.strip()]
    except argparse.ArgumentTypeError as err:
        if "," not in text:
            raise
        raise argparse.ArgumentTypeError(
            f"{text!r}: {err}; commas separate several budgets (0.7,0.5), so write decimals with a dot "
            f"({text.replace(',', '.', 1)!r} for one budget)") from None
    if not values:
        raise argparse.ArgumentTypeError("give at least one fraction in (0, 1), e.g. 0.5 or 0.7,0.5")
    return values


def _key_value(text: str) -> tuple[str, Any]:
    if "=" not in text:
        raise argparse.ArgumentTypeError(f"{text!r}: expected KEY=VALUE")
    key, raw = text.split("=", 1)
    try:
        value = json.loads(raw)
    except json.JSONDecodeError:
        value = raw
    return key.replace("-", "_"), value


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="prunekit", description="Structured pruning of Hugging Face Transformers.")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("prune", help="prune a fine-tuned model to a FLOPs budget and save it")
    p.add_argument("--model", required=True, help="fine-tuned model folder (or hub id)")
    p.add_argument("--task", required=True,
                   help="sst2, mrpc, stsb, qnli, qqp, mnli, rte, cola, squad, squad_v2 or causal_lm")
    p.add_argument("--data", required=True, help="GLUE TSV folder, CSV/JSONL file or folder, SQuAD JSON file or "
                   "folder (train-v1.1.json, dev-v1.1.json), or hub name")
    p.add_argument("--tokenizer", default=None, help="tokenizer folder or hub id (default: the model folder's)")
    p.add_argument("--method", default="kprune", help="kprune, kwon, cofi, flap, wanda_sp, llm_pruner, shortgpt, magnitude or random (default: kprune)")
    budget = p.add_mutually_exclusive_group(required=True)
    budget.add_argument("--keep-flops", type=_fractions,
                        help="fraction of encoder FLOPs kept, in (0, 1); a comma list (0.7,0.5) prunes once "
                             "per budget from one calibration, one folder each inside --out")
    budget.add_argument("--keep-params", type=_fractions,
                        help="fraction of non-embedding parameters kept (0.8 = 20%% removed, how LLM results are "
                             "reported); CoFi: of its prunable encoder parameters (0.1 = 90%% sparsity); a comma "
                             "list prunes once per budget, one folder each inside --out")
    budget.add_argument("--keep-latency", type=_fractions,
                        help="fraction of latency kept instead (needs --lut); a comma list as for --keep-flops")
    p.add_argument("--lut", default=None, help="latency table JSON from `prunekit lut`, for --keep-latency")
    p.add_argument("--out", required=True, help="output folder (must be new or empty unless --overwrite)")
    p.add_argument("--overwrite", action="store_true", help="replace a non-empty output folder")
    p.add_argument("--uniform", action="store_true",
                   help="every layer keeps the same query heads, key/value heads and FFN width; the folder is "
                        "the family's stock class, loading without prunekit (decoders)")
    p.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default=None,
                   help="dtype of the pruned model (default: the teacher folder's own); the CPU computes in "
                        "float32 whatever the dtype")
    p.add_argument("--num-tokens", type=int, default=None,
                   help="calibration sample size in tokens (default: the method's, Kprune 100000)")
    p.add_argument("--num-sequences", type=int, default=None,
                   help="calibration sample size in sequences instead (default: the method's, Kwon 2048)")
    p.add_argument("--batch-order", choices=("length", "draw"), default="length",
                   help="calibration batches: 'length' groups sequences of similar length (about 3x less padding "
                        "on GLUE); 'draw' keeps the draw order, as the Kprune reference code batches "
                        "(benchmarks/results/kprune_fidelity.md)")
    p.add_argument("--seq-len", type=float, default=None,
                   help="FLOPs sequence length (default: 170 for SQuAD, else the sample mean); causal_lm: the "
                        "calibration window length L of --num-sequences windows (default 2048 capped at the "
                        "model's positions), at which FLOPs are also counted")
    p.add_argument("--window", type=int, default=None,
                   help="causal_lm: perplexity window (default 2048 capped at the model's max positions)")
    p.add_argument("--stride", type=int, default=None, help="causal_lm: perplexity stride (default: the window)")
    p.add_argument("--new-tokens", type=int, default=32, help="causal_lm: tokens of the decode benchmark")
    p.add_argument("--temperature", type=float, default=None, help="Kprune: softmax temperature T (2)")
    p.add_argument("--lam-pred", type=float, default=None, help="Kprune: predictive-knowledge weight (1)")
    p.add_argument("--lam-rep", type=float, default=None, help="Kprune: representational weight (2.5e-4)")
    p.add_argument("--mu", type=float, default=None, help="Kprune: head-score multiplier (64)")
    p.add_argument("--no-sublayer-tuning", action="store_true", help="Kprune: skip the least-squares re-fit")
    p.add_argument("--low-memory", action="store_true",
                   help="Kprune: return freed memory after every calibration batch (lower peak RSS, about 20%% slower)")
    p.add_argument("--epochs", type=float, default=None, help="CoFi: pruning epochs (20)")
    p.add_argument("--finetune-epochs", type=float, default=None, help="CoFi: fine-tuning epochs after surgery (20)")
    p.add_argument("--distill", choices=("layer", "pred"), default=None,
                   help="CoFi: prediction + layerwise distillation (layer, default) or prediction only (pred)")
    p.add_argument("--student-init", default=None, help="CoFi: model folder the student starts from (the teacher)")
    p.add_argument("--checkpoint-dir", default=None, help="CoFi: folder for checkpoints (see --set save_steps=N)")
    p.add_argument("--resume", action="store_true", help="CoFi: continue the run checkpointed in --checkpoint-dir")
    p.add_argument("--mixed-precision", choices=("no", "fp16", "bf16"), default=None, help="CoFi on GPU")
    p.add_argument("--set", type=_key_value, action="append", default=[], metavar="KEY=VALUE",
                   help="any other method option, e.g. --set ridge=1e-5 or --set batch_size=16")
    p.add_argument("--no-eval", action="store_true", help="skip evaluating teacher and pruned model on dev")
    p.add_argument("--no-bench", action="store_true", help="skip the latency measurement")
    _add_common(p)

    e = sub.add_parser("eval", help="evaluate a model on a task's dev split")
    evaluated = e.add_mutually_exclusive_group(required=True)
    evaluated.add_argument("--model", help="model folder (or hub id), run in PyTorch")
    evaluated.add_argument("--onnx", help="ONNX folder from `prunekit export`, run in ONNX Runtime (CPU)")
    e.add_argument("--task", required=True)
    e.add_argument("--data", required=True)
    e.add_argument("--tokenizer", default=None, help="tokenizer folder or hub id (default: the model folder's)")
    e.add_argument("--split", default="dev")
    e.add_argument("--batch-size", type=int, default=64)
    e.add_argument("--max-examples", type=int, default=None)
    e.add_argument("--max-length", type=int, default=None, help="truncation / SQuAD feature length (task's)")
    e.add_argument("--doc-stride", type=int, default=None, help="SQuAD: overlap of context windows (128)")
    e.add_argument("--window", type=int, default=None,
                   help="causal_lm: perplexity window (default 2048 capped at the model's max positions)")
    e.add_argument("--stride", type=int, default=None, help="causal_lm: perplexity stride (default: the window)")
    e.add_argument("--json", default=None, help="also write the metrics to this JSON file (a new file, never "
                   "inside the model or data, unless --overwrite replaces it)")
    e.add_argument("--overwrite", action="store_true", help="replace an existing --json file")
    _add_common(e)

    f = sub.add_parser("finetune", help="fine-tune a pretrained encoder into a task teacher")
    f.add_argument("--model", required=True, help="pretrained model folder (or hub id)")
    f.add_argument("--task", required=True)
    f.add_argument("--data", required=True)
    f.add_argument("--out", required=True)
    f.add_argument("--tokenizer", default=None, help="tokenizer folder or hub id (default: the model folder's)")
    f.add_argument("--overwrite", action="store_true")
    f.add_argument("--epochs", type=int, default=3)
    f.add_argument("--lr", type=float, default=5e-5)
    f.add_argument("--batch-size", type=int, default=32)
    f.add_argument("--max-length", type=int, default=None)
    f.add_argument("--doc-stride", type=int, default=None, help="SQuAD: overlap of context windows (128)")
    f.add_argument("--max-train-samples", type=int, default=None)
    _add_common(f)

    b = sub.add_parser("bench", help="measure latency (and the speedup against a baseline)")
    b.add_argument("--model", required=True)
    b.add_argument("--baseline", default=None)
    b.add_argument("--batch-sizes", default="32", help="comma-separated, e.g. 1,8,32")
    b.add_argument("--seq-lens", default="128", help="comma-separated, e.g. 64,128")
    b.add_argument("--threads", type=int, default=None, help="CPU threads (default: torch's)")
    b.add_argument("--rounds", type=int, default=5, help="alternating measurement rounds")
    b.add_argument("--generate", action="store_true",
                   help="causal LMs: prefill latency and greedy decode tokens/s with the KV cache instead")
    b.add_argument("--new-tokens", type=int, default=32, help="--generate: tokens decoded per repeat")
    b.add_argument("--json", default=None, help="also write the results to this JSON file (a new file, never "
                   "inside the model folders, unless --overwrite replaces it)")
    b.add_argument("--overwrite", action="store_true", help="replace an existing --json file")
    _add_common(b)
    _add_deploy_options(sub, b)

    t = sub.add_parser("lut", help="measure per-sublayer latency tables on this device (for --keep-latency)")
    t.add_argument("--model", required=True, help="unpruned model folder")
    t.add_argument("--out", required=True, help="JSON file to write (new, outside the model folder)")
    t.add_argument("--overwrite", action="store_true", help="replace an existing --out file")
    t.add_argument("--batch-size", type=int, default=32)
    t.add_argument("--seq-len", type=int, default=128)
    t.add_argument("--neuron-step", type=int, default=64, help="FFN widths measured: 0, step, 2*step, ..., d_ff")
    t.add_argument("--warmup", type=int, default=3)
    t.add_argument("--repeats", type=int, default=10, help="timed calls per point (the median is kept)")
    t.add_argument("--threads", type=int, default=None, help="CPU threads (default: torch's)")
    _add_common(t)

    c = sub.add_parser("compare", help="compare pruning methods on one teacher, sample and seed at several budgets")
    c.add_argument("--model", required=True)
    c.add_argument("--task", required=True)
    c.add_argument("--data", required=True)
    c.add_argument("--tokenizer", default=None, help="tokenizer folder or hub id (default: the model folder's)")
    c.add_argument("--methods", default="kprune,kwon,magnitude", help="comma-separated method names")
    c.add_argument("--keep-flops", type=_fractions, default=[0.7, 0.5, 0.4, 0.3], help="comma-separated fractions")
    c.add_argument("--keep-params", type=_fractions, default=None,
                   help="fractions of non-embedding parameters kept instead of --keep-flops")
    c.add_argument("--window", type=int, default=None, help="causal_lm: perplexity window")
    c.add_argument("--calibration-length", type=int, default=None, help="causal_lm: calibration window length")
    c.add_argument("--out", required=True, help="folder for compare.json, compare.md and compare.png")
    c.add_argument("--overwrite", action="store_true")
    c.add_argument("--num-tokens", type=int, default=None, help="shared calibration sample size (default 100000)")
    c.add_argument("--num-sequences", type=int, default=None, help="shared sample size in sequences instead")
    c.add_argument("--seq-len", type=float, default=None, help="FLOPs sequence length (default: sample mean)")
    c.add_argument("--metric", default=None, help="metric to plot (default: the task's main metric)")
    c.add_argument("--no-bench", action="store_true", help="skip the latency measurement")
    c.add_argument("--bench-batch-size", type=int, default=32)
    c.add_argument("--bench-seq-len", type=int, default=128)
    c.add_argument("--rounds", type=int, default=3, help="alternating latency rounds")
    c.add_argument("--max-eval-examples", type=int, default=None, help="evaluate on the first N dev examples")
    c.add_argument("--save-models", action="store_true", help="also save every pruned model under models/")
    c.add_argument("--set", type=_key_value, action="append", default=[], metavar="METHOD.KEY=VALUE",
                   help="a method option, e.g. --set kwon.damp=1.0")
    _add_common(c)

    r = sub.add_parser("report", help="draw structure.png (kept heads and neurons per layer) for a model folder")
    r.add_argument("model", help="model folder (pruned by prunekit, or not)")
    r.add_argument("--out", default=None, help="image path (default: structure.png in the folder)")
    r.add_argument("--overwrite", action="store_true", help="replace an existing --out file")
    r.add_argument("-v", "--verbose", action="store_true", help="debug logging")

    ap = sub.add_parser("apply-plan", help="rebuild a pruned model from its teacher and the plan saved beside it")
    ap.add_argument("--model", required=True, help="the teacher folder the plan was made from")
    ap.add_argument("--plan", required=True, help="a pruned folder (plan.json + plan.safetensors), or a plan.json")
    ap.add_argument("--out", required=True, help="output folder (must be new or empty unless --overwrite)")
    ap.add_argument("--overwrite", action="store_true", help="replace a folder prunekit wrote")
    ap.add_argument("--force", action="store_true",
                    help="apply the plan although --model is not the teacher it records (family, class, config "
                         "or weights differ)")
    ap.add_argument("-v", "--verbose", action="store_true", help="debug logging")

    d = sub.add_parser("demo", help="fine-tune the packaged MiniLM on SST-2, prune it with Kprune, compare")
    d.add_argument("--data", default=None, help="SST-2 folder (default ../shared/data/sst2 if present, else the hub)")
    d.add_argument("--out", default="runs/demo")
    d.add_argument("--keep-flops", type=_fraction, default=0.5)
    d.add_argument("--num-tokens", type=int, default=100_000)
    d.add_argument("--train-samples", type=int, default=8000, help="SST-2 training examples for the teacher (0: all)")
    d.add_argument("--epochs", type=int, default=1)
    d.add_argument("--cache-dir", default=None, help="teacher cache (default ~/.cache/prunekit/teachers)")
    _add_common(d)
    return parser


def _device(args: argparse.Namespace) -> str | None:
    return None if args.device == "auto" else args.device


def _print_table(rows: list[dict[str, Any]]) -> None:
    from prunekit.io.reports import markdown_table

    columns = [(key, key) for key in rows[0]]
    print(markdown_table(rows, columns))


def cmd_prune(args: argparse.Namespace) -> int:
    from prunekit.api import prune_and_save, prune_and_save_many
    from prunekit.demo import summary_rows

    options = dict(args.set)
    if args.lut is not None:
        options["lut"] = args.lut
    for flag in ("temperature", "lam_pred", "lam_rep", "mu", "seq_len", "epochs", "finetune_epochs", "distill",
                 "student_init", "checkpoint_dir", "mixed_precision"):
        if getattr(args, flag) is not None:
            options[flag] = getattr(args, flag)
    if args.resume:
        options["resume"] = True
    if args.no_sublayer_tuning:
        options["sublayer_tuning"] = False
    if args.low_memory:
        options["low_memory"] = True
    from prunekit.methods import get_method
    from prunekit.tasks.registry import family_of

    lm = family_of(args.task).generates  # calibrated on windows, scored in perplexity windows
    if lm and options.get("seq_len") is not None:
        # A causal LM's --seq-len is its calibration window; FLOPs are counted at that length.
        options["calibration_length"] = int(options.pop("seq_len"))
    if lm:
        options |= {"eval_window": args.window, "eval_stride": args.stride, "bench_new_tokens": args.new_tokens}
    elif args.window is not None or args.stride is not None:
        raise PrunekitError("--window and --stride apply to --task causal_lm only")
    if args.tokenizer is not None:
        options["tokenizer"] = args.tokenizer
    budgets = args.keep_flops or args.keep_latency or args.keep_params
    if args.keep_params and not get_method(args.method).training:
        budget = {"keep_params": args.keep_params}
    elif args.keep_params:
        # CoFi's own budget is a method option; one value or a list, like the others.
        options["keep_params"] = args.keep_params[0] if len(args.keep_params) == 1 else args.keep_params
        budget = {}
    else:
        budget = {"keep_flops": args.keep_flops} if args.keep_flops else {"keep_latency": args.keep_latency}
    for key, _ in args.set:
        if key in ("task", "method", "seed", "device", "uniform", "overwrite", "num_tokens", "num_sequences",
                   "run_eval", "run_bench", "sort_by_length", "keep_flops", "keep_params", "keep_latency", "dtype"):
            flag = {"run_eval": "no-eval", "run_bench": "no-bench", "sort_by_length": "batch-order"}.get(
                key, key.replace("_", "-"))
            raise PrunekitError(f"--set {key}=...: {key} is not a method option but a flag of prune; use --{flag}")
    common = dict(task=args.task, method=args.method, num_tokens=args.num_tokens, num_sequences=args.num_sequences,
                  seed=args.seed, device=_device(args), overwrite=args.overwrite, run_eval=not args.no_eval,
                  run_bench=not args.no_bench, uniform=args.uniform, sort_by_length=args.batch_order == "length",
                  dtype=args.dtype, **options)
    if len(budgets) == 1:
        reports = [prune_and_save(args.model, args.out, args.data, **{k: v[0] for k, v in budget.items()}, **common)]
        folders = [args.out]
    else:
        from prunekit.api import budget_name, budgets_from

        reports = prune_and_save_many(args.model, args.out, args.data, **budget, **common)
        folders = [str(Path(args.out) / budget_name(b)) for b in budgets_from(**budget, keep_params=args.keep_params)]
    for report, folder in zip(reports, folders, strict=True):
        _print_table(summary_rows(report))
        achieved = ""
        if report.get("achieved_keep") is not None:
            achieved = (f"keep_{report['budget']['kind']} target {report['target_keep']:.4f}, "
                        f"achieved {report['achieved_keep']:.4f}, ")
        print(f"pruned model written to {folder} ({achieved}FLOPs kept {report['flops_kept']:.4f}, non-embedding "
              f"parameters kept {report['non_embedding_params_kept']:.4f}, pruning took {report['prune_seconds']:.1f} s)")
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    from prunekit.core.preflight import (
        check_head_fits_task,
        check_onnx_fits_task,
        check_seq_len,
        check_vocabulary,
        settle_pad_token,
    )
    from prunekit.io.folders import load_model, load_tokenizer
    from prunekit.io.outdir import check_output_file, write_output_file
    from prunekit.tasks.evaluate import evaluate
    from prunekit.tasks.spec import get_task

    task = get_task(args.task)
    inputs = (args.model, args.onnx, args.data, args.tokenizer)
    check_output_file(args.json, args.overwrite, inputs)  # before the evaluation, not after it
    if args.onnx:
        model, tokenizer = _onnx_model(args)
        check_onnx_fits_task(model.record, task, args.max_length, args.onnx)
    else:
        # In the dtype the folder was saved in, as prune scored it (a bfloat16 model in bfloat16).
        model = load_model(args.model, head=task.head, device=_device(args), dtype="auto")
        tokenizer = load_tokenizer(args.tokenizer or args.model)
        check_vocabulary(model, tokenizer)
        tokenizer = settle_pad_token(model, tokenizer, task)
        check_head_fits_task(model.config, task)
        check_seq_len(model.config, args.max_length, "--max-length")
        check_seq_len(model.config, args.window, "--window")
    metrics = evaluate(model, tokenizer, task, args.data, split=args.split, batch_size=args.batch_size,
                       device=_device(args), max_examples=args.max_examples, max_length=args.max_length,
                       doc_stride=args.doc_stride, window=args.window, stride=args.stride)
    print(json.dumps(metrics, indent=2))
    if args.json:
        record = {"model": args.model or args.onnx, "task": task.name, "split": args.split, "metrics": metrics}
        write_output_file(args.json, json_text(record) + "\n", args.overwrite, inputs)
    return 0


def cmd_finetune(args: argparse.Namespace) -> int:
    from prunekit.tasks.finetune import FinetuneConfig, finetune

    config = FinetuneConfig(epochs=args.epochs, lr=args.lr, batch_size=args.batch_size, max_length=args.max_length,
                            doc_stride=args.doc_stride, seed=args.seed, max_train_samples=args.max_train_samples,
                            device=_device(args))
    out = finetune(args.model, args.task, args.data, args.out, config, overwrite=args.overwrite,
                   tokenizer=args.tokenizer)
    print(f"fine-tuned model written to {out}")
    return 0


def _int_list(text: str) -> list[int]:
    try:
        return [int(x) for x in text.split(",") if x]
    except ValueError as err:
        raise PrunekitError(f"{text!r} is not a comma-separated list of integers") from err


def _bench_generation(args: argparse.Namespace, model: Any, baseline: Any) -> int:
    """``bench --generate``: prefill latency and greedy decode tokens/s of a causal LM."""
    from prunekit.deploy.bench import measure_generation

    runs = [measure_generation(model, baseline=baseline, batch_size=b, prompt_len=s, new_tokens=args.new_tokens,
                               device=_device(args), threads=args.threads, repeats=args.rounds)
            for b in _int_list(args.batch_sizes) for s in _int_list(args.seq_lens)]
    result = runs[0] | {"results": [row for run in runs for row in run["results"]]}
    _print_table([{k: v for k, v in row.items() if not k.endswith("_repeats")} for row in result["results"]])
    _write_bench_json(args, result)
    return 0


def _write_bench_json(args: argparse.Namespace, result: dict[str, Any]) -> None:
    from prunekit.io.outdir import write_output_file

    if args.json:
        write_output_file(args.json, json_text(result) + "\n", args.overwrite, (args.model, args.baseline))


def cmd_bench(args: argparse.Namespace) -> int:
    from prunekit.core.preflight import check_seq_len
    from prunekit.deploy.bench import measure_latency
    from prunekit.io.folders import load_pruned
    from prunekit.io.outdir import check_output_file

    check_output_file(args.json, args.overwrite, (args.model, args.baseline))
    if args.runtime == "onnxruntime":
        result = _bench_onnx(args)
    else:
        model = load_pruned(args.model)
        for seq_len in _int_list(args.seq_lens):
            check_seq_len(model.config, seq_len, "--seq-lens")
        baseline = load_pruned(args.baseline) if args.baseline else None
        if args.generate:
            for seq_len in _int_list(args.seq_lens):
                check_seq_len(model.config, seq_len + args.new_tokens, f"--seq-lens {seq_len} plus --new-tokens")
            for flag, loaded in (("--model", model), ("--baseline", baseline)):
                if loaded is not None and not loaded.can_generate():
                    raise PrunekitError(f"bench --generate times the decoding of a causal LM, but {flag} "
                                        f"{getattr(args, flag[2:])} is a {type(loaded).__name__}; drop --generate "
                                        "to time its forward pass")
            return _bench_generation(args, model, baseline)
        result = measure_latency(model, baseline=baseline, batch_sizes=_int_list(args.batch_sizes),
                                 seq_lens=_int_list(args.seq_lens), device=_device(args), threads=args.threads,
                                 rounds=args.rounds)
    rows = [{k: v for k, v in row.items() if not k.endswith("_rounds")} for row in result["results"]]
    _print_table(rows)
    _write_bench_json(args, result)
    return 0


def cmd_lut(args: argparse.Namespace) -> int:
    from prunekit.core.preflight import check_seq_len
    from prunekit.io.folders import load_pruned
    from prunekit.io.outdir import check_output_file
    from prunekit.methods.lut import measure_latency_table

    check_output_file(args.out, args.overwrite, (args.model,), "--out")
    model = load_pruned(args.model)
    check_seq_len(model.config, args.seq_len, "--seq-len")
    table = measure_latency_table(model, batch_size=args.batch_size, seq_len=args.seq_len,
                                  device=_device(args), neuron_step=args.neuron_step, warmup=args.warmup,
                                  repeats=args.repeats, threads=args.threads, seed=args.seed)
    table.save(args.out, overwrite=args.overwrite, inputs=(args.model,))
    fits = table.fits()
    _print_table([{"sublayer": kind, "full ms": ms[-1], "const ms": fits[kind].const, "free units": fits[kind].free,
                   "ms per further unit": fits[kind].slope}
                  for kind, ms in (("attn", table.attn_ms), ("ffn", table.ffn_ms))])
    print(f"latency table written to {args.out}")
    return 0


def cmd_compare(args: argparse.Namespace) -> int:
    from prunekit.compare import compare

    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    options: dict[str, dict[str, Any]] = {}
    for key, value in args.set:
        if "." not in key:
            raise PrunekitError(f"--set {key}=...: name the method too, e.g. --set kwon.{key}={value}")
        method, name = key.split(".", 1)
        options.setdefault(method, {})[name] = value
    result = compare(args.model, args.task, args.data, args.out, methods=methods, keep_flops=args.keep_flops,
                     num_tokens=args.num_tokens, num_sequences=args.num_sequences, seed=args.seed,
                     device=_device(args), seq_len=args.seq_len, metric=args.metric, run_bench=not args.no_bench,
                     bench_batch_size=args.bench_batch_size, bench_seq_len=args.bench_seq_len,
                     bench_rounds=args.rounds, max_eval_examples=args.max_eval_examples,
                     save_models=args.save_models, overwrite=args.overwrite, method_options=options,
                     keep_params=args.keep_params, eval_window=args.window,
                     calibration_length=args.calibration_length, tokenizer=args.tokenizer)
    print((Path(args.out) / "compare.md").read_text())
    print(f"compare.json, compare.md and compare.png written to {args.out} ({len(result['rows'])} pruned models)")
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    from prunekit.io.reports import structure_report

    path = structure_report(args.model, args.out, overwrite=args.overwrite)
    print(f"structure plot written to {path}")
    return 0


def cmd_apply_plan(args: argparse.Namespace) -> int:
    from prunekit.api import apply_plan
    from prunekit.io.folders import REPORT_FILE, check_output_dir, load_plan, load_tokenizer, save_pruned

    inputs = (args.model, args.plan)
    check_output_dir(args.out, args.overwrite, inputs)
    plan = load_plan(args.plan)
    model = apply_plan(args.model, plan, force=args.force)
    plan_dir = Path(args.plan) if Path(args.plan).is_dir() else Path(args.plan).parent
    report = json.loads((plan_dir / REPORT_FILE).read_text()) if (plan_dir / REPORT_FILE).is_file() else {}
    report["rebuilt_from"] = {"teacher": str(args.model), "plan": str(args.plan)}
    save_pruned(model, args.out, tokenizer=load_tokenizer(args.model), report=report, overwrite=args.overwrite,
                inputs=inputs, plan=plan, uniform=plan.uniform)
    print(f"pruned model rebuilt from {args.model} and the plan in {args.plan}, written to {args.out}")
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from prunekit.demo import demo, summary_rows

    report = demo(data=args.data, out_dir=args.out, keep_flops=args.keep_flops, num_tokens=args.num_tokens,
                  train_samples=args.train_samples or None, epochs=args.epochs, seed=args.seed,
                  cache_dir=args.cache_dir, device=_device(args))
    print()
    _print_table(summary_rows(report))
    print(f"\npruned model, prune_report.json and structure.png in {args.out}")
    return 0


# ---- deployment (ONNX export, ONNX Runtime bench and eval): issue 12 -------------------------------
def _add_deploy_options(sub: Any, bench: argparse.ArgumentParser) -> None:
    """The export command, and bench's --runtime. (eval's --onnx sits with its --model.)"""
    bench.add_argument("--runtime", choices=("torch", "onnxruntime"), default="torch",
                       help="eager PyTorch (default) or ONNX Runtime on the CPU; with onnxruntime, --model and "
                            "--baseline may be export folders or model folders (exported to a temporary folder)")
    x = sub.add_parser("export", help="export a (pruned) model to ONNX, checked in ONNX Runtime, optionally int8")
    x.add_argument("--model", required=True, help="model folder (pruned by prunekit, or not)")
    x.add_argument("--format", default="onnx", help="export format (onnx)")
    x.add_argument("--out", required=True, help="output folder (must be new or empty unless --overwrite)")
    x.add_argument("--overwrite", action="store_true", help="replace a folder prunekit wrote")
    x.add_argument("--quantize", default=None, help="int8: ONNX Runtime dynamic int8 quantization of the linear layers")
    x.add_argument("--exporter", default="dynamo", help="dynamo (torch's recommended exporter, default) or torchscript")
    x.add_argument("--opset", type=int, default=None, help="ONNX opset (default: the exporter's)")
    x.add_argument("--atol", type=float, default=1e-4, help="largest ONNX Runtime vs PyTorch difference allowed")
    x.add_argument("-v", "--verbose", action="store_true", help="debug logging")


def _cpu_only(args: argparse.Namespace) -> None:
    if args.device not in ("auto", "cpu"):
        raise PrunekitError(f"--device {args.device}: prunekit runs ONNX Runtime on the CPU only; use --device cpu")


def _bench_onnx(args: argparse.Namespace) -> dict[str, Any]:
    from prunekit.deploy.onnxrt import measure_onnx_latency

    _cpu_only(args)
    return measure_onnx_latency(args.model, baseline=args.baseline, batch_sizes=_int_list(args.batch_sizes),
                                seq_lens=_int_list(args.seq_lens), threads=args.threads, rounds=args.rounds,
                                seed=args.seed)


def _onnx_model(args: argparse.Namespace) -> tuple[Any, Any]:
    from prunekit.deploy.export import export_tokenizer
    from prunekit.deploy.onnxrt import OnnxModel

    _cpu_only(args)
    model = OnnxModel(args.onnx)
    return model, export_tokenizer(args.onnx)


def cmd_export(args: argparse.Namespace) -> int:
    from prunekit.deploy.export import export_onnx, read_export

    out = export_onnx(args.model, args.out, format=args.format, quantize=args.quantize, exporter=args.exporter,
                      opset=args.opset, atol=args.atol, overwrite=args.overwrite)
    record = read_export(out)
    _print_table([{"layer": i, "heads": shape["num_heads"], "neurons": shape["intermediate_size"],
                   "removed": ",".join(k.split("_")[0] for k in ("attention_removed", "ffn_removed") if shape.get(k))
                   or "-"} for i, shape in enumerate(record["layers"])])
    check = record["check"]
    note = f"; int8 max |diff| {record['int8']['max_abs_diff']:.3g}" if record.get("int8") else ""
    print(f"ONNX model written to {out} ({record['exporter']} exporter, opset {record['opset']}, "
          f"{'int8' if record['quantize'] else 'float32'}): ONNX Runtime matches PyTorch within "
          f"{check['max_abs_diff']:.2g} (atol {check['atol']:g}) on batches {check['batches']}{note}")
    return 0


COMMANDS = {"prune": cmd_prune, "eval": cmd_eval, "finetune": cmd_finetune, "bench": cmd_bench, "lut": cmd_lut,
            "compare": cmd_compare, "report": cmd_report, "demo": cmd_demo, "apply-plan": cmd_apply_plan,
            "export": cmd_export}


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    try:
        from prunekit.core.preflight import check_cli_sizes, check_device

        check_cli_sizes(args)  # zero or negative sizes are refused, never replaced by a default
        check_device(getattr(args, "device", None))
        return COMMANDS[args.command](args)
    except PrunekitError as err:
        print(f"prunekit {args.command}: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"prunekit {args.command}: interrupted; no output folder was written", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
