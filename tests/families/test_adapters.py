"""prunekit.families: each family's adapter finds the layers, heads and FFN linears of a tiny random model,
rejects unsupported models with a clear ModelError, and rebuilds sublayers at given widths."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from transformers import BertModel, BloomConfig, BloomForCausalLM, BloomForSequenceClassification

import prunekit
from prunekit.families import ADAPTERS, LayerShape, get_adapter, supported_models

D, H, D_H, D_FF = 32, 4, 8, 37


def hf_linears(model, family: str, layer: int) -> dict[str, nn.Linear]:
    """The Hugging Face modules an adapter must find, spelled out per family (tests may name them)."""
    if family == "distilbert":
        block = model.distilbert.transformer.layer[layer]
        sa = block.attention
        return {"query": sa.q_lin, "key": sa.k_lin, "value": sa.v_lin, "out": sa.out_lin,
                "up": block.ffn.lin1, "down": block.ffn.lin2}  # fmt: skip
    block = getattr(model, family).encoder.layer[layer]
    sa = block.attention.self
    return {"query": sa.query, "key": sa.key, "value": sa.value, "out": block.attention.output.dense,
            "up": block.intermediate.dense, "down": block.output.dense}  # fmt: skip


@pytest.mark.parametrize("num_layers", [2, 3])
def test_adapter_geometry(family, head, make_model, num_layers):
    model = make_model(family, head, num_layers=num_layers)
    adapter = get_adapter(model)
    assert type(adapter).family == family
    assert adapter.num_layers == num_layers
    assert (adapter.hidden_size, adapter.full_num_heads, adapter.head_dim, adapter.full_intermediate_size) == (
        D, H, D_H, D_FF,
    )  # fmt: skip
    assert adapter.layer_shapes() == [LayerShape(H, D_FF)] * num_layers
    assert not adapter.is_pruned()


def test_adapter_finds_the_linears(family, head, tiny_model):
    adapter = get_adapter(tiny_model)
    for layer in range(adapter.num_layers):
        expected = hf_linears(tiny_model, family, layer)
        attn, ffn = adapter.attention(layer), adapter.ffn(layer)
        assert (attn.num_heads, attn.head_dim, attn.width) == (H, D_H, H * D_H)
        for name in ("query", "key", "value", "out"):
            assert getattr(attn, name) is expected[name], name
        for name in ("query", "key", "value"):
            assert tuple(getattr(attn, name).weight.shape) == (H * D_H, D)  # (H*d_h, d)
        assert tuple(attn.out.weight.shape) == (D, H * D_H)
        assert ffn.up is expected["up"] and ffn.down is expected["down"] and ffn.gate is None
        assert tuple(ffn.up.weight.shape) == (D_FF, D) and tuple(ffn.down.weight.shape) == (D, D_FF)
        assert ffn.width == D_FF
        assert adapter.sublayer_bias(layer, "attn") is attn.out.bias
        assert adapter.sublayer_bias(layer, "ffn") is ffn.down.bias


def test_sublayer_module_sees_the_residual_input(family, tiny_model, batch, outputs_of):
    """sublayer_module(l, "attn") gets the layer's input first; (l, "ffn") gets the attention block's
    output, i.e. what the FFN's residual adds to."""
    adapter = get_adapter(tiny_model)
    seen: dict[str, torch.Tensor] = {}

    def keep(name):
        def hook(module, args):
            seen[name] = args[0]
        return hook

    handles = [
        adapter.layers()[1].register_forward_pre_hook(keep("layer_input")),
        adapter.sublayer_module(1, "attn").register_forward_pre_hook(keep("attn")),
        adapter.sublayer_module(1, "ffn").register_forward_pre_hook(keep("ffn")),
        adapter.ffn(1).up.register_forward_pre_hook(keep("up")),
    ]
    try:
        outputs_of(tiny_model, batch)
    finally:
        for handle in handles:
            handle.remove()
    assert torch.equal(seen["attn"], seen["layer_input"])
    assert torch.equal(seen["ffn"], seen["up"])  # the FFN-in linear reads the FFN's residual input
    assert not torch.equal(seen["ffn"], seen["layer_input"])


def test_registry_and_supported_models():
    assert {"bert", "roberta", "distilbert", "llama", "mistral", "qwen2", "qwen3", "gpt2", "opt"} <= set(ADAPTERS)
    names = supported_models()
    for family in ("Bert", "Roberta", "DistilBert"):
        for suffix in ("ForSequenceClassification", "ForQuestionAnswering", "Model"):
            assert f"{family}{suffix}" in names
    for family in ("Llama", "Mistral", "Qwen2", "Qwen3"):
        for suffix in ("ForCausalLM", "ForSequenceClassification", "Model"):
            assert f"{family}{suffix}" in names
    for name in ("GPT2LMHeadModel", "GPT2ForSequenceClassification", "OPTForCausalLM", "OPTForSequenceClassification"):
        assert name in names
    assert names == sorted(names)


def test_base_model_is_supported(make_model):
    model = make_model("bert")
    assert get_adapter(model.bert).num_layers == 2
    assert isinstance(model.bert, BertModel)


def _tiny_bloom(cls):
    """A decoder family prunekit has no adapter for."""
    torch.manual_seed(0)
    config = BloomConfig(vocab_size=99, hidden_size=32, n_layer=2, n_head=4, pad_token_id=0)
    return cls(config).eval()


@pytest.mark.parametrize(
    "build",
    [
        pytest.param(lambda masked_lm: masked_lm, id="BertForMaskedLM"),
        pytest.param(lambda masked_lm: _tiny_bloom(BloomForCausalLM), id="BloomForCausalLM"),
        pytest.param(lambda masked_lm: _tiny_bloom(BloomForSequenceClassification), id="BloomForSequenceClassification"),
        pytest.param(lambda masked_lm: nn.Linear(3, 3), id="Linear"),
    ],
)
def test_unsupported_model_raises_model_error(build, masked_lm):
    model = build(masked_lm)
    with pytest.raises(prunekit.ModelError) as info:
        get_adapter(model)
    message = str(info.value)
    assert type(model).__name__ in message
    for name in ("BertForSequenceClassification", "RobertaForQuestionAnswering", "DistilBertForSequenceClassification"):
        assert name in message
    assert "\n" not in message
    assert isinstance(info.value, ValueError) and isinstance(info.value, prunekit.PrunekitError)


def test_resize_builds_the_given_widths(family, head, make_model, batch):
    model = make_model(family, head, num_layers=3)
    adapter = get_adapter(model)
    untouched = adapter.attention(2).query
    shapes = [LayerShape(2, 10), LayerShape(0, 0), LayerShape(H, D_FF)]
    adapter.resize(shapes)
    assert adapter.layer_shapes() == shapes
    assert adapter.is_pruned()
    attn, ffn = adapter.attention(0), adapter.ffn(0)
    assert tuple(attn.query.weight.shape) == (2 * D_H, D) and tuple(attn.out.weight.shape) == (D, 2 * D_H)
    assert tuple(ffn.up.weight.shape) == (10, D) and tuple(ffn.down.weight.shape) == (D, 10)
    assert adapter.attention(1) is None and adapter.ffn(1) is None
    assert adapter.sublayer_bias(1, "attn").shape == (D,) and adapter.sublayer_bias(1, "ffn").shape == (D,)
    assert adapter.attention(2).query is untouched  # a layer at full width is left as it is
    inputs = {k: v for k, v in batch.items() if k != "token_type_ids" or family != "distilbert"}
    with torch.no_grad():
        out = model(**inputs)
    logits = out.start_logits if head == "qa" else out.logits
    assert torch.isfinite(logits).all()


def test_resize_rejects_a_wrong_layer_count(tiny_model):
    with pytest.raises(ValueError, match="3 layer shapes"):
        get_adapter(tiny_model).resize([LayerShape(H, D_FF)] * 3)


def test_an_emptied_sublayer_takes_no_new_units(family, make_model):
    adapter = get_adapter(make_model(family))
    full = adapter.attention(0)
    adapter.resize([LayerShape(0, 0), LayerShape(H, D_FF)])
    with pytest.raises(ValueError, match="no attention heads left"):
        adapter.set_attention(0, full)
    with pytest.raises(ValueError, match="no FFN neurons left"):
        adapter.set_ffn(0, adapter.ffn(1))
