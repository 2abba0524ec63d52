"""The Python API a user calls; the CLI calls exactly these functions.

``prune`` takes a fine-tuned model, draws the calibration sample, runs a method from
``prunekit.methods`` and hands back a physically pruned model with its report. ``prune_many``
does the same for several budgets from one calibration; ``prune_and_save`` and
``prune_and_save_many`` are the CLI's ``prunekit prune`` workflow (prune, evaluate, benchmark,
save).
"""

from __future__ import annotations

import copy
import logging
import os
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import torch
from torch import nn

from . import preflight
from .accounting import count_flops, count_params, full_flops
from .adapters import get_adapter
from .bench import measure_latency
from .data import CalibrationSample, build_calibration_sample
from .errors import ConfigError
from .io import as_pruned_model, check_output_dir, load_model, load_tokenizer, save_pruned
from .lut import sublayer_costs
from .methods import get_method
from .reports import plot_structure
from .runtime import library_versions, peak_rss_bytes, resolve_device
from .search import current_widths, full_widths, total_cost
from .surgery import PruningPlan
from .tasks import TaskSpec, get_task

logger = logging.getLogger(__name__)


@dataclass
class PruneResult:
    """A pruned model with its tokenizer, plan and report; ``save(dir)`` writes the HF folder."""

    model: nn.Module
    tokenizer: Any
    plan: PruningPlan
    report: dict[str, Any] = field(default_factory=dict)

    def save(self, out_dir: str | Path, overwrite: bool = False, inputs: Sequence[str | Path | None] = ()) -> Path:
        """Write the model folder: config.json, model.safetensors, tokenizer files,
        prune_report.json (with the plan) and structure.png, atomically. ``inputs`` (the teacher's
        folder, the data) are paths the output may not touch."""
        report = dict(self.report)
        report["plan"] = self.plan.to_dict()
        adapter = get_adapter(self.model)

        def plot(folder: Path) -> None:
            plot_structure(
                report["layers"], adapter.full_num_heads, adapter.full_intermediate_size,
                folder / "structure.png",
                title=f"{report['method']} on {report['task']}: {report['flops_kept']:.1%} of FLOPs kept",
            )

        return save_pruned(self.model, out_dir, tokenizer=self.tokenizer, report=report, overwrite=overwrite,
                           extra=plot, inputs=inputs)


def loss_kind(task: TaskSpec) -> str:
    """Which distillation loss a task's head takes (prunekit.losses)."""
    if task.head == "question_answering":
        return "qa"
    return "regression" if task.is_regression else "classification"


Budget = tuple[str, float]  # ("flops" | "latency", fraction kept)


def budgets_from(keep_flops: float | Sequence[float] | None = None,
                 keep_latency: float | Sequence[float] | None = None,
                 keep_params: float | Sequence[float] | None = None) -> list[Budget]:
    """The budgets asked for, as ("flops" | "latency" | "params", fraction) pairs; keep 0.5 of the
    FLOPs when none is given. Each fraction must lie in (0, 1). ``keep_params`` (prunable encoder
    parameters kept) is CoFi's own budget."""
    given = {k: v for k, v in (("flops", keep_flops), ("latency", keep_latency), ("params", keep_params))
             if v is not None}
    if len(given) > 1:
        first, second = (f"keep_{k}" for k in list(given)[:2])
        raise ConfigError(f"give either {first} or {second}, not both: a pruning has one budget")
    kind, values = next(iter(given.items())) if given else ("flops", 0.5)
    values = [values] if isinstance(values, int | float) else list(values)
    if not values:
        raise ConfigError(f"no keep_{kind} budget given; pass at least one fraction, e.g. 0.5")
    for value in values:
        if not 0.0 < value < 1.0:
            what = {"flops": "FLOPs", "latency": "latency", "params": "prunable parameters"}[kind]
            raise ConfigError(f"keep_{kind} must be in (0, 1), the fraction of {what} kept; got {value}")
    preflight.check_distinct_budgets(kind, values)
    return [(kind, float(value)) for value in values]


def budget_name(budget: Budget) -> str:
    """A folder name for one budget, e.g. ``keep-flops-0.7``."""
    return f"keep-{budget[0]}-{budget[1]:g}"


def _configs(spec: Any, budgets: list[Budget], seed: int, options: dict[str, Any]) -> list[Any]:
    """One method config per budget (all built before any work, so bad options fail early)."""
    known = {f.name for f in fields(spec.config_class)}
    options = dict(options)
    if "seed" in known:
        options.setdefault("seed", seed)  # e.g. the random baseline draws from the run's seed
    configs = []
    for kind, value in budgets:
        if kind == "latency":
            if "keep_latency" not in known:
                raise ConfigError(f"method {spec.name!r} does not take a latency budget; use keep_flops")
            configs.append(spec.make_config(keep_flops=1.0, keep_latency=value, **options))
        else:
            configs.append(spec.make_config(keep_flops=value, **options))
    return configs


def _teacher(model: nn.Module | str | Path, tokenizer: Any, task: TaskSpec) -> tuple[nn.Module, Any]:
    """The teacher as a model the caller's object is safe from (a folder is loaded, a model copied)."""
    if isinstance(model, str | Path):
        teacher = load_model(model, head=task.head)
        tokenizer = tokenizer or load_tokenizer(model)
    else:
        preflight.check_not_meta(model)
        teacher = copy.deepcopy(model)
    if isinstance(tokenizer, str | Path):
        tokenizer = load_tokenizer(tokenizer)  # given explicitly (--tokenizer)
    get_adapter(teacher)  # unsupported architectures fail here, before any work
    preflight.check_head_fits_task(teacher.config, task)
    return teacher, tokenizer


def _size(model: nn.Module, seq_len: float, full: bool = False) -> dict[str, float]:
    """FLOPs (of the unpruned architecture with ``full``) and parameter counts for a report."""
    flops = full_flops(model, seq_len) if full else count_flops(model, seq_len)
    return {"flops": flops, "params": count_params(model), "encoder_params": count_params(model, encoder_only=True)}


def _with_task_seq_len(spec: Any, task: TaskSpec, options: dict[str, Any]) -> dict[str, Any]:
    """The method options with the task's FLOPs length as ``seq_len`` when none is given: SQuAD
    counts FLOPs at 170 tokens as both reference papers do (spec §2, P13); GLUE tasks have none and
    keep the calibration sample's mean length."""
    known = {f.name for f in fields(spec.config_class)}
    if task.flops_seq_len is None or "seq_len" not in known or options.get("seq_len") is not None:
        return options
    return {**options, "seq_len": task.flops_seq_len}


def prune(
    model: nn.Module | str | Path,
    tokenizer: Any = None,
    data: str | Path | CalibrationSample | None = None,
    task: str | TaskSpec = "sst2",
    method: str = "kprune",
    keep_flops: float | None = None,
    keep_latency: float | None = None,
    num_tokens: int | None = None,
    num_sequences: int | None = None,
    seed: int = 0,
    device: str | torch.device | None = None,
    batch_size: int | None = None,
    sort_by_length: bool = True,
    **method_options: Any,
) -> PruneResult:
    """Prune a fine-tuned model to keep ``keep_flops`` of its encoder FLOPs (or ``keep_latency``
    of its latency, with a latency table passed as ``lut=``).

    Args:
        model: a model or a model folder (loaded with the task's head). A given model is copied,
            never changed.
        tokenizer: its tokenizer, or a tokenizer folder (default: loaded from the model folder).
        data: the task's data source (GLUE folder, CSV/JSONL, hub name; SQuAD JSON file or folder,
            or a list of SQuAD examples) or a ready ``CalibrationSample``.
        keep_flops: fraction of the encoder FLOPs kept, in (0, 1); 0.5 when no budget is given.
        keep_latency: fraction of the latency kept, in (0, 1), instead of keep_flops; needs
            ``lut=`` (a table from ``prunekit lut``).
        num_tokens, num_sequences: calibration sample size in tokens (spec §1.2) or sequences;
            default the method's own (Kprune 100,000 tokens, Kwon et al. 2,048 sequences).
        method_options: the method's hyperparameters (e.g. ``temperature``, ``lam_rep``, ``seq_len``).
    Returns:
        A ``PruneResult`` with ``.model``, ``.report`` and ``.save(dir)``.
    """
    budgets = budgets_from(keep_flops, keep_latency)
    if len(budgets) != 1:
        raise ConfigError("prune takes one budget; use prune_many for several")
    return prune_many(model, tokenizer, data, task=task, method=method, keep_flops=keep_flops,
                      keep_latency=keep_latency, num_tokens=num_tokens, num_sequences=num_sequences, seed=seed,
                      device=device, batch_size=batch_size, sort_by_length=sort_by_length, **method_options)[0]


def prune_many(
    model: nn.Module | str | Path,
    tokenizer: Any = None,
    data: str | Path | CalibrationSample | None = None,
    task: str | TaskSpec = "sst2",
    method: str = "kprune",
    keep_flops: float | Sequence[float] | None = None,
    keep_latency: float | Sequence[float] | None = None,
    num_tokens: int | None = None,
    num_sequences: int | None = None,
    seed: int = 0,
    device: str | torch.device | None = None,
    batch_size: int | None = None,
    sort_by_length: bool = True,
    **method_options: Any,
) -> list[PruneResult]:
    """One calibration, many budgets: like :func:`prune` for each budget in ``keep_flops`` (or
    ``keep_latency``), in order, reusing what does not depend on the budget. The sample is drawn
    once, the method's ``prepare`` step (Kwon et al.'s Fisher gradients) runs once on the teacher,
    and each budget prunes a fresh copy of the teacher.

    Each report's ``prune_seconds`` is what that budget alone costs (the shared step included);
    ``prepare_seconds`` and ``run_seconds`` split it.
    """
    spec = get_method(method)
    task = get_task(task)
    preflight.check_positive("batch_size", batch_size)
    preflight.check_positive("seed", seed, minimum=0)
    if spec.training:
        if batch_size is not None:  # the training batch size; never dropped silently
            method_options = {**method_options, "batch_size": batch_size}
        return _prune_by_training(spec, model, tokenizer, data, task, keep_flops, keep_latency, seed, device,
                                  method_options)
    budgets = budgets_from(keep_flops, keep_latency)
    preflight.check_sample_size(num_tokens, num_sequences)
    preflight.check_lut_used(budgets[0][0], method_options)
    configs = _configs(spec, budgets, seed, _with_task_seq_len(spec, task, method_options))
    device = resolve_device(device)
    teacher, tokenizer = _teacher(model, tokenizer, task)
    preflight.check_seq_len(teacher.config, method_options.get("seq_len"), "seq_len")
    if data is None:
        raise ConfigError("no data given: pass the task's data folder, file or hub name")
    if isinstance(data, CalibrationSample):
        sample = data
    else:
        if tokenizer is None:
            raise ConfigError("a tokenizer is needed to build the calibration sample from data")
        size = {"num_tokens": num_tokens, "num_sequences": num_sequences}
        if num_tokens is None and num_sequences is None:
            size |= spec.sample_size
        sample = build_calibration_sample(
            task, tokenizer, data, num_tokens=size["num_tokens"] or 100_000, num_sequences=size["num_sequences"],
            seed=seed, batch_size=batch_size or task.batch_size, sort_by_length=sort_by_length,
        )
    sample = sample.to(device)
    teacher.to(device).eval()
    kind = loss_kind(task)

    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    prepared, prepare_seconds = None, 0.0
    # Shared work pays only across budgets; with one budget the method calibrates itself and can
    # free what it no longer needs as it goes (Kprune's layer-0 tensors).
    if spec.prepare is not None and len(budgets) > 1:
        torch.manual_seed(seed)
        start = time.perf_counter()
        prepared = spec.prepare(teacher, sample, kind, configs[0])
        prepare_seconds = time.perf_counter() - start
    results = []
    for (budget_kind, keep), config in zip(budgets, configs, strict=True):
        model = copy.deepcopy(teacher)
        torch.manual_seed(seed)
        seq_len = getattr(config, "seq_len", None) or sample.mean_length
        before = _size(model, seq_len, full=True)
        logger.info("pruning with %s to keep %.3f of %s on %s", method, keep, budget_kind, device)
        start = time.perf_counter()
        if prepared is None:
            plan, log = spec.run(model, sample, kind, config)
        else:
            plan, log = spec.run(model, sample, kind, config, prepared=prepared)
        run_seconds = time.perf_counter() - start
        as_pruned_model(model)
        after = _size(model, seq_len)
        adapter = get_adapter(model)
        report = {
            "method": method,
            "task": task.name,
            "budget": {"kind": budget_kind, "keep": keep},
            "keep_flops": keep if budget_kind == "flops" else None,
            "keep_latency": keep if budget_kind == "latency" else None,
            "seed": seed,
            "hyperparameters": asdict(config),
            "flops_seq_len": seq_len,
            "sample": sample.summary(),
            "before": before,
            "after": after,
            "flops_kept": after["flops"] / before["flops"],
            "params_kept": after["params"] / before["params"],
            "layers": [shape.to_dict() for shape in adapter.layer_shapes()],
            "prune_seconds": prepare_seconds + run_seconds,
            "prepare_seconds": prepare_seconds,
            "run_seconds": run_seconds,
            "peak_rss_bytes": peak_rss_bytes(),
            "peak_cuda_bytes": torch.cuda.max_memory_allocated() if torch.cuda.is_available() else None,
            "device": str(device),
            "versions": library_versions(),
            "method_log": log,
        }
        if warning := preflight.warn_if_all_pruned(model, f"keep_{budget_kind} {keep:g}"):
            report["warnings"] = [warning]
        if budget_kind == "latency":
            costs = sublayer_costs(adapter, seq_len, config.lut)
            full = total_cost(costs, full_widths(adapter))
            report["latency_kept_estimated"] = total_cost(costs, current_widths(adapter)) / full if full > 0 else None
        logger.info("pruned in %.1f s: FLOPs kept %.4f, params kept %.4f", report["prune_seconds"],
                    report["flops_kept"], report["params_kept"])
        results.append(PruneResult(model=model, tokenizer=tokenizer, plan=plan, report=report))
    return results


def _prune_by_training(spec, model, tokenizer, data, task, keep_flops, keep_latency, seed, device,
                       method_options: dict[str, Any]) -> list[PruneResult]:
    """CoFi's path: train on the task's train split (scored on its dev split) once per budget.

    Budgets are ``keep_params`` (CoFi's own: 1 - sparsity) or ``keep_flops``; a method option
    ``student_init`` (a model folder or model) replaces the copy of the teacher as the student,
    ``checkpoint_dir`` and ``resume`` checkpoint and continue a run.
    """
    from .methods.cofi import build_task_data

    options = dict(method_options)
    student_init = options.pop("student_init", None)
    checkpoint_dir = options.pop("checkpoint_dir", None)
    resume = bool(options.pop("resume", False))
    budgets = budgets_from(keep_flops, keep_latency, options.pop("keep_params", None))
    if budgets[0][0] == "latency":
        raise ConfigError(f"method {spec.name!r} takes keep_params or keep_flops, not a latency budget")
    preflight.check_lut_used(budgets[0][0], options)
    if data is None or isinstance(data, CalibrationSample):
        raise ConfigError(f"method {spec.name!r} trains: pass the task's data (train and dev splits), "
                          "not a calibration sample")
    if checkpoint_dir is not None and len(budgets) > 1:
        raise ConfigError("checkpoint_dir holds one run: prune one budget at a time when checkpointing")
    device = resolve_device(device)
    teacher, tokenizer = _teacher(model, tokenizer, task)
    if tokenizer is None:
        raise ConfigError("a tokenizer is needed to tokenize the training data")
    preflight.check_seq_len(teacher.config, options.get("max_length"), "max_length")
    preflight.check_seq_len(teacher.config, options.get("seq_len"), "seq_len")
    if isinstance(student_init, str | Path):
        student_init = load_model(student_init, head=task.head)
    configs = [spec.make_config(**{f"keep_{kind}": keep}, seed=seed, **options) for kind, keep in budgets]
    data_cache = None
    results = []
    for (kind, keep), config in zip(budgets, configs, strict=True):
        if data_cache is None:
            data_cache = build_task_data(task, tokenizer, data, config, device=device)
        seq_len = config.seq_len or task.flops_seq_len or task.avg_seq_len
        student = copy.deepcopy(student_init if student_init is not None else teacher)
        before = _size(teacher, seq_len, full=True)
        logger.info("pruning with %s to keep %.3f of %s on %s", spec.name, keep, kind, device)
        start = time.perf_counter()
        pruned, plan, log = spec.run(teacher, student, data_cache, config, seq_len, device=device,
                                     checkpoint_dir=checkpoint_dir, resume=resume)
        seconds = time.perf_counter() - start
        as_pruned_model(pruned)
        after = _size(pruned, seq_len)
        adapter = get_adapter(pruned)
        report = {
            "method": spec.name, "task": task.name, "budget": {"kind": kind, "keep": keep},
            "keep_flops": keep if kind == "flops" else None, "keep_params": keep if kind == "params" else None,
            "keep_latency": None, "seed": seed, "hyperparameters": asdict(config), "flops_seq_len": seq_len,
            "before": before, "after": after,
            "flops_kept": after["flops"] / before["flops"], "params_kept": after["params"] / before["params"],
            "prunable_params_kept": 1.0 - log["achieved_param_sparsity"],
            "target_sparsity": config.target_sparsity, "achieved_sparsity": (
                log["achieved_param_sparsity"] if kind == "params" else 1.0 - log["achieved_flops_kept"]),
            "hidden_size": adapter.hidden_size,
            "layers": [shape.to_dict() for shape in adapter.layer_shapes()],
            "prune_seconds": seconds, "peak_rss_bytes": peak_rss_bytes(),
            "peak_cuda_bytes": torch.cuda.max_memory_allocated() if torch.cuda.is_available() else None,
            "device": str(device), "versions": library_versions(), "method_log": log,
        }  # fmt: skip
        # The budget asked for and what the saved model keeps (CoFi projects onto it, cofi_target).
        report["target_keep"] = keep
        report["achieved_keep"] = report["prunable_params_kept"] if kind == "params" else log["achieved_flops_kept"]
        if warning := preflight.warn_if_all_pruned(pruned, f"keep_{kind} {keep:g}"):
            report["warnings"] = [warning]
        logger.info("pruned in %.1f s: FLOPs kept %.4f, prunable params kept %.4f", seconds, report["flops_kept"],
                    report["prunable_params_kept"])
        pruned.to("cpu" if device.type == "cpu" else device)
        results.append(PruneResult(model=pruned, tokenizer=tokenizer, plan=plan, report=report))
    return results


def prune_and_save(
    model_dir: str | Path,
    out_dir: str | Path,
    data: str | Path,
    task: str | TaskSpec = "sst2",
    method: str = "kprune",
    keep_flops: float | None = None,
    keep_latency: float | None = None,
    num_tokens: int | None = None,
    num_sequences: int | None = None,
    seed: int = 0,
    device: str | torch.device | None = None,
    overwrite: bool = False,
    run_eval: bool = True,
    run_bench: bool = True,
    bench_batch_size: int = 32,
    bench_seq_len: int = 128,
    **method_options: Any,
) -> dict[str, Any]:
    """The whole job: load the teacher, prune, evaluate both on the dev split, measure latency
    of both, and write the pruned folder with its report. Returns the report.

    The output folder is checked before any work and written atomically at the end.
    """
    budgets = budgets_from(keep_flops, keep_latency, method_options.get("keep_params"))
    if len(budgets) != 1:
        raise ConfigError("prune_and_save takes one budget; use prune_and_save_many for several")
    return _prune_and_save(model_dir, [out_dir], data, budgets, task, method, num_tokens, num_sequences, seed,
                           device, overwrite, run_eval, run_bench, bench_batch_size, bench_seq_len, method_options)[0]


def prune_and_save_many(
    model_dir: str | Path,
    out_dir: str | Path,
    data: str | Path,
    task: str | TaskSpec = "sst2",
    method: str = "kprune",
    keep_flops: Sequence[float] | None = None,
    keep_latency: Sequence[float] | None = None,
    num_tokens: int | None = None,
    num_sequences: int | None = None,
    seed: int = 0,
    device: str | torch.device | None = None,
    overwrite: bool = False,
    run_eval: bool = True,
    run_bench: bool = True,
    bench_batch_size: int = 32,
    bench_seq_len: int = 128,
    **method_options: Any,
) -> list[dict[str, Any]]:
    """:func:`prune_and_save` for several budgets from one calibration (:func:`prune_many`): one
    folder per budget inside ``out_dir``, named like ``keep-flops-0.7``. Returns the reports."""
    budgets = budgets_from(keep_flops, keep_latency, method_options.get("keep_params"))
    out_dirs = [Path(out_dir) / budget_name(budget) for budget in budgets]
    return _prune_and_save(model_dir, out_dirs, data, budgets, task, method, num_tokens, num_sequences, seed,
                           device, overwrite, run_eval, run_bench, bench_batch_size, bench_seq_len, method_options)


def _prune_and_save(model_dir, out_dirs, data, budgets, task, method, num_tokens, num_sequences, seed, device,
                    overwrite, run_eval, run_bench, bench_batch_size, bench_seq_len, method_options):
    tokenizer = method_options.pop("tokenizer", None)  # a tokenizer folder, when the model's has none
    inputs = (model_dir, data if isinstance(data, str | Path) else None, tokenizer)
    for out in out_dirs:
        check_output_dir(out, overwrite, inputs)
    task = get_task(task)
    preflight.check_device(device)
    teacher = load_model(model_dir, head=task.head)
    tokenizer = load_tokenizer(tokenizer or model_dir)
    preflight.check_head_fits_task(teacher.config, task)
    if run_eval:
        preflight.check_split(task, data, "dev")  # before pruning, not after it
    if run_bench:
        preflight.check_positive("bench_batch_size", bench_batch_size)
        preflight.check_seq_len(teacher.config, bench_seq_len, "bench_seq_len")
    method_options = {k: v for k, v in method_options.items() if k != "keep_params"}  # it is in `budgets`
    budget_options = {f"keep_{budgets[0][0]}": [keep for _, keep in budgets]}  # keep_flops, _latency or _params
    results = prune_many(teacher, tokenizer, data, task=task, method=method, num_tokens=num_tokens,
                         num_sequences=num_sequences, seed=seed, device=device, **budget_options, **method_options)
    if int(os.environ.get("RANK", "0")) != 0:
        # Under `accelerate launch` every process trains; only the first evaluates and writes.
        return [result.report for result in results]
    teacher_eval = None
    reports = []
    for result, out in zip(results, out_dirs, strict=True):
        if run_eval:
            from .evaluate import evaluate  # entry-level helper; keeps `import prunekit` light

            if teacher_eval is None:
                teacher_eval = evaluate(teacher, tokenizer, task, data, device=device)
            result.report["eval"] = {
                "teacher": teacher_eval,
                "pruned": evaluate(result.model, tokenizer, task, data, device=device),
            }
        if run_bench:
            latency = measure_latency(result.model, baseline=teacher, batch_sizes=[bench_batch_size],
                                      seq_lens=[bench_seq_len], device=device)
            result.report["latency"] = latency
        result.report.setdefault("teacher", str(model_dir))
        result.save(out, overwrite=overwrite, inputs=inputs)
        reports.append(result.report)
        result.model = None  # free the pruned model before the next budget's evaluation
    return reports
