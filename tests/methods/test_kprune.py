"""prunekit.methods.kprune on tiny random models with a hand-built calibration sample: the budget is
never exceeded, runs are deterministic, the pruned model matches its plan (and, without weight tuning,
equals the masked original), bad configs are rejected, and the least-squares re-fit never makes a
sublayer's residual error worse (spec kprune_kwon.md §1.6-1.7, P5, P7)."""

from __future__ import annotations

import copy
import importlib

import pytest
import torch
from builders import view
from conftest import run_method

import prunekit
from prunekit import ConfigError, count_flops
from prunekit.core.accounting import full_flops
from prunekit.core.masks import apply_masks
from prunekit.core.surgery import LayerPlan, PruningPlan, apply_plan
from prunekit.families import LayerShape, get_adapter
from prunekit.methods import METHODS, get_method
from prunekit.methods.kprune import KpruneConfig, kprune
from prunekit.methods.layerwise import LayerRunner, capture_residual
from prunekit.tasks import TaskData, build_calibration_sample

H, D_H, D_FF = 4, 8, 37
BUDGETS = (0.9, 0.7, 0.5, 0.3, 0.1, 0.02)
# One head per family where a property does not depend on the pairing (keeps the file fast).
PAIRS = [("bert", "classification"), ("roberta", "regression"), ("distilbert", "qa")]


def run_kprune(model, sample, head: str, **options):
    return run_method(kprune, model, sample, head, KpruneConfig(**options))


def plan_shapes(plan: PruningPlan) -> list[LayerShape]:
    return [LayerShape(len(step.heads), len(step.neurons)) for step in plan.layers]


SWEEP = [("bert", keep) for keep in BUDGETS] + [(family, keep) for family in ("roberta", "distilbert") for keep in (0.5, 0.02)]


@pytest.mark.parametrize("head", ["classification", "regression", "qa"])
@pytest.mark.parametrize(("family", "keep"), SWEEP)
def test_counted_flops_fit_the_budget(family, head, make_model, make_sample, keep):
    """The whole sweep on BERT for every head; the other families at a middle and a tiny budget."""
    model = make_model(family, head)
    sample = make_sample(family)
    budget = keep * full_flops(view(model), sample.mean_length)
    plan, log = run_kprune(model, sample, head, keep_flops=keep)
    counted = count_flops(view(model), sample.mean_length)
    assert counted <= budget * (1 + 1e-9)
    assert counted == pytest.approx(sum(step["kept_flops"] for step in log["steps"]), rel=1e-9)
    assert get_adapter(model).layer_shapes() == plan_shapes(plan)
    if keep >= 0.5:  # a generous budget keeps something in the tiny model
        assert counted > 0


def test_budget_is_counted_at_the_configured_length(make_model, make_sample):
    model = make_model("bert")
    sample = make_sample("bert")
    plan, log = run_kprune(model, sample, "classification", keep_flops=0.4, seq_len=64.0)
    assert log["seq_len"] == 64.0
    assert count_flops(view(model), 64.0) <= 0.4 * full_flops(view(model), 64.0) * (1 + 1e-9)


def test_full_budget_keeps_every_unit(family, make_model, make_sample):
    model = make_model(family, "qa")
    plan, _ = run_kprune(model, make_sample(family), "qa", keep_flops=1.0)
    assert plan_shapes(plan) == [LayerShape(H, D_FF)] * 2
    assert not get_adapter(model).is_pruned()


def test_qa_with_padding_masked(make_model, make_sample):
    model = make_model("roberta", "qa")
    sample = make_sample("roberta")
    run_kprune(model, sample, "qa", keep_flops=0.4, mask_padding=True)
    assert count_flops(view(model), sample.mean_length) <= 0.4 * full_flops(view(model), sample.mean_length) * (1 + 1e-9)


@pytest.mark.parametrize(("family", "head"), PAIRS)
def test_same_seed_and_sample_give_identical_results(family, head, make_model, make_sample):
    original = make_model(family, head)
    sample = make_sample(family)
    first, second = copy.deepcopy(original), copy.deepcopy(original)
    plan_a, log_a = run_kprune(first, sample, head, keep_flops=0.4)
    plan_b, log_b = run_kprune(second, sample, head, keep_flops=0.4)
    assert plan_a == plan_b
    assert [s["kept_units"] for s in log_a["steps"]] == [s["kept_units"] for s in log_b["steps"]]
    state_a, state_b = first.state_dict(), second.state_dict()
    assert state_a.keys() == state_b.keys()
    assert all(torch.equal(state_a[k], state_b[k]) for k in state_a)


@pytest.mark.parametrize(("family", "head"), PAIRS)
def test_plan_describes_the_pruned_model(family, head, make_model, make_sample):
    model = make_model(family, head, num_layers=3)
    plan, log = run_kprune(model, make_sample(family), head, keep_flops=0.3)
    adapter = get_adapter(model)
    assert len(plan.layers) == 3
    assert adapter.layer_shapes() == plan_shapes(plan)
    assert [(s["layer"], s["sublayer"]) for s in log["steps"]] == [
        (layer, sub) for layer in range(3) for sub in ("attn", "ffn")
    ]
    for step in log["steps"]:
        assert step["kept"] == len(step["kept_units"]) <= step["total"]
        assert step["kept_units"] == sorted(set(step["kept_units"]))
    for step in plan.layers:
        assert step.head_scales is None and step.neuron_scales is None
        assert all(0 <= h < H for h in step.heads) and all(0 <= n < D_FF for n in step.neurons)


def test_without_tuning_the_pruned_model_is_the_masked_original(family, head, make_model, make_sample, outputs_of):
    original = make_model(family, head)
    sample = make_sample(family)
    model = copy.deepcopy(original)
    plan, log = run_kprune(model, sample, head, keep_flops=0.45, sublayer_tuning=False)
    assert all(step["tuning"] is None for step in log["steps"])
    assert get_adapter(model).layer_shapes() == plan_shapes(plan)
    head_masks, neuron_masks = plan.masks(view(original))
    for batch in sample.batches:
        with apply_masks(get_adapter(original), head_masks, neuron_masks):
            expected = outputs_of(original, batch)
        torch.testing.assert_close(outputs_of(model, batch), expected, atol=1e-5, rtol=0)
    # Replaying the plan on a fresh copy gives the same model.
    replayed = apply_plan(view(copy.deepcopy(original)), plan)
    for batch in sample.batches:
        torch.testing.assert_close(outputs_of(replayed, batch), outputs_of(model, batch), atol=1e-6, rtol=0)


def test_model_state_is_restored(make_model, make_sample):
    """The student shares the teacher's tensors until it cuts them: the teacher keeps its weights,
    its flags (also of tensors the student replaced) and its mode."""
    model = make_model("bert").train()
    before = {name: p.detach().clone() for name, p in model.state_dict().items()}
    plan, _ = kprune(view(model), TaskData(kind="classification", sample=make_sample("bert")), KpruneConfig(keep_flops=0.5))
    assert any(len(step.heads) < H or len(step.neurons) < D_FF for step in plan.layers)  # it did cut
    assert model.training
    assert all(p.requires_grad for p in model.parameters())
    assert all(torch.equal(p, before[name]) for name, p in model.state_dict().items())


@pytest.mark.parametrize(("family", "head"), PAIRS)
def test_tuning_is_logged_for_every_kept_sublayer(family, head, make_model, make_sample):
    model = make_model(family, head)
    _, log = run_kprune(model, make_sample(family), head, keep_flops=0.5)
    for step in log["steps"]:
        if step["kept"] == 0:
            assert step["tuning"] is None
        else:
            tuning = step["tuning"]
            assert tuning == "solved" or tuning.startswith(("kept sliced weights", "skipped")), tuning
    assert any(step["tuning"] == "solved" for step in log["steps"])


def _sublayer_record(model, layer: int, sub: str, batches) -> dict[str, torch.Tensor]:
    """Non-padding rows of the sublayer's input X, its output projection's input Z and output O."""
    adapter = get_adapter(model)
    parts = adapter.attention(layer) if sub == "attn" else adapter.ffn(layer)
    out = parts.out if sub == "attn" else parts.down
    rows: dict[str, list[torch.Tensor]] = {"x": [], "z": [], "o": []}
    current = {}
    handles = [
        adapter.sublayer_module(layer, sub).register_forward_pre_hook(lambda m, a: current.__setitem__("x", a[0])),
        out.register_forward_pre_hook(lambda m, a: current.__setitem__("z", a[0])),
        out.register_forward_hook(lambda m, a, o: current.__setitem__("o", o)),
    ]
    try:
        for batch in batches:
            inputs = {k: v for k, v in batch.items() if k != "token_type_ids" or "distil" not in model.config.model_type}
            with torch.no_grad():
                model(**inputs)
            keep = batch["attention_mask"].bool()  # (B, T)
            for key in rows:
                rows[key].append(current[key][keep].double())  # (N_b, width)
    finally:
        for handle in handles:
            handle.remove()
    return {key: torch.cat(value) for key, value in rows.items()} | {"weight": out.weight.detach().double(),
                                                                       "bias": out.bias.detach().double()}


@pytest.mark.parametrize(("family", "head"), PAIRS)
def test_refit_never_increases_the_residual(family, head, make_model, make_sample):
    """Recomputed independently: for each kept sublayer, ‖R_T − X_S − b − Z_S Wᵀ‖² over the sample's
    tokens is no larger with the re-fitted W than with the teacher's sliced W (spec §1.7, P5)."""
    teacher = make_model(family, head, num_layers=3)
    sample = make_sample(family)
    student = copy.deepcopy(teacher)
    plan, log = run_kprune(student, sample, head, keep_flops=0.4)
    checked = 0
    for layer, step in enumerate(plan.layers):
        for sub, kept in (("attn", step.heads), ("ffn", step.neurons)):
            if not kept:
                continue
            t = _sublayer_record(teacher, layer, sub, sample.batches)
            s = _sublayer_record(student, layer, sub, sample.batches)
            kept = torch.tensor(kept)
            columns = (kept[:, None] * D_H + torch.arange(D_H)).reshape(-1) if sub == "attn" else kept
            target = t["x"] + t["o"] - s["x"] - s["bias"]  # (N_tok, d): what Z W^T must rebuild
            sliced = ((target - s["z"] @ t["weight"][:, columns].T) ** 2).sum()
            refit = ((target - s["z"] @ s["weight"].T) ** 2).sum()
            assert refit <= sliced * (1 + 1e-6) + 1e-9, (layer, sub, float(refit), float(sliced))
            checked += 1
    assert checked >= 3
    assert any(s["tuning"] == "solved" for s in log["steps"])


@pytest.mark.parametrize(
    "options",
    [
        {"keep_flops": 0.0},
        {"keep_flops": 1.5},
        {"keep_flops": -0.2},
        {"temperature": -1.0},
        {"temperature": 0.0},
        {"mu": 0.0},
        {"lam_rep": -1.0},
        {"ridge": -1e-3},
        {"seq_len": 0.0},
    ],
    ids=lambda options: ",".join(f"{k}={v}" for k, v in options.items()),
)
def test_bad_configs_raise_config_error(options):
    with pytest.raises(ConfigError):
        KpruneConfig(**options)


def test_bad_task_kind_and_method_options(make_model, make_sample):
    model = make_model("bert")
    with pytest.raises(ConfigError, match="unknown task kind"):
        run_method(kprune, model, make_sample("bert"), "ranking", KpruneConfig())
    assert not get_adapter(model).is_pruned()
    spec = get_method("kprune")
    assert spec is METHODS["kprune"]
    assert spec.make_config(keep_flops=0.3, temperature=4.0) == KpruneConfig(keep_flops=0.3, temperature=4.0)
    with pytest.raises(ConfigError, match="no option"):
        spec.make_config(keep_flop=0.3)
    with pytest.raises(ConfigError, match="Did you mean 'kprune'"):
        get_method("kprun")


def test_a_model_that_comes_in_pruned(make_model, make_sample):
    model = make_model("bert", num_layers=3)
    apply_plan(view(model), PruningPlan([LayerPlan(heads=[]), LayerPlan(neurons=[]), LayerPlan(heads=[0, 1])]))
    sample = make_sample("bert")
    plan, _ = run_kprune(model, sample, "classification", keep_flops=0.5)
    assert plan.layers[0].heads == [] and plan.layers[1].neurons == []
    assert count_flops(view(model), sample.mean_length) <= 0.5 * full_flops(view(model), sample.mean_length)


def test_through_the_api_with_a_real_calibration_sample(make_model, tokenizer, sst2_dir, make_batch, outputs_of):
    """prunekit.prune with a CalibrationSample from a GLUE folder: the given model is not changed."""
    batch = make_batch([9, 5, 2, 7])
    model = make_model("bert", num_labels=2)
    before = outputs_of(model, batch)
    sample = build_calibration_sample("sst2", tokenizer, sst2_dir, num_sequences=12, batch_size=4, seed=0)
    assert any(bool((b["attention_mask"] == 0).any()) for b in sample.batches)  # the sample has padding
    result = prunekit.prune(model, tokenizer, sample, task="sst2", keep_flops=0.5, device="cpu")
    assert torch.equal(outputs_of(model, batch), before)
    assert not get_adapter(model).is_pruned()
    assert get_adapter(result.model).layer_shapes() == plan_shapes(result.plan)
    report = result.report
    assert report["flops_kept"] <= 0.5 * (1 + 1e-9)
    assert report["after"]["flops"] == pytest.approx(count_flops(view(result.model), sample.mean_length), rel=1e-9)
    assert report["after"]["params"] < report["before"]["params"]
    assert report["hyperparameters"]["keep_flops"] == 0.5 and report["method"] == "kprune"
    with pytest.raises(ConfigError, match="keep_flops"):
        prunekit.prune(model, tokenizer, sample, task="sst2", keep_flops=1.0)


@pytest.mark.parametrize(("family", "head"), PAIRS)
def test_low_memory_gives_the_same_plan(family, head, make_model, make_sample):
    """low_memory only hands freed memory back between batches: same units, same re-fitted weights."""
    teacher = make_model(family, head, num_layers=3)
    sample = make_sample(family)
    plain, _ = run_kprune(copy.deepcopy(teacher), sample, head, keep_flops=0.4)
    lean, log = run_kprune(copy.deepcopy(teacher), sample, head, keep_flops=0.4, low_memory=True)
    assert log["config"]["low_memory"] is True
    for a, b in zip(plain.layers, lean.layers, strict=True):
        assert (a.heads, a.neurons) == (b.heads, b.neurons)
        for name in ("attention_out_weight", "ffn_out_weight"):
            x, y = getattr(a, name), getattr(b, name)
            assert (x is None) == (y is None) and (x is None or torch.equal(x, y))


def _decoder_cases():
    import test_decoders_llama as llama
    import test_decoders_opt_gpt2 as opt

    cases = [(f, lambda f=f: llama.build(f), llama.batch_of) for f in llama.FAMILIES]
    return cases + [(v, lambda v=v: opt.build(v), lambda seed, v=v: opt.make_batch(v, seed)) for v in opt.VARIANTS]


def _encoder_cases():
    from conftest import build_tiny_model, make_batch

    return [(f, lambda f=f: build_tiny_model(f, "classification", num_layers=3),
             lambda seed, f=f: make_batch([3, 9, 6], seed=seed, token_type_ids=f != "distilbert",
                                          pad_id=1 if f == "roberta" else 0))
            for f in ("bert", "roberta", "distilbert")]


LAYER_OUTPUT_CASES = _encoder_cases() + _decoder_cases()


@pytest.mark.parametrize(("name", "build", "batch_of"), LAYER_OUTPUT_CASES, ids=[c[0] for c in LAYER_OUTPUT_CASES])
def test_teacher_layer_outputs_are_rebuilt_from_the_ffn_residual_exactly(name, build, batch_of):
    """Kprune keeps the teacher's layer outputs as its FFN residual sums X + f(X) (unpadded rows) and
    rebuilds each layer's output from them, with zeros at padded positions: the rebuilt output and
    the next layer's output from it equal the real ones at every valid position, bit for bit."""
    model = build().eval()
    adapter = get_adapter(model)
    runner = LayerRunner(model, adapter)
    batch = batch_of(0)
    mask = batch["attention_mask"].bool()
    assert not mask.all()  # padded: the zeros must not leak
    for layer in range(adapter.num_layers - 1):
        with torch.no_grad(), capture_residual(adapter, layer, "ffn") as record:
            hidden = runner.layer_input(layer, batch)
            output = runner.run_layer(layer, hidden, batch)
            rows = adapter.layer_output(layer, (record["input"] + record["output"])[mask])  # (N, d)
            rebuilt = torch.zeros_like(output)
            rebuilt[mask] = rows
        assert torch.equal(rows, output[mask])
        with torch.no_grad():
            assert torch.equal(runner.run_layer(layer + 1, rebuilt, batch)[mask],
                               runner.run_layer(layer + 1, output, batch)[mask])


def test_only_the_ffn_residual_sums_are_stored(make_model, make_sample, monkeypatch):
    """The teacher's attention residual sums go straight into the attention's knowledge pass, batch
    by batch: the only set of residual rows Kprune allocates is layer 0's FFN's (each later layer
    writes its FFN's over the last one's), not one per sublayer and layer."""
    kp = importlib.import_module("prunekit.methods.kprune")
    allocated = []

    class Recording(kp._BatchStore):
        def __init__(self, masks, rows=False, views=None):
            super().__init__(masks, rows=rows, views=views)
            if rows and views is None:
                allocated.append(len(masks))

    monkeypatch.setattr(kp, "_BatchStore", Recording)
    sample = make_sample("bert")
    run_kprune(make_model("bert", "classification", num_layers=3), sample, "classification", keep_flops=0.4)
    assert allocated == [len(sample.batches)]


def test_the_attention_residual_sums_come_as_they_are_asked_for_and_match_an_eager_pass(make_model, make_sample):
    """_TeacherLayer runs batch i when the attention's pass asks for it; what it yields, and the FFN's
    sums it keeps, equal the residual sums of the layer run on its own, bit for bit. Its outputs run
    whatever batches were not asked for; the attention's sums cannot be read twice."""
    kp = importlib.import_module("prunekit.methods.kprune")
    model = make_model("bert", "classification", num_layers=3).eval()
    adapter, sample = get_adapter(model), make_sample("bert")
    runner, masks = LayerRunner(model, adapter), [b["attention_mask"].bool() for b in sample.batches]
    with torch.no_grad():
        hidden = [runner.layer_input(1, b) for b in sample.batches]
    teacher = kp._TeacherLayer(runner, 1, hidden, sample.batches, masks)
    streamed = []
    for i, rows in enumerate(teacher.attention_residuals()):
        assert teacher.done == i + 1
        streamed.append(rows)
    ffn = teacher.output().ffn_residual
    for i, batch in enumerate(sample.batches):
        with torch.no_grad(), capture_residual(adapter, 1, "attn") as attn, capture_residual(adapter, 1, "ffn") as f:
            runner.run_layer(1, hidden[i], batch)
        assert torch.equal(streamed[i], (attn["input"] + attn["output"])[masks[i]])
        assert torch.equal(ffn[i], (f["input"] + f["output"])[masks[i]])
    with pytest.raises(RuntimeError, match="read once"):
        next(teacher.attention_residuals())
    unread = kp._TeacherLayer(runner, 1, hidden, sample.batches, masks).output()  # e.g. an emptied attention
    assert all(torch.equal(a, b) for a, b in zip(unread.ffn_residual, ffn, strict=True))


# ---- causal LMs: logits a chunk of positions at a time (issue 21) ----------------------------------
def _whole_logits(self, layer, hidden, batch, kind):
    """LayerRunner.outputs_from as it was before chunking: the model's whole output, logits included."""
    return self.forward_from(layer, hidden, batch)


def test_a_causal_lm_plan_is_that_of_the_whole_logits_and_no_logits_tensor_is_whole(monkeypatch):
    """Kprune on a tiny Llama keeps the same units as with the model's whole logits (the targets, KL
    and gradients are equal up to rounding), and makes no tensor of (a batch's tokens x vocabulary):
    forward and backward, the logits exist a chunk of 5 positions at a time."""
    from builders import LargestTensor, lm_windows, tiny_causal_lm

    from prunekit.tasks import losses

    vocab, sample = 211, lm_windows(211)
    config = KpruneConfig(keep_params=0.6, temperature=1.0)
    with monkeypatch.context() as patch:
        patch.setattr(LayerRunner, "outputs_from", _whole_logits)
        with LargestTensor() as before:  # the check sees whole logits where they are made
            whole, _ = run_method(kprune, tiny_causal_lm(vocab), sample, "lm", config)
    monkeypatch.setattr(losses, "LM_CHUNK_ENTRIES", 5 * vocab)
    with LargestTensor() as largest:
        chunked, _ = run_method(kprune, tiny_causal_lm(vocab), sample, "lm", config)
    assert [(s.heads, s.neurons) for s in chunked.layers] == [(s.heads, s.neurons) for s in whole.layers]
    for a, b in zip(chunked.layers, whole.layers, strict=True):
        for name in ("attention_out_weight", "ffn_out_weight"):
            x, y = getattr(a, name), getattr(b, name)
            assert (x is None) == (y is None) and (x is None or torch.allclose(x, y, atol=1e-5, rtol=1e-5))
    tokens_per_batch = sample.batches[0]["input_ids"].numel()
    assert largest.numel < tokens_per_batch * vocab <= before.numel
