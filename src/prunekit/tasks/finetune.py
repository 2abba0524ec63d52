"""Fine-tuning a pre-trained encoder on a GLUE or SQuAD task, to make the teacher that pruning
starts from.

This module owns `FinetuneConfig` and `finetune`: a plain PyTorch loop (no Trainer) with AdamW,
linear warm-up then linear decay to zero, gradient clipping, seeded shuffling through a
`torch.Generator` and dynamic padding. It is the recipe of the reference teachers in
`shared/models/*/README.md`. At the end it scores the dev split and writes a standard Hugging
Face folder (safetensors weights, config with id2label, tokenizer) plus `finetune_report.json`,
atomically: everything goes into a temporary folder next to `out_dir`, which is then renamed.

The task's family (`prunekit.tasks.family`) supplies the head, the training features, their
collation, the supervised loss and the dev scorer: SQuAD tasks train a `*ForQuestionAnswering`
head on features of the training questions (384 tokens, stride 128, question first) with the mean
of the start and end cross-entropies, and report exact match and F1 on the dev questions. Train
and dev examples may be passed in directly, e.g. the two parts of
`prunekit.tasks.qa.split_by_article`.

Global RNG state is not touched: the run seeds inside `torch.random.fork_rng`, which restores the
caller's generators afterwards (style.md §10).
"""

from __future__ import annotations

import dataclasses
import logging
import math
import os
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from prunekit.core.errors import ConfigError
from prunekit.core.preflight import check_seq_len, json_text
from prunekit.core.runtime import library_versions, resolve_device
from prunekit.io.folders import atomic_output_dir, check_output_dir, load_tokenizer
from prunekit.tasks.family import Collate, TaskFamily
from prunekit.tasks.registry import family_of
from prunekit.tasks.spec import TaskSpec, get_task

logger = logging.getLogger(__name__)

__all__ = ["FinetuneConfig", "finetune"]

REPORT_NAME = "finetune_report.json"


@dataclass(frozen=True)
class FinetuneConfig:
    """Hyperparameters of `finetune`; defaults are the reference teachers' recipe."""

    epochs: int = 3
    lr: float = 5e-5
    batch_size: int = 32  # sequences per optimiser step
    max_length: int | None = None  # tokens; None -> the task's max_length
    doc_stride: int | None = None  # SQuAD: tokens shared by consecutive windows; None -> the task's
    warmup_ratio: float = 0.06  # fraction of all steps with linearly rising lr
    weight_decay: float = 0.0  # AdamW decoupled decay; biases and LayerNorm weights never decay
    seed: int = 0
    max_grad_norm: float = 1.0  # gradient clipping norm; 0 turns clipping off
    max_train_samples: int | None = None  # use only the first N training examples (SQuAD: questions)
    device: str | None = None  # None -> "cuda" when available, else "cpu"

    def __post_init__(self) -> None:
        def bad(message: str) -> ConfigError:
            return ConfigError(f"FinetuneConfig: {message}")

        if not isinstance(self.epochs, int) or self.epochs < 1:
            raise bad(f"epochs must be a whole number >= 1, got {self.epochs!r}")
        if not (self.lr > 0 and math.isfinite(self.lr)):
            raise bad(f"lr must be a positive learning rate such as 5e-5, got {self.lr!r}")
        if self.batch_size < 1:
            raise bad(f"batch_size must be >= 1, got {self.batch_size!r}")
        if self.max_length is not None and self.max_length < 1:
            raise bad(f"max_length must be a positive number of tokens, or None for the task's, got {self.max_length!r}")
        if self.doc_stride is not None and (
            self.doc_stride < 0 or (self.max_length is not None and self.doc_stride >= self.max_length)
        ):
            raise bad(f"doc_stride must be >= 0 and below max_length, got {self.doc_stride!r}")
        if not 0.0 <= self.warmup_ratio < 1.0:
            raise bad(f"warmup_ratio is a fraction of the steps in [0, 1), got {self.warmup_ratio!r}")
        if self.weight_decay < 0:
            raise bad(f"weight_decay must be >= 0, got {self.weight_decay!r}")
        if self.max_grad_norm < 0:
            raise bad(f"max_grad_norm must be >= 0 (0 disables clipping), got {self.max_grad_norm!r}")
        if self.max_train_samples is not None and self.max_train_samples < 1:
            raise bad(f"max_train_samples must be >= 1, or None for the whole split, got {self.max_train_samples!r}")
        if isinstance(self.device, torch.device):
            # Stored as text so the config stays JSON-serializable in the report.
            object.__setattr__(self, "device", str(self.device))
        if self.device is not None:
            try:
                torch.device(self.device)
            except (RuntimeError, TypeError) as err:
                raise bad(f"device {self.device!r} is not a torch device; use e.g. 'cpu' or 'cuda:0'") from err

    def resolved_device(self) -> torch.device:
        """The device to train on."""
        return resolve_device(self.device)


def finetune(
    model_name_or_path: str | os.PathLike[str],
    task: TaskSpec | str,
    source: str | os.PathLike[str] | None,
    out_dir: str | os.PathLike[str],
    config: FinetuneConfig | None = None,
    *,
    overwrite: bool = False,
    train_examples: Sequence[Mapping[str, Any]] | None = None,
    dev_examples: Sequence[Mapping[str, Any]] | None = None,
    tokenizer: str | os.PathLike[str] | None = None,
) -> Path:
    """Fine-tune a pre-trained model on a GLUE or SQuAD task and save it.

    Args:
        model_name_or_path: a model folder or hub id for `AutoModelForSequenceClassification`
            (SQuAD: `AutoModelForQuestionAnswering`); the tokenizer is loaded from the same place.
        task: TaskSpec or task name.
        source: data source, as for `prunekit.tasks.load_examples` (train and dev are read); may be
            None when both example lists are given.
        out_dir: output folder; created, or replaced when `overwrite=True`.
        config: hyperparameters; default `FinetuneConfig()`.
        overwrite: allow replacing an existing non-empty `out_dir`.
        train_examples, dev_examples: example dicts to use instead of the source's train / dev
            split (SQuAD: as `prunekit.tasks.qa.load_squad` returns them).
        tokenizer: a tokenizer folder or hub id, when the model's own folder has none.

    Returns:
        The output folder, holding the model, its tokenizer and `finetune_report.json`.
    """
    wall_start = time.perf_counter()
    spec = get_task(task)
    family = family_of(spec)
    cfg = config if config is not None else FinetuneConfig()
    out = Path(out_dir).expanduser()
    inputs = (model_name_or_path, source, tokenizer)
    check_output_dir(out, overwrite, inputs)
    device = cfg.resolved_device()
    max_length = cfg.max_length or spec.max_length
    options = family.resolve_options(spec, max_length, doc_stride=cfg.doc_stride)  # e.g. SQuAD's doc_stride
    if source is None and (train_examples is None or dev_examples is None):
        raise ConfigError("no data given: pass a data source, or both train_examples and dev_examples")

    # Read both splits before any training, so a missing dev file fails in seconds, not hours.
    train = family.load_examples(spec, source if train_examples is None else train_examples, "train")
    if cfg.max_train_samples is not None:
        train = train[: cfg.max_train_samples]
    dev = family.load_examples(spec, source if dev_examples is None else dev_examples, "dev")

    tokenizer = load_tokenizer(tokenizer or model_name_or_path)
    train_features = family.training_features(spec, tokenizer, train, max_length, **options)
    score = family.dev_scorer(spec, tokenizer, dev, max_length, device, **options)
    batch_loss = _batch_loss(family, spec, family.collate_fn(spec, tokenizer.pad_token_id), device)

    started = time.perf_counter()
    fork_devices = [device.index or 0] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=fork_devices):
        torch.manual_seed(cfg.seed)  # the new head's initialisation and dropout depend on it
        model = family.pretrained_model(spec, model_name_or_path)
        check_seq_len(model.config, max_length, "max_length")
        model.to(device)
        train_stats = _train(model, spec, train_features, cfg, device, batch_loss)
    train_time = time.perf_counter() - started

    dev_metrics = score(model)
    dev_metrics.pop("num_examples", None)
    logger.info("%s dev after fine-tuning: %s", spec.name, ", ".join(f"{k} {v:.2f}" for k, v in dev_metrics.items()))

    report = {
        "task": spec.name,
        "model_name_or_path": str(model_name_or_path),
        "source": str(source) if source is not None else None,
        "examples_passed_in": {"train": train_examples is not None, "dev": dev_examples is not None},
        "config": dataclasses.asdict(cfg),
        "resolved": {"max_length": max_length, "device": str(device)} | options,
        "num_train_examples": len(train),
        "num_dev_examples": len(dev),
        **({"num_train_features": len(train_features)} if family.splits_examples else {}),
        **train_stats,
        "metrics": dev_metrics,  # dev split, 0-100 scale
        "train_time_s": round(train_time, 3),
        "wall_time_s": round(time.perf_counter() - wall_start, 3),  # loading, training and evaluation
        "created_utc": datetime.now(UTC).isoformat(timespec="seconds"),
        "versions": library_versions(),
    }
    with atomic_output_dir(out, overwrite, inputs) as staging:
        model.save_pretrained(staging)  # safetensors is the default format
        tokenizer.save_pretrained(staging)
        (staging / REPORT_NAME).write_text(json_text(report) + "\n")  # strict JSON: a NaN metric is null
    logger.info("saved the fine-tuned %s model to %s", spec.name, out)
    return out


BatchLoss = Callable[[torch.nn.Module, list[dict[str, Any]]], torch.Tensor]


def _batch_loss(family: TaskFamily, spec: TaskSpec, collate: Collate, device: torch.device) -> BatchLoss:
    def loss(model: torch.nn.Module, features: list[dict[str, Any]]) -> torch.Tensor:
        batch = {k: v.to(device) for k, v in collate(features).items()}
        return family.training_loss(spec, model, batch)

    return loss


def _train(
    model: torch.nn.Module,
    spec: TaskSpec,
    features: list[dict[str, Any]],
    cfg: FinetuneConfig,
    device: torch.device,
    batch_loss: BatchLoss,
) -> dict[str, Any]:
    """The training loop; returns step count and losses for the report."""
    n = len(features)
    steps_per_epoch = math.ceil(n / cfg.batch_size)
    total_steps = steps_per_epoch * cfg.epochs
    warmup_steps = math.ceil(cfg.warmup_ratio * total_steps)
    optimizer = torch.optim.AdamW(_parameter_groups(model, cfg.weight_decay), lr=cfg.lr)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: _linear_schedule(step, warmup_steps, total_steps))
    generator = torch.Generator().manual_seed(cfg.seed)  # shuffling, independent of dropout's RNG
    logger.info(
        "fine-tuning %s on %d training features: %d epoch(s), %d steps (%d warm-up), batch %d, lr %g, device %s",
        spec.name, n, cfg.epochs, total_steps, warmup_steps, cfg.batch_size, cfg.lr, device,
    )

    model.train()
    step = 0
    epoch_losses: list[float] = []
    with tqdm(total=total_steps, desc=f"finetune {spec.name}", unit="step") as bar:
        for epoch in range(cfg.epochs):
            order = torch.randperm(n, generator=generator).tolist()
            loss_sum = 0.0
            for start in range(0, n, cfg.batch_size):
                loss = batch_loss(model, [features[i] for i in order[start : start + cfg.batch_size]])
                loss.backward()
                if cfg.max_grad_norm > 0:
                    torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.max_grad_norm)
                optimizer.step()
                scheduler.step()
                optimizer.zero_grad(set_to_none=True)
                step += 1
                loss_sum += loss.item()
                bar.update(1)
                bar.set_postfix(epoch=epoch + 1, loss=f"{loss.item():.4f}")
            epoch_losses.append(loss_sum / steps_per_epoch)
            logger.info("epoch %d/%d: mean training loss %.4f", epoch + 1, cfg.epochs, epoch_losses[-1])
    model.eval()
    return {"train_steps": step, "warmup_steps": warmup_steps, "epoch_mean_losses": epoch_losses}


def _linear_schedule(step: int, warmup_steps: int, total_steps: int) -> float:
    """lr multiplier: linear from 0 to 1 over the warm-up, then linear down to 0 at the end.

    Same shape as transformers' `get_linear_schedule_with_warmup`, so the first step runs at lr 0
    when there is a warm-up.
    """
    if step < warmup_steps:
        return step / warmup_steps
    return max(0.0, (total_steps - step) / max(1, total_steps - warmup_steps))


def _parameter_groups(model: torch.nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """Decay matrices only: decaying biases and LayerNorm scales is the common BERT mistake."""
    decay, no_decay = [], []
    for parameter in model.parameters():
        if parameter.requires_grad:
            (decay if parameter.ndim >= 2 else no_decay).append(parameter)
    return [
        {"params": decay, "weight_decay": weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]
