"""One entry point per data operation, routed to the task's family (`prunekit.tasks.family`).

`load_examples`, `build_calibration_sample` and `check_split` take any registered task and hand
it to its family: GLUE to `prunekit.tasks.glue.family`, SQuAD to `prunekit.tasks.qa.family`,
causal LM to `prunekit.tasks.causal_lm.family`. They return the same types for every task (a
list of example dicts; a `CalibrationSample`), so `prunekit.prune` and the methods need not know
which kind of task they serve.
"""

from __future__ import annotations

import os
from typing import Any

from prunekit.tasks.calibration import CalibrationSample
from prunekit.tasks.family import Source
from prunekit.tasks.registry import family_of
from prunekit.tasks.spec import TaskSpec, get_task

__all__ = ["build_calibration_sample", "check_split", "load_examples"]


def load_examples(task: TaskSpec | str, source: Source, split: str) -> list[dict[str, Any]]:
    """Read one split of any task (see `prunekit.tasks.glue.data.load_examples` and
    `prunekit.tasks.qa.data.load_squad_split` for the sources each kind accepts)."""
    spec = get_task(task)
    return family_of(spec).load_examples(spec, source, split)


def build_calibration_sample(
    task: TaskSpec | str,
    tokenizer: Any,
    source: Source,
    num_tokens: int = 100_000,
    num_sequences: int | None = None,
    seed: int = 0,
    batch_size: int | None = None,
    max_length: int | None = None,
    replace: bool = True,
    sort_by_length: bool = True,
    doc_stride: int | None = None,
) -> CalibrationSample:
    """Draw the calibration sample of any task (kprune_kwon.md §1.2).

    GLUE: sequences from the training split, `prunekit.tasks.glue.data.build_calibration_sample`.
    Causal LM: ``num_sequences`` windows of ``max_length`` tokens of the calibration text
    (`prunekit.tasks.causal_lm.data.build_lm_calibration_sample`), never the test split.
    SQuAD: features from the training split, `prunekit.tasks.qa.data.build_qa_calibration_sample`;
    a list of examples may stand in for the split. `batch_size` defaults to the task's (32 for
    GLUE, 12 for SQuAD); `doc_stride` applies to SQuAD only.
    """
    spec = get_task(task)
    family = family_of(spec)
    options = family.options_for(spec, doc_stride=doc_stride)
    batch = spec.batch_size if batch_size is None else batch_size
    return family.calibration_sample(spec, tokenizer, source, num_tokens=num_tokens, num_sequences=num_sequences,
                                     seed=seed, batch_size=batch, max_length=max_length, replace=replace,
                                     sort_by_length=sort_by_length, **options)


def check_split(task: str | TaskSpec, data: Any, split: str = "dev") -> None:
    """The split evaluation needs must be there before pruning starts, not found missing after."""
    if not isinstance(data, str | os.PathLike):
        return
    spec = get_task(task)
    family_of(spec).check_split(spec, data, split)
