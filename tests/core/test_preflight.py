"""Issue 11 items 2 and 3: everything a run can check is checked before the work starts, and every bad
input ends in one clear line (exit 2, no traceback) that names the problem, with no output folder
left behind; a run that cannot deliver what was asked never exits 0 silently."""

from __future__ import annotations

import copy
import json
import shutil
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from builders import view
from conftest import build_tiny_model, save_teacher, write_sst2
from test_cli import assert_clean_error, assert_no_output, prune_args, run

import prunekit.api
import prunekit.tasks.evaluate
from prunekit import ModelError, save_pruned
from prunekit.core.surgery import LayerPlan, PruningPlan, apply_plan


@pytest.fixture
def ws(tmp_path, teacher_dir, sst2_dir, tokenizer, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "a-file").write_text("not a folder")
    return {"tmp": tmp_path, "teacher": teacher_dir, "data": sst2_dir, "tokenizer": tokenizer,
            "out": tmp_path / "out"}


def _no_tokenizer(w: dict) -> Path:
    folder = w["tmp"] / "no-tokenizer"
    build_tiny_model("bert", "classification", num_labels=2).save_pretrained(folder)
    return folder


def _copy_teacher(w: dict, name: str, edit: Callable[[dict], object]) -> Path:
    folder = w["tmp"] / name
    shutil.copytree(w["teacher"], folder)
    config = json.loads((folder / "config.json").read_text())
    edit(config)
    (folder / "config.json").write_text(json.dumps(config))
    return folder


def _array_config(w: dict) -> Path:
    folder = w["tmp"] / "array-config"
    shutil.copytree(w["teacher"], folder)
    (folder / "config.json").write_text("[1, 2, 3]")
    return folder


def _latin1_data(w: dict) -> Path:
    folder = write_sst2(w["tmp"] / "latin1")
    lines = (folder / "train.tsv").read_bytes().split(b"\n")
    lines[3] = b"caf\xe9 good it was\t1"  # line 4 of the file: Latin-1, not UTF-8
    (folder / "train.tsv").write_bytes(b"\n".join(lines))
    return folder


def _no_dev(w: dict) -> Path:
    folder = w["tmp"] / "train-only"
    folder.mkdir()
    shutil.copy(w["data"] / "train.tsv", folder / "train.tsv")
    return folder


def _pruned_folder(w: dict, name: str = "pruned") -> Path:
    model = build_tiny_model("bert", "classification", num_labels=2)
    plan = PruningPlan([LayerPlan(heads=[0, 2], neurons=list(range(0, 37, 2))), LayerPlan(heads=[1], neurons=[3])])
    return save_pruned(apply_plan(view(model), copy.deepcopy(plan)), w["tmp"] / name, tokenizer=w["tokenizer"])


def _edit_pruned(w: dict, name: str, edit: Callable[[dict], object]) -> Path:
    folder = _pruned_folder(w, name)
    config = json.loads((folder / "config.json").read_text())
    edit(config)
    (folder / "config.json").write_text(json.dumps(config))
    return folder


def _eval(model: Path, data: Path, *extra) -> list:
    return ["eval", "--model", model, "--task", "sst2", "--data", data, "--device", "cpu", *extra]


# name: (argv builder, subcommand, words the one error line must hold)
CASES: dict[str, tuple[Callable[[dict], list], str, tuple[str, ...]]] = {
    # ---- item 2: no silently wrong result --------------------------------------------------------------
    "model folder without a tokenizer": (
        lambda w: prune_args(_no_tokenizer(w), w["data"], w["out"], "--no-eval"), "prune",
        ("no-tokenizer", "no tokenizer files", "--tokenizer")),
    "3-label head for 2-label sst2, --no-eval": (
        lambda w: prune_args(save_teacher(w["tmp"] / "three", num_labels=3), w["data"], w["out"], "--no-eval"),
        "prune", ("3 labels", "'sst2'", "2 labels")),
    "regression head for classification sst2": (
        lambda w: prune_args(save_teacher(w["tmp"] / "reg", head="regression", num_labels=1), w["data"], w["out"],
                             "--no-eval"), "prune", ("regression head", "'sst2'")),
    "classification head for regression stsb": (
        lambda w: prune_args(w["teacher"], w["data"], w["out"], "--no-eval", task="stsb"), "prune",
        ("2 labels", "'stsb'", "regression head")),
    "problem_type regression on a 2-label sst2 head": (
        lambda w: prune_args(_copy_teacher(w, "ptype", lambda c: c.update(problem_type="regression")), w["data"],
                             w["out"], "--no-eval"), "prune", ("regression", "'sst2'", "classification")),
    "--num-tokens 0": (lambda w: prune_args(w["teacher"], w["data"], w["out"], "--num-tokens", "0"), "prune",
                       ("--num-tokens", "got 0")),
    "--num-sequences -5": (lambda w: prune_args(w["teacher"], w["data"], w["out"], "--num-sequences", "-5"),
                           "prune", ("--num-sequences", "-5")),
    "--seq-len 0": (lambda w: prune_args(w["teacher"], w["data"], w["out"], "--seq-len", "0"), "prune",
                    ("--seq-len",)),
    "--seq-len above the model's positions": (
        lambda w: prune_args(w["teacher"], w["data"], w["out"], "--seq-len", "1000"), "prune",
        ("seq_len 1000", "128 positions")),
    "eval --batch-size 0": (lambda w: _eval(w["teacher"], w["data"], "--batch-size", "0"), "eval",
                            ("--batch-size",)),
    "eval --max-length above the model's positions": (
        lambda w: _eval(w["teacher"], w["data"], "--max-length", "512"), "eval", ("--max-length 512", "128")),
    "bench --rounds 0": (lambda w: ["bench", "--model", w["teacher"], "--rounds", "0"], "bench", ("--rounds",)),
    "bench --batch-sizes 8,0": (lambda w: ["bench", "--model", w["teacher"], "--batch-sizes", "8,0"], "bench",
                                ("--batch-sizes",)),
    "bench --seq-lens above the positions": (
        lambda w: ["bench", "--model", w["teacher"], "--seq-lens", "4096"], "bench", ("4096", "128 positions")),
    "lut --repeats 0": (lambda w: ["lut", "--model", w["teacher"], "--out", w["tmp"] / "lut.json", "--repeats", "0"],
                        "lut", ("--repeats",)),
    "compare --bench-seq-len -1": (
        lambda w: ["compare", "--model", w["teacher"], "--task", "sst2", "--data", w["data"], "--out", w["out"],
                   "--bench-seq-len", "-1"], "compare", ("--bench-seq-len",)),
    "finetune --batch-size 0": (
        lambda w: ["finetune", "--model", w["teacher"], "--task", "sst2", "--data", w["data"], "--out", w["out"],
                   "--batch-size", "0"], "finetune", ("--batch-size",)),
    "a latency table given but unused": (
        lambda w: prune_args(w["teacher"], w["data"], w["out"], "--lut", "lut.json"), "prune",
        ("latency table", "keep_flops", "--lut")),
    "duplicate budgets": (lambda w: prune_args(w["teacher"], w["data"], w["out"], keep="0.7,0.5,0.7"), "prune",
                          ("0.7 twice",)),
    "compare with duplicate budgets": (
        lambda w: ["compare", "--model", w["teacher"], "--task", "sst2", "--data", w["data"], "--out", w["out"],
                   "--keep-flops", "0.5,0.5"], "compare", ("0.5 twice",)),
    "dev split missing with evaluation on": (lambda w: prune_args(w["teacher"], _no_dev(w), w["out"]), "prune",
                                             ("no dev data", "train-only")),
    "an output path that cannot be created": (
        lambda w: prune_args(w["teacher"], w["data"], w["tmp"] / "a-file" / "out"), "prune",
        ("cannot be created", "a-file")),
    "CoFi schedule shorter than its warm-up": (
        lambda w: prune_args(w["teacher"], w["data"], w["out"], "--method", "cofi", "--epochs", "1",
                             "--set", "warmup_epochs=2", "--set", "batch_size=8", "--no-eval"),
        "prune", ("cannot reach", "keep_flops 0.5", "warm-up")),
    # ---- item 3: one clear line instead of a traceback -------------------------------------------------
    "data that is not UTF-8": (lambda w: prune_args(w["teacher"], _latin1_data(w), w["out"], "--no-eval"), "prune",
                               ("train.tsv", "not UTF-8", "line 4")),
    "config.json holding an array": (lambda w: prune_args(_array_config(w), w["data"], w["out"]), "prune",
                                     ("config.json", "list")),
    "config.json with a wrong type": (
        lambda w: prune_args(_copy_teacher(w, "wrong-type", lambda c: c.update(num_hidden_layers="two")), w["data"],
                             w["out"]), "prune", ("config.json", "not a valid model config", "num_hidden_layers")),
    "prunekit_layers not a list": (
        lambda w: _eval(_edit_pruned(w, "layers-str", lambda c: c.update(prunekit_layers="2x4")), w["data"]), "eval",
        ("prunekit_layers", "must be a list")),
    "prunekit_layers with a layer too few": (
        lambda w: _eval(_edit_pruned(w, "layers-short", lambda c: c["prunekit_layers"].pop()), w["data"]), "eval",
        ("prunekit_layers", "1 layers", "has 2")),
    "prunekit_layers disagreeing with the weights": (
        lambda w: _eval(_edit_pruned(w, "layers-wrong", lambda c: c["prunekit_layers"][0].update(num_heads=3)),
                        w["data"]), "eval", ("prunekit_layers", "disagree with the weights")),
    "prunekit_hidden_size disagreeing with the weights": (
        lambda w: _eval(_edit_pruned(w, "hidden-wrong", lambda c: c.update(prunekit_hidden_size=16)), w["data"]),
        "eval", ("prunekit_layers", "disagree")),
    "unknown --device": (lambda w: prune_args(w["teacher"], w["data"], w["out"])[:-2] + ["--device", "gpu"],
                         "prune", ("unknown device", "gpu")),
    "--device meta": (lambda w: _eval(w["teacher"], w["data"])[:-2] + ["--device", "meta"], "eval", ("meta",)),
    "an unwritable --json path": (lambda w: _eval(w["teacher"], w["data"], "--json", w["tmp"] / "a-file" / "m.json"),
                                  "eval", ("--json", "a-file", "is a file")),
    "--json naming a folder": (lambda w: _eval(w["teacher"], w["data"], "--json", w["tmp"]), "eval",
                               ("--json", "is a folder")),
    "a local model path that does not exist": (
        lambda w: prune_args("./no-such-model", w["data"], w["out"]), "prune", ("no-such-model", "does not exist")),
    "a tokenizer path that does not exist": (
        lambda w: prune_args(w["teacher"], w["data"], w["out"], "--tokenizer", "./no-such-tokenizer"), "prune",
        ("no-such-tokenizer", "does not exist")),
}


@pytest.mark.parametrize("case", list(CASES))
def test_bad_input_is_refused_before_any_work(case, ws, capsys, monkeypatch):
    make_args, command, words = CASES[case]
    argv = make_args(ws)

    def no_work(*args, **kwargs):
        raise AssertionError("the work started although the input was bad")

    # The checks come first: no calibration sample is drawn and nothing is evaluated. (CoFi's schedule
    # is checked once its training data is tokenized, before any training step.)
    if "CoFi" not in case and "UTF-8" not in case:  # (data is first read for the calibration sample)
        monkeypatch.setattr(prunekit.api, "build_calibration_sample", no_work)
        monkeypatch.setattr(prunekit.tasks.evaluate, "evaluate", no_work)
    status, _, err = run(capsys, argv)
    assert_clean_error(status, err, command, *words)
    assert_no_output(ws["out"])


def test_a_tokenizer_given_explicitly_is_used(ws, capsys):
    folder = _no_tokenizer(ws)
    status, _, err = run(capsys, prune_args(folder, ws["data"], ws["out"], "--tokenizer", ws["teacher"]))
    assert status == 0, err
    assert (ws["out"] / "tokenizer.json").is_file() or (ws["out"] / "vocab.txt").is_file()
    status, out, err = run(capsys, _eval(folder, ws["data"], "--tokenizer", ws["teacher"]))
    assert status == 0, err
    assert json.loads(out)["num_examples"] == 24


def test_a_budget_that_prunes_every_unit_warns_with_what_is_left(ws, capsys, caplog):
    with caplog.at_level("WARNING", logger="prunekit"):
        status, _, err = run(capsys, prune_args(ws["teacher"], ws["data"], ws["out"], "--no-eval", keep="0.001"))
    assert status == 0, err
    assert "keep_flops 0.001 leaves 0 of 8 heads and 0 of 74 FFN neurons" in caplog.text
    report = json.loads((ws["out"] / "prune_report.json").read_text())
    assert "every unit was pruned" in report["warnings"][0]


def test_a_model_on_the_meta_device_is_refused(sst2_dir, tokenizer):
    with torch.device("meta"):
        model = build_tiny_model("bert", "classification", num_labels=2)
    with pytest.raises(ModelError, match="meta device"):
        prunekit.api.prune(model, tokenizer, str(sst2_dir), keep_flops=0.5, num_tokens=200)


def test_a_hub_like_name_that_is_not_local_says_both(ws, capsys, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    status, _, err = run(capsys, prune_args("no-such-model-here", ws["data"], ws["out"]))
    assert_clean_error(status, err, "prune", "no-such-model-here", "no local folder")
    assert_no_output(ws["out"])


# ---- CoFi: the saved model meets the budget ----------------------------------------------------------------
def test_cofi_on_a_short_valid_schedule_meets_keep_params(ws, capsys):
    data = write_sst2(ws["tmp"] / "cofi-data", n_train=48, n_dev=8)
    status, stdout, err = run(capsys, [
        "prune", "--method", "cofi", "--model", ws["teacher"], "--task", "sst2", "--data", data, "--keep-params",
        "0.3", "--epochs", "2", "--finetune-epochs", "0", "--set", "warmup_epochs=1", "--set", "batch_size=8",
        "--set", "eval_steps=0", "--no-bench", "--no-eval", "--out", ws["out"], "--device", "cpu"])  # fmt: skip
    assert status == 0, err
    report = json.loads((ws["out"] / "prune_report.json").read_text())
    # 12 steps are far too few for the controller: the projection makes the gates meet the target.
    assert report["method_log"]["target_projection"]["applied"]
    assert report["target_keep"] == 0.3
    assert 0.3 - 0.01 <= report["achieved_keep"] <= 0.3
    assert report["achieved_keep"] == pytest.approx(report["prunable_params_kept"])
    assert "keep_params target 0.3000, achieved" in stdout
    from prunekit.core.accounting import count_prunable_params, full_prunable_params
    from prunekit.io.folders import load_pruned

    model = load_pruned(ws["out"])
    assert count_prunable_params(view(model)) / full_prunable_params(view(model)) == pytest.approx(report["achieved_keep"])


def test_finetune_refuses_a_folder_without_a_tokenizer_and_takes_one_given(ws, capsys):
    folder = _no_tokenizer(ws)
    argv = ["finetune", "--model", folder, "--task", "sst2", "--data", ws["data"], "--out", ws["out"], "--epochs", "1",
            "--batch-size", "16", "--max-train-samples", "16", "--device", "cpu"]  # fmt: skip
    status, _, err = run(capsys, argv)
    assert_clean_error(status, err, "finetune", "no tokenizer files", "--tokenizer")
    assert_no_output(ws["out"])
    status, _, err = run(capsys, [*argv, "--tokenizer", ws["teacher"]])
    assert status == 0, err
    assert (ws["out"] / "tokenizer.json").is_file() or (ws["out"] / "vocab.txt").is_file()
