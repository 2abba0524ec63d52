"""prunekit.core.accounting (spec kprune_kwon.md §2): per-head and per-neuron FLOPs, counted FLOPs of
pruned models, and exact parameter counts after pruning."""

from __future__ import annotations

import copy

import pytest
import torch
from builders import view
from transformers import BertConfig, BertForSequenceClassification

from prunekit import count_flops, count_params
from prunekit.core.accounting import full_flops, layer_flops, unit_costs
from prunekit.core.surgery import LayerPlan, PruningPlan, apply_plan
from prunekit.families import get_adapter

H, D_H, D, D_FF = 4, 8, 32, 37


def test_unit_costs_hand_computed(family, make_model):
    """s = 10, d = 32, d_h = 8: head MACs 3·10·32·8 + 2·10²·8 + 10·8·32 = 7680 + 1600 + 2560 = 11840,
    neuron MACs 2·10·32 = 640; FLOPs are twice that."""
    cost = unit_costs(get_adapter(make_model(family)), 0, 10)
    assert cost.head == 2 * 11840 == 23680
    assert cost.neuron == 2 * 640 == 1280


def test_unit_costs_fractional_length(make_model):
    s = 7.5
    cost = unit_costs(get_adapter(make_model("bert")), 1, s)
    assert cost.head == pytest.approx(2 * (3 * s * D * D_H + 2 * s * s * D_H + s * D_H * D), rel=1e-12)
    assert cost.neuron == pytest.approx(2 * 2 * s * D, rel=1e-12)


def test_bert_base_sst2_unit_costs():
    """The spec's check: BERT-base (d 768, d_h 64) at SST-2's mean length 25.16 has 10.06 MFLOPs per
    head and 0.077 MFLOPs per neuron. One layer and a tiny vocab keep the model cheap to build."""
    torch.manual_seed(0)
    config = BertConfig(vocab_size=10, hidden_size=768, num_hidden_layers=1, num_attention_heads=12,
                        intermediate_size=3072, max_position_embeddings=32)  # fmt: skip
    model = BertForSequenceClassification(config)
    s = 25.16
    cost = unit_costs(get_adapter(model), 0, s)
    assert round(cost.head / 1e6, 2) == 10.06
    assert round(cost.neuron / 1e6, 3) == 0.077
    assert cost.head == pytest.approx(2 * (3 * s * 768 * 64 + 2 * s**2 * 64 + s * 64 * 768), rel=1e-12)
    assert cost.neuron == pytest.approx(2 * 2 * s * 768, rel=1e-12)
    assert count_flops(view(model), s) == pytest.approx(12 * cost.head + 3072 * cost.neuron, rel=1e-12)
    assert count_flops(view(model), s) == full_flops(view(model), s)


def test_count_flops_of_unpruned_model(family, make_model):
    model = make_model(family, num_layers=3)
    cost = unit_costs(get_adapter(model), 0, 12.0)
    assert count_flops(view(model), 12.0) == pytest.approx(3 * (H * cost.head + D_FF * cost.neuron), rel=1e-12)
    assert count_flops(view(model), 12.0) == full_flops(view(model), 12.0)


def test_count_flops_of_pruned_model_is_the_sum_over_kept_units(family, head, make_model):
    model = make_model(family, head, num_layers=3)
    plan = PruningPlan([
        LayerPlan(heads=[0, 3], neurons=list(range(10))),
        LayerPlan(heads=[], neurons=[4]),
        LayerPlan(heads=[2], neurons=[]),
    ])  # fmt: skip
    seq_len = 17.3
    original_full = full_flops(view(model), seq_len)
    pruned = apply_plan(view(copy.deepcopy(model)), plan)
    cost = unit_costs(get_adapter(pruned), 0, seq_len)
    kept_heads, kept_neurons = 2 + 0 + 1, 10 + 1 + 0
    assert count_flops(view(pruned), seq_len) == pytest.approx(kept_heads * cost.head + kept_neurons * cost.neuron, rel=1e-12)
    assert full_flops(view(pruned), seq_len) == pytest.approx(original_full, rel=1e-12)  # the architecture's, unpruned
    rows = layer_flops(view(pruned), seq_len)
    assert [(row["heads"], row["neurons"]) for row in rows] == [(2, 10), (0, 1), (1, 0)]
    assert rows[1]["attn_flops"] == 0.0 and rows[2]["ffn_flops"] == 0.0
    assert rows[0]["attn_flops"] == pytest.approx(2 * cost.head, rel=1e-12)


def test_count_flops_of_an_empty_model_is_zero(make_model):
    pruned = apply_plan(view(make_model("roberta")), PruningPlan([LayerPlan(heads=[], neurons=[])] * 2))
    assert count_flops(view(pruned), 20) == 0.0
    assert full_flops(view(pruned), 20) > 0


@pytest.mark.parametrize("seq_len", [0, -3.0])
def test_count_flops_rejects_non_positive_length(make_model, seq_len):
    with pytest.raises(ValueError, match="seq_len must be positive"):
        count_flops(view(make_model("bert")), seq_len)


def removed_params(heads_removed: int, neurons_removed: int) -> int:
    """Parameters one removed head and neuron take with them: a head's q/k/v rows (weights and biases)
    and its out-projection columns; a neuron's FFN-in row and bias, and its FFN-out column. The
    out-projection biases stay, even in an emptied sublayer (spec P4)."""
    per_head = 3 * (D_H * D + D_H) + D * D_H
    per_neuron = D + 1 + D
    return heads_removed * per_head + neurons_removed * per_neuron


@pytest.mark.parametrize(
    "plan",
    [
        PruningPlan([LayerPlan(heads=[1, 2], neurons=list(range(30))), LayerPlan(heads=[0, 1, 2, 3], neurons=[7])]),
        PruningPlan([LayerPlan(heads=[], neurons=[]), LayerPlan(heads=[3], neurons=None)]),
        PruningPlan([LayerPlan(heads=[], neurons=[]), LayerPlan(heads=[], neurons=[])]),
    ],
    ids=["partial", "emptied-layer", "everything"],
)
def test_count_params_drops_by_the_removed_units(family, head, make_model, plan):
    model = make_model(family, head)
    before, before_encoder = count_params(view(model)), count_params(view(model), encoder_only=True)
    heads_removed = sum(H - len(step.heads) for step in plan.layers if step.heads is not None)
    neurons_removed = sum(D_FF - len(step.neurons) for step in plan.layers if step.neurons is not None)
    pruned = apply_plan(view(copy.deepcopy(model)), plan)
    expected = removed_params(heads_removed, neurons_removed)
    assert before - count_params(view(pruned)) == expected
    assert before_encoder - count_params(view(pruned), encoder_only=True) == expected
    assert count_params(view(model)) == before  # the original is untouched


def test_count_params_counts_every_parameter(make_model):
    model = make_model("bert")
    assert count_params(view(model)) == sum(p.numel() for p in model.parameters())
    assert count_params(view(model), encoder_only=True) == sum(p.numel() for p in model.bert.encoder.parameters())
