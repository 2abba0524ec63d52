"""prunekit.core.masks: per-head and per-neuron masks as forward pre-hooks on the output projections
(style.md §9): removed after the context, per-head and per-dimension forms agree, differentiable,
and wrong sizes are rejected."""

from __future__ import annotations

import copy

import pytest
import torch

from prunekit.core.masks import apply_masks, expand_head_mask, full_masks
from prunekit.families import LayerShape, get_adapter

H, D_H, D_FF = 4, 8, 37


def hook_count(adapter) -> int:
    count = 0
    for layer in range(adapter.num_layers):
        for parts, linear in ((adapter.attention(layer), "out"), (adapter.ffn(layer), "down")):
            if parts is not None:
                count += len(getattr(parts, linear)._forward_pre_hooks)
    return count


def test_masks_are_removed_after_the_context(tiny_model, batch, outputs_of):
    adapter = get_adapter(tiny_model)
    before = outputs_of(tiny_model, batch)
    heads = {0: torch.tensor([1.0, 0.0, 0.5, 1.0]), 1: torch.tensor([0.0, 1.0, 1.0, 0.0])}
    neurons = {1: torch.rand(D_FF, generator=torch.Generator().manual_seed(0))}
    with apply_masks(adapter, heads, neurons):
        assert hook_count(adapter) == 3
        masked = outputs_of(tiny_model, batch)
    assert hook_count(adapter) == 0
    assert not torch.allclose(masked, before)
    assert torch.equal(outputs_of(tiny_model, batch), before)


def test_masks_are_removed_when_the_block_raises(family, make_model):
    adapter = get_adapter(make_model(family))
    heads, neurons = full_masks(adapter)
    with pytest.raises(RuntimeError, match="boom"), apply_masks(adapter, heads, neurons):
        assert hook_count(adapter) == 4
        raise RuntimeError("boom")
    assert hook_count(adapter) == 0


def test_a_bad_mask_leaves_no_hooks_behind(family, make_model):
    """The first layer's hook is already installed when the second layer's mask is found wrong."""
    adapter = get_adapter(make_model(family))
    with pytest.raises(ValueError), apply_masks(adapter, {0: torch.ones(H), 1: torch.ones(H + 1)}):
        pass
    assert hook_count(adapter) == 0


def test_all_ones_masks_change_nothing(tiny_model, batch, outputs_of):
    adapter = get_adapter(tiny_model)
    before = outputs_of(tiny_model, batch)
    for per_dim in (False, True):
        heads, neurons = full_masks(adapter, per_dim=per_dim)
        assert [m.shape for m in heads.values()] == [(H * D_H if per_dim else H,)] * 2
        assert [m.shape for m in neurons.values()] == [(D_FF,)] * 2
        with apply_masks(adapter, heads, neurons):
            assert torch.allclose(outputs_of(tiny_model, batch), before, atol=1e-6, rtol=0)


def test_per_head_and_per_dimension_masks_agree(tiny_model, batch, outputs_of):
    adapter = get_adapter(tiny_model)
    per_head = {0: torch.tensor([0.3, -1.2, 0.0, 2.0]), 1: torch.tensor([1.0, 0.0, 0.7, 1.0])}
    per_dim = {layer: mask.repeat_interleave(D_H) for layer, mask in per_head.items()}  # (H * d_h,)
    with apply_masks(adapter, per_head):
        a = outputs_of(tiny_model, batch)
    with apply_masks(adapter, per_dim):
        b = outputs_of(tiny_model, batch)
    assert torch.allclose(a, b, atol=1e-6, rtol=0)


def test_a_mask_scales_the_output_projection_columns(tiny_model, batch, outputs_of):
    """Masking is the same as scaling the columns of the output projection (an independent reference)."""
    adapter = get_adapter(tiny_model)
    gen = torch.Generator().manual_seed(3)
    head_mask = torch.randn(H * D_H, generator=gen)  # per dimension
    neuron_mask = torch.randn(D_FF, generator=gen)
    with apply_masks(adapter, {1: head_mask}, {0: neuron_mask}):
        masked = outputs_of(tiny_model, batch)
    reference = copy.deepcopy(tiny_model)
    ref_adapter = get_adapter(reference)
    with torch.no_grad():
        ref_adapter.attention(1).out.weight.mul_(head_mask)  # (d, H*d_h) * (H*d_h,)
        ref_adapter.ffn(0).down.weight.mul_(neuron_mask)  # (d, d_ff) * (d_ff,)
    assert torch.allclose(masked, outputs_of(reference, batch), atol=1e-5, rtol=0)


@pytest.mark.parametrize("per_dim", [False, True])
def test_masks_are_differentiable(tiny_model, batch, per_dim):
    adapter = get_adapter(tiny_model)
    heads, neurons = full_masks(adapter, per_dim=per_dim, requires_grad=True)
    inputs = {k: v for k, v in batch.items() if k != "token_type_ids" or "distil" not in tiny_model.config.model_type}
    with apply_masks(adapter, heads, neurons):
        out = tiny_model(**inputs)
        logits = out.start_logits if hasattr(out, "start_logits") else out.logits
        (logits**2).sum().backward()
    for mask in [*heads.values(), *neurons.values()]:
        assert mask.grad is not None and mask.grad.shape == mask.shape
        assert torch.isfinite(mask.grad).all() and mask.grad.abs().sum() > 0


def test_expand_head_mask():
    per_head = torch.tensor([1.0, 0.0, 2.0, 3.0])
    assert torch.equal(expand_head_mask(per_head, H, D_H), per_head.repeat_interleave(D_H))
    per_dim = torch.arange(H * D_H, dtype=torch.float32)
    assert expand_head_mask(per_dim, H, D_H) is per_dim
    with pytest.raises(ValueError, match="1-D"):
        expand_head_mask(torch.ones(H, D_H), H, D_H)
    with pytest.raises(ValueError, match="4 entries"):
        expand_head_mask(torch.ones(5), H, D_H)


@pytest.mark.parametrize(
    ("heads", "neurons"),
    [
        pytest.param({0: torch.ones(H + 1)}, None, id="head-mask-too-long"),
        pytest.param({0: torch.ones(H * D_H - 1)}, None, id="per-dim-mask-too-short"),
        pytest.param({0: torch.ones(H, D_H)}, None, id="head-mask-2d"),
        pytest.param({0: torch.ones(0)}, None, id="empty-head-mask-on-live-heads"),
        pytest.param(None, {1: torch.ones(D_FF - 1)}, id="neuron-mask-too-short"),
        pytest.param(None, {1: torch.ones(1, D_FF)}, id="neuron-mask-2d"),
        pytest.param(None, {1: torch.ones(H)}, id="head-sized-neuron-mask"),
    ],
)
def test_wrong_mask_sizes_raise(family, make_model, heads, neurons):
    adapter = get_adapter(make_model(family))
    with pytest.raises(ValueError), apply_masks(adapter, heads, neurons):
        pass
    assert hook_count(adapter) == 0


def test_masks_on_emptied_sublayers(family, make_model, batch, outputs_of):
    """An emptied sublayer accepts only an empty mask; full_masks skips it."""
    model = make_model(family)
    adapter = get_adapter(model)
    adapter.resize([LayerShape(0, 0), LayerShape(H, D_FF)])
    with pytest.raises(ValueError, match="no attention heads"), apply_masks(adapter, {0: torch.ones(H)}):
        pass
    with pytest.raises(ValueError, match="no FFN neurons"), apply_masks(adapter, None, {0: torch.ones(D_FF)}):
        pass
    before = outputs_of(model, batch)
    with apply_masks(adapter, {0: torch.ones(0)}, {0: torch.ones(0)}):
        assert torch.equal(outputs_of(model, batch), before)
    heads, neurons = full_masks(adapter)
    assert list(heads) == [1] and list(neurons) == [1]
