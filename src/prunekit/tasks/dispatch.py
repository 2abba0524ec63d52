"""One entry point per data operation, routed by the task's kind.

`load_examples` and `build_calibration_sample` take any registered task: GLUE tasks go to
`prunekit.tasks.glue.data`, SQuAD tasks to `prunekit.tasks.qa.data`. Both return the same types for every
task (a list of example dicts; a `CalibrationSample`), so `prunekit.prune` and the methods need
not know which kind of task they serve.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from typing import Any

from prunekit.core.errors import ConfigError
from prunekit.tasks.calibration import CalibrationSample
from prunekit.tasks.causal_lm.data import build_lm_calibration_sample, resolve_text_file
from prunekit.tasks.glue import data as glue
from prunekit.tasks.qa import data as qa
from prunekit.tasks.spec import TaskSpec, get_task

__all__ = ["build_calibration_sample", "check_split", "load_examples"]

Source = str | os.PathLike[str] | Sequence[Mapping[str, Any]]


def load_examples(task: TaskSpec | str, source: Source, split: str) -> list[dict[str, Any]]:
    """Read one split of any task (see `prunekit.tasks.glue.data.load_examples` and
    `prunekit.tasks.qa.data.load_squad_split` for the sources each kind accepts)."""
    spec = get_task(task)
    if spec.kind == "causal_lm":
        raise ConfigError(f"task {spec.name!r} reads text, not examples: use prunekit.tasks.causal_lm.data.read_text")
    if spec.kind == "squad":
        return qa.load_squad_split(spec, source, split)
    if not isinstance(source, str | os.PathLike):
        return [dict(example) for example in source]  # GLUE examples passed in directly
    return glue.load_examples(spec, source, split)


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
    batch = spec.batch_size if batch_size is None else batch_size
    if spec.kind == "causal_lm":
        # N windows of L tokens: num_sequences (default the task's 128), L = max_length (default
        # the task's 2048); num_tokens only sizes N when num_sequences is not given.
        if doc_stride is not None:
            raise ConfigError(f"doc_stride applies to SQuAD tasks only; task {spec.name!r} is a causal LM task")
        length = max_length or spec.max_length
        count = num_sequences or spec.calibration_sequences or max(1, num_tokens // length)
        return build_lm_calibration_sample(tokenizer, source, num_sequences=count, seq_len=length, seed=seed,
                                           batch_size=batch, task=spec.name)
    if spec.kind == "squad":
        return qa.build_qa_calibration_sample(
            spec, tokenizer, source, num_tokens=num_tokens, num_sequences=num_sequences, seed=seed,
            batch_size=batch, max_length=max_length, doc_stride=doc_stride, replace=replace,
            sort_by_length=sort_by_length,
        )  # fmt: skip
    if doc_stride is not None:
        raise ConfigError(f"doc_stride applies to SQuAD tasks only; task {spec.name!r} is a {spec.kind} task")
    if not isinstance(source, str | os.PathLike):
        raise ConfigError(f"the calibration data of GLUE task {spec.name!r} must be a folder, a file or a hub name")
    return glue.build_calibration_sample(
        spec, tokenizer, source, num_tokens=num_tokens, num_sequences=num_sequences, seed=seed,
        batch_size=batch, max_length=max_length, replace=replace, sort_by_length=sort_by_length,
    )  # fmt: skip


def check_split(task: str | TaskSpec, data: Any, split: str = "dev") -> None:
    """The split evaluation needs must be there before pruning starts, not found missing after."""
    if not isinstance(data, str | os.PathLike):
        return
    if get_task(task).kind == "causal_lm":
        # Causal LMs are scored on the test text ("dev" means it); a missing file fails here.
        resolve_text_file(data, ("test" if split == "dev" else split,))
        return
    load_examples(task, data, split)
