"""Issue 22: what Gemma 2, Gemma 3 and Phi-3 add to the Llama layout, beyond the invariant tests they
share with it (test_decoders_llama.py, test_properties_decoders.py): the facts their adapters state
((1 + w) RMSNorms, norms on sublayer outputs, fused projections), modeling parity with transformers'
own classes on the same random weights (1e-5), Phi-3 saved with its own fused names and shapes, the
refused variants named in one line, and the pipeline (Kprune, Kwon et al., magnitude) under a
non-embedding parameter budget with perplexity, the caller's model left unchanged."""

from __future__ import annotations

import copy
import json
import math

import pytest
import torch
import transformers
from builders import masked, outputs, view
from safetensors import safe_open
from test_decoders_llama import D_FF, D_H, H_KV, VOCAB, D, H, batch_of, build, random_plan

import prunekit
from prunekit.api import PruneOptions, prune
from prunekit.core.accounting import count_non_embedding_params
from prunekit.core.masks import masked_layer_norm
from prunekit.core.surgery import LayerPlan, PruningPlan, apply_plan
from prunekit.families import get_adapter
from prunekit.families.remote_code.modeling_prunekit_decoder import FusedLinear, MappedKvAttention, layout_of
from prunekit.io.folders import load_pruned, save_pruned
from prunekit.tasks.causal_lm.data import build_lm_calibration_sample, perplexity

FAMILIES = ["gemma2", "gemma3", "phi3"]


# ---- the facts the adapters state ------------------------------------------------------------------
@pytest.mark.parametrize("family", ["gemma2", "gemma3"])
def test_gemma_states_sandwich_norms_that_scale_by_one_plus_w(family):
    adapter = get_adapter(build(family))
    facts = adapter.facts
    assert (facts.norm_placement, facts.norm_kind, facts.biases) == ("pre", "rmsnorm", frozenset())
    assert facts.gated_ffn and facts.output_norm and facts.norm_offset == 1.0
    block = adapter.layers()[1]
    assert adapter.sublayer_module(1, "attn") is block.input_layernorm
    assert adapter.sublayer_module(1, "ffn") is block.pre_feedforward_layernorm
    assert adapter.sublayer_output_norm(1, "attn") is block.post_attention_layernorm
    assert adapter.sublayer_output_norm(1, "ffn") is block.post_feedforward_layernorm
    # The (1 + w) scale, by hand, and the core's masked norm with every dimension kept.
    norm, x = block.post_attention_layernorm, torch.randn(2, 5, D)
    by_hand = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + norm.eps) * (1 + norm.weight)
    with torch.no_grad():
        torch.testing.assert_close(norm(x), by_hand, atol=1e-6, rtol=0)
        torch.testing.assert_close(masked_layer_norm(x, norm, torch.ones(D), "rmsnorm", adapter.norm_eps(norm),
                                                     facts.norm_offset), by_hand, atol=1e-6, rtol=0)
    # The full geometry: multi-query groups, a head size of its own.
    assert (adapter.full_num_heads, adapter.full_num_kv_heads, adapter.head_dim) == (H, H_KV, D_H)


def test_phi3_presents_fused_projections_as_separate_ones():
    model = build("phi3")
    stock = {k: v.clone() for k, v in model.state_dict().items()}
    adapter = get_adapter(model)
    assert type(adapter).changes_modules and not adapter.facts.output_norm and adapter.facts.norm_offset == 0.0
    attn, ffn = adapter.attention(0), adapter.ffn(0)
    assert isinstance(model.model.layers[0].self_attn.qkv_proj, FusedLinear)
    assert (attn.query.out_features, attn.key.out_features, attn.value.out_features) == (H * D_H, H_KV * D_H, H_KV * D_H)
    assert ffn.gate.out_features == ffn.up.out_features == D_FF
    # Exact row copies: q;k;v and gate;up of the fused matrices, and the state dict is the fused one.
    fused = stock["model.layers.0.self_attn.qkv_proj.weight"]
    assert torch.equal(torch.cat([attn.query.weight, attn.key.weight, attn.value.weight]), fused)
    assert torch.equal(torch.cat([ffn.gate.weight, ffn.up.weight]), stock["model.layers.0.mlp.gate_up_proj.weight"])
    after = model.state_dict()
    assert list(after) == list(stock) and all(torch.equal(after[k], stock[k]) for k in stock)


# ---- modeling parity with transformers' own classes ---------------------------------------------------
@pytest.mark.parametrize("implementation", ["eager", "sdpa"])
@pytest.mark.parametrize("family", FAMILIES)
def test_modeling_parity_with_the_transformers_classes(family, implementation):
    """On the same random weights: the viewed model (Phi-3 split), and the model with every attention
    run by prunekit's MappedKvAttention (the module of pruned attentions: family rotary, partial
    rotary, q/k norms, soft-cap, sliding windows), give the stock class's logits within 1e-5."""
    stock = build(family)
    if family == "gemma2" and implementation == "sdpa":
        pytest.skip("transformers runs Gemma 2 in eager attention only (SDPA cannot soft-cap)")
    stock.set_attn_implementation(implementation)
    batch = batch_of(3)
    want = outputs(stock, batch)
    viewed = copy.deepcopy(stock)
    adapter = get_adapter(viewed)
    torch.testing.assert_close(outputs(viewed, batch), want, atol=1e-5, rtol=0)
    full_map = tuple(h // (H // H_KV) for h in range(H))
    for block in adapter.layers():
        block.self_attn = MappedKvAttention(block.self_attn, full_map, layout_of(viewed.config))
    torch.testing.assert_close(outputs(viewed, batch), want, atol=1e-5, rtol=0)
    prompt = batch["input_ids"][:1, :6]  # longer than the window of 4
    options = {"max_new_tokens": 6, "do_sample": False, "pad_token_id": 0}
    assert torch.equal(viewed.generate(prompt, use_cache=True, **options), stock.generate(prompt, **options))


@pytest.mark.parametrize("family", ["gemma2", "gemma3"])
def test_an_emptied_gemma_sublayer_adds_nothing(family):
    """No biases: the masked sublayer adds norm_out(0) = 0, so the emptied one is X exactly, and
    its output norm goes with its input norm."""
    model = build(family)
    plan = PruningPlan(layers=[LayerPlan(heads=[], neurons=[]), LayerPlan(heads=[0], neurons=[1]),
                               LayerPlan(heads=list(range(H)), neurons=[])])
    pruned = apply_plan(view(copy.deepcopy(model)), plan)
    adapter = get_adapter(pruned)
    assert adapter.sublayer_output_norm(0, "attn") is None and adapter.sublayer_output_norm(2, "ffn") is None
    assert adapter.sublayer_output_norm(1, "ffn") is pruned.model.layers[1].post_feedforward_layernorm
    batch = batch_of(1)
    torch.testing.assert_close(outputs(pruned, batch), masked(model, plan, batch), atol=1e-5, rtol=0)


def test_phi3_is_saved_with_its_own_fused_names_and_shapes(tmp_path):
    model = build("phi3", seed=3)
    pruned = apply_plan(view(copy.deepcopy(model)), random_plan(1))
    shapes = get_adapter(pruned).layer_shapes()
    folder = save_pruned(pruned, tmp_path / "out")
    with safe_open(folder / "model.safetensors", "pt") as saved:
        keys = set(saved.keys())
        assert not [k for k in keys if ".parts." in k or "q_proj" in k or "gate_proj" in k]
        for layer, shape in enumerate(shapes):
            if shape.num_heads:
                rows = (shape.num_heads + 2 * shape.num_kv_heads) * D_H
                assert saved.get_slice(f"model.layers.{layer}.self_attn.qkv_proj.weight").get_shape() == [rows, D]
            if shape.intermediate_size:
                assert saved.get_slice(f"model.layers.{layer}.mlp.gate_up_proj.weight").get_shape() == [
                    2 * shape.intermediate_size, D]
    reloaded = load_pruned(folder)
    layer = next(i for i, shape in enumerate(shapes) if shape.intermediate_size)
    assert isinstance(reloaded.model.layers[layer].mlp.gate_up_proj, FusedLinear)  # viewed again on load
    assert torch.equal(outputs(reloaded, batch_of(2)), outputs(pruned, batch_of(2)))


# ---- refused variants ---------------------------------------------------------------------------------
def _tiny_phimoe():
    config = transformers.PhimoeConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=16, num_hidden_layers=1,
                                       num_attention_heads=4, num_key_value_heads=2, num_local_experts=2,
                                       max_position_embeddings=64)
    return transformers.PhimoeForCausalLM(config)


def _tiny_gemma3_multimodal():
    text = {"vocab_size": VOCAB, "hidden_size": 32, "intermediate_size": 16, "num_hidden_layers": 1,
            "num_attention_heads": 2, "num_key_value_heads": 1, "head_dim": 16}
    vision = {"hidden_size": 16, "intermediate_size": 16, "num_hidden_layers": 1, "num_attention_heads": 2,
              "image_size": 28, "patch_size": 14}
    config = transformers.Gemma3Config(text_config=text, vision_config=vision, mm_tokens_per_image=4)
    return transformers.Gemma3ForConditionalGeneration(config)


def _bidirectional_gemma3():
    config = transformers.Gemma3TextConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=16,
                                           num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1,
                                           head_dim=16, use_bidirectional_attention=True)
    return transformers.Gemma3ForCausalLM(config)


@pytest.mark.parametrize(("make", "words"), [
    (_tiny_phimoe, "mixture-of-experts FFNs (Phi-3.5-MoE)"),
    (_tiny_gemma3_multimodal, "multimodal model (vision tower"),
    (_bidirectional_gemma3, "bidirectional attention"),
])
def test_an_unsupported_variant_gets_one_line_naming_the_feature(make, words):
    model = make()
    with pytest.raises(prunekit.ModelError) as info:
        get_adapter(model)
    message = str(info.value)
    assert words in message and type(model).__name__ in message and "\n" not in message


# ---- the pipeline -------------------------------------------------------------------------------------
def lm_sample(seed: int = 1):
    tokens = torch.randint(1, VOCAB, (400,), generator=torch.Generator().manual_seed(seed))
    return build_lm_calibration_sample(None, tokens, num_sequences=8, seq_len=16, batch_size=4)


@pytest.mark.parametrize("method", ["kprune", "kwon", "magnitude"])
@pytest.mark.parametrize("family", FAMILIES)
def test_methods_prune_save_reload_and_score(family, method, tmp_path):
    """20% of the non-embedding parameters removed; the caller's model unchanged (values and module
    types: Phi-3's fused linears stay); perplexity finite and the reloaded model's to the bit."""
    model = build(family, seed=4)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    types = [type(m) for m in model.modules()]
    result = prune(model, None, lm_sample(), PruneOptions(task="causal_lm", method=method, keep_params=0.8))
    assert [type(m) for m in model.modules()] == types
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    kept = count_non_embedding_params(view(result.model)) / count_non_embedding_params(view(model))
    assert 0.6 < kept <= 0.8
    if family.startswith("gemma") and method == "kprune":  # no linear re-fit behind an output norm
        steps = result.report["method_log"]["steps"]
        assert {s["tuning"] for s in steps if s.get("kept")} <= {"skipped: output norm after the projection"}
    tokens = torch.randint(1, VOCAB, (200,), generator=torch.Generator().manual_seed(5))
    score = perplexity(result.model, tokens, window=16)
    assert math.isfinite(score["perplexity"])
    folder = result.save(tmp_path / "pruned")
    assert perplexity(load_pruned(folder), tokens, window=16) == score
    assert json.loads((folder / "prune_report.json").read_text())["non_embedding_params_kept"] <= 0.8


@pytest.mark.parametrize("family", FAMILIES)
def test_a_layer_runs_alone_as_latency_tables_time_it(family):
    """call_layer gives each layer its own rotary (Gemma 3: the sliding or the global base)."""
    adapter = get_adapter(build(family))
    hidden = torch.randn(1, 7, D)
    with torch.no_grad():
        for block in adapter.layers():
            out = adapter.call_layer(block, hidden)
            out = out[0] if isinstance(out, tuple) else out
            assert out.shape == (1, 7, D) and torch.isfinite(out).all()


@pytest.mark.parametrize("family", ["gemma2", "gemma3"])
def test_chunked_perplexity_soft_caps_the_logits_as_the_model_does(family):
    """Perplexity makes the logits a chunk of positions at a time from the family's head, which for
    Gemma soft-caps them (final_logit_softcapping): the same NLL as the model's own logits."""
    model = build(family).eval()
    model.config.final_logit_softcapping = 6.0  # Gemma 2's configs set one; Gemma 3 may (its default is None)
    tokens = batch_of(0)["input_ids"][0]  # (T,)
    with torch.no_grad():
        logits = model(input_ids=tokens[None]).logits.float()[0]  # (T, V)
    nll = -torch.log_softmax(logits[:-1].double(), -1).gather(-1, tokens[1:, None]).mean()
    result = perplexity(model, tokens, window=tokens.numel())
    assert math.isclose(result["perplexity"], float(torch.exp(nll)), rel_tol=1e-5)
