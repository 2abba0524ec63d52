"""Evaluation of sequence-classification models on a GLUE task's dev (or train) split.

This module owns `evaluate` (read, tokenize, predict, score) and `predict` (the model loop on
pre-tokenized features, reusable when one split is scored many times, e.g. after each pruning
stage). It works with any Hugging Face `*ForSequenceClassification` model, pruned or not: class
ids are the argmax of the logits, regression scores are the squeezed single logit.

The model is run in eval mode under `torch.inference_mode`; its train/eval mode and device are
restored in `finally` (style.md §10).
"""

from __future__ import annotations

import inspect
import logging
import os
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from prunekit.data.glue import iter_feature_batches, load_examples, tokenize_examples
from prunekit.errors import ConfigError, ModelError
from prunekit.metrics.glue import compute_metrics
from prunekit.tasks import TaskSpec, get_task

logger = logging.getLogger(__name__)

__all__ = ["evaluate", "predict"]

_MODEL_INPUTS = ("input_ids", "attention_mask", "token_type_ids")


def evaluate(
    model: torch.nn.Module,
    tokenizer: Any,
    task: TaskSpec | str,
    source: str | os.PathLike[str],
    split: str = "dev",
    batch_size: int = 64,
    max_length: int | None = None,
    device: torch.device | str | None = None,
    max_examples: int | None = None,
) -> dict[str, float]:
    """Score `model` on one split of a GLUE task.

    Args:
        model: a `*ForSequenceClassification` model whose head matches the task.
        tokenizer: the model's tokenizer.
        task: TaskSpec or task name.
        source: data source, as for `prunekit.data.load_examples`.
        split: "dev" or "train".
        batch_size: examples per forward pass (padded to the batch's longest).
        max_length: truncation length; default the task's.
        device: where to run; default the model's device. The model is moved back afterwards.
        max_examples: score only the first N examples (quick checks).

    Returns:
        The task's metrics on a 0-100 scale plus "num_examples", e.g.
        {"accuracy": 88.65, "num_examples": 872}.
    """
    spec = get_task(task)
    if max_examples is not None and max_examples < 1:
        raise ConfigError(f"max_examples must be >= 1 (or None for the whole split), got {max_examples}")
    examples = load_examples(spec, source, split)
    if max_examples is not None:
        examples = examples[:max_examples]
    features = tokenize_examples(spec, tokenizer, examples, max_length=max_length)
    predictions = predict(model, spec, features, tokenizer.pad_token_id, batch_size=batch_size, device=device)
    results: dict[str, float] = compute_metrics(spec, predictions, [f["label"] for f in features])
    results["num_examples"] = len(features)
    logger.info(
        "%s %s: %s",
        spec.name,
        split,
        ", ".join(f"{k} {v:.2f}" if isinstance(v, float) else f"{k} {v}" for k, v in results.items()),
    )
    return results


def predict(
    model: torch.nn.Module,
    task: TaskSpec | str,
    features: Sequence[dict[str, Any]],
    pad_token_id: int | None,
    batch_size: int = 64,
    device: torch.device | str | None = None,
) -> np.ndarray:
    """Run `model` over tokenized features, in order.

    Returns:
        (N,) int64 class ids for classification, or (N,) float32 scores for regression.
    """
    spec = get_task(task)
    if batch_size < 1:
        raise ConfigError(f"batch_size must be >= 1, got {batch_size}")
    _check_head(model, spec)
    if not features:
        return np.zeros(0, dtype=np.float32 if spec.is_regression else np.int64)
    accepted = _accepted_inputs(model)
    home = _model_device(model)
    target = torch.device(device) if device is not None else home
    was_training = model.training
    outputs: list[torch.Tensor] = []
    bar = tqdm(total=len(features), desc=f"eval {spec.name}", unit="ex", leave=False)
    try:
        if target != home:
            model.to(target)
        model.eval()
        with torch.inference_mode():
            for batch in iter_feature_batches(features, batch_size, pad_token_id, regression=spec.is_regression):
                inputs = {k: v.to(target) for k, v in batch.items() if k in accepted}
                output = model(**inputs)
                logits = output.logits if hasattr(output, "logits") else output[0]  # (B, C)
                if spec.is_regression:
                    outputs.append(logits.reshape(-1).float().cpu())  # (B, 1) -> (B,)
                else:
                    outputs.append(logits.argmax(dim=-1).cpu())  # (B,)
                bar.update(batch["input_ids"].shape[0])
    finally:
        bar.close()
        model.train(was_training)
        if target != home:
            model.to(home)
    return torch.cat(outputs).numpy()


def _check_head(model: torch.nn.Module, spec: TaskSpec) -> None:
    config = getattr(model, "config", None)
    num_labels = getattr(config, "num_labels", None)
    if num_labels is not None and num_labels != spec.num_labels:
        raise ModelError(
            f"the model's head has {num_labels} label(s) but task {spec.name!r} needs {spec.num_labels}; "
            f"evaluate a model fine-tuned on {spec.name} (see prunekit.finetune) or pick the matching task"
        )


def _accepted_inputs(model: torch.nn.Module) -> set[str]:
    """Which of input_ids / attention_mask / token_type_ids the model's forward takes by name.

    DistilBERT, for one, has no token_type_ids; passing them would fail.
    """
    parameters = inspect.signature(model.forward).parameters
    named = {name for name, p in parameters.items() if p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)}
    accepted = {name for name in _MODEL_INPUTS if name in named}
    return accepted or set(_MODEL_INPUTS)


def _model_device(model: torch.nn.Module) -> torch.device:
    parameter = next(model.parameters(), None)
    return parameter.device if parameter is not None else torch.device("cpu")
