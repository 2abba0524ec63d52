"""What a pruning method is given besides the model view and its config: the task data.

The method contract (``prunekit.methods``) is ``method(view, data, config) -> (plan, log)``; ``data``
is a :class:`TaskData`. The pipeline (``prunekit.api``) builds it: a calibration sample for
calibration-based methods, or, for training-based methods (CoFi), the training features, a
collate function and a dev-split scorer from :func:`build_training_data`. Methods never build
datasets or run evaluation themselves; they call what they are handed.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from prunekit.tasks.registry import family_of
from prunekit.tasks.spec import get_task


@dataclass
class TrainingData:
    """What training needs from the task: features, a collate function, a dev scorer."""

    features: list[dict[str, Any]]
    collate: Callable[[list[dict[str, Any]]], dict[str, torch.Tensor]]
    evaluate: Callable[[nn.Module], dict[str, float]]
    main_metric: str
    kind: str  # the distillation-loss kind (prunekit.tasks.losses), from the task's family


@dataclass
class TaskData:
    """A method's task data.

    Attributes:
        kind: the distillation-loss kind, "classification", "regression", "qa" or "lm"
            (``prunekit.tasks.family.family_of(task).loss_kind(task)``).
        sample: the calibration sample (calibration-based methods).
        training: training features and dev scorer (training-based methods).
        prepared: the method's budget-independent state from its ``prepare`` step, reused
            across budgets (None: the method computes it).
        seq_len: the FLOPs sequence length of training-based methods.
        student_init: a model the student starts from instead of the teacher (CoFi).
        checkpoint_dir, resume: where a training run checkpoints, and whether it continues.
        device: where training runs.
    """

    kind: str
    sample: Any = None
    training: TrainingData | None = None
    prepared: Any = None
    seq_len: float | None = None
    student_init: nn.Module | None = None
    checkpoint_dir: str | Path | None = None
    resume: bool = False
    device: torch.device | str | None = None


def build_training_data(task: Any, tokenizer: Any, source: Any, max_length: int | None = None,
                        doc_stride: int | None = None, max_train_samples: int | None = None,
                        max_eval_samples: int | None = None,
                        device: torch.device | str | None = None) -> TrainingData:
    """Training features of the task's train split and a scorer on its dev split, made by the
    task's family (`prunekit.tasks.family`).

    Args:
        source: the task's data (GLUE folder, file or hub name; SQuAD file, folder or a pair of
            example lists ``(train, dev)``).
        max_length, doc_stride: tokens per feature and SQuAD's window overlap (None: the task's).
        max_train_samples, max_eval_samples: first N training / dev examples only.
    """
    spec = get_task(task)
    family = family_of(spec)
    max_length = max_length or spec.max_length
    options = family.resolve_options(spec, max_length, doc_stride=doc_stride)
    train_source, dev_source = source if isinstance(source, tuple) else (source, source)
    train = family.load_examples(spec, train_source, "train")
    dev = family.load_examples(spec, dev_source, "dev")
    if max_train_samples is not None:
        train = train[:max_train_samples]
    if max_eval_samples is not None:
        dev = dev[:max_eval_samples]
    features = family.training_features(spec, tokenizer, train, max_length, **options)
    score = family.dev_scorer(spec, tokenizer, dev, max_length, device, **options)
    return TrainingData(features, family.collate_fn(spec, tokenizer.pad_token_id), score, spec.main_metric,
                        family.loss_kind(spec))
