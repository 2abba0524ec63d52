"""The Python API a user calls; the CLI calls exactly these functions.

One pipeline for every method, calibration-based or training-based:

    load -> data -> method -> plan -> surgery -> report -> save

``prune`` takes a fine-tuned model, builds the method's task data (a calibration sample, or
training features and a dev scorer), runs a method from ``prunekit.methods`` (which returns a
plan and leaves the teacher unchanged), applies the plan to a copy of the teacher
(``prunekit.core.surgery.apply_plan``, the one surgery path) and hands back the pruned model with its
report. ``prune_many`` does the same for several budgets from one calibration; ``prune_and_save``
and ``prune_and_save_many`` are the CLI's ``prunekit prune`` workflow (prune, evaluate, benchmark,
save). All four take one :class:`PruneOptions` (or its fields as keyword arguments; any other
keyword is a method option). ``apply_plan`` rebuilds a saved pruned model from its teacher.
"""

from __future__ import annotations

import copy
import gc
import logging
import math
import os
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Any

import torch
from torch import nn

from prunekit.core import accounting, preflight
from prunekit.core.errors import ConfigError, ModelError
from prunekit.core.fingerprint import teacher_differences, teacher_fingerprint
from prunekit.core.memory import host_state_kept
from prunekit.core.runtime import (
    cast_model,
    compute_dtype,
    dtype_name,
    library_versions,
    model_dtype,
    peak_rss_bytes,
    resolve_device,
    resolve_dtype,
)
from prunekit.core.surgery import PruningPlan
from prunekit.core.surgery import apply_plan as _surgery
from prunekit.core.view import ModelAdapter
from prunekit.deploy.bench import measure_generation, measure_latency
from prunekit.families import get_adapter, pruning_view
from prunekit.io.folders import (
    as_pruned_model,
    as_stock_model,
    check_output_dir,
    check_work_dir,
    folder_dtype,
    load_model,
    load_plan,
    load_tokenizer,
    save_pruned,
)
from prunekit.io.reports import kv_heads_panel, plot_structure
from prunekit.methods import MethodSpec, get_method
from prunekit.methods.lut import sublayer_costs
from prunekit.methods.search import current_widths, full_widths, total_cost
from prunekit.tasks import CalibrationSample, TaskData, build_calibration_sample, build_training_data
from prunekit.tasks.causal_lm.family import calibration_window
from prunekit.tasks.dispatch import check_split
from prunekit.tasks.registry import family_of
from prunekit.tasks.spec import TaskSpec, get_task

logger = logging.getLogger(__name__)


@dataclass
class PruneResult:
    """A pruned model with its tokenizer, plan and report; ``save(dir)`` writes the HF folder."""

    model: nn.Module
    tokenizer: Any
    plan: PruningPlan
    report: dict[str, Any] = field(default_factory=dict)
    uniform: bool = False  # saved as the family's stock class (PruneOptions.uniform)
    view: ModelAdapter | None = field(default=None, repr=False)  # the model's view, built by the pipeline

    def save(self, out_dir: str | Path, overwrite: bool = False, inputs: Sequence[str | Path | None] = ()) -> Path:
        """Write the model folder: config.json, model.safetensors, tokenizer files,
        prune_report.json (with the plan's indices), plan.json + plan.safetensors (the whole plan,
        for ``prunekit apply-plan``) and structure.png, atomically. ``inputs`` (the teacher's
        folder, the data) are paths the output may not touch."""
        report = dict(self.report)
        report["plan"] = self.plan.to_dict()
        adapter = self.view if self.view is not None and self.view.model is self.model else get_adapter(self.model)

        def plot(folder: Path) -> None:
            kept = (f"{report['non_embedding_params_kept']:.1%} of non-embedding parameters kept"
                    if report.get("budget", {}).get("kind") == "params" else f"{report['flops_kept']:.1%} of FLOPs kept")
            plot_structure(
                report["layers"], adapter.full_num_heads, adapter.full_intermediate_size,
                folder / "structure.png", title=f"{report['method']} on {report['task']}: {kept}",
                full_kv_heads=kv_heads_panel(adapter),
            )

        return save_pruned(self.model, out_dir, tokenizer=self.tokenizer, report=report, overwrite=overwrite,
                           extra=plot, inputs=inputs, plan=self.plan, uniform=self.uniform, view=adapter)


@dataclass
class PruneOptions:
    """Everything a pruning run takes besides the model, tokenizer and data (one object for
    ``prune``, ``prune_many``, ``prune_and_save`` and ``prune_and_save_many``).

    Attributes:
        task: the task name or spec (its head, loss and data reader).
        method: a name in ``prunekit.methods.METHODS``.
        keep_flops, keep_latency, keep_params: the budget, a fraction in (0, 1) or several (one
            pruning each); at most one of the three. ``keep_latency`` needs a latency table
            (``method_options["lut"]``); ``keep_params`` is the fraction of non-embedding parameters
            kept (CoFi: of its prunable parameters). Default: keep 0.5 of the FLOPs.
        num_tokens, num_sequences: calibration sample size (default: the method's own).
        seed: the sample draw and the method's seed.
        device: cpu, cuda, cuda:N or None (auto).
        batch_size: calibration batch size (default the task's); for training methods, their
            training batch size.
        sort_by_length: calibration batches of similar lengths.
        method_options: the method's hyperparameters (e.g. ``temperature``, ``lam_rep``, ``seq_len``;
            CoFi's ``student_init``, ``checkpoint_dir``, ``resume``).
        overwrite, run_eval, run_bench, bench_batch_size, bench_seq_len, bench_rounds,
            max_eval_examples: ``prune_and_save`` and ``compare`` only: replace a folder prunekit
            wrote, evaluate on dev (the first ``max_eval_examples``), time against the teacher.
        calibration_length, eval_window, eval_stride, bench_new_tokens: causal LM only: the
            calibration window length L (``num_sequences`` windows of L tokens), the perplexity
            window and stride, and the new tokens of the decode benchmark (``prune_and_save``).
        uniform: every layer keeps the same query heads, key/value heads and FFN width (the
            method's plan is equalised by ``prunekit.core.uniform.uniform_plan`` within its cost) and
            the folder is the family's stock class, loading without prunekit (decoders).
        dtype: the dtype of the pruned model (``"float32"``, ``"bfloat16"``, ``"float16"`` or a torch
            dtype); None keeps the teacher's own (a folder's: the dtype its config.json records).
            Whatever the dtype, the method computes as :func:`prunekit.core.runtime.compute_dtype`
            says: in float32 on the CPU, in the model's dtype on a GPU.
    """

    task: str | TaskSpec = "sst2"
    method: str = "kprune"
    keep_flops: float | Sequence[float] | None = None
    keep_latency: float | Sequence[float] | None = None
    keep_params: float | Sequence[float] | None = None
    num_tokens: int | None = None
    num_sequences: int | None = None
    seed: int = 0
    device: str | torch.device | None = None
    batch_size: int | None = None
    sort_by_length: bool = True
    method_options: dict[str, Any] = field(default_factory=dict)
    overwrite: bool = False
    run_eval: bool = True
    run_bench: bool = True
    bench_batch_size: int = 32
    bench_seq_len: int | None = None  # 128, or the model's positions when it has fewer
    # Causal LM: calibration window length L (default the task's 2048, capped at the model's
    # max_position_embeddings; the FLOPs length follows it), the perplexity window and stride
    # (default min(2048, max positions), non-overlapping), and the decode benchmark's new tokens.
    calibration_length: int | None = None
    eval_window: int | None = None
    eval_stride: int | None = None
    bench_new_tokens: int = 32
    uniform: bool = False
    # prune_and_save and compare: score only the first N dev examples (quick checks), and the
    # benchmark's rounds (latency) or repeats (decode).
    max_eval_examples: int | None = None
    bench_rounds: int = 5
    dtype: str | torch.dtype | None = None

    @classmethod
    def of(cls, options: PruneOptions | str | TaskSpec | None = None, **kwargs: Any) -> PruneOptions:
        """Options from an options object and keyword arguments (which win); a keyword that is no
        field is a method option. A task given in place of the options (the old positional
        ``task``) is the task."""
        if isinstance(options, str | TaskSpec):
            kwargs.setdefault("task", options)
            options = None
        if options is not None and not isinstance(options, PruneOptions):
            raise ConfigError(f"options must be a PruneOptions, got {type(options).__name__}")
        base = options or cls()
        names = {f.name for f in fields(cls)} - {"method_options"}
        method_options = {**base.method_options, **kwargs.pop("method_options", {})}
        method_options |= {k: v for k, v in kwargs.items() if k not in names}
        return replace(base, method_options=method_options, **{k: v for k, v in kwargs.items() if k in names})

    def budgets(self) -> list[Budget]:
        return budgets_from(self.keep_flops, self.keep_latency, self.keep_params)


def loss_kind(task: TaskSpec) -> str:
    """Which distillation loss a task's head takes (prunekit.tasks.losses), as its family says."""
    return family_of(task).loss_kind(task)


Budget = tuple[str, float]  # ("flops" | "latency" | "params", fraction kept)


def budgets_from(keep_flops: float | Sequence[float] | None = None,
                 keep_latency: float | Sequence[float] | None = None,
                 keep_params: float | Sequence[float] | None = None) -> list[Budget]:
    """The budgets asked for, as ("flops" | "latency" | "params", fraction) pairs; keep 0.5 of the
    FLOPs when none is given. Each fraction must lie in (0, 1). ``keep_params`` is the fraction of
    non-embedding parameters kept for the retraining-free methods (the LLM convention), and of
    prunable encoder parameters for CoFi (its own sparsity)."""
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
            what = {"flops": "FLOPs", "latency": "latency", "params": "parameters"}[kind]
            raise ConfigError(f"keep_{kind} must be in (0, 1), the fraction of {what} kept; got {value}")
    preflight.check_distinct_budgets(kind, values)
    return [(kind, float(value)) for value in values]


def budget_name(budget: Budget) -> str:
    """A folder name for one budget, e.g. ``keep-flops-0.7``."""
    return f"keep-{budget[0]}-{budget[1]:g}"


# Method options that are run settings of a training method, not hyperparameters.
RUN_OPTIONS = ("student_init", "checkpoint_dir", "resume")


def _configs(spec: MethodSpec, budgets: list[Budget], options: PruneOptions, task: TaskSpec) -> list[Any]:
    """One method config per budget (all built before any work, so bad options fail early)."""
    known = {f.name for f in fields(spec.config_class)}
    method_options = {k: v for k, v in options.method_options.items() if not (spec.training and k in RUN_OPTIONS)}
    if "seed" in known:
        method_options.setdefault("seed", options.seed)  # e.g. the random baseline draws from the run's seed
    if spec.training and options.batch_size is not None:
        method_options.setdefault("batch_size", options.batch_size)  # no calibration batches to size
    for name, value in family_of(task).method_defaults.items():
        if name in known:
            method_options.setdefault(name, value)  # e.g. a causal LM's temperature 1
    if task.flops_seq_len is not None and "seq_len" in known and method_options.get("seq_len") is None:
        # SQuAD counts FLOPs at 170 tokens as both reference papers do (spec §2, P13); GLUE tasks
        # have none and keep the calibration sample's mean length.
        method_options["seq_len"] = task.flops_seq_len
    configs = []
    for kind, value in budgets:
        if kind == "latency":
            if "keep_latency" not in known:
                raise ConfigError(f"method {spec.name!r} does not take a latency budget; use keep_flops")
            configs.append(spec.make_config(keep_flops=1.0, keep_latency=value, **method_options))
        elif kind == "params":
            if "keep_params" not in known:
                raise ConfigError(f"method {spec.name!r} takes keep_flops or keep_latency, not keep_params")
            configs.append(spec.make_config(keep_params=value, **method_options))
        else:
            configs.append(spec.make_config(keep_flops=value, **method_options))
    return configs


# On the CPU every method computes in float32; only a GPU computes in the model's own dtype.
_COMPUTE_FIX = "prune on the CPU (--device cpu computes in float32) or on a GPU that has these kernels"


def _teacher(model: nn.Module | ModelAdapter | str | Path, tokenizer: Any, task: TaskSpec, device: torch.device,
             training: bool = False) -> tuple[ModelAdapter, Any, torch.dtype]:
    """The teacher's view, built here once for the whole run, in the dtype the method computes in
    (:func:`compute_dtype`), and the dtype the teacher was held in. A folder is loaded, and a view
    (of a model the pipeline loaded itself) taken as it is. A caller's model is used as it is
    (methods and surgery never change it), or copied when it lives on another device than the
    run's, is held in another dtype than the run computes in, or its family reads its modules in
    another form (GPT-2, OPT: ``pruning_view``)."""
    if isinstance(model, str | Path):
        held = resolve_dtype(folder_dtype(model)) or torch.float32
        teacher = get_adapter(load_model(model, head=task.head, dtype=compute_dtype(device, held, training)))
        tokenizer = tokenizer or load_tokenizer(model)
    elif isinstance(model, ModelAdapter):
        held = model_dtype(model.model)
        teacher = model if held == compute_dtype(device, held, training) else model.of(copy.deepcopy(model.model))
    else:
        preflight.check_not_meta(model)
        held = model_dtype(model)
        first = next(model.parameters(), None)
        on_device = first is None or first.device == torch.device(device) or (
            first.device.type == torch.device(device).type and torch.device(device).index is None)
        # Unsupported architectures fail here, before any work; one on another device, or in another
        # dtype than the run computes in, is copied (and moved, cast) below.
        teacher = pruning_view(model, copied=not on_device or held != compute_dtype(device, held, training))
    if isinstance(tokenizer, str | Path):
        tokenizer = load_tokenizer(tokenizer)  # given explicitly (--tokenizer)
    if tokenizer is not None:
        preflight.check_vocabulary(teacher.model, tokenizer)
    if teacher.model is model and preflight.needs_pad_token_id(model, task):
        # The caller's model is not changed: a shallow copy (the same modules) with its own config.
        shallow = copy.copy(model)
        shallow.config = copy.deepcopy(model.config)
        teacher = teacher.of(shallow)
    tokenizer = preflight.settle_pad_token(teacher.model, tokenizer, task)
    preflight.check_head_fits_task(teacher.config, task)
    cast_model(teacher.model, compute_dtype(device, held, training), device)  # widening half to float32 is exact
    return teacher, tokenizer, held


def _size(view: ModelAdapter, seq_len: float, full: bool = False) -> dict[str, float]:
    """FLOPs (of the unpruned architecture with ``full``) and parameter counts for a report."""
    flops = accounting.full_flops(view, seq_len) if full else accounting.count_flops(view, seq_len)
    return {"flops": flops, "params": accounting.count_params(view),
            "encoder_params": accounting.count_params(view, encoder_only=True),
            "non_embedding_params": accounting.count_non_embedding_params(view)}


def calibration_length(task: TaskSpec, options: PruneOptions, model: nn.Module) -> int:
    """The causal-LM calibration window L: the option, else the task's 2048, capped at the model's
    max_position_embeddings (windows longer than the model's positions cannot be run)."""
    return calibration_window(task, model, options.calibration_length)


def _task_data(spec: MethodSpec, task: TaskSpec, tokenizer: Any, data: Any, options: PruneOptions,
               config: Any, device: torch.device, budgets: list[Budget], teacher: ModelAdapter) -> TaskData:
    """The method's task data: a calibration sample, or training features and a dev scorer."""
    if data is None:
        raise ConfigError("no data given: pass the task's data folder, file or hub name")
    kind = loss_kind(task)
    if spec.training:
        if isinstance(data, CalibrationSample):
            raise ConfigError(f"method {spec.name!r} trains: pass the task's data (train and dev splits), "
                              "not a calibration sample")
        if tokenizer is None:
            raise ConfigError("a tokenizer is needed to tokenize the training data")
        run = {k: options.method_options.get(k) for k in RUN_OPTIONS}
        if run["checkpoint_dir"] is not None and len(budgets) > 1:
            raise ConfigError("checkpoint_dir holds one run: prune one budget at a time when checkpointing")
        student_init = run["student_init"]
        if isinstance(student_init, str | Path):
            student_init = load_model(student_init, head=task.head)
        training = build_training_data(
            task, tokenizer, data, **{name: getattr(config, name, None) for name in (
                "max_length", "doc_stride", "max_train_samples", "max_eval_samples")}, device=device)
        return TaskData(kind=kind, training=training, student_init=student_init, checkpoint_dir=run["checkpoint_dir"],
                        resume=bool(run["resume"]), device=device)
    if isinstance(data, CalibrationSample):
        sample = data
    else:
        if tokenizer is None:
            raise ConfigError("a tokenizer is needed to build the calibration sample from data")
        size = family_of(task).sample_size(task, teacher.model, options.num_tokens, options.num_sequences,
                                           calibration_length=options.calibration_length, defaults=spec.sample_size)
        sample = build_calibration_sample(task, tokenizer, data, **size, seed=options.seed,
                                          batch_size=options.batch_size or task.batch_size,
                                          sort_by_length=options.sort_by_length)
    return TaskData(kind=kind, sample=sample.to(device), device=device)


def _flops_seq_len(config: Any, data: TaskData, task: TaskSpec) -> float:
    """The FLOPs length of the report: the config's, else the sample's mean length, else (training
    methods) the task's FLOPs or average length."""
    if getattr(config, "seq_len", None):
        return config.seq_len
    if data.sample is not None:
        return data.sample.mean_length
    return task.flops_seq_len or task.avg_seq_len


def _hyperparameters(config: Any, budget_kind: str) -> dict[str, Any]:
    """The config's fields; the budget fields of the other budget kinds are null (a keep_params run
    does not keep 0.5 of the FLOPs because its config has that default)."""
    values = asdict(config)
    for kind in ("flops", "latency", "params"):
        if kind != budget_kind and f"keep_{kind}" in values:
            values[f"keep_{kind}"] = None
    return values


def _report(spec: MethodSpec, task: TaskSpec, budget: Budget, config: Any, options: PruneOptions, data: TaskData,
            seq_len: float, before: dict, student: ModelAdapter, log: dict, seconds: dict[str, float],
            device: torch.device) -> dict[str, Any]:
    """The prune report, for every method (built here only)."""
    budget_kind, keep = budget
    after = _size(student, seq_len)
    adapter = student
    report = {
        "method": spec.name,
        "task": task.name,
        "budget": {"kind": budget_kind, "keep": keep},
        "keep_flops": keep if budget_kind == "flops" else None,
        "keep_latency": keep if budget_kind == "latency" else None,
        "seed": options.seed,
        "hyperparameters": _hyperparameters(config, budget_kind),
        "flops_seq_len": seq_len,
        "sample": data.sample.summary() if data.sample is not None else None,
        "before": before,
        "after": after,
        "flops_kept": after["flops"] / before["flops"],
        "params_kept": after["params"] / before["params"],
        "non_embedding_params_kept": after["non_embedding_params"] / before["non_embedding_params"],
        "hidden_size": adapter.hidden_size,
        "layers": [shape.to_dict() for shape in adapter.layer_shapes()],
        "prune_seconds": sum(seconds.values()),
        **{f"{name}_seconds": value for name, value in seconds.items()},
        "peak_rss_bytes": peak_rss_bytes(),
        "peak_cuda_bytes": torch.cuda.max_memory_allocated() if torch.cuda.is_available() else None,
        "device": str(device),
        "versions": library_versions(),
        "method_log": log,
    }
    if spec.report_fields is not None:
        report |= spec.report_fields(config, log)
    if warning := preflight.warn_if_all_pruned(adapter, f"keep_{budget_kind} {keep:g}"):
        report["warnings"] = [warning]
    if budget_kind == "latency":
        costs = sublayer_costs(adapter, seq_len, config.lut)
        full = total_cost(costs, full_widths(adapter))
        report["latency_kept_estimated"] = total_cost(costs, current_widths(adapter)) / full if full > 0 else None
    return report


@host_state_kept()  # the run's seeds, threads, flags, env, warnings and logging stay inside it
def _pipeline(model: nn.Module | ModelAdapter | str | Path, tokenizer: Any, data: Any, options: PruneOptions) -> list[PruneResult]:
    """load -> data -> method -> plan -> surgery -> report, once per budget."""
    spec = get_method(options.method)
    task = get_task(options.task)
    preflight.check_positive("batch_size", options.batch_size)
    preflight.check_positive("seed", options.seed, minimum=0)
    budgets = options.budgets()
    if not spec.training:
        preflight.check_sample_size(options.num_tokens, options.num_sequences)
    preflight.check_lut_used(budgets[0][0], options.method_options)
    configs = _configs(spec, budgets, options, task)
    device = resolve_device(options.device)
    wanted = resolve_dtype(options.dtype)
    teacher, tokenizer, held = _teacher(model, tokenizer, task, device, spec.training)
    out_dtype, run_dtype = wanted or held, model_dtype(teacher.model)
    preflight.check_dtype_runs(run_dtype, device, _COMPUTE_FIX)
    for name in ("seq_len", "max_length"):
        preflight.check_seq_len(teacher.config, options.method_options.get(name), name)
    was_training = teacher.model.training
    teacher.model.eval()
    fingerprint = teacher_fingerprint(teacher)  # recorded in every plan, checked by apply_plan
    try:
        task_data = _task_data(spec, task, tokenizer, data, options, configs[0], device, budgets, teacher)
        if options.uniform:
            _check_uniform_budgets(teacher, budgets, configs, task_data, task)
        if torch.cuda.is_available():
            torch.cuda.reset_peak_memory_stats()
        prepare_seconds = 0.0
        # Shared work pays only across budgets; with one budget the method calibrates itself and can
        # free what it no longer needs as it goes (Kprune's layer-0 tensors).
        if spec.prepare is not None and len(budgets) > 1:
            torch.manual_seed(options.seed)
            start = time.perf_counter()
            task_data.prepared = spec.prepare(teacher, task_data, configs[0])
            prepare_seconds = time.perf_counter() - start
        results = []
        for budget, config in zip(budgets, configs, strict=True):
            torch.manual_seed(options.seed)
            logger.info("pruning with %s to keep %.3f of %s on %s", spec.name, budget[1], budget[0], device)
            if spec.training:
                task_data.seq_len = _flops_seq_len(config, task_data, task)
            seq_len = _flops_seq_len(config, task_data, task)
            before = _size(teacher, seq_len, full=True)
            start = time.perf_counter()
            plan, log = spec.run(teacher, task_data, config)
            if options.uniform:
                from prunekit.core.uniform import uniform_plan

                # Priced in the budget's own measure: parameters for keep_params, else FLOPs.
                plan, log["uniform"] = uniform_plan(teacher, plan, None if budget[0] == "params" else seq_len,
                                                    keep=None if budget[0] == "latency" else budget[1])
                if log["uniform"].get("within_budget") is False:
                    raise ConfigError(f"--uniform cannot meet keep_{budget[0]} {budget[1]:g}: its smallest "
                                      "shape costs more; give a larger budget or prune without --uniform")
            # A method whose plans keep every width (ShortGPT drops whole layers) marks them uniform
            # itself: the pruned model is then saved as the family's stock class.
            plan.teacher, plan.uniform = dict(fingerprint), options.uniform or plan.uniform
            run_seconds = time.perf_counter() - start
            gc.collect()  # the method's working copies go before the student is built
            start = time.perf_counter()
            student = teacher.of(copy.deepcopy(teacher.model))
            as_pruned_model(_surgery(student, plan), student)
            # Cast once, after surgery: scales and re-fitted weights are applied in the compute dtype
            # and rounded to the saved dtype a single time.
            cast_model(student.model, out_dtype)
            surgery_seconds = time.perf_counter() - start
            seconds = {"prepare": prepare_seconds, "run": run_seconds, "surgery": surgery_seconds}
            report = _report(spec, task, budget, config, options, task_data, seq_len, before, student, log, seconds,
                             device)
            report["dtype"] = {"teacher": dtype_name(held), "compute": dtype_name(run_dtype),
                               "pruned": dtype_name(out_dtype)}
            _check_params_budget(spec, budget, report)
            logger.info("pruned in %.1f s: FLOPs kept %.4f, params kept %.4f", report["prune_seconds"],
                        report["flops_kept"], report["params_kept"])
            results.append(PruneResult(model=student.model, tokenizer=tokenizer, plan=plan, report=report,
                                       uniform=plan.uniform, view=student))
        return results
    finally:
        teacher.model.train(was_training)


def _check_uniform_budgets(teacher: ModelAdapter, budgets: list[Budget], configs: list[Any], data: TaskData,
                           task: TaskSpec) -> None:
    """--uniform keeps one group, one query head and one neuron in every layer at the least: a
    budget under that is refused before the method runs (its FLOPs length is known by now)."""
    from prunekit.core.uniform import smallest_uniform_keep

    for (kind, keep), config in zip(budgets, configs, strict=True):
        if kind == "latency":
            continue
        seq_len = None if kind == "params" else _flops_seq_len(config, data, task)
        least, shape = smallest_uniform_keep(teacher, seq_len)
        if keep < least:
            what = "non-embedding parameters" if kind == "params" else f"FLOPs at {seq_len:g} tokens"
            raise ConfigError(
                f"--uniform keeps at least {shape['kv_groups']} key/value group, {shape['query_heads']} query "
                f"head(s) and 1 FFN neuron in every layer, {least:.4f} of the {what}; keep_{kind} {keep:g} is "
                f"below that: give keep_{kind} {math.ceil(least * 1e4) / 1e4:g} or more, or prune without --uniform")


def count_flops(model: nn.Module | ModelAdapter, seq_len: float = 128.0) -> float:
    """FLOPs (attention heads and FFN neurons) of one sequence of ``seq_len`` tokens through any
    supported ``model`` (or its view), pruned or not; the model is not changed."""
    return accounting.count_flops(_view(model), seq_len)


def count_params(model: nn.Module | ModelAdapter, encoder_only: bool = False) -> int:
    """Parameters of any supported ``model`` (or its view); with ``encoder_only`` only its
    transformer layers'."""
    return accounting.count_params(_view(model), encoder_only=encoder_only)


def _view(model: nn.Module | ModelAdapter) -> ModelAdapter:
    return model if isinstance(model, ModelAdapter) else pruning_view(model)


def _check_params_budget(spec: MethodSpec, budget: Budget, report: dict[str, Any]) -> None:
    """A parameter budget is checked on the pruned model itself: more non-embedding parameters
    kept than asked is a failed run, never a quiet result (CoFi's budget is its own sparsity)."""
    kind, keep = budget
    if kind != "params" or spec.training:
        return
    kept = report["non_embedding_params_kept"]
    if kept > keep * (1 + 1e-9):
        raise ModelError(f"{spec.name} kept {kept:.6f} of the non-embedding parameters, over the budget of {keep}; "
                         "this is a bug, please report it")


def prune(model: nn.Module | str | Path, tokenizer: Any = None, data: str | Path | CalibrationSample | None = None,
          options: PruneOptions | str | None = None, **kwargs: Any) -> PruneResult:
    """Prune a fine-tuned model to keep ``keep_flops`` of its encoder FLOPs (or ``keep_latency``
    of its latency, with a latency table passed as ``lut=``).

    Args:
        model: a model or a model folder (loaded with the task's head). A given model is never
            changed.
        tokenizer: its tokenizer (loaded from the folder when ``model`` is a path).
        data: the task's data source (GLUE folder, CSV/JSONL, hub name; SQuAD JSON file or folder,
            or a list of SQuAD examples) or a ready ``CalibrationSample``.
        options: a :class:`PruneOptions`; or give its fields as keyword arguments (``task``,
            ``method``, ``keep_flops``, ``keep_latency``, ``keep_params``, ``num_tokens``,
            ``num_sequences``, ``seed``, ``device``, ``batch_size``, ``sort_by_length``); any other
            keyword is a method option (e.g. ``temperature``, ``lam_rep``, ``seq_len``).
    Returns:
        A ``PruneResult`` with ``.model``, ``.plan``, ``.report`` and ``.save(dir)``.
    """
    options = PruneOptions.of(options, **kwargs)
    if len(options.budgets()) != 1:
        raise ConfigError("prune takes one budget; use prune_many for several")
    return _pipeline(model, tokenizer, data, options)[0]


def prune_many(model: nn.Module | ModelAdapter | str | Path, tokenizer: Any = None,
               data: str | Path | CalibrationSample | None = None, options: PruneOptions | str | None = None,
               **kwargs: Any) -> list[PruneResult]:
    """One calibration, many budgets: like :func:`prune` for each budget in ``keep_flops`` (or
    ``keep_latency``, ``keep_params``), in order, reusing what does not depend on the budget. The
    sample is drawn once, the method's ``prepare`` step (Kwon et al.'s Fisher gradients) runs once
    on the teacher, and each budget's plan is applied to a fresh copy of the teacher.

    Each report's ``prune_seconds`` is what that budget alone costs (the shared step included);
    ``prepare_seconds``, ``run_seconds`` and ``surgery_seconds`` split it.
    """
    return _pipeline(model, tokenizer, data, PruneOptions.of(options, **kwargs))


def apply_plan(teacher: nn.Module | str | Path, plan: PruningPlan | str | Path, force: bool = False) -> nn.Module:
    """Rebuild a pruned model from its teacher: ``plan`` is a :class:`PruningPlan` or a pruned
    folder (its plan.json + plan.safetensors). A teacher folder is loaded with the head the plan's
    folder was saved with; a given teacher model is copied, never changed. Returns the pruned
    model, ready for ``save_pruned`` (with ``uniform=plan.uniform``: a uniform plan's model is
    the family's stock class).

    The plan records the teacher it was made on (family, class, architecture, weights digest); a
    model that differs is refused with a ModelError naming what differs, unless ``force``. A plan
    made before prunekit recorded its teacher is applied with a logged warning. A plan that lists
    another number of layers than the teacher has is refused."""
    from prunekit.io.folders import load_pruned

    plan = load_plan(plan)
    # Surgery in float32, the result cast to the teacher's dtype once, as the pipeline does: a half
    # teacher's rebuilt model is then the pruned model prunekit saved, bit for bit.
    if isinstance(teacher, str | Path):
        held = resolve_dtype(folder_dtype(teacher)) or torch.float32
        model = load_pruned(teacher, dtype=torch.float32)
    else:
        held = model_dtype(teacher)
        model = cast_model(copy.deepcopy(teacher), torch.float32)
    view = get_adapter(model)  # the copy's, or the loaded model's: the caller's model is never changed
    _check_plan_teacher(plan, view, force)
    if not view.grouped_kv and any(step.kv_groups is not None for step in plan.layers):
        raise ModelError("the plan does not fit this teacher: it keeps key/value groups, but this model family has "
                         "none; pass the model the plan was made from")
    if len(plan.layers) != view.num_layers:
        raise ModelError(f"the plan does not fit this teacher: it lists {len(plan.layers)} layers, the teacher has "
                         f"{view.num_layers}; pass the model the plan was made from (a plan names every layer)")
    try:
        model = cast_model(_surgery(view, plan), held)
        return as_stock_model(model, view) if plan.uniform else as_pruned_model(model, view)
    except (ValueError, IndexError, RuntimeError) as err:
        raise ModelError(f"the plan does not fit this teacher: {err}; pass the model the plan was made from") from err


def _check_plan_teacher(plan: PruningPlan, view: ModelAdapter, force: bool) -> None:
    if plan.teacher is None:
        logger.warning("the plan records no teacher (it was made before prunekit recorded one), so it is applied "
                       "without checking that this is the model it was made on")
        return
    differences = teacher_differences(plan.teacher, teacher_fingerprint(view))
    if not differences:
        return
    what = "; ".join(differences)
    if "prunekit_layers" in view.model.config.to_dict() and "prunekit_layers" not in (plan.teacher.get("config") or {}):
        what = "the model is itself a pruned model (its config lists prunekit_layers), not the teacher: " + what
    if force:
        logger.warning("applying the plan to a model that is not its teacher (forced): %s", what)
        return
    raise ModelError(f"the plan was made on another teacher: {what}; pass the model the plan was made from, "
                     "or --force (force=True in Python) to apply it anyway")


def prune_and_save(model_dir: str | Path, out_dir: str | Path, data: str | Path,
                   options: PruneOptions | str | None = None, **kwargs: Any) -> dict[str, Any]:
    """The whole job: load the teacher, prune, evaluate both on the dev split, measure latency
    of both, and write the pruned folder with its report and plan. Returns the report. Options as
    for :func:`prune`, plus ``overwrite``, ``run_eval``, ``run_bench``, ``bench_batch_size`` and
    ``bench_seq_len``.

    The output folder is checked before any work and written atomically at the end.
    """
    options = PruneOptions.of(options, **kwargs)
    if len(options.budgets()) != 1:
        raise ConfigError("prune_and_save takes one budget; use prune_and_save_many for several")
    return _prune_and_save(model_dir, [out_dir], data, options)[0]


def prune_and_save_many(model_dir: str | Path, out_dir: str | Path, data: str | Path,
                        options: PruneOptions | str | None = None, **kwargs: Any) -> list[dict[str, Any]]:
    """:func:`prune_and_save` for several budgets from one calibration (:func:`prune_many`): one
    folder per budget inside ``out_dir``, named like ``keep-flops-0.7``. Returns the reports."""
    options = PruneOptions.of(options, **kwargs)
    out_dirs = [Path(out_dir) / budget_name(budget) for budget in options.budgets()]
    return _prune_and_save(model_dir, out_dirs, data, options)


def _prune_and_save(model_dir: str | Path, out_dirs: list[str | Path], data: str | Path,
                    options: PruneOptions) -> list[dict[str, Any]]:
    method_options = dict(options.method_options)
    tokenizer = method_options.pop("tokenizer", None)  # a tokenizer folder, when the model's has none
    options = replace(options, method_options=method_options)
    inputs = (model_dir, data if isinstance(data, str | Path) else None, tokenizer)
    for out in out_dirs:
        check_output_dir(out, options.overwrite, inputs)
    check_work_dir(method_options.get("checkpoint_dir"), "--checkpoint-dir", out_dirs, inputs)
    # The folder's own dtype, unless another is asked for: the teacher is loaded in the dtype the
    # method computes in, which on the CPU is float32 whatever the folder holds.
    stored = resolve_dtype(folder_dtype(model_dir)) or torch.float32
    options = replace(options, dtype=resolve_dtype(options.dtype) or stored)
    teacher, tokenizer, task = load_teacher(model_dir, tokenizer, data, options)
    results = _pipeline(teacher, tokenizer, data, options)
    for result in results:
        result.report["dtype"]["teacher"] = dtype_name(stored)  # the folder's, not the compute copy's
    if int(os.environ.get("RANK", "0")) != 0:
        # Under `accelerate launch` every process trains; only the first evaluates and writes.
        return [result.report for result in results]
    teacher_eval = None
    reports = []
    # The teacher is scored and timed in the pruned models' dtype, like for like (the teacher is
    # this run's own copy, and the method is done with it).
    cast_model(teacher.model, model_dtype(results[0].model))
    for result, out in zip(results, out_dirs, strict=True):
        teacher_eval = evaluate_and_time(result, teacher.model, tokenizer, data, options, teacher_eval)
        result.report.setdefault("teacher", str(model_dir))
        result.save(out, overwrite=options.overwrite, inputs=inputs)
        reports.append(result.report)
        result.model = result.view = None  # free the pruned model before the next budget's evaluation
    return reports


def load_teacher(model_dir: str | Path, tokenizer: str | Path | None, data: Any, options: PruneOptions
                 ) -> tuple[ModelAdapter, Any, TaskSpec]:
    """The teacher folder loaded with the task's head, viewed once, with its tokenizer (or the one
    given), after every check that can run before any work (device, vocabulary, pad token, head,
    perplexity window, dev split, benchmark shape). For the commands that prune and save
    (``prune``, ``compare``)."""
    task = get_task(options.task)
    preflight.check_device(options.device)
    device = resolve_device(options.device)
    held = resolve_dtype(folder_dtype(model_dir)) or torch.float32
    wanted = resolve_dtype(options.dtype) or held
    run_dtype = compute_dtype(device, held, get_method(options.method).training)
    preflight.check_dtype_runs(run_dtype, device, _COMPUTE_FIX)
    if options.run_eval or options.run_bench:  # the pruned model is scored and timed here, in its dtype
        others = " or ".join(name for name in ("float32", "bfloat16") if name != dtype_name(wanted))
        preflight.check_dtype_runs(wanted, device, f"pass --dtype {others} (PruneOptions.dtype), or --no-eval "
                                                   f"--no-bench to save the {dtype_name(wanted)} model without "
                                                   "running it here")
    model = load_model(model_dir, head=task.head, dtype=run_dtype)
    tokenizer = load_tokenizer(tokenizer or model_dir)
    preflight.check_vocabulary(model, tokenizer)
    tokenizer = preflight.settle_pad_token(model, tokenizer, task)
    preflight.check_head_fits_task(model.config, task)
    preflight.check_seq_len(model.config, options.eval_window, "window (--window)")
    if options.run_eval and family_of(task).generates:  # perplexity's window and stride, before pruning
        from prunekit.tasks.causal_lm.family import default_window

        window = options.eval_window if options.eval_window is not None else default_window(model, task)
        stride = options.eval_stride if options.eval_stride is not None else window
        if window < 2 or not 1 <= stride <= window:
            raise ConfigError(f"perplexity needs window >= 2 and 1 <= stride <= window; got window {window}, "
                              f"stride {stride} (--window, --stride)")
    if options.run_eval:
        check_split(task, data, "dev")  # before pruning, not after it
    if options.run_bench:
        preflight.check_positive("bench_batch_size", options.bench_batch_size)
        preflight.check_positive("bench_seq_len", options.bench_seq_len)
        bench_seq_len, prompt_len = _bench_lengths(model, task, options)
        preflight.check_seq_len(model.config, bench_seq_len, "bench_seq_len")
        if family_of(task).generates:
            preflight.check_seq_len(model.config, prompt_len + options.bench_new_tokens,
                                    "the decode benchmark's prompt plus --new-tokens,")
    return get_adapter(model), tokenizer, task  # the one view of this run


def _bench_lengths(teacher: nn.Module, task: TaskSpec, options: PruneOptions) -> tuple[int, int]:
    """The benchmark's sequence length and a causal LM's prompt length: ``bench_seq_len``, else 128
    tokens or the model's positions when it has fewer, the prompt then leaving room for the decoded
    tokens."""
    if options.bench_seq_len is not None:
        return options.bench_seq_len, options.bench_seq_len
    positions = preflight.max_positions(teacher.config)
    length = min(128, positions) if positions else 128
    prompt = length
    if family_of(task).generates and positions:
        prompt = max(1, min(length, positions - options.bench_new_tokens))
    return length, prompt


def evaluate_and_time(result: PruneResult, teacher: nn.Module, tokenizer: Any, data: Any, options: PruneOptions,
                      teacher_eval: dict[str, Any] | None = None) -> dict[str, Any] | None:
    """Score the pruned model on the dev split beside the teacher and time both, as ``options``
    say (``run_eval``, ``max_eval_examples``, the perplexity window; ``run_bench`` at
    (``bench_batch_size``, ``bench_seq_len``) over ``bench_rounds`` rounds, and a causal LM's
    greedy decode), into ``result.report``'s ``eval``, ``latency`` and ``generation``. The teacher is
    scored once: pass back what this returns for the next result."""
    task = get_task(options.task)
    device = options.device
    if options.run_eval:
        from prunekit.tasks.evaluate import evaluate  # entry-level helper; keeps `import prunekit` light

        scoring = family_of(task).pick_options(window=options.eval_window, stride=options.eval_stride)
        scoring["max_examples"] = options.max_eval_examples
        if teacher_eval is None:
            teacher_eval = evaluate(teacher, tokenizer, task, data, device=device, **scoring)
        result.report["eval"] = {"teacher": teacher_eval,
                                 "pruned": evaluate(result.model, tokenizer, task, data, device=device, **scoring)}
    if options.run_bench:
        bench_seq_len, prompt_len = _bench_lengths(teacher, task, options)
        result.report["latency"] = measure_latency(
            result.model, baseline=teacher, batch_sizes=[options.bench_batch_size], seq_lens=[bench_seq_len],
            device=device, rounds=options.bench_rounds)
        if family_of(task).generates:
            result.report["generation"] = measure_generation(
                result.model, baseline=teacher, prompt_len=prompt_len, new_tokens=options.bench_new_tokens,
                device=device, repeats=options.bench_rounds)
    return teacher_eval
