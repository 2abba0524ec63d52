"""Latency measurement with ``torch.utils.benchmark`` (ecosystem.md §4).

Timer warms up, synchronises CUDA, and ``blocked_autorange`` gives repeated measurements whose
median we report. CPU threads are pinned explicitly (the Timer's default is 1 thread). When a
baseline is given, the two models are measured alternately, round by round, so machine noise hits
both alike, and the speedup is the ratio of the medians.

Causal LMs also get :func:`measure_generation`: the prefill latency of a prompt and the decode
speed (tokens per second) of greedy generation with the key/value cache, against the original.
"""

from __future__ import annotations

import logging
import statistics
import time
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn
from torch.utils import benchmark as tbench

from prunekit.core.accounting import count_flops, count_params
from prunekit.core.errors import ConfigError
from prunekit.families import pruning_view

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
    from prunekit.core.preflight import check_positive

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


def _generation_once(model: nn.Module, prompt: torch.Tensor, new_tokens: int, device: torch.device
                     ) -> tuple[float, float]:
    """(prefill ms, decode tokens/s) of one greedy generation with the KV cache: the prefill is
    the forward over the prompt that fills the cache and gives the first token; decoding is the
    remaining ``new_tokens - 1`` steps of one token each, fed from the cache."""
    from transformers import DynamicCache

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    with torch.inference_mode():
        cache = DynamicCache(config=model.config)
        sync()
        start = time.perf_counter()
        out = model(input_ids=prompt, cache=cache, use_cache=True)  # transformers v5: `cache`
        token = out.logits[:, -1].argmax(-1, keepdim=True)  # (B, 1)
        sync()
        prefill = time.perf_counter() - start
        start = time.perf_counter()
        for _ in range(new_tokens - 1):
            out = model(input_ids=token, cache=cache, use_cache=True)  # the cache grows in place
            token = out.logits[:, -1].argmax(-1, keepdim=True)
        sync()
        decode = time.perf_counter() - start
    steps = max(new_tokens - 1, 1)
    return prefill * 1e3, prompt.shape[0] * steps / decode if decode > 0 else float("inf")


def measure_generation(
    model: nn.Module,
    baseline: nn.Module | None = None,
    batch_size: int = 1,
    prompt_len: int = 128,
    new_tokens: int = 32,
    device: str | torch.device | None = None,
    threads: int | None = None,
    repeats: int = 5,
    seed: int = 0,
) -> dict[str, Any]:
    """Prefill latency and decode speed of a causal LM (and ``baseline``), greedy with the KV cache.

    Each repeat runs one generation of ``new_tokens`` tokens from a random prompt of
    ``prompt_len`` tokens per model, alternating the models so machine noise hits both alike;
    after one untimed warm-up each. Reported: the median prefill ms and the median decode
    tokens/s (batch x steps / decode time, the first token belonging to the prefill), with each
    repeat's values, and the baseline's with the speedups (prefill: baseline ms / ms; decode:
    tokens/s / baseline tokens/s).
    """
    if new_tokens < 2 or prompt_len < 1 or batch_size < 1 or repeats < 1:
        raise ConfigError("measure_generation needs new_tokens >= 2, prompt_len >= 1, batch_size >= 1, repeats >= 1")
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    threads = threads or torch.get_num_threads()
    previous_threads = torch.get_num_threads()
    torch.set_num_threads(threads)
    models = {"model": model} | ({"baseline": baseline} if baseline is not None else {})
    for m in models.values():
        m.to(device).eval()
    prompt = _inputs(model, batch_size, prompt_len, device, seed)["input_ids"]
    times: dict[str, dict[str, list[float]]] = {name: {"prefill_ms": [], "decode_tokens_per_s": []} for name in models}
    try:
        for m in models.values():
            _generation_once(m, prompt, new_tokens, device)  # warm-up
        for _ in range(repeats):
            for name, m in models.items():
                prefill, speed = _generation_once(m, prompt, new_tokens, device)
                times[name]["prefill_ms"].append(prefill)
                times[name]["decode_tokens_per_s"].append(speed)
    finally:
        torch.set_num_threads(previous_threads)
    row: dict[str, Any] = {
        "batch_size": batch_size, "prompt_len": prompt_len, "new_tokens": new_tokens,
        "prefill_ms": statistics.median(times["model"]["prefill_ms"]),
        "decode_tokens_per_s": statistics.median(times["model"]["decode_tokens_per_s"]),
        "prefill_ms_repeats": times["model"]["prefill_ms"],
        "decode_tokens_per_s_repeats": times["model"]["decode_tokens_per_s"],
    }
    if baseline is not None:
        base = times["baseline"]
        row |= {
            "baseline_prefill_ms": statistics.median(base["prefill_ms"]),
            "baseline_decode_tokens_per_s": statistics.median(base["decode_tokens_per_s"]),
            "baseline_prefill_ms_repeats": base["prefill_ms"],
            "baseline_decode_tokens_per_s_repeats": base["decode_tokens_per_s"],
        }
        row["prefill_speedup"] = row["baseline_prefill_ms"] / row["prefill_ms"]
        row["decode_speedup"] = row["decode_tokens_per_s"] / row["baseline_decode_tokens_per_s"]
    logger.info("generation batch %d prompt %d new %d: %s", batch_size, prompt_len, new_tokens,
                {k: round(v, 3) for k, v in row.items() if isinstance(v, float)})
    return {"device": str(device), "threads": threads, "repeats": repeats, "mode": "greedy decode with KV cache",
            "results": [row]}


def model_summary(model: nn.Module, seq_len: float) -> dict[str, float]:
    """FLOPs (encoder, per sequence) and parameters, for reports."""
    view = pruning_view(model)  # a caller's model is never changed
    return {"flops": count_flops(view, seq_len), "params": count_params(view),
            "encoder_params": count_params(view, encoder_only=True)}
