"""Serving an exported folder with ONNX Runtime: evaluation and latency.

:class:`OnnxModel` makes an export folder look like the PyTorch model it came from (a module whose
``forward`` takes input_ids / attention_mask / token_type_ids and returns ``.logits`` or
``.start_logits`` / ``.end_logits``), so :func:`prunekit.tasks.evaluate.evaluate` scores it with the
same data, feature and metric code as any model (GLUE and SQuAD).

:func:`measure_onnx_latency` is ``prunekit.deploy.bench.measure_latency`` for ONNX Runtime: the same
inputs, the same result layout, threads pinned (``intra_op_num_threads``), the model and the
baseline measured alternately, round by round, and the medians reported.
"""

from __future__ import annotations

import logging
import statistics
import tempfile
import time
from collections.abc import Sequence
from contextlib import ExitStack
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import torch
from torch import nn

from prunekit.core.errors import ConfigError
from prunekit.deploy.bench import _inputs
from prunekit.deploy.export import export_onnx, is_export_dir, ort_session, read_export

logger = logging.getLogger(__name__)


class OnnxModel(nn.Module):
    """An ONNX export folder run by ONNX Runtime on the CPU, called like the Hugging Face model."""

    def __init__(self, folder: str | Path, threads: int | None = None) -> None:
        super().__init__()
        self.folder = Path(folder)
        self.record = read_export(self.folder)
        self.session = ort_session(self.folder / self.record["file"], threads)
        self.input_names = list(self.record["inputs"])
        self.output_names = list(self.record["outputs"])
        self.config = SimpleNamespace(**self.record["config"])

    def feeds(self, input_ids: torch.Tensor | np.ndarray, attention_mask: Any = None,
              token_type_ids: Any = None) -> dict[str, np.ndarray]:
        """The graph's inputs as int64 arrays; missing masks and token types are filled in."""
        ids = _array(input_ids)
        given = {"input_ids": ids,
                 "attention_mask": _array(attention_mask) if attention_mask is not None else np.ones_like(ids),
                 "token_type_ids": _array(token_type_ids) if token_type_ids is not None else np.zeros_like(ids)}
        return {name: given[name] for name in self.input_names}

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                token_type_ids: torch.Tensor | None = None, **_: Any) -> SimpleNamespace:
        outputs = self.session.run(self.output_names, self.feeds(input_ids, attention_mask, token_type_ids))
        return SimpleNamespace(**{name: torch.from_numpy(value) for name, value in zip(self.output_names, outputs,
                                                                                      strict=True)})


def _array(value: Any) -> np.ndarray:
    if isinstance(value, torch.Tensor):
        value = value.detach().cpu().numpy()
    return np.asarray(value, dtype=np.int64)


def _time_once(model: OnnxModel, feeds: dict[str, np.ndarray], min_run_time: float) -> float:
    """Median seconds per call over at least ``min_run_time`` seconds of calls (at least one, as
    ``blocked_autorange`` takes at least one block)."""
    model.session.run(model.output_names, feeds)  # warm-up outside the measurement (arena, caches)
    times: list[float] = []
    start = time.perf_counter()
    while not times or time.perf_counter() - start < min_run_time:
        t0 = time.perf_counter()
        model.session.run(model.output_names, feeds)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def _as_export(path: str | Path, stack: ExitStack) -> Path:
    """An export folder as given, or a model folder exported (and checked) into a temporary one."""
    if is_export_dir(path):
        return Path(path)
    tmp = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="prunekit-onnx-")))
    logger.info("exporting %s to ONNX for the measurement", path)
    return export_onnx(path, tmp / "onnx")


def measure_onnx_latency(
    model: str | Path,
    baseline: str | Path | None = None,
    batch_sizes: Sequence[int] = (32,),
    seq_lens: Sequence[int] = (128,),
    threads: int | None = None,
    rounds: int = 5,
    min_run_time: float = 0.5,
    seed: int = 0,
) -> dict[str, Any]:
    """Median ONNX Runtime latency (ms) of ``model`` (and ``baseline``) at each batch size and length.

    ``model`` and ``baseline`` are export folders, or model folders, which are exported to a
    temporary folder first. Returns the layout of :func:`prunekit.deploy.bench.measure_latency` plus
    ``"runtime": "onnxruntime"``.
    """
    if rounds < 1:
        raise ConfigError(f"rounds must be >= 1, got {rounds}")
    threads = threads or torch.get_num_threads()
    with ExitStack() as stack:
        models = {"model": OnnxModel(_as_export(model, stack), threads)}
        if baseline is not None:
            models["baseline"] = OnnxModel(_as_export(baseline, stack), threads)
        results = []
        for batch_size in batch_sizes:
            for seq_len in seq_lens:
                inputs = _inputs(models["model"], batch_size, seq_len, torch.device("cpu"), seed)
                feeds = {name: m.feeds(**inputs) for name, m in models.items()}
                times: dict[str, list[float]] = {name: [] for name in models}
                for _ in range(rounds):
                    for name, m in models.items():
                        times[name].append(_time_once(m, feeds[name], min_run_time) * 1e3)
                results.append(_row(batch_size, seq_len, times))
    return {"device": "cpu", "runtime": "onnxruntime", "threads": threads, "rounds": rounds, "results": results}


def _row(batch_size: int, seq_len: int, times: dict[str, list[float]]) -> dict[str, Any]:
    row: dict[str, Any] = {"batch_size": batch_size, "seq_len": seq_len,
                           "latency_ms": statistics.median(times["model"]), "latency_ms_rounds": times["model"]}
    if "baseline" in times:
        row["baseline_ms"] = statistics.median(times["baseline"])
        row["baseline_ms_rounds"] = times["baseline"]
        row["speedup"] = row["baseline_ms"] / row["latency_ms"]
    logger.info("onnxruntime latency batch %d seq %d: %s", batch_size, seq_len,
                {k: round(v, 3) for k, v in row.items() if isinstance(v, float)})
    return row
