"""OPT and GPT-2 as prunekit families (issue 10, items 1, 2, 5, 6): tiny random models built here,
float32. Masked == physically pruned within 1e-5 for random plans with emptied sublayers (an
emptied attention in layer 0 included, which the key/value cache must survive); emptied pre-norm
sublayers compute X + b_out, post-norm (OPT-350m's placement) LN(X + b_out), removed ones X;
greedy generation with and without the cache equals the masked model's; pruned folders reload
identically with ``load_pruned`` and the Auto classes; GPT-2's saved folder keeps GPT-2's own
weight names and Conv1D shapes; counted FLOPs and parameters equal a hand count and meet a budget
through the method contract."""

from __future__ import annotations

import copy
import json
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from builders import labelled_sample, layer_io, macs_by_hand, masked, outputs, padded_pair, spread_out, view
from safetensors import safe_open
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoModelForSequenceClassification,
    GPT2Config,
    GPT2ForSequenceClassification,
    GPT2LMHeadModel,
    OPTConfig,
    OPTForCausalLM,
    OPTForSequenceClassification,
)

from prunekit.core.accounting import (
    count_flops,
    count_params,
    count_prunable_params,
    full_flops,
    full_prunable_params,
)
from prunekit.core.masks import apply_masks
from prunekit.core.surgery import LayerPlan, PruningPlan, apply_plan, narrow_hidden, remove_sublayer
from prunekit.families import BlockFacts, LayerShape, adapter_class, get_adapter
from prunekit.families.gpt2 import FusedQKV, GPT2Adapter, to_conv_form
from prunekit.families.opt import OPTAdapter, OPTBlock
from prunekit.io.folders import load_pruned, save_pruned
from prunekit.tasks import TaskData

D, H, D_H, D_FF, VOCAB, LAYERS = 32, 4, 8, 37, 99, 3
ATOL = 1e-5
# Variants: OPT pre-norm (125m and up), post-norm (350m's placement), with project_in/out (350m's
# word_embed_proj_dim), without biases; GPT-2, and GPT-2 with its layer-wise attention scaling
# and the eager kernel that reorders and upcasts.
VARIANTS = ("opt", "opt-post", "opt-proj", "opt-nobias", "gpt2", "gpt2-scaled")
PAD = {"opt": 1, "gpt2": 0}
NORM_WEIGHTS = ("ln_1.weight", "ln_2.weight", "ln_f.weight", "layer_norm.weight")


def family_of(variant: str) -> str:
    return variant.split("-")[0]


def build(variant: str = "opt", head: str = "causal_lm", seed: int = 0):
    family = family_of(variant)
    if family == "opt":
        config = OPTConfig(
            vocab_size=VOCAB, hidden_size=D, num_hidden_layers=LAYERS, num_attention_heads=H, ffn_dim=D_FF,
            max_position_embeddings=64, do_layer_norm_before=variant != "opt-post",
            word_embed_proj_dim=24 if variant == "opt-proj" else D, enable_bias=variant != "opt-nobias",
            pad_token_id=PAD["opt"], num_labels=3, dropout=0.0, attention_dropout=0.0,
        )  # fmt: skip
        cls = OPTForCausalLM if head == "causal_lm" else OPTForSequenceClassification
    else:
        scaled = variant == "gpt2-scaled"
        config = GPT2Config(
            vocab_size=VOCAB, n_embd=D, n_layer=LAYERS, n_head=H, n_inner=D_FF, n_positions=64,
            pad_token_id=PAD["gpt2"], num_labels=3, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
            scale_attn_by_inverse_layer_idx=scaled, reorder_and_upcast_attn=scaled,
        )  # fmt: skip
        if scaled:
            config._attn_implementation = "eager"
        cls = GPT2LMHeadModel if head == "causal_lm" else GPT2ForSequenceClassification
    torch.manual_seed(seed)
    return spread_out(cls(config), NORM_WEIGHTS)


def make_batch(variant: str, seed: int = 0) -> dict[str, torch.Tensor]:
    return padded_pair(VOCAB, seed, low=2, pad=PAD[family_of(variant)])


def random_plan(seed: int) -> PruningPlan:
    """Per layer a different case, rotating with the seed: random heads with real scales and random
    neurons; an emptied attention (in layer 0 for seed 0) with random neurons; random heads and an
    emptied FFN."""
    gen = torch.Generator().manual_seed(seed)

    def some(n: int) -> list[int]:
        return sorted(torch.randperm(n, generator=gen)[: int(torch.randint(1, n, (1,), generator=gen))].tolist())

    layers = []
    for layer in range(LAYERS):
        case = (layer + seed) % 3
        heads = [] if case == 0 else some(H)
        neurons = [] if case == 2 else some(D_FF)
        scales = (torch.rand(H, generator=gen) + 0.5) if case == 1 else None
        layers.append(LayerPlan(heads=heads, neurons=neurons, head_scales=scales))
    return PruningPlan(layers=layers)


# ---- the causal LM's body and output head ---------------------------------------------------------
@pytest.mark.parametrize("variant", VARIANTS)
def test_the_causal_lm_splits_where_its_logits_are_made(variant):
    """causal_lm_parts: the output head applied to the body's final hidden states gives the model's
    logits, bit for bit, for the stock model (GPT-2's Conv1D, OPT's own layers), in working form and
    pruned (OPT's project_out included); a classification model has no such split."""
    model = build(variant)
    inputs = make_batch(variant)
    forms = [copy.deepcopy(model)]  # stock: read, never converted
    forms.append(get_adapter(model).model)
    pruned = copy.deepcopy(model)
    apply_plan(get_adapter(pruned), random_plan(1))
    forms.append(pruned)
    with torch.no_grad():
        for form in forms:
            parts = adapter_class(form).causal_lm_parts(form)
            # Without a cache, as the split runs (GPT-2's eager reordered attention differs by 2e-6
            # with one: another mask path inside transformers).
            assert torch.equal(parts.head(parts.final_hidden(**inputs)), form(**inputs, use_cache=False).logits)
    assert type(forms[0].base_model.h[0].attn.c_attn).__name__ == "Conv1D" if variant.startswith("gpt2") else True
    with pytest.raises(ValueError, match="not a causal LM"):
        classifier = build(variant, head="sequence_classification")
        adapter_class(classifier).causal_lm_parts(classifier)


# ---- the adapters state the family facts ---------------------------------------------------------
def test_the_adapters_state_the_family_facts():
    opt = get_adapter(build("opt"))
    assert isinstance(opt, OPTAdapter) and opt.pooled_token == "last" and not opt.grouped_kv
    assert opt.facts == BlockFacts("pre", "layernorm", frozenset({"query", "key", "value", "out", "up", "down"}))
    assert not opt.facts.offset_absorbed and opt.tied_embeddings
    assert opt.final_norm() is opt.model.model.decoder.final_layer_norm
    assert (opt.head_dim, opt.full_num_heads, opt.full_intermediate_size, opt.hidden_size) == (D_H, H, D_FF, D)
    assert opt.layer_shapes()[0] == LayerShape(H, D_FF) and not opt.is_pruned()
    post = get_adapter(build("opt-post"))
    assert post.facts.norm_placement == "post" and post.facts.offset_absorbed and post.final_norm() is None
    assert get_adapter(build("opt-nobias")).facts.biases == frozenset()
    proj = get_adapter(build("opt-proj"))
    assert proj.hidden_size == D and proj.embedding_tables()[0] is proj.model.model.decoder.project_in
    gpt2 = get_adapter(build("gpt2"))
    assert isinstance(gpt2, GPT2Adapter) and gpt2.pooled_token == "last" and gpt2.tied_embeddings
    assert gpt2.facts == opt.facts and gpt2.final_norm() is gpt2.model.transformer.ln_f
    assert (gpt2.head_dim, gpt2.full_num_heads, gpt2.full_intermediate_size) == (D_H, H, D_FF)
    parts = gpt2.attention(0)
    assert parts.query.weight.shape == (H * D_H, D) and parts.out.weight.shape == (D, H * D_H)
    assert not get_adapter(build("gpt2", "sequence_classification")).tied_embeddings


@pytest.mark.parametrize("variant", ["opt", "opt-post", "gpt2"])
def test_the_view_changes_nothing_the_model_computes_or_saves(variant):
    """GPT-2 is viewed in linear form (Conv1D -> nn.Linear, c_attn split into q, k, v) and OPT's
    layers as OPTBlock: outputs and the state dict (names, shapes, values) stay bit for bit."""
    model = build(variant)
    batch = make_batch(variant)
    before_out = outputs(model, batch)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    get_adapter(model)
    after = model.state_dict()
    assert list(after) == list(before)
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert torch.equal(outputs(model, batch), before_out)
    if variant == "gpt2":
        assert isinstance(model.transformer.h[0].attn.c_attn, FusedQKV)
        assert after["transformer.h.0.attn.c_attn.weight"].shape == (D, 3 * D)  # Conv1D's (in, out)
        fresh = build(variant, seed=5)
        fresh.load_state_dict(after)  # a stock GPT-2 takes the viewed model's state dict
        assert torch.equal(outputs(fresh, batch), before_out)
    else:
        assert all(type(block) is OPTBlock for block in model.model.decoder.layers)
    get_adapter(model)  # idempotent
    assert torch.equal(outputs(model, batch), before_out)


# ---- masked == pruned ------------------------------------------------------------------------------
@pytest.mark.parametrize("head", ["causal_lm", "sequence_classification"])
@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("seed", range(3))
def test_pruned_equals_masked(variant, head, seed):
    model = build(variant, head, seed=seed)
    plan = random_plan(seed)
    batch = make_batch(variant, seed)
    expected = masked(model, plan, batch)
    pruned = apply_plan(view(copy.deepcopy(model)), plan)
    torch.testing.assert_close(outputs(pruned, batch), expected, atol=ATOL, rtol=0)
    assert not torch.allclose(expected, outputs(model, batch), atol=1e-3)  # the plan changed something
    shapes = get_adapter(pruned).layer_shapes()
    assert [(s.num_heads, s.intermediate_size) for s in shapes] == [
        (len(step.heads), len(step.neurons)) for step in plan.layers]
    if family_of(variant) == "gpt2":  # the kept heads' widths, where GPT2Attention reads them
        for block, step in zip(pruned.transformer.h, plan.layers, strict=True):
            if step.heads:
                assert block.attn.split_size == len(step.heads) * D_H and block.attn.head_dim == D_H
    else:
        for block, step in zip(pruned.model.decoder.layers, plan.layers, strict=True):
            if step.heads:
                assert block.self_attn.num_heads == len(step.heads) and block.self_attn.head_dim == D_H


def _bias(model, variant: str, layer: int, kind: str) -> torch.Tensor | None:
    if family_of(variant) == "gpt2":
        block = model.transformer.h[layer]
        return block.attn.c_proj.bias if kind == "attn" else block.mlp.c_proj.bias
    block = model.model.decoder.layers[layer]
    return block.self_attn.out_proj.bias if kind == "attn" else block.fc2.bias


@pytest.mark.parametrize("variant", ["opt", "opt-nobias", "opt-post", "gpt2"])
def test_emptied_and_removed_sublayers(variant):
    """An emptied sublayer adds its output bias, exactly: pre-norm X + b (X without a bias),
    post-norm LN(X + b); a removed one is the identity in both placements."""
    model = build(variant, seed=3)
    get_adapter(model)
    batch = make_batch(variant, 3)
    b_attn, b_ffn = _bias(model, variant, 1, "attn"), _bias(model, variant, 1, "ffn")
    plan = PruningPlan(layers=[LayerPlan(), LayerPlan(heads=[], neurons=[]), LayerPlan()])
    expected = masked(model, plan, batch)
    pruned = apply_plan(view(copy.deepcopy(model)), plan)
    x, y = layer_io(pruned, 1, batch)
    if variant == "opt-post":
        block = pruned.model.decoder.layers[1]

        def ln(v, norm):
            return F.layer_norm(v, norm.normalized_shape, norm.weight, norm.bias, norm.eps)

        assert torch.equal(y, ln(ln(x + b_attn, block.self_attn_layer_norm) + b_ffn, block.final_layer_norm))
    elif b_attn is None:
        assert torch.equal(y, x)
    else:
        assert torch.equal(y, (x + b_attn) + b_ffn)
    torch.testing.assert_close(outputs(pruned, batch), expected, atol=ATOL, rtol=0)
    adapter = get_adapter(pruned)
    assert adapter.attention(1) is None and adapter.ffn(1) is None and not adapter.is_removed(1, "attn")
    for kind in ("attn", "ffn"):
        remove_sublayer(adapter, 1, kind)
    x, y = layer_io(pruned, 1, batch)
    assert torch.equal(y, x) and adapter.is_removed(1, "attn") and adapter.is_removed(1, "ffn")
    assert adapter.sublayer_bias(1, "attn") is None


# ---- generation --------------------------------------------------------------------------------------
@pytest.mark.parametrize("variant", ["opt", "opt-post", "gpt2", "gpt2-scaled"])
@pytest.mark.parametrize("seed", [0, 1])
def test_greedy_generation_with_and_without_the_cache(variant, seed):
    """The pruned causal LM (per-layer heads, emptied sublayers: seed 0 empties layer 0's attention,
    whose cache layer then only records the length) generates the masked model's greedy tokens, with
    and without the key/value cache; so does a layer whose attention was removed."""
    model = build(variant, "causal_lm", seed=11 + seed)
    plan = random_plan(seed)
    pruned = apply_plan(view(copy.deepcopy(model)), plan)
    prompt = torch.randint(2, VOCAB, (2, 5), generator=torch.Generator().manual_seed(seed))
    options = {"max_new_tokens": 8, "do_sample": False, "pad_token_id": PAD[family_of(variant)]}
    cached = pruned.generate(prompt, use_cache=True, **options)
    assert torch.equal(cached, pruned.generate(prompt, use_cache=False, **options))
    head_masks, neuron_masks = plan.masks(view(model))
    with apply_masks(get_adapter(model), head_masks, neuron_masks):
        assert torch.equal(cached, model.generate(prompt, use_cache=True, **options))
    # Left padding: the model reads positions and the mask's past length from the cache.
    padded = {"input_ids": prompt.clone(), "attention_mask": torch.ones_like(prompt)}
    padded["attention_mask"][1, :2] = 0
    padded["input_ids"][1, :2] = options["pad_token_id"]
    cached = pruned.generate(**padded, use_cache=True, **options)
    assert torch.equal(cached, pruned.generate(**padded, use_cache=False, **options))
    with apply_masks(get_adapter(model), head_masks, neuron_masks):
        assert torch.equal(cached, model.generate(**padded, use_cache=True, **options))
    assert_incremental_equals_full(pruned, cached)
    remove_sublayer(get_adapter(pruned), 0, "attn")
    assert torch.equal(pruned.generate(prompt, use_cache=True, **options),
                       pruned.generate(prompt, use_cache=False, **options))
    assert_incremental_equals_full(pruned, cached)


def _cache_of(output):
    cache = getattr(output, "cache", None)
    return cache if cache is not None else output.past_key_values


def assert_incremental_equals_full(model, tokens: torch.Tensor) -> None:
    """Feeding tokens one step at a time through the cache (the model takes positions and the
    past length from it) gives the logits of one full forward pass."""
    with torch.no_grad():
        full = model(tokens).logits
        out = model(tokens[:, :4], use_cache=True)
        steps, cache = [out.logits], _cache_of(out)
        for t in range(4, tokens.shape[1]):
            out = model(tokens[:, t:t + 1], cache=cache, use_cache=True)
            steps.append(out.logits)
            cache = _cache_of(out)
    torch.testing.assert_close(torch.cat(steps, 1), full, atol=ATOL, rtol=0)


# ---- save and reload ---------------------------------------------------------------------------------
def _pruned_for_saving(variant: str, head: str):
    """Per-layer heads and neurons, an emptied and a removed sublayer, a narrowed (tied) stream."""
    model = build(variant, head, seed=10)
    pruned = apply_plan(view(copy.deepcopy(model)), random_plan(1))
    adapter = get_adapter(pruned)
    remove_sublayer(adapter, 2, "ffn")
    narrow_hidden(adapter, [i for i in range(D) if i % 5])
    return pruned


@pytest.mark.parametrize("head", ["causal_lm", "sequence_classification"])
@pytest.mark.parametrize("variant", ["opt", "opt-post", "opt-proj", "gpt2"])
def test_save_and_reload(tmp_path, variant, head):
    pruned = _pruned_for_saving(variant, head)
    batch = make_batch(variant, 10)
    expected = outputs(pruned, batch)
    state = {k: v.clone() for k, v in pruned.state_dict().items()}
    shapes = get_adapter(pruned).layer_shapes()
    save_pruned(pruned, tmp_path / "out")
    auto = AutoModelForCausalLM if head == "causal_lm" else AutoModelForSequenceClassification
    by_auto = auto.from_pretrained(tmp_path / "out").eval()
    by_prunekit = load_pruned(tmp_path / "out")
    for reloaded in (by_prunekit, by_auto):
        assert type(reloaded).__name__ == "Pruned" + type(build(variant, head)).__name__
        reloaded_state = reloaded.state_dict()
        assert list(reloaded_state) == list(state)
        assert all(torch.equal(reloaded_state[k], state[k]) for k in state)  # every weight, bit for bit
        assert get_adapter(copy.deepcopy(reloaded)).layer_shapes() == shapes
        assert get_adapter(copy.deepcopy(reloaded)).tied_embeddings == (head == "causal_lm")
    assert torch.equal(outputs(by_prunekit, batch), expected)
    if family_of(variant) == "gpt2":
        # Auto builds stock Conv1D modules (the same function, another matmul layout): bit for bit
        # what the pruned model computes in that form.
        stock = copy.deepcopy(pruned)
        to_conv_form(stock)
        assert torch.equal(outputs(by_auto, batch), outputs(stock, batch))
        torch.testing.assert_close(outputs(by_auto, batch), expected, atol=1e-6, rtol=0)
    else:
        assert torch.equal(outputs(by_auto, batch), expected)


def test_a_saved_gpt2_folder_has_gpt2_weight_names_and_shapes(tmp_path):
    pruned = _pruned_for_saving("gpt2", "causal_lm")
    save_pruned(pruned, tmp_path / "out")
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert config["model_type"] == "prunekit_gpt2" and config["architectures"] == ["PrunedGPT2LMHeadModel"]
    with safe_open(str(tmp_path / "out" / "model.safetensors"), "pt") as f:
        shapes = {key: tuple(f.get_slice(key).get_shape()) for key in f.keys()}
    assert not any(".q." in key or ".k." in key or ".v." in key for key in shapes)
    d = D - 7  # narrowed
    for layer, shape in enumerate(config["prunekit_layers"]):
        prefix = f"transformer.h.{layer}."
        if shape["num_heads"]:
            width = shape["num_heads"] * D_H
            assert shapes[prefix + "attn.c_attn.weight"] == (d, 3 * width)
            assert shapes[prefix + "attn.c_proj.weight"] == (width, d)
        if shape["intermediate_size"]:
            assert shapes[prefix + "mlp.c_fc.weight"] == (d, shape["intermediate_size"])
            assert shapes[prefix + "mlp.c_proj.weight"] == (shape["intermediate_size"], d)


def test_a_reloaded_model_prunes_again(tmp_path):
    """A reloaded GPT-2 (stock Conv1D modules) is viewed in linear form again and prunes further."""
    pruned = apply_plan(view(build("gpt2", seed=4)), PruningPlan(layers=[LayerPlan(heads=[0, 1, 3], neurons=list(range(30)))]))
    save_pruned(pruned, tmp_path / "out")
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "out").eval()
    plan = PruningPlan(layers=[LayerPlan(heads=[0, 2], neurons=[1, 4, 9]), LayerPlan(heads=[]), LayerPlan()])
    batch = make_batch("gpt2", 4)
    expected = masked(reloaded, plan, batch)
    again = apply_plan(view(copy.deepcopy(reloaded)), plan)
    torch.testing.assert_close(outputs(again, batch), expected, atol=ATOL, rtol=0)
    assert [s.num_heads for s in get_adapter(again).layer_shapes()] == [2, 0, H]


# ---- accounting and budgets ------------------------------------------------------------------------
@pytest.mark.parametrize("variant", ["opt", "gpt2"])
def test_flops_and_parameters_equal_a_hand_count(variant):
    model = build(variant)
    s = 16
    per_layer = 4 * D * D + 4 * D + 2 * D * D_FF + D_FF + D  # q, k, v, out with biases; fc1, fc2 with biases
    assert full_prunable_params(view(model)) == count_prunable_params(view(model)) == LAYERS * per_layer == 19983
    assert full_flops(view(model), s) == count_flops(view(model), s) == 2 * macs_by_hand(model, s)
    # A tied head is one parameter, counted once.
    assert count_params(view(model)) == sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())
    pruned = apply_plan(view(copy.deepcopy(model)), random_plan(1))
    assert count_flops(view(pruned), s) == 2 * macs_by_hand(pruned, s)
    linears = [m for block in get_adapter(pruned).layers() for m in block.modules() if isinstance(m, torch.nn.Linear)]
    emptied_biases = D * sum(1 for step in random_plan(1).layers for units in (step.heads, step.neurons) if not units)
    assert count_prunable_params(view(pruned)) == sum(p.numel() for m in linears for p in m.parameters()) + emptied_biases
    opt_nobias = build("opt-nobias")
    assert full_prunable_params(view(opt_nobias)) == LAYERS * (4 * D * D + 2 * D * D_FF)


def classification_sample(variant: str, num_batches: int = 3, seed: int = 0) -> SimpleNamespace:
    return labelled_sample(VOCAB, num_batches, seed, low=2, pad=PAD[family_of(variant)])


@pytest.mark.parametrize("method", ["magnitude", "random", "kwon", "kprune"])
@pytest.mark.parametrize("variant", ["opt", "opt-post", "gpt2"])
def test_methods_meet_the_budget(variant, method):
    """Through the method contract (view, data, config) -> (plan, log): the teacher is unchanged,
    the pruned model meets the FLOPs budget as counted, and (methods without re-fitted weights)
    computes the plan's masked model."""
    from prunekit.methods.baselines import MagnitudeConfig, RandomConfig, magnitude, random_prune
    from prunekit.methods.kprune import KpruneConfig, kprune
    from prunekit.methods.kwon import KwonConfig, kwon

    run, config = {
        "magnitude": (magnitude, MagnitudeConfig(keep_flops=0.5)),
        "random": (random_prune, RandomConfig(keep_flops=0.5, seed=3)),
        "kwon": (kwon, KwonConfig(keep_flops=0.5)),
        "kprune": (kprune, KpruneConfig(keep_flops=0.5)),
    }[method]
    teacher = build(variant, "sequence_classification", seed=8)
    before = {k: v.clone() for k, v in teacher.state_dict().items()}
    plan, log = run(get_adapter(teacher), TaskData("classification", classification_sample(variant, seed=8)), config)
    assert all(torch.equal(before[k], v) for k, v in teacher.state_dict().items())
    pruned = apply_plan(view(copy.deepcopy(teacher)), plan)
    seq_len = log["seq_len"]
    assert get_adapter(pruned).is_pruned()
    assert 0.3 * full_flops(view(teacher), seq_len) < count_flops(view(pruned), seq_len) <= 0.5 * full_flops(view(teacher), seq_len)
    batch = make_batch(variant, 8)
    if method == "kprune":  # re-fitted output weights: no masked form
        assert torch.isfinite(outputs(pruned, batch)).all()
    else:
        torch.testing.assert_close(outputs(pruned, batch), masked(teacher, plan, batch), atol=ATOL, rtol=0)


@pytest.mark.parametrize("variant", ["opt", "gpt2"])
def test_a_plan_carries_trained_weights(variant):
    """A plan's trained weights (CoFi's) are a state dict of the pruned model, GPT-2's in its own
    Conv1D names and layout: apply_plan loads them into the linear form exactly."""
    plan = random_plan(2)
    target = apply_plan(view(build(variant, seed=6)), plan)
    with torch.no_grad():
        for param in target.parameters():
            param.add_(0.01)
    plan.weights = {k: v.clone() for k, v in target.state_dict().items()}
    rebuilt = apply_plan(view(build(variant, seed=6)), plan)
    state = rebuilt.state_dict()
    assert all(torch.equal(state[k], v) for k, v in plan.weights.items())
    batch = make_batch(variant, 6)
    assert torch.equal(outputs(rebuilt, batch), outputs(target, batch))


# ---- remote code: plain transformers, no prunekit ----------------------------------------------------
# A fresh interpreter in which `import prunekit` fails (the venv has an editable install, so a clean
# sys.path alone would still find it): every folder loads from the code saved in it, and generates.
REMOTE_LOADER = r"""
import json, sys
sys.modules["prunekit"] = None
try:
    import prunekit  # noqa: F401
    raise SystemExit("prunekit was importable")
except ImportError:
    pass
import torch
import transformers
results = {}
for name, (folder, auto, batch_file, pad) in json.loads(sys.argv[1]).items():
    model = getattr(transformers, auto).from_pretrained(folder, trust_remote_code=True).eval()
    batch = torch.load(batch_file)
    with torch.no_grad():
        result = {"out": model(**batch).logits, "class": type(model).__name__, "module": type(model).__module__,
                  "config": type(model.config).__name__}
    if auto == "AutoModelForCausalLM":
        options = {"max_new_tokens": 6, "do_sample": False, "pad_token_id": pad}
        result["cached"] = model.generate(**batch, use_cache=True, **options)
        result["uncached"] = model.generate(**batch, use_cache=False, **options)
    results[name] = result
assert not [m for m, v in sys.modules.items() if m.split(".")[0] == "prunekit" and v is not None], "prunekit loaded"
torch.save(results, sys.argv[2])
"""


def _load_without_prunekit(jobs: dict, tmp_path) -> dict:
    import os
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env.update(HF_MODULES_CACHE=str(tmp_path / "hf_modules"), HF_HUB_OFFLINE="1")
    script, out_file = tmp_path / "load.py", tmp_path / "out.pt"
    script.write_text(REMOTE_LOADER)
    done = subprocess.run([sys.executable, "-I", str(script), json.dumps(jobs), str(out_file)], cwd=tmp_path,
                          env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    return torch.load(out_file)


def test_pruned_folders_load_in_plain_transformers_without_prunekit(tmp_path):
    """OPT (pre-norm, post-norm, projected) and GPT-2, causal LM and classifier, with per-layer heads
    and neurons, emptied (layer 0's attention included) and removed sublayers and a narrowed stream:
    the remote code rebuilds each, with the outputs and greedy tokens (cache on and off) of the
    model prunekit reloads."""
    jobs, expected = {}, {}
    for variant in ("opt", "opt-post", "opt-proj", "gpt2"):
        for head in ("causal_lm", "sequence_classification"):
            name = f"{variant}-{head}"
            pruned = _pruned_for_saving(variant, head)
            remove_sublayer(get_adapter(pruned), 0, "attn")  # the cache must survive a removed layer 0
            folder = save_pruned(pruned, tmp_path / name)
            config = json.loads((folder / "config.json").read_text())
            family = family_of(variant)
            assert set(config["auto_map"]) == {"AutoConfig", "AutoModel", "AutoModelForCausalLM",
                                               "AutoModelForSequenceClassification"}
            assert (folder / f"modeling_prunekit_{family}.py").is_file()
            readme = (folder / "README.md").read_text()
            assert f"modeling_prunekit_{family}.py" in readme
            assert ("AutoModelForCausalLM" in readme) == (head == "causal_lm")
            batch = make_batch(variant, 12)
            if head == "causal_lm":  # generation continues every row at its end: left padding
                batch = {k: torch.stack([v[0], v[1].roll(3)]) for k, v in batch.items()}
            torch.save(batch, tmp_path / f"{name}.pt")
            auto = AutoModelForCausalLM if head == "causal_lm" else AutoModelForSequenceClassification
            reference = auto.from_pretrained(folder).eval()  # prunekit's class: stock modules, as remote code
            want = {"out": outputs(reference, batch), "pruned": outputs(pruned, batch), "mask": batch["attention_mask"]}
            if head == "causal_lm":
                options = {"max_new_tokens": 6, "do_sample": False, "pad_token_id": PAD[family]}
                want["cached"] = pruned.generate(**batch, use_cache=True, **options)
            expected[name] = want
            jobs[name] = (str(folder), auto.__name__, str(tmp_path / f"{name}.pt"), PAD[family])
    loaded = _load_without_prunekit(jobs, tmp_path)
    for name, want in expected.items():
        got = loaded[name]
        if got["out"].dim() == 3:  # causal LM: the real positions only
            got["out"] = got["out"][want["mask"].bool()]
        assert got["class"].startswith("Pruned") and got["module"].split(".")[0] != "prunekit", name
        # One config class name on every path (prunekit registers the remote code's classes).
        assert got["config"] == type(AutoConfig.from_pretrained(tmp_path / name)).__name__, name
        assert got["config"] == ("PrunekitGPT2Config" if name.startswith("gpt2") else "PrunekitOPTConfig"), name
        # Within 1e-6, not bit for bit: another process may use other thread counts in its matmuls.
        torch.testing.assert_close(got["out"], want["out"], atol=1e-6, rtol=0, msg=name)
        torch.testing.assert_close(got["out"], want["pruned"], atol=1e-6, rtol=0, msg=name)
        if "cached" in want:
            assert torch.equal(got["cached"], want["cached"]) and torch.equal(got["uncached"], want["cached"]), name


@pytest.mark.parametrize("variant", ["opt", "gpt2"])
def test_the_pipeline_prunes_a_decoder_classifier(variant, tmp_path, sst2_dir, tokenizer):
    """prune_and_save end to end on an OPT / GPT-2 sequence classifier folder (SST-2, Kprune): the
    report meets the budget and the folder reloads with the pruned model's outputs."""
    from prunekit.api import prune_and_save

    model = build(variant, "sequence_classification", seed=2)
    model.config.num_labels, model.config.pad_token_id = 2, tokenizer.pad_token_id
    model.score = torch.nn.Linear(D, 2, bias=False)
    teacher = tmp_path / "teacher"
    model.save_pretrained(teacher)
    tokenizer.save_pretrained(teacher)
    report = prune_and_save(teacher, tmp_path / "out", sst2_dir, method="kprune", keep_flops=0.5,
                            num_tokens=200, run_bench=False, device="cpu")
    assert report["flops_kept"] <= 0.5 + 1e-9
    reloaded = load_pruned(tmp_path / "out")
    assert get_adapter(reloaded).is_pruned()
    batch = {k: v for k, v in tokenizer(["a good movie", "bad it was not"], padding=True, return_tensors="pt").items()
             if k != "token_type_ids"}
    by_auto = AutoModelForSequenceClassification.from_pretrained(tmp_path / "out").eval()
    torch.testing.assert_close(outputs(by_auto, batch), outputs(reloaded, batch), atol=1e-6, rtol=0)


def test_gpt2_linear_form_survives_deep_copies():
    """A deep copy of a viewed GPT-2 saves and loads its own state, whatever happens to the original."""
    model = build("gpt2", seed=9)
    get_adapter(model)
    twin = copy.deepcopy(model)
    apply_plan(view(model), PruningPlan(layers=[LayerPlan(heads=[1], neurons=[2, 3])]))  # new modules in the original
    state = {k: v.clone() for k, v in twin.state_dict().items()}
    assert state["transformer.h.0.attn.c_attn.weight"].shape == (D, 3 * D)
    fresh = copy.deepcopy(twin)
    with torch.no_grad():
        for param in fresh.parameters():
            param.zero_()
    fresh.load_state_dict(state)
    assert all(torch.equal(v, state[k]) for k, v in fresh.state_dict().items())


@pytest.mark.parametrize("variant", ["opt", "opt-post", "opt-proj", "gpt2"])
def test_cofi_gates_equal_gate_surgery_with_hidden_dims(variant):
    """CoFi's gates (heads, neurons, whole sublayers, hidden dims) on OPT and GPT-2: the gated model
    computes what the folded, narrowed model computes; also post-norm without an embedding norm
    (OPT-350m's placement), whose summed embeddings the hidden gates scale."""
    from prunekit.core.masks import GateHolder, apply_gates
    from prunekit.methods.cofi import gate_plan
    from prunekit.methods.cofi.l0 import GateValues

    model = build(variant, seed=6)
    gen = torch.Generator().manual_seed(6)

    def units(n: int, closed: list[int]) -> torch.Tensor:
        values = torch.rand(n, generator=gen) + 0.5
        values[closed] = 0.0
        return values

    hidden = torch.ones(D)
    hidden[[1, 7, 8, 20]] = 0.0
    values = GateValues(
        head=[units(H, [0]), units(H, [1, 3]), units(H, [])],
        mha=[torch.tensor(0.7), torch.tensor(1.2), torch.tensor(0.0)],
        neuron=[units(D_FF, [2, 3]), units(D_FF, list(range(D_FF))), units(D_FF, [5])],
        ffn=[torch.tensor(0.9), torch.tensor(1.0), torch.tensor(1.1)],
        hidden=hidden,
        attn_on=[True, True, False],
        ffn_on=[True, False, True],
    )
    batch = make_batch(variant, 6)
    holder = GateHolder()
    with apply_gates(get_adapter(model), holder):
        holder.values = values
        expected = outputs(model, batch)
    pruned = copy.deepcopy(model)
    apply_plan(view(pruned), gate_plan(view(pruned), values))
    adapter = get_adapter(pruned)
    assert adapter.hidden_size == D - 4 and adapter.tied_embeddings
    assert adapter.is_removed(2, "attn") and adapter.is_removed(1, "ffn")
    torch.testing.assert_close(outputs(pruned, batch), expected, atol=ATOL, rtol=0)
