"""Shared fixtures: tiny random models of every supported family, a tiny offline tokenizer, a small
GLUE-style SST-2 folder and a hand-built calibration sample (style.md §15: no downloads, seconds on CPU).

Tiny shape as in transformers' BertModelTester: hidden 32, 4 heads (d_h 8), FFN 37, vocab 99.
Model-building fixtures are factories, so a test can ask for several models (other seeds, heads,
layer counts) without repeating the configs.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from builders import view
from hypothesis import HealthCheck, settings
from transformers import (
    BertConfig,
    BertForMaskedLM,
    BertForQuestionAnswering,
    BertForSequenceClassification,
    BertTokenizer,
    DistilBertConfig,
    DistilBertForQuestionAnswering,
    DistilBertForSequenceClassification,
    PreTrainedModel,
    RobertaConfig,
    RobertaForQuestionAnswering,
    RobertaForSequenceClassification,
)

FAMILIES = ("bert", "roberta", "distilbert")
# Task heads by the distillation-loss kind they take (prunekit.tasks.losses.TASK_KINDS).
HEADS = ("classification", "regression", "qa")

HIDDEN, NUM_HEADS, HEAD_DIM, FFN, VOCAB = 32, 4, 8, 37, 99
MAX_POSITIONS = 128

WORDS = "a the movie film good bad great awful is was not very and it of to man dog runs sits cat".split()

_CLASSES = {
    "bert": (BertForSequenceClassification, BertForQuestionAnswering),
    "roberta": (RobertaForSequenceClassification, RobertaForQuestionAnswering),
    "distilbert": (DistilBertForSequenceClassification, DistilBertForQuestionAnswering),
}


def _config(family: str, num_layers: int, **extra):
    if family == "bert":
        return BertConfig(
            vocab_size=VOCAB, hidden_size=HIDDEN, num_hidden_layers=num_layers, num_attention_heads=NUM_HEADS,
            intermediate_size=FFN, max_position_embeddings=MAX_POSITIONS, **extra,
        )  # fmt: skip
    if family == "roberta":
        # RoBERTa's position ids start after padding_idx (pad 1), hence max_positions + 2.
        return RobertaConfig(
            vocab_size=VOCAB, hidden_size=HIDDEN, num_hidden_layers=num_layers, num_attention_heads=NUM_HEADS,
            intermediate_size=FFN, max_position_embeddings=MAX_POSITIONS + 2, **extra,
        )  # fmt: skip
    if family == "distilbert":
        return DistilBertConfig(
            vocab_size=VOCAB, dim=HIDDEN, n_layers=num_layers, n_heads=NUM_HEADS, hidden_dim=FFN,
            max_position_embeddings=MAX_POSITIONS, **extra,
        )  # fmt: skip
    raise ValueError(f"unknown family {family!r}")


def build_tiny_model(
    family: str = "bert",
    head: str = "classification",
    num_layers: int = 2,
    seed: int = 0,
    num_labels: int | None = None,
) -> PreTrainedModel:
    """A seeded tiny random model in eval mode.

    head: "classification" (num_labels 3 unless given), "regression" (num_labels 1) or "qa".
    """
    cls_class, qa_class = _CLASSES[family]
    torch.manual_seed(seed)
    if head == "qa":
        model = qa_class(_config(family, num_layers))
    elif head == "regression":
        model = cls_class(_config(family, num_layers, num_labels=1, problem_type="regression"))
    elif head == "classification":
        model = cls_class(_config(family, num_layers, num_labels=num_labels or 3))
    else:
        raise ValueError(f"unknown head {head!r}")
    return _randomize(model).eval()


def _randomize(model: PreTrainedModel) -> PreTrainedModel:
    """Give every parameter a spread-out random value. The Hugging Face init (std 0.02, zero biases,
    LayerNorm 1/0) makes a tiny model's output almost independent of its input and of any bias, so
    equality tests would pass for the wrong reasons."""
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "LayerNorm" in name or "layer_norm" in name:
                param.copy_((1.0 if name.endswith("weight") else 0.0) + 0.2 * torch.randn_like(param))
            elif param.dim() >= 2:
                param.normal_(0.0, 0.25)
            else:
                param.normal_(0.0, 0.2)
    return model


def build_masked_lm(seed: int = 0) -> BertForMaskedLM:
    """A tiny BERT with a head prunekit does not support."""
    torch.manual_seed(seed)
    return BertForMaskedLM(_config("bert", 2)).eval()


def build_tokenizer() -> BertTokenizer:
    """A 99-token WordPiece tokenizer built in memory (tokenizers-backed in transformers v5)."""
    specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    tokens = specials + WORDS
    tokens += [f"tok{i}" for i in range(VOCAB - len(tokens))]
    return BertTokenizer(vocab={t: i for i, t in enumerate(tokens)})


def write_sst2(folder: Path, n_train: int = 48, n_dev: int = 24, seed: int = 0) -> Path:
    """GLUE-style SST-2 folder (train.tsv, dev.tsv, header ``sentence\\tlabel``): 'good' is 1, 'bad' 0."""
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    for name, n in (("train.tsv", n_train), ("dev.tsv", n_dev)):
        lines = ["sentence\tlabel"]
        for _ in range(n):
            label = int(rng.integers(0, 2))
            words = " ".join(rng.choice(WORDS[8:], size=int(rng.integers(1, 10))))
            lines.append(f"{words} {'good' if label else 'bad'} it was\t{label}")
        (folder / name).write_text("\n".join(lines) + "\n")
    return folder


def save_teacher(folder: Path, family: str = "bert", head: str = "classification", num_labels: int = 2,
                 num_layers: int = 2, seed: int = 0) -> Path:
    """A "teacher folder": a tiny model (2 labels by default, as SST-2 needs) and its tokenizer."""
    model = build_tiny_model(family, head, num_layers=num_layers, seed=seed, num_labels=num_labels)
    model.save_pretrained(folder)
    build_tokenizer().save_pretrained(folder)
    return folder


def make_batch(lengths: list[int], seed: int = 0, token_type_ids: bool = True, pad_id: int = 0,
               vocab: int = VOCAB) -> dict[str, torch.Tensor]:
    """A right-padded batch of random token ids with the given sequence lengths."""
    generator = torch.Generator().manual_seed(seed)
    longest = max(lengths)
    input_ids = torch.randint(5, vocab, (len(lengths), longest), generator=generator)  # (B, T)
    positions = torch.arange(longest)
    attention_mask = (positions[None, :] < torch.tensor(lengths)[:, None]).long()  # (B, T)
    input_ids = input_ids.masked_fill(attention_mask == 0, pad_id)
    batch = {"input_ids": input_ids, "attention_mask": attention_mask}
    if token_type_ids:
        batch["token_type_ids"] = torch.zeros_like(input_ids)
    return batch


def make_sample(family: str = "bert", num_batches: int = 3, seed: int = 0) -> SimpleNamespace:
    """A hand-built calibration sample: a few batches of different lengths, all with padding."""
    pad_id = 1 if family == "roberta" else 0
    token_types = family != "distilbert"  # DistilBERT tokenizers give no token_type_ids
    batches = []
    for b in range(num_batches):
        lengths = [3 + (b * 5 + i * 3) % 11 for i in range(4)]
        batches.append(make_batch(lengths, seed=seed + b, token_type_ids=token_types, pad_id=pad_id))
    num_sequences = sum(batch["input_ids"].shape[0] for batch in batches)
    num_tokens = int(sum(int(batch["attention_mask"].sum()) for batch in batches))
    return SimpleNamespace(
        batches=batches, num_sequences=num_sequences, num_tokens=num_tokens,
        mean_length=num_tokens / num_sequences,
    )  # fmt: skip


def model_inputs_for(model: PreTrainedModel, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The batch keys this model's forward takes (DistilBERT has no token_type_ids)."""
    return {k: v for k, v in batch.items() if k != "token_type_ids" or "distilbert" not in model.config.model_type}


def outputs_of(model: PreTrainedModel, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Every head output of ``model`` on ``batch``, concatenated along the last axis."""
    with torch.no_grad():
        out = model(**model_inputs_for(model, batch))
    if hasattr(out, "start_logits"):
        return torch.stack([out.start_logits, out.end_logits], dim=-1)  # (B, T, 2)
    return out.logits  # (B, C)


def assert_reloads_identically(out: Path, head: str, shapes: list, batch: dict[str, torch.Tensor],
                               expected: torch.Tensor) -> PreTrainedModel:
    """A saved pruned folder reloads, through ``load_pruned`` and through the Auto class of its head,
    with the same layer shapes and bit-identical outputs; returns the ``load_pruned`` model."""
    from transformers import AutoModelForQuestionAnswering, AutoModelForSequenceClassification

    from prunekit import load_pruned
    from prunekit.families import get_adapter

    reloaded = load_pruned(out)
    assert get_adapter(reloaded).layer_shapes() == shapes
    assert not reloaded.training
    assert torch.equal(outputs_of(reloaded, batch), expected)
    auto = AutoModelForQuestionAnswering if head == "qa" else AutoModelForSequenceClassification
    through_auto = auto.from_pretrained(out).eval()
    assert type(through_auto).__name__.startswith("Pruned")
    assert get_adapter(through_auto).layer_shapes() == shapes
    assert torch.equal(outputs_of(through_auto, batch), expected)
    return reloaded


# Property tests (test_properties.py): a bounded, derandomized draw in CI; `deep` for a longer search.
settings.register_profile("ci", max_examples=40, deadline=None, derandomize=True, print_blob=True,
                          suppress_health_check=[HealthCheck.too_slow])
settings.register_profile("deep", max_examples=500, deadline=None, suppress_health_check=[HealthCheck.too_slow])
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))


# ---- fixtures ---------------------------------------------------------------------------------------
@pytest.fixture(scope="session", autouse=True)
def one_thread():
    """One torch thread for the whole session: on this shared 2-core machine, two OpenMP threads
    spinning against other processes make tiny-model steps ~100x slower."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(params=FAMILIES)
def family(request) -> str:
    """Parametrizes a test over every supported model family."""
    return request.param


@pytest.fixture(params=HEADS)
def head(request) -> str:
    """Parametrizes a test over the task heads: classification, regression, qa."""
    return request.param


@pytest.fixture
def make_model() -> Callable[..., PreTrainedModel]:
    """Factory: ``make_model(family, head, num_layers=2, seed=0, num_labels=None)``."""
    return build_tiny_model


@pytest.fixture
def tiny_model(family: str, head: str) -> PreTrainedModel:
    """A 2-layer tiny model of each family with each head (parametrized by ``family`` and ``head``)."""
    return build_tiny_model(family, head)


@pytest.fixture
def masked_lm() -> BertForMaskedLM:
    return build_masked_lm()


@pytest.fixture
def tokenizer() -> BertTokenizer:
    return build_tokenizer()


@pytest.fixture
def sst2_dir(tmp_path: Path) -> Path:
    return write_sst2(tmp_path / "sst2")


@pytest.fixture
def teacher_dir(tmp_path: Path) -> Path:
    """A tiny 2-label BERT SST-2 "teacher" folder with its tokenizer."""
    return save_teacher(tmp_path / "teacher")


@pytest.fixture
def make_teacher(tmp_path: Path) -> Callable[..., Path]:
    """Factory: ``make_teacher(name, family="bert", head="classification", num_labels=2, ...)``."""

    def make(name: str = "teacher", **kwargs) -> Path:
        return save_teacher(tmp_path / name, **kwargs)

    return make


@pytest.fixture(name="make_batch")
def make_batch_fixture() -> Callable[..., dict[str, torch.Tensor]]:
    """Factory: ``make_batch(lengths, seed=0, token_type_ids=True, pad_id=0)``."""
    return make_batch


@pytest.fixture
def batch(family: str) -> dict[str, torch.Tensor]:
    """A padded batch of 4 sequences (lengths 9, 5, 2, 7) for ``family``."""
    return make_batch([9, 5, 2, 7], seed=1, token_type_ids=family != "distilbert", pad_id=1 if family == "roberta" else 0)


@pytest.fixture(name="make_sample")
def make_sample_fixture() -> Callable[..., SimpleNamespace]:
    """Factory: ``make_sample(family, num_batches=3, seed=0)``, a hand-built calibration sample."""
    return make_sample


@pytest.fixture(name="outputs_of")
def outputs_of_fixture() -> Callable[[PreTrainedModel, dict[str, torch.Tensor]], torch.Tensor]:
    """``outputs_of(model, batch)``: the head outputs (logits, or start/end logits stacked)."""
    return outputs_of


def run_method(method: Callable, model: PreTrainedModel, sample, kind: str, config, prepared=None):
    """Run a pruning method as the pipeline does (the model is the teacher, left unchanged by the
    method) and cut ``model`` in place by the plan it returns; returns (plan, log)."""
    from prunekit.core.surgery import apply_plan
    from prunekit.tasks import TaskData

    plan, log = method(view(model), TaskData(kind=kind, sample=sample, prepared=prepared), config)
    apply_plan(view(model), plan)
    return plan, log


def assert_same_plan(first, second) -> None:
    """Two plans are equal: indices, removals, hidden dims and every tensor bit for bit."""
    assert first.to_dict() == second.to_dict()
    a, b = first.tensors(), second.tensors()
    assert sorted(a) == sorted(b)
    for name in a:
        assert torch.equal(a[name], b[name]), name
