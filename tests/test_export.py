"""prunekit.deploy.export / prunekit.deploy.onnxrt (issue 12): pruned models with uneven layers export to ONNX,
run in ONNX Runtime and give the PyTorch model's outputs; int8 quantization runs; bad targets get
one clear error and leave no folder; the CLI's export, bench --runtime onnxruntime and eval --onnx
work end to end.

Every model here is a tiny random one (conftest) pruned to the shapes the issue names: a layer
with no heads, a layer with no neurons, a removed attention and a removed FFN sublayer, and a
residual stream narrowed from 32 to 12 dims. The dynamo exporter (the default) takes seconds per
model on this CPU, so each family is exported once per session and the folders are shared.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from conftest import build_tiny_model, build_tokenizer, make_batch, model_inputs_for, outputs_of, write_sst2
from test_cli import assert_clean_error, run
from test_squad_pipeline import synthetic_examples, write_squad_json
from transformers import BertConfig, BertModel

from prunekit import ConfigError, ModelError, save_pruned
from prunekit.core.surgery import LayerPlan, PruningPlan, apply_plan
from prunekit.deploy.export import ExportOptions, export_onnx, quantize_onnx, read_export
from prunekit.deploy.onnxrt import OnnxModel, measure_onnx_latency
from prunekit.families import get_adapter
from prunekit.tasks.evaluate import evaluate

ATOL = 1e-4
KEEP = [0, 2, 3, 7, 8, 13, 16, 20, 21, 26, 30, 31]  # 12 of 32 hidden dims
UNEVEN = PruningPlan(
    [
        LayerPlan(heads=[], neurons=[1, 5, 9, 30]),  # no heads
        LayerPlan(heads=[0, 2, 3], neurons=[]),  # no neurons
        LayerPlan(attention_removed=True, neurons=list(range(0, 37, 3))),  # removed attention
        LayerPlan(heads=[1], ffn_removed=True),  # removed FFN
    ],
    hidden=KEEP,
)


def pruned_model(family: str, head: str = "classification", num_labels: int | None = None):
    return apply_plan(build_tiny_model(family, head, num_layers=4, num_labels=num_labels), UNEVEN)


def pad_id(family: str) -> int:
    return 1 if family == "roberta" else 0


def leftovers(folder: Path) -> list[str]:
    """What a failed write left beside ``folder`` (the target itself or hidden temporary folders)."""
    if not folder.parent.exists():
        return []
    return [p.name for p in folder.parent.iterdir() if p.name == folder.name or p.name.startswith(f".{folder.name}.")]


@pytest.fixture(scope="module")
def exported(tmp_path_factory) -> dict:
    """Per family: the pruned model, its saved folder and its ONNX export (dynamo exporter)."""
    cache: dict = {}

    def get(family: str) -> tuple:
        if family not in cache:
            root = tmp_path_factory.mktemp(f"export-{family}")
            model = pruned_model(family)
            folder = save_pruned(model, root / "pruned", tokenizer=build_tokenizer())
            cache[family] = (model, folder, export_onnx(folder, root / "onnx"))
        return cache[family]

    return get


# ---- export and parity ----------------------------------------------------------------------------
@pytest.mark.parametrize("family", ["bert", "roberta", "distilbert"])
def test_uneven_pruned_model_matches_pytorch_in_onnx_runtime(family, exported):
    model, _, folder = exported(family)
    shapes = get_adapter(model).layer_shapes()
    assert [s.num_heads for s in shapes] == [0, 3, 0, 1] and [s.intermediate_size for s in shapes][1] == 0
    assert shapes[2].attention_removed and shapes[3].ffn_removed and get_adapter(model).hidden_size == 12
    onnx_model = OnnxModel(folder, threads=1)
    for batch_size in (1, 3):
        for length in (7, 40):
            lengths = [max(1, length - 3 * i) for i in range(batch_size)]  # padded, except the longest
            batch = make_batch(lengths, seed=length + batch_size, token_type_ids=family != "distilbert",
                               pad_id=pad_id(family))
            expected = outputs_of(model, batch)
            got = onnx_model(**model_inputs_for(model, batch)).logits
            assert got.shape == expected.shape == (batch_size, 3)
            assert torch.allclose(got, expected, atol=ATOL, rtol=0), (family, batch_size, length)


@pytest.mark.parametrize("family", ["bert", "distilbert"])
def test_export_folder_records_names_shapes_and_the_check(family, exported):
    model, source, folder = exported(family)
    record = read_export(folder)
    inputs = ["input_ids", "attention_mask"] + ([] if family == "distilbert" else ["token_type_ids"])
    assert record["inputs"] == inputs and record["outputs"] == ["logits"] and record["exporter"] == "dynamo"
    assert record["layers"] == [s.to_dict() for s in get_adapter(model).layer_shapes()]
    assert (record["hidden_size"], record["full_hidden_size"]) == (12, 32)
    assert record["check"]["max_abs_diff"] <= ATOL and len(record["check"]["batches"]) == 3
    assert len({length for _, length in record["check"]["batches"]}) == 3  # several padded lengths
    assert record["source"] == str(source) and record["quantize"] is None
    files = {p.name for p in folder.iterdir()}
    assert {"model.onnx", "export.json", "config.json", "tokenizer.json", ".prunekit-output.json"} <= files
    # Batch and sequence are symbolic axes of every input, so any batch size and length runs.
    graph = onnx.load(str(folder / "model.onnx"))
    for tensor in graph.graph.input:
        dims = tensor.type.tensor_type.shape.dim
        assert dims[0].dim_param and dims[1].dim_param, tensor.name
    assert [t.name for t in graph.graph.output] == ["logits"]


def test_question_answering_export_with_the_torchscript_exporter(tmp_path):
    model = pruned_model("bert", "qa")
    folder = export_onnx(model, tmp_path / "onnx", tokenizer=build_tokenizer(), exporter="torchscript")
    record = read_export(folder)
    assert record["outputs"] == ["start_logits", "end_logits"] and record["head"] == "question_answering"
    onnx_model = OnnxModel(folder)
    for lengths in ([12, 5], [60, 60, 2]):
        batch = make_batch(lengths, seed=len(lengths))
        expected = outputs_of(model, batch)  # (B, T, 2)
        out = onnx_model(**batch)
        got = torch.stack([out.start_logits, out.end_logits], dim=-1)
        assert torch.allclose(got, expected, atol=ATOL, rtol=0)


def test_int8_export_quantizes_the_linear_layers_and_runs(tmp_path, exported):
    model = pruned_model("bert")
    folder = export_onnx(model, tmp_path / "int8", tokenizer=build_tokenizer(), quantize="int8",
                         exporter="torchscript")
    record = read_export(folder)
    assert record["quantize"] == "int8" and record["check"]["max_abs_diff"] <= ATOL  # fp32 checked first
    assert {p.name for p in folder.iterdir()} & {"model.fp32.onnx"} == set()
    ops = {node.op_type for node in onnx.load(str(folder / "model.onnx")).graph.node}
    assert ops & {"MatMulInteger", "DynamicQuantizeMatMul", "DynamicQuantizeLinear"}, ops
    assert 0 < record["int8"]["max_abs_diff"] < 1.0  # quantized, so not equal, but close
    batch = make_batch([20, 9, 4], seed=3)
    got = OnnxModel(folder)(**batch).logits
    assert torch.isfinite(got).all() and got.shape == (3, 3)
    assert float((got - outputs_of(model, batch)).abs().max()) < 1.0
    # An existing float32 export (dynamo) quantizes too.
    _, _, fp32 = exported("distilbert")
    again = quantize_onnx(fp32, tmp_path / "int8-from-fp32")
    assert read_export(again)["quantize"] == "int8" and read_export(again)["inputs"] == ["input_ids", "attention_mask"]
    assert torch.isfinite(OnnxModel(again)(**make_batch([8, 3], token_type_ids=False)).logits).all()
    with pytest.raises(ConfigError, match="already quantized"):
        quantize_onnx(again, tmp_path / "twice")


# ---- errors ---------------------------------------------------------------------------------------
def test_bad_export_targets_get_one_clear_error_and_leave_nothing(tmp_path, teacher_dir):
    empty = tmp_path / "empty"
    empty.mkdir()
    cases = [
        (tmp_path / "missing", {}, ModelError, "does not exist"),
        (empty, {}, ModelError, "no config.json"),
        (teacher_dir, {"format": "tflite"}, ConfigError, "format 'tflite' is not supported"),
        (teacher_dir, {"quantize": "int4"}, ConfigError, "int4"),
        (teacher_dir, {"exporter": "jit"}, ConfigError, "exporter 'jit'"),
    ]
    for source, options, error, message in cases:
        out = tmp_path / "out"
        with pytest.raises(error, match=message):
            export_onnx(source, out, **options)
        assert leftovers(out) == [], (source, options)
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    with pytest.raises(ConfigError, match="is a file"):
        export_onnx(teacher_dir, blocker / "onnx")
    with pytest.raises(ConfigError, match="the input"):
        export_onnx(teacher_dir, teacher_dir / "onnx")  # never inside the model folder
    taken = tmp_path / "taken"
    taken.mkdir()
    (taken / "notes.txt").write_text("mine")
    with pytest.raises(ConfigError, match="not empty"):
        export_onnx(teacher_dir, taken)
    assert [p.name for p in taken.iterdir()] == ["notes.txt"]


def test_models_prunekit_cannot_export_are_refused(tmp_path, masked_lm, tokenizer):
    with pytest.raises(ModelError, match="does not support BertForMaskedLM"):
        export_onnx(masked_lm, tmp_path / "mlm", tokenizer=tokenizer)
    bare = BertModel(BertConfig(vocab_size=99, hidden_size=32, num_hidden_layers=1, num_attention_heads=4,
                                intermediate_size=37)).eval()
    with pytest.raises(ModelError, match="task head"):
        export_onnx(bare, tmp_path / "bare", tokenizer=tokenizer)
    with pytest.raises(ConfigError, match="tokenizer"):
        export_onnx(pruned_model("bert"), tmp_path / "no-tokenizer")
    assert leftovers(tmp_path / "mlm") == leftovers(tmp_path / "bare") == leftovers(tmp_path / "no-tokenizer") == []


class _DataDependentAttention(torch.nn.Module):
    """Branches on a tensor's value: torch.export cannot trace that into a static graph."""

    def forward(self, hidden_states, *args, **kwargs):
        if hidden_states.sum() > 0:
            return hidden_states * 2, None
        return hidden_states, None


def test_an_unexportable_part_is_named_and_nothing_is_written(tmp_path, tokenizer):
    model = pruned_model("bert")
    model.bert.encoder.layer[1].attention = _DataDependentAttention()
    out = tmp_path / "onnx"
    with pytest.raises(ModelError, match=r"encoder\.layer\.1\.attention \(_DataDependentAttention\) failed"):
        export_onnx(model, out, tokenizer=tokenizer)
    assert leftovers(out) == []


def test_a_graph_that_does_not_match_pytorch_fails_the_export(tmp_path, tokenizer, monkeypatch):
    import prunekit.deploy.export as export

    real = export.torch_outputs

    def off_by_a_little(*args):
        return [value + 1e-3 for value in real(*args)]

    monkeypatch.setattr(export, "torch_outputs", off_by_a_little)
    out = tmp_path / "onnx"
    with pytest.raises(ModelError, match=r"differ by 0\.001.* > atol 0\.0001.*nothing was written"):
        export_onnx(pruned_model("bert"), out, tokenizer=tokenizer, exporter="torchscript")
    assert leftovers(out) == []
    monkeypatch.setattr(export, "torch_outputs", real)
    export_onnx(pruned_model("bert"), out, ExportOptions(exporter="torchscript", atol=1e-4), tokenizer=tokenizer)
    assert read_export(out)["check"]["atol"] == 1e-4


# ---- ONNX Runtime: eval and latency ---------------------------------------------------------------
def test_onnx_eval_equals_pytorch_eval_on_glue_and_squad(tmp_path, exported):
    tokenizer = build_tokenizer()
    model = pruned_model("bert", num_labels=2)
    sst2 = write_sst2(tmp_path / "sst2", n_dev=40)
    folder = export_onnx(model, tmp_path / "sst2-onnx", tokenizer=tokenizer, exporter="torchscript")
    assert evaluate(OnnxModel(folder), tokenizer, "sst2", sst2, batch_size=16) == \
        evaluate(model, tokenizer, "sst2", sst2, batch_size=16)
    qa = pruned_model("bert", "qa")
    squad = write_squad_json(tmp_path / "dev.json", synthetic_examples(12, context_words=(30, 90)))
    qa_folder = export_onnx(qa, tmp_path / "qa-onnx", tokenizer=tokenizer, exporter="torchscript")
    options = dict(max_length=64, doc_stride=16, batch_size=8)
    expected = evaluate(qa, tokenizer, "squad", squad, **options)
    assert evaluate(OnnxModel(qa_folder), tokenizer, "squad", squad, **options) == pytest.approx(expected)


def test_measure_onnx_latency_has_the_bench_layout(exported):
    _, _, folder = exported("bert")
    _, _, baseline = exported("distilbert")
    result = measure_onnx_latency(folder, baseline=baseline, batch_sizes=(1, 2), seq_lens=(8,), threads=1,
                                  rounds=2, min_run_time=0.01)
    assert (result["runtime"], result["threads"], result["rounds"], result["device"]) == ("onnxruntime", 1, 2, "cpu")
    assert [(r["batch_size"], r["seq_len"]) for r in result["results"]] == [(1, 8), (2, 8)]
    for row in result["results"]:
        assert len(row["latency_ms_rounds"]) == len(row["baseline_ms_rounds"]) == 2
        assert row["latency_ms"] > 0 and row["speedup"] == pytest.approx(row["baseline_ms"] / row["latency_ms"])


# ---- CLI ------------------------------------------------------------------------------------------
def test_cli_export_bench_and_eval_end_to_end(tmp_path, capsys, make_teacher):
    teacher = make_teacher("teacher", num_layers=4)
    model = apply_plan(build_tiny_model("bert", num_layers=4, num_labels=2), UNEVEN)
    pruned = save_pruned(model, tmp_path / "pruned", tokenizer=build_tokenizer())
    sst2 = write_sst2(tmp_path / "sst2")

    status, out, err = run(capsys, ["export", "--model", pruned, "--format", "onnx", "--out", tmp_path / "onnx"])
    assert status == 0, err
    assert "ONNX model written to" in out and "| 2 | 0 | 13 | attention |" in out
    status, out, err = run(capsys, ["export", "--model", teacher, "--out", tmp_path / "teacher-int8",
                                    "--quantize", "int8", "--exporter", "torchscript"])
    assert status == 0 and "int8" in out, err

    bench_json = tmp_path / "bench.json"
    status, out, err = run(capsys, ["bench", "--runtime", "onnxruntime", "--model", tmp_path / "onnx",
                                    "--baseline", teacher, "--batch-sizes", "1,2", "--seq-lens", "8",
                                    "--rounds", "1", "--threads", "1", "--json", bench_json])
    assert status == 0, err
    assert "| batch_size | seq_len | latency_ms | baseline_ms | speedup |" in out
    result = json.loads(bench_json.read_text())
    assert result["runtime"] == "onnxruntime" and len(result["results"]) == 2

    metrics = {}
    for flag, path in (("--onnx", tmp_path / "onnx"), ("--model", pruned)):
        status, out, err = run(capsys, ["eval", flag, path, "--task", "sst2", "--data", sst2,
                                        "--json", tmp_path / f"{flag[2:]}.json"])
        assert status == 0, err
        metrics[flag] = json.loads((tmp_path / f"{flag[2:]}.json").read_text())["metrics"]
    assert metrics["--onnx"] == metrics["--model"] and metrics["--onnx"]["num_examples"] == 24


def test_cli_deploy_errors_are_one_line(tmp_path, capsys, teacher_dir):
    status, _, err = run(capsys, ["export", "--model", teacher_dir, "--format", "tflite", "--out", tmp_path / "x"])
    assert_clean_error(status, err, "export", "tflite")
    status, _, err = run(capsys, ["export", "--model", tmp_path / "nope", "--out", tmp_path / "x"])
    assert_clean_error(status, err, "export", "does not exist")
    assert leftovers(tmp_path / "x") == []
    status, _, err = run(capsys, ["eval", "--onnx", teacher_dir, "--task", "sst2", "--data", tmp_path])
    assert_clean_error(status, err, "eval", "not an ONNX export folder")
    status, _, err = run(capsys, ["bench", "--runtime", "onnxruntime", "--model", teacher_dir, "--device", "cuda"])
    assert_clean_error(status, err, "bench", "--device cpu")  # no GPU here, or ORT is CPU-only
    status, _, err = run(capsys, ["eval", "--model", teacher_dir, "--onnx", teacher_dir, "--task", "sst2",
                                  "--data", tmp_path])
    assert status == 2 and "not allowed with" in err


def test_check_batches_are_tokenizer_made_padded_and_of_several_lengths():
    from prunekit.deploy.export import GRAPH_SPECS, check_batches

    batches = check_batches(build_tokenizer(), GRAPH_SPECS["question_answering"],
                            ["input_ids", "attention_mask", "token_type_ids"], ExportOptions(), usable=100)
    assert [b["input_ids"].shape for b in batches] == [(4, 16), (4, 64), (4, 100)]
    for batch in batches:
        lengths = batch["attention_mask"].sum(axis=1)
        assert lengths.max() == batch["input_ids"].shape[1] and lengths.min() < lengths.max()  # padded
        assert batch["token_type_ids"].max() == 1  # question and context segments
        assert np.all(batch["input_ids"][:, 0] == build_tokenizer().cls_token_id)
