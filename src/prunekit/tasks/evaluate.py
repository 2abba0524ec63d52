"""Evaluation of task models on a task's dev (or train) split, for every task family.

`evaluate` reads, tokenizes, predicts and scores one split of any task by handing it to the
task's family (`prunekit.tasks.family.family_of`): GLUE (`prunekit.tasks.glue.family`), SQuAD
(`prunekit.tasks.qa.family`) or causal language modelling (`prunekit.tasks.causal_lm.family`).
The families' own entry points are re-exported here: `predict` (the classification loop on
pre-tokenized features, reusable when one split is scored many times), `evaluate_squad` and
`predict_qa` (extractive QA), `evaluate_lm` and `default_window` (perplexity).

The model is run in eval mode under `torch.inference_mode`; its train/eval mode and device are
restored in `finally` (style.md §10).
"""

from __future__ import annotations

import os
from typing import Any

import torch

from prunekit.core.errors import ConfigError
from prunekit.core.preflight import check_not_meta
from prunekit.tasks.causal_lm.family import default_window, evaluate_lm
from prunekit.tasks.glue.family import predict
from prunekit.tasks.qa.family import evaluate_squad, predict_qa
from prunekit.tasks.registry import family_of
from prunekit.tasks.spec import TaskSpec, get_task

__all__ = ["default_window", "evaluate", "evaluate_lm", "evaluate_squad", "predict", "predict_qa"]


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
    doc_stride: int | None = None,
    window: int | None = None,
    stride: int | None = None,
) -> dict[str, float]:
    """Score `model` on one split of a task.

    Args:
        model: a model whose head matches the task: `*ForSequenceClassification` (GLUE),
            `*ForQuestionAnswering` (SQuAD) or `*ForCausalLM` (causal LM).
        tokenizer: the model's tokenizer (a fast one for SQuAD).
        task: TaskSpec or task name; its family does the work (`prunekit.tasks.family`).
        source: data source, as for `prunekit.tasks.load_examples` (a list of examples too; a
            causal LM reads text, `prunekit.tasks.causal_lm.data.read_text`).
        split: "dev" or "train".
        batch_size: examples (SQuAD: features) per forward pass, padded to the batch's longest.
        max_length: truncation length (SQuAD: feature length); default the task's.
        device: where to run; default the model's device. The model is moved back afterwards.
        max_examples: score only the first N examples (quick checks).
        doc_stride: SQuAD only: tokens shared by consecutive windows; default the task's.
        window, stride: causal LM only: perplexity window and stride (:func:`evaluate_lm`).

    Returns:
        The task's metrics on a 0-100 scale plus "num_examples", e.g.
        {"accuracy": 88.65, "num_examples": 872} or {"exact_match": 80.1, "f1": 87.9, ...}.
    """
    spec = get_task(task)
    if max_examples is not None and max_examples < 1:
        raise ConfigError(f"max_examples must be >= 1 (or None for the whole split), got {max_examples}")
    check_not_meta(model)
    family = family_of(spec)
    options = family.options_for(spec, doc_stride=doc_stride, window=window, stride=stride)
    return family.evaluate(model, tokenizer, spec, source, split=split, batch_size=batch_size,
                           max_length=max_length, device=device, max_examples=max_examples, **options)
