"""The plan as the one hand-off: every method's saved plan (plan.json + plan.safetensors) rebuilds
the saved model from the teacher (``prunekit.apply_plan``, ``prunekit apply-plan``); plans round
trip bit for bit; methods leave the teacher unchanged; folders saved before plan files existed
still load; ``import prunekit`` stays free of matplotlib."""

from __future__ import annotations

import copy
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import (
    FAMILIES,
    build_tiny_model,
    build_tokenizer,
    make_sample,
    model_inputs_for,
    outputs_of,
    write_sst2,
)

import prunekit
from prunekit import PruneOptions, apply_plan, load_plan, load_pruned
from prunekit.cli import main
from prunekit.core.errors import ConfigError
from prunekit.core.surgery import LayerPlan, PruningPlan
from prunekit.io.folders import PLAN_FILE, PLAN_TENSORS, save_plan, save_pruned
from prunekit.methods import METHODS
from prunekit.tasks import TaskData

FIXTURE = Path(__file__).parents[1] / "fixtures" / "pre_plan_kwon_bert"
SENTENCES = ["good movie it was", "bad film not very", "the cat sits and the dog runs good"]
# Small, fast settings per method; CoFi trains a few steps on 32 examples.
OPTIONS = {
    "kprune": dict(keep_flops=0.4, num_sequences=16),
    "kwon": dict(keep_flops=0.4, num_sequences=16),
    "magnitude": dict(keep_flops=0.4, num_sequences=16),
    "random": dict(keep_flops=0.4, num_sequences=16),
    "flap": dict(keep_flops=0.4, num_sequences=16),
    "wanda_sp": dict(keep_flops=0.4, num_sequences=16),
    "llm_pruner": dict(keep_flops=0.6, num_sequences=16, protected_first=0, protected_last=0),
    "shortgpt": dict(keep_flops=0.6, num_sequences=16),  # 2 layers: one goes
    "cofi": dict(keep_params=0.4, epochs=3, warmup_epochs=1, finetune_epochs=1, batch_size=8, reg_lr=0.1, lr=1e-3,
                 eval_steps=0, max_train_samples=32, max_eval_samples=8),
}


def _outputs(model, tokenizer=None):
    batch = dict((tokenizer or build_tokenizer())(SENTENCES, return_tensors="pt", padding=True))
    return outputs_of(model, model_inputs_for(model, batch))


def test_every_method_is_registered_with_its_options():
    assert set(OPTIONS) == set(METHODS)


@pytest.mark.parametrize("method", sorted(OPTIONS))
@pytest.mark.parametrize("family", FAMILIES)
def test_the_saved_plan_rebuilds_the_saved_model_from_the_teacher(family, method, make_teacher, tmp_path):
    teacher_dir = make_teacher(family=family)
    data = write_sst2(tmp_path / "sst2", n_train=32, n_dev=8)
    result = prunekit.prune(str(teacher_dir), data=str(data), task="sst2", method=method, device="cpu",
                            **OPTIONS[method])
    out = result.save(tmp_path / "pruned")
    assert (out / PLAN_FILE).is_file() and (out / PLAN_TENSORS).is_file()
    assert json.loads((out / PLAN_FILE).read_text())["format"] == 2
    saved = load_pruned(out)
    rebuilt = apply_plan(str(teacher_dir), out)
    assert [s.to_dict() for s in prunekit.families.get_adapter(rebuilt).layer_shapes()] == result.report["layers"]
    torch.testing.assert_close(_outputs(rebuilt), _outputs(saved), atol=1e-6, rtol=0)
    # The plan in memory does the same from a teacher model, which it leaves alone.
    teacher = load_pruned(teacher_dir)
    before = {k: v.clone() for k, v in teacher.state_dict().items()}
    torch.testing.assert_close(_outputs(apply_plan(teacher, result.plan)), _outputs(saved), atol=1e-6, rtol=0)
    assert all(torch.equal(before[k], v) for k, v in teacher.state_dict().items())


def _labelled_sample(family: str):
    sample = make_sample(family)
    for batch in sample.batches:
        batch["labels"] = torch.arange(batch["input_ids"].shape[0]) % 3
    return sample


@pytest.mark.parametrize("method", ["kprune", "kwon", "magnitude", "random", "flap", "wanda_sp", "llm_pruner",
                                    "shortgpt"])
def test_calibration_methods_leave_the_teacher_unchanged(method, make_model):
    """The contract: method(view, data, config) -> (plan, log), the teacher untouched (weights,
    requires_grad flags, train/eval mode), the plan alone carrying the result."""
    from prunekit.families import get_adapter

    teacher = make_model("bert")
    before = {k: v.clone() for k, v in teacher.state_dict().items()}
    flags = [p.requires_grad for p in teacher.parameters()]
    spec = METHODS[method]
    plan, log = spec.run(get_adapter(teacher), TaskData(kind="classification", sample=_labelled_sample("bert")),
                         spec.make_config(**{k: v for k, v in OPTIONS[method].items() if k != "num_sequences"}))
    assert isinstance(plan, PruningPlan) and isinstance(log, dict)
    assert all(torch.equal(before[k], v) for k, v in teacher.state_dict().items())
    assert [p.requires_grad for p in teacher.parameters()] == flags and not teacher.training
    json.dumps(log)  # the log is JSON for the report


def test_kprune_plan_carries_the_refitted_weights_in_the_order_applied(make_model):
    """Kprune re-fits each kept sublayer's output projection once; the plan holds those final
    weights, and replaying it on the teacher gives the model Kprune cut step by step."""
    from conftest import run_method

    from prunekit.methods.kprune import KpruneConfig, kprune

    teacher = make_model("roberta", num_layers=3)
    cut = copy.deepcopy(teacher)
    plan, log = run_method(kprune, cut, make_sample("roberta"), "classification", KpruneConfig(keep_flops=0.4))
    solved = [(s["layer"], s["sublayer"]) for s in log["steps"] if s["tuning"] == "solved"]
    assert solved
    for layer, sub in solved:
        weight = plan.layers[layer].attention_out_weight if sub == "attn" else plan.layers[layer].ffn_out_weight
        assert weight is not None
    replayed = apply_plan(teacher, plan)
    for batch in make_sample("roberta").batches:
        assert torch.equal(outputs_of(replayed, batch), outputs_of(cut, batch))


def _full_plan() -> PruningPlan:
    """A plan with every kind of field: indices, scales, re-fitted weights, gates, removals, hidden."""
    torch.manual_seed(0)
    return PruningPlan(
        layers=[
            LayerPlan(heads=[0, 3], head_scales=torch.tensor([0.5, 1.0, 1.0, -2.0], dtype=torch.float64),
                      attention_gate=torch.tensor(0.75), neurons=[1, 4, 9],
                      ffn_out_weight=torch.randn(32, 3), ffn_removed=False),
            LayerPlan(heads=[1], attention_out_weight=torch.randn(32, 8), neuron_scales=torch.rand(37),
                      neurons=list(range(0, 37, 2)), ffn_gate=torch.tensor(1.5)),
            LayerPlan(attention_removed=True, neurons=[]),
        ],
        hidden=[i for i in range(32) if i not in (3, 17)],
    )


def test_plan_files_round_trip_bit_for_bit(tmp_path, make_model):
    plan = _full_plan()
    save_plan(plan, tmp_path)
    loaded = load_plan(tmp_path)
    assert loaded == plan
    assert loaded.layers[0].head_scales.dtype == torch.float64  # dtypes kept
    teacher = make_model("bert", num_layers=3)
    batch = make_sample("bert").batches[0]
    assert torch.equal(outputs_of(apply_plan(teacher, loaded), batch), outputs_of(apply_plan(teacher, plan), batch))
    # Trained weights (CoFi) travel too.
    plan.weights = {k: v.clone() for k, v in apply_plan(teacher, plan).state_dict().items()}
    save_plan(plan, tmp_path / "trained")
    assert load_plan(tmp_path / "trained") == plan


def test_plan_errors_are_clear(tmp_path, make_model):
    with pytest.raises(ConfigError, match="no pruning plan"):
        load_plan(tmp_path)
    save_plan(_full_plan(), tmp_path)
    (tmp_path / PLAN_TENSORS).unlink()
    with pytest.raises(ConfigError, match="plan.safetensors is missing"):
        load_plan(tmp_path)
    with pytest.raises(ValueError, match="key/value groups"):
        apply_plan(make_model("bert"), PruningPlan([LayerPlan(heads=[0], kv_groups=[0])]))
    with pytest.raises(prunekit.ModelError, match="does not fit"):
        apply_plan(make_model("bert", num_layers=3), PruningPlan(
            [LayerPlan(heads=[0], attention_out_weight=torch.zeros(5, 5))]))


def test_cli_apply_plan_end_to_end(make_teacher, tmp_path, capsys):
    teacher_dir = make_teacher(family="distilbert")
    data = write_sst2(tmp_path / "sst2", n_train=16, n_dev=8)
    pruned = tmp_path / "pruned"
    assert main(["prune", "--model", str(teacher_dir), "--task", "sst2", "--data", str(data), "--method", "kwon",
                 "--keep-flops", "0.4", "--num-sequences", "16", "--no-bench", "--no-eval", "--out", str(pruned),
                 "--device", "cpu"]) == 0
    rebuilt = tmp_path / "rebuilt"
    assert main(["apply-plan", "--model", str(teacher_dir), "--plan", str(pruned), "--out", str(rebuilt)]) == 0
    assert "written to" in capsys.readouterr().out
    torch.testing.assert_close(_outputs(load_pruned(rebuilt)), _outputs(load_pruned(pruned)), atol=1e-6, rtol=0)
    report = json.loads((rebuilt / "prune_report.json").read_text())
    assert report["rebuilt_from"]["plan"] == str(pruned) and report["method"] == "kwon"
    assert load_plan(rebuilt) == load_plan(pruned)
    # A folder without plan files (written before they existed) is one clear line, exit 2.
    assert main(["apply-plan", "--model", str(teacher_dir), "--plan", str(FIXTURE), "--out",
                 str(tmp_path / "x")]) == 2
    err = capsys.readouterr().err
    assert "prunekit apply-plan: error: no pruning plan" in err and "before prunekit wrote plan files" in err
    assert not (tmp_path / "x").exists()


def test_a_folder_saved_before_plan_files_still_loads_identically(tmp_path):
    """tests/fixtures/pre_plan_kwon_bert was written by prunekit before this change (Kwon et al.,
    tiny BERT, keep 0.5 of the FLOPs) with its outputs; it loads, and re-saves, identically."""
    from transformers import AutoModelForSequenceClassification

    expected = json.loads((FIXTURE / "expected_outputs.json").read_text())
    batch = {k: torch.tensor(v) for k, v in expected.items() if k != "logits"}
    logits = torch.tensor(expected["logits"])
    model = load_pruned(FIXTURE)
    torch.testing.assert_close(outputs_of(model, batch), logits, atol=1e-6, rtol=0)
    auto = AutoModelForSequenceClassification.from_pretrained(str(FIXTURE))
    torch.testing.assert_close(outputs_of(auto.eval(), batch), logits, atol=1e-6, rtol=0)
    out = save_pruned(model, tmp_path / "again")
    torch.testing.assert_close(outputs_of(load_pruned(out), batch), logits, atol=1e-6, rtol=0)


def test_prune_options_object_equals_keyword_arguments(tmp_path):
    model = build_tiny_model("bert", num_labels=2)
    data = write_sst2(tmp_path / "sst2", n_train=16, n_dev=8)
    by_keywords = prunekit.prune(model, build_tokenizer(), str(data), method="random", keep_flops=0.5,
                                 num_sequences=8, seed=3)
    options = PruneOptions(method="random", keep_flops=0.5, num_sequences=8, seed=3)
    by_object = prunekit.prune(model, build_tokenizer(), str(data), options)
    assert by_object.plan == by_keywords.plan
    assert by_object.report["hyperparameters"] == by_keywords.report["hyperparameters"]
    # Keywords override the object; unknown keywords are method options.
    assert PruneOptions.of(options, seed=5, power=3.0).seed == 5
    assert PruneOptions.of(options, power=3.0).method_options == {"power": 3.0}
    with pytest.raises(ConfigError, match="has no option"):
        prunekit.prune(model, build_tokenizer(), str(data), options, temperature=2.0)


def test_import_prunekit_does_not_import_matplotlib():
    code = "import sys, prunekit; assert 'matplotlib' not in sys.modules, 'matplotlib imported'"
    subprocess.run([sys.executable, "-c", code], check=True)


# ---- issue 20 item 5: a plan knows its teacher; malformed plans are refused whole ---------------------
def _random_plan_result(model, tmp_path, **options):
    data = write_sst2(tmp_path / "sst2-plan", n_train=16, n_dev=8)
    return prunekit.prune(model, build_tokenizer(), str(data), method="random", keep_flops=0.5, num_sequences=8,
                          **options)


def test_a_plan_records_its_teacher_in_its_own_key(tmp_path):
    from prunekit.core.fingerprint import weights_digest

    teacher = build_tiny_model("bert", num_labels=2)
    result = _random_plan_result(teacher, tmp_path)
    folder = result.save(tmp_path / "pruned")
    data = json.loads((folder / PLAN_FILE).read_text())
    # The decisions are written as before; the teacher is one more top-level key, last.
    assert list(data) == ["format", "layers", "tensors", "teacher"]
    assert {k: v for k, v in data.items() if k != "teacher"} == {"format": 2, **result.plan.to_dict()}
    recorded = data["teacher"]
    assert recorded["family"] == "bert" and recorded["class"] == "BertForSequenceClassification"
    assert recorded["config"]["num_hidden_layers"] == 2 and recorded["config"]["num_labels"] == 2
    assert recorded["weights_sha256"] == weights_digest(teacher)
    assert weights_digest(copy.deepcopy(teacher).to(torch.bfloat16).to(torch.float32)) != recorded["weights_sha256"]
    assert weights_digest(copy.deepcopy(teacher).to(torch.float64)) == recorded["weights_sha256"]  # exact widening
    assert load_plan(folder).teacher == recorded
    # The plan in the report is the decisions alone, as before.
    assert "teacher" not in json.loads((folder / "prune_report.json").read_text())["plan"]


@pytest.mark.parametrize("other", ["roberta", "bert-other-weights", "bert-3-labels"])
def test_a_plan_is_refused_on_another_teacher_unless_forced(other, tmp_path, caplog):
    teacher = build_tiny_model("bert", num_labels=2)
    plan = _random_plan_result(teacher, tmp_path).plan
    model = {"roberta": lambda: build_tiny_model("roberta", num_labels=2),
             "bert-other-weights": lambda: build_tiny_model("bert", num_labels=2, seed=1),
             "bert-3-labels": lambda: build_tiny_model("bert", num_labels=3)}[other]()
    words = {"roberta": "family bert (plan) vs roberta", "bert-other-weights": "weights (sha256",
             "bert-3-labels": "num_labels 2 vs 3"}[other]
    with pytest.raises(prunekit.ModelError, match="made on another teacher") as error:
        apply_plan(model, plan)
    assert words in str(error.value) and "--force" in str(error.value)
    with caplog.at_level("WARNING"):
        forced = apply_plan(model, plan, force=True)
    assert "forced" in caplog.text
    assert [s.num_heads for s in prunekit.families.get_adapter(forced).layer_shapes()] == \
        [len(step.heads) for step in plan.layers]
    apply_plan(teacher, plan)  # its own teacher: no complaint


def test_a_llama_plan_is_refused_on_a_qwen2_of_the_same_shape():
    from test_decoders_llama import build

    from prunekit.core.fingerprint import teacher_fingerprint
    from prunekit.families import get_adapter

    llama, qwen2 = build("llama", "sequence_classification"), build("qwen2", "sequence_classification")
    plan = PruningPlan([LayerPlan(heads=[0, 1, 2], neurons=list(range(20))) for _ in range(3)],
                       teacher=teacher_fingerprint(get_adapter(copy.deepcopy(llama))))
    apply_plan(llama, plan)
    with pytest.raises(prunekit.ModelError, match="family llama .plan. vs qwen2"):
        apply_plan(qwen2, plan)


def test_cli_apply_plan_refuses_another_teacher_and_forces(make_teacher, tmp_path, capsys):
    teacher_dir = make_teacher()
    other = make_teacher("other", family="roberta")
    pruned = _random_plan_result(load_pruned(teacher_dir), tmp_path).save(tmp_path / "pruned")
    out = tmp_path / "rebuilt"
    status = main(["apply-plan", "--model", str(other), "--plan", str(pruned), "--out", str(out)])
    err = capsys.readouterr().err
    assert status == 2 and "Traceback" not in err
    assert "prunekit apply-plan: error: the plan was made on another teacher: family bert" in err
    assert not out.exists()
    assert main(["apply-plan", "--model", str(other), "--plan", str(pruned), "--out", str(out), "--force"]) == 0
    assert main(["apply-plan", "--model", str(teacher_dir), "--plan", str(pruned), "--out",
                 str(tmp_path / "same")]) == 0


def test_an_old_plan_without_a_teacher_is_replayed_with_a_warning(tmp_path, caplog):
    teacher = build_tiny_model("bert", num_labels=2)
    result = _random_plan_result(teacher, tmp_path)
    folder = result.save(tmp_path / "pruned")
    data = json.loads((folder / PLAN_FILE).read_text())
    del data["teacher"]
    (folder / PLAN_FILE).write_text(json.dumps(data, indent=1) + "\n")
    with caplog.at_level("WARNING"):
        rebuilt = apply_plan(teacher, folder)
    assert "records no teacher" in caplog.text
    torch.testing.assert_close(_outputs(rebuilt), _outputs(result.model), atol=1e-6, rtol=0)


def _edit_layer0(key, value):
    def edit(data):
        data["layers"][0][key] = value
    return edit


MALFORMED_PLANS = {
    "a-layer-missing": (lambda d: d["layers"].pop(), "lists 1 layers, the teacher has 2"),
    "float-indices": (_edit_layer0("heads", [0.0, 1.5]), "whole-number indices"),
    "bool-indices": (_edit_layer0("neurons", [True, False]), "whole-number indices"),
    "heads-a-string": (_edit_layer0("heads", "all"), "list of indices or null"),
    "unknown-format": (lambda d: d.update(format=3), "plan format 3"),
    "format-a-string": (lambda d: d.update(format="2"), "plan format '2'"),
    "layer-not-an-object": (lambda d: d["layers"].__setitem__(0, [0, 1]), "must be an object"),
    "removed-not-a-bool": (_edit_layer0("ffn_removed", "yes"), "true or false"),
    "unknown-layer-key": (_edit_layer0("head", [0]), "head"),
    "index-out-of-range": (_edit_layer0("heads", [0, 9]), "[0, 4)"),
    "teacher-not-an-object": (lambda d: d.update(teacher="bert"), "'teacher' must be an object"),
}


@pytest.mark.parametrize("case", list(MALFORMED_PLANS))
def test_a_hand_edited_plan_is_refused_in_one_line_and_nothing_is_written(case, make_teacher, tmp_path, capsys):
    edit, words = MALFORMED_PLANS[case]
    teacher_dir = make_teacher()
    pruned = _random_plan_result(load_pruned(teacher_dir), tmp_path).save(tmp_path / "pruned")
    data = json.loads((pruned / PLAN_FILE).read_text())
    edit(data)
    (pruned / PLAN_FILE).write_text(json.dumps(data))
    out = tmp_path / "rebuilt"
    status = main(["apply-plan", "--model", str(teacher_dir), "--plan", str(pruned), "--out", str(out)])
    err = capsys.readouterr().err
    assert status == 2 and "Traceback" not in err, err
    assert err.strip().splitlines()[-1].startswith("prunekit apply-plan: error:") and words in err, err
    assert not out.exists() and not [p for p in tmp_path.iterdir() if p.name.startswith(".rebuilt")]


def test_heads_emptied_beside_a_refitted_weight_is_refused(tmp_path):
    plan = PruningPlan([LayerPlan(heads=[0], attention_out_weight=torch.zeros(32, 8)), LayerPlan()])
    save_plan(plan, tmp_path)
    data = json.loads((tmp_path / PLAN_FILE).read_text())
    data["layers"][0]["heads"] = []
    (tmp_path / PLAN_FILE).write_text(json.dumps(data))
    with pytest.raises(ConfigError, match=r"keeps no heads \(heads: \[\]\) but holds a re-fitted attention_out_weight"):
        load_plan(tmp_path)


def test_a_uniform_plan_replays_to_the_stock_class(tmp_path, capsys):
    """--uniform's plan says so, and apply-plan saves the family's stock class, as prune did."""
    from transformers import LlamaConfig, LlamaForSequenceClassification

    tokenizer = build_tokenizer()
    config = LlamaConfig(vocab_size=tokenizer.vocab_size, hidden_size=36, intermediate_size=37, num_hidden_layers=2,
                         num_attention_heads=6, num_key_value_heads=2, head_dim=12, pad_token_id=0, num_labels=2,
                         max_position_embeddings=128)
    torch.manual_seed(0)
    teacher_dir = tmp_path / "teacher"
    LlamaForSequenceClassification(config).save_pretrained(teacher_dir)
    tokenizer.save_pretrained(teacher_dir)
    teacher = load_pruned(teacher_dir)
    result = _random_plan_result(teacher, tmp_path, uniform=True)
    assert result.plan.uniform
    pruned = result.save(tmp_path / "pruned")
    assert json.loads((pruned / PLAN_FILE).read_text())["uniform"] is True
    out = tmp_path / "rebuilt"
    assert main(["apply-plan", "--model", str(teacher_dir), "--plan", str(pruned), "--out", str(out)]) == 0
    config = json.loads((out / "config.json").read_text())
    assert config["architectures"] == ["LlamaForSequenceClassification"] and "prunekit_layers" not in config
    assert config == json.loads((pruned / "config.json").read_text())
    batch = {"input_ids": torch.tensor([[5, 6, 7, 8]]), "attention_mask": torch.ones(1, 4, dtype=torch.long)}
    assert torch.equal(outputs_of(load_pruned(out), batch), outputs_of(load_pruned(pruned), batch))
