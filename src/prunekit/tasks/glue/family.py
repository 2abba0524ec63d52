"""GLUE classification and regression as a task family (`prunekit.tasks.family.TaskFamily`).

Examples come from `prunekit.tasks.glue.data` (or are passed in as dicts), features are the
tokenized sequences, evaluation is `predict` plus `prunekit.tasks.glue.metrics.compute_metrics`.
`predict` works with any Hugging Face `*ForSequenceClassification` model, pruned or not: class
ids are the argmax of the logits, regression scores are the squeezed single logit.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from prunekit.core.errors import ConfigError, ModelError
from prunekit.tasks.calibration import CalibrationSample
from prunekit.tasks.family import Collate, Scorer, Source, TaskFamily
from prunekit.tasks.glue import data as glue
from prunekit.tasks.glue.metrics import compute_metrics
from prunekit.tasks.running import accepted_inputs, model_device
from prunekit.tasks.spec import TaskSpec, get_task

logger = logging.getLogger(__name__)

__all__ = ["GlueFamily", "predict"]


class GlueFamily(TaskFamily):
    """Sentence (pair) classification and regression: GLUE and tasks laid out like it."""

    kind = "glue"
    label = "GLUE"

    def load_examples(self, spec: TaskSpec, source: Source, split: str) -> list[dict[str, Any]]:
        if not isinstance(source, str | os.PathLike):
            return [dict(example) for example in source]  # examples passed in directly
        return glue.load_examples(spec, source, split)

    def calibration_sample(self, spec: TaskSpec, tokenizer: Any, source: Any, *, num_tokens: int,
                           num_sequences: int | None, seed: int, batch_size: int, max_length: int | None,
                           replace: bool, sort_by_length: bool, **options: Any) -> CalibrationSample:
        if not isinstance(source, str | os.PathLike):
            raise ConfigError(f"the calibration data of GLUE task {spec.name!r} must be a folder, a file or a hub name")
        return glue.build_calibration_sample(
            spec, tokenizer, source, num_tokens=num_tokens, num_sequences=num_sequences, seed=seed,
            batch_size=batch_size, max_length=max_length, replace=replace, sort_by_length=sort_by_length,
        )  # fmt: skip

    def training_features(self, spec: TaskSpec, tokenizer: Any, examples: Sequence[Mapping[str, Any]],
                          max_length: int, **options: Any) -> list[dict[str, Any]]:
        return glue.tokenize_examples(spec, tokenizer, examples, max_length=max_length)

    def collate_fn(self, spec: TaskSpec, pad_token_id: int | None) -> Collate:
        return lambda features: glue.collate(features, pad_token_id, regression=spec.is_regression)

    def dev_scorer(self, spec: TaskSpec, tokenizer: Any, examples: Sequence[Mapping[str, Any]], max_length: int,
                   device: torch.device | str | None, **options: Any) -> Scorer:
        # Tokenized once, before any training: the scorer may run after every stage.
        features = glue.tokenize_examples(spec, tokenizer, examples, max_length=max_length)
        labels = [f["label"] for f in features]
        pad_id = tokenizer.pad_token_id

        def score(model: nn.Module) -> dict[str, float]:
            return compute_metrics(spec, predict(model, spec, features, pad_id, device=device), labels)

        return score

    def pretrained_model(self, spec: TaskSpec, model_name_or_path: str | os.PathLike[str]) -> nn.Module:
        from transformers import AutoModelForSequenceClassification  # only fine-tuning needs the Auto classes

        return AutoModelForSequenceClassification.from_pretrained(
            model_name_or_path,
            num_labels=spec.num_labels,
            problem_type=spec.problem_type,
            id2label=spec.id2label,
            label2id=spec.label2id,
            dtype=torch.float32,
            # A checkpoint fine-tuned on another task (e.g. MNLI -> RTE, 3 -> 2 labels) gets a fresh
            # head instead of a size-mismatch error; transformers logs which tensors were re-initialised.
            ignore_mismatched_sizes=True,
        )

    def training_loss(self, spec: TaskSpec, model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        labels = batch.pop("labels")  # (B,)
        logits = model(**batch).logits  # (B, C) or (B, 1)
        return _task_loss(spec, logits, labels)

    def evaluate(self, model: nn.Module, tokenizer: Any, spec: TaskSpec, source: Any, *, split: str,
                 batch_size: int, max_length: int | None, device: torch.device | str | None,
                 max_examples: int | None, **options: Any) -> dict[str, Any]:
        examples = self.load_examples(spec, source, split)
        if max_examples is not None:
            examples = examples[:max_examples]
        features = glue.tokenize_examples(spec, tokenizer, examples, max_length=max_length)
        predictions = predict(model, spec, features, tokenizer.pad_token_id, batch_size=batch_size, device=device)
        results: dict[str, Any] = compute_metrics(spec, predictions, [f["label"] for f in features])
        results["num_examples"] = len(features)
        logger.info(
            "%s %s: %s",
            spec.name,
            split,
            ", ".join(f"{k} {v:.2f}" if isinstance(v, float) else f"{k} {v}" for k, v in results.items()),
        )
        return results


def _task_loss(spec: TaskSpec, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Cross-entropy, or MSE on the squeezed single logit with matching (B,) shapes.

    Computed here rather than by the model so the shapes are explicit (the (B, 1) vs (B,)
    broadcast of kprune_kwon.md P3 cannot happen).
    """
    if spec.is_regression:
        return F.mse_loss(logits.reshape(-1).float(), labels.float())  # (B,) vs (B,)
    return F.cross_entropy(logits.float(), labels)


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
    accepted = accepted_inputs(model)
    home = model_device(model)
    target = torch.device(device) if device is not None else home
    was_training = model.training
    outputs: list[torch.Tensor] = []
    bar = tqdm(total=len(features), desc=f"eval {spec.name}", unit="ex", leave=False)
    try:
        if target != home:
            model.to(target)
        model.eval()
        with torch.inference_mode():
            for batch in glue.iter_feature_batches(features, batch_size, pad_token_id, regression=spec.is_regression):
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
            f"evaluate a model fine-tuned on {spec.name} (see prunekit.tasks.finetune) or pick the matching task"
        )
