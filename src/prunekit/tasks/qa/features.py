"""SQuAD features: examples tokenized into overlapping windows, and their batches.

Settings from kprune_kwon.md §1.2: max length 384, doc stride 128, question first, only the
context truncated.

- `prepare_features` turns examples into model features with a fast tokenizer. A long context
  becomes several overlapping windows ("features") of one example. Training features carry
  start/end token labels; evaluation features carry the example id and the character offsets
  needed to map token spans back to context text.
- `collate_qa` pads a list of features into a batch of tensors.

Features are plain dicts (lists of ints), unpadded; padding happens per batch in `collate_qa`.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from tqdm.auto import tqdm

from prunekit.core.errors import DataError

logger = logging.getLogger(__name__)

__all__ = ["collate_qa", "prepare_features"]

# Examples tokenized per call of the fast tokenizer: large enough to amortise the call,
# small enough for a useful progress bar.
_TOKENIZE_CHUNK = 1000
# Features (not tensors) that collate_qa turns into model inputs, with their padding value.
# None means "the tokenizer's pad token id".
_PADDED_INPUTS: dict[str, int | None] = {"input_ids": None, "attention_mask": 0, "token_type_ids": 0}
_LABELS = ("start_positions", "end_positions")


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
