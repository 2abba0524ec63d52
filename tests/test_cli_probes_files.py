"""Probes of issue 20 item 5, as a new user would try them: result files (--json, lut --out, report
--out) pointed at folders, inputs, links, missing folders and prunekit's own files; apply-plan with
hand-edited or misplaced plans and outputs; --overwrite of changed folders; CoFi's checkpoint folder
beside the output. Each is one clear line and exit 2 (or works), and nothing that was there is lost."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from conftest import build_tokenizer, write_sst2
from test_cli import assert_clean_error, run

import prunekit
from prunekit.io.folders import PLAN_FILE, PLAN_TENSORS, load_pruned
from prunekit.io.outdir import MARKER


def snapshot(folder: Path) -> dict[str, bytes]:
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture
def w(tmp_path, make_teacher, monkeypatch):
    """A working folder (the cwd) with a teacher, SST-2 data and a folder pruned from the teacher."""
    teacher = make_teacher()
    data = write_sst2(tmp_path / "data", n_train=16, n_dev=8)
    result = prunekit.prune(load_pruned(teacher), build_tokenizer(), str(data), method="kprune", keep_flops=0.5,
                            num_sequences=8)  # Kprune: the plan has tensors (re-fitted weights)
    pruned = result.save(tmp_path / "pruned")
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    return {"tmp": tmp_path, "work": work, "teacher": teacher, "data": data, "pruned": pruned}


def eval_args(w: dict, json_path, *extra) -> list:
    return ["eval", "--model", w["teacher"], "--task", "sst2", "--data", w["data"], "--device", "cpu",
            "--max-examples", "4", "--json", json_path, *extra]


def apply_args(w: dict, out, *extra, model=None, plan=None) -> list:
    return ["apply-plan", "--model", model or w["teacher"], "--plan", plan or w["pruned"], "--out", out, *extra]


# ---- result files ---------------------------------------------------------------------------------------
def test_json_pointing_at_a_folder(w, capsys):
    status, _, err = run(capsys, eval_args(w, w["work"]))
    assert_clean_error(status, err, "eval", "is a folder", "metrics.json")


def test_json_empty_string(w, capsys):
    status, _, err = run(capsys, eval_args(w, ""))
    assert_clean_error(status, err, "eval", "--json is empty")


def test_json_in_a_folder_that_does_not_exist_yet_is_made(w, capsys):
    target = w["work"] / "new" / "sub" / "m.json"
    assert run(capsys, eval_args(w, target))[0] == 0
    assert json.loads(target.read_text())["task"] == "sst2"


def test_json_whose_parent_is_a_file(w, capsys):
    (w["work"] / "afile").write_text("x")
    status, _, err = run(capsys, eval_args(w, w["work"] / "afile" / "m.json"))
    assert_clean_error(status, err, "eval", "afile is a file, not a folder")


@pytest.mark.skipif(os.geteuid() == 0, reason="root may write anywhere")
def test_json_in_a_read_only_folder(w, capsys):
    locked = w["work"] / "locked"
    locked.mkdir(mode=0o500)
    status, _, err = run(capsys, eval_args(w, locked / "m.json"))
    assert_clean_error(status, err, "eval", "not writable")


def test_json_through_a_link_into_the_model_is_refused(w, capsys):
    link = w["work"] / "link.json"
    link.symlink_to(w["teacher"] / "config.json")
    before = snapshot(w["teacher"])
    status, _, err = run(capsys, eval_args(w, link, "--overwrite"))
    assert_clean_error(status, err, "eval", "never writes over its inputs")
    assert snapshot(w["teacher"]) == before and link.is_symlink()


def test_json_through_a_dangling_link_writes_its_target(w, capsys):
    link = w["work"] / "dangling.json"
    link.symlink_to(w["work"] / "results" / "x.json")
    assert run(capsys, eval_args(w, link))[0] == 0
    assert link.is_symlink() and json.loads((w["work"] / "results" / "x.json").read_text())["task"] == "sst2"


def test_json_onto_another_models_files_is_refused_even_with_overwrite(w, capsys):
    before = snapshot(w["pruned"])
    for name in ("config.json", "model.safetensors", MARKER, PLAN_FILE):
        status, _, err = run(capsys, eval_args(w, w["pruned"] / name, "--overwrite"))
        assert_clean_error(status, err, "eval", "choose another file" if name != PLAN_FILE else "prunekit wrote")
    assert snapshot(w["pruned"]) == before


def test_json_onto_the_tokenizer_input_is_refused(w, capsys, tmp_path):
    tokenizer_dir = tmp_path / "tok"
    build_tokenizer().save_pretrained(tokenizer_dir)
    status, _, err = run(capsys, eval_args(w, tokenizer_dir / "tokenizer.json", "--overwrite", "--tokenizer",
                                           tokenizer_dir))
    assert_clean_error(status, err, "eval", "never writes over its inputs")


def test_bench_json_onto_the_baseline_is_refused(w, capsys):
    before = snapshot(w["teacher"])
    status, _, err = run(capsys, ["bench", "--model", w["pruned"], "--baseline", w["teacher"], "--json",
                                  w["teacher"] / "config.json", "--overwrite", "--rounds", "1", "--batch-sizes", "1",
                                  "--seq-lens", "8", "--device", "cpu"])
    assert_clean_error(status, err, "bench", "never writes over its inputs")
    assert snapshot(w["teacher"]) == before


def test_lut_out_as_a_new_file_inside_the_model_is_refused(w, capsys):
    status, _, err = run(capsys, ["lut", "--model", w["teacher"], "--out", w["teacher"] / "lut.json"])
    assert_clean_error(status, err, "lut", "never writes over its inputs")
    assert not (w["teacher"] / "lut.json").exists()


def test_lut_out_dot(w, capsys):
    status, _, err = run(capsys, ["lut", "--model", w["teacher"], "--out", "."])
    assert_clean_error(status, err, "lut", "is a folder", "lut.json")


def test_report_out_onto_the_models_config_is_refused(w, capsys):
    before = snapshot(w["teacher"])
    status, _, err = run(capsys, ["report", w["teacher"], "--out", w["teacher"] / "config.json", "--overwrite"])
    assert_clean_error(status, err, "report", "never writes over its inputs")
    assert snapshot(w["teacher"]) == before


# ---- apply-plan: outputs, plans, teachers -------------------------------------------------------------
@pytest.mark.parametrize("where", ["model", "inside-plan", "link-to-model", "a-file"])
def test_apply_plan_out_onto_its_inputs(where, w, capsys):
    (w["work"] / "afile").write_text("x")
    (w["work"] / "tlink").symlink_to(w["teacher"])
    out = {"model": w["teacher"], "inside-plan": w["pruned"] / "again", "link-to-model": w["work"] / "tlink",
           "a-file": w["work"] / "afile"}[where]
    before = snapshot(w["tmp"])
    status, _, err = run(capsys, apply_args(w, out, "--overwrite"))
    assert_clean_error(status, err, "apply-plan", "input" if where != "a-file" else "is a file")
    assert snapshot(w["tmp"]) == before


def test_apply_plan_out_a_link_to_an_empty_folder_fills_the_folder(w, capsys, tmp_path):
    real = tmp_path / "elsewhere"
    real.mkdir()
    (w["work"] / "elink").symlink_to(real)
    assert run(capsys, apply_args(w, w["work"] / "elink"))[0] == 0
    assert (w["work"] / "elink").is_symlink() and (real / "model.safetensors").is_file()


def test_apply_plan_from_a_plan_json_path(w, capsys):
    assert run(capsys, apply_args(w, "rebuilt", plan=w["pruned"] / PLAN_FILE))[0] == 0


def test_apply_plan_from_a_plan_json_copied_alone(w, capsys):
    lone = w["work"] / "lone"
    lone.mkdir()
    (lone / PLAN_FILE).write_bytes((w["pruned"] / PLAN_FILE).read_bytes())
    status, _, err = run(capsys, apply_args(w, "rebuilt", plan=lone))
    assert_clean_error(status, err, "apply-plan", "plan.safetensors is missing", "copy the whole pruned folder")


def test_apply_plan_onto_a_pruned_folder_says_it_is_pruned(w, capsys):
    status, _, err = run(capsys, apply_args(w, "rebuilt", model=w["pruned"]))
    assert_clean_error(status, err, "apply-plan", "itself a pruned model", "--force")
    assert not (w["work"] / "rebuilt").exists()


def test_apply_plan_with_the_teacher_as_the_plan(w, capsys):
    status, _, err = run(capsys, apply_args(w, "rebuilt", plan=w["teacher"]))
    assert_clean_error(status, err, "apply-plan", "no pruning plan")


def _edited(w: dict, edit) -> Path:
    folder = w["work"] / "edited"
    folder.mkdir()
    for p in w["pruned"].iterdir():
        (folder / p.name).write_bytes(p.read_bytes())
    edit(folder)
    return folder


def _json_edit(change):
    def edit(folder: Path) -> None:
        data = json.loads((folder / PLAN_FILE).read_text())
        change(data)
        (folder / PLAN_FILE).write_text(json.dumps(data))
    return edit


EDITS = {
    "not-json": (lambda f: (f / PLAN_FILE).write_text("{not json"), "not valid JSON"),
    "empty-file": (lambda f: (f / PLAN_FILE).write_text(""), "not valid JSON"),
    "layers-an-object": (_json_edit(lambda d: d.update(layers={})), "'layers' must be a list"),
    "no-layers": (_json_edit(lambda d: d.pop("layers")), "has no 'layers'"),
    "extra-layer": (_json_edit(lambda d: d["layers"].append(d["layers"][0])), "lists 3 layers, the teacher has 2"),
    "hidden-float": (_json_edit(lambda d: d.update(hidden=[0, 1.5])), "whole-number indices"),
    "repeated-heads": (_json_edit(lambda d: d["layers"][0].update(heads=[0, 0])), "kept indices repeat"),
    "names-a-missing-tensor": (_json_edit(lambda d: d["tensors"].append("layers.0.bogus")), "layers.0.bogus"),
    "tensors-not-a-list": (_json_edit(lambda d: d.update(tensors="all")), "'tensors' must be a list"),
    "corrupt-tensors": (lambda f: (f / PLAN_TENSORS).write_bytes(b"\x00" * 40), "not a readable safetensors"),
    "uniform-a-string": (_json_edit(lambda d: d.update(uniform="yes")), "'uniform' must be true or false"),
    "teacher-digest-edited": (_json_edit(lambda d: d["teacher"].update(weights_sha256="0" * 64)),
                              "made on another teacher: weights"),
}


@pytest.mark.parametrize("case", list(EDITS))
def test_apply_plan_with_a_hand_edited_plan(case, w, capsys):
    edit, words = EDITS[case]
    plan = _edited(w, edit)
    status, _, err = run(capsys, apply_args(w, "rebuilt", plan=plan))
    assert_clean_error(status, err, "apply-plan", words)
    assert not (w["work"] / "rebuilt").exists()
    assert not [p.name for p in w["work"].iterdir() if p.name.startswith(".rebuilt")]


# ---- --overwrite of folders prunekit wrote -----------------------------------------------------------
def test_overwrite_of_a_folder_whose_weights_became_a_link_is_refused(w, capsys):
    out = w["work"] / "o1"
    assert run(capsys, apply_args(w, out))[0] == 0
    (out / "model.safetensors").rename(w["work"] / "kept.safetensors")
    (out / "model.safetensors").symlink_to(w["work"] / "kept.safetensors")
    status, _, err = run(capsys, apply_args(w, out, "--overwrite"))
    assert_clean_error(status, err, "apply-plan", "model.safetensors was changed")
    assert (out / "model.safetensors").is_symlink()


def test_overwrite_of_a_folder_with_a_marker_from_before_digests(w, capsys):
    out = w["work"] / "o2"
    assert run(capsys, apply_args(w, out))[0] == 0
    marker = json.loads((out / MARKER).read_text())
    del marker["digests"]
    (out / MARKER).write_text(json.dumps(marker))
    assert run(capsys, apply_args(w, out, "--overwrite"))[0] == 0
    assert "digests" in json.loads((out / MARKER).read_text())


# ---- CoFi's checkpoint folder --------------------------------------------------------------------------
@pytest.mark.parametrize("where", ["out", "inside-out", "model"])
def test_checkpoint_dir_beside_the_output_or_in_the_model_is_refused_before_work(where, w, capsys):
    out = w["work"] / "cofi-out"
    checkpoint = {"out": out, "inside-out": out / "ck", "model": w["teacher"]}[where]
    before = snapshot(w["teacher"])
    status, _, err = run(capsys, ["prune", "--model", w["teacher"], "--task", "sst2", "--data", w["data"],
                                  "--method", "cofi", "--keep-params", "0.5", "--out", out, "--checkpoint-dir",
                                  checkpoint, "--no-bench", "--no-eval", "--device", "cpu"])
    assert_clean_error(status, err, "prune", "--checkpoint-dir", "output folder" if where != "model" else "input")
    assert not out.exists() and snapshot(w["teacher"]) == before


def test_overwrite_of_a_folder_whose_marker_digests_were_edited_is_refused(w, capsys):
    out = w["work"] / "o3"
    assert run(capsys, apply_args(w, out))[0] == 0
    marker = json.loads((out / MARKER).read_text())
    marker["digests"]["config.json"] = "edited"
    (out / MARKER).write_text(json.dumps(marker))
    status, _, err = run(capsys, apply_args(w, out, "--overwrite"))
    assert_clean_error(status, err, "apply-plan", "marker", "unreadable")


def test_a_killed_writes_temporary_file_is_removed_by_the_next_write(tmp_path):
    from builders import dead_pid

    from prunekit.io.outdir import write_output_file

    stale = tmp_path / f".m.json.tmp-{dead_pid()}-abc.json"
    stale.write_text("{half")
    live = tmp_path / f".m.json.tmp-{os.getppid()}-abc.json"  # a running process's: left alone
    live.write_text("{")
    write_output_file(tmp_path / "m.json", "{}\n")
    assert not stale.exists() and live.exists() and (tmp_path / "m.json").read_text() == "{}\n"
