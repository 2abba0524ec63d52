"""Output safety (issue 11, item 1): ``--overwrite`` replaces only a folder prunekit wrote, never the
current folder, the input model or data or a folder around them, never a folder with files prunekit did
not write; the replacement is atomic; folders get the usual permissions; a killed run's hidden leftovers
are cleaned up by the next run. Each case is run through the CLI as a user would, and every file that
was there before must survive a refusal."""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path

import pytest
from builders import dead_pid
from test_cli import assert_clean_error, prune_args, run

from prunekit import ConfigError
from prunekit.cli import main
from prunekit.io.outdir import MARKER, atomic_output_dir, check_output_dir, clean_leftovers


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


# ---- issue 20 item 5: single files, changed files, folders that cannot be renamed ----------------------
EVAL = ["eval", "--task", "sst2", "--device", "cpu", "--max-examples", "4"]


@pytest.mark.parametrize("command", ["eval", "bench", "lut"])
@pytest.mark.parametrize("victim", ["config.json", "model.safetensors", "data/dev.tsv"])
def test_a_result_file_onto_an_input_is_refused_before_work(command, victim, project, capsys):
    """eval --json, bench --json and lut --out over the model's config or weights or the dev data:
    one line, exit 2, every byte still there, --overwrite or not."""
    work, teacher, data = project
    target = work / victim if victim.startswith("data") else teacher / victim
    if command != "eval" and victim.startswith("data"):
        pytest.skip("only eval reads the data")
    before = snapshot(work)
    argv = {"eval": [*EVAL, "--model", teacher, "--data", data, "--json", target],
            "bench": ["bench", "--model", teacher, "--json", target, "--rounds", "1", "--batch-sizes", "1",
                      "--seq-lens", "8"],
            "lut": ["lut", "--model", teacher, "--out", target, "--repeats", "1", "--warmup", "0"]}[command]
    status, _, err = run(capsys, [*argv, "--overwrite"])
    assert_clean_error(status, err, command, "never writes over its inputs")
    assert snapshot(work) == before


def test_a_result_file_is_replaced_only_with_overwrite_and_atomically(project, capsys, monkeypatch):
    work, teacher, data = project
    target = work / "results" / "metrics.json"  # its folder is made
    argv = [*EVAL, "--model", teacher, "--data", data, "--json", target]
    assert run(capsys, argv)[0] == 0
    first = json.loads(target.read_text())
    assert first["task"] == "sst2" and stat.S_IMODE(target.stat().st_mode) & 0o044  # not mkstemp's 0600
    target.write_text("my edits")
    status, _, err = run(capsys, argv)
    assert_clean_error(status, err, "eval", "already exists", "--overwrite")
    assert target.read_text() == "my edits"
    # A write that fails half way leaves the old file whole and no temporary file.
    import prunekit.io.outdir as outdir

    def broken(src, dst):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(outdir.os, "replace", broken)
    with pytest.raises(OSError, match="No space"):
        main([str(a) for a in [*argv, "--overwrite"]])
    monkeypatch.undo()
    assert target.read_text() == "my edits"
    assert sorted(p.name for p in target.parent.iterdir()) == ["metrics.json"]
    assert run(capsys, [*argv, "--overwrite"])[0] == 0
    assert json.loads(target.read_text())["metrics"] == first["metrics"]


def test_lut_save_in_python_follows_the_same_rules(tmp_path):
    from conftest import build_tiny_model

    from prunekit.methods.lut import measure_latency_table

    table = measure_latency_table(build_tiny_model("bert"), batch_size=1, seq_len=8, neuron_step=16, warmup=0,
                                  repeats=1, threads=1)
    path = table.save(tmp_path / "lut.json")
    with pytest.raises(ConfigError, match="already exists"):
        table.save(path)
    table.save(path, overwrite=True)
    with pytest.raises(ConfigError, match="is a folder"):
        table.save(tmp_path)
    (tmp_path / "model").mkdir()
    with pytest.raises(ConfigError, match="never writes over its inputs"):
        table.save(tmp_path / "model" / "lut.json", inputs=[tmp_path / "model"])


def test_overwrite_refuses_a_pruned_folder_whose_file_was_changed(project, capsys):
    """A user's re-saved model.safetensors (same name, other bytes) inside a folder prunekit wrote."""
    work, teacher, data = project
    out = work / "pruned"
    assert prune_cli(capsys, teacher, data, out)[0] == 0
    marker = json.loads((out / MARKER).read_text())
    assert marker["digests"]["model.safetensors"]["size"] == (out / "model.safetensors").stat().st_size
    weights = bytearray((out / "model.safetensors").read_bytes())
    weights[-1] ^= 1  # same size, other content: the digest tells
    (out / "model.safetensors").write_bytes(bytes(weights))
    before = snapshot(out)
    status, _, err = prune_cli(capsys, teacher, data, out, "--overwrite")
    assert_clean_error(status, err, "prune", "model.safetensors", "changed since prunekit wrote it")
    assert snapshot(out) == before
    (out / "config.json").write_text("{}")  # another size
    with pytest.raises(ConfigError, match="config.json was changed"):
        check_output_dir(out, overwrite=True)


@pytest.mark.parametrize("errno_", [16, 18])  # EBUSY (a mount point), EXDEV
def test_an_empty_out_that_cannot_be_renamed_is_filled_in_place(errno_, project, capsys, monkeypatch):
    work, teacher, data = project
    out = work / "mounted"
    out.mkdir()
    import prunekit.io.outdir as outdir

    real_replace = os.replace

    def replace(src, dst):
        if Path(src) == out.resolve():
            raise OSError(errno_, os.strerror(errno_))
        return real_replace(src, dst)

    monkeypatch.setattr(outdir.os, "replace", replace)
    status, _, err = prune_cli(capsys, teacher, data, out)
    assert status == 0, err
    assert (out / "model.safetensors").is_file() and (out / MARKER).is_file()
    assert not [p.name for p in work.iterdir() if p.name.startswith(".")]
    assert not [p.name for p in out.iterdir() if p.name.startswith(".mounted")]
    # and it can be overwritten the same way
    status, _, err = prune_cli(capsys, teacher, data, out, "--overwrite", "--seed", "1")
    assert status == 0, err
    assert json.loads((out / "prune_report.json").read_text())["seed"] == 1


def test_a_mount_point_out_is_written_in_place_from_the_start(project, capsys, monkeypatch):
    work, teacher, data = project
    out = work / "mnt"
    out.mkdir()
    import prunekit.io.outdir as outdir

    real_ismount = os.path.ismount
    monkeypatch.setattr(outdir.os.path, "ismount", lambda p: Path(p) == out.resolve() or real_ismount(p))
    real_mkdtemp = outdir.tempfile.mkdtemp
    seen = []
    monkeypatch.setattr(outdir.tempfile, "mkdtemp", lambda **kw: seen.append(kw["dir"]) or real_mkdtemp(**kw))
    status, _, err = prune_cli(capsys, teacher, data, out)
    assert status == 0, err
    assert seen == [out.resolve()]  # the temporary folder was inside the mount, on its file system
    assert (out / "model.safetensors").is_file()
    assert sorted(p.name for p in out.iterdir() if p.name.startswith(".")) == [MARKER]


def test_report_draws_into_a_pruned_folder_and_keeps_it_overwritable(project, capsys):
    work, teacher, data = project
    out = work / "pruned"
    assert prune_cli(capsys, teacher, data, out)[0] == 0
    (out / "structure.png").unlink()
    status, _, err = run(capsys, ["report", out])
    assert status == 0, err
    assert check_output_dir(out, overwrite=True) == out  # the marker knows the new image
    status, _, err = run(capsys, ["report", out, "--out", out / "config.json"])
    assert_clean_error(status, err, "report", "never writes over its inputs")
