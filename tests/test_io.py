"""prunekit.io.folders: pruned models saved as standard Hugging Face folders (no pickles, style.md §14) reload
with identical outputs through prunekit and through the Auto classes; output folders are written
atomically; folders that are not models fail with a clear ModelError."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch
from conftest import assert_reloads_identically

import prunekit
from prunekit import ConfigError, ModelError, load_pruned, save_pruned
from prunekit.core.surgery import LayerPlan, PruningPlan, apply_plan
from prunekit.families import LayerShape, get_adapter
from prunekit.io.folders import atomic_output_dir, load_model, read_report

H, D_FF = 4, 37
PLAN = PruningPlan([
    LayerPlan(heads=[0, 2], neurons=list(range(0, D_FF, 3)), head_scales=[0.7, 1.0, -1.3, 1.0]),
    LayerPlan(heads=[], neurons=[5, 6]),
    LayerPlan(heads=[1, 2, 3], neurons=[]),
])  # fmt: skip
SHAPES = [LayerShape(2, 13), LayerShape(0, 2), LayerShape(3, 0)]
# What a saved folder may hold: weights, configs, tokenizer files, plots, its README and the two
# remote-code files (source, for loading without prunekit). Never pickles.
ALLOWED_SUFFIXES = {".json", ".safetensors", ".png", ".txt", ".model", ".md", ".py"}


def pruned_model(make_model, family: str, head: str):
    model = make_model(family, head, num_layers=3)
    return apply_plan(model, copy.deepcopy(PLAN))


def listing(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_save_and_reload_gives_identical_outputs(family, head, make_model, tokenizer, batch, outputs_of, tmp_path):
    model = pruned_model(make_model, family, head)
    expected = outputs_of(model, batch)
    out = save_pruned(model, tmp_path / "pruned", tokenizer=tokenizer, report={"method": "test"})
    assert out == tmp_path / "pruned"

    assert_reloads_identically(out, head, SHAPES, batch, expected)

    head_name = "question_answering" if head == "qa" else "sequence_classification"
    assert torch.equal(outputs_of(load_model(out, head=head_name), batch), expected)
    assert read_report(out) == {"method": "test"}


def test_config_records_the_per_layer_widths(family, make_model, tmp_path):
    model = pruned_model(make_model, family, "classification")
    save_pruned(model, tmp_path / "pruned")
    config = json.loads((tmp_path / "pruned" / "config.json").read_text())
    assert config["model_type"] == f"prunekit_{family}"
    assert config["prunekit_base_model_type"] == family
    assert config["prunekit_layers"] == [shape.to_dict() for shape in SHAPES]
    assert config["architectures"][0].startswith("Pruned") and "SequenceClassification" in config["architectures"][0]


def test_saved_folder_holds_no_pickles(family, make_model, tokenizer, tmp_path):
    model = pruned_model(make_model, family, "qa")
    out = save_pruned(model, tmp_path / "pruned", tokenizer=tokenizer, report={"plan": PLAN.to_dict()},
                      extra=lambda folder: (folder / "structure.png").write_bytes(b"\x89PNG\r\n\x1a\n"))  # fmt: skip
    files = listing(out)
    assert {"config.json", "model.safetensors", "prune_report.json", "structure.png"} <= set(files)
    assert any(name.startswith("tokenizer") for name in files)
    for name, data in files.items():
        assert Path(name).suffix in ALLOWED_SUFFIXES, name
        assert not data.startswith(b"\x80"), f"{name} looks like a pickle"
        assert not data.startswith(b"PK\x03\x04"), f"{name} looks like a torch.save zip archive"


def test_unpruned_model_saves_and_reloads(family, make_model, batch, outputs_of, tmp_path):
    model = make_model(family, "regression")
    expected = outputs_of(model, batch)
    save_pruned(model, tmp_path / "plain")
    config = json.loads((tmp_path / "plain" / "config.json").read_text())
    assert config["prunekit_layers"] == [{"num_heads": H, "intermediate_size": D_FF}] * 2
    assert torch.equal(outputs_of(load_pruned(tmp_path / "plain"), batch), expected)


def test_a_reloaded_model_can_be_pruned_and_saved_again(family, make_model, batch, outputs_of, tmp_path):
    save_pruned(pruned_model(make_model, family, "classification"), tmp_path / "first")
    model = load_pruned(tmp_path / "first")
    apply_plan(model, PruningPlan([LayerPlan(heads=[1], neurons=[0, 12]), LayerPlan(), LayerPlan(heads=[0])]))
    expected = outputs_of(model, batch)
    save_pruned(model, tmp_path / "second")
    again = load_pruned(tmp_path / "second")
    assert get_adapter(again).layer_shapes() == [LayerShape(1, 2), LayerShape(0, 2), LayerShape(1, 0)]
    assert torch.equal(outputs_of(again, batch), expected)


def test_stock_model_folder_loads_as_its_own_class(make_teacher, make_batch, outputs_of):
    batch = make_batch([9, 5, 2, 7])
    folder = make_teacher(num_labels=2)
    model = load_model(folder)
    assert type(model).__name__ == "BertForSequenceClassification"
    assert type(load_pruned(folder)).__name__ == "BertForSequenceClassification"
    assert outputs_of(model, batch).shape == (4, 2)


# ---- atomic output folders ------------------------------------------------------------------------
def test_save_into_a_non_empty_folder_without_overwrite_is_refused(make_model, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("precious")
    (out / "sub").mkdir()
    (out / "sub" / "data.bin").write_bytes(b"\x00\x01")
    before = listing(out)
    with pytest.raises(ConfigError, match="not empty"):
        save_pruned(make_model("bert"), out)
    assert listing(out) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_save_with_overwrite_replaces_a_folder_prunekit_wrote(make_model, tmp_path):
    out = tmp_path / "out"
    save_pruned(make_model("bert"), out)
    save_pruned(make_model("distilbert"), out, overwrite=True)
    assert json.loads((out / "config.json").read_text())["model_type"] == "prunekit_distilbert"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # no temporary or old folders left


def test_save_into_an_empty_existing_folder(make_model, tmp_path):
    (tmp_path / "out").mkdir()
    save_pruned(make_model("bert"), tmp_path / "out")
    assert (tmp_path / "out" / "model.safetensors").is_file()


def test_save_onto_a_file_is_refused(make_model, tmp_path):
    target = tmp_path / "out"
    target.write_text("a file")
    with pytest.raises(ConfigError, match="file"):
        save_pruned(make_model("bert"), target)
    assert target.read_text() == "a file"


def test_failure_inside_atomic_output_dir_leaves_nothing(tmp_path):
    out = tmp_path / "nested" / "out"
    with pytest.raises(RuntimeError, match="boom"), atomic_output_dir(out) as tmp:
        (tmp / "config.json").write_text("{}")
        assert tmp.parent == out.parent and tmp != out
        raise RuntimeError("boom")
    assert not out.exists()
    assert list(out.parent.iterdir()) == []


def test_failure_inside_atomic_output_dir_keeps_the_old_folder(tmp_path):
    out = tmp_path / "out"
    with atomic_output_dir(out) as tmp:
        (tmp / "old.txt").write_text("old")
    before = listing(out)
    with pytest.raises(KeyboardInterrupt), atomic_output_dir(out, overwrite=True) as tmp:
        (tmp / "new.txt").write_text("new")
        raise KeyboardInterrupt
    assert listing(out) == before and before["old.txt"] == b"old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_failure_while_saving_leaves_no_folder(make_model, tmp_path):
    def broken_plot(folder: Path) -> None:
        (folder / "structure.png").write_bytes(b"half a plot")
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        save_pruned(make_model("bert"), tmp_path / "out", extra=broken_plot)
    assert list(tmp_path.iterdir()) == []


# ---- folders that are not models ------------------------------------------------------------------
def _empty(folder: Path) -> Path:
    folder.mkdir()
    return folder


def _no_config(folder: Path) -> Path:
    folder.mkdir()
    (folder / "README.md").write_text("not a model")
    return folder


def _no_weights(folder: Path) -> Path:
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"model_type": "bert"}))
    return folder


def _invalid_json(folder: Path) -> Path:
    folder.mkdir()
    (folder / "config.json").write_text("{not json")
    (folder / "model.safetensors").write_bytes(b"")
    return folder


def _a_file(folder: Path) -> Path:
    folder.write_text("hello")
    return folder


def _missing(folder: Path) -> Path:
    return folder / "does" / "not" / "exist"


@pytest.mark.parametrize(
    ("make", "words"),
    [
        (_empty, "no config.json"),
        (_no_config, "no config.json"),
        (_no_weights, "no weights"),
        (_invalid_json, "not valid JSON"),
        (_a_file, "is a file"),
        (_missing, "does not exist"),
    ],
    ids=["empty-folder", "no-config", "no-weights", "invalid-json", "a-file", "missing"],
)
@pytest.mark.parametrize("loader", [load_pruned, load_model], ids=["load_pruned", "load_model"])
def test_loading_a_non_model_raises_model_error(make, words, loader, tmp_path):
    path = make(tmp_path / "thing")
    with pytest.raises(ModelError) as info:
        loader(path)
    message = str(info.value)
    assert words in message and str(path) in message
    assert "\n" not in message


def _widths_do_not_match_weights(folder: Path) -> Path:
    config = json.loads((folder / "config.json").read_text())
    config["prunekit_layers"][0]["num_heads"] = 3
    (folder / "config.json").write_text(json.dumps(config))
    return folder


def _garbage_weights(folder: Path) -> Path:
    (folder / "model.safetensors").write_bytes(b"not safetensors")
    return folder


@pytest.mark.parametrize("corrupt", [_widths_do_not_match_weights, _garbage_weights], ids=["widths", "weights"])
def test_loading_a_corrupt_model_raises_model_error(corrupt, make_model, tmp_path):
    folder = save_pruned(pruned_model(make_model, "bert", "classification"), tmp_path / "pruned")
    with pytest.raises(ModelError, match="pruned"):
        load_pruned(corrupt(folder))


def test_loading_an_unknown_head_raises_config_error(make_teacher):
    with pytest.raises(ConfigError, match="unknown model head"):
        load_model(make_teacher(), head="token_classification")


def test_import_registers_the_auto_classes():
    """Importing prunekit is what makes the Auto classes know the pruned model types."""
    from transformers import AutoConfig

    for family in ("bert", "roberta", "distilbert"):
        config = AutoConfig.for_model(f"prunekit_{family}")
        assert config.prunekit_base_model_type == family
    assert prunekit.load_pruned is load_pruned
