"""``prunekit compare``: several pruning methods against one teacher, at several budgets.

Every method gets the same teacher, the same calibration sample (drawn once) and the same seed.
Each method calibrates once for all budgets (``api.prune_many``: Kwon et al.'s Fisher gradients are
reused); every pruned model is evaluated on the dev split and timed against the teacher, round by
round alternately. The output folder gets

- ``compare.json``: the setting (sample, seed, FLOPs sequence length, benchmark shape) and one row
  per method and budget: metrics, FLOPs and parameters kept, latency, speedup, pruning time, and
  the kept heads and neurons per layer;
- ``compare.md``: the same as a table, the teacher first;
- ``compare.png``: the main metric against FLOPs kept and against measured speedup, one line per
  method, the teacher as a horizontal line;
- with ``save_models``, every pruned model in ``models/<method>-keep-flops-<F>``.

The folder is checked before any work and written atomically at the end.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, fields, replace
from pathlib import Path
from typing import Any

import torch

from prunekit.api import PruneOptions, budget_name, evaluate_and_time, load_teacher, prune_many
from prunekit.core import preflight
from prunekit.core.accounting import count_flops, count_non_embedding_params, count_params, full_flops
from prunekit.core.errors import ConfigError
from prunekit.core.runtime import library_versions, resolve_device
from prunekit.core.view import ModelAdapter
from prunekit.io.folders import atomic_output_dir, check_output_dir
from prunekit.io.reports import markdown_table, plot_compare
from prunekit.methods import get_method
from prunekit.tasks import build_calibration_sample
from prunekit.tasks.registry import family_of
from prunekit.tasks.spec import TaskSpec, get_task

logger = logging.getLogger(__name__)

DEFAULT_METHODS = ("kprune", "kwon", "magnitude")
DEFAULT_BUDGETS = (0.7, 0.5, 0.4, 0.3)


@dataclass
class CompareOptions:
    """What ``compare`` takes besides the teacher, task, data and output folder.

    Attributes:
        methods: method names (``prunekit.methods.METHODS``).
        keep_flops: fractions of the encoder FLOPs kept.
        keep_params: fractions of the non-embedding parameters kept instead (replaces keep_flops).
        calibration_length, eval_window, bench_new_tokens: causal LM only: the calibration
            window L, the perplexity window (default min(2048, max positions)) and the decode
            benchmark's new tokens (prefill and decode are timed instead of a forward pass).
        num_tokens, num_sequences: size of the one calibration sample all methods share
            (default 100,000 tokens, Kprune's default, spec §1.2).
        seq_len: FLOPs sequence length for every method (default: the sample's mean length).
        metric: the metric plotted (default: the task's main metric).
        run_bench: time every pruned model against the teacher at (bench_batch_size, bench_seq_len).
        max_eval_examples: evaluate on the first N dev examples only (quick checks).
        save_models: also save every pruned model under ``models/``.
        method_options: per-method options, e.g. ``{"kwon": {"damp": 1.0}}``.
        tokenizer: a tokenizer folder, when the model folder has none.
    """

    methods: Sequence[str] = DEFAULT_METHODS
    keep_flops: Sequence[float] = DEFAULT_BUDGETS
    num_tokens: int | None = None
    num_sequences: int | None = None
    seed: int = 0
    device: str | torch.device | None = None
    seq_len: float | None = None
    metric: str | None = None
    run_bench: bool = True
    bench_batch_size: int = 32
    bench_seq_len: int = 128
    bench_rounds: int = 3
    max_eval_examples: int | None = None
    save_models: bool = False
    overwrite: bool = False
    method_options: Mapping[str, Mapping[str, Any]] | None = None
    # A budget of non-embedding parameters instead of FLOPs (the LLM convention); causal LM:
    # calibration window length, perplexity window and decode tokens (see PruneOptions).
    keep_params: Sequence[float] | None = None
    calibration_length: int | None = None
    eval_window: int | None = None
    bench_new_tokens: int = 32
    tokenizer: str | Path | None = None


def compare(model_dir: str | Path, task: str, data: str | Path, out_dir: str | Path,
            options: CompareOptions | None = None, **kwargs: Any) -> dict[str, Any]:
    """Prune ``model_dir`` with each method at each budget and compare the results.

    ``options`` is a :class:`CompareOptions`, or give its fields as keyword arguments (which win).
    Returns the content of compare.json. Loading, checks, pruning, evaluation, timing and saving
    are the pipeline's own (``prunekit.api``); this adds the one shared sample, the loop over
    methods and the table.
    """
    unknown = sorted(set(kwargs) - {f.name for f in fields(CompareOptions)})
    if unknown:
        raise ConfigError(f"compare has no option(s) {', '.join(unknown)}; per-method options go in method_options")
    o = replace(options or CompareOptions(), **kwargs)
    inputs = (model_dir, data if isinstance(data, str | Path) else None, o.tokenizer)
    out_dir = check_output_dir(out_dir, o.overwrite, inputs)
    preflight.check_distinct_budgets("flops", list(o.keep_flops))
    if o.keep_params is not None:
        preflight.check_distinct_budgets("params", list(o.keep_params))
    preflight.check_sample_size(o.num_tokens, o.num_sequences)
    task_spec = get_task(task)
    metric = o.metric or task_spec.main_metric
    if metric not in task_spec.metrics:
        raise ConfigError(f"task {task_spec.name!r} has no metric {metric!r}; choose one of {task_spec.metrics}")
    method_options = {name: dict(values) for name, values in (o.method_options or {}).items()}
    unknown = sorted(set(method_options) - set(o.methods))
    if unknown:
        raise ConfigError(f"options given for method(s) not compared: {', '.join(unknown)}")
    if not o.methods:
        raise ConfigError("no methods given: pass at least one, e.g. --methods kprune,kwon")
    twice = sorted({name for name in o.methods if list(o.methods).count(name) > 1})
    if twice:
        raise ConfigError(f"methods lists {', '.join(twice)} more than once; give each method once")
    specs = [get_method(name) for name in o.methods]
    training = [spec.name for spec in specs if spec.training]
    if training:
        raise ConfigError(f"compare runs retraining-free methods on one shared calibration sample; "
                          f"{', '.join(training)} trains on the task's data: prune with it on its own "
                          f"(prunekit prune --method {training[0]})")
    for spec in specs:  # the options of every method, checked before any work
        spec.make_config(**method_options.get(spec.name, {}))
    budget_kind = "params" if o.keep_params is not None else "flops"
    budgets = sorted({float(keep) for keep in (o.keep_params if o.keep_params is not None else o.keep_flops)},
                     reverse=True)
    if not budgets:
        raise ConfigError(f"no budgets given: pass keep_{budget_kind}, e.g. 0.7,0.5")
    lm = family_of(task_spec).generates  # timed on decoding too, and benchmarked one sequence at a time
    run = PruneOptions(
        task=task_spec, seed=o.seed, device=resolve_device(o.device), run_eval=True, run_bench=o.run_bench,
        bench_batch_size=1 if lm else o.bench_batch_size, bench_seq_len=o.bench_seq_len, bench_rounds=o.bench_rounds,
        bench_new_tokens=o.bench_new_tokens, max_eval_examples=o.max_eval_examples, eval_window=o.eval_window,
        calibration_length=o.calibration_length, **{f"keep_{budget_kind}": budgets})
    teacher, tokenizer, task_spec = load_teacher(model_dir, o.tokenizer, data, run)
    sample = _shared_sample(teacher, tokenizer, data, task_spec, o)
    # The task's FLOPs length (SQuAD: 170, as both papers) unless given; else the sample's mean.
    seq_len = o.seq_len or task_spec.flops_seq_len
    flops_seq_len = seq_len or sample.mean_length
    result = _setting(model_dir, data, task_spec, metric, budget_kind, budgets, sample, flops_seq_len, teacher, run,
                      o, method_options, lm)
    teacher_eval = None
    with atomic_output_dir(out_dir, o.overwrite, inputs) as folder:
        for spec in specs:
            options = dict(method_options.get(spec.name, {}))
            if seq_len is not None:
                options.setdefault("seq_len", seq_len)
            logger.info("compare: %s at keep %s", spec.name, ", ".join(f"{b:g}" for b in budgets))
            results = prune_many(teacher, tokenizer, sample, replace(run, method=spec.name, method_options=options))
            for keep, pruned in zip(budgets, results, strict=True):
                teacher_eval = evaluate_and_time(pruned, teacher.model, tokenizer, data, run, teacher_eval)
                row = _row(spec.name, keep, pruned, teacher, flops_seq_len, budget_kind, lm)
                if o.save_models:
                    pruned.save(folder / "models" / f"{spec.name}-{budget_name((budget_kind, keep))}")
                result["rows"].append(row)
                logger.info("compare: %s keep %s %g: %s %.2f (teacher %.2f), FLOPs kept %.3f%s", spec.name,
                            budget_kind, keep, metric, row["metrics"][metric], teacher_eval[metric],
                            row["flops_kept"], f", speedup {row['speedup']:.2f}" if "speedup" in row else "")
            del results
        result["teacher"]["metrics"] = teacher_eval
        (folder / "compare.json").write_text(preflight.json_text(result) + "\n")
        (folder / "compare.md").write_text(compare_markdown(result))
        plot_compare([result], folder / "compare.png")
    return result


def _shared_sample(teacher: ModelAdapter, tokenizer: Any, data: Any, task: TaskSpec, o: CompareOptions) -> Any:
    """One calibration sample for every method: the given size, else 100,000 tokens (a causal LM:
    its windows)."""
    size = family_of(task).sample_size(task, teacher.model, o.num_tokens, o.num_sequences,
                                       calibration_length=o.calibration_length)
    return build_calibration_sample(task, tokenizer, data, **size, seed=o.seed, batch_size=task.batch_size)


def _setting(model_dir: str | Path, data: Any, task: TaskSpec, metric: str, budget_kind: str, budgets: list[float],
             sample: Any, flops_seq_len: float, teacher: ModelAdapter, run: PruneOptions, o: CompareOptions,
             method_options: dict[str, dict[str, Any]], lm: bool) -> dict[str, Any]:
    """compare.json without its rows (and the teacher's metrics, filled in once scored)."""
    return {
        "task": task.name,
        "model": str(model_dir),
        "data": str(data),
        "metric": metric,
        "higher_is_better": task.higher_is_better,
        "methods": list(o.methods),
        "budget_kind": budget_kind,
        "budgets": budgets,
        "seed": o.seed,
        "sample": sample.summary(),
        "flops_seq_len": flops_seq_len,
        "teacher": {"metrics": None, "flops": full_flops(teacher, flops_seq_len), "params": count_params(teacher),
                    "non_embedding_params": count_non_embedding_params(teacher)},
        "bench": ({"device": str(run.device), "batch_size": run.bench_batch_size, "seq_len": o.bench_seq_len,
                   "rounds": o.bench_rounds, "threads": torch.get_num_threads(),
                   **({"mode": "prefill latency and greedy decode with KV cache",
                       "new_tokens": o.bench_new_tokens} if lm else {})} if o.run_bench else None),
        "method_options": method_options,
        "versions": library_versions(),
        "rows": [],
    }


def _row(method: str, keep: float, pruned: Any, teacher: ModelAdapter, seq_len: float, budget_kind: str,
         lm: bool) -> dict[str, Any]:
    """One row of compare.json, from the pruned model's report (its metrics and timings included)."""
    report = pruned.report
    layers = report["layers"]
    row = {
        "method": method,
        "keep_flops": keep if budget_kind == "flops" else None,
        "keep_params": keep if budget_kind == "params" else None,
        "flops_kept": count_flops(pruned.view, seq_len) / full_flops(teacher, seq_len),
        "params_kept": report["params_kept"],
        "non_embedding_params_kept": report.get("non_embedding_params_kept"),
        **({"kv_heads": [layer.get("num_kv_heads", 0) for layer in layers]}
           if any("num_kv_heads" in layer for layer in layers) else {}),
        "prune_seconds": report["prune_seconds"],
        "prepare_seconds": report["prepare_seconds"],
        "run_seconds": report["run_seconds"],
        "heads": [layer["num_heads"] for layer in report["layers"]],
        "neurons": [layer["intermediate_size"] for layer in report["layers"]],
        "metrics": report["eval"]["pruned"],
    }
    if "generation" in report and lm:
        timing = report["generation"]["results"][0]
        row |= {"latency_ms": timing["prefill_ms"], "teacher_latency_ms": timing["baseline_prefill_ms"],
                "speedup": timing["prefill_speedup"], "decode_tokens_per_s": timing["decode_tokens_per_s"],
                "teacher_decode_tokens_per_s": timing["baseline_decode_tokens_per_s"],
                "decode_speedup": timing["decode_speedup"]}
    elif "latency" in report:
        timing = report["latency"]["results"][0]
        row |= {"latency_ms": timing["latency_ms"], "teacher_latency_ms": timing["baseline_ms"],
                "speedup": timing["speedup"]}
    return row


def compare_markdown(result: Mapping[str, Any]) -> str:
    """compare.md: the setting in a few lines, then one table row per model (the teacher first)."""
    metric = result["metric"]
    teacher = result["teacher"]["metrics"]
    lm = "window" in teacher  # a perplexity result (lower is better), with its window
    higher = result.get("higher_is_better", True)
    kind = result.get("budget_kind", "flops")
    # Other scores only: a perplexity result also carries its nll, token counts, window and split.
    others = [m for m in teacher if m not in (metric, "num_examples", "nll", "num_tokens", "num_scored", "window",
                                              "stride", "split")]
    rows = [{"method": "teacher", "keep": 1.0, "flops": 1.0, "params": 1.0, "metric": teacher[metric],
             "delta": 0.0, "relative": 0.0, **{m: teacher[m] for m in others}}]
    for r in result["rows"]:
        value = r["metrics"][metric]
        rows.append({
            "method": r["method"], "keep": r.get(f"keep_{kind}"), "flops": r["flops_kept"],
            "params": r.get("non_embedding_params_kept") if kind == "params" else r["params_kept"],
            "metric": value, "delta": value - teacher[metric], "relative": value / teacher[metric] - 1,
            **{m: r["metrics"].get(m) for m in others},
            "latency": r.get("latency_ms"), "speedup": r.get("speedup"), "decode": r.get("decode_speedup"),
            "seconds": r["prune_seconds"],
            "heads": ", ".join(map(str, r["heads"])), "neurons": ", ".join(map(str, r["neurons"])),
            "kv_heads": ", ".join(map(str, r.get("kv_heads", []))),
        })
    split = teacher.get("split", "dev")
    columns = [("method", "method"), ("keep", "keep FLOPs" if kind == "flops" else "keep params"),
               ("flops", "FLOPs kept"), ("params", "non-emb. params kept" if kind == "params" else "params kept"),
               ("metric", f"{split} {metric} ({'higher' if higher else 'lower'} is better)"),
               ("delta", "Δ vs teacher"), *([("relative", "relative Δ")] if lm else []), *[(m, m) for m in others],
               ("latency", "prefill ms" if lm else "latency ms"), ("speedup", "speedup"),
               *([("decode", "decode speedup")] if lm else []), ("seconds", "prune s"),
               ("heads", "query heads per layer" if lm else "heads per layer"),
               *([("kv_heads", "kv heads per layer")] if any(r.get("kv_heads") for r in result["rows"]) else []),
               ("neurons", "neurons per layer")]
    sample = result["sample"]
    bench = result.get("bench")
    lines = [
        f"# Pruning methods compared on {result['task']}", "",
        f"Teacher `{result['model']}`; one calibration sample for every method ({sample['num_sequences']} sequences, "
        f"{sample['num_tokens']} tokens, seed {result['seed']}); FLOPs at sequence length "
        f"{result['flops_seq_len']:.2f}."
        + (f" Perplexity of the {teacher.get('split', 'test')} text in non-overlapping windows of "
           f"{teacher['window']} tokens (stride {teacher['stride']}), {teacher['num_scored']} tokens scored." if lm else ""),
        (f"Prefill latency of a {bench['seq_len']}-token prompt and greedy decode of {bench.get('new_tokens')} tokens "
         f"with the KV cache on {bench['device']} ({bench['threads']} threads), batch 1, median of {bench['rounds']} "
         "repeats alternating with the teacher; prune s includes each method's shared calibration step."
         if bench and bench.get("mode") else
         f"Latency on {bench['device']} ({bench['threads']} threads), batch {bench['batch_size']}, sequence length "
         f"{bench['seq_len']}, median of {bench['rounds']} rounds alternating with the teacher; prune s includes "
         "each method's shared calibration step." if bench else "Latency not measured."),
        "",
        markdown_table(rows, columns),
        "",
    ]
    return "\n".join(lines)
