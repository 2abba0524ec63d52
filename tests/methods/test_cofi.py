"""CoFi: L0 gates, expected size, the Lagrangian controller, layer mapping, surgery with removed
sublayers and a narrowed hidden size, checkpoint/resume, API and CLI (cofi.md; tiny random models)."""

from __future__ import annotations

import copy
import json
import math

import pytest
import torch
from builders import view
from conftest import build_tiny_model, build_tokenizer, model_inputs_for, outputs_of, write_sst2

from prunekit.core.accounting import count_prunable_params, full_prunable_params
from prunekit.core.errors import ConfigError
from prunekit.core.masks import GateHolder, apply_gates
from prunekit.core.surgery import apply_plan
from prunekit.families import get_adapter
from prunekit.methods.cofi import (
    CofiConfig,
    SizeModel,
    check_cofi_schedule,
    cofi,
    cofi_schedule,
    default_teacher_layers,
    gate_plan,
    match_layers,
    narrow_transform,
)
from prunekit.methods.cofi.l0 import (
    CofiGates,
    closed_probability,
    deterministic_gate,
    keep_probability,
    sample_gate,
)
from prunekit.tasks import TaskData, build_training_data


def run_cofi(teacher, student, data, config, seq_len=16.0, checkpoint_dir=None, resume=False):
    """CoFi through its method contract; returns the model rebuilt from the teacher by the plan."""
    task_data = TaskData(kind=data.kind if data is not None else "classification", training=data, seq_len=seq_len,
                         student_init=student, device="cpu", checkpoint_dir=checkpoint_dir, resume=resume)
    plan, log = cofi(view(teacher), task_data, config)
    return apply_plan(view(copy.deepcopy(teacher)), plan), plan, log


# ---- hard-concrete gates ---------------------------------------------------------------------------
def test_keep_probability_matches_monte_carlo():
    torch.manual_seed(0)
    log_alpha = torch.tensor([-4.0, -1.6, -0.5, 0.0, 0.7, 2.0, 4.6])
    samples = torch.stack([sample_gate(log_alpha) for _ in range(40_000)])  # (N, 7)
    empirical_keep = (samples > 0).float().mean(0)
    assert torch.allclose(keep_probability(log_alpha), empirical_keep, atol=0.01)
    assert torch.allclose(closed_probability(log_alpha), (samples == 0).float().mean(0), atol=0.01)
    assert (samples >= 0).all() and (samples <= 1).all()
    assert (samples == 1).any() and (samples == 0).any()  # the stretch makes exact 0 and 1 reachable


def test_expected_counts_match_monte_carlo_of_sampled_structure():
    torch.manual_seed(1)
    gates = CofiGates([4, 4], [6, 6], hidden_size=5, init=0.0, neuron_init=0.0, init_std=1.5)
    with torch.no_grad():
        counts = gates.expected_counts()
    heads = torch.zeros(2)
    neurons = torch.zeros(2)
    hidden = 0.0
    n = 20_000
    with torch.no_grad():
        for _ in range(n):
            values = gates.sample()
            for layer in range(2):
                heads[layer] += float((values.head[layer] > 0).sum()) * float(values.mha[layer] > 0)
                neurons[layer] += float((values.neuron[layer] > 0).sum()) * float(values.ffn[layer] > 0)
            hidden += float((values.hidden > 0).sum())
    for layer in range(2):
        assert float(counts["heads"][layer]) == pytest.approx(float(heads[layer]) / n, abs=0.05)
        assert float(counts["neurons"][layer]) == pytest.approx(float(neurons[layer]) / n, abs=0.06)
    assert float(counts["hidden"]) == pytest.approx(hidden / n, abs=0.05)


def test_deterministic_gate_closes_the_expected_number_lowest_first():
    log_alpha = torch.tensor([4.0, -3.0, 2.0, -2.5, 0.5, 3.0])
    values = deterministic_gate(log_alpha)
    closed = round(float(closed_probability(log_alpha).sum()))
    assert int((values == 0).sum()) == closed == 2
    assert values[1] == 0 and values[3] == 0  # the two smallest log α
    kept = values[values != 0]
    assert torch.allclose(kept, torch.sigmoid(0.8 * log_alpha[values != 0] / (2 / 3)))
    binary = deterministic_gate(log_alpha, binary=True)
    assert set(binary.tolist()) == {0.0, 1.0}


def test_clamp_bounds_log_alpha():
    gates = CofiGates([2], [3], hidden_size=4)
    gates.clamp_()
    for group in gates.groups():
        group = group.detach()
        assert float(group.max()) <= math.log(100) + 1e-6 and float(group.min()) >= math.log(0.01) - 1e-6


# ---- gated model == physically pruned model ----------------------------------------------------------
def _set_gates(model, seed: int = 0) -> CofiGates:
    """Gates with varied soft values and every kind of closure: a closed head, a whole attention
    sublayer off, an FFN with every neuron closed, and closed hidden dims."""
    adapter = get_adapter(model)
    shapes = adapter.layer_shapes()
    gates = CofiGates([s.num_heads for s in shapes], [s.intermediate_size for s in shapes], adapter.hidden_size)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for group in gates.groups():
            group.copy_(torch.rand(group.shape, generator=generator) * 1.6 + 3.0)  # open, soft values 0.97-0.996
        gates.head[0][1] = -4.0  # one head closed
        gates.mha[1][0] = -4.0  # layer 1's attention off by its layer gate
        gates.head[2].fill_(-4.6)  # layer 2's attention off: every head closed, its layer gate open
        gates.ffn[0][0] = -4.0  # layer 0's FFN off
        gates.neuron[1][:30] = -4.6  # most of layer 1's neurons closed
        gates.hidden[[2, 5, 11, 30]] = -4.6  # hidden dims closed
    return gates


@pytest.mark.parametrize("head", ["classification", "qa"])
def test_gated_model_equals_pruned_model(family, head, make_batch):
    model = build_tiny_model(family, head, num_layers=3)
    gates = _set_gates(model)
    values = gates.deterministic()
    assert not values.attn_on[1] and not values.attn_on[2] and not values.ffn_on[0] and values.ffn_on[1]
    batch = make_batch([7, 5, 3], pad_id=1 if family == "roberta" else 0, token_type_ids=family != "distilbert")
    holder = GateHolder()
    with apply_gates(get_adapter(model), holder):
        holder.values = values
        gated = outputs_of(model, batch)
    transform = torch.nn.Linear(32, 32)
    plan = gate_plan(view(model), values)
    apply_plan(view(model), plan)
    narrowed = narrow_transform(transform, plan)
    adapter = get_adapter(model)
    assert adapter.is_removed(1, "attn") and adapter.is_removed(2, "attn") and adapter.is_removed(0, "ffn")
    assert adapter.hidden_size == 28 and narrowed.in_features == 28
    assert plan.layers[1].attention_removed and plan.layers[0].ffn_removed and len(plan.hidden) == 28
    assert adapter.layer_shapes()[0].num_heads == 3
    torch.testing.assert_close(outputs_of(model, batch), gated, atol=1e-5, rtol=0)


def test_gates_off_leave_the_model_unchanged(make_batch):
    model = build_tiny_model("bert", "classification")
    batch = make_batch([6, 4])
    before = outputs_of(model, batch)
    holder = GateHolder()
    with apply_gates(get_adapter(model), holder):
        assert torch.equal(outputs_of(model, batch), before)  # values None: ungated
        holder.values = CofiGates([4, 4], [37, 37], 32).deterministic()  # all open, log α 10
        opened = outputs_of(model, batch)
    assert torch.equal(outputs_of(model, batch), before)  # hooks removed
    assert not torch.equal(opened, before)  # open gates still carry their soft value (≈1, not 1)


# ---- size --------------------------------------------------------------------------------------------
def test_size_model_params_and_flops_agree_with_accounting():
    model = build_tiny_model("bert", "classification", num_layers=3)
    adapter = get_adapter(model)
    params = SizeModel(adapter, "params", 16.0)
    assert params.full == full_prunable_params(view(model))
    gates = CofiGates([4] * 3, [37] * 3, 32, init=10.0, neuron_init=10.0)
    assert float(params.expected_sparsity(gates).detach()) == pytest.approx(0.0, abs=0.02)  # output biases uncounted
    flops = SizeModel(adapter, "flops", 16.0)
    assert float(flops.expected_sparsity(gates).detach()) == pytest.approx(0.0, abs=1e-3)
    # A deterministic structure's FLOPs sparsity is what accounting counts on the pruned model.
    _set = _set_gates(model)
    values = _set.deterministic()
    predicted = flops.sparsity(values)
    from prunekit.core.accounting import count_flops, full_flops

    full = full_flops(view(model), 16.0)
    apply_plan(view(model), gate_plan(view(model), values))
    assert predicted == pytest.approx(1 - count_flops(view(model), 16.0) / full, abs=1e-9)


# ---- layer mapping -------------------------------------------------------------------------------------
def test_free_mapping_picks_the_closest_existing_student_layer():
    costs = torch.tensor([[0.1, 0.5, 0.9, 0.8],   # teacher layer A: closest is student 0
                          [0.7, 0.6, 0.2, 0.3],   # B: closest is 2
                          [0.9, 0.8, 0.05, 0.4]])  # C: closest is 2, or 3 when 2 is removed  # fmt: skip
    assert match_layers(costs, [0, 1, 2, 3], ordered=False) == [0, 2, 2]
    assert match_layers(costs, [0, 1, 3], ordered=False) == [0, 3, 3]
    assert match_layers(costs, [], ordered=False) == [None, None, None]


def test_ordered_mapping_is_top_down_and_strictly_decreasing():
    costs = torch.tensor([[0.1, 0.5, 0.9, 0.8],
                          [0.7, 0.6, 0.2, 0.3],
                          [0.9, 0.8, 0.05, 0.4]])  # fmt: skip
    # C takes 2; B must lie below 2: 1 (0.6) beats 0 (0.7); A must lie below 1: 0.
    assert match_layers(costs, [0, 1, 2, 3], ordered=True) == [0, 1, 2]
    # Nothing left below: reuse the previous match.
    assert match_layers(costs, [2, 3], ordered=True) == [2, 2, 2]


def test_default_teacher_layers_are_quarter_points():
    assert default_teacher_layers(12) == (3, 6, 9, 12)
    assert default_teacher_layers(6) == (2, 3, 5, 6)
    assert default_teacher_layers(2) == (1, 2)


# ---- training ------------------------------------------------------------------------------------------
def _data(tmp_path, config, n_train=48):
    folder = write_sst2(tmp_path / "sst2", n_train=n_train, n_dev=16)
    return build_training_data("sst2", build_tokenizer(), str(folder), max_length=config.max_length,
                               max_train_samples=config.max_train_samples, max_eval_samples=config.max_eval_samples,
                               device="cpu")


def _run(tmp_path, seed=0, **options):
    teacher = build_tiny_model("bert", "classification", num_labels=2, seed=seed)
    student = build_tiny_model("bert", "classification", num_labels=2, seed=seed)
    defaults = dict(keep_params=0.3, epochs=4, warmup_epochs=1, finetune_epochs=0, batch_size=8, eval_steps=0,
                    reg_lr=0.1, lr=1e-3, seed=seed)
    config = CofiConfig(**{**defaults, **options})
    data = _data(tmp_path, config)
    return run_cofi(teacher, student, data, config), data


def test_controller_drives_expected_sparsity_to_the_target(tmp_path):
    # 300 steps; the target ramps over the first half (a short ramp makes λ overshoot, see cofi.md §3).
    (model, plan, log), _ = _run(tmp_path, keep_params=0.3, epochs=50, warmup_epochs=25)
    history = log["prune_history"]
    assert history[-1]["step"] == 300
    assert log["expected_sparsity"] == pytest.approx(0.7, abs=0.02)
    assert log["deterministic_sparsity"] == pytest.approx(0.7, abs=0.03)
    assert history[-1]["lambda2"] > 0  # λ₂ only grows under ascent on (ŝ − t)²
    assert log["surgery_max_abs_diff"] < 1e-4
    assert count_prunable_params(view(model)) < full_prunable_params(view(model))


def test_same_seed_gives_the_same_masks(tmp_path):
    (_, plan_a, log_a), _ = _run(tmp_path / "a", epochs=2)
    (_, plan_b, log_b), _ = _run(tmp_path / "b", epochs=2)
    assert plan_a.to_dict() == plan_b.to_dict()
    assert log_a["gates"] == log_b["gates"]


def test_resumed_run_continues_where_it_stopped(tmp_path):
    options = dict(epochs=4, finetune_epochs=1, save_steps=5, eval_steps=10)  # 24 + 6 steps
    teacher = build_tiny_model("bert", "classification", num_labels=2)
    config = CofiConfig(keep_params=0.3, warmup_epochs=1, batch_size=8, reg_lr=0.1, lr=1e-3, **options)
    data = _data(tmp_path, config)
    full_model, full_plan, _ = run_cofi(teacher, build_tiny_model("bert", "classification", num_labels=2), data,
                                        config, checkpoint_dir=tmp_path / "full")

    calls = {"n": 0}
    collate = data.collate

    def interrupted(batch):
        calls["n"] += 1
        if calls["n"] == 14:  # mid-way through the pruning stage, after the step-10 checkpoint
            raise KeyboardInterrupt
        return collate(batch)

    data.collate = interrupted
    with pytest.raises(KeyboardInterrupt):
        run_cofi(teacher, build_tiny_model("bert", "classification", num_labels=2), data, config,
                 checkpoint_dir=tmp_path / "cut")
    state = json.loads((tmp_path / "cut" / "trainer_state.json").read_text())
    assert state["stage"] == "prune" and 5 <= state["step"] < 24
    data.collate = collate
    resumed, resumed_plan, _ = run_cofi(teacher, build_tiny_model("bert", "classification", num_labels=2), data,
                                        config, checkpoint_dir=tmp_path / "cut", resume=True)
    assert resumed_plan.to_dict() == full_plan.to_dict()
    batch = data.collate(data.features[:6])
    batch.pop("labels")
    torch.testing.assert_close(outputs_of(resumed, batch), outputs_of(full_model, batch), atol=1e-5, rtol=0)


def test_resume_without_checkpoint_is_a_clear_error(tmp_path):
    config = CofiConfig(keep_params=0.5, epochs=1, finetune_epochs=0)
    model = build_tiny_model("bert", "classification", num_labels=2)
    with pytest.raises(ConfigError, match="nothing to resume"):
        run_cofi(model, model, None, config, checkpoint_dir=tmp_path, resume=True)


@pytest.mark.parametrize("options, message", [
    (dict(), "needs one budget"),
    (dict(keep_params=0.5, keep_flops=0.5), "needs one budget"),
    (dict(keep_params=1.5), "keep_params must be in"),
    (dict(keep_params=0.5, distill="hidden"), "distill must be"),
    (dict(keep_params=0.5, epochs=1, prepruning_epochs=1), "must exceed prepruning_epochs"),
])  # fmt: skip
def test_bad_config_is_a_clear_error(options, message):
    with pytest.raises(ConfigError, match=message):
        CofiConfig(**options)



def test_the_schedule_counts_optimiser_steps_per_stage():
    """What training counts and the schedule check reads: 50 examples in batches of 8 are 7 batches,
    3 optimiser steps per epoch with 2 accumulation steps; fine-tuning has no pre-pruning."""
    config = CofiConfig(keep_params=0.3, epochs=3, prepruning_epochs=1, warmup_epochs=1, finetune_epochs=2,
                        batch_size=8, gradient_accumulation_steps=2)
    prune = cofi_schedule(config, 50)
    assert (prune.batches_per_epoch, prune.steps_per_epoch, prune.total, prune.prepruning, prune.warmup) == (
        7, 3, 9, 3, 3)
    finetune = cofi_schedule(config, 50, stage="finetune")
    assert (finetune.total, finetune.prepruning) == (6, 0)
    assert cofi_schedule(config, 50, num_processes=2).steps_per_epoch == 2  # 4 batches per process
    short = CofiConfig(keep_params=0.3, epochs=3, warmup_epochs=1, batch_size=8, max_steps=3)
    assert cofi_schedule(short, 50).total == 3
    # A warm-up of 7 steps needs at least one step at the full target after it.
    check_cofi_schedule(CofiConfig(keep_params=0.3, epochs=3, warmup_epochs=1, batch_size=8, max_steps=8), 50)
    with pytest.raises(ConfigError, match="cannot reach its target"):
        check_cofi_schedule(CofiConfig(keep_params=0.3, epochs=3, warmup_epochs=1, batch_size=8, max_steps=7), 50)

# ---- API and CLI ------------------------------------------------------------------------------------------
def test_prune_api_saves_a_model_that_reloads_identically(tmp_path, make_teacher):
    from prunekit import prune
    from prunekit.io.folders import load_pruned

    teacher_dir = make_teacher()
    data = write_sst2(tmp_path / "sst2", n_train=32, n_dev=8)
    result = prune(str(teacher_dir), data=str(data), task="sst2", method="cofi", keep_params=0.4, epochs=6,
                   warmup_epochs=2, finetune_epochs=1, batch_size=8, reg_lr=0.1, lr=1e-3, eval_steps=0, device="cpu")
    report = result.report
    assert report["method"] == "cofi" and report["budget"] == {"kind": "params", "keep": 0.4}
    assert report["hidden_size"] == get_adapter(result.model).hidden_size
    out = result.save(tmp_path / "out")
    reloaded = load_pruned(out)
    batch = build_tokenizer()(["good movie it was", "bad film"], return_tensors="pt", padding=True)
    batch = model_inputs_for(reloaded, dict(batch))
    torch.testing.assert_close(outputs_of(reloaded, batch), outputs_of(result.model, batch), atol=1e-6, rtol=0)
    saved = json.loads((out / "prune_report.json").read_text())
    assert saved["method_log"]["gates"]["heads"] == [s["num_heads"] for s in saved["layers"]]


def test_prune_api_rejects_a_calibration_sample_for_cofi(sst2_dir):
    from prunekit import prune
    from prunekit.tasks import build_calibration_sample

    model = build_tiny_model("bert", "classification", num_labels=2)
    sample = build_calibration_sample("sst2", build_tokenizer(), str(sst2_dir), num_tokens=100)
    with pytest.raises(ConfigError, match="trains"):
        prune(model, build_tokenizer(), sample, method="cofi", keep_params=0.5)


def test_cli_prune_with_cofi(tmp_path, make_teacher):
    from prunekit.cli import main
    from prunekit.io.folders import load_pruned

    teacher_dir = make_teacher()
    data = write_sst2(tmp_path / "sst2", n_train=32, n_dev=8)
    out = tmp_path / "cofi"
    code = main(["prune", "--method", "cofi", "--model", str(teacher_dir), "--task", "sst2", "--data", str(data),
                 "--keep-params", "0.5", "--epochs", "3", "--finetune-epochs", "1", "--distill", "layer",
                 "--set", "batch_size=8", "--set", "reg_lr=0.1", "--set", "warmup_epochs=1", "--no-bench",
                 "--out", str(out), "--device", "cpu"])  # fmt: skip
    assert code == 0
    report = json.loads((out / "prune_report.json").read_text())
    assert report["eval"]["pruned"]["num_examples"] == 8
    assert (out / "structure.png").is_file()
    load_pruned(out)


def test_gradient_accumulation_counts_optimizer_steps(tmp_path):
    (_, _, log), _ = _run(tmp_path, epochs=2, batch_size=4, gradient_accumulation_steps=2, eval_steps=3)
    # 48 examples / (4 x 2) = 6 optimiser steps per epoch.
    assert [row["step"] for row in log["prune_history"]] == [3, 6, 9, 12]


def test_keep_flops_budget_targets_expected_flops(tmp_path):
    (model, _, log), _ = _run(tmp_path, keep_params=None, keep_flops=0.4, epochs=50, warmup_epochs=25)
    assert log["target_kind"] == "flops"
    assert 1.0 - log["expected_sparsity"] == pytest.approx(0.4, abs=0.03)
