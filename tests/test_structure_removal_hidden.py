"""CoFi's coarse structures (cofi.md §7, §8 pitfalls 1-3): a *removed* sublayer is the identity
(out = X, its LayerNorm skipped), and the residual stream can be *narrowed* to a subset of its
hidden dimensions everywhere at once.

The invariant, as for heads and neurons: the physically pruned model computes what the full model
computes when the structure is switched off by hand. The references here are built independently
of prunekit's gates: a removed sublayer is forced to the identity by a hook on its LayerNorm that
returns the sublayer's input X, and a narrowed stream is the full model with the dropped dims
zeroed in every weight that writes the residual stream and every LayerNorm computed over the kept
dims only (a hand-written hook). Also: combinations through ``apply_plan``, save and reload,
FLOPs and parameter counts, old configs and plans, and ``resize``.
"""

from __future__ import annotations

import copy
import json

import pytest
import torch
import torch.nn.functional as F
from conftest import assert_reloads_identically, assert_same_plan
from torch import nn
from transformers import (
    BertConfig,
    BertForSequenceClassification,
    BertModel,
    DistilBertConfig,
    DistilBertForSequenceClassification,
)

from prunekit import count_flops, count_params, load_pruned, save_pruned
from prunekit.core.accounting import (
    count_prunable_params,
    full_flops,
    full_prunable_params,
    layer_flops,
    unit_costs,
)
from prunekit.core.masks import apply_masks
from prunekit.core.surgery import (
    LayerPlan,
    PruningPlan,
    apply_plan,
    narrow_hidden,
    prune_heads,
    prune_neurons,
    remove_sublayer,
)
from prunekit.families import LayerShape, get_adapter
from prunekit.io.folders import load_model

H, D_H, D, D_FF, VOCAB, POSITIONS = 4, 8, 32, 37, 99, 128
ATOL = 1e-5
KINDS = ("attn", "ffn")
TASK_HEADS = ("classification", "qa")
# 12 of the 32 hidden dims, spread out and including both ends.
KEEP = [0, 2, 3, 7, 8, 13, 16, 20, 21, 26, 30, 31]


# ---- the hand-built reference -----------------------------------------------------------------------
def _layer_output(out):
    return out[0] if isinstance(out, tuple) else out  # (B, T, d)


def _masked_layer_norm(keep: torch.Tensor):
    """A forward hook: LayerNorm over the kept dims only (their own gamma and beta), 0 elsewhere."""

    def hook(module, args, output):
        x = args[0]  # (B, T, d)
        y = torch.zeros_like(output)
        y[..., keep] = F.layer_norm(x[..., keep], (keep.numel(),), module.weight[keep], module.bias[keep], module.eps)
        return y

    return hook


def _zero_dropped_dims(model: nn.Module, dropped: torch.Tensor) -> None:
    """Zero the dropped hidden dims of everything that writes the residual stream: the embedding
    tables' columns, and the rows and biases of the attention-out and FFN-down projections (or
    the kept bias of an emptied sublayer)."""
    adapter = get_adapter(model)
    with torch.no_grad():
        for module in model.base_model.embeddings.modules():
            if isinstance(module, nn.Embedding):
                module.weight[:, dropped] = 0.0
        for layer in range(adapter.num_layers):
            for kind in KINDS:
                if adapter.is_removed(layer, kind):
                    continue
                parts = adapter.attention(layer) if kind == "attn" else adapter.ffn(layer)
                if parts is not None:
                    (parts.out if kind == "attn" else parts.down).weight[dropped] = 0.0
                adapter.sublayer_bias(layer, kind)[dropped] = 0.0


def reference_outputs(model: nn.Module, plan: PruningPlan, batch, outputs_of) -> torch.Tensor:
    """What ``apply_plan(model, plan)`` must compute, from the unpruned ``model`` and hooks only:
    heads and neurons by masks (as in test_surgery), each removed sublayer forced to the identity
    (its LayerNorm returns the sublayer's input X), and ``plan.hidden`` as zeroed weights plus
    LayerNorms over the kept dims."""
    model = copy.deepcopy(model)
    adapter = get_adapter(model)
    keep = torch.tensor(plan.hidden) if plan.hidden is not None else None
    if keep is not None:
        dropped = torch.ones(adapter.hidden_size, dtype=torch.bool)
        dropped[keep] = False
        _zero_dropped_dims(model, dropped)
    removed = {(layer, kind) for layer, step in enumerate(plan.layers)
               for kind, flag in (("attn", step.attention_removed), ("ffn", step.ffn_removed)) if flag}  # fmt: skip
    inputs: dict[tuple[int, str], torch.Tensor] = {}
    handles = []

    def remember(key):
        return lambda module, args: inputs.__setitem__(key, args[0])

    def identity(key):
        return lambda module, args, output: inputs[key]

    try:
        if keep is not None:
            handles.append(adapter.embedding_layer_norm().register_forward_hook(_masked_layer_norm(keep)))
        for layer in range(adapter.num_layers):
            for kind in KINDS:
                norm = adapter.sublayer_layer_norm(layer, kind)
                if (layer, kind) in removed:
                    handles.append(adapter.sublayer_module(layer, kind).register_forward_pre_hook(remember((layer, kind))))
                    handles.append(norm.register_forward_hook(identity((layer, kind))))
                elif keep is not None:
                    handles.append(norm.register_forward_hook(_masked_layer_norm(keep)))
        head_masks, neuron_masks = plan.masks(model)
        with apply_masks(adapter, head_masks, neuron_masks):
            return outputs_of(model, batch)
    finally:
        for handle in handles:
            handle.remove()


def check_plan(model, plan, batch, outputs_of) -> nn.Module:
    """Apply ``plan`` to a copy of ``model``; its outputs must equal the reference's (and differ
    from the unpruned model's, so the plan did something)."""
    expected = reference_outputs(model, plan, batch, outputs_of)
    pruned = apply_plan(copy.deepcopy(model), copy.deepcopy(plan))
    got = outputs_of(pruned, batch)
    assert got.shape == expected.shape
    torch.testing.assert_close(got, expected, atol=ATOL, rtol=0)
    assert not torch.allclose(got, outputs_of(model, batch), atol=1e-3)
    return pruned


# ---- removed sublayers ------------------------------------------------------------------------------
@pytest.mark.parametrize("task", TASK_HEADS)
@pytest.mark.parametrize(
    "steps",
    [
        [LayerPlan(attention_removed=True), LayerPlan()],
        [LayerPlan(), LayerPlan(ffn_removed=True)],
        [LayerPlan(attention_removed=True, ffn_removed=True), LayerPlan(attention_removed=True)],
    ],
    ids=["attn", "ffn", "whole-layer"],
)
def test_removed_sublayer_equals_the_identity_forced_by_a_hook(family, task, steps, make_model, batch, outputs_of):
    check_plan(make_model(family, task), PruningPlan(steps), batch, outputs_of)


def test_removed_sublayers_pass_their_input_through_exactly(family, make_model, batch, outputs_of):
    """Layer 0 without attention: the FFN sees the layer input itself. Layer 1 without FFN: the
    layer outputs what its FFN would have read. Layer 2 without either: output = input, bitwise."""
    model = make_model(family, num_layers=3)
    adapter = get_adapter(model)
    remove_sublayer(adapter, 0, "attn")
    remove_sublayer(adapter, 1, "ffn")
    remove_sublayer(adapter, 2, "attn")
    remove_sublayer(adapter, 2, "ffn")
    seen = {}
    handles = []
    for layer in range(3):
        handles += [
            adapter.layers()[layer].register_forward_pre_hook(lambda m, a, k=layer: seen.__setitem__(("in", k), a[0])),
            adapter.sublayer_module(layer, "ffn").register_forward_pre_hook(
                lambda m, a, k=layer: seen.__setitem__(("ffn", k), a[0])),
            adapter.layers()[layer].register_forward_hook(
                lambda m, a, o, k=layer: seen.__setitem__(("out", k), _layer_output(o))),
        ]  # fmt: skip
    try:
        outputs_of(model, batch)
    finally:
        for handle in handles:
            handle.remove()
    assert torch.equal(seen[("ffn", 0)], seen[("in", 0)])
    assert torch.equal(seen[("out", 1)], seen[("ffn", 1)])
    assert torch.equal(seen[("out", 2)], seen[("in", 2)])
    assert not torch.equal(seen[("out", 0)], seen[("in", 0)])  # the FFN of layer 0 is still there


@pytest.mark.parametrize("state", ["full", "narrowed", "empty"])
def test_removal_works_from_every_sublayer_state(family, state, make_model, batch, outputs_of):
    model = make_model(family)
    if state == "narrowed":
        model = apply_plan(model, PruningPlan([LayerPlan(heads=[1, 3], neurons=[0, 4, 9])]))
    elif state == "empty":
        model = apply_plan(model, PruningPlan([LayerPlan(heads=[], neurons=[])]))
    check_plan(model, PruningPlan([LayerPlan(attention_removed=True, ffn_removed=True)]), batch, outputs_of)


def test_removed_sublayer_view(family, make_model):
    model = make_model(family, num_layers=3)
    adapter = get_adapter(model)
    apply_plan(model, PruningPlan([LayerPlan(heads=[], attention_removed=True), LayerPlan(neurons=[]), LayerPlan()]))
    remove_sublayer(adapter, 2, "ffn")
    remove_sublayer(adapter, 2, "ffn")  # removing twice is a no-op
    assert adapter.layer_shapes() == [LayerShape(0, D_FF, attention_removed=True), LayerShape(H, 0),
                                      LayerShape(H, 0, ffn_removed=True)]  # fmt: skip
    assert adapter.is_removed(0, "attn") and not adapter.is_removed(0, "ffn")
    assert not adapter.is_removed(1, "ffn")  # emptied (Kprune), not removed
    assert adapter.attention(0) is None and adapter.ffn(2) is None
    assert adapter.sublayer_bias(0, "attn") is None and adapter.sublayer_bias(2, "ffn") is None
    assert adapter.sublayer_bias(1, "ffn").shape == (D,)
    assert isinstance(adapter.sublayer_layer_norm(1, "ffn"), nn.LayerNorm)
    for layer, kind in ((0, "attn"), (2, "ffn")):
        with pytest.raises(ValueError, match="removed"):
            adapter.sublayer_layer_norm(layer, kind)
    assert adapter.is_pruned()
    # A removed sublayer takes no units, no empty path and no new linears; an empty keep is a no-op.
    prune_heads(adapter, 0, [])
    prune_neurons(adapter, 2, [])
    with pytest.raises(ValueError, match="no attention heads left"):
        prune_heads(adapter, 0, [0])
    with pytest.raises(ValueError, match="removed"):
        adapter.set_empty_attention(0, torch.zeros(D))
    with pytest.raises(ValueError, match="removed"):
        adapter.set_ffn(2, adapter.ffn(0))
    with pytest.raises(ValueError, match="removed"):
        adapter.set_empty_ffn(2, torch.zeros(D))
    with pytest.raises(ValueError, match="does not exist"):
        remove_sublayer(adapter, 3, "attn")
    with pytest.raises(ValueError, match="unknown sublayer kind"):
        remove_sublayer(adapter, 0, "mlp")


def test_layer_shape_flags():
    assert LayerShape(2, 5).to_dict() == {"num_heads": 2, "intermediate_size": 5}
    assert LayerShape(0, 5, attention_removed=True).to_dict() == {
        "num_heads": 0, "intermediate_size": 5, "attention_removed": True}  # fmt: skip
    assert LayerShape(**LayerShape(0, 0, True, True).to_dict()) == LayerShape(0, 0, True, True)
    assert LayerShape(0, 0) != LayerShape(0, 0, attention_removed=True)  # empty is not removed
    with pytest.raises(ValueError, match="no heads"):
        LayerShape(2, 5, attention_removed=True)
    with pytest.raises(ValueError, match="no neurons"):
        LayerShape(2, 5, ffn_removed=True)


# ---- narrowed hidden size ---------------------------------------------------------------------------
@pytest.mark.parametrize("task", TASK_HEADS)
def test_narrowed_model_equals_the_full_model_on_the_kept_dims(family, task, make_model, batch, outputs_of):
    model = make_model(family, task)
    pruned = check_plan(model, PruningPlan([LayerPlan(), LayerPlan()], hidden=KEEP), batch, outputs_of)
    adapter = get_adapter(pruned)
    assert adapter.hidden_size == len(KEEP) and adapter.full_hidden_size == D
    assert adapter.head_dim == D_H  # d_h never changes
    assert adapter.layer_shapes() == [LayerShape(H, D_FF)] * 2
    attn, ffn = adapter.attention(0), adapter.ffn(1)
    assert tuple(attn.query.weight.shape) == (H * D_H, len(KEEP)) and tuple(attn.out.weight.shape) == (len(KEEP), H * D_H)
    assert attn.out.bias.shape == (len(KEEP),) and attn.out.out_features == len(KEEP)
    assert tuple(ffn.up.weight.shape) == (D_FF, len(KEEP)) and tuple(ffn.down.weight.shape) == (len(KEEP), D_FF)
    norms = [adapter.embedding_layer_norm()] + [adapter.sublayer_layer_norm(lay, k) for lay in range(2) for k in KINDS]
    assert all(norm.normalized_shape == (len(KEEP),) and norm.weight.shape == (len(KEEP),) for norm in norms)
    assert adapter.is_pruned()


def test_narrowed_bare_base_model(make_batch):
    """A bare BertModel: the pooler reads the narrowed stream, its output keeps the full width."""
    torch.manual_seed(0)
    from conftest import _config, _randomize

    model = _randomize(BertModel(_config("bert", 2))).eval()
    batch = make_batch([9, 5, 2, 7])
    keep = torch.tensor(KEEP)

    def outputs(m, b):
        with torch.no_grad():
            out = m(**b)
        return torch.cat([out.last_hidden_state[:, 0], out.pooler_output], dim=-1)  # (B, d + D)

    narrowed = apply_plan(copy.deepcopy(model), PruningPlan(hidden=KEEP))
    reference = reference_outputs(model, PruningPlan(hidden=KEEP), batch, outputs)
    got = outputs(narrowed, batch)
    assert got.shape == (4, len(KEEP) + D)
    torch.testing.assert_close(got[:, : len(KEEP)], reference[:, keep], atol=ATOL, rtol=0)
    torch.testing.assert_close(got[:, len(KEEP):], reference[:, D:], atol=ATOL, rtol=0)


def test_narrowing_twice_composes(family, make_model, batch, outputs_of):
    """Indices refer to the current dims: keeping KEEP and then dims (1, 4, 5, 11) of those keeps
    KEEP[1], KEEP[4], KEEP[5], KEEP[11]."""
    model = make_model(family)
    twice = apply_plan(copy.deepcopy(model), PruningPlan(hidden=KEEP))
    narrow_hidden(get_adapter(twice), [1, 4, 5, 11])
    once = apply_plan(copy.deepcopy(model), PruningPlan(hidden=[KEEP[i] for i in (1, 4, 5, 11)]))
    assert get_adapter(twice).hidden_size == 4
    torch.testing.assert_close(outputs_of(twice, batch), outputs_of(once, batch), atol=ATOL, rtol=0)


def test_narrowing_keeps_dtype_device_and_requires_grad(family, make_model, batch, outputs_of):
    model = make_model(family).double()
    adapter = get_adapter(model)
    for param in adapter.embedding_layer_norm().parameters():
        param.requires_grad_(False)
    adapter.attention(1).out.bias.requires_grad_(False)
    flags = {name: p.requires_grad for name, p in model.named_parameters()}
    narrow_hidden(adapter, KEEP)
    assert {name: p.requires_grad for name, p in model.named_parameters()} == flags  # names are kept too
    assert all(p.dtype == torch.float64 and p.device.type == "cpu" for p in model.parameters())
    # The narrowed model trains: gradients reach the sliced weights.
    model.train()
    out = model(**{k: v for k, v in batch.items() if k != "token_type_ids" or family != "distilbert"})
    out.logits.sum().backward()
    assert adapter.attention(0).query.weight.grad.shape == (H * D_H, len(KEEP))
    assert adapter.embedding_layer_norm().weight.grad is None


@pytest.mark.parametrize(
    ("keep", "match"),
    [([0, 32], r"\[0, 32\)"), ([-1, 3], r"\[0, 32\)"), ([4, 4, 5], "repeat"), ([], "at least one"), ([[0, 1]], "1-D")],
)
def test_bad_hidden_indices_raise_before_anything_changes(make_model, keep, match):
    model = make_model("bert")
    before = copy.deepcopy(model.state_dict())
    with pytest.raises(ValueError, match=match):
        apply_plan(model, PruningPlan([LayerPlan(heads=[0], attention_removed=True)], hidden=keep))
    with pytest.raises(ValueError, match=match):
        narrow_hidden(get_adapter(model), keep)
    assert get_adapter(model).layer_shapes() == [LayerShape(H, D_FF)] * 2
    assert model.state_dict().keys() == before.keys()
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


# ---- combinations -----------------------------------------------------------------------------------
def combined_plan() -> PruningPlan:
    """Heads pruned with scales, an FFN removed, an emptied (Kprune) attention, a removed
    attention, a neuron subset, and the hidden stream narrowed."""
    return PruningPlan(
        layers=[
            LayerPlan(heads=[0, 3], head_scales=[0.5, 1.0, 1.0, -1.5], ffn_removed=True),
            LayerPlan(heads=[], neurons=list(range(0, D_FF, 4))),
            LayerPlan(attention_removed=True, neurons=[2, 7, 30]),
        ],
        hidden=KEEP,
    )


@pytest.mark.parametrize("task", TASK_HEADS)
def test_combined_plan_equals_the_reference(family, task, make_model, batch, outputs_of):
    model = make_model(family, task, num_layers=3)
    pruned = check_plan(model, combined_plan(), batch, outputs_of)
    adapter = get_adapter(pruned)
    assert adapter.hidden_size == len(KEEP)
    assert adapter.layer_shapes() == [
        LayerShape(2, 0, ffn_removed=True), LayerShape(0, 10), LayerShape(0, 3, attention_removed=True)]  # fmt: skip
    assert adapter.sublayer_bias(1, "attn").shape == (len(KEEP),)  # the emptied sublayer's bias was narrowed too
    assert adapter.sublayer_layer_norm(1, "attn").normalized_shape == (len(KEEP),)


def test_pruning_plan_round_trip_with_the_new_fields():
    plan = combined_plan()
    data = json.loads(json.dumps(plan.to_dict()))
    assert data["hidden"] == KEEP
    assert data["layers"][0]["ffn_removed"] is True and "attention_removed" not in data["layers"][0]
    assert_same_plan(PruningPlan.from_dict(data, plan.tensors()), plan)
    # A dict written before removals and hidden narrowing existed still loads.
    old = {"layers": [{"heads": [0, 2], "neurons": None, "head_scales": None, "neuron_scales": None}]}
    restored = PruningPlan.from_dict(old)
    assert restored.hidden is None and not restored.layers[0].attention_removed
    assert restored.to_dict() == {"layers": [{"heads": [0, 2], "neurons": None}], "tensors": []}


def test_plan_masks_ignore_removals_and_hidden(make_model):
    model = make_model("bert")
    plan = PruningPlan([LayerPlan(heads=[1], attention_removed=True), LayerPlan(ffn_removed=True)], hidden=[0, 1])
    head_masks, neuron_masks = plan.masks(model)
    assert list(head_masks) == [0] and neuron_masks == {}


# ---- save and reload ------------------------------------------------------------------------------
@pytest.mark.parametrize("task", TASK_HEADS)
def test_save_and_reload_identical_outputs(family, task, make_model, tokenizer, batch, outputs_of, tmp_path):
    model = apply_plan(make_model(family, task, num_layers=3), combined_plan())
    shapes = get_adapter(model).layer_shapes()
    expected = outputs_of(model, batch)
    out = save_pruned(model, tmp_path / "pruned", tokenizer=tokenizer)

    config = json.loads((out / "config.json").read_text())
    assert config["prunekit_hidden_size"] == len(KEEP)
    assert config["hidden_size" if family != "distilbert" else "dim"] == D  # the original width: d_h derives from it
    assert config["prunekit_layers"] == [shape.to_dict() for shape in shapes]
    assert config["prunekit_layers"][0]["ffn_removed"] is True
    assert config["prunekit_layers"][2]["attention_removed"] is True

    reloaded = assert_reloads_identically(out, task, shapes, batch, expected)
    assert get_adapter(reloaded).hidden_size == len(KEEP)

    # Reloaded, it can be pruned further and saved again.
    apply_plan(reloaded, PruningPlan([LayerPlan(), LayerPlan(attention_removed=True)], hidden=[0, 3, 4, 9, 11]))
    again = outputs_of(reloaded, batch)
    save_pruned(reloaded, tmp_path / "again")
    assert json.loads((tmp_path / "again" / "config.json").read_text())["prunekit_hidden_size"] == 5
    assert torch.equal(outputs_of(load_pruned(tmp_path / "again"), batch), again)


def test_unnarrowed_config_keeps_the_old_format(family, make_model, tmp_path):
    """Without removals or narrowing the saved config is what older prunekit wrote, and a config
    written by it (no flags, no prunekit_hidden_size) still loads."""
    model = apply_plan(make_model(family), PruningPlan([LayerPlan(heads=[1, 2], neurons=[]), LayerPlan()]))
    save_pruned(model, tmp_path / "pruned")
    path = tmp_path / "pruned" / "config.json"
    config = json.loads(path.read_text())
    assert config.get("prunekit_hidden_size") is None
    assert config["prunekit_layers"] == [{"num_heads": 2, "intermediate_size": 0},
                                         {"num_heads": H, "intermediate_size": D_FF}]  # fmt: skip
    config.pop("prunekit_hidden_size", None)
    path.write_text(json.dumps(config))
    reloaded = load_pruned(tmp_path / "pruned")
    assert get_adapter(reloaded).layer_shapes() == [LayerShape(2, 0), LayerShape(H, D_FF)]
    assert get_adapter(reloaded).hidden_size == D


def test_narrowed_sinusoidal_distilbert_reloads(make_batch, outputs_of, tmp_path):
    """DistilBERT's v5 init rebuilds sinusoidal position tables at config.dim on reload; a
    narrowed table is saved with the flag off and reloads with its sliced values."""
    from conftest import _randomize

    torch.manual_seed(0)
    config = DistilBertConfig(vocab_size=VOCAB, dim=D, n_layers=2, n_heads=H, hidden_dim=D_FF,
                              max_position_embeddings=POSITIONS, sinusoidal_pos_embds=True)  # fmt: skip
    model = apply_plan(_randomize(DistilBertForSequenceClassification(config)).eval(), PruningPlan(hidden=KEEP))
    batch = make_batch([9, 5, 2, 7], token_type_ids=False)
    expected = outputs_of(model, batch)
    save_pruned(model, tmp_path / "pruned")
    assert torch.equal(outputs_of(load_pruned(tmp_path / "pruned"), batch), expected)


def test_hidden_size_that_does_not_match_the_weights_fails_to_load(make_model, tmp_path):
    folder = save_pruned(apply_plan(make_model("bert"), PruningPlan(hidden=KEEP)), tmp_path / "pruned")
    config = json.loads((folder / "config.json").read_text())
    config["prunekit_hidden_size"] = len(KEEP) - 1
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(Exception, match="pruned"):
        load_model(folder)


# ---- resize -------------------------------------------------------------------------------------
@pytest.mark.parametrize("task", TASK_HEADS)
def test_resize_rebuilds_a_pruned_architecture(family, task, make_model, batch, outputs_of):
    pruned = apply_plan(make_model(family, task, num_layers=3), combined_plan())
    shapes = get_adapter(pruned).layer_shapes()
    fresh = make_model(family, task, num_layers=3, seed=5)
    adapter = get_adapter(fresh)
    adapter.resize(shapes, hidden_size=len(KEEP))
    assert adapter.layer_shapes() == shapes and adapter.hidden_size == len(KEEP)
    assert {k: v.shape for k, v in fresh.state_dict().items()} == {k: v.shape for k, v in pruned.state_dict().items()}
    fresh.load_state_dict(pruned.state_dict(), strict=True)
    assert torch.equal(outputs_of(fresh, batch), outputs_of(pruned, batch))


def test_resize_rejects_what_cannot_be_built(make_model):
    adapter = get_adapter(make_model("bert"))
    with pytest.raises(ValueError, match="only be narrowed"):
        adapter.resize([LayerShape(H, D_FF)] * 2, hidden_size=D + 1)
    adapter.resize([LayerShape(0, D_FF, attention_removed=True), LayerShape(H, D_FF)])
    with pytest.raises(ValueError, match="cannot be rebuilt"):
        adapter.resize([LayerShape(H, D_FF), LayerShape(H, D_FF)])


# ---- accounting ----------------------------------------------------------------------------------
def accounting_plan() -> PruningPlan:
    """Layer 0: 2 heads, 10 neurons; layer 1: attention removed, FFN emptied (bias kept); d' = 12."""
    return PruningPlan([LayerPlan(heads=[0, 2], neurons=list(range(10))),
                        LayerPlan(attention_removed=True, neurons=[])], hidden=KEEP)  # fmt: skip


def test_counts_of_a_narrowed_bert_by_hand(make_model):
    """d' = 12, 2 heads of d_h 8 (16 wide), 10 neurons, s = 10.

    Parameters: embeddings 99·12 + 128·12 + 2·12 + LN 24 = 2772; layer 0 attention q/k/v
    3·(12·16 + 16) = 624, out 16·12 + 12 = 204, LN 24; FFN up 12·10 + 10 = 130, down 10·12 + 12
    = 132, LN 24; layer 1: removed attention 0, emptied FFN bias 12 + LN 24; pooler 12·32 + 32 =
    416 (its output stays 32 wide); classifier 32·3 + 3 = 99. Total 4461; prunable (the linears and
    the emptied sublayer's bias) 624 + 204 + 130 + 132 + 12 = 1102; encoder 1174.
    FLOPs: per head 2·(3·10·12·8 + 2·10²·8 + 10·8·12) = 10880, per neuron 2·2·10·12 = 480:
    2·10880 + 10·480 = 26560.
    """
    model = apply_plan(make_model("bert"), accounting_plan())
    assert count_params(model) == 4461
    assert count_params(model, encoder_only=True) == 1174
    assert count_prunable_params(model) == 1102
    cost = unit_costs(get_adapter(model), 0, 10)
    assert (cost.head, cost.neuron) == (10880, 480)
    assert unit_costs(get_adapter(model), 0, 10, hidden_size=D).head == 23680  # the unpruned width
    assert count_flops(model, 10) == 26560
    # The reference stays the unpruned architecture: 2·(4·23680 + 37·1280).
    assert full_flops(model, 10) == 284160 == full_flops(make_model("bert"), 10)
    assert full_prunable_params(model) == 13322 == count_prunable_params(make_model("bert"))
    rows = layer_flops(model, 10)
    assert rows[1] == {"heads": 0, "neurons": 0, "attn_flops": 0.0, "ffn_flops": 0.0, "attention_removed": True}
    assert "attention_removed" not in rows[0] and "ffn_removed" not in rows[0]


def test_prunable_params_of_every_family(family, make_model):
    """L·(4d² + 4d) + L·(2·d·d_ff + d + d_ff) = 2·(4096 + 128) + 2·(2368 + 69) = 13322 unpruned;
    after the plan: as in the BERT hand count, which depends only on the encoder linears."""
    model = make_model(family, "qa")
    assert count_prunable_params(model) == full_prunable_params(model) == 13322
    apply_plan(model, accounting_plan())
    assert count_prunable_params(model) == 1102
    assert full_prunable_params(model) == 13322
    # The encoder's own parameters: the prunable ones plus the 2·12 of each present LayerNorm.
    assert count_params(model, encoder_only=True) == 1102 + 3 * 2 * len(KEEP)
    assert count_flops(model, 10) == 26560


def test_full_prunable_params_of_bert_base():
    """85,017,600 for 12 layers of BERT-base (cofi.md §8 pitfall 15), i.e. 7,084,800 per layer."""
    config = BertConfig(vocab_size=10, hidden_size=768, num_hidden_layers=1, num_attention_heads=12,
                        intermediate_size=3072, max_position_embeddings=8)  # fmt: skip
    model = BertForSequenceClassification(config)
    assert full_prunable_params(model) == 85_017_600 // 12 == count_prunable_params(model)
