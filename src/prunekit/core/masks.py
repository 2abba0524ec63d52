"""Per-head and per-neuron masks, applied by forward pre-hooks on the output projections.

A mask scales the input Z of a sublayer's output projection column by column (style.md §9), so
it works the same under eager, SDPA or flash attention, needs none of the ``head_mask`` plumbing
transformers v5 removed, and is differentiable: methods take gradients with respect to it.

Shapes:
- attention mask of layer l: (H,) per head, or (H * d_h,) per head dimension (Kprune, spec §1.4);
- FFN mask of layer l: (d_ff,).
Values are real numbers, so tuned scales (Kwon et al.) are masks too; surgery folds them into the
weights (spec P15). Heads are query heads: under grouped-query attention each still owns its d_h
columns of the output projection, and a key/value group is masked by masking all of its query heads.
A gated FFN is masked the same way: the down projection's input is act(gate(x)) * up(x).
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from contextlib import contextmanager

import torch
from torch import nn

from prunekit.core.view import AttentionParts, ModelAdapter


def expand_head_mask(mask: torch.Tensor, num_heads: int, head_dim: int) -> torch.Tensor:
    """A per-head (H,) or per-dimension (H * d_h,) mask as a per-column (H * d_h,) vector."""
    if mask.dim() != 1:
        raise ValueError(f"a head mask must be 1-D, got shape {tuple(mask.shape)}")
    if mask.numel() == num_heads:
        return mask.repeat_interleave(head_dim)  # (H,) -> (H * d_h,)
    if mask.numel() == num_heads * head_dim:
        return mask
    raise ValueError(
        f"a head mask must have {num_heads} entries (one per head) or {num_heads * head_dim} "
        f"(one per head dimension), got {mask.numel()}"
    )


def expand_group_mask(mask: torch.Tensor, parts: AttentionParts) -> torch.Tensor:
    """A per-key/value-group mask (H_kv,) as the per-query-head mask (H,) it amounts to: each query
    head takes its group's value (differentiable; multiply by a head mask to combine the two)."""
    if mask.shape != (parts.num_kv_heads,):
        raise ValueError(f"a key/value group mask must have shape ({parts.num_kv_heads},), got {tuple(mask.shape)}")
    return mask[torch.as_tensor(parts.kv_map, device=mask.device)]  # (H,)


def _scale_input(column_mask: torch.Tensor):
    def hook(module, args):
        z = args[0]  # (B, T, width)
        if z.dtype in (torch.bfloat16, torch.float16):
            # A half model (on a GPU) forms the product in float32 and rounds it once: the mask's
            # gradient, a sum over every token, is then summed in float32, not in 8 or 11 bits.
            return ((z.float() * column_mask.float()).to(z.dtype),) + tuple(args[1:])
        return (z * column_mask.to(dtype=z.dtype),) + tuple(args[1:])

    return hook


@contextmanager
def apply_masks(
    adapter: ModelAdapter,
    head_masks: Mapping[int, torch.Tensor] | None = None,
    neuron_masks: Mapping[int, torch.Tensor] | None = None,
) -> Iterator[None]:
    """Apply masks to the adapter's model inside the ``with`` block; always removed on exit.

    ``head_masks[l]`` and ``neuron_masks[l]`` are for layer l; layers not given are left alone.
    A layer whose sublayer has already been emptied accepts only an empty mask.
    """
    handles = []
    try:
        for layer, mask in (head_masks or {}).items():
            parts = adapter.attention(layer)
            if parts is None:
                if mask.numel():
                    raise ValueError(f"layer {layer} has no attention heads to mask")
                continue
            column_mask = expand_head_mask(mask, parts.num_heads, parts.head_dim)
            handles.append(parts.out.register_forward_pre_hook(_scale_input(column_mask)))
        for layer, mask in (neuron_masks or {}).items():
            parts = adapter.ffn(layer)
            if parts is None:
                if mask.numel():
                    raise ValueError(f"layer {layer} has no FFN neurons to mask")
                continue
            if mask.shape != (parts.width,):
                raise ValueError(f"layer {layer}: neuron mask must have shape ({parts.width},), got {tuple(mask.shape)}")
            handles.append(parts.down.register_forward_pre_hook(_scale_input(mask)))
        yield
    finally:
        for handle in handles:
            handle.remove()


def full_masks(
    adapter: ModelAdapter,
    per_dim: bool = False,
    requires_grad: bool = False,
    device: torch.device | str | None = None,
) -> tuple[dict[int, torch.Tensor], dict[int, torch.Tensor]]:
    """All-ones masks for every layer: ({l: (H,) or (H*d_h,)}, {l: (d_ff,)})."""
    heads, neurons = {}, {}
    for layer in range(adapter.num_layers):
        attn, ffn = adapter.attention(layer), adapter.ffn(layer)
        if attn is not None:
            n = attn.width if per_dim else attn.num_heads
            heads[layer] = torch.ones(n, device=device or attn.out.weight.device, requires_grad=requires_grad)
        if ffn is not None:
            neurons[layer] = torch.ones(ffn.width, device=device or ffn.down.weight.device, requires_grad=requires_grad)
    return heads, neurons


@contextmanager
def frozen_for_masks(model: nn.Module) -> Iterator[None]:
    """Eval mode (no dropout) with every parameter frozen, so that a backward pass computes
    gradients for mask tensors only; the model's mode and flags are restored on exit."""
    was_training = model.training
    flags = {name: p.requires_grad for name, p in model.named_parameters()}
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    try:
        yield
    finally:
        # By name: surgery inside the block may have replaced parameters (narrower copies, or
        # the bias of an emptied sublayer); a new name takes the model's overall setting.
        default = all(flags.values())
        for name, p in model.named_parameters():
            p.requires_grad_(flags.get(name, default))
        model.train(was_training)


# ---- gates at every granularity (CoFi) -------------------------------------------------------------
class GateHolder:
    """The gate values the hooks of :func:`apply_gates` read: set ``values`` before each forward
    pass (a ``prunekit.methods.cofi.l0.GateValues``), or None to run the model ungated."""

    def __init__(self) -> None:
        self.values = None


def masked_layer_norm(x: torch.Tensor, layer_norm: nn.Module, hidden: torch.Tensor, kind: str = "layernorm",
                      eps: float | None = None, offset: float = 0.0) -> torch.Tensor:
    """A LayerNorm (``kind`` "layernorm") or RMSNorm ("rmsnorm") over the dimensions whose gate is
    non-zero only, output scaled by the gates; ``eps`` defaults to the module's ``eps``; the norm
    scales by (``offset`` + weight) (``BlockFacts.norm_offset``).

    The statistics are a mean over the kept dimensions (a weighted mean with a static shape, so
    no data-dependent indexing), which makes the gated model equal to the narrowed one whose
    norm only has those dimensions (cofi.md §1, §8 pitfall 3).
    """
    eps = layer_norm.eps if eps is None else eps
    keep = (hidden != 0).to(torch.float32)  # (d,)
    count = keep.sum().clamp_min(1.0)
    x32 = x.float()  # (B, T, d); statistics in float32 also under autocast
    if kind == "rmsnorm":
        kept = x32 * keep
        y = kept * torch.rsqrt(kept.pow(2).sum(-1, keepdim=True) / count + eps)  # no centring
    else:
        mean = (x32 * keep).sum(-1, keepdim=True) / count  # (B, T, 1)
        centred = (x32 - mean) * keep
        var = centred.pow(2).sum(-1, keepdim=True) / count
        y = centred * torch.rsqrt(var + eps)
    if getattr(layer_norm, "weight", None) is not None:
        y = y * (offset + layer_norm.weight.float())
    if getattr(layer_norm, "bias", None) is not None:
        y = y + layer_norm.bias.float()
    return (y * hidden.float()).to(x.dtype)


@contextmanager
def apply_gates(adapter: ModelAdapter, holder: GateHolder) -> Iterator[GateHolder]:
    """Install CoFi's gates on the adapter's model for the ``with`` block (cofi.md §1).

    Per layer: head gates scale each head's context before the output projection; the attention
    layer gate and the hidden gates scale the projection's output (bias included); FFN neuron
    gates scale the FFN activations, the FFN layer gate and hidden gates the FFN output.

    Post-norm (``facts.norm_placement``): the norm after a sublayer normalises over kept hidden
    dims only, or is skipped entirely when the sublayer is off (its layer gate or all of its units
    are 0), so the sublayer is then the identity, exactly what removing it physically gives (§8
    pitfall 1). The embeddings are scaled by the hidden gates before and after their norm.
    Pre-norm: an off sublayer adds 0 to X, which already is the identity; every norm (before each
    sublayer and after the last layer) normalises over the kept dims only and zeroes the others,
    and the embeddings are scaled by the hidden gates, so the residual stream is 0 in the closed
    dims (its hidden states, which layer distillation reads, are the narrowed model's, zero-padded).
    """
    handles = []
    facts = adapter.facts
    post = facts.norm_placement == "post"

    def gate_input(kind: str, layer: int, parts):
        def hook(module, args):
            values = holder.values
            if values is None:
                return None
            units = (values.head if kind == "attn" else values.neuron)[layer]
            if units is None:
                return None
            if kind == "attn":
                units = expand_head_mask(units, parts.num_heads, parts.head_dim)  # (H * d_h,)
            z = args[0]  # (B, T, width)
            return (z * units.to(z.dtype),) + tuple(args[1:])

        return hook

    def gate_output(kind: str, layer: int):
        def hook(module, args, output):
            values = holder.values
            if values is None:
                return None
            on = (values.attn_on if kind == "attn" else values.ffn_on)[layer]
            if not on:
                return output * 0.0  # (B, T, d); the LayerNorm hook passes the residual through
            gate = (values.mha if kind == "attn" else values.ffn)[layer]
            if gate is not None:
                output = output * gate.to(output.dtype)
            if values.hidden is not None:
                output = output * values.hidden.to(output.dtype)
            return output

        return hook

    def gate_layer_norm(kind: str | None, layer: int, gated: bool):
        def hook(module, args, output):
            values = holder.values
            if values is None:
                return None
            x = args[0]  # (B, T, d): the residual input plus the sublayer's output
            if kind is not None and gated and not (values.attn_on if kind == "attn" else values.ffn_on)[layer]:
                return x  # the sublayer contributed 0: skip its LayerNorm, output = X
            if values.hidden is None:
                return None
            if kind is None:  # embeddings: nothing upstream has applied the hidden gates yet
                x = x * values.hidden.to(x.dtype)
            return masked_layer_norm(x, module, values.hidden, facts.norm_kind, adapter.norm_eps(module),
                                     facts.norm_offset)

        return hook

    def gate_embedding(module, args, output):
        values = holder.values
        if values is None or values.hidden is None:
            return None
        return output * values.hidden.to(output.dtype)  # (B, T, d); a sum of tables stays gated

    def gate_pre_norm(module, args, output):
        values = holder.values
        if values is None or values.hidden is None:
            return None
        return masked_layer_norm(args[0], module, values.hidden, facts.norm_kind, adapter.norm_eps(module),
                                     facts.norm_offset)

    try:
        embedding_norm, final_norm = adapter.embedding_layer_norm(), adapter.final_norm()
        if embedding_norm is not None:
            handles.append(embedding_norm.register_forward_hook(gate_layer_norm(None, -1, False)))
        if final_norm is not None:
            handles.append(final_norm.register_forward_hook(gate_pre_norm))
        if not post or embedding_norm is None:  # post-norm without an embedding norm: OPT-350m
            for table in adapter.embedding_tables():
                handles.append(table.register_forward_hook(gate_embedding))
        for layer in range(adapter.num_layers):
            for kind in ("attn", "ffn"):
                if adapter.is_removed(layer, kind):
                    continue
                parts = adapter.sublayer(layer, kind)
                if parts is not None:
                    linear = parts.output
                    handles.append(linear.register_forward_pre_hook(gate_input(kind, layer, parts)))
                    handles.append(linear.register_forward_hook(gate_output(kind, layer)))
                if post:
                    norm = adapter.sublayer_layer_norm(layer, kind)
                    handles.append(norm.register_forward_hook(gate_layer_norm(kind, layer, parts is not None)))
                elif parts is not None:  # an emptied pre-norm sublayer has no norm left
                    handles.append(adapter.sublayer_layer_norm(layer, kind).register_forward_hook(gate_pre_norm))
        yield holder
    finally:
        for handle in handles:
            handle.remove()
