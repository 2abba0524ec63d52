"""Wanda-sp (prunekit.methods.wanda_sp) on tiny random decoders of every family: every budget kind
is met with one ratio in every layer, the pruned model equals the masked teacher within 1e-5, it
saves and reloads identically, the plan replays, the score is the Wanda metric, and a layer's
statistics are taken with the layers below it pruned."""

from __future__ import annotations

import pytest
import torch
from builders import view
from llm_builders import (
    D_FF,
    D_H,
    VARIANTS,
    D,
    H,
    assert_budget_met,
    assert_reloads,
    build,
    encoder_logits,
    encoder_run,
    lm_sample,
    logits,
    masked_logits,
    run,
)

import prunekit
from prunekit.core.accounting import count_non_embedding_params
from prunekit.core.errors import ConfigError
from prunekit.core.masks import apply_masks
from prunekit.methods import get_method
from prunekit.methods.activations import output_input_stats, uniform_ratio
from prunekit.methods.layerwise import model_inputs
from prunekit.methods.lut import LatencyTable
from prunekit.methods.search import SublayerCost, full_widths
from prunekit.methods.wanda_sp import WandaSpConfig, wanda_scores, wanda_sp

ATOL = 1e-5


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("budget", [{"keep_params": 0.6}, {"keep_flops": 0.5}])
def test_meets_the_budget_uniformly_and_equals_the_masked_teacher(variant, budget):
    teacher = build(variant)
    sample = lm_sample()
    plan, log, pruned = run(wanda_sp, WandaSpConfig(**budget), teacher, sample)
    assert_budget_met(pruned, teacher, sample, budget)  # added output biases counted too
    assert len({len(step.heads) for step in plan.layers}) == 1  # the same ratio in every layer
    assert len({len(step.neurons) for step in plan.layers}) == 1
    assert 0 < log["pruning_ratio"] < 1
    for batch in sample.batches:
        torch.testing.assert_close(logits(pruned, batch), masked_logits(teacher, plan, batch), atol=ATOL, rtol=0)


@pytest.mark.parametrize("variant", ["llama", "gpt2"])
def test_saves_reloads_and_replays(tmp_path, variant):
    teacher = build(variant)
    plan, _, pruned = run(wanda_sp, WandaSpConfig(keep_params=0.7), teacher)
    batch = lm_sample(seed=4).batches[0]
    assert_reloads(pruned, tmp_path / "out", plan, batch, atol=1e-6 if variant == "gpt2" else 0.0)
    replayed = prunekit.apply_plan(teacher, tmp_path / "out")
    assert torch.equal(logits(replayed, batch), logits(pruned, batch))


def test_a_latency_budget_is_met_with_the_table():
    teacher = build("llama")
    table = LatencyTable(attn_units=list(range(H + 1)), attn_ms=[0.1 + 0.5 * n for n in range(H + 1)],
                         ffn_units=[0, 10, 20, 30, D_FF], ffn_ms=[0.1, 1.0, 2.0, 3.0, 3.7], hidden_size=D,
                         head_dim=D_H, num_heads=H, intermediate_size=D_FF, batch_size=1, seq_len=8, device="cpu",
                         threads=1)
    costs = table.costs(view(teacher))
    half = 0.5 * sum(costs[key](n) for key, n in full_widths(view(teacher)).items())
    _, counts = uniform_ratio(view(teacher), costs, half, "wanda_sp")
    assert counts["attn"] < H and counts["ffn"] < D_FF


def test_the_ratio_is_the_smallest_that_fits():
    teacher = build("llama")
    costs = {(kind, layer): SublayerCost(slope=1.0) for layer in range(4) for kind in ("attn", "ffn")}
    # Per layer 2 heads + 19 neurons fit (p = 0.5); any smaller p keeps 3 heads and overshoots.
    ratio, counts = uniform_ratio(view(teacher), costs, 4 * (2 + 19), "wanda_sp")
    assert counts == {"attn": 2, "ffn": 19}
    assert ratio == pytest.approx(0.5, abs=1e-9)


def test_the_score_is_the_wanda_metric_and_layers_see_the_pruned_ones_below():
    teacher = build("llama", layers=2)
    adapter = view(teacher)
    sample = lm_sample()
    with torch.no_grad(), output_input_stats(adapter, [("ffn", 0)]) as (stats, mask):
        for batch in sample.batches:
            mask.value = batch["attention_mask"]
            teacher(**model_inputs(batch))
    down = adapter.ffn(0).down.weight.detach().double()
    expected = down.abs().mean(0) * stats[("ffn", 0)].mean_square.sqrt()
    torch.testing.assert_close(wanda_scores(adapter, 0, "ffn", stats[("ffn", 0)]), expected)
    # Layer 1 is scored on the model whose layer 0 is already pruned (the reference's bottom-up pass).
    plan, _, _ = run(wanda_sp, WandaSpConfig(keep_flops=0.5), teacher, sample)
    heads, neurons = plan.masks(adapter)
    with (torch.no_grad(), apply_masks(adapter, {0: heads[0]}, {0: neurons[0]}),
          output_input_stats(adapter, [("ffn", 1)]) as (stats, mask)):
        for batch in sample.batches:
            mask.value = batch["attention_mask"]
            teacher(**model_inputs(batch))
    scores = wanda_scores(adapter, 1, "ffn", stats[("ffn", 1)])
    top = torch.sort(-scores, stable=True).indices[: len(plan.layers[1].neurons)]
    assert sorted(top.tolist()) == plan.layers[1].neurons


def test_registered_and_refuses_what_it_cannot_serve():
    assert get_method("wanda_sp").make_config(keep_flops=0.4).keep == 0.4
    with pytest.raises(ConfigError, match="latency table"):
        WandaSpConfig(keep_latency=0.5)
    with pytest.raises(ConfigError, match="no option"):
        get_method("wanda_sp").make_config(power=2)


@pytest.mark.parametrize("family", ["bert", "distilbert"])
def test_encoders_meet_the_budget(family):
    plan, pruned, teacher, sample = encoder_run(wanda_sp, WandaSpConfig(keep_params=0.6), family)
    assert count_non_embedding_params(view(pruned)) <= 0.6 * count_non_embedding_params(view(teacher))
    assert encoder_logits(pruned, sample.batches[0]).isfinite().all()
