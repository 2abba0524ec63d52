"""A CoFi run's state and its checkpoints: a run stopped at any step resumes where it was (same
config and data), in either stage, with the best state kept so far."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import torch

from prunekit.core.surgery import PruningPlan
from prunekit.methods.cofi.student import CofiStudent

STATE_FILE = "trainer_state.json"


class RunState:
    """One CoFi run's mutable state: the stage, step counters, the Lagrange multipliers and the
    best state so far. Saved as JSON (plus tensors) in every checkpoint."""

    def __init__(self, stage: str = "prune") -> None:
        self.stage = stage
        self.step = 0  # optimiser steps in the current stage
        self.best_metric: float | None = None
        self.best_step: int | None = None
        self.history: list[dict[str, Any]] = []
        self.best_state: dict[str, torch.Tensor] | None = None  # in memory only; on disk as best.pt

    def to_dict(self) -> dict[str, Any]:
        return {"stage": self.stage, "step": self.step, "best_metric": self.best_metric,
                "best_step": self.best_step, "history": self.history}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> RunState:
        run = cls()
        run.__dict__.update(data)
        return run

    @classmethod
    def load(cls, checkpoint_dir: str | Path) -> RunState:
        return cls.from_dict(json.loads((Path(checkpoint_dir) / STATE_FILE).read_text()))


def has_state(checkpoint_dir: str | Path | None) -> bool:
    return checkpoint_dir is not None and (Path(checkpoint_dir) / STATE_FILE).is_file()


def _tensors(student: CofiStudent) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in student.state_dict().items()}


def keep_best(student: CofiStudent, run: RunState, checkpoint_dir: str | Path | None) -> None:
    """Keep the best state in memory, and on disk when checkpointing (so a resumed run has it)."""
    run.best_state = _tensors(student)
    if checkpoint_dir is not None:
        folder = Path(checkpoint_dir) / run.stage
        folder.mkdir(parents=True, exist_ok=True)
        torch.save(run.best_state, folder / "best.pt")


def restore_best(student: CofiStudent, run: RunState, checkpoint_dir: str | Path | None) -> None:
    state = run.best_state
    best_file = Path(checkpoint_dir) / run.stage / "best.pt" if checkpoint_dir is not None else None
    if state is None and best_file is not None and best_file.is_file():
        state = torch.load(best_file, weights_only=True)
    if state is not None:
        student.load_state_dict(state)
    run.best_state = None


def save_checkpoint(accelerator: Any, student: CofiStudent, run: RunState, checkpoint_dir: str | Path,
                    extra: dict[str, torch.Tensor] | None = None, plan: PruningPlan | None = None,
                    new_stage: bool = False) -> None:
    """Write the checkpoint: weights, gates and W_layer (``<stage>/tensors.pt``), optimiser,
    scheduler and RNG states (Accelerate's ``<stage>/accelerate``) and the run state (JSON).
    The fine-tuning stage also stores the pruned model as a prunekit folder, since its shapes differ
    from the teacher's. The JSON is written last, so a checkpoint is complete when it names it."""
    if not accelerator.is_main_process:
        return
    folder = Path(checkpoint_dir) / run.stage
    folder.mkdir(parents=True, exist_ok=True)
    if run.stage == "finetune" and (new_stage or not (folder / "model").is_dir()):
        from prunekit.io.folders import as_pruned_model, save_plan

        model = as_pruned_model(student.model)
        shutil.rmtree(folder / "model", ignore_errors=True)
        model.save_pretrained(folder / "model")
        if plan is not None:
            save_plan(plan, folder)
    torch.save(_tensors(student), folder / "tensors.pt")
    if not new_stage:
        accelerator.save_state(str(folder / "accelerate"))
        torch.save({k: v.detach().cpu() for k, v in (extra or {}).items()}, folder / "extra.pt")
    (Path(checkpoint_dir) / STATE_FILE).write_text(json.dumps(run.to_dict(), indent=1))


def load_tensors(student: CofiStudent, folder: Path) -> None:
    if (folder / "tensors.pt").is_file():
        student.load_state_dict(torch.load(folder / "tensors.pt", weights_only=True))


def load_training_state(accelerator: Any, checkpoint_dir: str | Path, stage: str,
                        extra: dict[str, torch.Tensor]) -> None:
    """Optimiser, scheduler and RNG states and ``extra`` (the multipliers) of ``stage``, in place."""
    folder = Path(checkpoint_dir) / stage
    if not (folder / "accelerate").is_dir():
        return  # the stage had just begun: nothing trained yet
    accelerator.load_state(str(folder / "accelerate"))
    saved = torch.load(folder / "extra.pt", weights_only=True)
    with torch.no_grad():
        for name, tensor in extra.items():
            tensor.copy_(saved[name].to(tensor.device))
