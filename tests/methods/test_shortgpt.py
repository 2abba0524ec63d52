"""ShortGPT (prunekit.methods.shortgpt) on tiny random decoders of every family: the fewest whole
layers of lowest Block Influence go under every budget kind, the pruned model equals the teacher
with those layers made the identity within 1e-5, the saved folder is the stock class with fewer
layers (cache slots renumbered, generation with the cache equal to without), it reloads and the
plan replays; a budget whole layers cannot meet names the nearest it can reach."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from builders import view
from llm_builders import (
    LAYERS,
    VARIANTS,
    assert_budget_met,
    assert_reloads,
    build,
    encoder_logits,
    encoder_run,
    lm_sample,
    logits,
    run,
)

import prunekit
from prunekit.core.errors import ConfigError
from prunekit.core.surgery import remove_sublayer
from prunekit.methods import get_method
from prunekit.methods.shortgpt import ShortGptConfig, block_influence, shortgpt

ATOL = 1e-5


def identity_layers(teacher, layers):
    """The teacher with ``layers`` made the identity (both sublayers removed): what dropping them computes."""
    model = copy.deepcopy(teacher)
    adapter = view(model)
    for layer in layers:
        remove_sublayer(adapter, layer, "attn")
        remove_sublayer(adapter, layer, "ffn")
    return model


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("budget", [{"keep_params": 0.6}, {"keep_flops": 0.7}])
def test_removes_the_least_influential_layers_within_the_budget(variant, budget):
    teacher = build(variant)
    sample = lm_sample()
    plan, log, pruned = run(shortgpt, ShortGptConfig(**budget), teacher, sample)
    removed = log["removed_layers"]
    assert removed and view(pruned).num_layers == LAYERS - len(removed)
    influence = log["block_influence"]
    assert max(influence[i] for i in removed) <= min(influence[i] for i in range(LAYERS) if i not in removed)
    assert_budget_met(pruned, teacher, sample, budget)  # added output biases counted too
    assert log["nearest_above"] > log["asked"] >= log["reached"]  # the fewest layers that meet it
    expected_model = identity_layers(teacher, removed)
    for batch in sample.batches:
        torch.testing.assert_close(logits(pruned, batch), logits(expected_model, batch), atol=ATOL, rtol=0)


def test_block_influence_is_one_minus_the_mean_cosine():
    teacher = build("llama", layers=2)
    sample = lm_sample()
    from builders import layer_io

    influence = block_influence(view(teacher), sample)
    sums, count = 0.0, 0
    for batch in sample.batches:
        x, y = layer_io(teacher, 1, {k: batch[k] for k in ("input_ids", "attention_mask")})
        cos = torch.nn.functional.cosine_similarity(x.double(), y.double(), dim=-1)[batch["attention_mask"].bool()]
        sums, count = sums + float(cos.sum()), count + cos.numel()
    assert influence[1] == pytest.approx(1 - sums / count, abs=1e-9)


@pytest.mark.parametrize("variant", ["llama", "qwen2", "opt", "gpt2"])
def test_the_folder_is_the_stock_class_with_fewer_layers(tmp_path, variant):
    teacher = build(variant)
    plan, log, pruned = run(shortgpt, ShortGptConfig(keep_params=0.6), teacher)
    assert plan.uniform
    batch = lm_sample(seed=7).batches[0]
    models = assert_reloads(pruned, tmp_path / "out", plan, batch, atol=1e-6 if variant == "gpt2" else 0.0)
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert "prunekit_layers" not in config and "auto_map" not in config
    assert config["num_hidden_layers" if variant != "gpt2" else "n_layer"] == LAYERS - len(log["removed_layers"])
    assert all(not type(model).__name__.startswith("Pruned") for model in models)
    # Cache slots renumbered: greedy generation with the cache equals generation without it.
    prompt = batch["input_ids"][:1, :5]
    with torch.no_grad():
        cached = models[1].generate(prompt, max_new_tokens=6, do_sample=False, use_cache=True, pad_token_id=0)
        uncached = models[1].generate(prompt, max_new_tokens=6, do_sample=False, use_cache=False, pad_token_id=0)
    assert torch.equal(cached, uncached)
    replayed = prunekit.apply_plan(teacher, tmp_path / "out")
    assert torch.equal(logits(replayed, batch), logits(pruned, batch))


def test_a_budget_whole_layers_cannot_meet_names_the_nearest():
    teacher = build("llama")
    with pytest.raises(ConfigError, match=r"nearest it can reach"):
        run(shortgpt, ShortGptConfig(keep_flops=0.05), teacher)


def test_registered_and_takes_every_budget_kind():
    spec = get_method("shortgpt")
    assert spec.make_config(keep_params=0.75).budget_kind == "params"
    with pytest.raises(ConfigError, match="latency table"):
        ShortGptConfig(keep_latency=0.5)


@pytest.mark.parametrize("family", ["bert", "roberta", "distilbert"])
def test_encoders_lose_whole_layers(family):
    plan, pruned, teacher, sample = encoder_run(shortgpt, ShortGptConfig(keep_flops=0.7), family)
    removed = [i for i, step in enumerate(plan.layers) if step.layer_removed]
    assert removed and view(pruned).num_layers == 3 - len(removed)
    expected = identity_layers(teacher, removed)
    for batch in sample.batches:
        torch.testing.assert_close(encoder_logits(pruned, batch), encoder_logits(expected, batch), atol=ATOL, rtol=0)


def test_a_model_whose_layers_depend_on_their_index_is_refused():
    teacher = build("gpt2")
    teacher.config.scale_attn_by_inverse_layer_idx = True
    with pytest.raises(ConfigError, match="scale_attn_by_inverse_layer_idx"):
        run(shortgpt, ShortGptConfig(keep_flops=0.7), teacher)


def test_a_latency_budget_prices_each_layer_from_the_table(tmp_path):
    from llm_builders import D_FF, D_H, D, H

    from prunekit.methods.lut import LatencyTable

    table = LatencyTable(attn_units=list(range(H + 1)), attn_ms=[0.0, 1.0, 1.5, 2.0, 2.5], ffn_units=[0, D_FF],
                         ffn_ms=[0.0, 3.0], hidden_size=D, head_dim=D_H, num_heads=H, intermediate_size=D_FF,
                         batch_size=1, seq_len=8, device="cpu", threads=1)
    table.save(tmp_path / "lut.json")
    plan, log, pruned = run(shortgpt, ShortGptConfig(keep_latency=0.6, lut=str(tmp_path / "lut.json")), build("llama"))
    assert log["removed_layers"] and log["reached"] == pytest.approx(0.5)  # 5.5 ms per layer: 2 of 4 go
