"""Magnitude and random pruning (prunekit.methods.baselines) on tiny random models: the budget is
met, the result is deterministic by seed, the pruned model equals its masked form, and the
scores mean what they say."""

from __future__ import annotations

import copy

import pytest
import torch
from builders import view
from conftest import make_sample, outputs_of, run_method

from prunekit.core.accounting import count_flops, full_flops
from prunekit.core.errors import ConfigError
from prunekit.core.masks import apply_masks
from prunekit.families import get_adapter
from prunekit.methods import get_method
from prunekit.methods.baselines import (
    MagnitudeConfig,
    RandomConfig,
    magnitude,
    magnitude_scores,
    random_prune,
)
from prunekit.methods.lut import LatencyTable
from prunekit.methods.search import full_widths, total_cost

METHODS = [(magnitude, MagnitudeConfig), (random_prune, RandomConfig)]


@pytest.mark.parametrize("method, config_class", METHODS, ids=["magnitude", "random"])
@pytest.mark.parametrize("keep", [0.8, 0.4, 0.1])
def test_meets_the_budget_and_equals_the_masked_form(tiny_model, family, head, method, config_class, keep):
    teacher = copy.deepcopy(tiny_model)
    sample = make_sample(family)
    plan, log = run_method(method, tiny_model, sample, head, config_class(keep_flops=keep))
    seq_len = sample.mean_length
    assert count_flops(view(tiny_model), seq_len) <= keep * full_flops(view(teacher), seq_len) * (1 + 1e-9)
    heads, neurons = plan.masks(view(teacher))
    for batch in sample.batches:
        with apply_masks(get_adapter(teacher), heads, neurons):
            masked = outputs_of(teacher, batch)
        torch.testing.assert_close(outputs_of(tiny_model, batch), masked, rtol=1e-4, atol=1e-5)


def test_magnitude_is_deterministic_and_random_depends_on_the_seed(make_model):
    sample = make_sample("bert")
    plans = {}
    for name, method, config in [
        ("magnitude-a", magnitude, MagnitudeConfig(keep_flops=0.5)),
        ("magnitude-b", magnitude, MagnitudeConfig(keep_flops=0.5)),
        ("random-0a", random_prune, RandomConfig(keep_flops=0.5, seed=0)),
        ("random-0b", random_prune, RandomConfig(keep_flops=0.5, seed=0)),
        ("random-1", random_prune, RandomConfig(keep_flops=0.5, seed=1)),
    ]:
        plans[name] = run_method(method, make_model("bert", num_layers=3), sample, "classification", config)[0].to_dict()
    assert plans["magnitude-a"] == plans["magnitude-b"]
    assert plans["random-0a"] == plans["random-0b"]
    assert plans["random-0a"] != plans["random-1"]


def test_magnitude_keeps_the_largest_units(make_model):
    model = make_model("bert")
    adapter = get_adapter(model)
    with torch.no_grad():
        adapter.ffn(0).down.weight[:, 5] *= 100.0  # neuron 5 of layer 0 now dominates
        adapter.attention(1).value.weight[8:16] *= 100.0  # so does head 1 of layer 1
    scores = magnitude_scores(adapter)
    assert int(torch.argmax(scores[("ffn", 0)])) == 5
    assert int(torch.argmax(scores[("attn", 1)])) == 1
    plan, _ = run_method(magnitude, model, make_sample("bert"), "classification", MagnitudeConfig(keep_flops=0.2))
    assert 5 in plan.layers[0].neurons
    assert 1 in plan.layers[1].heads


def test_random_keeps_heads_and_neurons_in_similar_proportion(make_model):
    model = make_model("bert", num_layers=4)
    run_method(random_prune, model, make_sample("bert"), "classification", RandomConfig(keep_flops=0.5, seed=3))
    shapes = get_adapter(model).layer_shapes()
    heads = sum(s.num_heads for s in shapes) / (4 * 4)
    neurons = sum(s.intermediate_size for s in shapes) / (4 * 37)
    assert 0.2 < heads < 0.8 and 0.3 < neurons < 0.7


@pytest.mark.parametrize("name", ["magnitude", "random"])
def test_latency_budget(make_model, tmp_path, name):
    model = make_model("bert")
    table = LatencyTable(
        attn_units=[0, 1, 2, 3, 4], attn_ms=[0.0, 1.0, 1.3, 1.6, 1.9],
        ffn_units=[0, 16, 32, 37], ffn_ms=[0.0, 0.8, 1.6, 1.85],
        hidden_size=32, head_dim=8, num_heads=4, intermediate_size=37, batch_size=2, seq_len=8,
        device="cpu", threads=1,
    )
    path = str(table.save(tmp_path / "lut.json"))
    spec = get_method(name)
    _, log = run_method(spec.run, model, make_sample("bert"), "classification", spec.make_config(keep_latency=0.4, lut=path))
    adapter = get_adapter(model)
    costs = table.costs(adapter)
    counts = {(k, layer): (s.num_heads if k == "attn" else s.intermediate_size)
              for layer, s in enumerate(adapter.layer_shapes()) for k in ("attn", "ffn")}
    assert log["budget_kind"] == "latency"
    assert total_cost(costs, counts) <= 0.4 * total_cost(costs, full_widths(adapter)) * (1 + 1e-9)


def test_registered_and_validated():
    assert get_method("magnitude").config_class is MagnitudeConfig
    assert get_method("random").run is random_prune
    with pytest.raises(ConfigError, match="prunekit lut"):
        RandomConfig(keep_latency=0.5)
    with pytest.raises(ConfigError, match="power"):
        MagnitudeConfig(power=0)
