"""Task families as registered handlers (prunekit.tasks.family): every task has one, the loss kind
comes from the task's distill_loss, family-only options are refused elsewhere, and a family
registered from outside is served by evaluate and build_training_data without either knowing it."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import torch
from torch import nn

import prunekit.tasks.registry as registry_module
import prunekit.tasks.spec as spec_module
from prunekit.api import loss_kind
from prunekit.core.errors import ConfigError
from prunekit.tasks import build_calibration_sample, build_training_data, load_examples
from prunekit.tasks.evaluate import evaluate
from prunekit.tasks.family import LOSS_KINDS, TaskFamily
from prunekit.tasks.finetune import FinetuneConfig, finetune
from prunekit.tasks.registry import family_of, register_family
from prunekit.tasks.spec import TASKS, TaskSpec


@pytest.mark.parametrize("name", sorted(TASKS))
def test_every_registered_task_has_a_family_and_a_consistent_loss_kind(name: str) -> None:
    task = TASKS[name]
    handler = family_of(name)
    assert handler.kind == task.kind and handler is family_of(task)
    assert handler.loss_kind(task) == LOSS_KINDS[task.distill_loss] == loss_kind(task)
    # The loss follows the head: what the distillation loss compares must be what the model outputs.
    expected = {"question_answering": "qa", "causal_lm": "lm"}.get(
        task.head, "regression" if task.is_regression else "classification")
    assert handler.loss_kind(task) == expected


def test_the_registry_losses_are_the_reference_ones() -> None:
    kinds = {name: family_of(task).loss_kind(task) for name, task in TASKS.items()}
    assert kinds["stsb"] == "regression" and kinds["squad"] == kinds["squad_v2"] == "qa"
    assert kinds["causal_lm"] == "lm" and kinds["sst2"] == kinds["mnli"] == "classification"


def test_a_task_whose_loss_contradicts_its_head_fails_when_declared() -> None:
    with pytest.raises(ConfigError, match="regression task has distill_loss 'mse'"):
        TaskSpec(name="x", kind="glue", text_columns=("a",), num_labels=1, is_regression=True, distill_loss="kl",
                 metrics=("pearson",), main_metric="pearson", max_length=8, avg_seq_len=4.0)
    with pytest.raises(ConfigError, match="kind must be one of"):
        TaskSpec(name="x", kind="unregistered", text_columns=("a",), num_labels=2, label_values=("0", "1"),
                 metrics=("accuracy",), main_metric="accuracy", max_length=8, avg_seq_len=4.0)


def test_family_options_elsewhere_are_config_errors(tmp_path: Path) -> None:
    model = nn.Linear(2, 2)  # never run: the options are refused first
    with pytest.raises(ConfigError, match="doc_stride applies to SQuAD tasks only; task 'sst2' is a GLUE task"):
        evaluate(model, None, "sst2", tmp_path, doc_stride=64)
    with pytest.raises(ConfigError, match="window applies to causal LM tasks only; task 'squad' is a SQuAD task"):
        evaluate(model, None, "squad", tmp_path, window=16)
    with pytest.raises(ConfigError, match="window and stride apply to causal LM tasks only; task 'mnli'"):
        evaluate(model, None, "mnli", tmp_path, window=16, stride=8)
    with pytest.raises(ConfigError, match="doc_stride applies to SQuAD tasks only; task 'causal_lm' is a causal LM"):
        build_calibration_sample("causal_lm", None, tmp_path, doc_stride=8)
    with pytest.raises(ConfigError, match="doc_stride applies to SQuAD tasks only; task 'rte'"):
        build_training_data("rte", None, tmp_path, doc_stride=8)
    with pytest.raises(ConfigError, match="doc_stride applies to SQuAD tasks only; task 'sst2'"):
        finetune("unused", "sst2", tmp_path / "data", tmp_path / "out", FinetuneConfig(doc_stride=8))
    with pytest.raises(ConfigError, match=r"doc_stride \(128\) must be below max_length \(64\)"):
        build_training_data("squad", None, tmp_path, max_length=64)


def test_a_causal_lm_has_no_examples(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="reads text, not examples"):
        load_examples("causal_lm", tmp_path, "train")


# ---- a family registered from outside ---------------------------------------------------------------
class ParityFamily(TaskFamily):
    """A test-only task: is the sum of a few numbers odd? Examples are dicts with "x" and "label"."""

    kind = "parity"
    label = "parity"

    def load_examples(self, spec: TaskSpec, source: Any, split: str) -> list[dict[str, Any]]:
        return [dict(example) for example in source[split]]

    def training_features(self, spec, tokenizer, examples, max_length, **options):
        return [{"x": example["x"][:max_length], "label": example["label"]} for example in examples]

    def collate_fn(self, spec, pad_token_id):
        return lambda features: {"x": torch.tensor([f["x"] for f in features], dtype=torch.float32),
                                 "labels": torch.tensor([f["label"] for f in features])}

    def dev_scorer(self, spec, tokenizer, examples, max_length, device, **options):
        return lambda model: self._score(model, examples)

    def evaluate(self, model, tokenizer, spec, source, *, split, batch_size, max_length, device, max_examples,
                 **options):
        examples = self.load_examples(spec, source, split)[:max_examples]
        return self._score(model, examples) | {"num_examples": len(examples)}

    @staticmethod
    def _score(model: nn.Module, examples: list[dict[str, Any]]) -> dict[str, float]:
        with torch.inference_mode():
            logits = model(torch.tensor([e["x"] for e in examples], dtype=torch.float32))  # (N, 2)
        right = (logits.argmax(-1) == torch.tensor([e["label"] for e in examples])).float().mean()
        return {"accuracy": 100.0 * float(right)}


PARITY = {split: [{"x": [a, b, 1.0], "label": int(a + b) % 2} for a in range(3) for b in range(3)]
          for split in ("train", "dev")}


@pytest.fixture
def parity_task(monkeypatch: pytest.MonkeyPatch) -> TaskSpec:
    # A copy of both registries, so the test family is gone after the test.
    monkeypatch.setattr(registry_module, "_FAMILIES", dict(registry_module._FAMILIES))
    monkeypatch.setattr(spec_module, "_KINDS", dict(spec_module._KINDS))
    register_family(ParityFamily())
    return TaskSpec(name="parity", kind="parity", text_columns=("x",), num_labels=2, label_values=("0", "1"),
                    metrics=("accuracy",), main_metric="accuracy", max_length=3, avg_seq_len=3.0)


def parity_model() -> nn.Module:
    """Says "odd" when the first number is at least 1: right on some examples, wrong on others."""
    model = nn.Linear(3, 2)
    with torch.no_grad():
        model.weight.copy_(torch.tensor([[0.0, 0.0, 0.0], [2.0, 0.0, -1.0]]))
        model.bias.zero_()
    return model


def test_evaluate_serves_a_registered_family(parity_task: TaskSpec) -> None:
    assert family_of(parity_task).kind == "parity"
    result = evaluate(parity_model(), None, parity_task, PARITY)
    expected = 100.0 * sum((2.0 * e["x"][0] - 1.0 > 0) == bool(e["label"]) for e in PARITY["dev"]) / 9
    assert result == {"accuracy": pytest.approx(expected), "num_examples": 9}
    assert evaluate(parity_model(), None, parity_task, PARITY, max_examples=3)["num_examples"] == 3
    with pytest.raises(ConfigError, match="doc_stride applies to SQuAD tasks only; task 'parity' is a parity task"):
        evaluate(parity_model(), None, parity_task, PARITY, doc_stride=4)
    with pytest.raises(ConfigError, match="its family does not support calibration samples"):
        build_calibration_sample(parity_task, None, PARITY)


def test_training_data_of_a_registered_family(parity_task: TaskSpec) -> None:
    training = build_training_data(parity_task, SimpleNamespace(pad_token_id=0), PARITY, max_train_samples=4)
    assert training.kind == "classification" and training.main_metric == "accuracy"
    batch = training.collate(training.features)
    assert batch["x"].shape == (4, 3) and batch["labels"].tolist() == [e["label"] for e in PARITY["train"][:4]]
    assert training.evaluate(parity_model()) == {
        "accuracy": evaluate(parity_model(), None, parity_task, PARITY)["accuracy"]}
