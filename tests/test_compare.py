"""`prunekit compare`, one calibration for many budgets (`prune_many`, `--keep-flops 0.7,0.5`),
latency budgets from the CLI, and `prunekit report`: end to end on a tiny teacher and a tiny
SST-2 folder, in seconds."""

from __future__ import annotations

import json

import matplotlib.image
import pytest
from builders import view
from conftest import make_sample, run_method

from prunekit.api import budgets_from, prune, prune_many
from prunekit.cli import main
from prunekit.compare import compare
from prunekit.core.errors import ConfigError
from prunekit.io.folders import load_pruned
from prunekit.tasks import CalibrationSample

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def assert_png(path) -> None:
    assert path.read_bytes()[:8] == PNG_SIGNATURE
    image = matplotlib.image.imread(path)
    assert image.ndim == 3 and image.shape[0] > 100 and image.shape[1] > 100


def test_compare_end_to_end(teacher_dir, sst2_dir, tmp_path):
    out = tmp_path / "compare"
    result = compare(teacher_dir, "sst2", sst2_dir, out, methods=["kprune", "kwon", "magnitude", "random"],
                     keep_flops=[0.4, 0.6], num_sequences=16, run_bench=False)
    assert sorted(p.name for p in out.iterdir()) == [".prunekit-output.json", "compare.json", "compare.md", "compare.png"]
    saved = json.loads((out / "compare.json").read_text())
    assert saved["rows"] == result["rows"] and len(saved["rows"]) == 8
    assert saved["budgets"] == [0.6, 0.4]  # largest first
    assert saved["sample"]["num_sequences"] == 16 and saved["seed"] == 0
    for row in saved["rows"]:
        assert row["flops_kept"] <= row["keep_flops"] * (1 + 1e-9)
        assert 0 <= row["metrics"]["accuracy"] <= 100
        assert len(row["heads"]) == len(row["neurons"]) == 2
    table = (out / "compare.md").read_text()
    assert table.count("\n| kwon |") == 2 and "| teacher |" in table
    assert_png(out / "compare.png")


def test_compare_measures_speedup_and_saves_models(teacher_dir, sst2_dir, tmp_path):
    out = tmp_path / "compare"
    result = compare(teacher_dir, "sst2", sst2_dir, out, methods=["magnitude"], keep_flops=[0.5], num_sequences=8,
                     bench_batch_size=2, bench_seq_len=8, bench_rounds=1, save_models=True, max_eval_examples=8)
    row = result["rows"][0]
    assert row["speedup"] > 0 and row["latency_ms"] > 0 and row["teacher_latency_ms"] > 0
    assert result["teacher"]["metrics"]["num_examples"] == 8
    model = load_pruned(out / "models" / "magnitude-keep-flops-0.5")
    assert [layer["num_heads"] for layer in model.config.prunekit_layers] == row["heads"]
    assert_png(out / "compare.png")


def test_compare_refuses_a_used_folder_before_any_work(teacher_dir, sst2_dir, tmp_path):
    (tmp_path / "used").mkdir()
    (tmp_path / "used" / "file").write_text("x")
    with pytest.raises(ConfigError, match="not empty"):
        compare(teacher_dir, "sst2", sst2_dir, tmp_path / "used", methods=["magnitude"], keep_flops=[0.5])
    with pytest.raises(ConfigError, match="options given for method"):
        compare(teacher_dir, "sst2", sst2_dir, tmp_path / "new", methods=["magnitude"], keep_flops=[0.5],
                method_options={"kwon": {"damp": 2.0}})


def test_cli_compare(teacher_dir, sst2_dir, tmp_path, capsys):
    out = tmp_path / "compare"
    code = main(["compare", "--model", str(teacher_dir), "--task", "sst2", "--data", str(sst2_dir),
                 "--methods", "kwon,random", "--keep-flops", "0.5", "--num-sequences", "8", "--no-bench",
                 "--set", "kwon.damp=2.0", "--out", str(out), "--device", "cpu"])
    assert code == 0
    saved = json.loads((out / "compare.json").read_text())
    assert saved["method_options"] == {"kwon": {"damp": 2.0}}
    assert "compare.png" in capsys.readouterr().out


def test_prune_many_reuses_the_calibration_and_matches_single_runs(make_model):
    teacher = make_model("bert", "classification", num_layers=2)
    sample = make_sample("bert")
    for batch in sample.batches:
        batch["labels"] = batch["input_ids"][:, 1] % 3  # 3 classes, as the tiny model (MNLI-like)
    real = CalibrationSample(task="sst2", batches=sample.batches, num_sequences=sample.num_sequences,
                             num_tokens=sample.num_tokens, mean_length=sample.mean_length, seed=0, batch_size=4,
                             max_length=16)
    many = prune_many(teacher, None, real, task="mnli", method="kwon", keep_flops=[0.7, 0.4])
    assert [r.report["budget"] for r in many] == [{"kind": "flops", "keep": 0.7}, {"kind": "flops", "keep": 0.4}]
    assert many[0].report["prepare_seconds"] == many[1].report["prepare_seconds"] > 0
    for keep, result in zip((0.7, 0.4), many, strict=True):
        single = prune(teacher, None, real, task="mnli", method="kwon", keep_flops=keep)
        assert single.plan == result.plan


def test_budgets():
    assert budgets_from() == [("flops", 0.5)]
    assert budgets_from(keep_flops=[0.7, 0.3]) == [("flops", 0.7), ("flops", 0.3)]
    assert budgets_from(keep_latency=0.6) == [("latency", 0.6)]
    with pytest.raises(ConfigError, match="not both"):
        budgets_from(0.5, 0.5)
    with pytest.raises(ConfigError, match=r"\(0, 1\)"):
        budgets_from(keep_flops=[0.5, 1.2])


def test_cli_prune_many_budgets_and_report(teacher_dir, sst2_dir, tmp_path):
    out = tmp_path / "pruned"
    code = main(["prune", "--model", str(teacher_dir), "--task", "sst2", "--data", str(sst2_dir), "--method", "kwon",
                 "--keep-flops", "0.6,0.4", "--num-sequences", "16", "--no-bench", "--out", str(out),
                 "--device", "cpu"])
    assert code == 0
    reports = [json.loads((out / name / "prune_report.json").read_text()) for name in ("keep-flops-0.6", "keep-flops-0.4")]
    assert [r["keep_flops"] for r in reports] == [0.6, 0.4]
    assert reports[0]["prepare_seconds"] == reports[1]["prepare_seconds"]  # one Fisher pass for both
    assert reports[0]["eval"]["teacher"] == reports[1]["eval"]["teacher"]
    (out / "keep-flops-0.4" / "structure.png").unlink()
    assert main(["report", str(out / "keep-flops-0.4")]) == 0
    assert_png(out / "keep-flops-0.4" / "structure.png")
    assert main(["report", str(teacher_dir), "--out", str(tmp_path / "teacher.png")]) == 0
    assert_png(tmp_path / "teacher.png")


def test_cli_lut_then_latency_budget(teacher_dir, sst2_dir, tmp_path):
    lut = tmp_path / "lut.json"
    assert main(["lut", "--model", str(teacher_dir), "--out", str(lut), "--batch-size", "8", "--seq-len", "32",
                 "--neuron-step", "16", "--warmup", "1", "--repeats", "3", "--threads", "1", "--device", "cpu"]) == 0
    assert json.loads(lut.read_text())["ffn_units"] == [0, 16, 32, 37]
    out = tmp_path / "pruned"
    assert main(["prune", "--model", str(teacher_dir), "--task", "sst2", "--data", str(sst2_dir),
                 "--method", "magnitude", "--keep-latency", "0.5", "--lut", str(lut), "--num-sequences", "8",
                 "--no-bench", "--no-eval", "--out", str(out), "--device", "cpu"]) == 0
    report = json.loads((out / "prune_report.json").read_text())
    assert report["budget"] == {"kind": "latency", "keep": 0.5}
    estimated = report["latency_kept_estimated"]
    assert estimated is None or estimated <= 0.5 * (1 + 1e-9)  # None: the tiny table measured nothing


def test_cli_latency_budget_needs_a_table(teacher_dir, sst2_dir, tmp_path, capsys):
    code = main(["prune", "--model", str(teacher_dir), "--task", "sst2", "--data", str(sst2_dir), "--method", "kwon",
                 "--keep-latency", "0.5", "--out", str(tmp_path / "x"), "--device", "cpu"])
    assert code == 2
    assert "prunekit lut" in capsys.readouterr().err


@pytest.mark.parametrize("head", ["classification", "qa"])
def test_kprune_reuses_its_calibration_across_budgets(make_model, head):
    """prune_many runs Kprune's teacher pass and first knowledge pass once; each budget's plan is
    the one a separate run gives."""
    from prunekit.methods.kprune import KpruneConfig, kprune, kprune_prepare
    from prunekit.tasks import TaskData

    teacher = make_model("bert", head)
    sample = make_sample("bert")
    kind = head
    prepared = kprune_prepare(view(teacher), TaskData(kind=kind, sample=sample), KpruneConfig())
    for keep in (0.6, 0.3):
        fresh, reused = [teacher.__class__(teacher.config) for _ in range(2)]
        fresh.load_state_dict(teacher.state_dict())
        reused.load_state_dict(teacher.state_dict())
        plan_fresh, log_fresh = run_method(kprune, fresh.eval(), sample, kind, KpruneConfig(keep_flops=keep))
        plan_reused, _ = run_method(kprune, reused.eval(), sample, kind, KpruneConfig(keep_flops=keep), prepared=prepared)
        assert plan_fresh == plan_reused  # kept units and re-fitted weights
    with pytest.raises(ValueError, match="temperature"):
        run_method(kprune, teacher, sample, kind, KpruneConfig(temperature=4.0), prepared=prepared)


def test_cli_compare_takes_the_llm_methods(teacher_dir, sst2_dir, tmp_path, capsys):
    out = tmp_path / "compare"
    code = main(["compare", "--model", str(teacher_dir), "--task", "sst2", "--data", str(sst2_dir),
                 "--methods", "flap,wanda_sp,llm_pruner,shortgpt", "--keep-params", "0.7", "--num-sequences", "8",
                 "--no-bench", "--max-eval-examples", "8", "--set", "llm_pruner.aggregation=vector",
                 "--set", "llm_pruner.protected_first=0", "--out", str(out), "--device", "cpu"])
    assert code == 0
    saved = json.loads((out / "compare.json").read_text())
    assert [row["method"] for row in saved["rows"]] == ["flap", "wanda_sp", "llm_pruner", "shortgpt"]
    for row in saved["rows"]:
        assert row["non_embedding_params_kept"] <= 0.7 * (1 + 1e-9)
    capsys.readouterr()
    # A budget whole layers cannot meet: one line, exit status 2.
    code = main(["prune", "--model", str(teacher_dir), "--task", "sst2", "--data", str(sst2_dir), "--method",
                 "shortgpt", "--keep-flops", "0.01", "--num-sequences", "8", "--no-eval", "--no-bench",
                 "--out", str(tmp_path / "short"), "--device", "cpu"])
    assert code == 2
    assert "nearest it can reach" in capsys.readouterr().err
