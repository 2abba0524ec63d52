"""CoFi's hyperparameters and its training schedule, checked before any step is taken."""

from __future__ import annotations

import math
from dataclasses import dataclass

from prunekit.core.errors import ConfigError
from prunekit.core.preflight import check_config_values, check_positive


@dataclass
class CofiConfig:
    """CoFi's hyperparameters; defaults follow the reference recipe for large GLUE tasks (cofi.md §5)
    except where noted."""

    keep_params: float | None = None  # fraction of prunable encoder parameters kept (sparsity = 1 - F)
    keep_flops: float | None = None  # or: fraction of encoder FLOPs kept (expected FLOPs, not in the paper)
    epochs: float = 20.0  # pruning epochs, pre-pruning included
    prepruning_epochs: float = 0.0  # distillation without gates first; 0 as the student starts from the teacher
    warmup_epochs: float = 2.0  # linear warm-up of the target sparsity
    finetune_epochs: float = 20.0  # after surgery
    lr: float = 2e-5  # model weights while pruning, linear decay
    finetune_lr: float = 2e-5  # after surgery, constant
    reg_lr: float = 0.01  # gates (descent) and Lagrange multipliers (ascent)
    batch_size: int = 32
    gradient_accumulation_steps: int = 1
    max_length: int | None = None  # tokens; None -> the task's
    doc_stride: int | None = None  # SQuAD; None -> the task's
    max_grad_norm: float = 1.0  # model weights only (not gates or multipliers)
    distill: str = "layer"  # "layer": prediction + layerwise; "pred": prediction layer only
    temperature: float = 2.0
    distill_pred_weight: float = 0.1
    distill_layer_weight: float = 0.9
    layer_mapping: str = "free"  # "free" (argmin per teacher layer, v3) or "ordered" (top-down, v4)
    teacher_layers: tuple[int, ...] | None = None  # 1-based; default the quarter points, e.g. 3,6,9,12
    prune_hidden: bool = True
    prune_layers: bool = True  # gates on whole attention and FFN sublayers
    init_log_alpha: float = 10.0
    neuron_init_log_alpha: float = 0.0  # the reference's droprate_init 0.5 (cofi.md §2)
    freeze_embeddings: bool = True  # embeddings are never trained in the reference
    eval_steps: int = 500  # evaluate (deterministic gates) every N optimiser steps; 0 = only at the end
    sparsity_epsilon: float = 0.01  # best-state selection starts once ŝ >= target - epsilon
    seq_len: float | None = None  # FLOPs length; None -> the task's
    mixed_precision: str = "no"  # "no", "fp16" or "bf16" (GPU)
    save_steps: int = 0  # checkpoint every N optimiser steps (0: never); needs checkpoint_dir
    max_steps: int | None = None  # stop after N optimiser steps in all (for short runs and tests)
    max_train_samples: int | None = None  # first N training examples only
    max_eval_samples: int | None = None  # first N dev examples in the periodic evaluation
    seed: int = 0

    def __post_init__(self) -> None:
        check_config_values(self)  # types, and finite numbers
        if (self.keep_params is None) == (self.keep_flops is None):
            raise ConfigError("CoFi needs one budget: keep_params (e.g. 0.1 for 90% sparsity) or keep_flops")
        for name in ("keep_params", "keep_flops"):
            value = getattr(self, name)
            if value is not None and not 0.0 < value < 1.0:
                raise ConfigError(f"{name} must be in (0, 1), the fraction kept; got {value}")
        for name in ("epochs", "finetune_epochs"):
            if getattr(self, name) < 0:
                raise ConfigError(f"{name} must be >= 0, got {getattr(self, name)}")
        if self.epochs <= self.prepruning_epochs:
            raise ConfigError(f"epochs ({self.epochs}) must exceed prepruning_epochs ({self.prepruning_epochs}): "
                              "the pruning epochs include the pre-pruning ones")
        if self.warmup_epochs < 0 or self.prepruning_epochs < 0:
            raise ConfigError("warmup_epochs and prepruning_epochs must be >= 0")
        if self.distill not in ("layer", "pred"):
            raise ConfigError(f"distill must be 'layer' or 'pred', got {self.distill!r}")
        if self.layer_mapping not in ("free", "ordered"):
            raise ConfigError(f"layer_mapping must be 'free' or 'ordered', got {self.layer_mapping!r}")
        if self.mixed_precision not in ("no", "fp16", "bf16"):
            raise ConfigError(f"mixed_precision must be 'no', 'fp16' or 'bf16', got {self.mixed_precision!r}")
        for name in ("lr", "finetune_lr", "reg_lr", "temperature"):
            if not getattr(self, name) > 0:
                raise ConfigError(f"{name} must be positive, got {getattr(self, name)}")
        if self.batch_size < 1 or self.gradient_accumulation_steps < 1:
            raise ConfigError("batch_size and gradient_accumulation_steps must be >= 1")
        if isinstance(self.teacher_layers, list):
            self.teacher_layers = tuple(self.teacher_layers)

    @property
    def target_kind(self) -> str:
        return "params" if self.keep_params is not None else "flops"

    @property
    def target_sparsity(self) -> float:
        return 1.0 - (self.keep_params if self.keep_params is not None else self.keep_flops)


@dataclass(frozen=True)
class CofiSchedule:
    """The optimiser steps of one CoFi stage, as training counts them."""

    batches_per_epoch: int
    steps_per_epoch: int
    total: int
    prepruning: int  # steps of distillation before the gates act (0 when fine-tuning)
    warmup: int  # steps over which the target sparsity ramps up to its final value


def cofi_schedule(config: CofiConfig, num_features: int, num_processes: int = 1,
                  stage: str = "prune") -> CofiSchedule:
    """The steps of the pruning (``stage`` "prune") or fine-tuning stage for ``num_features``
    training examples shared out over ``num_processes``."""
    batches = math.ceil(num_features / (config.batch_size * num_processes))
    per_epoch = max(1, batches // config.gradient_accumulation_steps)
    pruning = stage == "prune"
    epochs = config.epochs if pruning else config.finetune_epochs
    total = max(1, int(round(epochs * per_epoch)))
    if config.max_steps is not None:
        total = min(total, config.max_steps)
    return CofiSchedule(batches_per_epoch=batches, steps_per_epoch=per_epoch, total=total,
                        prepruning=int(round(config.prepruning_epochs * per_epoch)) if pruning else 0,
                        warmup=max(1, int(round(config.warmup_epochs * per_epoch))))


def check_cofi_schedule(config: CofiConfig, num_features: int, num_processes: int = 1) -> None:
    """Refuse a CoFi schedule whose target sparsity is never reached: the warm-up must end, with
    at least one step at the full target, before the pruning stage does."""
    check_positive("max_steps", config.max_steps)
    steps = cofi_schedule(config, num_features, num_processes)
    pruning = steps.total - steps.prepruning
    if steps.warmup >= pruning:
        budget = f"keep_{config.target_kind} {1.0 - config.target_sparsity:g}"
        raise ConfigError(
            f"CoFi's schedule cannot reach its target {budget}: the sparsity warm-up takes {steps.warmup} "
            f"steps (warmup_epochs {config.warmup_epochs:g} x {steps.steps_per_epoch} steps per epoch) but the "
            f"pruning stage has only {pruning} after pre-pruning; raise --epochs (or max_steps), or lower "
            "--set warmup_epochs")
