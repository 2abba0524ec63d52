"""Tests of prunekit.tasks.evaluate and prunekit.tasks.finetune on a tiny random BERT (no downloads)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from transformers import (
    AutoModelForSequenceClassification,
    AutoTokenizer,
    BertConfig,
    BertForSequenceClassification,
    BertTokenizer,
)

from prunekit.core.errors import ConfigError, DataError, ModelError
from prunekit.tasks.evaluate import evaluate, predict
from prunekit.tasks.finetune import FinetuneConfig, finetune
from prunekit.tasks.metrics import compute_metrics

SHARED = Path(__file__).parents[3] / "shared"

WORDS = "a the movie film good bad great awful is was not very and it of to man dog runs sits cat".split()


def make_tokenizer() -> BertTokenizer:
    """A 99-token WordPiece tokenizer built in memory (no download)."""
    specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    tokens = specials + WORDS
    tokens += [f"tok{i}" for i in range(99 - len(tokens))]
    return BertTokenizer(vocab={t: i for i, t in enumerate(tokens)})


def make_model(num_labels: int = 2, seed: int = 0) -> BertForSequenceClassification:
    """BertModelTester's tiny shape: hidden 32, 2 layers, 4 heads, FFN 37, vocab 99."""
    torch.manual_seed(seed)
    config = BertConfig(
        vocab_size=99, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=37,
        max_position_embeddings=128, num_labels=num_labels,
    )  # fmt: skip
    return BertForSequenceClassification(config).eval()


def write_sst2(folder: Path, n_train: int, n_dev: int) -> Path:
    """A separable SST-2: 'good ...' is 1, 'bad ...' is 0."""
    rng = np.random.default_rng(0)
    folder.mkdir(parents=True, exist_ok=True)
    for name, n in (("train.tsv", n_train), ("dev.tsv", n_dev)):
        lines = ["sentence\tlabel"]
        for _ in range(n):
            label = int(rng.integers(0, 2))
            words = " ".join(rng.choice(WORDS[8:], size=int(rng.integers(1, 8))))
            lines.append(f"{words} {'good' if label else 'bad'} \t{label}")
        (folder / name).write_text("\n".join(lines) + "\n")
    return folder


def write_stsb(folder: Path, n: int) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    rows = [{"sentence1": f"a man {WORDS[i % 20]}", "sentence2": "the dog", "label": (i % 11) / 2} for i in range(n)]
    (folder / "dev.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    return folder


@pytest.fixture(autouse=True)
def one_thread():
    """Run torch on one thread: on a shared 2-core machine, two OpenMP threads spinning against
    other processes make these tiny models ~100x slower (0.8 s instead of 3 ms per step)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture
def base_model_dir(tmp_path: Path) -> Path:
    """A 'pre-trained' checkpoint folder: tiny BERT without a task head config, plus tokenizer."""
    folder = tmp_path / "tiny-bert"
    model = make_model()
    model.save_pretrained(folder)
    make_tokenizer().save_pretrained(folder)
    return folder


# ---------------------------------------------------------------------------------- evaluate


def test_evaluate_classification_matches_manual_scoring(tmp_path: Path) -> None:
    data = write_sst2(tmp_path / "sst2", n_train=4, n_dev=40)
    model, tokenizer = make_model(), make_tokenizer()
    model.train()  # evaluate must switch to eval and restore this
    results = evaluate(model, tokenizer, "sst2", data, batch_size=16)
    assert model.training
    assert set(results) == {"accuracy", "num_examples"} and results["num_examples"] == 40
    # the same scores by hand, one example at a time (checks padding and batching)
    model.eval()
    rows = [line.split("\t") for line in (data / "dev.tsv").read_text().splitlines()[1:]]
    with torch.no_grad():
        preds = [
            int(model(**tokenizer(text, return_tensors="pt")).logits.argmax(-1)) for text, _ in rows
        ]
    assert results == pytest.approx(
        {**compute_metrics("sst2", preds, [int(label) for _, label in rows]), "num_examples": 40}
    )
    assert evaluate(model, tokenizer, "sst2", data, max_examples=7)["num_examples"] == 7


def test_evaluate_regression_and_predict(tmp_path: Path) -> None:
    data = write_stsb(tmp_path / "stsb", n=30)
    model, tokenizer = make_model(num_labels=1), make_tokenizer()
    results = evaluate(model, tokenizer, "stsb", data, batch_size=8)
    assert set(results) == {"pearson", "spearman", "num_examples"}
    assert -100.0 <= results["pearson"] <= 100.0 and results["num_examples"] == 30
    features = [{"input_ids": [2, 5, 3], "attention_mask": [1, 1, 1], "label": 1.0}]
    scores = predict(model, "stsb", features, tokenizer.pad_token_id)
    assert scores.shape == (1,) and scores.dtype == np.float32
    assert not model.training


def test_evaluate_rejects_mismatched_head_and_bad_options(tmp_path: Path) -> None:
    data = write_sst2(tmp_path / "sst2", n_train=4, n_dev=4)
    model, tokenizer = make_model(num_labels=3), make_tokenizer()
    model.train()
    with pytest.raises(ModelError, match=r"head has 3 label\(s\) but task 'sst2' needs 2"):
        evaluate(model, tokenizer, "sst2", data)
    assert model.training
    with pytest.raises(ConfigError, match="max_examples must be >= 1"):
        evaluate(make_model(), tokenizer, "sst2", data, max_examples=0)
    with pytest.raises(DataError, match="does not exist"):
        evaluate(make_model(), tokenizer, "sst2", tmp_path / "missing")


# ---------------------------------------------------------------------------------- finetune


def test_finetune_config_validation_says_how_to_fix() -> None:
    with pytest.raises(ConfigError, match="epochs must be a whole number >= 1, got 0"):
        FinetuneConfig(epochs=0)
    with pytest.raises(ConfigError, match="lr must be a positive learning rate"):
        FinetuneConfig(lr=-1.0)
    with pytest.raises(ConfigError, match=r"warmup_ratio is a fraction of the steps in \[0, 1\)"):
        FinetuneConfig(warmup_ratio=1.5)
    with pytest.raises(ConfigError, match="max_train_samples must be >= 1"):
        FinetuneConfig(max_train_samples=0)
    with pytest.raises(ConfigError, match="is not a torch device"):
        FinetuneConfig(device="gpu0")
    assert FinetuneConfig().resolved_device().type in ("cpu", "cuda")


def test_finetune_saves_reloadable_folder_and_refuses_overwrite(tmp_path: Path, base_model_dir: Path) -> None:
    data = write_sst2(tmp_path / "sst2", n_train=80, n_dev=16)
    config = FinetuneConfig(epochs=1, batch_size=16, lr=1e-3, max_train_samples=64, device="cpu")
    out = finetune(base_model_dir, "sst2", data, tmp_path / "out", config)

    assert out == tmp_path / "out"
    assert (out / "model.safetensors").is_file() and (out / "config.json").is_file()
    assert not list(tmp_path.glob(".out.*"))  # the staging folder was renamed away
    report = json.loads((out / "finetune_report.json").read_text())
    assert report["task"] == "sst2" and report["num_train_examples"] == 64
    assert report["train_steps"] == 4 and report["warmup_steps"] == 1
    assert report["config"]["max_train_samples"] == 64 and report["resolved"]["max_length"] == 64
    assert set(report["metrics"]) == {"accuracy"}
    assert {"torch", "transformers", "python"} <= set(report["versions"])
    assert report["wall_time_s"] >= report["train_time_s"] > 0

    model = AutoModelForSequenceClassification.from_pretrained(out)
    tokenizer = AutoTokenizer.from_pretrained(out)
    assert model.config.id2label == {0: "negative", 1: "positive"}
    assert model.config.problem_type == "single_label_classification"
    reloaded = evaluate(model, tokenizer, "sst2", data)
    assert reloaded["accuracy"] == pytest.approx(report["metrics"]["accuracy"])

    with pytest.raises(ConfigError, match="already exists and is not empty; .*overwrite=True"):
        finetune(base_model_dir, "sst2", data, out, config)

    # overwrite=True replaces it; the same seed gives the same weights
    first = {k: v.clone() for k, v in model.state_dict().items()}
    finetune(base_model_dir, "sst2", data, out, config, overwrite=True)
    again = AutoModelForSequenceClassification.from_pretrained(out).state_dict()
    assert all(torch.equal(first[k], again[k]) for k in first)


def test_finetune_learns_and_leaves_global_rng_alone(tmp_path: Path, base_model_dir: Path) -> None:
    data = write_sst2(tmp_path / "sst2", n_train=64, n_dev=32)
    torch.manual_seed(123)
    expected_next = torch.rand(1)
    torch.manual_seed(123)
    config = FinetuneConfig(epochs=6, batch_size=8, lr=5e-3, warmup_ratio=0.0, device="cpu")
    out = finetune(base_model_dir, "sst2", data, tmp_path / "learned", config)
    assert torch.equal(torch.rand(1), expected_next)  # fork_rng restored the caller's generator
    report = json.loads((out / "finetune_report.json").read_text())
    losses = report["epoch_mean_losses"]
    assert losses[-1] < losses[0]
    assert report["metrics"]["accuracy"] >= 75.0  # one word decides the label


def test_finetune_regression_head(tmp_path: Path, base_model_dir: Path) -> None:
    data = write_stsb(tmp_path / "stsb", n=24)
    (data / "train.jsonl").write_text((data / "dev.jsonl").read_text())
    out = finetune(base_model_dir, "stsb", data, tmp_path / "reg", FinetuneConfig(epochs=1, batch_size=8, device="cpu"))
    model = AutoModelForSequenceClassification.from_pretrained(out)
    assert model.config.num_labels == 1 and model.config.problem_type == "regression"
    report = json.loads((out / "finetune_report.json").read_text())
    assert set(report["metrics"]) == {"pearson", "spearman"}


def test_finetune_fails_before_training_on_missing_dev(tmp_path: Path, base_model_dir: Path) -> None:
    data = write_sst2(tmp_path / "sst2", n_train=8, n_dev=2)
    (data / "dev.tsv").unlink()
    with pytest.raises(DataError, match="no dev data for task 'sst2'"):
        finetune(base_model_dir, "sst2", data, tmp_path / "x", FinetuneConfig(epochs=1, device="cpu"))
    assert not (tmp_path / "x").exists()


# ---------------------------------------------------------------------------------- real teachers


@pytest.mark.slow
@pytest.mark.parametrize(
    ("name", "task", "expected"),
    [
        ("minilm-sst2", "sst2", {"accuracy": 88.65}),
        ("minilm-stsb", "stsb", {"pearson": 84.17, "spearman": 84.65}),
    ],
)
def test_reference_teachers_reach_their_published_dev_metric(name: str, task: str, expected: dict) -> None:
    folder, data = SHARED / "models" / name, SHARED / "data" / task
    if not (folder / "model.safetensors").is_file() or not (data / "dev.tsv").is_file():
        pytest.skip(f"{folder} or {data} not found")
    model = AutoModelForSequenceClassification.from_pretrained(folder, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    results = evaluate(model, tokenizer, task, data)
    for metric, value in expected.items():
        assert results[metric] == pytest.approx(value, abs=0.006), metric
