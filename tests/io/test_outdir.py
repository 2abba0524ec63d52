"""Output safety (issue 11, item 1): ``--overwrite`` replaces only a folder prunekit wrote, never the
current folder, the input model or data or a folder around them, never a folder with files prunekit did
not write; the replacement is atomic; folders get the usual permissions; a killed run's hidden leftovers
are cleaned up by the next run. Each case is run through the CLI as a user would, and every file that
was there before must survive a refusal."""

from __future__ import annotations

import json
import os
import stat
import subprocess
from pathlib import Path

import pytest
from test_cli import assert_clean_error, prune_args, run

from prunekit import ConfigError
from prunekit.io.outdir import MARKER, atomic_output_dir, check_output_dir, clean_leftovers


def dead_pid() -> int:
    child = subprocess.Popen(["true"])
    child.wait()
    return child.pid


def snapshot(folder: Path) -> dict[str, bytes]:
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture
def project(tmp_path, teacher_dir, sst2_dir, monkeypatch):
    """A user's working folder holding the teacher, the data and an unrelated file; the cwd."""
    work = tmp_path / "work"
    work.mkdir()
    teacher = work / "teacher"
    data = work / "data"
    os.replace(teacher_dir, teacher)
    os.replace(sst2_dir, data)
    (work / "notes.txt").write_text("my only copy")
    monkeypatch.chdir(work)
    return work, teacher, data


def prune_cli(capsys, teacher, data, out, *extra):
    return run(capsys, prune_args(teacher, data, out, "--no-eval", *extra))


def test_out_dot_with_overwrite_is_refused_and_nothing_is_lost(project, capsys):
    work, teacher, data = project
    before = snapshot(work)
    status, _, err = prune_cli(capsys, Path("teacher"), Path("data"), Path("."), "--overwrite")
    assert_clean_error(status, err, "prune", "current folder")
    assert snapshot(work) == before


def test_out_holding_the_current_folder_is_refused(project, capsys, monkeypatch):
    work, teacher, data = project
    (work / "sub").mkdir()
    monkeypatch.chdir(work / "sub")
    before = snapshot(work)
    status, _, err = prune_cli(capsys, teacher, data, work, "--overwrite")
    assert_clean_error(status, err, "prune", "holds the current folder")
    assert snapshot(work) == before


@pytest.mark.parametrize("where", ["model", "data", "inside-model", "around-model"])
def test_out_touching_an_input_is_refused(where, project, capsys, tmp_path, monkeypatch):
    work, teacher, data = project
    monkeypatch.chdir(tmp_path)  # not the cwd rule: the input rule
    out = {"model": teacher, "data": data, "inside-model": teacher / "pruned", "around-model": work}[where]
    before = snapshot(work)
    status, _, err = prune_cli(capsys, teacher, data, out, "--overwrite")
    line = assert_clean_error(status, err, "prune", "input")
    assert "never writes over its inputs" in line
    assert snapshot(work) == before


def test_overwrite_of_a_folder_prunekit_did_not_write_is_refused(project, capsys):
    work, teacher, data = project
    out = work / "results"
    out.mkdir()
    (out / "paper.tex").write_text("months of work")
    status, _, err = prune_cli(capsys, teacher, data, out, "--overwrite")
    assert_clean_error(status, err, "prune", "--overwrite refused", "not a folder prunekit wrote")
    assert snapshot(out) == {"paper.tex": b"months of work"}


def test_overwrite_of_a_pruned_folder_with_a_file_added_is_refused(project, capsys):
    work, teacher, data = project
    out = work / "pruned"
    status, _, err = prune_cli(capsys, teacher, data, out)
    assert status == 0, err
    (out / "my-eval.csv").write_text("added by the user")
    before = snapshot(out)
    status, _, err = prune_cli(capsys, teacher, data, out, "--overwrite")
    assert_clean_error(status, err, "prune", "my-eval.csv", "prunekit did not write")
    assert snapshot(out) == before


def test_overwrite_replaces_a_folder_prunekit_wrote(project, capsys):
    work, teacher, data = project
    out = work / "pruned"
    assert prune_cli(capsys, teacher, data, out)[0] == 0
    marker = json.loads((out / MARKER).read_text())
    assert marker["written_by"] == "prunekit" and "model.safetensors" in marker["files"]
    status, _, err = prune_cli(capsys, teacher, data, out, "--overwrite", "--seed", "1")
    assert status == 0, err
    assert json.loads((out / "prune_report.json").read_text())["seed"] == 1
    assert sorted(p.name for p in work.iterdir() if p.name.startswith(".")) == []  # nothing hidden left
    assert (work / "notes.txt").read_text() == "my only copy"


def test_output_folders_get_the_usual_permissions(project, capsys):
    work, teacher, data = project
    old = os.umask(0o022)
    try:
        out = work / "pruned"
        assert prune_cli(capsys, teacher, data, out)[0] == 0
    finally:
        os.umask(old)
    assert stat.S_IMODE(out.stat().st_mode) == 0o755
    assert {stat.S_IMODE(p.stat().st_mode) for p in out.rglob("*") if p.is_file()} == {0o644}


def test_a_killed_runs_leftovers_are_cleaned_by_the_next_run(tmp_path):
    out = tmp_path / "out"
    dead = dead_pid()
    stale_tmp = tmp_path / f".out.tmp-{dead}-abc"
    stale_tmp.mkdir()
    (stale_tmp / "model.safetensors").write_bytes(b"half")
    other = tmp_path / f".other.tmp-{dead}-abc"  # another target's: not ours to touch
    other.mkdir()
    with atomic_output_dir(out) as folder:
        (folder / "a.txt").write_text("a")
    assert not stale_tmp.exists() and other.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == [other.name, "out"]


def test_a_run_killed_between_the_two_renames_gets_its_old_folder_back(tmp_path):
    out = tmp_path / "out"
    dead = dead_pid()
    aside = tmp_path / f".out.old-{dead}"
    aside.mkdir()
    (aside / "config.json").write_text("{}")
    clean_leftovers(out)
    assert (out / "config.json").read_text() == "{}" and not aside.exists()


def test_a_live_runs_temporary_folder_is_left_alone(tmp_path):
    out = tmp_path / "out"
    live = tmp_path / f".out.tmp-{os.getppid()}-abc"
    live.mkdir()
    clean_leftovers(out)
    assert live.exists()


def test_an_output_that_cannot_be_created_is_refused_before_work(tmp_path):
    (tmp_path / "afile").write_text("x")
    with pytest.raises(ConfigError, match="cannot be created: .*afile is a file"):
        check_output_dir(tmp_path / "afile" / "out")
    if os.geteuid() != 0:  # root may write anywhere
        locked = tmp_path / "locked"
        locked.mkdir(mode=0o500)
        with pytest.raises(ConfigError, match="not writable"):
            check_output_dir(locked / "out")


def test_a_folder_from_an_earlier_release_may_be_overwritten(tmp_path):
    old = tmp_path / "old"
    old.mkdir()
    for name in ("config.json", "model.safetensors", "prune_report.json", "vocab.txt", "structure.png"):
        (old / name).write_text("x")
    assert check_output_dir(old, overwrite=True) == old
    (old / "mine.txt").write_text("y")
    with pytest.raises(ConfigError, match="prunekit did not write it"):
        check_output_dir(old, overwrite=True)
