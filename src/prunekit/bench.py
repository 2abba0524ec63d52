"""Latency measurement with ``torch.utils.benchmark`` (ecosystem.md §4).

Timer warms up, synchronises CUDA, and ``blocked_autorange`` gives repeated measurements whose
median we report. CPU threads are pinned explicitly (the Timer's default is 1 thread). When a
baseline is given, the two models are measured alternately, round by round, so machine noise hits
both alike, and the speedup is the ratio of the medians.
"""

from __future__ import annotations

import logging
import statistics
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn
from torch.utils import benchmark as tbench

from .accounting import count_flops, count_params
from .errors import ConfigError

logger = logging.getLogger(__name__)


def _inputs(model: nn.Module, batch_size: int, seq_len: int, device: torch.device, seed: int) -> dict:
    vocab = int(getattr(model.config, "vocab_size", 1000))
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(low=min(5, vocab - 1), high=vocab, size=(batch_size, seq_len), generator=generator)
    inputs = {"input_ids": ids.to(device), "attention_mask": torch.ones_like(ids, device=device)}
    if getattr(model.config, "type_vocab_size", 0):
        inputs["token_type_ids"] = torch.zeros_like(ids, device=device)
    return inputs


def _time_once(model: nn.Module, inputs: dict, threads: int, min_run_time: float) -> float:
    timer = tbench.Timer(
        stmt="model(**inputs)",
        globals={"model": model, "inputs": inputs},
        num_threads=threads,
    )
    with torch.inference_mode():
        model(**inputs)  # warm-up outside the measurement (allocator, kernels, caches)
        measurement = timer.blocked_autorange(min_run_time=min_run_time)
    return measurement.median


def measure_latency(
    model: nn.Module,
    baseline: nn.Module | None = None,
    batch_sizes: Sequence[int] = (32,),
    seq_lens: Sequence[int] = (128,),
    device: str | torch.device | None = None,
    threads: int | None = None,
    rounds: int = 5,
    min_run_time: float = 0.5,
    dtype: torch.dtype | None = None,
    seed: int = 0,
) -> dict[str, Any]:
    """Median latency (ms) of ``model`` (and ``baseline``) at each batch size and sequence length.

    Returns ``{"device", "threads", "rounds", "results": [{batch_size, seq_len, latency_ms,
    latency_ms_rounds, baseline_ms?, speedup?}]}``; the latency of each round is that round's
    ``blocked_autorange`` median, and the reported value the median over rounds.
    """
    from .preflight import check_positive

    check_positive("rounds", rounds)
    check_positive("threads", threads)
    for name, values in (("batch_sizes", batch_sizes), ("seq_lens", seq_lens)):
        if not list(values):
            raise ConfigError(f"{name} is empty; give at least one, e.g. 32")
        for value in values:
            check_positive(name, value)
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    threads = threads or torch.get_num_threads()
    models = {"model": model}
    if baseline is not None:
        models["baseline"] = baseline
    for m in models.values():
        m.to(device)
        if dtype is not None:
            m.to(dtype)
        m.eval()
    results = []
    for batch_size in batch_sizes:
        for seq_len in seq_lens:
            inputs = _inputs(model, batch_size, seq_len, device, seed)
            times: dict[str, list[float]] = {name: [] for name in models}
            for _ in range(rounds):
                for name, m in models.items():
                    times[name].append(_time_once(m, inputs, threads, min_run_time) * 1e3)
            row: dict[str, Any] = {
                "batch_size": batch_size,
                "seq_len": seq_len,
                "latency_ms": statistics.median(times["model"]),
                "latency_ms_rounds": times["model"],
            }
            if baseline is not None:
                row["baseline_ms"] = statistics.median(times["baseline"])
                row["baseline_ms_rounds"] = times["baseline"]
                row["speedup"] = row["baseline_ms"] / row["latency_ms"]
            logger.info("latency batch %d seq %d: %s", batch_size, seq_len,
                        {k: round(v, 3) for k, v in row.items() if isinstance(v, float)})
            results.append(row)
    return {"device": str(device), "threads": threads, "rounds": rounds, "results": results}


def model_summary(model: nn.Module, seq_len: float) -> dict[str, float]:
    """FLOPs (encoder, per sequence) and parameters, for reports."""
    return {"flops": count_flops(model, seq_len), "params": count_params(model),
            "encoder_params": count_params(model, encoder_only=True)}
