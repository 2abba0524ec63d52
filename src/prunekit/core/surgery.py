"""Surgery: turn kept-unit decisions into a physically smaller model.

Invariant (tested): the physically pruned model computes what the masked model computes. Real-valued
mask scales are folded into the output projection's columns before slicing (spec P15); a sublayer
pruned to zero units takes the adapter's explicit bias-only path (spec P4: post-norm norm(X + b_out),
pre-norm X + b_out, or X without an output bias), never an empty matmul.

Heads are query heads. Under grouped-query attention a key/value head stays while at least one
query head of its group does and goes with the last one (exact: no kept query head reads it);
:func:`prune_kv_groups` removes whole groups with their query heads.

CoFi adds two coarser structures (cofi.md §7, §8): a *removed* sublayer is the identity (out = X,
its LayerNorm skipped too, unlike an emptied one), and the residual stream can be *narrowed* to a
subset of its hidden dimensions in every layer at once.

Only primitives live here (slice a Linear's rows or columns); the adapter says which Linears belong
to a head or a neuron and puts the narrower ones back.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from prunekit.core.masks import expand_head_mask
from prunekit.core.view import AttentionParts, FfnParts, ModelAdapter, SublayerKind, unit_columns


def _check_index(keep: Sequence[int] | torch.Tensor, size: int, what: str) -> torch.Tensor:
    index = torch.as_tensor(list(keep) if not isinstance(keep, torch.Tensor) else keep, dtype=torch.long)
    if index.dim() != 1:
        raise ValueError(f"{what}: kept indices must be 1-D")
    if index.numel():
        if int(index.min()) < 0 or int(index.max()) >= size:
            raise ValueError(f"{what}: kept indices must lie in [0, {size}), got {index.tolist()}")
        if torch.unique(index).numel() != index.numel():
            raise ValueError(f"{what}: kept indices repeat: {index.tolist()}")
    return torch.sort(index).values


def slice_linear(linear: nn.Linear, index: torch.Tensor, dim: int) -> nn.Linear:
    """A new Linear with only the output rows (``dim=0``) or input columns (``dim=1``) in ``index``."""
    if not isinstance(linear, nn.Linear):
        raise TypeError(f"slice_linear expects nn.Linear, got {type(linear).__name__}")
    index = index.to(linear.weight.device)
    weight = linear.weight.detach().index_select(dim, index)
    out_f, in_f = weight.shape
    new = nn.Linear(in_f, out_f, bias=linear.bias is not None, device=weight.device, dtype=weight.dtype)
    with torch.no_grad():
        new.weight.copy_(weight)
        if linear.bias is not None:
            # Removing input columns leaves the bias whole; removing rows removes their bias entries.
            new.bias.copy_(linear.bias.detach().index_select(0, index) if dim == 0 else linear.bias.detach())
    new.weight.requires_grad_(linear.weight.requires_grad)
    if linear.bias is not None:
        new.bias.requires_grad_(linear.bias.requires_grad)
    return new


def _nothing_left(parts: AttentionParts | FfnParts | None, keep: Sequence[int] | torch.Tensor, layer: int,
                  units: str) -> bool:
    """Whether the sublayer is already empty (so there is nothing to cut); keeping any unit of it
    is an error."""
    if parts is not None:
        return False
    if len(keep):
        raise ValueError(f"layer {layer}: no {units} left to keep")
    return True


def _bias_copy(linear: nn.Linear) -> torch.Tensor | None:
    """The bias an emptied sublayer keeps (spec P4), or None where the projection has none."""
    return linear.bias.detach().clone() if linear.bias is not None else None


def _columns_scaled(linear: nn.Linear, scale: torch.Tensor) -> nn.Linear:
    """A copy of ``linear`` (d, n) with input column i times ``scale[i]``: a mask folded into the
    output projection, on a copy so that the caller's model view stays intact."""
    scaled = slice_linear(linear, torch.arange(linear.in_features), dim=1)
    with torch.no_grad():
        scaled.weight.mul_(scale.to(scaled.weight))  # (d, n) * (n,)
    return scaled


def _checked_bias(bias: torch.Tensor, like: nn.Linear, what: str) -> torch.Tensor:
    """A copy of output bias ``bias`` (d,) on ``like``'s device and dtype, its shape and values checked."""
    if tuple(bias.shape) != (like.out_features,):
        raise ValueError(f"{what}: output bias must have shape ({like.out_features},), got {tuple(bias.shape)}")
    if not torch.isfinite(bias).all():
        raise ValueError(f"{what}: output bias has NaN or inf entries")
    return bias.detach().to(dtype=like.weight.dtype, device=like.weight.device).clone()


def _empty_bias(out: nn.Linear, bias: torch.Tensor | None, what: str) -> torch.Tensor | None:
    """What an emptied sublayer adds: the plan's output bias where it gives one, else the projection's."""
    return _checked_bias(bias, out, what) if bias is not None else _bias_copy(out)


def _with_bias(linear: nn.Linear, bias: torch.Tensor | None, what: str) -> nn.Linear:
    """``linear`` (a new Linear surgery just made) with output bias ``bias`` (d,) (FLAP's
    compensated bias); one without a bias is copied into a Linear that has one. None leaves it."""
    if bias is None:
        return linear
    bias = _checked_bias(bias, linear, what)
    if linear.bias is None:
        new = nn.Linear(linear.in_features, linear.out_features, bias=True, device=linear.weight.device,
                        dtype=linear.weight.dtype)
        with torch.no_grad():
            new.weight.copy_(linear.weight.detach())
        new.weight.requires_grad_(linear.weight.requires_grad)
        linear = new
    with torch.no_grad():
        linear.bias.copy_(bias)
    return linear


def _replacement(weight: torch.Tensor | None, like: nn.Linear, shape: tuple[int, int], what: str) -> None:
    if weight is None:
        return
    if tuple(weight.shape) != shape:
        raise ValueError(f"{what}: replacement output weight must have shape {shape}, got {tuple(weight.shape)}")
    if not torch.isfinite(weight).all():
        raise ValueError(f"{what}: replacement output weight has NaN or inf entries")
    with torch.no_grad():
        like.weight.copy_(weight.to(dtype=like.weight.dtype, device=like.weight.device))


def prune_heads(
    adapter: ModelAdapter,
    layer: int,
    keep: Sequence[int] | torch.Tensor,
    scales: torch.Tensor | None = None,
    out_weight: torch.Tensor | None = None,
    out_bias: torch.Tensor | None = None,
) -> None:
    """Keep only heads ``keep`` of ``layer``'s attention.

    Args:
        keep: kept query heads (indices into the layer's current ones). The key/value heads kept
            are those read by a kept query head, renumbered in order.
        scales: optional real mask values, (H,) per head or (H*d_h,) per dimension, over the
            layer's current heads; folded into the output projection before slicing.
        out_weight: optional new output-projection weight (d, len(keep) * d_h) for the kept heads,
            e.g. re-fitted by least squares; replaces the sliced (and scaled) weight.
        out_bias: optional output-projection bias (d,) after pruning (FLAP's bias compensation);
            given to a family whose output projection has none, it becomes one.
    """
    parts = adapter.attention(layer)
    if _nothing_left(parts, keep, layer, "attention heads"):
        return
    what = f"layer {layer} attention"
    heads = _check_index(keep, parts.num_heads, what)
    out = parts.out
    if scales is not None:
        out = _columns_scaled(out, expand_head_mask(scales.detach(), parts.num_heads, parts.head_dim))
    if heads.numel() == 0:
        adapter.set_empty_attention(layer, _empty_bias(out, out_bias, what))
        return
    columns = unit_columns(heads, parts.head_dim)  # (h_kept * d_h,)
    kept_kv = sorted({parts.kv_map[h] for h in heads.tolist()})
    new = AttentionParts(
        query=slice_linear(parts.query, columns, dim=0),
        key=slice_linear(parts.key, unit_columns(torch.tensor(kept_kv), parts.head_dim), dim=0),
        value=slice_linear(parts.value, unit_columns(torch.tensor(kept_kv), parts.head_dim), dim=0),
        out=_with_bias(slice_linear(out, columns, dim=1), out_bias, what),
        num_heads=heads.numel(),
        head_dim=parts.head_dim,
        num_kv_heads=len(kept_kv),
        kv_map=tuple(kept_kv.index(parts.kv_map[h]) for h in heads.tolist()),
    )
    _replacement(out_weight, new.out, (new.out.out_features, columns.numel()), what)
    adapter.set_attention(layer, new)


def heads_of_groups(adapter: ModelAdapter, layer: int, groups: Sequence[int] | torch.Tensor) -> list[int]:
    """The query heads of ``layer`` that read the key/value heads ``groups`` (sorted)."""
    parts = adapter.attention(layer)
    if parts is None:
        if len(groups):
            raise ValueError(f"layer {layer}: no attention heads left, so no key/value groups to keep")
        return []
    kept = set(_check_index(groups, parts.num_kv_heads, f"layer {layer} key/value groups").tolist())
    return [head for head, kv in enumerate(parts.kv_map) if kv in kept]


def prune_kv_groups(
    adapter: ModelAdapter,
    layer: int,
    keep: Sequence[int] | torch.Tensor,
    scales: torch.Tensor | None = None,
    out_weight: torch.Tensor | None = None,
) -> None:
    """Keep only the key/value groups ``keep`` of ``layer``, each whole: its key/value head and
    every query head reading it; ``scales`` and ``out_weight`` as in :func:`prune_heads`."""
    prune_heads(adapter, layer, heads_of_groups(adapter, layer, keep), scales=scales, out_weight=out_weight)


def prune_neurons(
    adapter: ModelAdapter,
    layer: int,
    keep: Sequence[int] | torch.Tensor,
    scales: torch.Tensor | None = None,
    out_weight: torch.Tensor | None = None,
    out_bias: torch.Tensor | None = None,
) -> None:
    """Keep only FFN neurons ``keep`` of ``layer``; ``scales`` (d_ff,), ``out_weight``
    (d, len(keep)) and ``out_bias`` (d,) as in :func:`prune_heads`."""
    parts = adapter.ffn(layer)
    if _nothing_left(parts, keep, layer, "FFN neurons"):
        return
    what = f"layer {layer} FFN"
    neurons = _check_index(keep, parts.width, what)
    down = parts.down
    if scales is not None:
        if scales.shape != (parts.width,):
            raise ValueError(f"{what}: scales must have shape ({parts.width},), got {tuple(scales.shape)}")
        down = _columns_scaled(down, scales.detach())
    if neurons.numel() == 0:
        adapter.set_empty_ffn(layer, _empty_bias(down, out_bias, what))
        return
    new = FfnParts(
        up=slice_linear(parts.up, neurons, dim=0),
        down=_with_bias(slice_linear(down, neurons, dim=1), out_bias, what),
        gate=slice_linear(parts.gate, neurons, dim=0) if parts.gate is not None else None,
    )
    _replacement(out_weight, new.down, (new.down.out_features, neurons.numel()), what)
    adapter.set_ffn(layer, new)


def remove_sublayer(adapter: ModelAdapter, layer: int, kind: SublayerKind) -> None:
    """Remove sublayer ``kind`` ("attn" or "ffn") of ``layer``: it becomes the identity, out = X
    with no bias and no norm, in either norm placement (CoFi's z_MHA / z_FFN = 0, cofi.md §8 pitfall 1). Works on a
    full, narrowed or emptied sublayer; removing a removed one is a no-op."""
    if not 0 <= layer < adapter.num_layers:
        raise ValueError(f"layer {layer} does not exist; the model has {adapter.num_layers} layers")
    if kind not in ("attn", "ffn"):
        raise ValueError(f"unknown sublayer kind {kind!r}; choose 'attn' or 'ffn'")
    if not adapter.is_removed(layer, kind):
        adapter.remove(layer, kind)


def narrow_hidden(adapter: ModelAdapter, keep: Sequence[int] | torch.Tensor) -> None:
    """Keep only hidden dimensions ``keep`` of the residual stream, in every layer, the embeddings
    and the task head's input (CoFi's z_hidn, cofi.md §8 pitfall 3); indices refer to the model's
    current hidden dimensions. At least one dimension must be kept."""
    index = _check_index(keep, adapter.hidden_size, "hidden dimensions")
    if index.numel() == 0:
        raise ValueError("hidden dimensions: at least one must be kept (LayerNorm over no dimensions is undefined)")
    adapter.narrow_hidden(index)


@dataclass(eq=False)
class LayerPlan:
    """What a method decided for one layer. ``None`` leaves that sublayer's units untouched;
    ``attention_removed`` / ``ffn_removed`` remove the sublayer (identity, LayerNorm skipped).

    Indices refer to the units of the model the plan is applied to (the teacher). Tensors (the
    ``*_scales``, ``*_out_weight`` and ``*_gate`` fields) are stored in ``plan.safetensors``:

    - ``head_scales`` (H,), ``neuron_scales`` (d_ff,): real mask values over all current units,
      folded into the output projection's columns before slicing (Kwon et al.'s tuned masks,
      CoFi's head and neuron gates). Lists are accepted and become tensors.
    - ``attention_out_weight`` (d, h_kept·d_h), ``ffn_out_weight`` (d, n_kept): the final
      output-projection weight of the kept units, replacing the sliced one (Kprune's
      least-squares re-fit, spec §1.7). Each sublayer is re-fitted once, at its own step, from
      the teacher's weights of that sublayer, so the final weight is all a replay needs.
    - ``attention_out_bias``, ``ffn_out_bias`` (d,): the output projection's bias after pruning
      (FLAP's bias compensation: the original bias plus the mean contribution of the removed
      units). A family without that bias gets one (``LayerShape.attention_out_bias``), which the
      saved config records so every load path allocates it. The masked form (:meth:`PruningPlan.masks`)
      has no bias: a masked model adds the difference to the output projection's output.
    - ``layer_removed``: the whole layer leaves the model (ShortGPT); the layers after it are
      renumbered, so the pruned model has fewer layers and is its family's stock architecture.
    - ``attention_gate``, ``ffn_gate`` (scalars): CoFi's sublayer gates z_MHA / z_FFN, which
      scale the output projection's weight and bias before the unit scales are folded.
    - ``kv_groups``: kept key/value groups, for families whose query heads share key/value heads
      (``ModelAdapter.grouped_kv``): each kept whole, with every query head reading it, unless
      ``heads`` names a subset of those query heads; a group none of whose query heads is kept goes.
      A plan that sets them for a family without groups is refused.
    """

    heads: list[int] | None = None
    neurons: list[int] | None = None
    kv_groups: list[int] | None = None
    head_scales: torch.Tensor | None = None
    neuron_scales: torch.Tensor | None = None
    attention_out_weight: torch.Tensor | None = None
    ffn_out_weight: torch.Tensor | None = None
    attention_gate: torch.Tensor | None = None
    ffn_gate: torch.Tensor | None = None
    attention_removed: bool = False
    ffn_removed: bool = False
    attention_out_bias: torch.Tensor | None = None
    ffn_out_bias: torch.Tensor | None = None
    layer_removed: bool = False

    def __post_init__(self) -> None:
        for name in TENSOR_FIELDS:
            value = getattr(self, name)
            if value is not None and not isinstance(value, torch.Tensor):
                setattr(self, name, torch.as_tensor(value))  # python floats: float64, as before
        for name in ("heads", "neurons", "kv_groups"):
            value = getattr(self, name)
            if isinstance(value, torch.Tensor):
                setattr(self, name, value.tolist())

    def to_dict(self) -> dict:
        """The JSON part: kept indices and removals (tensors are named in the plan's ``tensors``)."""
        data: dict = {"heads": self.heads, "neurons": self.neurons}
        if self.kv_groups is not None:
            data["kv_groups"] = list(self.kv_groups)
        # Written only when set, so plans without removals serialise as before.
        for flag in REMOVAL_FLAGS:
            if getattr(self, flag):
                data[flag] = True
        return data

    def __eq__(self, other: object) -> bool:
        return isinstance(other, LayerPlan) and _same(self, other)

    def tensors(self) -> dict[str, torch.Tensor]:
        return {name: _tensor(getattr(self, name)) for name in TENSOR_FIELDS if getattr(self, name) is not None}


def _same(first: LayerPlan | PruningPlan, second: LayerPlan | PruningPlan) -> bool:
    """Equal indices and removals, and every tensor equal in shape, dtype and value."""
    if first.to_dict() != second.to_dict():
        return False
    a, b = first.tensors(), second.tensors()
    return a.keys() == b.keys() and all(a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]) for k in a)


def _tensor(value: Any) -> torch.Tensor | None:
    """A plan field as a tensor (fields set after construction may still be lists or floats)."""
    return value if value is None or isinstance(value, torch.Tensor) else torch.as_tensor(value)


TENSOR_FIELDS = ("head_scales", "neuron_scales", "attention_out_weight", "ffn_out_weight", "attention_gate",
                 "ffn_gate", "attention_out_bias", "ffn_out_bias")
REMOVAL_FLAGS = ("attention_removed", "ffn_removed", "layer_removed")


@dataclass(eq=False)
class PruningPlan:
    """Everything a method decided, the one hand-off from a method to surgery: per layer the kept
    units, replacement tensors and removals (:class:`LayerPlan`), the kept hidden dimensions
    (``hidden``, None: all), and for methods that train (CoFi) the trained weights of the pruned
    model (``weights``, a state dict loaded after the cuts, since they are not a function of the
    teacher). ``apply_plan(teacher, plan)`` rebuilds the pruned model.

    ``to_dict`` is the JSON part (plan.json); ``tensors`` / ``from_parts`` the rest
    (plan.safetensors, :func:`prunekit.io.folders.save_plan`). Dicts written before tensors existed load
    too (their scales were lists).

    Two facts for a replay sit beside the decisions, in :meth:`replay_dict` (plan.json's top-level
    ``teacher`` and ``uniform`` keys, not in ``to_dict``, so the rest of plan.json is as before and
    equality compares decisions only): ``teacher``, the teacher the plan was made on
    (:func:`prunekit.core.fingerprint.teacher_fingerprint`; None in plans made before it was
    recorded), and ``uniform``, that the pruned model is saved as the family's stock class.
    """

    layers: list[LayerPlan] = field(default_factory=list)
    hidden: list[int] | None = None
    weights: dict[str, torch.Tensor] | None = None
    teacher: dict[str, Any] | None = None
    uniform: bool = False

    def __eq__(self, other: object) -> bool:
        return isinstance(other, PruningPlan) and _same(self, other)

    def to_dict(self) -> dict:
        data: dict = {"layers": [layer.to_dict() for layer in self.layers]}
        if self.hidden is not None:
            data["hidden"] = list(self.hidden)
        data["tensors"] = sorted(self.tensors())
        return data

    def replay_dict(self) -> dict:
        """The replay facts (``teacher``, ``uniform``), each written only when known or set."""
        data: dict = {}
        if self.teacher is not None:
            data["teacher"] = self.teacher
        if self.uniform:
            data["uniform"] = True
        return data

    def tensors(self) -> dict[str, torch.Tensor]:
        """Every tensor of the plan by name: ``layers.{i}.{field}`` and ``weights.{state-dict key}``."""
        out = {f"layers.{i}.{name}": value for i, layer in enumerate(self.layers)
               for name, value in layer.tensors().items()}
        out |= {f"weights.{key}": value for key, value in (self.weights or {}).items()}
        return out

    @classmethod
    def from_dict(cls, data: dict, tensors: dict[str, torch.Tensor] | None = None) -> PruningPlan:
        """The plan of a plan.json dict and its tensors; a ValueError names what is malformed (a
        layer that is not an object, indices that are not whole numbers, an emptied sublayer beside
        a re-fitted weight, tensors named but not given)."""
        tensors = dict(tensors or {})
        missing = sorted(set(data.get("tensors", [])) - set(tensors))
        if missing:
            raise ValueError(f"the plan names tensors it was not given: {', '.join(missing[:5])}")
        if not isinstance(data["layers"], list):
            raise ValueError(f"'layers' must be a list with one entry per layer, got {type(data['layers']).__name__}")
        layers = []
        for i, layer in enumerate(data["layers"]):
            if not isinstance(layer, dict):
                raise ValueError(f"layer {i} must be an object with 'heads' and 'neurons', got {layer!r}")
            fields_ = {k: v for k, v in layer.items() if k != "tensors"}
            for name in ("heads", "neurons", "kv_groups"):
                _check_indices(fields_.get(name), f"layer {i} {name}")
            for flag in REMOVAL_FLAGS:
                if not isinstance(fields_.get(flag, False), bool):
                    raise ValueError(f"layer {i} {flag} must be true or false, got {fields_[flag]!r}")
            fields_ |= {name: tensors[f"layers.{i}.{name}"] for name in TENSOR_FIELDS if f"layers.{i}.{name}" in tensors}
            for units, weight in (("heads", "attention_out_weight"), ("neurons", "ffn_out_weight")):
                if fields_.get(units) == [] and fields_.get(weight) is not None:
                    raise ValueError(f"layer {i} keeps no {units} ({units}: []) but holds a re-fitted {weight} of "
                                     f"shape {tuple(fields_[weight].shape)}; the two disagree (was plan.json edited?)")
            layers.append(LayerPlan(**fields_))
        _check_indices(data.get("hidden"), "hidden")
        weights = {key[len("weights."):]: value for key, value in tensors.items() if key.startswith("weights.")}
        teacher = data.get("teacher")
        if teacher is not None and not isinstance(teacher, dict):
            raise ValueError(f"'teacher' must be an object, got {teacher!r}")
        uniform = data.get("uniform", False)
        if not isinstance(uniform, bool):
            raise ValueError(f"'uniform' must be true or false, got {uniform!r}")
        return cls(layers=layers, hidden=data.get("hidden"), weights=weights or None, teacher=teacher,
                   uniform=uniform)

    def masks(self, adapter: ModelAdapter) -> tuple[dict[int, torch.Tensor], dict[int, torch.Tensor]]:
        """The masked-model form of this plan: per-layer head and neuron mask vectors.

        Only heads and neurons with their scales: removals, sublayer gates, re-fitted weights and
        ``hidden`` have no column-mask form (a removed sublayer also skips its LayerNorm, a
        narrowed stream changes every LayerNorm's statistics), so they are ignored here; CoFi's
        gates (``prunekit.core.masks``) express them.
        """
        head_masks, neuron_masks = {}, {}
        for layer, step in enumerate(self.layers):
            attn, ffn = adapter.attention(layer), adapter.ffn(layer)
            if step.heads is not None and attn is not None:
                head_masks[layer] = _mask_vector(attn.num_heads, step.heads, step.head_scales, attn.out.weight)
            if step.neurons is not None and ffn is not None:
                neuron_masks[layer] = _mask_vector(ffn.width, step.neurons, step.neuron_scales, ffn.down.weight)
        return head_masks, neuron_masks


def _check_indices(value: Any, what: str) -> None:
    """Kept indices from JSON: null or a list of whole numbers (not floats, not true/false)."""
    if value is None:
        return
    if not isinstance(value, list):
        raise ValueError(f"{what} must be a list of indices or null, got {value!r}")
    bad = [v for v in value if isinstance(v, bool) or not isinstance(v, int)]
    if bad:
        raise ValueError(f"{what} must hold whole-number indices, got {bad[0]!r}")


def _mask_vector(size: int, keep: list[int], scales: Any, like: torch.Tensor) -> torch.Tensor:
    mask = torch.zeros(size, dtype=like.dtype, device=like.device)
    mask[list(keep)] = 1.0
    if scales is not None:
        mask = mask * _tensor(scales).to(dtype=like.dtype, device=like.device)
    return mask


def _apply_gate(linear: nn.Module, gate: torch.Tensor | None) -> None:
    """CoFi's sublayer gate: scale the output projection's weight and bias in place (what the
    gated model computes), before the unit scales are folded."""
    if gate is None:
        return
    gate = _tensor(gate)
    with torch.no_grad():
        linear.weight.mul_(gate.to(linear.weight))
        if linear.bias is not None:
            linear.bias.mul_(gate.to(linear.bias))


def _kept_heads(adapter: ModelAdapter, layer: int, step: LayerPlan) -> list[int] | None:
    """The query heads a layer keeps: ``heads``, within the kept key/value groups when given."""
    if step.kv_groups is None:
        return step.heads
    in_groups = heads_of_groups(adapter, layer, step.kv_groups)
    if step.heads is None:
        return in_groups
    outside = sorted(set(step.heads) - set(in_groups))
    if outside:
        raise ValueError(f"layer {layer}: heads {outside} lie outside the kept key/value groups {step.kv_groups}")
    return sorted(step.heads)


def apply_plan(adapter: ModelAdapter, plan: PruningPlan) -> nn.Module:
    """Physically prune the adapter's model in place as ``plan`` says; returns the model. The one surgery path: every method's result is applied here.

    Order: per layer, sublayer gates, then heads and neurons with their scales, replacement
    weights and output biases (indices into the current units); then removals; then the hidden
    narrowing (indices into the current hidden dims, which unit pruning leaves alone); then whole
    layers leave (``layer_removed``; the rest are renumbered); then trained weights.
    """
    if len(plan.layers) > adapter.num_layers:
        raise ValueError(f"plan has {len(plan.layers)} layers, the model {adapter.num_layers}")
    if not adapter.grouped_kv and any(step.kv_groups is not None for step in plan.layers):
        raise ValueError("the plan keeps key/value groups, but this model family has none (its heads each have their own)")
    if plan.hidden is not None:  # checked first, so a bad index leaves the model untouched
        hidden = _check_index(plan.hidden, adapter.hidden_size, "hidden dimensions")
        if hidden.numel() == 0:
            raise ValueError("hidden dimensions: at least one must be kept")
    for layer, step in enumerate(plan.layers):
        if step.attention_gate is not None and adapter.attention(layer) is not None:
            _apply_gate(adapter.attention(layer).out, step.attention_gate)
        heads = _kept_heads(adapter, layer, step)
        if heads is None and step.attention_out_bias is not None and adapter.attention(layer) is not None:
            heads = list(range(adapter.attention(layer).num_heads))  # a new bias alone
        if heads is not None:
            prune_heads(adapter, layer, heads, scales=_tensor(step.head_scales),
                        out_weight=_tensor(step.attention_out_weight), out_bias=_tensor(step.attention_out_bias))
        if step.ffn_gate is not None and adapter.ffn(layer) is not None:
            _apply_gate(adapter.ffn(layer).down, step.ffn_gate)
        neurons = step.neurons
        if neurons is None and step.ffn_out_bias is not None and adapter.ffn(layer) is not None:
            neurons = list(range(adapter.ffn(layer).width))
        if neurons is not None:
            prune_neurons(adapter, layer, neurons, scales=_tensor(step.neuron_scales),
                          out_weight=_tensor(step.ffn_out_weight), out_bias=_tensor(step.ffn_out_bias))
    for layer, step in enumerate(plan.layers):
        if step.attention_removed:
            remove_sublayer(adapter, layer, "attn")
        if step.ffn_removed:
            remove_sublayer(adapter, layer, "ffn")
    if plan.hidden is not None:
        narrow_hidden(adapter, plan.hidden)
    if any(step.layer_removed for step in plan.layers):
        adapter.drop_layers([layer for layer in range(adapter.num_layers)
                             if layer >= len(plan.layers) or not plan.layers[layer].layer_removed])
    if plan.weights is not None:
        _load_weights(adapter.model, plan.weights)
    return adapter.model


def _load_weights(model: nn.Module, weights: dict[str, torch.Tensor]) -> None:
    """Trained weights of the pruned model; every tensor must match the cut model's in name and shape."""
    state = model.state_dict()
    missing, unexpected = sorted(set(state) - set(weights)), sorted(set(weights) - set(state))
    if missing or unexpected:
        raise ValueError(f"the plan's trained weights do not fit the pruned model (missing {missing[:3]}, "
                         f"unexpected {unexpected[:3]})")
    for key, value in weights.items():
        if tuple(value.shape) != tuple(state[key].shape):
            raise ValueError(f"the plan's trained weight {key} has shape {tuple(value.shape)}, "
                             f"the pruned model's {tuple(state[key].shape)}")
    # Through load_state_dict, not by copying into state_dict()'s tensors: a family whose state dict
    # is not its parameters as they are (GPT-2's Conv1D layout and fused c_attn, built on the fly)
    # reads it back in its own _load_from_state_dict / load hooks.
    model.load_state_dict({key: value.to(dtype=state[key].dtype, device=state[key].device)
                           for key, value in weights.items()})
