"""SQuAD as a prunekit task: reading a task's split, and the QA calibration sample.

This module binds the SQuAD data functions of `prunekit.tasks.qa` to the "squad" and
"squad_v2" TaskSpecs (architecture.md, flow steps 1-2; kprune_kwon.md §1.2 and P13):

- `load_squad_split` reads one split from an official JSON file (used for whichever split is
  asked), a folder holding the official files (train-v1.1.json / dev-v1.1.json, or the v2.0
  names), a `datasets` hub name, or a list of examples already loaded (e.g. one part of
  `split_by_article`), so a caller can choose exactly which questions a teacher, a calibration
  sample or an evaluation sees.
- `build_qa_calibration_sample` tokenizes the training examples into features (max length 384,
  doc stride 128, question first), draws floor(num_tokens / 170) features with replacement, and
  pads them once into batches of 12, each padded to its longest feature. The batches carry
  `start_positions` / `end_positions` (the labels Kwon et al.'s Fisher pass needs) and `p_mask`
  (the positions that can never be an answer, for Kprune's optional masking, P13).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from prunekit.core.errors import ConfigError, DataError
from prunekit.tasks.calibration import CalibrationSample, batch_sample, check_sample_options, draw_indices
from prunekit.tasks.qa.features import collate_qa, prepare_features
from prunekit.tasks.qa.files import load_squad
from prunekit.tasks.spec import TaskSpec, get_task

logger = logging.getLogger(__name__)

__all__ = ["QaSource", "build_qa_calibration_sample", "load_squad_split", "squad_task"]

# A SQuAD source: a path or hub name, or examples as `load_squad` returns them.
QaSource = str | os.PathLike[str] | Sequence[Mapping[str, Any]]

_SPLIT_ALIASES = {"train": "train", "dev": "dev", "validation": "dev", "valid": "dev", "val": "dev"}
_EXAMPLE_KEYS = ("id", "context", "question", "answers")


def squad_task(task: TaskSpec | str) -> TaskSpec:
    """The TaskSpec of a SQuAD task; any other kind is a ConfigError."""
    spec = get_task(task)
    if spec.kind != "squad":
        raise ConfigError(f"task {spec.name!r} is a {spec.kind} task, not a SQuAD task ('squad' or 'squad_v2')")
    return spec


def load_squad_split(task: TaskSpec | str, source: QaSource, split: str) -> list[dict]:
    """Read one split of a SQuAD task.

    Args:
        task: "squad", "squad_v2" or their TaskSpec.
        source: where the questions are, tried in this order:
            (a) a list of example dicts (as `load_squad` returns): used as they are, for any split;
            (b) a folder holding the task's official files (train-v1.1.json and dev-v1.1.json;
                train-v2.0.json and dev-v2.0.json for squad_v2);
            (c) one official-format JSON file, used for whichever split is asked;
            (d) a datasets hub name such as "squad", only when `source` is not an existing path.
        split: "train" or "dev" ("validation" is accepted for "dev").

    Returns:
        Example dicts: "id", "title", "context", "question", "answers", "is_impossible".

    Raises:
        DataError: unknown split, missing folder, file or split file, malformed examples,
            unanswerable questions for the v1.1 task, or a hub name that cannot be loaded.
    """
    spec = squad_task(task)
    split_key = _SPLIT_ALIASES.get(str(split).strip().lower())
    if split_key is None:
        raise DataError(f"unknown split {split!r}; use 'train' or 'dev'")
    if not isinstance(source, str | os.PathLike):
        return _checked_examples(spec, source)
    path = Path(source).expanduser()
    if path.is_dir():
        file_name = spec.squad_files[0 if split_key == "train" else 1]
        if not (path / file_name).is_file():
            present = sorted(p.name for p in path.glob("*.json"))
            raise DataError(
                f"no {split_key} file for task {spec.name!r} in {path}: expected {file_name} "
                f"(found: {', '.join(present) or 'no .json files'}). Fix: add the official file there, or pass "
                "the JSON file itself (it is then used for every split)."
            )
        return _load(spec, path / file_name)
    if path.is_file():
        return _load(spec, path)
    text = str(source)
    if text.startswith(("/", ".", "~")) or "\\" in text or text.count("/") > 1 or path.suffix:
        raise DataError(
            f"SQuAD data source {text!r} does not exist. Fix: pass an official SQuAD JSON file, a folder "
            f"holding {' and '.join(spec.squad_files)}, or a datasets hub name such as {spec.hub_path!r}."
        )
    hub_split = spec.hub_train_split if split_key == "train" else spec.hub_dev_split
    return _load(spec, text, hub_split)


def _load(spec: TaskSpec, source: str | Path, hub_split: str = "validation") -> list[dict]:
    try:
        return load_squad(source, version_2=spec.version_2, split=hub_split)
    except DataError as err:
        if not spec.version_2 and "version_2=True" in str(err):
            raise DataError(f"{err} With the CLI: use --task squad_v2 for SQuAD v2.0 data.") from err
        raise


def _checked_examples(spec: TaskSpec, examples: Sequence[Mapping[str, Any]]) -> list[dict]:
    """Examples passed in directly: the keys the pipeline reads, and v1.1 answerability."""
    if isinstance(examples, Mapping) or not isinstance(examples, Sequence):
        raise DataError(
            f"a SQuAD source must be a path, a hub name or a list of example dicts, got {type(examples).__name__}"
        )
    if not examples:
        raise DataError("the list of SQuAD examples is empty; pass at least one question")
    checked = []
    for i, example in enumerate(examples):
        if not isinstance(example, Mapping):
            raise DataError(f"SQuAD example {i} is a {type(example).__name__}, expected a dict as load_squad returns")
        missing = [key for key in _EXAMPLE_KEYS if key not in example]
        if missing:
            raise DataError(
                f"SQuAD example {i} lacks {', '.join(map(repr, missing))}; pass dicts as "
                "prunekit.tasks.qa.load_squad returns them"
            )
        answers = example["answers"]
        if not isinstance(answers, Mapping) or "text" not in answers or "answer_start" not in answers:
            raise DataError(
                f"SQuAD example {example['id']!r}: 'answers' must be a dict with 'text' and 'answer_start' lists"
            )
        if not spec.version_2 and not answers["text"]:
            raise DataError(
                f"SQuAD example {example['id']!r} has no answer, which SQuAD v1.1 does not allow; "
                "use the task 'squad_v2' for unanswerable questions"
            )
        checked.append(dict(example))
    return checked


def build_qa_calibration_sample(
    task: TaskSpec | str,
    tokenizer: Any,
    source: QaSource,
    num_tokens: int = 100_000,
    num_sequences: int | None = None,
    seed: int = 0,
    batch_size: int | None = None,
    max_length: int | None = None,
    doc_stride: int | None = None,
    replace: bool = True,
    sort_by_length: bool = True,
) -> CalibrationSample:
    """Draw the calibration sample of a SQuAD task from its training split (kprune_kwon.md §1.2).

    Every training example is cut into features (overlapping windows of the context); the
    number drawn is min(floor(num_tokens / task.avg_seq_len), |features|), i.e. 588 features
    for 100,000 tokens at SQuAD's 170, unless `num_sequences` is given. Indices come from
    `numpy.random.default_rng(seed).choice(n_features, k, replace=replace)`. Batching is as
    for GLUE (`prunekit.tasks.glue.data.build_calibration_sample`): with `sort_by_length`, features of
    similar length share a batch and the batches are put in a seeded order; either way each batch
    is padded to its longest feature.

    Args:
        task: "squad", "squad_v2" or their TaskSpec.
        tokenizer: a fast Hugging Face tokenizer (offsets locate the answers).
        source: training data, as for `load_squad_split` (an example list is used as it is).
        num_tokens: token budget that sets the number of features.
        num_sequences: number of features to draw; overrides `num_tokens`.
        seed: seed of the draw and of the batch order.
        batch_size: features per batch; default the task's (12).
        max_length: tokens per feature; default the task's (384).
        doc_stride: tokens shared by consecutive windows; default the task's (128).
        replace: draw with replacement (the reference does).
        sort_by_length: group features of similar length into batches.

    Returns:
        A `CalibrationSample` whose batches hold input_ids, attention_mask, token_type_ids (when
        the tokenizer makes them) and p_mask, each (B, T_batch), and start_positions and
        end_positions, (B,). `num_sequences` counts features, `num_tokens` the non-padding
        tokens, and `indices` are indices into the training features.
    """
    spec = squad_task(task)
    batch = spec.batch_size if batch_size is None else batch_size
    check_sample_options(num_tokens, num_sequences, batch)
    max_len = spec.max_length if max_length is None else max_length
    stride = spec.doc_stride if doc_stride is None else doc_stride
    if tokenizer.pad_token_id is None:
        raise ConfigError("the tokenizer has no pad token; SQuAD batches are padded on the right with it")

    train = load_squad_split(spec, source, "train")
    features = prepare_features(train, tokenizer, max_len, stride, for_training=True)
    rng, drawn = draw_indices(spec, len(features), num_tokens, num_sequences, seed, replace, unit="feature")
    chosen = [features[i] for i in drawn]
    del features  # the whole training set's features are no longer needed
    pad_id = tokenizer.pad_token_id
    return batch_sample(
        spec, chosen, drawn, rng, lambda group: collate_qa(group, pad_id, p_mask=True),
        batch, max_len, seed, sort_by_length,
    )
