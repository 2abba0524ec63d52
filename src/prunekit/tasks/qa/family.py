"""Extractive question answering (SQuAD v1.1 and v2.0) as a task family.

`evaluate_squad` cuts each question's context into overlapping features (384 tokens, stride
128), `predict_qa` computes their start and end logits (features batched by length),
`prunekit.tasks.qa.postprocess_predictions` picks one answer per question, and
`prunekit.tasks.qa.metrics.squad_scores` gives exact match and F1 (issue 4, item 3). The family's
own option is ``doc_stride``, the tokens shared by consecutive windows.
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
from prunekit.tasks.qa.answers import postprocess_predictions
from prunekit.tasks.qa.data import QaSource, build_qa_calibration_sample, load_squad_split, squad_task
from prunekit.tasks.qa.features import collate_qa, prepare_features
from prunekit.tasks.qa.metrics import squad_scores
from prunekit.tasks.running import accepted_inputs, model_device
from prunekit.tasks.spec import TaskSpec

logger = logging.getLogger(__name__)

__all__ = ["QaFamily", "evaluate_squad", "predict_qa"]


class QaFamily(TaskFamily):
    """SQuAD-style extractive QA: a question and a context in, an answer span out."""

    kind = "squad"
    label = "SQuAD"
    options = ("doc_stride",)
    splits_examples = True  # a long context becomes several windows

    def resolve_options(self, spec: TaskSpec, max_length: int, **given: Any) -> dict[str, Any]:
        options = self.options_for(spec, **given)
        stride = spec.doc_stride if options.get("doc_stride") is None else options["doc_stride"]
        if stride >= max_length:
            raise ConfigError(f"doc_stride ({stride}) must be below max_length ({max_length}); lower it or raise "
                              "max_length")
        return {"doc_stride": stride}

    def load_examples(self, spec: TaskSpec, source: Source, split: str) -> list[dict[str, Any]]:
        return load_squad_split(spec, source, split)

    def calibration_sample(self, spec: TaskSpec, tokenizer: Any, source: Any, *, num_tokens: int,
                           num_sequences: int | None, seed: int, batch_size: int, max_length: int | None,
                           replace: bool, sort_by_length: bool, **options: Any) -> CalibrationSample:
        return build_qa_calibration_sample(
            spec, tokenizer, source, num_tokens=num_tokens, num_sequences=num_sequences, seed=seed,
            batch_size=batch_size, max_length=max_length, doc_stride=options.get("doc_stride"), replace=replace,
            sort_by_length=sort_by_length,
        )  # fmt: skip

    def training_features(self, spec: TaskSpec, tokenizer: Any, examples: Sequence[Mapping[str, Any]],
                          max_length: int, **options: Any) -> list[dict[str, Any]]:
        return prepare_features(examples, tokenizer, max_length, options["doc_stride"], for_training=True)

    def collate_fn(self, spec: TaskSpec, pad_token_id: int | None) -> Collate:
        return lambda features: collate_qa(features, pad_token_id)

    def dev_scorer(self, spec: TaskSpec, tokenizer: Any, examples: Sequence[Mapping[str, Any]], max_length: int,
                   device: torch.device | str | None, **options: Any) -> Scorer:
        def score(model: nn.Module) -> dict[str, float]:
            return evaluate_squad(model, tokenizer, spec, examples, max_length=max_length,
                                  doc_stride=options["doc_stride"], device=device)

        return score

    def pretrained_model(self, spec: TaskSpec, model_name_or_path: str | os.PathLike[str]) -> nn.Module:
        from transformers import AutoModelForQuestionAnswering  # only fine-tuning needs the Auto classes

        return AutoModelForQuestionAnswering.from_pretrained(
            model_name_or_path, dtype=torch.float32, ignore_mismatched_sizes=True
        )

    def training_loss(self, spec: TaskSpec, model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """Mean of the start and end cross-entropies over token positions (Hugging Face's QA loss)."""
        start, end = batch.pop("start_positions"), batch.pop("end_positions")  # (B,) each
        output = model(**batch)
        # Padding positions take part in the softmax, as in Hugging Face's loss; their logits are
        # learnt to be low like any other non-answer position.
        start_loss = F.cross_entropy(output.start_logits.float(), start)  # (B, T) vs (B,)
        end_loss = F.cross_entropy(output.end_logits.float(), end)
        return 0.5 * (start_loss + end_loss)

    def evaluate(self, model: nn.Module, tokenizer: Any, spec: TaskSpec, source: Any, *, split: str,
                 batch_size: int, max_length: int | None, device: torch.device | str | None,
                 max_examples: int | None, **options: Any) -> dict[str, Any]:
        return evaluate_squad(
            model, tokenizer, spec, source, split=split, batch_size=batch_size, max_length=max_length,
            doc_stride=options.get("doc_stride"), device=device, max_examples=max_examples,
        )  # fmt: skip


def evaluate_squad(
    model: torch.nn.Module,
    tokenizer: Any,
    task: TaskSpec | str,
    source: QaSource,
    split: str = "dev",
    batch_size: int = 64,
    max_length: int | None = None,
    doc_stride: int | None = None,
    device: torch.device | str | None = None,
    max_examples: int | None = None,
    n_best: int = 20,
    max_answer_length: int = 30,
) -> dict[str, float]:
    """Exact match and F1 of a question-answering model on one split of a SQuAD task.

    Args:
        model: a `*ForQuestionAnswering` model (start and end logits per token).
        tokenizer: its fast tokenizer.
        task: "squad", "squad_v2" or their TaskSpec.
        source: a SQuAD file, folder, hub name or list of examples (`load_squad_split`).
        split: "dev" or "train".
        batch_size: features per forward pass.
        max_length, doc_stride: feature length and window overlap; default the task's (384, 128).
        device: where to run; default the model's device.
        max_examples: score only the first N questions.
        n_best, max_answer_length: answer search of `postprocess_predictions`.

    Returns:
        "exact_match" and "f1" (0-100), for squad_v2 also the HasAns_* / NoAns_* groups of
        `squad_scores`, and "num_examples" (questions scored).
    """
    spec = squad_task(task)
    if max_examples is not None and max_examples < 1:
        raise ConfigError(f"max_examples must be >= 1 (or None for the whole split), got {max_examples}")
    examples = load_squad_split(spec, source, split)
    if max_examples is not None:
        examples = examples[:max_examples]
    length = spec.max_length if max_length is None else max_length
    stride = spec.doc_stride if doc_stride is None else doc_stride
    features = prepare_features(examples, tokenizer, length, stride, for_training=False)
    start_logits, end_logits = predict_qa(model, features, tokenizer.pad_token_id, batch_size=batch_size, device=device)
    answers = postprocess_predictions(
        examples, features, start_logits, end_logits, n_best=n_best, max_answer_length=max_answer_length,
        version_2=spec.version_2,
    )  # fmt: skip
    references = {ex["id"]: list(ex["answers"]["text"]) for ex in examples}
    scores = squad_scores(answers, references, version_2=spec.version_2)
    # "total" equals num_examples, and "missing" is 0 (every question gets an answer, maybe "").
    results: dict[str, float] = {k: v for k, v in scores.items() if k not in ("total", "missing")}
    results["num_examples"] = len(examples)
    logger.info(
        "%s %s: exact match %.2f, F1 %.2f on %d questions (%d features)",
        spec.name, split, results["exact_match"], results["f1"], len(examples), len(features),
    )  # fmt: skip
    return results


def predict_qa(
    model: torch.nn.Module,
    features: Sequence[dict[str, Any]],
    pad_token_id: int,
    batch_size: int = 64,
    device: torch.device | str | None = None,
) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """Start and end logits of a question-answering model for each feature, in feature order.

    Features are batched by length (sorted), so a batch carries little padding.

    Returns:
        (start_logits, end_logits): one float32 row per feature, each as long as the feature.
    """
    if batch_size < 1:
        raise ConfigError(f"batch_size must be >= 1, got {batch_size}")
    n = len(features)
    starts: list[np.ndarray] = [np.zeros(0, dtype=np.float32)] * n
    ends: list[np.ndarray] = [np.zeros(0, dtype=np.float32)] * n
    if not features:
        return starts, ends
    accepted = accepted_inputs(model)
    home = model_device(model)
    target = torch.device(device) if device is not None else home
    order = sorted(range(n), key=lambda i: len(features[i]["input_ids"]))
    was_training = model.training
    bar = tqdm(total=n, desc="eval squad", unit="feature", leave=False)
    try:
        if target != home:
            model.to(target)
        model.eval()
        with torch.inference_mode():
            for lo in range(0, n, batch_size):
                chunk = order[lo : lo + batch_size]
                batch = collate_qa([features[i] for i in chunk], pad_token_id)
                output = model(**{k: v.to(target) for k, v in batch.items() if k in accepted})
                if not hasattr(output, "start_logits"):
                    raise ModelError(
                        f"{type(model).__name__} gives no start/end logits; evaluate a question-answering model "
                        "(e.g. one made by `prunekit finetune --task squad`) on SQuAD"
                    )
                start = output.start_logits.float().cpu().numpy()  # (B, T)
                end = output.end_logits.float().cpu().numpy()  # (B, T)
                for row, i in enumerate(chunk):
                    n_tok = len(features[i]["input_ids"])
                    starts[i], ends[i] = start[row, :n_tok], end[row, :n_tok]
                bar.update(len(chunk))
    finally:
        bar.close()
        model.train(was_training)
        if target != home:
            model.to(home)
    return starts, ends
