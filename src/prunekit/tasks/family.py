"""Task families as registered handlers: what differs between kinds of task, in one place each.

A family (GLUE classification and regression, extractive QA, causal language modelling) owns
reading a split, the calibration sample, training features and their collation, the head and
supervised loss of fine-tuning, evaluation, the distillation-loss kind, and the options only it
takes (SQuAD's ``doc_stride``; a causal LM's perplexity ``window`` and ``stride``). `evaluate`,
`finetune`, `build_calibration_sample`, `build_training_data` and the pipeline ask
``family_of(task)`` (`prunekit.tasks.registry`) instead of branching on ``TaskSpec.kind``, so a new
kind of task is one `TaskFamily` subclass handed to `register_family`.

This module is the protocol only; the built-in families live in their packages
(`prunekit.tasks.glue.family`, `prunekit.tasks.qa.family`, `prunekit.tasks.causal_lm.family`), which
build on it, and the registry that knows them all sits above them (`prunekit.tasks.registry`).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
from torch import nn

from prunekit.core.errors import ConfigError
from prunekit.tasks.calibration import CalibrationSample
from prunekit.tasks.spec import TaskSpec

__all__ = ["LOSS_KINDS", "Collate", "Scorer", "Source", "TaskFamily"]

# TaskSpec.distill_loss -> the loss kind of prunekit.tasks.losses; the only place it is derived.
LOSS_KINDS: dict[str, str] = {"kl": "classification", "mse": "regression", "start_end_kl": "qa",
                              "next_token_kl": "lm"}

Source = str | os.PathLike[str] | Sequence[Mapping[str, Any]]
Collate = Callable[[list[dict[str, Any]]], dict[str, torch.Tensor]]
Scorer = Callable[[nn.Module], dict[str, float]]


class TaskFamily:
    """The handler of one kind of task (``TaskSpec.kind``); stateless, every call takes the spec.

    Class attributes:
        kind: the ``TaskSpec.kind`` served.
        label: how messages name the family ("GLUE", "SQuAD", "causal LM").
        options: the family-only options of evaluation, training and calibration.
        generates: a text generator (calibrated and scored on windows of a token stream, timed on
            decoding too).
        splits_examples: one example may become several features (SQuAD's windows), so reports
            count features as well.
        method_defaults: method options this family's tasks default to (when a method takes them).

    What a family cannot do (a causal LM is not fine-tuned here) fails with a ConfigError.
    """

    kind: str = ""
    label: str = ""
    options: tuple[str, ...] = ()
    generates: bool = False
    splits_examples: bool = False
    method_defaults: Mapping[str, Any] = {}

    def loss_kind(self, spec: TaskSpec) -> str:
        """The distillation-loss kind of the task's head, from its ``distill_loss``."""
        return LOSS_KINDS[spec.distill_loss]

    def options_for(self, spec: TaskSpec, **given: Any) -> dict[str, Any]:
        """The family's own options out of ``given``; any other one set (not None) is a ConfigError."""
        foreign = [name for name, value in given.items() if value is not None and name not in self.options]
        if foreign:
            # Every family class defined, registered or not: the protocol knows no registry.
            owners = sorted({f.label for f in _family_classes(TaskFamily) if set(foreign) & set(f.options)})
            verb = "applies" if len(foreign) == 1 else "apply"
            raise ConfigError(f"{' and '.join(foreign)} {verb} to {' or '.join(owners) or 'no'} tasks only; "
                              f"task {spec.name!r} is a {self.label} task")
        return {name: value for name, value in given.items() if name in self.options}

    def pick_options(self, **given: Any) -> dict[str, Any]:
        """The family's own options out of ``given``, the others dropped (settings shared by all tasks)."""
        return {name: value for name, value in given.items() if name in self.options}

    def resolve_options(self, spec: TaskSpec, max_length: int, **given: Any) -> dict[str, Any]:
        """``options_for``, with the task's defaults filled in for training at ``max_length``."""
        return self.options_for(spec, **given)

    def load_examples(self, spec: TaskSpec, source: Source, split: str) -> list[dict[str, Any]]:
        """One split of the task as example dicts."""
        raise self.unsupported(spec, "reading examples")

    def check_split(self, spec: TaskSpec, data: str | os.PathLike[str], split: str) -> None:
        """Fail now when ``split`` of a local or hub source is missing or unreadable."""
        self.load_examples(spec, data, split)

    def calibration_sample(self, spec: TaskSpec, tokenizer: Any, source: Any, *, num_tokens: int,
                           num_sequences: int | None, seed: int, batch_size: int, max_length: int | None,
                           replace: bool, sort_by_length: bool, **options: Any) -> CalibrationSample:
        """The calibration sample (see `prunekit.tasks.dispatch.build_calibration_sample`)."""
        raise self.unsupported(spec, "calibration samples")

    def sample_size(self, spec: TaskSpec, model: nn.Module, num_tokens: int | None, num_sequences: int | None,
                    calibration_length: int | None = None,
                    defaults: Mapping[str, Any] | None = None) -> dict[str, Any]:
        """The size arguments of `build_calibration_sample` for a pipeline run: the given size, else
        the method's ``defaults``, else 100,000 tokens (``calibration_length`` is for windowed families)."""
        size = {"num_tokens": num_tokens, "num_sequences": num_sequences}
        if num_tokens is None and num_sequences is None:
            size |= dict(defaults or {})
        return {"num_tokens": size["num_tokens"] or 100_000, "num_sequences": size["num_sequences"]}

    def training_features(self, spec: TaskSpec, tokenizer: Any, examples: Sequence[Mapping[str, Any]],
                          max_length: int, **options: Any) -> list[dict[str, Any]]:
        """Training features (with their labels) of ``examples``."""
        raise self.unsupported(spec, "training")

    def collate_fn(self, spec: TaskSpec, pad_token_id: int | None) -> Collate:
        """Pads a list of training features into a batch of tensors."""
        raise self.unsupported(spec, "training")

    def dev_scorer(self, spec: TaskSpec, tokenizer: Any, examples: Sequence[Mapping[str, Any]], max_length: int,
                   device: torch.device | str | None, **options: Any) -> Scorer:
        """A function scoring a model on ``examples`` (the task's metrics, 0-100)."""
        raise self.unsupported(spec, "training")

    def pretrained_model(self, spec: TaskSpec, model_name_or_path: str | os.PathLike[str]) -> nn.Module:
        """A pre-trained model with this task's head, in float32, for fine-tuning."""
        raise self.unsupported(spec, "fine-tuning")

    def training_loss(self, spec: TaskSpec, model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """The supervised loss of fine-tuning on one collated batch (labels included)."""
        raise self.unsupported(spec, "fine-tuning")

    def evaluate(self, model: nn.Module, tokenizer: Any, spec: TaskSpec, source: Any, *, split: str,
                 batch_size: int, max_length: int | None, device: torch.device | str | None,
                 max_examples: int | None, **options: Any) -> dict[str, Any]:
        """The task's metrics of ``model`` on one split (see `prunekit.tasks.evaluate.evaluate`)."""
        raise self.unsupported(spec, "evaluation")

    def unsupported(self, spec: TaskSpec, what: str) -> ConfigError:
        """The error of an operation this family does not have."""
        return ConfigError(f"task {spec.name!r} is a {self.label} task; its family does not support {what}")


def _family_classes(cls: type[TaskFamily]) -> list[type[TaskFamily]]:
    """``cls``'s subclasses, at every depth."""
    return [sub for direct in cls.__subclasses__() for sub in (direct, *_family_classes(direct))]
