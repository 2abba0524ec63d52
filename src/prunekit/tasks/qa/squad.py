"""SQuAD v1.1 / v2.0 data: loading, tokenization into features, batching, answer extraction.

This module owns extractive question answering data for prunekit (issue "SQuAD data and
metric", items 1-2; settings from kprune_kwon.md §1.2: max length 384, doc stride 128,
question first, only the context truncated). The metric lives in `prunekit.tasks.qa.metrics`.

- `load_squad` reads the official JSON format from a local file, or a `datasets` hub name
  ("squad", "squad_v2") when the source is not an existing path, and checks every field and
  every answer offset, so a bad file fails here with a message that says what to fix.
- `split_by_article` splits examples by article, keeping article order.
- `prepare_features` turns examples into model features with a fast tokenizer. A long context
  becomes several overlapping windows ("features") of one example. Training features carry
  start/end token labels; evaluation features carry the example id and the character offsets
  needed to map token spans back to context text.
- `collate_qa` pads a list of features into a batch of tensors.
- `postprocess_predictions` searches the n-best start/end pairs of every feature, keeps the best
  span over all features of an example, and applies the v2.0 null-answer threshold.

Features are plain dicts (lists of ints), unpadded; padding happens per batch in `collate_qa`.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from prunekit.core.errors import DataError
from prunekit.core.preflight import read_utf8

logger = logging.getLogger(__name__)

__all__ = [
    "load_squad",
    "split_by_article",
    "prepare_features",
    "collate_qa",
    "postprocess_predictions",
]

# Examples tokenized per call of the fast tokenizer: large enough to amortise the call,
# small enough for a useful progress bar.
_TOKENIZE_CHUNK = 1000
# Features (not tensors) that collate_qa turns into model inputs, with their padding value.
# None means "the tokenizer's pad token id".
_PADDED_INPUTS: dict[str, int | None] = {"input_ids": None, "attention_mask": 0, "token_type_ids": 0}
_LABELS = ("start_positions", "end_positions")


# ---------------------------------------------------------------------------------------------
# Loading
# ---------------------------------------------------------------------------------------------


def load_squad(
    source: str | os.PathLike[str], version_2: bool = False, *, split: str = "validation"
) -> list[dict]:
    """Load SQuAD examples from an official JSON file or a `datasets` hub name.

    Args:
        source: path to a file in the official SQuAD format
            (`{"version", "data": [{"title", "paragraphs": [{"context", "qas": [...]}]}]}`), or,
            when no such path exists, a hub dataset name such as "squad" or "squad_v2".
        version_2: allow unanswerable questions (SQuAD v2.0). Loading a file that has them
            without this flag is an error, so v1.1 metrics are never computed on v2.0 data.
        split: split to take when loading from the hub (ignored for local files).

    Returns:
        One dict per question, in file order: "id", "title", "context", "question",
        "answers" ({"text": [...], "answer_start": [...]}, empty lists when unanswerable) and
        "is_impossible" (bool).

    Raises:
        DataError: missing file, invalid JSON (with line and column), a missing or mistyped
            field (with the question id), an answer whose text is not found at its
            answer_start, duplicate question ids, unanswerable questions without
            `version_2`, no examples, or a hub name that cannot be loaded.
    """
    path = Path(source)
    if path.is_file():
        examples = _load_json_file(path, version_2)
        where = str(path)
    elif path.exists():
        raise DataError(
            f"{path} is a directory; pass the SQuAD JSON file inside it (e.g. {path / 'dev-v1.1.json'})."
        )
    elif path.suffix.lower() == ".json" or path.is_absolute() or str(source).startswith("."):
        raise DataError(
            f"SQuAD file not found: {path}. Check the path, or download the official file "
            "(e.g. dev-v1.1.json) and point to it."
        )
    else:
        examples = _load_hub(str(source), version_2, split)
        where = f"hub dataset {source!r} (split {split!r})"
    if not examples:
        raise DataError(
            f"{where} holds no questions; check that it is a SQuAD file with a non-empty 'data' list."
        )
    n_impossible = sum(ex["is_impossible"] for ex in examples)
    logger.info("Loaded %d SQuAD questions (%d unanswerable) from %s", len(examples), n_impossible, where)
    return examples


def _load_json_file(path: Path, version_2: bool) -> list[dict]:
    """Parse and validate an official-format SQuAD JSON file."""
    try:
        raw = json.loads(read_utf8(path, "utf-8"))
    except json.JSONDecodeError as exc:
        raise DataError(
            f"{path} is not valid JSON: {exc.msg} at line {exc.lineno}, column {exc.colno}. "
            "Fix the file, or re-download the official SQuAD JSON."
        ) from exc

    if not isinstance(raw, dict) or "data" not in raw:
        raise DataError(
            f"{path}: the top level must be an object with a 'data' list of articles "
            '(official SQuAD format: {"version": ..., "data": [...]}).'
        )
    articles = _expect(raw["data"], list, "data", f"{path}")
    examples: list[dict] = []
    seen: set[str] = set()
    for a_idx, article in enumerate(articles):
        where = f"{path}: data[{a_idx}]"
        article = _expect(article, dict, "article", where)
        title = _expect(_field(article, "title", where), str, "title", where)
        paragraphs = _expect(_field(article, "paragraphs", where), list, "paragraphs", where)
        for p_idx, paragraph in enumerate(paragraphs):
            where = f"{path}: article {title!r}, paragraphs[{p_idx}]"
            paragraph = _expect(paragraph, dict, "paragraph", where)
            context = _expect(_field(paragraph, "context", where), str, "context", where)
            qas = _expect(_field(paragraph, "qas", where), list, "qas", where)
            for q_idx, qa in enumerate(qas):
                qa = _expect(qa, dict, "qas entry", f"{where}, qas[{q_idx}]")
                qid = _expect(_field(qa, "id", f"{where}, qas[{q_idx}]"), str, "id", f"{where}, qas[{q_idx}]")
                if qid in seen:
                    raise DataError(
                        f"{path}: question id {qid!r} appears twice; question ids must be unique."
                    )
                seen.add(qid)
                examples.append(
                    _parse_question(qa, qid, title, context, version_2, f"{path}: question {qid!r}")
                )
    return examples


def _parse_question(qa: dict, qid: str, title: str, context: str, version_2: bool, where: str) -> dict:
    """Validate one `qas` entry against its context and return it as an example dict."""
    question = _expect(_field(qa, "question", where), str, "question", where)
    answers = _expect(_field(qa, "answers", where), list, "answers", where)
    is_impossible = _expect(qa.get("is_impossible", not answers), bool, "is_impossible", where)
    if is_impossible and answers:
        raise DataError(
            f"{where} has is_impossible=true but {len(answers)} answers; an unanswerable question "
            "must have an empty 'answers' list (v2.0 keeps them under 'plausible_answers')."
        )
    if not is_impossible and not answers:
        raise DataError(f"{where} has an empty 'answers' list but is_impossible=false; add its answers.")
    if is_impossible and not version_2:
        raise DataError(
            f"{where} is unanswerable, which SQuAD v1.1 does not allow; this looks like a v2.0 file, "
            "so pass version_2=True."
        )
    texts: list[str] = []
    starts: list[int] = []
    for k, answer in enumerate(answers):
        a_where = f"{where}, answers[{k}]"
        answer = _expect(answer, dict, "answer", a_where)
        text = _expect(_field(answer, "text", a_where), str, "text", a_where)
        start = _field(answer, "answer_start", a_where)
        if isinstance(start, bool) or not isinstance(start, int):
            raise DataError(f"{a_where}: 'answer_start' must be an integer character offset, got {start!r}.")
        found = context[start : start + len(text)] if start >= 0 else ""
        if found != text:
            hint = context.find(text)
            fix = (
                f"the text occurs at offset {hint}" if hint >= 0 else "the text does not occur in the context"
            )
            raise DataError(
                f"{a_where}: context[{start}:{start + len(text)}] should be the answer text {text!r} "
                f"but reads {found!r} ({fix}); fix answer_start or the text."
            )
        texts.append(text)
        starts.append(start)
    return {
        "id": qid,
        "title": title,
        "context": context,
        "question": question,
        "answers": {"text": texts, "answer_start": starts},
        "is_impossible": is_impossible,
    }


def _field(obj: dict, name: str, where: str) -> Any:
    if name not in obj:
        raise DataError(f"{where} is missing the field {name!r}; add it (official SQuAD format).")
    return obj[name]


def _expect(value: Any, kind: type, name: str, where: str) -> Any:
    if not isinstance(value, kind):
        raise DataError(
            f"{where}: {name!r} must be a {kind.__name__}, got {type(value).__name__} ({value!r:.60})."
        )
    return value


def _load_hub(name: str, version_2: bool, split: str) -> list[dict]:
    """Load a SQuAD-style dataset from the Hugging Face hub (or the local `datasets` cache)."""
    import datasets  # imported only on this path: it is slow to import and local files do not need it

    try:
        rows = datasets.load_dataset(name, split=split)
    except Exception as exc:  # datasets raises many types (connection, not found, bad split)
        raise DataError(
            f"{name!r} is not an existing file, and loading it as a hub dataset failed ({exc}). "
            "Pass the path to an official SQuAD JSON file, or a reachable hub name such as 'squad'."
        ) from exc
    examples = []
    for row in rows:
        where = f"hub dataset {name!r}: question {row.get('id')!r}"
        for field in ("id", "title", "context", "question", "answers"):
            _field(row, field, where)
        answers = {"text": list(row["answers"]["text"]), "answer_start": list(row["answers"]["answer_start"])}
        is_impossible = not answers["text"]
        if is_impossible and not version_2:
            raise DataError(
                f"{where} is unanswerable; {name!r} looks like SQuAD v2.0, so pass version_2=True."
            )
        fields = {key: row[key] for key in ("id", "title", "context", "question")}
        examples.append({**fields, "answers": answers, "is_impossible": is_impossible})
    return examples


def split_by_article(
    source_or_examples: str | os.PathLike[str] | Sequence[Mapping],
    first_n: int,
    *,
    version_2: bool = False,
) -> tuple[list[dict], list[dict]]:
    """Split SQuAD examples into the first `first_n` articles and the rest.

    Articles are runs of consecutive examples with the same title, in file order; splitting by
    article keeps every paragraph of an article on one side, so no context leaks between the
    two parts. (The benchmark uses dev-v1.1: 24 articles to prune on, 24 to evaluate.)

    Args:
        source_or_examples: a path or hub name for `load_squad`, or examples it returned.
        first_n: number of articles in the first part; 0 < first_n < number of articles.
        version_2: passed to `load_squad` when a source is given.

    Returns:
        (examples of the first `first_n` articles, examples of the remaining articles).
    """
    if isinstance(source_or_examples, str | os.PathLike):
        examples = load_squad(source_or_examples, version_2=version_2)
    else:
        examples = [dict(ex) for ex in source_or_examples]
    if not examples:
        raise DataError("split_by_article got no examples; load a SQuAD file first.")
    n_articles = 0
    cut = len(examples)
    previous_title: object = object()  # a sentinel equal to no title
    for i, ex in enumerate(examples):
        if ex["title"] != previous_title:
            if n_articles == first_n:
                cut = i
            n_articles += 1
            previous_title = ex["title"]
    if not 0 < first_n < n_articles:
        raise DataError(
            f"first_n={first_n} must be between 1 and {n_articles - 1}: the data has {n_articles} articles "
            "and both parts must be non-empty."
        )
    return examples[:cut], examples[cut:]


# ---------------------------------------------------------------------------------------------
# Tokenization
# ---------------------------------------------------------------------------------------------


def prepare_features(
    examples: Sequence[Mapping],
    tokenizer: Any,
    max_length: int = 384,
    doc_stride: int = 128,
    *,
    for_training: bool,
) -> list[dict]:
    """Tokenize examples into (possibly several overlapping) features, question first.

    The context is cut into windows of at most `max_length` tokens (question and special
    tokens included) that overlap by `doc_stride` tokens, so every answer lies whole in at
    least one window unless it is longer than a window.

    Args:
        examples: dicts as returned by `load_squad`.
        tokenizer: a fast Hugging Face tokenizer (offsets are needed to map answers).
        max_length: tokens per feature (kprune_kwon.md §1.2: 384).
        doc_stride: tokens shared by consecutive windows of one context (§1.2: 128).
        for_training: add start/end labels instead of evaluation offsets.

    Returns:
        One dict per feature with the tokenizer's model inputs ("input_ids",
        "attention_mask", and "token_type_ids" when the tokenizer makes them, each a list of
        length <= max_length), "example_id", "cls_index" and "context_span" (first and last
        context token, inclusive; None for an empty context). Training features add
        "start_positions" and "end_positions": the token span of the first gold answer, or
        cls_index for both when the question is unanswerable or the answer is not wholly
        inside this window. Evaluation features add "offset_mapping": (start, end) character
        offsets into the context for context tokens, None for question, special and
        padding tokens.
    """
    if not getattr(tokenizer, "is_fast", False):
        raise DataError(
            f"{type(tokenizer).__name__} is not a fast tokenizer; SQuAD features need character offsets. "
            "Load it with AutoTokenizer.from_pretrained(..., use_fast=True)."
        )
    if not 0 <= doc_stride < max_length:
        raise DataError(f"doc_stride ({doc_stride}) must be >= 0 and smaller than max_length ({max_length}).")
    examples = list(examples)  # also accepts a `datasets.Dataset`, whose slices are column dicts
    if not examples:
        raise DataError("prepare_features got no examples; load a SQuAD file first.")

    features: list[dict] = []
    n_chunks = (len(examples) + _TOKENIZE_CHUNK - 1) // _TOKENIZE_CHUNK
    for lo in tqdm(
        range(0, len(examples), _TOKENIZE_CHUNK), total=n_chunks, desc="SQuAD features", disable=n_chunks < 2
    ):
        chunk = examples[lo : lo + _TOKENIZE_CHUNK]
        features.extend(_featurize_chunk(chunk, tokenizer, max_length, doc_stride, for_training))
    logger.info(
        "Made %d SQuAD features from %d examples (max_length=%d, doc_stride=%d)",
        len(features),
        len(examples),
        max_length,
        doc_stride,
    )
    return features


def _featurize_chunk(
    examples: Sequence[Mapping], tokenizer: Any, max_length: int, doc_stride: int, for_training: bool
) -> list[dict]:
    # Some SQuAD questions start with long runs of spaces; they would only eat window room.
    questions = [ex["question"].lstrip() for ex in examples]
    contexts = [ex["context"] for ex in examples]
    _check_question_room(examples, questions, tokenizer, max_length, doc_stride)

    enc = tokenizer(
        questions,
        contexts,
        truncation="only_second",
        max_length=max_length,
        stride=doc_stride,
        return_overflowing_tokens=True,
        return_offsets_mapping=True,
        padding=False,
    )
    input_names = [k for k in _PADDED_INPUTS if k in enc]
    features = []
    for i, ex_idx in enumerate(enc["overflow_to_sample_mapping"]):
        example = examples[ex_idx]
        sequence_ids = enc.sequence_ids(i)
        input_ids = enc["input_ids"][i]
        cls_index = input_ids.index(tokenizer.cls_token_id) if tokenizer.cls_token_id in input_ids else 0
        feature: dict[str, Any] = {name: enc[name][i] for name in input_names}
        feature["example_id"] = example["id"]
        feature["cls_index"] = cls_index
        # Context tokens are contiguous (question first); their span lets collate_qa build the
        # p_mask of the positions an answer can never take, at two ints per feature.
        context_tokens = [t for t, seq_id in enumerate(sequence_ids) if seq_id == 1]
        feature["context_span"] = (context_tokens[0], context_tokens[-1]) if context_tokens else None
        # Context tokens are those of the second sequence; everything else gets no offset.
        offsets = [
            tuple(off) if seq_id == 1 else None
            for off, seq_id in zip(enc["offset_mapping"][i], sequence_ids, strict=True)
        ]
        if for_training:
            start, end = _label_span(example, offsets)
            feature["start_positions"] = cls_index if start is None else start
            feature["end_positions"] = cls_index if end is None else end
        else:
            feature["offset_mapping"] = offsets
        features.append(feature)
    return features


def _check_question_room(
    examples: Sequence[Mapping], questions: list[str], tokenizer: Any, max_length: int, doc_stride: int
) -> None:
    """Fail clearly where the fast tokenizer would fail obscurely (or panic).

    A window holds max_length - special tokens - question tokens context tokens; the
    tokenizer needs that room to be larger than doc_stride.
    """
    n_special = tokenizer.num_special_tokens_to_add(pair=True)
    question_ids = tokenizer(questions, add_special_tokens=False)["input_ids"]
    for example, ids in zip(examples, question_ids, strict=True):
        room = max_length - n_special - len(ids)
        if room <= doc_stride:
            raise DataError(
                f"Question {example['id']!r} has {len(ids)} tokens, leaving {room} context tokens per window "
                f"with max_length={max_length}, which must exceed doc_stride={doc_stride}; raise max_length "
                "or lower doc_stride."
            )


def _label_span(example: Mapping, offsets: Sequence[tuple[int, int] | None]) -> tuple[int | None, int | None]:
    """Token span of the first gold answer in this window, or (None, None) if not wholly inside."""
    answers = example["answers"]
    if example.get("is_impossible") or not answers["text"]:
        return None, None
    start_char = answers["answer_start"][0]
    end_char = start_char + len(answers["text"][0])
    context_tokens = [i for i, off in enumerate(offsets) if off is not None]
    if not context_tokens:
        return None, None
    first, last = context_tokens[0], context_tokens[-1]
    if offsets[first][0] > start_char or offsets[last][1] < end_char:
        return None, None
    # The smallest token span covering the answer characters: the first token ending after
    # the answer starts, and the last token starting before it ends.
    start = next(i for i in context_tokens if offsets[i][1] > start_char)
    end = next(i for i in reversed(context_tokens) if offsets[i][0] < end_char)
    if end < start:  # an empty answer text; cannot be labelled
        return None, None
    return start, end


# ---------------------------------------------------------------------------------------------
# Batching
# ---------------------------------------------------------------------------------------------


def collate_qa(
    features: Sequence[Mapping], pad_token_id: int, *, pad_to: int | None = None, p_mask: bool = False
) -> dict[str, torch.Tensor]:
    """Pad features into a batch of int64 tensors, on the right.

    Args:
        features: dicts from `prepare_features`.
        pad_token_id: the tokenizer's pad token id (fills input_ids; masks and token types get 0).
        pad_to: pad to this length instead of the longest feature of the batch (for fixed
            shapes, e.g. reproducing max_length padding).
        p_mask: also return "p_mask", Hugging Face's convention for the positions that cannot
            be an answer: 1 for question tokens, special tokens and padding, 0 for context
            tokens and the CLS token (the no-answer position).

    Returns:
        "input_ids", "attention_mask" and, when the features have them, "token_type_ids",
        each (B, T); "start_positions" and "end_positions", (B,), for training features;
        "p_mask" (B, T) when asked. Other keys (example_id, offset_mapping, cls_index,
        context_span) stay in the feature list.
    """
    if not features:
        raise DataError("collate_qa got an empty list of features.")
    names = [k for k in _PADDED_INPUTS if k in features[0]]
    longest = max(len(f["input_ids"]) for f in features)
    length = longest if pad_to is None else pad_to
    if length < longest:
        raise DataError(
            f"pad_to={pad_to} is shorter than the longest feature ({longest} tokens); raise pad_to."
        )
    batch: dict[str, torch.Tensor] = {}
    for name in names:
        pad_value = pad_token_id if _PADDED_INPUTS[name] is None else _PADDED_INPUTS[name]
        rows = torch.full((len(features), length), pad_value, dtype=torch.long)  # (B, T)
        for b, feature in enumerate(features):
            if name not in feature:
                raise DataError(
                    f"Feature {b} of the batch has no {name!r} while feature 0 has; mixed tokenizers?"
                )
            values = feature[name]
            rows[b, : len(values)] = torch.as_tensor(values, dtype=torch.long)
        batch[name] = rows
    if all(label in features[0] for label in _LABELS):
        for label in _LABELS:
            batch[label] = torch.tensor([f[label] for f in features], dtype=torch.long)  # (B,)
    if p_mask:
        batch["p_mask"] = _p_mask(features, length)
    return batch


def _p_mask(features: Sequence[Mapping], length: int) -> torch.Tensor:
    """(B, T) int64: 1 where no answer can start or end, 0 on context tokens and CLS."""
    mask = torch.ones((len(features), length), dtype=torch.long)  # (B, T)
    for b, feature in enumerate(features):
        if "context_span" not in feature:
            raise DataError(
                f"Feature {b} of the batch has no 'context_span'; make the features with "
                "prepare_features of this version of prunekit to get a p_mask."
            )
        span = feature["context_span"]
        if span is not None:
            mask[b, span[0] : span[1] + 1] = 0
        mask[b, feature.get("cls_index", 0)] = 0
    return mask


# ---------------------------------------------------------------------------------------------
# Post-processing
# ---------------------------------------------------------------------------------------------


def postprocess_predictions(
    examples: Sequence[Mapping],
    features: Sequence[Mapping],
    start_logits: Sequence[Any] | np.ndarray | torch.Tensor,
    end_logits: Sequence[Any] | np.ndarray | torch.Tensor,
    n_best: int = 20,
    max_answer_length: int = 30,
    version_2: bool = False,
    null_threshold: float = 0.0,
) -> dict[str, str]:
    """Turn start/end logits of evaluation features into one answer text per question.

    For every feature, the `n_best` highest start and end positions are paired; a pair is a
    candidate when both tokens are context tokens, end >= start and the span has at most
    `max_answer_length` tokens. Its score is start logit + end logit, and its text is the
    context between the first token's start and the last token's end character. The best
    candidate over all features of an example wins, which is how overlapping windows are
    merged. With `version_2`, the null score is the lowest start+end logit at the CLS token over
    the example's features, and the answer is empty when null score - best score >
    `null_threshold`.

    Args:
        examples: dicts from `load_squad` (only "id" and "context" are read).
        features: evaluation features from `prepare_features(..., for_training=False)`, in the
            same order as the logits.
        start_logits, end_logits: per feature, a 1-D array of token logits at least as long as
            the feature (padding positions beyond it are ignored); a list of arrays or tensors,
            or a (N_features, T) array or tensor.
        n_best: start and end positions considered per feature.
        max_answer_length: longest answer, in tokens.
        version_2: allow the empty answer (SQuAD v2.0).
        null_threshold: margin the null score must exceed the best span score by.

    Returns:
        question id -> answer text ("" for no answer), for every example.
    """
    if len(start_logits) != len(features) or len(end_logits) != len(features):
        raise DataError(
            f"Got {len(features)} features but {len(start_logits)} start and {len(end_logits)} end logit rows; "
            "pass one row per feature, in feature order."
        )
    if n_best < 1 or max_answer_length < 1:
        raise DataError(f"n_best ({n_best}) and max_answer_length ({max_answer_length}) must be >= 1.")
    contexts = {ex["id"]: ex["context"] for ex in examples}
    # Per example: best span (score, char start, char end) and the lowest null score.
    best: dict[str, tuple[float, int, int]] = {}
    null_score: dict[str, float] = {}
    for f_idx, feature in enumerate(tqdm(features, desc="SQuAD answers", disable=len(features) < 10_000)):
        if "offset_mapping" not in feature:
            raise DataError(
                f"Feature {f_idx} has no 'offset_mapping'; post-process features made with for_training=False."
            )
        qid = feature["example_id"]
        if qid not in contexts:
            raise DataError(
                f"Feature {f_idx} belongs to question {qid!r}, which is not among the examples passed."
            )
        offsets = feature["offset_mapping"]
        n_tok = len(offsets)
        start = _as_row(start_logits[f_idx], n_tok, f_idx)  # (n_tok,)
        end = _as_row(end_logits[f_idx], n_tok, f_idx)  # (n_tok,)

        cls = feature.get("cls_index", 0)
        null = float(start[cls] + end[cls])
        null_score[qid] = min(null, null_score.get(qid, null))

        span = _best_span(start, end, offsets, n_best, max_answer_length)
        if span is not None and (qid not in best or span[0] > best[qid][0]):
            best[qid] = span

    answers: dict[str, str] = {}
    n_no_span = 0
    for ex in examples:
        qid = ex["id"]
        if qid not in best:
            if qid in null_score:  # had features, but none with a valid span
                n_no_span += 1
            answers[qid] = ""
            continue
        score, char_start, char_end = best[qid]
        if version_2 and null_score[qid] - score > null_threshold:
            answers[qid] = ""
        else:
            answers[qid] = contexts[qid][char_start:char_end]
    missing = sum(1 for ex in examples if ex["id"] not in null_score)
    if missing:
        logger.warning("%d examples have no features and get the empty answer.", missing)
    if n_no_span:
        logger.warning("%d examples have no valid answer span and get the empty answer.", n_no_span)
    return answers


def _as_row(logits: Any, n_tok: int, f_idx: int) -> np.ndarray:
    """One feature's logits as a float64 numpy row cut to the feature's length."""
    if isinstance(logits, torch.Tensor):
        logits = logits.detach().float().cpu().numpy()
    row = np.asarray(logits, dtype=np.float64)
    if row.ndim != 1 or row.shape[0] < n_tok:
        raise DataError(
            f"Logits of feature {f_idx} have shape {row.shape}, expected a 1-D row of at least {n_tok} "
            "values (one per token of the feature)."
        )
    return row[:n_tok]


def _best_span(
    start: np.ndarray,
    end: np.ndarray,
    offsets: Sequence[tuple[int, int] | None],
    n_best: int,
    max_answer_length: int,
) -> tuple[float, int, int] | None:
    """(score, char start, char end) of the best valid span among the n-best starts and ends."""
    is_context = np.array([off is not None for off in offsets])  # (n_tok,)
    # Stable sort on the negated logits: ties resolve to the earlier token, reproducibly.
    top_start = np.argsort(-start, kind="stable")[:n_best]  # (k,)
    top_end = np.argsort(-end, kind="stable")[:n_best]  # (k,)
    s_idx, e_idx = np.meshgrid(top_start, top_end, indexing="ij")  # (k, k) each
    length = e_idx - s_idx + 1
    valid = is_context[s_idx] & is_context[e_idx] & (length >= 1) & (length <= max_answer_length)
    if not valid.any():
        return None
    scores = np.where(valid, start[s_idx] + end[e_idx], -np.inf)  # (k, k)
    flat = int(np.argmax(scores))
    s, e = int(s_idx.flat[flat]), int(e_idx.flat[flat])
    return float(scores.flat[flat]), offsets[s][0], offsets[e][1]
