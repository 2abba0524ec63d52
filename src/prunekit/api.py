"""The Python API a user calls; the CLI calls exactly these functions.

``prune`` takes a fine-tuned model, draws the calibration sample, runs a method from
``prunekit.methods`` and hands back a physically pruned model with its report.
"""

from __future__ import annotations

import copy
import logging
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .accounting import count_flops, count_params, full_flops
from .adapters import get_adapter
from .bench import measure_latency
from .data import CalibrationSample, build_calibration_sample
from .errors import ConfigError
from .io import as_pruned_model, check_output_dir, load_model, load_tokenizer, save_pruned
from .methods import get_method
from .reports import plot_structure
from .runtime import library_versions, peak_rss_bytes, resolve_device
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

    def save(self, out_dir: str | Path, overwrite: bool = False) -> Path:
        """Write the model folder: config.json, model.safetensors, tokenizer files,
        prune_report.json (with the plan) and structure.png, atomically."""
        report = dict(self.report)
        report["plan"] = self.plan.to_dict()
        adapter = get_adapter(self.model)

        def plot(folder: Path) -> None:
            plot_structure(
                report["layers"], adapter.full_num_heads, adapter.full_intermediate_size,
                folder / "structure.png",
                title=f"{report['method']} on {report['task']}: {report['flops_kept']:.1%} of FLOPs kept",
            )

        return save_pruned(self.model, out_dir, tokenizer=self.tokenizer, report=report, overwrite=overwrite, extra=plot)


def loss_kind(task: TaskSpec) -> str:
    """Which distillation loss a task's head takes (prunekit.losses)."""
    if task.head == "question_answering":
        return "qa"
    return "regression" if task.is_regression else "classification"


def prune(
    model: nn.Module | str | Path,
    tokenizer: Any = None,
    data: str | Path | CalibrationSample | None = None,
    task: str | TaskSpec = "sst2",
    method: str = "kprune",
    keep_flops: float = 0.5,
    num_tokens: int = 100_000,
    seed: int = 0,
    device: str | torch.device | None = None,
    batch_size: int | None = None,
    sort_by_length: bool = True,
    **method_options: Any,
) -> PruneResult:
    """Prune a fine-tuned model to keep ``keep_flops`` of its encoder FLOPs.

    Args:
        model: a model or a model folder (loaded with the task's head). A given model is copied,
            never changed.
        tokenizer: its tokenizer (loaded from the folder when ``model`` is a path).
        data: the task's data source (GLUE folder, CSV/JSONL, hub name) or a ready
            ``CalibrationSample``.
        keep_flops: fraction of the encoder FLOPs kept, in (0, 1).
        num_tokens: calibration sample size in tokens (spec §1.2).
        method_options: the method's hyperparameters (e.g. ``temperature``, ``lam_rep``, ``seq_len``).
    Returns:
        A ``PruneResult`` with ``.model``, ``.report`` and ``.save(dir)``.
    """
    spec = get_method(method)
    task = get_task(task)
    if not 0.0 < keep_flops < 1.0:
        raise ConfigError(f"keep_flops must be in (0, 1), the fraction of FLOPs kept; got {keep_flops}")
    config = spec.make_config(keep_flops=keep_flops, **method_options)
    device = resolve_device(device)
    if isinstance(model, str | Path):
        tokenizer = tokenizer or load_tokenizer(model)
        model = load_model(model, head=task.head)
    else:
        model = copy.deepcopy(model)
    get_adapter(model)
    if data is None:
        raise ConfigError("no data given: pass the task's data folder, file or hub name")
    if isinstance(data, CalibrationSample):
        sample = data
    else:
        if tokenizer is None:
            raise ConfigError("a tokenizer is needed to build the calibration sample from data")
        sample = build_calibration_sample(
            task, tokenizer, data, num_tokens=num_tokens, seed=seed,
            batch_size=batch_size or task.batch_size, sort_by_length=sort_by_length,
        )
    sample = sample.to(device)
    model.to(device).eval()
    torch.manual_seed(seed)

    seq_len = getattr(config, "seq_len", None) or sample.mean_length
    before = {"flops": full_flops(model, seq_len), "params": count_params(model),
              "encoder_params": count_params(model, encoder_only=True)}
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    logger.info("pruning with %s to keep %.3f of FLOPs on %s", method, keep_flops, device)
    start = time.perf_counter()
    plan, log = spec.run(model, sample, loss_kind(task), config)
    seconds = time.perf_counter() - start
    as_pruned_model(model)
    after = {"flops": count_flops(model, seq_len), "params": count_params(model),
             "encoder_params": count_params(model, encoder_only=True)}
    adapter = get_adapter(model)
    report = {
        "method": method,
        "task": task.name,
        "keep_flops": keep_flops,
        "seed": seed,
        "hyperparameters": asdict(config),
        "flops_seq_len": seq_len,
        "sample": sample.summary(),
        "before": before,
        "after": after,
        "flops_kept": after["flops"] / before["flops"],
        "params_kept": after["params"] / before["params"],
        "layers": [shape.to_dict() for shape in adapter.layer_shapes()],
        "prune_seconds": seconds,
        "peak_rss_bytes": peak_rss_bytes(),
        "peak_cuda_bytes": torch.cuda.max_memory_allocated() if torch.cuda.is_available() else None,
        "device": str(device),
        "versions": library_versions(),
        "method_log": log,
    }
    logger.info("pruned in %.1f s: FLOPs kept %.4f, params kept %.4f", seconds, report["flops_kept"], report["params_kept"])
    return PruneResult(model=model, tokenizer=tokenizer, plan=plan, report=report)


def prune_and_save(
    model_dir: str | Path,
    out_dir: str | Path,
    data: str | Path,
    task: str | TaskSpec = "sst2",
    method: str = "kprune",
    keep_flops: float = 0.5,
    num_tokens: int = 100_000,
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
    check_output_dir(out_dir, overwrite)
    task = get_task(task)
    tokenizer = load_tokenizer(model_dir)
    teacher = load_model(model_dir, head=task.head)
    result = prune(teacher, tokenizer, data, task=task, method=method, keep_flops=keep_flops,
                   num_tokens=num_tokens, seed=seed, device=device, **method_options)
    if run_eval:
        from .evaluate import evaluate  # entry-level helper; keeps `import prunekit` light

        result.report["eval"] = {
            "teacher": evaluate(teacher, tokenizer, task, data, device=device),
            "pruned": evaluate(result.model, tokenizer, task, data, device=device),
        }
    if run_bench:
        latency = measure_latency(result.model, baseline=teacher, batch_sizes=[bench_batch_size],
                                  seq_lens=[bench_seq_len], device=device)
        result.report["latency"] = latency
    result.save(out_dir, overwrite=overwrite)
    return result.report
