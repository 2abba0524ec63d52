"""Property tests (hypothesis): random small shapes of every supported family, random plans (emptied and
removed sublayers, narrowed hidden sizes, scales) and random budgets. For each drawn case:

- the physically pruned model computes what the masked model computes (an independent hook-built
  reference for removals and narrowing, test_structure_removal_hidden.reference_outputs);
- the saved folder reloads with identical outputs through load_pruned and the Auto class;
- every calibration method's plan meets its FLOPs budget, leaves the teacher unchanged, and replayed
  from its plan.json + plan.safetensors on the teacher rebuilds the same model.

The number of examples is bounded by the hypothesis profile set in conftest.py (``ci``: derandomized, so
CI draws the same cases every run); ``HYPOTHESIS_PROFILE=deep`` draws more.
"""

from __future__ import annotations

import copy
import tempfile
from pathlib import Path

import torch
from conftest import _randomize, assert_reloads_identically, make_batch, make_sample, outputs_of
from hypothesis import given, settings
from hypothesis import strategies as st
from test_structure_removal_hidden import reference_outputs
from transformers import (
    BertConfig,
    BertForQuestionAnswering,
    BertForSequenceClassification,
    DistilBertConfig,
    DistilBertForQuestionAnswering,
    DistilBertForSequenceClassification,
    RobertaConfig,
    RobertaForQuestionAnswering,
    RobertaForSequenceClassification,
)

import prunekit
from prunekit import save_pruned
from prunekit.core.accounting import count_flops, count_params, full_flops
from prunekit.core.surgery import LayerPlan, PruningPlan, apply_plan
from prunekit.families import get_adapter
from prunekit.io.folders import save_plan
from prunekit.methods import get_method
from prunekit.tasks import TaskData

ATOL = 1e-5
VOCAB, POSITIONS = 50, 40

CLASSES = {
    "bert": (BertConfig, BertForSequenceClassification, BertForQuestionAnswering),
    "roberta": (RobertaConfig, RobertaForSequenceClassification, RobertaForQuestionAnswering),
    "distilbert": (DistilBertConfig, DistilBertForSequenceClassification, DistilBertForQuestionAnswering),
}


@st.composite
def model_shapes(draw) -> dict:
    return {
        "family": draw(st.sampled_from(sorted(CLASSES))),
        "head": draw(st.sampled_from(["classification", "qa"])),
        "layers": draw(st.integers(1, 3)),
        "heads": draw(st.integers(1, 4)),
        "head_dim": draw(st.sampled_from([2, 4, 8])),
        "ffn": draw(st.integers(1, 24)),
        "seed": draw(st.integers(0, 2**16)),
    }


def build(shape: dict):
    config_class, cls_class, qa_class = CLASSES[shape["family"]]
    hidden = shape["heads"] * shape["head_dim"]
    if shape["family"] == "distilbert":
        config = config_class(vocab_size=VOCAB, dim=hidden, n_layers=shape["layers"], n_heads=shape["heads"],
                              hidden_dim=shape["ffn"], max_position_embeddings=POSITIONS)
    else:
        config = config_class(vocab_size=VOCAB, hidden_size=hidden, num_hidden_layers=shape["layers"],
                              num_attention_heads=shape["heads"], intermediate_size=shape["ffn"],
                              max_position_embeddings=POSITIONS + 2)
    torch.manual_seed(shape["seed"])
    model = (qa_class if shape["head"] == "qa" else cls_class)(config)
    return _randomize(model).eval()


def batch_for(shape: dict, seed: int) -> dict[str, torch.Tensor]:
    pad = 1 if shape["family"] == "roberta" else 0
    return make_batch([7, 3, 5], seed=seed, token_type_ids=shape["family"] != "distilbert", pad_id=pad, vocab=VOCAB)


@st.composite
def plans(draw, shape: dict) -> PruningPlan:
    def subset(size: int) -> list[int]:
        return sorted(draw(st.sets(st.integers(0, size - 1), max_size=size)))

    layers = []
    for _ in range(shape["layers"]):
        heads = subset(shape["heads"]) if draw(st.booleans()) else None
        neurons = subset(shape["ffn"]) if draw(st.booleans()) else None
        scaled = heads is not None and draw(st.booleans())
        layers.append(LayerPlan(
            heads=heads, neurons=neurons,
            head_scales=[draw(st.floats(0.25, 2.0)) for _ in range(shape["heads"])] if scaled else None,
            attention_removed=draw(st.integers(0, 4)) == 0, ffn_removed=draw(st.integers(0, 4)) == 0,
        ))  # fmt: skip
    hidden_size = shape["heads"] * shape["head_dim"]
    hidden = None
    if draw(st.booleans()):
        hidden = sorted(draw(st.sets(st.integers(0, hidden_size - 1), min_size=1, max_size=hidden_size)))
    return PruningPlan(layers, hidden=hidden)


@st.composite
def shape_and_plan(draw) -> tuple[dict, PruningPlan]:
    shape = draw(model_shapes())
    return shape, draw(plans(shape))


@given(shape_and_plan(), st.integers(0, 1000))
def test_pruned_equals_masked_and_reloads_identically(case, batch_seed):
    shape, plan = case
    model = build(shape)
    batch = batch_for(shape, batch_seed)
    expected = reference_outputs(model, plan, batch, outputs_of)
    pruned = apply_plan(copy.deepcopy(model), copy.deepcopy(plan))
    got = outputs_of(pruned, batch)
    torch.testing.assert_close(got, expected, atol=ATOL, rtol=0)
    assert count_params(pruned) == sum(p.numel() for p in pruned.parameters())
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "pruned"
        save_pruned(pruned, out)
        assert_reloads_identically(out, shape["head"], get_adapter(pruned).layer_shapes(), batch, got)


def labelled_sample(shape: dict, kind: str):
    """A tiny calibration sample with the labels Kwon et al.'s Fisher information needs."""
    sample = make_sample(shape["family"], num_batches=1, seed=shape["seed"] % 97)
    generator = torch.Generator().manual_seed(shape["seed"])
    batches = []
    for batch in sample.batches:
        batch = {k: v.clamp(max=VOCAB - 1) for k, v in batch.items()}
        rows, length = batch["input_ids"].shape
        if kind == "qa":
            batch["start_positions"] = torch.randint(0, length, (rows,), generator=generator)
            batch["end_positions"] = torch.randint(0, length, (rows,), generator=generator)
        else:
            batch["labels"] = torch.randint(0, 2, (rows,), generator=generator)
        batches.append(batch)
    sample.batches = batches
    return sample


@settings(max_examples=12)
@given(model_shapes(), st.sampled_from(["kprune", "kwon", "magnitude", "random"]), st.floats(0.02, 0.95))
def test_a_methods_plan_meets_its_budget_and_replays_from_its_files(shape, method, keep):
    teacher = build(shape)
    before = {k: v.clone() for k, v in teacher.state_dict().items()}
    kind = "qa" if shape["head"] == "qa" else "classification"
    sample = labelled_sample(shape, kind)
    spec = get_method(method)
    plan, _ = spec.run(teacher, TaskData(kind, sample), spec.make_config(keep_flops=keep))
    assert all(torch.equal(before[k], v) for k, v in teacher.state_dict().items())  # the teacher is left alone
    pruned = apply_plan(copy.deepcopy(teacher), plan)
    seq_len = sample.mean_length
    assert count_flops(pruned, seq_len) <= keep * full_flops(teacher, seq_len) * (1 + 1e-9)
    with tempfile.TemporaryDirectory() as tmp:
        save_plan(plan, tmp)
        replayed = prunekit.apply_plan(teacher, tmp)
    batch = batch_for(shape, 0)
    assert get_adapter(replayed).layer_shapes() == get_adapter(pruned).layer_shapes()
    torch.testing.assert_close(outputs_of(replayed, batch), outputs_of(pruned, batch), atol=1e-6, rtol=0)
