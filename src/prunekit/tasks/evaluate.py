"""Evaluation of task models on a task's dev (or train) split: GLUE and SQuAD.

This module owns `evaluate` (read, tokenize, predict, score) and `predict` (the model loop on
pre-tokenized features, reusable when one split is scored many times, e.g. after each pruning
stage). It works with any Hugging Face `*ForSequenceClassification` model, pruned or not: class
ids are the argmax of the logits, regression scores are the squeezed single logit.

SQuAD tasks take the extractive-QA path: `evaluate_squad` cuts each question's context into
overlapping features (384 tokens, stride 128), `predict_qa` computes their start and end logits
(features batched by length), `prunekit.tasks.qa.postprocess_predictions` picks one answer per
question, and `prunekit.tasks.metrics.squad_scores` gives exact match and F1 (issue 4, item 3).

The model is run in eval mode under `torch.inference_mode`; its train/eval mode and device are
restored in `finally` (style.md §10).
"""

from __future__ import annotations

import inspect
import logging
import os
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from prunekit.core.errors import ConfigError, ModelError
from prunekit.core.preflight import check_not_meta
from prunekit.tasks.glue.data import iter_feature_batches, load_examples, tokenize_examples
from prunekit.tasks.glue.metrics import compute_metrics
from prunekit.tasks.qa import collate_qa, postprocess_predictions, prepare_features
from prunekit.tasks.qa.data import QaSource, load_squad_split, squad_task
from prunekit.tasks.qa.metrics import squad_scores
from prunekit.tasks.spec import TaskSpec, get_task

logger = logging.getLogger(__name__)

__all__ = ["default_window", "evaluate", "evaluate_lm", "evaluate_squad", "predict", "predict_qa"]

_MODEL_INPUTS = ("input_ids", "attention_mask", "token_type_ids")


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
        model: a `*ForSequenceClassification` model whose head matches the task, or a
            `*ForQuestionAnswering` model for a SQuAD task.
        tokenizer: the model's tokenizer (a fast one for SQuAD).
        task: TaskSpec or task name.
        source: data source, as for `prunekit.tasks.load_examples` (for SQuAD also a list of
            examples).
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
    if spec.kind == "causal_lm":
        if doc_stride is not None or max_length is not None:
            raise ConfigError("a causal LM is scored in perplexity windows: pass window (and stride), "
                              "not max_length or doc_stride")
        return evaluate_lm(model, tokenizer, spec, source, split=split, window=window, stride=stride,
                           batch_size=min(batch_size, 8), device=device, max_windows=max_examples)
    if window is not None or stride is not None:
        raise ConfigError(f"window and stride apply to causal LM tasks only; task {spec.name!r} is a {spec.kind} task")
    if spec.kind == "squad":
        return evaluate_squad(
            model, tokenizer, spec, source, split=split, batch_size=batch_size, max_length=max_length,
            doc_stride=doc_stride, device=device, max_examples=max_examples,
        )  # fmt: skip
    if doc_stride is not None:
        raise ConfigError(f"doc_stride applies to SQuAD tasks only; task {spec.name!r} is a {spec.kind} task")
    examples = load_examples(spec, source, split)
    if max_examples is not None:
        examples = examples[:max_examples]
    features = tokenize_examples(spec, tokenizer, examples, max_length=max_length)
    predictions = predict(model, spec, features, tokenizer.pad_token_id, batch_size=batch_size, device=device)
    results: dict[str, float] = compute_metrics(spec, predictions, [f["label"] for f in features])
    results["num_examples"] = len(features)
    logger.info(
        "%s %s: %s",
        spec.name,
        split,
        ", ".join(f"{k} {v:.2f}" if isinstance(v, float) else f"{k} {v}" for k, v in results.items()),
    )
    return results


def default_window(model: torch.nn.Module, task: TaskSpec | str = "causal_lm") -> int:
    """The perplexity window when none is given: the task's (2048, as SliceGPT and Wanda), capped
    at the model's ``max_position_embeddings`` (a window longer than the positions the model was
    trained on is not a fair test)."""
    spec = get_task(task)
    window = spec.eval_window or spec.max_length
    positions = getattr(getattr(model, "config", None), "max_position_embeddings", None)
    return min(window, int(positions)) if positions else window


def evaluate_lm(
    model: torch.nn.Module,
    tokenizer: Any,
    task: TaskSpec | str,
    source: str | os.PathLike[str],
    split: str = "test",
    window: int | None = None,
    stride: int | None = None,
    batch_size: int = 1,
    device: torch.device | str | None = None,
    max_windows: int | None = None,
) -> dict[str, float]:
    """Perplexity of a causal LM over one split of a text source (``prunekit.tasks.causal_lm.data``):
    the whole split's rows joined with "\n\n", tokenized once, in non-overlapping windows of
    ``window`` tokens (default :func:`default_window`) moved on by ``stride`` (default the window).
    ``split`` "dev" means the test text, the split LLM results are reported on. ``max_windows``
    scores only the first N windows (quick checks). The result states window and stride."""
    from prunekit.tasks.causal_lm.data import perplexity, read_text, tokenize_text

    spec = get_task(task)
    split = "test" if split == "dev" else split
    window = window or default_window(model, spec)
    tokens = tokenize_text(tokenizer, read_text(source, split))
    if max_windows is not None:
        tokens = tokens[: max_windows * (stride or window) + (window - (stride or window))]
    home = _model_device(model)
    target = torch.device(device) if device is not None else home
    was_training = model.training
    try:
        if target != home:
            model.to(target)
        result: dict[str, Any] = perplexity(model, tokens, window=window, stride=stride, batch_size=batch_size,
                                            device=target, desc=f"perplexity {split}")
    finally:
        model.train(was_training)
        if target != home:
            model.to(home)
    result["split"] = split
    logger.info("%s %s: perplexity %.3f over %d tokens (window %d, stride %d)", spec.name, split,
                result["perplexity"], result["num_scored"], result["window"], result["stride"])
    return result


def predict(
    model: torch.nn.Module,
    task: TaskSpec | str,
    features: Sequence[dict[str, Any]],
    pad_token_id: int | None,
    batch_size: int = 64,
    device: torch.device | str | None = None,
) -> np.ndarray:
    """Run `model` over tokenized features, in order.

    Returns:
        (N,) int64 class ids for classification, or (N,) float32 scores for regression.
    """
    spec = get_task(task)
    if batch_size < 1:
        raise ConfigError(f"batch_size must be >= 1, got {batch_size}")
    _check_head(model, spec)
    if not features:
        return np.zeros(0, dtype=np.float32 if spec.is_regression else np.int64)
    accepted = _accepted_inputs(model)
    home = _model_device(model)
    target = torch.device(device) if device is not None else home
    was_training = model.training
    outputs: list[torch.Tensor] = []
    bar = tqdm(total=len(features), desc=f"eval {spec.name}", unit="ex", leave=False)
    try:
        if target != home:
            model.to(target)
        model.eval()
        with torch.inference_mode():
            for batch in iter_feature_batches(features, batch_size, pad_token_id, regression=spec.is_regression):
                inputs = {k: v.to(target) for k, v in batch.items() if k in accepted}
                output = model(**inputs)
                logits = output.logits if hasattr(output, "logits") else output[0]  # (B, C)
                if spec.is_regression:
                    outputs.append(logits.reshape(-1).float().cpu())  # (B, 1) -> (B,)
                else:
                    outputs.append(logits.argmax(dim=-1).cpu())  # (B,)
                bar.update(batch["input_ids"].shape[0])
    finally:
        bar.close()
        model.train(was_training)
        if target != home:
            model.to(home)
    return torch.cat(outputs).numpy()


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
    accepted = _accepted_inputs(model)
    home = _model_device(model)
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


def _check_head(model: torch.nn.Module, spec: TaskSpec) -> None:
    config = getattr(model, "config", None)
    num_labels = getattr(config, "num_labels", None)
    if num_labels is not None and num_labels != spec.num_labels:
        raise ModelError(
            f"the model's head has {num_labels} label(s) but task {spec.name!r} needs {spec.num_labels}; "
            f"evaluate a model fine-tuned on {spec.name} (see prunekit.tasks.finetune) or pick the matching task"
        )


def _accepted_inputs(model: torch.nn.Module) -> set[str]:
    """Which of input_ids / attention_mask / token_type_ids the model's forward takes by name.

    DistilBERT, for one, has no token_type_ids; passing them would fail.
    """
    parameters = inspect.signature(model.forward).parameters
    named = {name for name, p in parameters.items() if p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)}
    accepted = {name for name in _MODEL_INPUTS if name in named}
    return accepted or set(_MODEL_INPUTS)


def _model_device(model: torch.nn.Module) -> torch.device:
    parameter = next(model.parameters(), None)
    return parameter.device if parameter is not None else torch.device("cpu")
