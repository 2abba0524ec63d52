"""Tests of prunekit.tasks.spec and prunekit.tasks: reading GLUE data, tokenizing, padding, calibration."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from transformers import BertTokenizer

from prunekit.core.errors import ConfigError, DataError
from prunekit.tasks import (
    CalibrationSample,
    build_calibration_sample,
    collate,
    load_examples,
    tokenize_examples,
)
from prunekit.tasks.spec import TASKS, GlueTsvLayout, TaskSpec, get_task

SHARED_DATA = Path(__file__).parents[3] / "shared" / "data"

WORDS = "a the movie film good bad great awful is was not very and it of to man dog runs sits cat".split()


def make_tokenizer() -> BertTokenizer:
    """A 99-token WordPiece tokenizer built in memory (no download)."""
    specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    tokens = specials + WORDS
    tokens += [f"tok{i}" for i in range(99 - len(tokens))]
    return BertTokenizer(vocab={t: i for i, t in enumerate(tokens)})


def write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")
    return path


def sst2_rows(n: int, seed: int = 0) -> str:
    """`n` SST-2 TSV rows of varied length, label 1 for 'good' sentences."""
    rng = np.random.default_rng(seed)
    lines = []
    for i in range(n):
        label = i % 2
        length = int(rng.integers(1, 12))
        words = " ".join(rng.choice(WORDS, size=length))
        lines.append(f"{'good' if label else 'bad'} {words} \t{label}")
    return "\n".join(lines) + "\n"


@pytest.fixture
def sst2_dir(tmp_path: Path) -> Path:
    folder = tmp_path / "sst2"
    write(folder / "train.tsv", "sentence\tlabel\n" + sst2_rows(200))
    write(folder / "dev.tsv", "sentence\tlabel\n" + sst2_rows(10, seed=1))
    return folder


# ---------------------------------------------------------------------------------- tasks


def test_registry_holds_the_glue_tasks_with_reference_lengths() -> None:
    assert {"sst2", "mrpc", "stsb", "qnli", "qqp", "mnli", "rte", "cola"} <= set(TASKS)
    assert get_task("mnli").avg_seq_len == 39.05
    assert get_task("qqp").avg_seq_len == 30.55
    assert get_task("qnli").avg_seq_len == 50.97
    assert get_task("sst2").avg_seq_len == 25.16
    assert get_task("stsb").avg_seq_len == 31.47
    assert get_task("mrpc").avg_seq_len == 53.24
    assert get_task("sst2").max_length == 64 and get_task("mrpc").max_length == 128
    stsb = get_task("stsb")
    assert stsb.is_regression and stsb.num_labels == 1 and stsb.distill_loss == "mse"
    assert get_task("mnli").label_values == ("entailment", "neutral", "contradiction")
    assert get_task("mnli").tsv.dev_file == "dev_matched.tsv"
    assert get_task("cola").tsv.header is False
    kinds = {"squad": "squad", "squad_v2": "squad", "causal_lm": "causal_lm"}
    assert all(spec.name == key and spec.kind == kinds.get(key, "glue") for key, spec in TASKS.items())


def test_get_task_unknown_name_suggests_closest_match() -> None:
    with pytest.raises(ValueError, match=r"unknown task 'sst-2'.*available tasks: .*sst2.*Did you mean 'sst2'"):
        get_task("sst-2")
    assert get_task(get_task("rte")) is TASKS["rte"]
    assert get_task("SST2") is TASKS["sst2"]


def test_malformed_task_fails_when_declared() -> None:
    with pytest.raises(ConfigError, match="main_metric 'f1' is not one of metrics"):
        TaskSpec(
            name="x", kind="glue", text_columns=("a",), num_labels=2, label_values=("0", "1"),
            metrics=("accuracy",), main_metric="f1", max_length=8, avg_seq_len=4.0,
        )  # fmt: skip
    with pytest.raises(ConfigError, match="one value per class"):
        TaskSpec(
            name="x", kind="glue", text_columns=("a",), num_labels=3, label_values=("0", "1"),
            metrics=("accuracy",), main_metric="accuracy", max_length=8, avg_seq_len=4.0,
        )  # fmt: skip
    with pytest.raises(ConfigError, match="must name its columns"):
        GlueTsvLayout(text_columns=("a",), label_column="b", header=False)


def test_label_maps_follow_the_task() -> None:
    assert get_task("sst2").id2label == {0: "negative", 1: "positive"}
    assert get_task("mnli").label2id == {"entailment": 0, "neutral": 1, "contradiction": 2}
    assert get_task("stsb").id2label == {0: "score"}
    assert get_task("stsb").problem_type == "regression"


# ---------------------------------------------------------------------------------- reading


def test_sst2_tsv(sst2_dir: Path) -> None:
    train = load_examples("sst2", sst2_dir, "train")
    dev = load_examples(get_task("sst2"), str(sst2_dir), "validation")
    assert len(train) == 200 and len(dev) == 10
    assert set(train[0]) == {"sentence", "label"}
    assert {e["label"] for e in train} == {0, 1}
    assert all(isinstance(e["label"], int) for e in train)


def test_glue_root_with_task_subfolder(tmp_path: Path) -> None:
    write(tmp_path / "SST-2" / "dev.tsv", "sentence\tlabel\nit is good \t1\n")
    assert load_examples("sst2", tmp_path, "dev") == [{"sentence": "it is good ", "label": 1}]


def test_stsb_tsv_ten_columns_float_scores(tmp_path: Path) -> None:
    header = "index\tgenre\tfilename\tyear\told_index\tsource1\tsource2\tsentence1\tsentence2\tscore\n"
    rows = [
        '0\tmain-captions\tMSRvid\t2012test\t0001\tnone\tnone\tA man "runs".\tA man runs.\t5.000',
        "1\tmain-news\theadlines\t2015\t0002\tnone\tnone\tA cat sits.\tThe dog runs.\t0.400",
    ]
    write(tmp_path / "dev.tsv", header + "\n".join(rows) + "\n")
    dev = load_examples("stsb", tmp_path, "dev")
    assert dev == [
        {"sentence1": 'A man "runs".', "sentence2": "A man runs.", "label": 5.0},
        {"sentence1": "A cat sits.", "sentence2": "The dog runs.", "label": 0.4},
    ]
    assert isinstance(dev[1]["label"], float)


def test_cola_tsv_without_header(tmp_path: Path) -> None:
    write(tmp_path / "train.tsv", "gj04\t1\t\tThe cat sits.\ngj04\t0\t*\tCat the sits.\n")
    train = load_examples("cola", tmp_path, "train")
    assert train == [{"sentence": "The cat sits.", "label": 1}, {"sentence": "Cat the sits.", "label": 0}]


def test_mnli_dev_matched_and_gold_label(tmp_path: Path) -> None:
    head = "index\tpromptID\tpairID\tgenre\tsentence1_binary_parse\tsentence2_binary_parse\tsentence1_parse\tsentence2_parse\tsentence1\tsentence2"
    train = head + "\tlabel1\tgold_label\n" + "0\t1\t1e\tgov\t(\t(\t(\t(\tA man runs.\tA man moves.\tentailment\tentailment\n"
    dev = (
        head + "\tlabel1\tlabel2\tlabel3\tlabel4\tlabel5\tgold_label\n"
        + "0\t1\t1n\tgov\t(\t(\t(\t(\tA cat.\tA dog.\tneutral\tneutral\tneutral\tneutral\tneutral\tcontradiction\n"
    )  # fmt: skip
    write(tmp_path / "train.tsv", train)
    write(tmp_path / "dev_matched.tsv", dev)
    assert load_examples("mnli", tmp_path, "train") == [{"premise": "A man runs.", "hypothesis": "A man moves.", "label": 0}]
    assert load_examples("mnli", tmp_path, "dev")[0]["label"] == 2
    with pytest.raises(DataError, match="dev_mismatched.tsv"):
        load_examples("mnli-mm", tmp_path, "dev")


def test_mrpc_header_with_byte_order_mark(tmp_path: Path) -> None:
    text = "\ufeffQuality\t#1 ID\t#2 ID\t#1 String\t#2 String\n1\t11\t12\tA man runs.\tA man is running.\n"
    write(tmp_path / "train.tsv", text)
    assert load_examples("mrpc", tmp_path, "train") == [
        {"sentence1": "A man runs.", "sentence2": "A man is running.", "label": 1}
    ]


def test_qnli_string_labels(tmp_path: Path) -> None:
    text = "index\tquestion\tsentence\tlabel\n0\tWho?\tHim.\tentailment\n1\tWhat?\tNo.\tnot_entailment\n"
    write(tmp_path / "dev.tsv", text)
    assert [e["label"] for e in load_examples("qnli", tmp_path, "dev")] == [0, 1]


def test_csv_folder_with_canonical_columns(tmp_path: Path) -> None:
    write(tmp_path / "train.csv", 'idx,premise,hypothesis,label\n0,"A man, tall.",A man.,neutral\n1,A.,B.,2\n')
    write(tmp_path / "dev.csv", "premise,hypothesis,label\nA.,B.,0\n")
    train = load_examples("mnli", tmp_path, "train")
    assert train == [
        {"premise": "A man, tall.", "hypothesis": "A man.", "label": 1},
        {"premise": "A.", "hypothesis": "B.", "label": 2},
    ]
    assert load_examples("mnli", tmp_path, "dev")[0]["label"] == 0


def test_jsonl_and_json_files(tmp_path: Path) -> None:
    rows = [{"sentence1": "A.", "sentence2": "B.", "label": 3.5}, {"sentence1": "C.", "sentence2": "D.", "label": 1}]
    jsonl = write(tmp_path / "data.jsonl", "\n".join(json.dumps(r) for r in rows) + "\n\n")
    array = write(tmp_path / "data.json", json.dumps(rows))
    for path in (jsonl, array):
        examples = load_examples("stsb", path, "train")
        assert [e["label"] for e in examples] == [3.5, 1.0]
    # labels by name also work for classification
    write(tmp_path / "s" / "dev.jsonl", json.dumps({"sentence": "good", "label": "positive"}) + "\n")
    assert load_examples("sst2", tmp_path / "s", "dev")[0]["label"] == 1


def test_hub_source_maps_split_and_columns(monkeypatch: pytest.MonkeyPatch) -> None:
    import datasets

    calls = []

    def fake_load_dataset(name, config=None, split=None):
        calls.append((name, config, split))
        return datasets.Dataset.from_dict({"premise": ["A.", "B."], "hypothesis": ["C.", "D."], "label": [2, 0], "idx": [0, 1]})

    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    examples = load_examples("mnli", "glue", "dev")
    assert calls == [("glue", "mnli", "validation_matched")]
    assert examples == [{"premise": "A.", "hypothesis": "C.", "label": 2}, {"premise": "B.", "hypothesis": "D.", "label": 0}]
    load_examples("mnli", "some-user/mnli-copy", "train")
    assert calls[-1] == ("some-user/mnli-copy", None, "train")


# ---------------------------------------------------------------------------------- read errors


def test_error_missing_path_says_what_to_pass(tmp_path: Path) -> None:
    with pytest.raises(DataError, match=r"does not exist.*train\.tsv.*datasets hub name"):
        load_examples("sst2", tmp_path / "nowhere", "train")
    with pytest.raises(DataError, match=r"does not exist"):
        load_examples("sst2", "./data/sst2", "train")


def test_error_folder_without_split_file_lists_expected_files(tmp_path: Path) -> None:
    write(tmp_path / "train.tsv", "sentence\tlabel\ngood\t1\n")
    with pytest.raises(DataError, match=r"no dev data for task 'sst2' in .*expected one of dev\.tsv, dev\.csv"):
        load_examples("sst2", tmp_path, "dev")


def test_error_missing_columns_names_them_and_lists_found(tmp_path: Path) -> None:
    write(tmp_path / "dev.tsv", "text\tlabel\ngood\t1\n")
    with pytest.raises(DataError, match=r"lacks the column\(s\) task 'sst2' needs: 'sentence'; found columns: 'text', 'label'"):
        load_examples("sst2", tmp_path, "dev")
    write(tmp_path / "x" / "dev.csv", "premise,label\nA,0\n")
    with pytest.raises(DataError, match=r"'hypothesis' or 'sentence2'.*found columns: 'premise', 'label'"):
        load_examples("mnli", tmp_path / "x", "dev")


def test_error_unknown_label_names_value_row_and_allowed(tmp_path: Path) -> None:
    write(tmp_path / "dev.tsv", "sentence\tlabel\ngood\t1\nbad\t2\n")
    with pytest.raises(DataError, match=r"unknown label '2' at .*dev\.tsv, line 3; task 'sst2' allows labels '0', '1'"):
        load_examples("sst2", tmp_path, "dev")
    write(tmp_path / "r" / "dev.jsonl", json.dumps({"sentence1": "a", "sentence2": "b", "label": "high"}) + "\n")
    with pytest.raises(DataError, match=r"unknown label 'high' at .*line 1: task 'stsb' is a regression task"):
        load_examples("stsb", tmp_path / "r", "dev")


def test_error_empty_data(tmp_path: Path) -> None:
    write(tmp_path / "dev.tsv", "sentence\tlabel\n")
    with pytest.raises(DataError, match=r"holds no dev examples"):
        load_examples("sst2", tmp_path, "dev")
    write(tmp_path / "e" / "train.tsv", "")
    with pytest.raises(DataError, match=r"is empty: expected a header row"):
        load_examples("sst2", tmp_path / "e", "train")


def test_error_malformed_row_gives_line_number(tmp_path: Path) -> None:
    write(tmp_path / "dev.tsv", "sentence\tlabel\ngood\t1\nbad\t0\textra\n")
    with pytest.raises(DataError, match=r"malformed row at .*dev\.tsv, line 3: 3 columns, expected 2"):
        load_examples("sst2", tmp_path, "dev")
    write(tmp_path / "j" / "dev.jsonl", '{"sentence": "a", "label": 1}\n{"sentence": "b"\n')
    with pytest.raises(DataError, match=r"malformed row at .*line 2"):
        load_examples("sst2", tmp_path / "j", "dev")
    write(tmp_path / "k" / "dev.jsonl", '{"sentence": "a", "label": 1}\n{"label": 0}\n')
    with pytest.raises(DataError, match=r"line 2: missing key\(s\) 'sentence'"):
        load_examples("sst2", tmp_path / "k", "dev")


def test_error_unknown_split_and_hub_failure(monkeypatch: pytest.MonkeyPatch, sst2_dir: Path) -> None:
    with pytest.raises(DataError, match="unknown split 'test'"):
        load_examples("sst2", sst2_dir, "test")
    import datasets

    def offline(*args, **kwargs):
        raise ConnectionError("no network")

    monkeypatch.setattr(datasets, "load_dataset", offline)
    with pytest.raises(DataError, match=r"'glue' is not an existing local path.*hub.*ConnectionError: no network"):
        load_examples("sst2", "glue", "train")


# ---------------------------------------------------------------------------------- tokenize / collate


def test_tokenize_pairs_truncates_and_keeps_labels() -> None:
    tokenizer = make_tokenizer()
    examples = [
        {"sentence1": "a man runs", "sentence2": "the dog sits", "label": 4.5},
        {"sentence1": "a " * 50, "sentence2": "the " * 50, "label": 0.0},
    ]
    features = tokenize_examples("stsb", tokenizer, examples, max_length=16)
    assert set(features[0]) == {"input_ids", "attention_mask", "token_type_ids", "label"}
    assert len(features[0]["input_ids"]) == 9  # [CLS] a man runs [SEP] the dog sits [SEP]
    assert features[0]["token_type_ids"] == [0] * 5 + [1] * 4
    assert len(features[1]["input_ids"]) == 16
    assert [f["label"] for f in features] == [4.5, 0.0]
    default = tokenize_examples("stsb", tokenizer, examples[1:])
    assert len(default[0]["input_ids"]) == 103  # 50 + 50 words + 3 specials: under the task's 128
    with pytest.raises(DataError, match="lack the text column"):
        tokenize_examples("stsb", tokenizer, [{"sentence": "a", "label": 1.0}])


def test_collate_pads_to_longest_with_right_dtypes() -> None:
    features = [
        {"input_ids": [2, 5, 3], "attention_mask": [1, 1, 1], "token_type_ids": [0, 0, 0], "label": 1},
        {"input_ids": [2, 3], "attention_mask": [1, 1], "token_type_ids": [0, 0], "label": 0},
    ]
    batch = collate(features, pad_token_id=7)
    assert batch["input_ids"].tolist() == [[2, 5, 3], [2, 3, 7]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [1, 1, 0]]
    assert batch["token_type_ids"].tolist() == [[0, 0, 0], [0, 0, 0]]
    assert batch["labels"].dtype == torch.long and batch["labels"].tolist() == [1, 0]
    left = collate(features, pad_token_id=7, padding_side="left")
    assert left["input_ids"].tolist() == [[2, 5, 3], [7, 2, 3]]
    regression = collate([dict(f, label=float(f["label"])) for f in features], 0)
    assert regression["labels"].dtype == torch.float32
    assert collate(features, 0, regression=True)["labels"].dtype == torch.float32
    no_mask = collate([{"input_ids": [1, 2]}, {"input_ids": [1]}], 0)
    assert no_mask["attention_mask"].tolist() == [[1, 1], [1, 0]] and "labels" not in no_mask
    with pytest.raises(ConfigError, match="no pad token"):
        collate(features, None)


# ---------------------------------------------------------------------------------- calibration


def test_calibration_sample_count_and_token_accounting(sst2_dir: Path) -> None:
    tokenizer = make_tokenizer()
    sample = build_calibration_sample("sst2", tokenizer, sst2_dir, num_tokens=1000, batch_size=8)
    assert isinstance(sample, CalibrationSample)
    assert sample.num_sequences == math.floor(1000 / 25.16) == 39
    assert sum(len(b["input_ids"]) for b in sample.batches) == 39
    assert [len(b["input_ids"]) for b in sample.batches].count(8) == 4  # 4 full batches + one of 7
    assert sample.num_tokens == sum(int(b["attention_mask"].sum()) for b in sample.batches)
    assert sample.mean_length == pytest.approx(sample.num_tokens / 39)
    assert len(sample.indices) == 39 and all(0 <= i < 200 for i in sample.indices)
    for batch in sample:
        assert set(batch) == {"input_ids", "attention_mask", "token_type_ids", "labels"}
        assert batch["labels"].dtype == torch.long
    # capped at the size of the training split
    big = build_calibration_sample("sst2", tokenizer, sst2_dir, num_tokens=10**7, batch_size=64)
    assert big.num_sequences == 200
    assert big.summary()["num_batches"] == len(big) == 4


def test_calibration_sample_is_deterministic(sst2_dir: Path) -> None:
    tokenizer = make_tokenizer()
    a = build_calibration_sample("sst2", tokenizer, sst2_dir, num_sequences=50, seed=3, batch_size=8)
    b = build_calibration_sample("sst2", tokenizer, sst2_dir, num_sequences=50, seed=3, batch_size=8)
    c = build_calibration_sample("sst2", tokenizer, sst2_dir, num_sequences=50, seed=4, batch_size=8)
    assert a.indices == b.indices and a.indices != c.indices
    assert len(a) == len(b)
    for x, y in zip(a, b, strict=True):
        assert x.keys() == y.keys() and all(torch.equal(x[k], y[k]) for k in x)
    expected = np.random.default_rng(3).choice(200, 50, replace=True)
    assert sorted(a.indices) == sorted(expected.tolist())


def test_calibration_sorting_cuts_padding_and_keeps_batches(sst2_dir: Path) -> None:
    tokenizer = make_tokenizer()
    kwargs = dict(num_sequences=64, seed=0, batch_size=8)
    plain = build_calibration_sample("sst2", tokenizer, sst2_dir, sort_by_length=False, **kwargs)
    packed = build_calibration_sample("sst2", tokenizer, sst2_dir, sort_by_length=True, **kwargs)
    assert plain.num_tokens == packed.num_tokens  # the same sequences, differently grouped
    assert sorted(plain.indices) == sorted(packed.indices)
    assert list(plain.indices) == np.random.default_rng(0).choice(200, 64).tolist()  # draw order
    cells = lambda s: sum(b["input_ids"].numel() for b in s)  # noqa: E731
    assert cells(packed) < cells(plain)
    assert all(len(b["input_ids"]) == 8 for b in packed)
    lengths = [b["attention_mask"].sum(1) for b in packed]
    spans = sorted((int(x.min()), int(x.max())) for x in lengths)
    assert all(hi <= nxt_lo for (_, hi), (nxt_lo, _) in zip(spans, spans[1:], strict=False))


def test_calibration_options_and_errors(sst2_dir: Path) -> None:
    tokenizer = make_tokenizer()
    distinct = build_calibration_sample("sst2", tokenizer, sst2_dir, num_sequences=200, replace=False)
    assert sorted(distinct.indices) == list(range(200))
    with pytest.raises(ConfigError, match="cannot draw 201 distinct sequences from 200"):
        build_calibration_sample("sst2", tokenizer, sst2_dir, num_sequences=201, replace=False)
    with pytest.raises(ConfigError, match="below one average sst2 sequence"):
        build_calibration_sample("sst2", tokenizer, sst2_dir, num_tokens=10)
    with pytest.raises(ConfigError, match="batch_size must be >= 1"):
        build_calibration_sample("sst2", tokenizer, sst2_dir, batch_size=0)
    short = build_calibration_sample("sst2", tokenizer, sst2_dir, num_sequences=16, max_length=4)
    assert short.max_length == 4 and all(b["input_ids"].shape[1] <= 4 for b in short)
    moved = short.to("cpu")
    assert moved is not short and moved.num_tokens == short.num_tokens
    assert all(v.device.type == "cpu" for b in short.iter_batches("cpu") for v in b.values())


def test_calibration_sample_regression_labels_are_float(tmp_path: Path) -> None:
    rows = [{"sentence1": f"a man {i}", "sentence2": "a dog", "label": i % 5} for i in range(40)]
    write(tmp_path / "train.jsonl", "\n".join(json.dumps(r) for r in rows))
    sample = build_calibration_sample("stsb", make_tokenizer(), tmp_path, num_sequences=10, batch_size=4)
    assert all(b["labels"].dtype == torch.float32 for b in sample)


# ---------------------------------------------------------------------------------- real data


@pytest.mark.slow
def test_real_sst2_and_stsb_files() -> None:
    if not (SHARED_DATA / "sst2" / "train.tsv").is_file() or not (SHARED_DATA / "stsb" / "dev.tsv").is_file():
        pytest.skip(f"shared GLUE data not found under {SHARED_DATA}")
    sst2_train = load_examples("sst2", SHARED_DATA / "sst2", "train")
    sst2_dev = load_examples("sst2", SHARED_DATA, "dev")
    assert (len(sst2_train), len(sst2_dev)) == (67_349, 872)
    assert sum(e["label"] for e in sst2_train) == 37_569 and sum(e["label"] for e in sst2_dev) == 444
    assert {e["label"] for e in sst2_dev} == {0, 1}
    stsb_train = load_examples("stsb", SHARED_DATA / "stsb", "train")
    stsb_dev = load_examples("stsb", SHARED_DATA / "stsb", "dev")
    assert (len(stsb_train), len(stsb_dev)) == (5_749, 1_500)
    labels = np.array([e["label"] for e in stsb_train + stsb_dev])
    assert labels.min() >= 0.0 and labels.max() <= 5.0
    assert np.mean([e["label"] for e in stsb_train]) == pytest.approx(2.701, abs=1e-3)
    assert np.mean([e["label"] for e in stsb_dev]) == pytest.approx(2.364, abs=1e-3)
