"""CoFi's training loop on Hugging Face Accelerate (cofi.md §3-§5): one function for both stages.

Pruning: z ~ HardConcrete(log α) per micro-batch, L = L_distil + λ₁ (ŝ − t) + λ₂ (ŝ − t)², descent
on the weights and gates, ascent on λ, log α clamped after each step. Fine-tuning: the same
distillation loss on the pruned model, no gates. Either stage evaluates every ``eval_steps`` and
ends on its best state (pruning: once the expected sparsity is within ε of the target).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from prunekit.methods.cofi.checkpoint import (
    RunState,
    keep_best,
    load_training_state,
    restore_best,
    save_checkpoint,
)
from prunekit.methods.cofi.config import CofiConfig, cofi_schedule
from prunekit.methods.cofi.distill import distillation_loss
from prunekit.methods.cofi.size import SizeModel
from prunekit.methods.cofi.student import CofiStudent
from prunekit.tasks.task_data import TrainingData

logger = logging.getLogger(__name__)


def target_sparsity_at(target: float, step: int, prepruning: int, warmup: int) -> float:
    """t = t_final · min(1, (s − S_pre) / W): the target ramps up linearly once the gates act."""
    return target * min(1.0, (step - prepruning) / warmup)


def add_lagrangian(loss: torch.Tensor, s_hat: torch.Tensor, t: float, lambdas: torch.Tensor) -> torch.Tensor:
    """L + λ₁ (ŝ − t) + λ₂ (ŝ − t)² (cofi.md §3)."""
    gap = s_hat - t
    return loss + lambdas[0] * gap + lambdas[1] * gap * gap


def train_stage(accelerator: Any, wrapper: CofiStudent, teacher: nn.Module, data: TrainingData,
                config: CofiConfig, run: RunState, sizer: SizeModel | None, teacher_layers: Sequence[int],
                checkpoint_dir: str | Path | None, resume: bool) -> None:
    """One training stage: pruning (``sizer`` given: gates + Lagrangian) or fine-tuning."""
    from torch.utils.data import DataLoader

    pruning = sizer is not None
    steps = cofi_schedule(config, len(data.features), accelerator.num_processes,
                          stage="prune" if pruning else "finetune")
    total, pre_steps = steps.total, steps.prepruning
    target = config.target_sparsity

    params = _model_parameters(wrapper, config.freeze_embeddings)
    lr = config.lr if pruning else config.finetune_lr
    model_opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    # Pruning decays linearly over the steps left once gates are on (the reference re-creates
    # the optimiser then); fine-tuning uses a constant rate (cofi.md §5).
    decay_steps = max(1, total - pre_steps)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        model_opt, (lambda s: max(0.0, 1.0 - max(0, s - pre_steps) / decay_steps)) if pruning else (lambda s: 1.0))
    lambdas = nn.Parameter(torch.zeros(2, device=accelerator.device))
    gate_opt = lambda_opt = None
    if pruning:
        gate_opt = torch.optim.AdamW(wrapper.gates.parameters(), lr=config.reg_lr, weight_decay=0.0)
        # Ascent on λ: maximize=True, never a negative learning rate (cofi.md §8, pitfall 8).
        lambda_opt = torch.optim.AdamW([lambdas], lr=config.reg_lr, weight_decay=0.0, maximize=True)
    prepared = accelerator.prepare(wrapper, model_opt, schedule, *(o for o in (gate_opt, lambda_opt) if o))
    wrapped, model_opt, schedule = prepared[:3]
    if pruning:
        gate_opt, lambda_opt = prepared[3:]
    student = accelerator.unwrap_model(wrapped)
    extra = {"lambdas": lambdas}
    if resume:
        load_training_state(accelerator, checkpoint_dir, run.stage, extra)
    if pruning:
        student.gated = run.step >= pre_steps

    bar = tqdm(total=total, initial=run.step, desc=f"cofi {run.stage}", unit="step",
               disable=not accelerator.is_local_main_process)
    epoch, skip = divmod(run.step * config.gradient_accumulation_steps, steps.batches_per_epoch)
    student.train()
    teacher.eval()
    while run.step < total:
        generator = torch.Generator().manual_seed(config.seed + 1000 * epoch + (0 if pruning else 7))
        loader = accelerator.prepare(DataLoader(data.features, batch_size=config.batch_size, shuffle=True,
                                                generator=generator, collate_fn=data.collate))
        if skip:
            loader = accelerator.skip_first_batches(loader, skip)
            skip = 0
        for batch in loader:
            with accelerator.accumulate(wrapped):
                if pruning and not student.gated and run.step >= pre_steps:
                    student.gated = True
                loss, terms = distillation_loss(wrapped, student, teacher, batch, data.kind, config, teacher_layers)
                if pruning and student.gated:
                    t = target_sparsity_at(target, run.step, pre_steps, steps.warmup)
                    s_hat = sizer.expected_sparsity(student.gates)
                    loss = add_lagrangian(loss, s_hat, t, lambdas)
                    terms.update(expected_sparsity=float(s_hat.detach()), target=t, lambda1=float(lambdas[0].detach()),
                                 lambda2=float(lambdas[1].detach()))
                accelerator.backward(loss)
                if accelerator.sync_gradients and config.max_grad_norm > 0:
                    accelerator.clip_grad_norm_(params, config.max_grad_norm)
                model_opt.step()
                schedule.step()
                model_opt.zero_grad(set_to_none=True)
                if pruning and student.gated:
                    gate_opt.step()
                    lambda_opt.step()
                    student.gates.clamp_()
                if pruning:
                    gate_opt.zero_grad(set_to_none=True)
                    lambda_opt.zero_grad(set_to_none=True)
            if not accelerator.sync_gradients:
                continue
            run.step += 1
            bar.update(1)
            bar.set_postfix({k: f"{v:.4g}" for k, v in terms.items() if k != "mapping"})
            last = run.step >= total
            if (config.eval_steps and run.step % config.eval_steps == 0) or last:
                _evaluate(student, data, config, run, terms, sizer, checkpoint_dir)
            if checkpoint_dir is not None and ((config.save_steps and run.step % config.save_steps == 0) or last):
                save_checkpoint(accelerator, student, run, checkpoint_dir, extra=extra)
            if last:
                break
        epoch += 1
    bar.close()
    if run.best_step is not None:
        restore_best(student, run, checkpoint_dir)
        logger.info("cofi %s: best %s %.2f at step %d", run.stage, data.main_metric, run.best_metric, run.best_step)
    student.eval()


def _evaluate(student: CofiStudent, data: TrainingData, config: CofiConfig, run: RunState, terms: dict[str, Any],
              sizer: SizeModel | None, checkpoint_dir: str | Path | None) -> None:
    """Score the student on the dev set with deterministic gates, log it, and keep the state when
    it is the best so far among those that may be kept (pruning: near enough the target)."""
    pruning = sizer is not None
    student.eval()
    student.holder.values = student.gates.deterministic() if pruning and student.gated else None
    metrics = data.evaluate(student.model)
    student.holder.values = None
    student.train()
    row = {"step": run.step, **{k: v for k, v in terms.items() if k != "mapping"}, **metrics}
    if pruning and student.gated:
        row["deterministic_sparsity"] = sizer.sparsity(student.gates.deterministic())
    run.history.append(row)
    logger.info("cofi %s step %d: %s", run.stage, run.step, json.dumps(row))
    eligible = not pruning or (student.gated and row.get("expected_sparsity", 0.0)
                               >= config.target_sparsity - config.sparsity_epsilon)
    score = metrics[data.main_metric]
    if eligible and (run.best_metric is None or score > run.best_metric):
        run.best_metric, run.best_step = score, run.step
        keep_best(student, run, checkpoint_dir)


def _model_parameters(wrapper: CofiStudent, freeze_embeddings: bool) -> list[nn.Parameter]:
    """The weights the model optimiser trains: the student's (embeddings frozen by default) and W_layer."""
    frozen = set()
    if freeze_embeddings:
        frozen = {id(p) for p in wrapper.view.embedding_parameters()}
    params = [p for p in wrapper.model.parameters() if id(p) not in frozen]
    for p in wrapper.model.parameters():
        p.requires_grad_(id(p) not in frozen)
    if wrapper.transform is not None:
        params += list(wrapper.transform.parameters())
    return params
