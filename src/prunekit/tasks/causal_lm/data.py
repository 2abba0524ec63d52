"""Causal language modelling as a task family: calibration text and perplexity.

Text comes from a file (plain text such as WikiText-2's ``wiki.test.raw``, or JSON lines with a
``text`` field), a folder holding one file per split (``wiki.{train,valid,test}.{raw,tokens}``,
``{train,validation,test}.{txt,jsonl}``), or a ``datasets`` hub name such as ``wikitext`` or
``allenai/c4`` (``NAME`` or ``NAME:CONFIG``) when a hub is reachable. Rows are joined with "\\n\\n",
as the LLM pruning literature does for WikiText-2; the rows of a plain text file are its lines, a
blank line an empty row, as in the hub's WikiText rows, so a local copy gives the hub's text.

- Calibration (kprune_kwon.md §5; SparseGPT/Wanda practice): N windows of L consecutive tokens at
  seeded random offsets of the tokenized calibration text, never from a test split.
- Evaluation: perplexity of the whole test text in windows of ``window`` tokens. With ``stride``
  equal to the window (the default) the windows do not overlap; a smaller stride scores each token
  once, with up to ``window - stride`` tokens of context carried over from the previous window.
  Tools disagree on the window (128 in LLM-Pruner and FLAP, 2048 in SliceGPT and Wanda), so every
  result states it.
"""

from __future__ import annotations

import json
import logging
import math
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from prunekit.core.errors import ConfigError, DataError, ModelError
from prunekit.families import adapter_class
from prunekit.tasks.calibration import CalibrationSample
from prunekit.tasks.losses import LmOutputs, next_token_nll

logger = logging.getLogger(__name__)

__all__ = [
    "build_lm_calibration_sample",
    "perplexity",
    "read_text",
    "resolve_text_file",
    "tokenize_text",
]

# File names per split inside a folder, in order of preference. Calibration prefers the train split
# and falls back to validation; it never reads a test file.
_SPLIT_STEMS = {
    "train": ("wiki.train.raw", "wiki.train.tokens", "train.txt", "train.jsonl", "train.raw"),
    "validation": ("wiki.valid.raw", "wiki.valid.tokens", "validation.txt", "valid.txt", "validation.jsonl",
                   "valid.jsonl", "dev.txt", "dev.jsonl"),
    "test": ("wiki.test.raw", "wiki.test.tokens", "test.txt", "test.jsonl", "test.raw"),
}
_HUB_SPLITS = {"train": "train", "validation": "validation", "test": "test"}
CALIBRATION_SPLITS = ("train", "validation")


def resolve_text_file(source: str | os.PathLike[str], splits: Sequence[str]) -> Path | None:
    """The local file that holds the first of ``splits`` found in ``source`` (a file is itself);
    None when ``source`` is not a local path (a hub name)."""
    path = Path(source).expanduser()
    if path.is_file():
        return path
    if path.is_dir():
        for split in splits:
            for name in _SPLIT_STEMS[split]:
                if (path / name).is_file():
                    return path / name
        wanted = " or ".join(_SPLIT_STEMS[s][0] for s in splits)
        raise DataError(f"{path} holds no {'/'.join(splits)} text (looked for {wanted} and the like); "
                        "pass the text file itself or a folder with one file per split")
    if os.sep in str(source) or str(source).startswith((".", "~")) or Path(source).suffix in (".txt", ".jsonl",
                                                                                            ".raw", ".tokens"):
        raise DataError(f"text data {source} does not exist; pass a text file, a folder or a datasets hub name")
    return None


def _read_file(path: Path) -> list[str]:
    """The rows of a text file (its lines) or of a JSON-lines file (each line's ``text``)."""
    rows: list[str] = []
    with path.open("rb") as handle:
        for number, raw in enumerate(handle, start=1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as err:
                raise DataError(f"{path} line {number} is not UTF-8 text ({err.reason} at byte {err.start}); "
                                "convert the file to UTF-8") from err
            if path.suffix == ".jsonl":
                if not line.strip():
                    continue
                try:
                    record = json.loads(line)
                except json.JSONDecodeError as err:
                    raise DataError(f"{path} line {number} is not a JSON object: {err.msg}") from err
                if not isinstance(record, dict) or not isinstance(record.get("text"), str):
                    raise DataError(f"{path} line {number} has no string field 'text'; "
                                    "JSON lines for causal LM data need {\"text\": ...}")
                rows.append(record["text"])
            else:
                # As the datasets hub's WikiText rows: a blank line is an empty row, a text line
                # keeps its newline.
                rows.append(line if line.strip() else "")
    return rows


def _read_hub(name: str, split: str, max_chars: int | None) -> list[str]:
    from datasets import load_dataset  # only when a hub name is given

    path, _, config = name.partition(":")
    streaming = max_chars is not None
    try:
        data = load_dataset(path, config or None, split=_HUB_SPLITS[split], streaming=streaming)
    except Exception as err:  # hub errors are many and deep; the user needs one line
        raise DataError(f"could not load {split} text from the datasets hub {name!r}: {str(err).splitlines()[0]}; "
                        "pass a local text file or folder instead") from err
    rows: list[str] = []
    total = 0
    for record in data:
        rows.append(record["text"])
        total += len(record["text"])
        if max_chars is not None and total >= max_chars:
            break
    return rows


def read_text(source: str | os.PathLike[str], split: str, max_chars: int | None = None) -> str:
    """The text of one split (``train``, ``validation`` or ``test``; ``calibration`` = train, else
    validation), rows joined with "\\n\\n". ``max_chars`` bounds what is read from a hub (C4)."""
    splits = CALIBRATION_SPLITS if split == "calibration" else (split,)
    if splits[0] not in _SPLIT_STEMS:
        raise ConfigError(f"unknown split {split!r}; use train, validation, test or calibration")
    file = resolve_text_file(source, splits)
    if file is not None:
        if split == "calibration" and "test" in file.name:
            raise DataError(f"{file} looks like a test split; prunekit never calibrates on test text. "
                            "Pass the train or validation text (e.g. wiki.valid.tokens)")
        rows = _read_file(file)
        where = str(file)
    else:
        rows = []
        for name in splits:
            try:
                rows = _read_hub(str(source), name, max_chars)
                break
            except DataError:
                if name == splits[-1]:
                    raise
        where = f"hub {source}"
    text = "\n\n".join(rows)
    if not text.strip():
        raise DataError(f"{where} holds no text for the {split} split")
    logger.info("read %d rows (%d characters) of %s text from %s", len(rows), len(text), split, where)
    return text


def tokenize_text(tokenizer: Any, text: str) -> torch.Tensor:
    """The whole text as one (N,) int64 token stream, with the tokenizer's special tokens (a BOS at
    the start for Llama-style tokenizers) added once, as the reference perplexity code does."""
    ids = tokenizer(text, return_attention_mask=False, verbose=False)["input_ids"]
    return torch.tensor(ids, dtype=torch.long)


def build_lm_calibration_sample(
    tokenizer: Any,
    source: str | os.PathLike[str] | torch.Tensor,
    num_sequences: int = 128,
    seq_len: int = 2048,
    seed: int = 0,
    batch_size: int = 8,
    task: str = "causal_lm",
) -> CalibrationSample:
    """``num_sequences`` windows of ``seq_len`` tokens at seeded random offsets of the calibration
    text (``source``: a path or hub name, read with split ``calibration``; or the token stream).
    Batches hold input_ids, attention_mask (all ones) and labels (= input_ids; the model shifts)."""
    for name, value in (("num_sequences", num_sequences), ("seq_len", seq_len), ("batch_size", batch_size)):
        if not isinstance(value, int) or value < 1:
            raise ConfigError(f"{name} must be a positive integer, got {value!r}")
    if isinstance(source, torch.Tensor):
        stream = source
    else:
        # Characters read from a hub: about four per token, with room for the random offsets.
        stream = tokenize_text(tokenizer, read_text(source, "calibration", max_chars=num_sequences * seq_len * 8))
    if stream.numel() <= seq_len:
        raise DataError(f"the calibration text has {stream.numel()} tokens, not more than one window of {seq_len}; "
                        "give more text or a shorter seq_len")
    rng = np.random.default_rng(seed)
    starts = rng.integers(0, stream.numel() - seq_len, size=num_sequences)
    windows = torch.stack([stream[int(s) : int(s) + seq_len] for s in starts])  # (N, L)
    batches = [
        {"input_ids": chunk, "attention_mask": torch.ones_like(chunk), "labels": chunk.clone()}
        for chunk in windows.split(batch_size)
    ]
    sample = CalibrationSample(task=task, batches=batches, num_sequences=num_sequences,
                               num_tokens=num_sequences * seq_len, mean_length=float(seq_len), seed=seed,
                               batch_size=batch_size, max_length=seq_len, indices=tuple(int(s) for s in starts),
                               batch_order="draw")  # equal-length windows: nothing to group
    logger.info("calibration sample: %d windows of %d tokens from a %d-token text", num_sequences, seq_len,
                stream.numel())
    return sample


def _causal_lm_parts(model: torch.nn.Module) -> Any:
    """The body and output head of a causal LM prunekit has an adapter for (read, not changed);
    None for any other model, which is then run whole (its head may do more than a linear map)."""
    try:
        return adapter_class(model).causal_lm_parts(model)
    except (ModelError, ValueError):
        return None


def _windows(num_tokens: int, window: int, stride: int) -> list[tuple[int, int, int]]:
    """(begin, end, scored) per window: tokens [begin, end) go in, the last ``scored`` are scored."""
    spans = []
    scored_up_to = 0
    for begin in range(0, num_tokens, stride):
        end = min(begin + window, num_tokens)
        if end - begin < 2 and begin > 0:
            break
        spans.append((begin, end, end - scored_up_to))
        scored_up_to = end
        if end == num_tokens:
            break
    return spans


@torch.no_grad()
def perplexity(
    model: torch.nn.Module,
    tokens: torch.Tensor,
    window: int = 2048,
    stride: int | None = None,
    batch_size: int = 1,
    device: torch.device | str | None = None,
    desc: str = "perplexity",
) -> dict[str, Any]:
    """Perplexity of a causal LM over the token stream ``tokens`` (N,), in windows of ``window``
    tokens moved on by ``stride`` (default: ``window``, non-overlapping). Within a window every token
    but the first is predicted from those before it; with overlap, only tokens no earlier window
    scored are counted. Returns perplexity, mean NLL (nats), tokens scored, window and stride."""
    stride = window if stride is None else stride
    if window < 2 or not 1 <= stride <= window:
        raise ConfigError(f"perplexity needs window >= 2 and 1 <= stride <= window; got window {window}, "
                          f"stride {stride}")
    device = torch.device(device) if device is not None else next(model.parameters()).device
    spans = _windows(tokens.numel(), window, stride)
    total_nll = 0.0
    total_scored = 0
    model.eval()
    # Windows of equal length batch together; only the last may be shorter.
    groups: list[list[tuple[int, int, int]]] = []
    for span in spans:
        if groups and len(groups[-1]) < batch_size and groups[-1][0][1] - groups[-1][0][0] == span[1] - span[0]:
            groups[-1].append(span)
        else:
            groups.append([span])
    parts = _causal_lm_parts(model)
    for group in tqdm(groups, desc=desc, leave=False):
        input_ids = torch.stack([tokens[b:e] for b, e, _ in group]).to(device)  # (B, T)
        if parts is not None:  # the logits made a chunk of positions at a time
            nll = next_token_nll(LmOutputs(parts.final_hidden(input_ids=input_ids), parts.head), input_ids)
        else:
            logits = model(input_ids=input_ids).logits.float()  # (B, T, V)
            log_probs = torch.log_softmax(logits[:, :-1], dim=-1)
            nll = -log_probs.gather(-1, input_ids[:, 1:, None]).squeeze(-1)  # (B, T-1)
        for row, (begin, end, scored) in enumerate(group):
            count = min(scored, end - begin - 1)  # the window's first token has no prediction
            total_nll += float(nll[row, nll.shape[1] - count :].double().sum())
            total_scored += count
    mean = total_nll / max(total_scored, 1)
    return {
        "perplexity": math.exp(mean),
        "nll": mean,
        "num_tokens": int(tokens.numel()),
        "num_scored": total_scored,
        "window": window,
        "stride": stride,
    }
