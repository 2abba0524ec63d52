"""The model view does not assume a family (issue 9, item 3): the Llama adapter over tiny Llama
models (pre-norm, RMSNorm, no biases, a gated FFN, grouped key/value heads, a head size that is not
hidden / heads, tied embeddings; ``prunekit.families.llama``) runs through masks, surgery, accounting and
CoFi's gates unchanged. Masked == physically pruned within 1e-5 (float32) for random plans with
emptied sublayers, whole key/value groups removed and query heads removed inside a group; counted
FLOPs and parameters equal a hand count; emptied and removed sublayers are exact in both norm
placements (Llama: X + b or X; BERT: LN(X + b))."""

from __future__ import annotations

import copy
import importlib
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from builders import labelled_sample, layer_io, macs_by_hand, masked, outputs, padded_pair, spread_out
from transformers import LlamaConfig, LlamaForCausalLM, LlamaForSequenceClassification

from prunekit.core.accounting import (
    count_flops,
    count_params,
    count_prunable_params,
    full_flops,
    full_prunable_params,
)
from prunekit.core.masks import GateHolder, apply_gates, apply_masks, expand_group_mask
from prunekit.core.surgery import (
    LayerPlan,
    PruningPlan,
    apply_plan,
    heads_of_groups,
    prune_kv_groups,
    remove_sublayer,
)
from prunekit.families import AttentionParts, BlockFacts, LayerShape, get_adapter
from prunekit.families.llama import LlamaAdapter
from prunekit.families.remote_code.modeling_prunekit_decoder import MappedKvAttention
from prunekit.methods.cofi import gate_plan
from prunekit.methods.cofi.l0 import GateValues
from prunekit.tasks import TaskData

D, H, H_KV, D_H, D_FF, VOCAB, LAYERS = 36, 6, 2, 12, 37, 99, 3  # groups of 3 query heads; d_h = 12 != d / H
ATOL = 1e-5


def build_llama(head: str = "causal_lm", seed: int = 0, biases: bool = False, tied: bool = True):
    config = LlamaConfig(
        vocab_size=VOCAB, hidden_size=D, intermediate_size=D_FF, num_hidden_layers=LAYERS,
        num_attention_heads=H, num_key_value_heads=H_KV, head_dim=D_H, max_position_embeddings=64,
        attention_bias=biases, mlp_bias=biases, tie_word_embeddings=tied and head == "causal_lm",
        pad_token_id=0, num_labels=3,
    )  # fmt: skip
    torch.manual_seed(seed)
    return spread_out((LlamaForCausalLM if head == "causal_lm" else LlamaForSequenceClassification)(config))


def llama_batch(seed: int = 0) -> dict[str, torch.Tensor]:
    return padded_pair(VOCAB, seed)


def hard_plan(seed: int) -> PruningPlan:
    """Per layer a different hard case: query heads removed unevenly inside groups (with real
    scales), a whole key/value group removed, an emptied attention; FFNs random, emptied or full."""
    gen = torch.Generator().manual_seed(seed)
    group = [list(range(g * 3, g * 3 + 3)) for g in range(H_KV)]
    # Uneven groups: 1 and 2, 1 and 3 (as many heads as 2 even groups of 2: the map must say which),
    # 2 and 1 of 3 query heads kept.
    counts = [(1, 2), (1, 3), (2, 1)][seed % 3]
    uneven = [h for g, n in enumerate(counts) for h in torch.randperm(3, generator=gen)[:n].add(3 * g).tolist()]
    cases = [
        sorted(uneven),
        group[1 - seed % 2],  # the other group removed whole
        [],  # emptied attention
    ]
    ffn_cases = [torch.randperm(D_FF, generator=gen)[: 5 + seed].tolist(), list(range(D_FF)), []]
    layers = []
    for layer in range(LAYERS):
        heads = cases[(layer + seed) % 3]
        scales = (torch.randn(H, generator=gen) + 1.5).tolist() if layer == 0 else None
        layers.append(LayerPlan(heads=heads, head_scales=scales, neurons=ffn_cases[(layer + 2 * seed) % 3]))
    return PruningPlan(layers=layers)


def test_the_adapter_states_the_family_facts():
    model = build_llama()
    adapter = get_adapter(model)
    assert isinstance(adapter, LlamaAdapter)
    assert adapter.facts == BlockFacts("pre", "rmsnorm", frozenset(), gated_ffn=True)
    assert not adapter.facts.offset_absorbed
    assert get_adapter(build_llama(biases=True)).facts.biases == {"query", "key", "value", "out", "up", "gate", "down"}
    assert adapter.head_dim == D_H != D // H
    assert (adapter.full_num_heads, adapter.full_num_kv_heads) == (H, H_KV)
    assert adapter.tied_embeddings and not get_adapter(build_llama(tied=False)).tied_embeddings
    assert adapter.embedding_layer_norm() is None and adapter.final_norm() is model.model.norm
    parts = adapter.attention(0)
    assert (parts.width, parts.kv_width) == (H * D_H, H_KV * D_H)
    assert parts.groups() == [[0, 1, 2], [3, 4, 5]]
    assert adapter.ffn(0).gate is model.model.layers[0].mlp.gate_proj
    assert adapter.layer_shapes()[0] == LayerShape(H, D_FF, num_kv_heads=H_KV, kv_map=(0, 0, 0, 1, 1, 1))
    assert not adapter.is_pruned()
    # BERT states its own facts (see conftest's tiny models).
    from conftest import build_tiny_model

    bert = get_adapter(build_tiny_model("bert"))
    assert bert.facts.norm_placement == "post" and bert.facts.offset_absorbed and not bert.grouped_kv
    assert bert.attention(0).groups() == [[0], [1], [2], [3]]


@pytest.mark.parametrize("family", ["llama", "bert"])
def test_a_sublayer_by_kind_gives_its_output_projection_and_units(family):
    from conftest import build_tiny_model

    adapter = get_adapter(build_llama() if family == "llama" else build_tiny_model("bert"))
    attn, ffn = adapter.sublayer(0, "attn"), adapter.sublayer(0, "ffn")
    assert attn is not None and ffn is not None
    assert attn.output is attn.out and ffn.output is ffn.down  # the linear whose input columns units own
    assert (attn.num_units, attn.unit_size) == (attn.num_heads, attn.head_dim)
    assert (ffn.num_units, ffn.unit_size) == (ffn.width, 1)
    for parts in (attn, ffn):
        assert parts.num_units * parts.unit_size == parts.output.in_features
        assert parts.columns(torch.arange(parts.num_units)).tolist() == list(range(parts.output.in_features))
    d_h = attn.head_dim
    assert attn.columns(torch.tensor([2, 0])).tolist() == [*range(2 * d_h, 3 * d_h), *range(d_h)]  # head by head
    assert ffn.columns(torch.tensor([3, 1])).tolist() == [3, 1]
    assert adapter.sublayer_bias(0, "ffn") is ffn.down.bias  # None for Llama: no biases
    apply_plan(adapter, PruningPlan(layers=[LayerPlan(heads=[], neurons=[])] + [LayerPlan()] * (adapter.num_layers - 1)))
    assert adapter.sublayer(0, "attn") is None and adapter.sublayer(0, "ffn") is None  # emptied
    remove_sublayer(adapter, 1, "ffn")
    assert adapter.sublayer(1, "ffn") is None
    with pytest.raises(ValueError, match="unknown sublayer kind 'mlp'"):
        adapter.sublayer(0, "mlp")


@pytest.mark.parametrize("head", ["causal_lm", "sequence_classification"])
@pytest.mark.parametrize("seed", range(3))
def test_pruned_equals_masked(head, seed):
    model = build_llama(head, seed=seed)
    plan = hard_plan(seed)
    batch = llama_batch(seed)
    expected = masked(model, plan, batch)
    pruned = apply_plan(copy.deepcopy(model), plan)
    torch.testing.assert_close(outputs(pruned, batch), expected, atol=ATOL, rtol=0)
    assert not torch.allclose(expected, outputs(model, batch), atol=1e-3)  # the plan changed something
    adapter = get_adapter(pruned)
    for layer, (shape, step) in enumerate(zip(adapter.layer_shapes(), plan.layers, strict=True)):
        kept_groups = sorted({h // 3 for h in step.heads})
        assert (shape.num_heads, shape.num_kv_heads, shape.intermediate_size) == (
            len(step.heads), len(kept_groups), len(step.neurons)), layer
        attn = adapter.attention(layer)
        if attn is not None:  # each kept query head still reads its own group's key/value head
            assert [kept_groups[kv] for kv in attn.kv_map] == [h // 3 for h in step.heads]
            assert attn.key.out_features == attn.value.out_features == len(kept_groups) * D_H
    # Uneven groups need the gathering attention; whole groups keep Llama's own module.
    modules = [type(block.self_attn) for block in pruned.model.layers]
    assert MappedKvAttention in modules
    assert any(m.__name__ == "LlamaAttention" for m in modules)


def test_whole_key_value_groups_with_their_query_heads():
    model = build_llama()
    adapter = get_adapter(model)
    assert heads_of_groups(adapter, 1, [1]) == [3, 4, 5]
    batch = llama_batch()
    plan = PruningPlan(layers=[LayerPlan(), LayerPlan(heads=[3, 4, 5]), LayerPlan()])
    expected = masked(model, plan, batch)
    pruned = copy.deepcopy(model)
    prune_kv_groups(get_adapter(pruned), 1, [1])
    torch.testing.assert_close(outputs(pruned, batch), expected, atol=ATOL, rtol=0)
    parts = get_adapter(pruned).attention(1)
    assert (parts.num_heads, parts.num_kv_heads, parts.kv_map) == (3, 1, (0, 0, 0))
    assert pruned.model.layers[1].self_attn.num_key_value_groups == 3  # Llama's own module, per layer
    with pytest.raises(ValueError, match="key/value groups"):
        prune_kv_groups(get_adapter(pruned), 1, [1])  # only group 0 is left


def test_a_plan_keeps_key_value_groups_whole_or_in_part():
    """``LayerPlan.kv_groups`` through the one surgery path: group 1 whole in layer 1, group 0 with
    only query head 1 in layer 2; heads outside the kept groups are refused."""
    model = build_llama()
    batch = llama_batch(3)
    by_groups = PruningPlan(layers=[LayerPlan(), LayerPlan(kv_groups=[1]), LayerPlan(kv_groups=[0], heads=[1])])
    by_heads = PruningPlan(layers=[LayerPlan(), LayerPlan(heads=[3, 4, 5]), LayerPlan(heads=[1])])
    pruned = apply_plan(copy.deepcopy(model), PruningPlan.from_dict(by_groups.to_dict()))
    torch.testing.assert_close(outputs(pruned, batch), masked(model, by_heads, batch), atol=ATOL, rtol=0)
    assert [get_adapter(pruned).attention(i).num_kv_heads for i in range(LAYERS)] == [2, 1, 1]
    with pytest.raises(ValueError, match=r"heads \[0\] lie outside the kept key/value groups \[1\]"):
        apply_plan(copy.deepcopy(model), PruningPlan(layers=[LayerPlan(kv_groups=[1], heads=[0, 3])]))


def test_a_group_mask_is_its_query_heads_mask():
    """Masking key/value group 0 of layer 0 (through its query heads) is pruning that group; the
    group mask is differentiable, so a method can score groups by its gradient."""
    model = build_llama(seed=12)
    adapter = get_adapter(model)
    parts = adapter.attention(0)
    group = torch.tensor([0.0, 1.0], requires_grad=True)
    head_mask = expand_group_mask(group, parts)
    assert head_mask.tolist() == [0.0, 0.0, 0.0, 1.0, 1.0, 1.0]
    batch = llama_batch(12)
    with apply_masks(adapter, {0: head_mask}):
        masked_out = model(**batch).logits
    masked_out.sum().backward()
    assert group.grad is not None and group.grad.abs().sum() > 0
    pruned = copy.deepcopy(model)
    prune_kv_groups(get_adapter(pruned), 0, [1])
    torch.testing.assert_close(outputs(pruned, batch), masked_out.detach()[batch["attention_mask"].bool()],
                               atol=ATOL, rtol=0)


@pytest.mark.parametrize("biases", [False, True])
def test_emptied_pre_norm_sublayers_compute_x_plus_bias(biases):
    """Pre-norm: an emptied sublayer adds its output bias, or exactly nothing without one; a removed
    one adds nothing. Bit-exact, and what the masked model computes."""
    model = build_llama(seed=3, biases=biases)
    batch = llama_batch(3)
    plan = PruningPlan(layers=[LayerPlan(), LayerPlan(heads=[], neurons=[]), LayerPlan()])
    expected = masked(model, plan, batch)
    b_attn = model.model.layers[1].self_attn.o_proj.bias
    b_ffn = model.model.layers[1].mlp.down_proj.bias
    pruned = apply_plan(copy.deepcopy(model), plan)
    x, y = layer_io(pruned, 1, batch)
    assert torch.equal(y, (x + b_attn) + b_ffn if biases else x)
    torch.testing.assert_close(outputs(pruned, batch), expected, atol=ATOL, rtol=0)
    adapter = get_adapter(pruned)
    assert adapter.attention(1) is None and adapter.ffn(1) is None and not adapter.is_removed(1, "attn")
    assert (adapter.sublayer_bias(1, "attn") is None) == (not biases)
    for kind in ("attn", "ffn"):
        remove_sublayer(adapter, 1, kind)
    x, y = layer_io(pruned, 1, batch)
    assert torch.equal(y, x) and adapter.is_removed(1, "attn") and adapter.is_removed(1, "ffn")
    assert adapter.sublayer_bias(1, "attn") is None


def test_emptied_post_norm_sublayers_compute_layer_norm_of_x_plus_bias(make_model, batch):
    """Post-norm (BERT): an emptied sublayer computes LN(X + b_out), a removed one X."""
    model = make_model("bert", "classification", num_layers=2, seed=4)
    block = model.bert.encoder.layer[1]
    ln1, b1 = block.attention.output.LayerNorm, block.attention.output.dense.bias
    ln2, b2 = block.output.LayerNorm, block.output.dense.bias
    plan = PruningPlan(layers=[LayerPlan(), LayerPlan(heads=[], neurons=[])])
    pruned = apply_plan(copy.deepcopy(model), plan)
    x, y = layer_io(pruned, 1, batch)
    y = y[0] if isinstance(y, tuple) else y

    def ln(v, norm):
        return F.layer_norm(v, norm.normalized_shape, norm.weight, norm.bias, norm.eps)

    assert torch.equal(y, ln(ln(x + b1, ln1) + b2, ln2))
    adapter = get_adapter(pruned)
    for kind in ("attn", "ffn"):
        remove_sublayer(adapter, 1, kind)
    x, y = layer_io(pruned, 1, batch)
    assert torch.equal(y[0] if isinstance(y, tuple) else y, x)


def test_flops_and_parameters_equal_a_hand_count():
    model = build_llama(biases=False)
    s = 16
    # Unpruned, per layer: Q 36·72, K and V 36·24 each, O 72·36, FFN 3·36·37 weights; no biases.
    per_layer = 36 * 72 + 2 * 36 * 24 + 72 * 36 + 3 * 36 * 37
    assert full_prunable_params(model) == count_prunable_params(model) == LAYERS * per_layer == 32724
    attention = 6 * (s * 36 * 12 + 2 * s * s * 12 + s * 12 * 36) + 2 * (2 * s * 36 * 12)
    assert full_flops(model, s) == count_flops(model, s) == 2 * LAYERS * (attention + 37 * 3 * s * 36)
    assert count_flops(model, s) == 2 * macs_by_hand(model, s)
    # A tied output head is one parameter: counted once.
    assert count_params(model) == sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())
    assert model.lm_head.weight is model.model.embed_tokens.weight

    pruned = apply_plan(copy.deepcopy(model), hard_plan(1))
    assert count_flops(pruned, s) == 2 * macs_by_hand(pruned, s)
    linears = [m for block in pruned.model.layers for m in block.modules() if isinstance(m, torch.nn.Linear)]
    assert count_prunable_params(pruned) == sum(p.numel() for m in linears for p in m.parameters())

    with_biases = build_llama(biases=True)
    bias_count = 72 + 2 * 24 + 36 + 2 * 37 + 36  # q, k, v, o, gate and up, down
    assert full_prunable_params(with_biases) == LAYERS * (per_layer + bias_count)
    emptied = apply_plan(copy.deepcopy(with_biases), PruningPlan(layers=[LayerPlan(heads=[], neurons=[])]))
    # An emptied sublayer keeps only its output bias (d each).
    assert count_prunable_params(emptied) == (LAYERS - 1) * (per_layer + bias_count) + 2 * D


def test_resize_rebuilds_a_pruned_architecture():
    """The saved per-layer shapes (query heads, key/value heads and their map, FFN width) rebuild
    the architecture, which then takes the pruned weights and computes the same."""
    model = build_llama(seed=5)
    pruned = apply_plan(copy.deepcopy(model), hard_plan(2))
    shapes = get_adapter(pruned).layer_shapes()
    assert LayerShape(**shapes[0].to_dict()) == shapes[0]  # survives the config's JSON form
    fresh = build_llama(seed=9)
    get_adapter(fresh).resize(shapes)
    assert get_adapter(fresh).layer_shapes() == shapes
    fresh.load_state_dict(pruned.state_dict())
    batch = llama_batch(5)
    assert torch.equal(outputs(fresh, batch), outputs(pruned, batch))


def test_gates_equal_gate_surgery_with_hidden_dims_in_pre_norm():
    """CoFi's gates (query heads, neurons, sublayers, hidden dims) on a pre-norm RMSNorm model with
    a tied head: the gated model computes what the folded, narrowed model computes."""
    model = build_llama(seed=6)
    gen = torch.Generator().manual_seed(6)

    def units(n: int, closed: list[int]) -> torch.Tensor:
        values = torch.rand(n, generator=gen) + 0.5
        values[closed] = 0.0
        return values

    hidden = torch.ones(D)
    hidden[[1, 7, 8, 20]] = 0.0
    values = GateValues(
        head=[units(H, [0, 4]), units(H, [3, 4, 5]), units(H, [])],
        mha=[torch.tensor(0.7), torch.tensor(1.2), torch.tensor(0.0)],
        neuron=[units(D_FF, [2, 3]), units(D_FF, list(range(D_FF))), units(D_FF, [5])],
        ffn=[torch.tensor(0.9), torch.tensor(1.0), torch.tensor(1.1)],
        hidden=hidden,
        attn_on=[True, True, False],
        ffn_on=[True, False, True],
    )
    batch = llama_batch(6)
    holder = GateHolder()
    with apply_gates(get_adapter(model), holder):
        holder.values = values
        expected = outputs(model, batch)
        with torch.no_grad():
            states = model(**batch, output_hidden_states=True).hidden_states
    # The residual stream (what layer distillation reads) is 0 in the closed dims, from the embeddings on.
    assert all(torch.equal(h[..., hidden == 0], torch.zeros_like(h[..., hidden == 0])) for h in states)
    pruned = copy.deepcopy(model)
    apply_plan(pruned, gate_plan(pruned, values))
    adapter = get_adapter(pruned)
    assert adapter.hidden_size == D - 4 and adapter.tied_embeddings  # narrowed, still tied
    assert adapter.is_removed(2, "attn") and adapter.is_removed(1, "ffn")
    assert adapter.attention(1).num_kv_heads == 1  # group 1 closed whole
    torch.testing.assert_close(outputs(pruned, batch), expected, atol=ATOL, rtol=0)


def test_bert_family_keeps_one_key_value_head_per_query_head(make_model):
    adapter = get_adapter(make_model("bert", "classification"))
    parts = adapter.attention(0)
    grouped = AttentionParts(parts.query, parts.key, parts.value, parts.out, num_heads=4, head_dim=8,
                             num_kv_heads=2)
    with pytest.raises(ValueError, match="its own key/value head"):
        adapter.set_attention(0, grouped)


# ---- the methods read the family's facts -------------------------------------------------------------
def llama_sample(num_batches: int = 3, seed: int = 0) -> SimpleNamespace:
    return labelled_sample(VOCAB, num_batches, seed)


def test_kwon_on_the_test_family(monkeypatch):
    """Kwon et al. end to end on grouped heads, RMSNorm, pre-norm, no biases: no offset column in
    the least squares (a constant is not removed by any norm here), the last real token fitted in
    the last layer, the result is its plan's masked model, and the counted FLOPs meet the budget."""
    kwon_module = importlib.import_module("prunekit.methods.kwon")  # the package exports the function

    model = build_llama("sequence_classification", seed=7)
    teacher = copy.deepcopy(model)
    sample = llama_sample()
    offsets, real = [], kwon_module._unit_system
    monkeypatch.setattr(kwon_module, "_unit_system", lambda *a, **k: offsets.append(k["offset"]) or real(*a, **k))
    plan, log = kwon_module.kwon(model, TaskData("classification", sample), kwon_module.KwonConfig(keep_flops=0.6))
    apply_plan(model, plan)
    assert offsets and not any(offsets)
    assert any(step["status"] == "tuned" for step in log["tuning"])
    rows = kwon_module._rows(sample.batches[0], True, "last")
    assert rows.sum(1).tolist() == [1] * 4
    assert rows.float().argmax(1).tolist() == (sample.batches[0]["attention_mask"].sum(1) - 1).tolist()
    batch = llama_batch(7)
    torch.testing.assert_close(outputs(model, batch), masked(teacher, plan, batch), atol=ATOL, rtol=0)
    seq_len = log["seq_len"]
    assert count_flops(model, seq_len) <= 0.6 * full_flops(teacher, seq_len)


@pytest.mark.parametrize("method", ["kprune", "magnitude"])
def test_other_methods_meet_the_budget_on_the_test_family(method):
    """Kprune and magnitude prune grouped heads (key/value heads reserved in full, see
    accounting.kv_head_flops) and meet the FLOPs budget as counted."""
    from prunekit.methods.baselines import MagnitudeConfig, magnitude
    from prunekit.methods.kprune import KpruneConfig, kprune

    model = build_llama("sequence_classification", seed=8)
    teacher = copy.deepcopy(model)
    sample = llama_sample(seed=8)
    data = TaskData("classification", sample)
    if method == "kprune":
        plan, log = kprune(model, data, KpruneConfig(keep_flops=0.5))
    else:
        plan, log = magnitude(model, data, MagnitudeConfig(keep_flops=0.5))
    apply_plan(model, plan)
    seq_len = log["seq_len"]
    assert get_adapter(model).is_pruned()
    assert 0.3 * full_flops(teacher, seq_len) < count_flops(model, seq_len) <= 0.5 * full_flops(teacher, seq_len)
    assert torch.isfinite(outputs(model, llama_batch(8))).all()


@pytest.mark.parametrize("head", ["causal_lm", "sequence_classification"])
def test_save_and_reload_through_the_adapter_alone(tmp_path, head):
    """A family is its adapter: registered (and its pruned classes made at import), a pruned model with
    per-layer query heads, key/value heads (uneven groups included), FFN widths, an emptied and a
    removed sublayer and a narrowed, tied residual stream saves and reloads bit-identically."""
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    from prunekit.core.surgery import narrow_hidden
    from prunekit.io.folders import load_pruned, save_pruned

    model = build_llama(head, seed=10)
    pruned = apply_plan(copy.deepcopy(model), hard_plan(1))
    adapter = get_adapter(pruned)
    remove_sublayer(adapter, 2, "ffn")
    narrow_hidden(adapter, [i for i in range(D) if i % 5])
    batch = llama_batch(10)
    expected = outputs(pruned, batch)
    save_pruned(pruned, tmp_path / "out")
    shapes = get_adapter(pruned).layer_shapes()
    auto = AutoModelForCausalLM if head == "causal_lm" else AutoModelForSequenceClassification
    for reloaded in (load_pruned(tmp_path / "out"), auto.from_pretrained(tmp_path / "out").eval()):
        assert type(reloaded).__name__.startswith("Pruned")
        assert get_adapter(reloaded).layer_shapes() == shapes
        assert get_adapter(reloaded).hidden_size == D - 8
        assert get_adapter(reloaded).tied_embeddings == (head == "causal_lm")
        assert torch.equal(outputs(reloaded, batch), expected)


def test_greedy_generation_with_and_without_the_cache():
    """The pruned causal LM (per-layer key/value heads, uneven groups, emptied sublayers) generates
    the masked model's greedy tokens, with and without the key/value cache."""
    model = build_llama("causal_lm", seed=11)
    plan = hard_plan(1)
    pruned = apply_plan(copy.deepcopy(model), plan)
    prompt = torch.randint(1, VOCAB, (2, 5), generator=torch.Generator().manual_seed(0))
    options = {"max_new_tokens": 8, "do_sample": False, "pad_token_id": 0}
    cached = pruned.generate(prompt, use_cache=True, **options)
    assert torch.equal(cached, pruned.generate(prompt, use_cache=False, **options))
    head_masks, neuron_masks = plan.masks(model)
    with apply_masks(get_adapter(model), head_masks, neuron_masks):
        assert torch.equal(cached, model.generate(prompt, use_cache=True, **options))


def test_latency_table_times_a_decoder_layer():
    """The latency table calls one layer through the adapter, so a decoder layer (which needs its
    rotary position embeddings) is timed too; n query heads kept = the first n."""
    from prunekit.methods.lut import measure_latency_table

    table = measure_latency_table(build_llama(), batch_size=2, seq_len=8, neuron_step=16, warmup=0, repeats=1)
    assert table.attn_units == list(range(H + 1)) and table.ffn_units == [0, 16, 32, 37]
    assert table.head_dim == D_H and len(table.attn_ms) == H + 1
