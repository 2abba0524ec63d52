"""Issue 10 for the Llama-layout families (Llama, Mistral, Qwen2, Qwen3, and issue 22's Gemma 2,
Gemma 3 and Phi-3), causal-LM and sequence-classification heads, tiny random float32 models built here: masked == physically pruned
within 1e-5 for random plans with uneven and whole key/value groups, emptied and removed
sublayers (layer 0's attention included); greedy generation with and without the cache equal to
the masked model's; save/reload identical through prunekit.load_pruned, the Auto classes after
``import prunekit`` and plain transformers with remote code in a process where prunekit cannot be
imported; FLOPs and parameters by hand; --uniform folders are stock classes loading without
prunekit; unsupported decoder families get the clear error; a smoke test on llama-wiki-gqa."""

from __future__ import annotations

import copy
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import transformers
from builders import NORM_WEIGHTS, WITHOUT_PRUNEKIT, masked, outputs, padded_pair, spread_out, view
from transformers import (
    AutoModelForCausalLM,
    Gemma2Config,
    Gemma3TextConfig,
    LlamaConfig,
    MistralConfig,
    Phi3Config,
    Qwen2Config,
    Qwen3Config,
)

import prunekit
from prunekit.core.accounting import count_flops, count_params, count_prunable_params
from prunekit.core.masks import apply_masks
from prunekit.core.surgery import LayerPlan, PruningPlan, apply_plan, remove_sublayer
from prunekit.families import get_adapter
from prunekit.families.remote_code.modeling_prunekit_decoder import EmptyAttention, MappedKvAttention
from prunekit.io.folders import load_pruned, save_pruned

D, H, H_KV, D_H, D_FF, VOCAB, LAYERS = 36, 6, 2, 12, 37, 97, 3  # groups of 3; d_h != d / H
ATOL = 1e-5
FAMILIES = ["llama", "mistral", "qwen2", "qwen3", "gemma2", "gemma3", "phi3"]
CONFIGS = {"llama": LlamaConfig, "mistral": MistralConfig, "qwen2": Qwen2Config, "qwen3": Qwen3Config,
           "gemma2": Gemma2Config, "gemma3": Gemma3TextConfig, "phi3": Phi3Config}
PREFIX = {"llama": "Llama", "mistral": "Mistral", "qwen2": "Qwen2", "qwen3": "Qwen3", "gemma2": "Gemma2",
          "gemma3": "Gemma3", "phi3": "Phi3"}
HEADS = {"causal_lm": "ForCausalLM", "sequence_classification": "ForSequenceClassification"}
MODEL_TYPES = {"gemma3": "gemma3_text"}  # Gemma 3's language model alone; "gemma3" is the multimodal one
WINDOW = 4  # the sliding window of the families that have one: shorter than every test prompt


def class_name(family: str, head: str) -> str:
    """The transformers class: Gemma 3's classifier is Gemma3TextForSequenceClassification."""
    if family == "gemma3" and head == "sequence_classification":
        return "Gemma3TextForSequenceClassification"
    return PREFIX[family] + HEADS[head]


def model_type(family: str) -> str:
    return MODEL_TYPES.get(family, family)


def config_name(family: str) -> str:
    return CONFIGS[family].__name__


def alternating(layers: int) -> list[str]:
    """Sliding-window and global layers in turn, layer 0 sliding (as Gemma 2 and 3 start)."""
    return ["sliding_attention" if i % 2 == 0 else "full_attention" for i in range(layers)]


def build(family: str, head: str = "causal_lm", seed: int = 0, layers: int = LAYERS):
    extra = {
        # Every bias Llama can have, and Llama 3.x's rotary scaling.
        "llama": {"attention_bias": True, "mlp_bias": True, "rope_parameters": {
            "rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
            "original_max_position_embeddings": 16, "rope_theta": 500000.0}},
        "mistral": {"sliding_window": 6},  # shorter than the test sequences: the window matters
        "qwen2": {},  # q/k/v biases by construction
        "qwen3": {"attention_bias": False},
        # Soft-capped attention and final logits, query scaling by a scalar of its own, sliding
        # windows shorter than the prompts on every other layer.
        "gemma2": {"sliding_window": WINDOW, "layer_types": alternating(layers), "attn_logit_softcapping": 4.0,
                   "final_logit_softcapping": 6.0, "query_pre_attn_scalar": 10},
        # Two rotary bases (sliding and global layers), per-head q/k norms, a window on every other layer.
        "gemma3": {"sliding_window": WINDOW, "layer_types": alternating(layers), "query_pre_attn_scalar": 10},
        # Partial rotary (half of each head, as Phi-4-mini's 0.75) and a sliding window on every layer.
        "phi3": {"sliding_window": WINDOW, "bos_token_id": 1, "eos_token_id": 2,
                 "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0, "partial_rotary_factor": 0.5}},
    }[family]
    config = CONFIGS[family](
        vocab_size=VOCAB, hidden_size=D, intermediate_size=D_FF, num_hidden_layers=layers,
        num_attention_heads=H, num_key_value_heads=H_KV, head_dim=D_H, max_position_embeddings=64,
        tie_word_embeddings=head == "causal_lm", pad_token_id=0, num_labels=3, **extra,
    )  # fmt: skip
    torch.manual_seed(seed)
    # Gemma's norms scale by (1 + w): its weights are stored centred on 0, so they are drawn as
    # other vectors are (N(0, 0.2)), not near 1.
    norm_weights = () if family.startswith("gemma") else NORM_WEIGHTS
    return spread_out(getattr(transformers, class_name(family, head))(config), norm_weights)


def batch_of(seed: int = 0) -> dict[str, torch.Tensor]:
    return padded_pair(VOCAB, seed)


def random_plan(seed: int, layers: int = LAYERS) -> PruningPlan:
    """Per layer one of: query heads removed unevenly inside groups, a whole key/value group
    removed, the attention emptied, random heads; FFNs random, full or emptied. Layer 0 takes
    every case across seeds (its attention emptied is the hard case for the cache)."""
    gen = torch.Generator().manual_seed(seed)
    group_size = H // H_KV

    def uneven() -> list[int]:
        counts = [(1, 2), (1, 3), (2, 1), (3, 1)][int(torch.randint(4, (1,), generator=gen))]
        return sorted(h for g, n in enumerate(counts)
                      for h in torch.randperm(group_size, generator=gen)[:n].add(group_size * g).tolist())

    def whole_group() -> list[int]:
        g = int(torch.randint(H_KV, (1,), generator=gen))
        return list(range(g * group_size, (g + 1) * group_size))

    def random_heads() -> list[int]:
        return sorted(torch.randperm(H, generator=gen)[: int(torch.randint(1, H, (1,), generator=gen))].tolist())

    cases = [uneven, whole_group, list, random_heads]
    plan = []
    for layer in range(layers):
        heads = cases[(layer + seed) % len(cases)]()
        ffn = [lambda: sorted(torch.randperm(D_FF, generator=gen)[:9].tolist()), lambda: list(range(D_FF)), list]
        neurons = ffn[(layer + 2 * seed) % 3]()
        scales = (torch.rand(H, generator=gen) + 0.5) if layer == 1 else None
        plan.append(LayerPlan(heads=heads, neurons=neurons, head_scales=scales))
    return PruningPlan(layers=plan)


CASES = [(family, head) for family in FAMILIES for head in HEADS]


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize(("family", "head"), CASES)
def test_pruned_equals_masked(family, head, seed):
    model = build(family, head, seed=seed)
    plan = random_plan(seed)
    batch = batch_of(seed)
    want = masked(model, plan, batch)
    pruned = apply_plan(view(copy.deepcopy(model)), plan)
    torch.testing.assert_close(outputs(pruned, batch), want, atol=ATOL, rtol=0)
    assert torch.equal(outputs(model, batch), outputs(build(family, head, seed=seed), batch))  # teacher unchanged
    # The saved config records every layer: query heads, key/value heads and which one each reads.
    for layer, shape in zip(plan.layers, get_adapter(pruned).layer_shapes(), strict=True):
        kept_groups = sorted({h // (H // H_KV) for h in layer.heads})
        assert shape.num_heads == len(layer.heads) and shape.num_kv_heads == len(kept_groups)
        assert shape.intermediate_size == len(layer.neurons)


@pytest.mark.parametrize("family", FAMILIES)
def test_layer_idx_and_rotary_stay_each_layers_own(family):
    model = build(family, seed=1, layers=4)
    pruned = apply_plan(view(copy.deepcopy(model)), random_plan(0, layers=4))  # every attention case once
    for layer, block in enumerate(pruned.model.layers):
        assert block.self_attn.layer_idx == layer  # the cache slot of this layer
    assert any(isinstance(b.self_attn, MappedKvAttention) for b in pruned.model.layers)
    assert any(isinstance(b.self_attn, EmptyAttention) for b in pruned.model.layers)
    assert pruned.lm_head.weight is pruned.model.embed_tokens.weight  # still tied
    if family in ("qwen3", "gemma3"):  # the per-head q/k norms stay with every kept head, unchanged
        for block in pruned.model.layers:
            if not isinstance(block.self_attn, EmptyAttention):
                assert block.self_attn.q_norm.weight.shape == (D_H,)
    if family in ("gemma2", "gemma3"):  # each attention keeps its layer's window
        for layer, block in enumerate(pruned.model.layers):
            if not isinstance(block.self_attn, EmptyAttention):
                assert block.self_attn.sliding_window == (WINDOW if layer % 2 == 0 else None)


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("seed", [1, 2])  # seed 2 empties layer 0's attention
def test_greedy_generation_with_and_without_the_cache(family, seed):
    model = build(family, seed=seed)
    plan = random_plan(seed)
    pruned = apply_plan(view(copy.deepcopy(model)), plan)
    if seed == 2:
        assert isinstance(pruned.model.layers[0].self_attn, EmptyAttention)
    prompt = torch.randint(1, VOCAB, (2, 5), generator=torch.Generator().manual_seed(seed))
    options = {"max_new_tokens": 10, "do_sample": False, "pad_token_id": 0}
    cached = pruned.generate(prompt, use_cache=True, **options)
    assert torch.equal(cached, pruned.generate(prompt, use_cache=False, **options))
    head_masks, neuron_masks = plan.masks(view(model))
    with apply_masks(get_adapter(model), head_masks, neuron_masks):
        assert torch.equal(cached, model.generate(prompt, use_cache=True, **options))


@pytest.mark.parametrize("family", FAMILIES)
def test_generation_with_removed_sublayers(family):
    """A removed attention (layer 0's too) and a removed FFN: cached and uncached generation agree,
    and equal the masked model's, where a removed sublayer without bias is an emptied one."""
    model = build(family, seed=2)
    plan = PruningPlan(layers=[LayerPlan(attention_removed=True, neurons=list(range(0, D_FF, 2))),
                               LayerPlan(heads=[0, 4, 5], ffn_removed=True), LayerPlan(heads=[1])])
    pruned = apply_plan(view(copy.deepcopy(model)), plan)
    prompt = torch.randint(1, VOCAB, (1, 4), generator=torch.Generator().manual_seed(2))
    options = {"max_new_tokens": 8, "do_sample": False, "pad_token_id": 0}
    cached = pruned.generate(prompt, use_cache=True, **options)
    assert torch.equal(cached, pruned.generate(prompt, use_cache=False, **options))
    if family == "llama":  # Llama here has an output bias: removed (X) differs from emptied (X + b)
        return
    as_masks = PruningPlan(layers=[LayerPlan(heads=[], neurons=list(range(0, D_FF, 2))),
                                   LayerPlan(heads=[0, 4, 5], neurons=[]), LayerPlan(heads=[1])])
    head_masks, neuron_masks = as_masks.masks(view(model))
    with apply_masks(get_adapter(model), head_masks, neuron_masks):
        assert torch.equal(cached, model.generate(prompt, use_cache=True, **options))


# ---- save and reload: three paths ----------------------------------------------------------------
LOADER = WITHOUT_PRUNEKIT + r"""
results = {}
for name, (folder, auto, batch_file, remote) in json.loads(sys.argv[1]).items():
    model = getattr(transformers, auto).from_pretrained(folder, trust_remote_code=remote).eval()
    batch = torch.load(batch_file)
    with torch.no_grad():
        out = model(**batch).logits
    if out.dim() == 3:  # causal LM: the real positions only, as the test compares them
        out = out[batch["attention_mask"].bool()]
    generated = None
    if auto == "AutoModelForCausalLM":
        prompt = batch["input_ids"][:1, :4]
        options = {"max_new_tokens": 6, "do_sample": False, "pad_token_id": 0}
        generated = [model.generate(prompt, use_cache=c, **options) for c in (True, False)]
    results[name] = {"out": out, "class": type(model).__name__, "module": type(model).__module__,
                     "generated": generated, "config": type(model.config).__name__}
assert not [m for m, v in sys.modules.items() if m.split(".")[0] == "prunekit" and v is not None], "prunekit loaded"
torch.save(results, sys.argv[2])
"""


def plain_transformers_load(jobs: dict, tmp_path: Path) -> dict:
    """Load folders in a fresh interpreter where prunekit cannot be imported (isolated mode, no
    PYTHONPATH, and ``prunekit`` blocked in sys.modules against the venv's editable install)."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env.update(HF_MODULES_CACHE=str(tmp_path / "hf_modules"), HF_HUB_OFFLINE="1")
    script, out_file = tmp_path / "load.py", tmp_path / "out.pt"
    script.write_text(LOADER)
    done = subprocess.run([sys.executable, "-I", str(script), json.dumps(jobs), str(out_file)], cwd=tmp_path,
                          env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    return torch.load(out_file)


def hard_pruned(family: str, head: str):
    """Uneven groups, a whole group gone, layer 0's attention emptied, a removed FFN and a removed
    attention, and (causal LM) a narrowed tied residual stream."""
    from prunekit.core.surgery import narrow_hidden

    model = build(family, head, seed=7, layers=4)
    pruned = apply_plan(view(copy.deepcopy(model)), random_plan(3, layers=4))
    adapter = get_adapter(pruned)
    remove_sublayer(adapter, 1, "ffn")
    remove_sublayer(adapter, 2, "attn")
    if head == "causal_lm":
        narrow_hidden(adapter, [i for i in range(D) if i % 5])
    return pruned


def test_save_and_reload_through_all_three_paths(tmp_path):
    jobs, expected = {}, {}
    for family, head in CASES:
        name = f"{family}-{head}"
        pruned = hard_pruned(family, head)
        batch = batch_of(5)
        want = outputs(pruned, batch)
        folder = save_pruned(pruned, tmp_path / name)
        config = json.loads((folder / "config.json").read_text())
        assert config["model_type"] == f"prunekit_{model_type(family)}"
        auto = "AutoModelForCausalLM" if head == "causal_lm" else "AutoModelForSequenceClassification"
        assert config["auto_map"][auto] == f"modeling_prunekit_decoder.Pruned{class_name(family, head)}"
        assert (folder / "modeling_prunekit_decoder.py").is_file()
        assert "trust_remote_code=True" in (folder / "README.md").read_text()
        shapes = get_adapter(pruned).layer_shapes()
        assert config["auto_map"]["AutoConfig"] == f"configuration_prunekit.Prunekit{config_name(family)}"
        assert (folder / "configuration_prunekit.py").is_file()
        for reloaded in (load_pruned(folder), getattr(transformers, auto).from_pretrained(folder).eval()):
            # With prunekit imported no remote code runs: the classes are prunekit's own import of the
            # same modeling file, not the copy in the folder.
            assert type(reloaded).__module__ == "prunekit.families.remote_code.modeling_prunekit_decoder", name
            assert get_adapter(reloaded).layer_shapes() == shapes, name
            assert torch.equal(outputs(reloaded, batch), want), name
        generated = None
        if head == "causal_lm":
            prompt = batch["input_ids"][:1, :4]
            options = {"max_new_tokens": 6, "do_sample": False, "pad_token_id": 0}
            generated = [pruned.generate(prompt, use_cache=c, **options) for c in (True, False)]
            assert torch.equal(*generated)
        torch.save(batch, tmp_path / f"{name}.pt")
        expected[name] = (want, generated)
        jobs[name] = (str(folder), auto, str(tmp_path / f"{name}.pt"), True)
    loaded = plain_transformers_load(jobs, tmp_path)
    for name, (want, generated) in expected.items():
        assert loaded[name]["class"].startswith("Pruned") and loaded[name]["module"].split(".")[0] != "prunekit"
        # The config class has one name on every path: the remote code's, which prunekit registers.
        family = name.split("-")[0]
        assert loaded[name]["config"] == f"Prunekit{config_name(family)}", name
        assert type(transformers.AutoConfig.from_pretrained(tmp_path / name)).__name__ == loaded[name]["config"]
        torch.testing.assert_close(loaded[name]["out"], want, atol=1e-6, rtol=0, msg=name)
        if generated is not None:
            for got, ref in zip(loaded[name]["generated"], generated, strict=True):
                assert torch.equal(got, ref), name


@pytest.mark.parametrize(("key", "value", "words"), [
    ("num_kv_heads", 5, "num_kv_heads 5"),
    ("kv_map", [0, 0, 7], "kv_map [0, 0, 7]"),
])
def test_a_folder_with_broken_key_value_fields_is_refused_in_one_line(tmp_path, key, value, words):
    folder = save_pruned(apply_plan(view(build("llama")), random_plan(0)), tmp_path / "out")
    config = json.loads((folder / "config.json").read_text())
    config["prunekit_layers"][0][key] = value
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(prunekit.ModelError, match="prunekit_layers") as info:
        load_pruned(folder)
    assert words in str(info.value) and "\n" not in str(info.value)


# ---- accounting --------------------------------------------------------------------------------
def test_flops_and_parameters_equal_a_hand_count():
    """Qwen2 (biases on q/k/v only) pruned: per layer, q and o cost per query head, k and v per
    key/value head, the FFN three linears per neuron; attention scores s² per query head each."""
    model = build("qwen2", seed=4)
    plan = PruningPlan(layers=[LayerPlan(heads=[0, 1, 3], neurons=list(range(10))),  # 3 q heads, 2 kv groups
                               LayerPlan(heads=[3, 4, 5], neurons=[]),  # 1 group whole, FFN emptied
                               LayerPlan(heads=[], neurons=list(range(D_FF)))])  # attention emptied
    pruned = apply_plan(view(copy.deepcopy(model)), plan)
    s = 16
    heads, kv, neurons = [3, 3, 0], [2, 1, 0], [10, 0, D_FF]
    params = sum(
        h * D_H * (D + 1) + 2 * k * D_H * (D + 1) + h * D_H * D  # q (+bias), k, v (+bias), o (no bias)
        + 3 * n * D  # gate, up, down; no biases
        for h, k, n in zip(heads, kv, neurons, strict=True))
    assert count_prunable_params(view(pruned)) == params
    macs = sum(s * (h * D_H * D + 2 * k * D_H * D + h * D_H * D) + 2 * s * s * h * D_H + 3 * s * n * D
               for h, k, n in zip(heads, kv, neurons, strict=True))
    assert count_flops(view(pruned), s) == 2 * macs
    embeddings = VOCAB * D  # tied: counted once
    norms = D * (2 + 1 + 1 + 1)  # layer 0 keeps both norms, layers 1 and 2 one each, the final norm
    assert count_params(view(pruned)) == params + embeddings + norms


# ---- --uniform ---------------------------------------------------------------------------------
STOCK_LOADER = WITHOUT_PRUNEKIT + r"""
results = {}
for name, (folder, auto, batch_file) in json.loads(sys.argv[1]).items():
    model = getattr(transformers, auto).from_pretrained(folder).eval()  # no remote code
    batch = torch.load(batch_file)
    with torch.no_grad():
        out = model(**batch).logits
    results[name] = {"out": out[batch["attention_mask"].bool()] if out.dim() == 3 else out,
                     "class": type(model).__name__, "module": type(model).__module__}
torch.save(results, sys.argv[2])
"""


def test_uniform_folders_are_stock_classes(tmp_path):
    """A method's non-uniform plan, equalised within its cost, prunes every layer to the same
    query heads, key/value groups and FFN width; the folder is the family's stock class (no
    prunekit keys, no auto_map, no code files) and plain transformers without prunekit loads it
    with the pruned model's outputs."""
    from prunekit.core.accounting import unit_costs
    from prunekit.core.uniform import uniform_plan

    jobs, expected = {}, {}
    for family, head in CASES:
        name = f"{family}-{head}"
        model = build(family, head, seed=6, layers=4)
        plan = random_plan(6, layers=4)
        uniform, log = uniform_plan(get_adapter(model), plan, seq_len=16.0)
        pruned = apply_plan(view(copy.deepcopy(model)), uniform)
        shapes = get_adapter(pruned).layer_shapes()
        assert len(set(shapes)) == 1 and shapes[0].num_heads == log["query_heads"] >= 1, name
        assert shapes[0].num_kv_heads == log["kv_groups"] and shapes[0].intermediate_size == log["neurons"] >= 1
        cost = unit_costs(get_adapter(model), 0, 16.0)
        spent = 4 * (shapes[0].num_heads * cost.head + shapes[0].num_kv_heads * cost.kv_head
                     + shapes[0].intermediate_size * cost.neuron)
        assert spent == log["uniform_cost"] <= log["plan_cost"] and not log["over_budget"], name
        assert count_flops(view(pruned), 16.0) <= count_flops(view(apply_plan(view(copy.deepcopy(model)), plan)), 16.0) + 1e-6
        batch = batch_of(6)
        torch.testing.assert_close(outputs(pruned, batch), masked(model, uniform, batch), atol=ATOL, rtol=0)
        folder = save_pruned(pruned, tmp_path / name, uniform=True)
        config = json.loads((folder / "config.json").read_text())
        assert config["model_type"] == model_type(family) and config["architectures"] == [class_name(family, head)]
        assert not [key for key in config if key.startswith("prunekit") or key == "auto_map"], name
        assert (config["num_attention_heads"], config["num_key_value_heads"], config["intermediate_size"]) == (
            shapes[0].num_heads, shapes[0].num_kv_heads, shapes[0].intermediate_size)
        assert not list(folder.glob("*.py")) and "no prunekit and no remote code" in (folder / "README.md").read_text()
        torch.save(batch, tmp_path / f"{name}.pt")
        expected[name] = outputs(pruned, batch)
        auto = "AutoModelForCausalLM" if head == "causal_lm" else "AutoModelForSequenceClassification"
        jobs[name] = (str(folder), auto, str(tmp_path / f"{name}.pt"))
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env.update(HF_HUB_OFFLINE="1")
    (tmp_path / "load.py").write_text(STOCK_LOADER)
    done = subprocess.run([sys.executable, "-I", str(tmp_path / "load.py"), json.dumps(jobs), str(tmp_path / "o.pt")],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    loaded = torch.load(tmp_path / "o.pt")
    for name, want in expected.items():
        family, head = name.split("-")
        assert loaded[name]["class"] == class_name(family, head) and loaded[name]["module"].startswith("transformers")
        torch.testing.assert_close(loaded[name]["out"], want, atol=1e-6, rtol=0, msg=name)


def test_uniform_keeps_the_methods_units_first():
    """Where the method kept at least as many units as the uniform width, the uniform layer keeps
    a subset of them; its re-fitted weights stay only where the kept set did not change."""
    from prunekit.core.uniform import uniform_plan

    model = build("llama", seed=8)
    refit = torch.randn(D, 3 * D_H)
    plan = PruningPlan(layers=[LayerPlan(heads=[0, 1, 3], neurons=list(range(20)), attention_out_weight=refit),
                               LayerPlan(heads=[0, 1, 3], neurons=list(range(10, 30))),
                               LayerPlan(heads=[0, 1, 3], neurons=list(range(5, 25)))])
    uniform, log = uniform_plan(get_adapter(model), plan, seq_len=None)
    # Per layer the plan spends 3 query + 2 key/value heads (2·d·d_h parameters each) and 20
    # neurons (3·d each); the largest uniform attention within that is 4 heads' worth, (2, 1) or
    # (1, 3); the head left over pays for 2·d·d_h / 3·d = 8 more neurons.
    assert (log["kv_groups"], log["query_heads_per_group"]) in {(2, 1), (1, 3)}
    assert log["neurons"] == 20 + (2 * D * D_H) // (3 * D) == 28
    for step, before in zip(uniform.layers, plan.layers, strict=True):
        assert set(before.neurons) <= set(step.neurons) and len(step.neurons) == 28
        if log["kv_groups"] == 1:
            assert step.heads == [0, 1, 2] or set(step.heads) <= {0, 1, 3}
    same = uniform.layers[0].heads == [0, 1, 3]
    assert (uniform.layers[0].attention_out_weight is not None) == same
    assert log["refits_dropped"] == (0 if same else 1)


@pytest.mark.parametrize("method", ["magnitude", "kprune"])
def test_prune_with_uniform_writes_a_stock_folder(method, tokenizer, sst2_dir, tmp_path):
    """The pipeline: PruneOptions.uniform equalises the method's plan (logged under "uniform"), the
    budget is still met, and the saved folder is a stock LlamaForSequenceClassification."""
    from prunekit.api import prune
    from prunekit.core.accounting import full_flops

    config = LlamaConfig(vocab_size=tokenizer.vocab_size, hidden_size=D, intermediate_size=D_FF, num_hidden_layers=3,
                         num_attention_heads=H, num_key_value_heads=H_KV, head_dim=D_H, pad_token_id=0, num_labels=2,
                         max_position_embeddings=128)
    torch.manual_seed(0)
    teacher = transformers.LlamaForSequenceClassification(config).eval()
    result = prune(teacher, tokenizer, sst2_dir, task="sst2", method=method, keep_flops=0.6, num_tokens=300,
                   uniform=True)
    log = result.report["method_log"]["uniform"]
    shapes = get_adapter(result.model).layer_shapes()
    assert len(set(shapes)) == 1 and shapes[0].num_heads == log["query_heads"]
    seq_len = result.report["flops_seq_len"]
    assert count_flops(view(result.model), seq_len) <= 0.6 * full_flops(view(teacher), seq_len) + 1e-6
    folder = result.save(tmp_path / "out")
    config = json.loads((folder / "config.json").read_text())
    assert config["architectures"] == ["LlamaForSequenceClassification"] and "auto_map" not in config
    stock = transformers.LlamaForSequenceClassification.from_pretrained(folder).eval()
    batch = tokenizer(["a fine film", "dull"], padding=True, return_tensors="pt")
    batch = {k: batch[k] for k in ("input_ids", "attention_mask")}
    assert torch.equal(outputs(stock, batch), outputs(result.model, batch))


def test_cli_prune_uniform(tokenizer, sst2_dir, tmp_path):
    """`prunekit prune --uniform` writes a stock folder (here a Llama classifier on SST-2)."""
    from prunekit.cli import main

    config = LlamaConfig(vocab_size=tokenizer.vocab_size, hidden_size=D, intermediate_size=D_FF, num_hidden_layers=2,
                         num_attention_heads=H, num_key_value_heads=H_KV, head_dim=D_H, pad_token_id=0, num_labels=2,
                         max_position_embeddings=128)
    torch.manual_seed(0)
    transformers.LlamaForSequenceClassification(config).save_pretrained(tmp_path / "teacher")
    tokenizer.save_pretrained(tmp_path / "teacher")
    status = main(["prune", "--model", str(tmp_path / "teacher"), "--task", "sst2", "--data", str(sst2_dir),
                   "--method", "magnitude", "--keep-flops", "0.5", "--out", str(tmp_path / "out"), "--uniform",
                   "--no-eval", "--no-bench"])
    assert status == 0
    saved = json.loads((tmp_path / "out" / "config.json").read_text())
    assert saved["architectures"] == ["LlamaForSequenceClassification"] and saved["model_type"] == "llama"
    assert saved["num_attention_heads"] < H and "prunekit_layers" not in saved


def test_uniform_refuses_a_model_whose_layers_differ(tmp_path):
    pruned = apply_plan(view(build("qwen3")), random_plan(0))
    with pytest.raises(prunekit.ConfigError, match="--uniform needs every layer"):
        save_pruned(pruned, tmp_path / "out", uniform=True)
    assert not (tmp_path / "out").exists()


# ---- errors ------------------------------------------------------------------------------------
def _tiny(config_class, model_class, **kw):
    torch.manual_seed(0)
    return model_class(config_class(vocab_size=97, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                    intermediate_size=37, pad_token_id=0, bos_token_id=1, eos_token_id=2, **kw)).eval()


@pytest.mark.parametrize("name", ["GPTNeoXForCausalLM", "PhiForCausalLM"])
def test_an_unsupported_decoder_family_gets_the_clear_error(name):
    config_class = getattr(transformers, name.replace("ForCausalLM", "Config"))
    model = _tiny(config_class, getattr(transformers, name))
    with pytest.raises(prunekit.ModelError) as info:
        get_adapter(model)
    message = str(info.value)
    assert name in message and "LlamaForCausalLM" in message and "Qwen3ForCausalLM" in message
    assert "\n" not in message


# ---- the reference model -----------------------------------------------------------------------
REFERENCE = Path(__file__).parents[3] / "shared" / "models" / "llama-wiki-gqa"


@pytest.mark.skipif(not REFERENCE.is_dir(), reason="needs ../shared/models/llama-wiki-gqa")
def test_llama_wiki_gqa_prunes_saves_and_reloads(tmp_path):
    model = load_pruned(REFERENCE)
    adapter = get_adapter(model)
    assert (adapter.full_num_heads, adapter.full_num_kv_heads, adapter.head_dim) == (8, 2, 32)
    assert adapter.tied_embeddings
    gen = torch.Generator().manual_seed(0)
    plan = PruningPlan(layers=[
        LayerPlan(heads=sorted(torch.randperm(8, generator=gen)[:k].tolist()),
                  neurons=sorted(torch.randperm(768, generator=gen)[:n].tolist()))
        for k, n in zip([5, 4, 0, 8, 2, 3], [300, 0, 700, 768, 100, 50], strict=True)])
    tokens = torch.randint(3, 8192, (2, 24), generator=gen)
    batch = {"input_ids": tokens, "attention_mask": torch.ones_like(tokens)}
    want = masked(model, plan, batch)
    pruned = apply_plan(view(copy.deepcopy(model)), plan)
    torch.testing.assert_close(outputs(pruned, batch), want, atol=1e-4, rtol=1e-5)
    folder = save_pruned(pruned, tmp_path / "pruned")
    reloaded = load_pruned(folder)
    assert torch.equal(outputs(reloaded, batch), outputs(pruned, batch))
    assert AutoModelForCausalLM.from_pretrained(folder).config.prunekit_layers == reloaded.config.prunekit_layers
    # Its uniform form: only attention shapes LlamaConfig accepts (hidden 256 a multiple of the heads).
    from prunekit.core.uniform import uniform_plan

    _, log = uniform_plan(get_adapter(model), plan, seq_len=128.0)
    assert 256 % log["query_heads"] == 0 and not log["over_budget"]
