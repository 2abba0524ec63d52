"""GLUE data: reading examples, tokenizing, dynamic padding and the calibration sample.

This module owns everything between a data source and the tensors a model sees for GLUE tasks
(architecture.md, flow steps 1-2):

- `load_examples` reads one split from a folder of original GLUE TSV files, a local CSV or
  JSON-lines file (or a folder of them), or the datasets hub, and checks it: missing files,
  missing columns, unknown labels, malformed rows and empty data raise `DataError` with the file,
  the row and the fix.
- `tokenize_examples` and `collate` turn examples into unpadded features and padded batches.
- `build_calibration_sample` draws the seeded calibration sample of kprune_kwon.md §1.2 and pads
  it once, so every pass of a pruning method sees identical batches.

Examples are plain dicts keyed by the task's canonical text columns plus "label" (a class id,
or a float score for regression).
"""

from __future__ import annotations

import csv
import io
import json
import logging
import math
import os
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from prunekit.core.errors import ConfigError, DataError
from prunekit.core.preflight import read_utf8
from prunekit.tasks.calibration import CalibrationSample, batch_sample, check_sample_options, draw_indices
from prunekit.tasks.spec import TaskSpec, get_task

logger = logging.getLogger(__name__)

__all__ = [
    "CalibrationSample",
    "build_calibration_sample",
    "collate",
    "iter_feature_batches",
    "load_examples",
    "tokenize_examples",
]

_SPLITS = ("train", "dev")
_SPLIT_ALIASES = {"train": "train", "dev": "dev", "validation": "dev", "valid": "dev", "val": "dev"}
# Local file kinds we read, in the order a folder is searched after the GLUE TSV file.
_TABLE_SUFFIXES = (".csv", ".jsonl", ".json")
_MODEL_INPUTS = ("input_ids", "attention_mask", "token_type_ids")

Example = dict[str, Any]


# --------------------------------------------------------------------------------------------
# Reading examples
# --------------------------------------------------------------------------------------------


def load_examples(task: TaskSpec | str, source: str | os.PathLike[str], split: str) -> list[Example]:
    """Read one split of a GLUE task.

    Args:
        task: a TaskSpec or a task name from `prunekit.tasks.spec.TASKS`.
        source: where the data is, tried in this order:
            (a) a folder with the original GLUE TSV files (train.tsv, dev.tsv; dev_matched.tsv for
                MNLI), or a GLUE download root with the task's sub-folder (e.g. "SST-2");
            (b) a folder with train/dev .csv, .jsonl or .json files, or one such file (then used
                for whichever split is asked), with the task's canonical or GLUE TSV column names;
            (c) a datasets hub name such as "glue", only when `source` is not an existing path.
        split: "train" or "dev" ("validation" is accepted for "dev").

    Returns:
        One dict per example: the task's text columns (str) and "label" (int class id, or float
        for regression), in file order.

    Raises:
        DataError: missing folder or file, missing columns, unknown label, malformed row, empty data.
    """
    spec = get_task(task)
    split_key = _SPLIT_ALIASES.get(str(split).strip().lower())
    if split_key is None:
        raise DataError(f"unknown split {split!r}; use one of {', '.join(_SPLITS)}")
    path = Path(source).expanduser()
    if path.is_dir():
        examples = _read_file(spec, _find_split_file(spec, path, split_key), split_key)
    elif path.is_file():
        examples = _read_file(spec, path, split_key)
    elif _looks_like_path(str(source)):
        raise DataError(
            f"data source {str(source)!r} does not exist. Fix: pass a folder with the GLUE {spec.name} "
            f"files ({_expected_files(spec, split_key)}), a CSV/JSON-lines file, or a datasets hub name "
            f"such as 'glue'."
        )
    else:
        examples = _load_hub(spec, str(source), split_key)
    logger.info("read %d %s examples of %s from %s", len(examples), split_key, spec.name, source)
    return examples


def _looks_like_path(source: str) -> bool:
    """True when `source` is clearly meant as a local path rather than a hub name.

    Hub names look like "glue" or "nyu-mll/glue"; anything with a file suffix, a leading
    "/", "." or "~", a backslash, or more than one "/" is a path, so a typo in a local path gives
    a "does not exist" error instead of a confusing hub failure.
    """
    if source.startswith(("/", ".", "~")) or "\\" in source or source.count("/") > 1:
        return True
    return Path(source).suffix.lower() in (".tsv", ".txt", *_TABLE_SUFFIXES)


def _expected_files(spec: TaskSpec, split: str) -> str:
    names = [spec.tsv.file_for(split)] if spec.tsv else []
    names += [f"{split}{suffix}" for suffix in _TABLE_SUFFIXES]
    return ", ".join(names)


def _find_split_file(spec: TaskSpec, folder: Path, split: str, _descended: bool = False) -> Path:
    """The file holding `split` in `folder`: the GLUE TSV file first, then CSV/JSON(-lines)."""
    candidates = [spec.tsv.file_for(split)] if spec.tsv else []
    stems = (split, "validation") if split == "dev" else (split,)
    candidates += [f"{stem}{suffix}" for stem in stems for suffix in _TABLE_SUFFIXES]
    for name in candidates:
        if (folder / name).is_file():
            return folder / name
    # A GLUE download root holds one sub-folder per task ("SST-2", "MNLI", ...).
    sub_names = (*(spec.tsv.folder_names if spec.tsv else ()), spec.name)
    if not _descended:
        for sub in sub_names:
            if (folder / sub).is_dir():
                return _find_split_file(spec, folder / sub, split, _descended=True)
    raise DataError(
        f"no {split} data for task {spec.name!r} in {folder}: expected one of {', '.join(candidates)}"
        f" (or a sub-folder named {' or '.join(sub_names)}). Fix: point the source at the folder "
        f"with the task's GLUE files, or pass the data file itself."
    )


def _read_file(spec: TaskSpec, path: Path, split: str) -> list[Example]:
    suffix = path.suffix.lower()
    if suffix in (".tsv", ".txt"):
        layout = spec.tsv
        header = layout.header if layout else True
        positional = layout.columns if layout and not layout.header else None
        examples = _read_delimited(spec, path, "\t", csv.QUOTE_NONE, header, positional)
    elif suffix == ".csv":
        examples = _read_delimited(spec, path, ",", csv.QUOTE_MINIMAL, True, None)
    elif suffix in (".jsonl", ".json"):
        examples = _read_json(spec, path)
    else:
        raise DataError(f"cannot read {path}: unknown file type {suffix!r}; use .tsv, .csv, .jsonl or .json")
    if not examples:
        raise DataError(f"{path} holds no {split} examples (the file has no data rows)")
    return examples


def _column_roles(spec: TaskSpec) -> list[tuple[str, tuple[str, ...]]]:
    """Each needed column as (canonical name, accepted names): canonical first, then the TSV name."""
    roles: list[tuple[str, tuple[str, ...]]] = []
    tsv_texts = spec.tsv.text_columns if spec.tsv else spec.text_columns
    for canonical, tsv_name in zip(spec.text_columns, tsv_texts, strict=True):
        roles.append((canonical, tuple(dict.fromkeys((canonical, tsv_name)))))
    tsv_label = spec.tsv.label_column if spec.tsv else spec.label_column
    roles.append(("label", tuple(dict.fromkeys((spec.label_column, tsv_label)))))
    return roles


def _resolve_columns(spec: TaskSpec, found: Sequence[str], origin: str) -> dict[str, str]:
    """Map each canonical column (and "label") to the name it has in `found`."""
    mapping: dict[str, str] = {}
    missing: list[str] = []
    for canonical, accepted in _column_roles(spec):
        name = next((n for n in accepted if n in found), None)
        if name is None:
            missing.append(" or ".join(repr(n) for n in accepted))
        else:
            mapping[canonical] = name
    if missing:
        raise DataError(
            f"{origin} lacks the column(s) task {spec.name!r} needs: {', '.join(missing)}; "
            f"found columns: {', '.join(repr(c) for c in found) or '(none)'}"
        )
    return mapping


def _read_delimited(
    spec: TaskSpec,
    path: Path,
    delimiter: str,
    quoting: int,
    header: bool,
    positional: Sequence[str] | None,
) -> list[Example]:
    # utf-8-sig: GLUE's MRPC files start with a byte-order mark that would glue onto "Quality".
    with io.StringIO(read_utf8(path), newline="") as handle:
        reader = csv.reader(handle, delimiter=delimiter, quoting=quoting)
        if header:
            first = next(reader, None)
            if first is None:
                raise DataError(f"{path} is empty: expected a header row and data rows")
            columns = [c.strip() for c in first]
        else:
            columns = list(positional or ())
        mapping = _resolve_columns(spec, columns, str(path))
        index = {canonical: columns.index(name) for canonical, name in mapping.items()}
        examples: list[Example] = []
        for row in reader:
            if not row or (len(row) == 1 and not row[0].strip()):
                continue  # blank line, e.g. a trailing newline
            where = f"{path}, line {reader.line_num}"
            if len(row) != len(columns):
                raise DataError(
                    f"malformed row at {where}: {len(row)} columns, expected {len(columns)} "
                    f"({', '.join(columns)}). Check the delimiter and that no field holds a stray tab."
                )
            examples.append(_make_example(spec, {c: row[i] for c, i in index.items()}, where))
    return examples


def _read_json(spec: TaskSpec, path: Path) -> list[Example]:
    """JSON lines (one object per line), or a .json file holding one array of objects."""
    text = read_utf8(path)
    records: list[tuple[str, Any]] = []
    if text.lstrip().startswith("["):
        try:
            array = json.loads(text)
        except json.JSONDecodeError as err:
            raise DataError(f"{path} is not valid JSON: {err}") from err
        records = [(f"{path}, record {i + 1}", obj) for i, obj in enumerate(array)]
    else:
        for line_no, line in enumerate(text.splitlines(), start=1):
            if not line.strip():
                continue
            where = f"{path}, line {line_no}"
            try:
                records.append((where, json.loads(line)))
            except json.JSONDecodeError as err:
                raise DataError(f"malformed row at {where}: not a JSON object ({err.msg})") from err
    if not records:
        return []
    first_where, first = records[0]
    if not isinstance(first, Mapping):
        raise DataError(f"malformed row at {first_where}: expected a JSON object, got {type(first).__name__}")
    mapping = _resolve_columns(spec, list(first), str(path))
    examples = []
    for where, obj in records:
        if not isinstance(obj, Mapping):
            raise DataError(f"malformed row at {where}: expected a JSON object, got {type(obj).__name__}")
        absent = [name for name in mapping.values() if name not in obj]
        if absent:
            raise DataError(f"malformed row at {where}: missing key(s) {', '.join(map(repr, absent))}")
        examples.append(_make_example(spec, {c: obj[name] for c, name in mapping.items()}, where))
    return examples


def _load_hub(spec: TaskSpec, name: str, split: str) -> list[Example]:
    # Imported here: `datasets` takes seconds to import and only this path needs it.
    import datasets

    hub_split = spec.hub_train_split if split == "train" else spec.hub_dev_split
    # The task's config ("sst2", "mnli", ...) only makes sense for the GLUE dataset itself.
    is_glue = name == spec.hub_path or name.endswith("/" + spec.hub_path)
    config = spec.hub_config if is_glue else None
    try:
        dataset = datasets.load_dataset(name, config, split=hub_split)
    except Exception as err:  # any hub failure (offline, unknown name) becomes one clear message
        raise DataError(
            f"{name!r} is not an existing local path, and loading it from the datasets hub "
            f"(config {config!r}, split {hub_split!r}) failed: {type(err).__name__}: {err}. Fix: pass a "
            f"folder with the GLUE TSV files or a CSV/JSON-lines file, or check the hub name."
        ) from err
    origin = f"hub dataset {name!r} ({config}, {hub_split})"
    mapping = _resolve_columns(spec, list(dataset.column_names), origin)
    columns = {canonical: list(dataset[hub_name]) for canonical, hub_name in mapping.items()}
    n_rows = len(columns["label"])
    examples = [
        _make_example(spec, {c: values[i] for c, values in columns.items()}, f"{origin}, row {i}")
        for i in range(n_rows)
    ]
    if not examples:
        raise DataError(f"{origin} holds no examples")
    return examples


def _make_example(spec: TaskSpec, raw: Mapping[str, Any], where: str) -> Example:
    example: Example = {}
    for column in spec.text_columns:
        value = raw[column]
        if value is None:
            raise DataError(f"malformed row at {where}: column {column!r} is empty (null)")
        example[column] = str(value)
    example["label"] = _parse_label(spec, raw["label"], where)
    return example


def _parse_label(spec: TaskSpec, raw: Any, where: str) -> int | float:
    """A class id (classification) or a finite float (regression) from a raw label value.

    Accepted for classification: the task's label values as written in GLUE ("0"/"1",
    "entailment", ...), its label names ("positive", ...), or an integral class id.
    """
    if spec.is_regression:
        value = None
        if not isinstance(raw, bool):
            try:
                value = float(str(raw).strip()) if isinstance(raw, str) else float(raw)
            except (TypeError, ValueError):
                value = None
        if value is None or not math.isfinite(value):
            raise DataError(
                f"unknown label {raw!r} at {where}: task {spec.name!r} is a regression task and "
                f"needs a finite number"
            )
        return value
    number = raw
    if isinstance(raw, str):
        text = raw.strip()
        if text in spec.label_values:
            return spec.label_values.index(text)
        if text in spec.label_names:
            return spec.label_names.index(text)
        try:
            number = float(text)
        except ValueError:
            pass
    if isinstance(number, int | float) and not isinstance(number, bool) and float(number).is_integer():
        class_id = int(number)
        if 0 <= class_id < spec.num_labels:
            return class_id
    allowed = ", ".join(repr(v) for v in spec.label_values)
    raise DataError(
        f"unknown label {raw!r} at {where}; task {spec.name!r} allows labels {allowed} "
        f"(or class ids 0..{spec.num_labels - 1})"
    )


# --------------------------------------------------------------------------------------------
# Tokenizing and padding
# --------------------------------------------------------------------------------------------


def tokenize_examples(
    task: TaskSpec | str,
    tokenizer: Any,
    examples: Sequence[Example],
    max_length: int | None = None,
) -> list[dict[str, Any]]:
    """Tokenize examples without padding, truncated to `max_length` (default: the task's).

    Returns:
        One dict per example with input_ids, attention_mask, token_type_ids (when the tokenizer
        returns them), each a list of ints of the example's length, and "label".
    """
    spec = get_task(task)
    max_len = spec.max_length if max_length is None else max_length
    if max_len < 1:
        raise ConfigError(f"max_length must be a positive number of tokens, got {max_length}")
    if not examples:
        return []
    missing = [c for c in spec.text_columns if c not in examples[0]]
    if missing:
        raise DataError(
            f"examples lack the text column(s) {missing} of task {spec.name!r}; "
            f"found keys {sorted(examples[0])}. Read them with prunekit.tasks.load_examples."
        )
    texts = [[example[c] for example in examples] for c in spec.text_columns]
    encoded = tokenizer(
        *texts, truncation=True, max_length=max_len, padding=False, return_attention_mask=True
    )
    keys = [k for k in _MODEL_INPUTS if k in encoded]
    features = []
    for i, example in enumerate(examples):
        feature = {k: list(encoded[k][i]) for k in keys}
        if "label" in example:
            feature["label"] = example["label"]
        features.append(feature)
    return features


def collate(
    features: Sequence[Mapping[str, Any]],
    pad_token_id: int | None,
    *,
    regression: bool | None = None,
    padding_side: str = "right",
) -> dict[str, torch.Tensor]:
    """Pad a list of features to the longest one in the batch.

    Args:
        features: dicts from `tokenize_examples`.
        pad_token_id: the tokenizer's pad id (input_ids padding; masks and type ids pad with 0).
        regression: label dtype; None infers it (float labels -> float32, ints -> int64).
        padding_side: "right" (encoders) or "left" (decoders).

    Returns:
        input_ids, attention_mask, token_type_ids (if present), each (B, T_max) int64, and
        "labels" (B,) when the features have labels.
    """
    if not features:
        raise DataError("cannot collate an empty list of features")
    if pad_token_id is None:
        raise ConfigError(
            "the tokenizer has no pad token; set one first, e.g. tokenizer.pad_token = tokenizer.eos_token"
        )
    if padding_side not in ("right", "left"):
        raise ConfigError(f"padding_side must be 'right' or 'left', got {padding_side!r}")
    longest = max(len(f["input_ids"]) for f in features)
    pad_values = {"input_ids": pad_token_id, "attention_mask": 0, "token_type_ids": 0}
    batch: dict[str, torch.Tensor] = {}
    for key in _MODEL_INPUTS:
        if key not in features[0]:
            continue
        rows = []
        for f in features:
            pad = [pad_values[key]] * (longest - len(f[key]))
            rows.append(list(f[key]) + pad if padding_side == "right" else pad + list(f[key]))
        batch[key] = torch.tensor(rows, dtype=torch.long)  # (B, T_max)
    if "attention_mask" not in batch:
        # The mask is what tells padding from tokens downstream, so it must always be there.
        lengths = torch.tensor([len(f["input_ids"]) for f in features])
        positions = torch.arange(longest)
        if padding_side == "right":
            batch["attention_mask"] = (positions[None, :] < lengths[:, None]).long()
        else:
            batch["attention_mask"] = (positions[None, :] >= longest - lengths[:, None]).long()
    if "label" in features[0]:
        labels = [f["label"] for f in features]
        if regression is None:
            regression = any(isinstance(v, float) for v in labels)
        batch["labels"] = torch.tensor(labels, dtype=torch.float32 if regression else torch.long)  # (B,)
    return batch


# --------------------------------------------------------------------------------------------
# Calibration sample (kprune_kwon.md §1.2)
# --------------------------------------------------------------------------------------------


def build_calibration_sample(
    task: TaskSpec | str,
    tokenizer: Any,
    source: str | os.PathLike[str],
    num_tokens: int = 100_000,
    num_sequences: int | None = None,
    seed: int = 0,
    batch_size: int = 32,
    max_length: int | None = None,
    replace: bool = True,
    sort_by_length: bool = True,
) -> CalibrationSample:
    """Draw the calibration sample from the training split (kprune_kwon.md §1.2).

    The number of sequences is min(floor(num_tokens / task.avg_seq_len), |train|) unless
    `num_sequences` is given. Indices come from `numpy.random.default_rng(seed).choice(n, k,
    replace=replace)`; the reference draws with replacement too, but from NumPy's legacy global
    generator, so the drawn indices differ from the reference's while the distribution is the same.

    With `sort_by_length`, the drawn sequences are sorted by length (stable), cut into batches
    of `batch_size`, and the batches are put in a seeded random order: each batch still holds
    `batch_size` sequences, but with far less padding than a random batch. Without it, batches
    follow the draw order, as in the reference.

    Args:
        task: TaskSpec or task name.
        tokenizer: a Hugging Face tokenizer (fast or slow).
        source: data source, as for `load_examples`.
        num_tokens: token budget that sets the number of sequences.
        num_sequences: number of sequences to draw; overrides `num_tokens`.
        seed: seed of the draw and of the batch order; the same seed gives identical batches.
        batch_size: sequences per batch.
        max_length: truncation length; default the task's.
        replace: draw with replacement (the reference does).
        sort_by_length: group sequences of similar length into batches (see above).
    """
    spec = get_task(task)
    check_sample_options(num_tokens, num_sequences, batch_size)
    max_len = spec.max_length if max_length is None else max_length
    train = load_examples(spec, source, "train")
    rng, drawn = draw_indices(spec, len(train), num_tokens, num_sequences, seed, replace, unit="sequence")
    features = tokenize_examples(spec, tokenizer, [train[i] for i in drawn], max_length=max_len)
    pad_id = tokenizer.pad_token_id
    return batch_sample(
        spec, features, drawn, rng, lambda group: collate(group, pad_id, regression=spec.is_regression),
        batch_size, max_len, seed, sort_by_length,
    )


def iter_feature_batches(
    features: Sequence[dict[str, Any]], batch_size: int, pad_token_id: int | None, *, regression: bool
) -> Iterator[dict[str, torch.Tensor]]:
    """Consecutive batches of `features` in their order, padded with `collate`."""
    for start in range(0, len(features), batch_size):
        yield collate(features[start : start + batch_size], pad_token_id, regression=regression)
