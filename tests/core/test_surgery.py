"""prunekit.core.surgery. THE invariant (developers' guide): a physically pruned model computes what the
masked model computes, for random plans (random kept subsets, emptied sublayers, everything kept,
real-valued scales including negative ones), every family and every head, with padding in the batch.
Also: emptied sublayers compute LN(X + b_out), replacement weights and indices are checked, and the
PruningPlan survives JSON."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from builders import view
from conftest import assert_same_plan
from torch import nn

from prunekit.core.masks import apply_masks
from prunekit.core.surgery import LayerPlan, PruningPlan, apply_plan, prune_heads, prune_neurons, slice_linear
from prunekit.families import LayerShape, get_adapter

H, D_H, D, D_FF = 4, 8, 32, 37
ATOL = 1e-5


def random_plan(num_layers: int, seed: int) -> PruningPlan:
    """A random plan whose layers cycle through the hard cases: a random subset with real scales
    (some negative), an emptied sublayer, everything kept, and an untouched sublayer (None)."""
    gen = torch.Generator().manual_seed(seed)
    layers = []
    for layer in range(num_layers):
        step = LayerPlan()
        for kind, size in (("heads", H), ("neurons", D_FF)):
            case = (seed + layer + (kind == "neurons")) % 4
            if case == 0:  # random non-empty subset, in random order, with real-valued scales
                count = int(torch.randint(1, size, (1,), generator=gen))
                keep = torch.randperm(size, generator=gen)[:count].tolist()
                scales = torch.randn(size, generator=gen)
                scales[keep[0]] = -abs(float(scales[keep[0]])) - 0.1  # at least one negative kept scale
                setattr(step, kind, keep)
                setattr(step, "head_scales" if kind == "heads" else "neuron_scales", scales.tolist())
            elif case == 1:
                setattr(step, kind, [])
            elif case == 2:
                setattr(step, kind, list(range(size)))
        layers.append(step)
    return PruningPlan(layers=layers)


def masked_outputs(model, plan, batch, outputs_of):
    head_masks, neuron_masks = plan.masks(view(model))
    with apply_masks(get_adapter(model), head_masks, neuron_masks):
        return outputs_of(model, batch)


def expected_shapes(plan: PruningPlan) -> list[LayerShape]:
    return [
        LayerShape(H if step.heads is None else len(step.heads), D_FF if step.neurons is None else len(step.neurons))
        for step in plan.layers
    ]


@pytest.mark.parametrize("seed", range(4))
def test_pruned_model_equals_masked_model(family, head, make_model, batch, outputs_of, seed):
    model = make_model(family, head, num_layers=3, seed=seed)
    plan = random_plan(3, seed)
    expected = masked_outputs(model, plan, batch, outputs_of)
    pruned = apply_plan(view(copy.deepcopy(model)), plan)
    assert get_adapter(pruned).layer_shapes() == expected_shapes(plan)
    got = outputs_of(pruned, batch)
    assert got.shape == expected.shape
    torch.testing.assert_close(got, expected, atol=ATOL, rtol=0)
    # The plan changed something: the masked model is not the original one.
    assert not torch.allclose(expected, outputs_of(model, batch), atol=1e-3)


def test_random_plans_cover_the_hard_cases():
    """The random plans above really include empty sublayers, full ones, untouched ones and negative scales."""
    steps = [step for seed in range(4) for step in random_plan(3, seed).layers]
    units = [step.heads for step in steps] + [step.neurons for step in steps]
    assert [] in units and None in units
    assert list(range(H)) in units and list(range(D_FF)) in units
    assert any(u is not None and 0 < len(u) < size for u, size in zip(units, [H] * 12 + [D_FF] * 12, strict=True))
    scales = [s for step in steps for s in (step.head_scales or []) + (step.neuron_scales or [])]
    assert min(scales) < 0 < max(scales)


def test_pruning_twice_composes(family, make_model, batch, outputs_of):
    """Indices refer to the current units: keeping heads (0, 1, 3) and then (0, 2) of those keeps 0 and 3."""
    model = make_model(family)
    twice = apply_plan(view(copy.deepcopy(model)), PruningPlan([LayerPlan(heads=[0, 1, 3], neurons=list(range(0, D_FF, 2)))]))
    apply_plan(view(twice), PruningPlan([LayerPlan(heads=[0, 2], neurons=[0, 5, 18])]))
    once = apply_plan(view(copy.deepcopy(model)), PruningPlan([LayerPlan(heads=[0, 3], neurons=[0, 10, 36])]))
    torch.testing.assert_close(outputs_of(twice, batch), outputs_of(once, batch), atol=ATOL, rtol=0)


def _layer_norms(model, family: str, layer: int) -> tuple[nn.LayerNorm, nn.LayerNorm]:
    """The post-attention and post-FFN LayerNorms of ``layer`` (the residual's normalisations)."""
    if family == "distilbert":
        block = model.distilbert.transformer.layer[layer]
        return block.sa_layer_norm, block.output_layer_norm
    block = getattr(model, family).encoder.layer[layer]
    return block.attention.output.LayerNorm, block.output.LayerNorm


def test_emptied_sublayers_compute_layernorm_of_input_plus_bias(family, head, make_model, batch, outputs_of):
    model = make_model(family, head)
    plan = PruningPlan([LayerPlan(heads=[], neurons=[]), LayerPlan(heads=[1], neurons=[])])
    attn_ln, ffn_ln = _layer_norms(model, family, 0)
    attn_ln, ffn_ln = copy.deepcopy(attn_ln), copy.deepcopy(ffn_ln)
    attn_bias = get_adapter(model).attention(0).out.bias.detach().clone()
    ffn_bias = get_adapter(model).ffn(0).down.bias.detach().clone()

    # Against the masked model with zero masks: equal outputs.
    expected = masked_outputs(model, plan, batch, outputs_of)
    pruned = apply_plan(view(copy.deepcopy(model)), plan)
    torch.testing.assert_close(outputs_of(pruned, batch), expected, atol=ATOL, rtol=0)

    # And directly: with no units, layer 0 computes LN_ffn(LN_attn(X + b_attn) + b_ffn).
    adapter = get_adapter(pruned)
    seen = {}
    handles = [
        adapter.layers()[0].register_forward_pre_hook(lambda m, args: seen.__setitem__("x", args[0])),
        adapter.sublayer_module(0, "ffn").register_forward_pre_hook(lambda m, args: seen.__setitem__("ffn_x", args[0])),
        adapter.layers()[0].register_forward_hook(
            lambda m, args, out: seen.__setitem__("out", out[0] if isinstance(out, tuple) else out)
        ),
    ]
    try:
        outputs_of(pruned, batch)
    finally:
        for handle in handles:
            handle.remove()
    with torch.no_grad():
        after_attn = attn_ln(seen["x"] + attn_bias)  # (B, T, d)
        torch.testing.assert_close(seen["ffn_x"], after_attn, atol=1e-6, rtol=0)
        torch.testing.assert_close(seen["out"], ffn_ln(after_attn + ffn_bias), atol=1e-6, rtol=0)
    assert adapter.attention(0) is None and adapter.ffn(0) is None
    assert torch.equal(adapter.sublayer_bias(0, "attn"), attn_bias)
    assert torch.equal(adapter.sublayer_bias(0, "ffn"), ffn_bias)


def test_emptying_folds_scales_into_the_kept_bias_only(family, make_model, batch, outputs_of):
    """Scales multiply columns, never the bias: an emptied sublayer keeps b_out unscaled."""
    model = make_model(family)
    plan = PruningPlan([LayerPlan(heads=[], head_scales=[-2.0, 3.0, 0.5, 7.0], neurons=[], neuron_scales=[5.0] * D_FF)])
    expected = masked_outputs(model, plan, batch, outputs_of)
    pruned = apply_plan(view(copy.deepcopy(model)), plan)
    torch.testing.assert_close(outputs_of(pruned, batch), expected, atol=ATOL, rtol=0)


def test_model_pruned_to_nothing_still_runs(family, head, make_model, batch, outputs_of):
    model = make_model(family, head, num_layers=3)
    plan = PruningPlan([LayerPlan(heads=[], neurons=[]) for _ in range(3)])
    pruned = apply_plan(view(copy.deepcopy(model)), plan)
    adapter = get_adapter(pruned)
    assert adapter.layer_shapes() == [LayerShape(0, 0)] * 3
    assert all(adapter.attention(layer) is None and adapter.ffn(layer) is None for layer in range(3))
    got = outputs_of(pruned, batch)
    assert torch.isfinite(got).all()
    torch.testing.assert_close(got, masked_outputs(model, plan, batch, outputs_of), atol=ATOL, rtol=0)
    # Pruning an emptied model again with an empty plan is a no-op; keeping units is an error.
    apply_plan(view(pruned), plan)
    with pytest.raises(ValueError, match="no attention heads left"):
        prune_heads(adapter, 0, [0])
    with pytest.raises(ValueError, match="no FFN neurons left"):
        prune_neurons(adapter, 0, [0])


# ---- replacement output weights ------------------------------------------------------------------
def test_out_weight_replaces_the_sliced_weight(family, make_model):
    model = make_model(family)
    adapter = get_adapter(model)
    gen = torch.Generator().manual_seed(0)
    heads_weight = torch.randn(D, 2 * D_H, generator=gen)  # (d, h_kept * d_h)
    neurons_weight = torch.randn(D, 3, generator=gen)  # (d, n_kept)
    bias = adapter.attention(0).out.bias.detach().clone()
    prune_heads(adapter, 0, [1, 3], out_weight=heads_weight)
    prune_neurons(adapter, 0, [2, 9, 30], out_weight=neurons_weight)
    assert torch.equal(adapter.attention(0).out.weight, heads_weight)
    assert torch.equal(adapter.ffn(0).down.weight, neurons_weight)
    assert torch.equal(adapter.attention(0).out.bias, bias)


@pytest.mark.parametrize(
    ("sublayer", "keep", "shape"),
    [
        ("attn", [1, 3], (D, D_H)),  # one head's worth of columns for two heads
        ("attn", [1, 3], (2 * D_H, D)),  # transposed
        ("attn", [1, 3], (D, H * D_H)),  # the unpruned width
        ("ffn", [2, 9, 30], (D, 2)),
        ("ffn", [2, 9, 30], (3, D)),
    ],
)
def test_out_weight_of_the_wrong_shape_raises(family, make_model, sublayer, keep, shape):
    model = make_model(family)
    adapter = get_adapter(model)
    before = copy.deepcopy(model.state_dict())
    prune = prune_heads if sublayer == "attn" else prune_neurons
    with pytest.raises(ValueError, match="replacement output weight must have shape"):
        prune(adapter, 0, keep, out_weight=torch.zeros(shape))
    # Checked before anything is replaced: the model is unchanged.
    assert adapter.layer_shapes() == [LayerShape(H, D_FF)] * 2
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_out_weight_with_nan_raises(make_model):
    adapter = get_adapter(make_model("bert"))
    weight = torch.zeros(D, 2)
    weight[0, 1] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        prune_neurons(adapter, 1, [0, 1], out_weight=weight)
    assert adapter.ffn(1).width == D_FF


# ---- bad indices -----------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("sublayer", "keep", "match"),
    [
        ("attn", [0, 4], r"\[0, 4\)"),
        ("attn", [-1, 2], r"\[0, 4\)"),
        ("attn", [1, 1, 2], "repeat"),
        ("ffn", [0, 37], r"\[0, 37\)"),
        ("ffn", [-3], r"\[0, 37\)"),
        ("ffn", [5, 6, 5], "repeat"),
        ("attn", [[0, 1]], "1-D"),
    ],
)
def test_bad_indices_raise(family, make_model, sublayer, keep, match):
    model = make_model(family)
    adapter = get_adapter(model)
    before = copy.deepcopy(model.state_dict())
    prune = prune_heads if sublayer == "attn" else prune_neurons
    with pytest.raises(ValueError, match=match):
        prune(adapter, 1, keep)
    assert adapter.layer_shapes() == [LayerShape(H, D_FF)] * 2
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_bad_plans_raise(make_model):
    model = make_model("bert")
    with pytest.raises(ValueError, match="plan has 3 layers"):
        apply_plan(view(model), PruningPlan([LayerPlan()] * 3))
    with pytest.raises(ValueError, match="scales must have shape"):
        apply_plan(view(model), PruningPlan([LayerPlan(neurons=[0], neuron_scales=[1.0, 2.0])]))
    with pytest.raises(ValueError, match="4 entries"):
        apply_plan(view(model), PruningPlan([LayerPlan(heads=[0], head_scales=[1.0] * 3)]))
    assert get_adapter(model).layer_shapes() == [LayerShape(H, D_FF)] * 2


def test_unsorted_indices_are_sorted(make_model, make_batch, outputs_of):
    batch = make_batch([9, 5, 2, 7])
    model = make_model("bert")
    a = apply_plan(view(copy.deepcopy(model)), PruningPlan([LayerPlan(heads=[3, 0], neurons=[20, 4, 11])]))
    b = apply_plan(view(copy.deepcopy(model)), PruningPlan([LayerPlan(heads=[0, 3], neurons=[4, 11, 20])]))
    assert torch.equal(outputs_of(a, batch), outputs_of(b, batch))


# ---- primitives and the plan record ----------------------------------------------------------------
def test_slice_linear():
    torch.manual_seed(0)
    linear = nn.Linear(5, 4)
    rows = slice_linear(linear, torch.tensor([0, 3]), dim=0)
    assert torch.equal(rows.weight, linear.weight[[0, 3]]) and torch.equal(rows.bias, linear.bias[[0, 3]])
    cols = slice_linear(linear, torch.tensor([1, 2, 4]), dim=1)
    assert torch.equal(cols.weight, linear.weight[:, [1, 2, 4]]) and torch.equal(cols.bias, linear.bias)
    assert cols.weight.data_ptr() != linear.weight.data_ptr()  # a copy, never a view
    no_bias = slice_linear(nn.Linear(5, 4, bias=False), torch.tensor([0]), dim=0)
    assert no_bias.bias is None and no_bias.weight.shape == (1, 5)
    with pytest.raises(TypeError, match="nn.Linear"):
        slice_linear(nn.Conv1d(1, 1, 1), torch.tensor([0]), dim=0)


def test_pruning_plan_round_trip():
    plan = PruningPlan(
        layers=[
            LayerPlan(heads=[0, 2], neurons=[1, 5, 7], head_scales=[0.5, -1.0, 2.0, 0.0], neuron_scales=None),
            LayerPlan(heads=[], neurons=None),
            LayerPlan(),
        ]
    )
    data = plan.to_dict()
    assert data["tensors"] == ["layers.0.head_scales"]  # JSON holds indices; tensors go to plan.safetensors
    restored = PruningPlan.from_dict(json.loads(json.dumps(data)), plan.tensors())
    assert_same_plan(restored, plan)
    assert restored.to_dict() == data
    assert_same_plan(PruningPlan.from_dict(PruningPlan().to_dict()), PruningPlan())
    # A plan dict from a prune_report.json written before plan files (scales as lists) still reads.
    legacy = {"layers": [{"heads": [0, 2], "neurons": [1, 5, 7], "head_scales": [0.5, -1.0, 2.0, 0.0],
                          "neuron_scales": None}, {"heads": [], "neurons": None}, {"heads": None, "neurons": None}]}
    assert_same_plan(PruningPlan.from_dict(legacy), plan)
    with pytest.raises(ValueError, match="names tensors"):
        PruningPlan.from_dict(data)


def test_plan_masks(make_model):
    model = make_model("bert")
    plan = PruningPlan([LayerPlan(heads=[1, 2], head_scales=[9.0, 0.5, -2.0, 9.0]), LayerPlan(neurons=[0])])
    head_masks, neuron_masks = plan.masks(view(model))
    assert list(head_masks) == [0] and list(neuron_masks) == [1]
    assert head_masks[0].tolist() == [0.0, 0.5, -2.0, 0.0]
    assert neuron_masks[1].tolist() == [1.0] + [0.0] * (D_FF - 1)


def test_output_biases_and_removed_layers_round_trip_and_apply(tmp_path):
    """A plan's output biases (FLAP) and removed layers (ShortGPT) survive plan.json +
    plan.safetensors, a bias of the wrong shape is refused, and at least one layer must stay."""
    from llm_builders import D, build

    from prunekit.core.surgery import LayerPlan, PruningPlan, apply_plan
    from prunekit.io.folders import load_plan, save_plan

    bias = torch.arange(D, dtype=torch.float32)
    plan = PruningPlan(layers=[LayerPlan(ffn_out_bias=bias), LayerPlan(layer_removed=True),
                               LayerPlan(neurons=[], ffn_out_bias=2 * bias),
                               LayerPlan(attention_out_bias=-bias, heads=[0, 1])])
    save_plan(plan, tmp_path)
    assert load_plan(tmp_path) == plan
    assert json.loads((tmp_path / "plan.json").read_text())["layers"][1]["layer_removed"] is True
    model = build("llama")
    adapter = view(model)
    apply_plan(adapter, plan)
    assert adapter.num_layers == 3 and model.config.num_hidden_layers == 3
    assert [block.self_attn.layer_idx for block in adapter.layers()] == [0, 1, 2]
    assert torch.equal(adapter.ffn(0).down.bias, bias) and adapter.added_out_bias(0, "ffn")
    assert torch.equal(adapter.attention(2).out.bias, -bias)
    assert adapter.ffn(1) is None and torch.equal(adapter.sublayer_bias(1, "ffn"), 2 * bias)  # emptied, biased
    assert adapter.layer_shapes()[1].ffn_out_bias
    with pytest.raises(ValueError, match="output bias must have shape"):
        apply_plan(view(build("llama")), PruningPlan(layers=[LayerPlan(ffn_out_bias=bias[:3])]))
    with pytest.raises(ValueError, match="at least one"):
        apply_plan(view(build("llama")), PruningPlan(layers=[LayerPlan(layer_removed=True)] * 4))
