"""Issue 20 item 5: inputs a new user gives, each refused before any work in one clear line (exit 2,
no traceback, no output folder) or handled and said: decoders without a pad token, --uniform under
its smallest shape, half-precision models, NaN/inf and mistyped method options, windows past the
model's positions, a tokenizer larger than the vocabulary, ONNX exports and --generate that do not
fit the task or model, and messages that name the real problem; then the probes of the same
issue (budgets, seeds, sample sizes, devices, tasks, data files, tokenizers, windows, --set,
compare's methods, export and bench options)."""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path

import pytest
import torch
from conftest import WORDS, build_tiny_model, build_tokenizer, save_teacher, write_sst2
from test_cli import assert_clean_error, assert_no_output, prune_args, run
from transformers import (
    GPT2Config,
    GPT2ForSequenceClassification,
    LlamaConfig,
    LlamaForCausalLM,
    LlamaForSequenceClassification,
    OPTConfig,
    OPTForSequenceClassification,
)

from prunekit import ConfigError
from prunekit.api import prune
from prunekit.core.preflight import check_config_values, json_text
from prunekit.methods import get_method

EOS = "[SEP]"  # the tokenizer's eos token when it has no pad token (id 3)


# ---- builders -----------------------------------------------------------------------------------------
def no_pad_tokenizer():
    """The tiny WordPiece tokenizer as a decoder's: an eos token and no pad token."""
    tokenizer = build_tokenizer()
    tokenizer.pad_token = None
    tokenizer.eos_token = EOS
    return tokenizer


def decoder_classifier(family: str, pad_token_id: int | None = None, vocab: int = 99, positions: int = 64):
    common = dict(num_labels=2, pad_token_id=pad_token_id)
    torch.manual_seed(0)
    if family == "gpt2":
        return GPT2ForSequenceClassification(GPT2Config(vocab_size=vocab, n_embd=32, n_layer=2, n_head=4, n_inner=48,
                                                        n_positions=positions, **common)).eval()
    if family == "opt":
        return OPTForSequenceClassification(OPTConfig(vocab_size=vocab, hidden_size=32, num_hidden_layers=2,
                                                      num_attention_heads=4, ffn_dim=48, word_embed_proj_dim=32,
                                                      max_position_embeddings=positions, **common)).eval()
    return LlamaForSequenceClassification(llama_config(vocab=vocab, positions=positions, **common)).eval()


def llama_config(heads: int = 4, kv_heads: int = 2, hidden: int = 32, ffn: int = 48, vocab: int = 99,
                 positions: int = 64, **extra) -> LlamaConfig:
    return LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=ffn, num_hidden_layers=2,
                       num_attention_heads=heads, num_key_value_heads=kv_heads, max_position_embeddings=positions,
                       **extra)


def save_folder(folder: Path, model, tokenizer=None) -> Path:
    model.save_pretrained(folder)
    (tokenizer or build_tokenizer()).save_pretrained(folder)
    return folder


def write_text(folder: Path, lines: int = 60) -> Path:
    """A causal-LM text folder (train.txt, test.txt) of the tokenizer's words."""
    folder.mkdir(parents=True, exist_ok=True)
    generator = torch.Generator().manual_seed(0)
    for name in ("train.txt", "test.txt"):
        rows = [" ".join(WORDS[int(i)] for i in torch.randint(0, len(WORDS), (12,), generator=generator))
                for _ in range(lines)]
        (folder / name).write_text("\n".join(rows) + "\n")
    return folder


def lm_args(model: Path, data: Path, out: Path, *extra: str) -> list:
    return ["prune", "--model", model, "--task", "causal_lm", "--data", data, "--out", out, "--num-sequences", "4",
            "--seq-len", "16", "--no-bench", "--device", "cpu", *extra]


def forbid_method(monkeypatch, name: str) -> None:
    """Fail the test if method ``name`` runs: the refusal must come before it."""
    import dataclasses

    from prunekit import methods

    spec = dataclasses.replace(methods.METHODS[name], run=lambda *a, **k: pytest.fail("the method ran"), prepare=None)
    monkeypatch.setitem(methods.METHODS, name, spec)


def strict_json(path: Path):
    """JSON as a strict reader sees it: NaN and Infinity are not JSON."""
    def refuse(name: str):
        raise ValueError(f"{path} holds {name}, which is not JSON")
    return json.loads(path.read_text(), parse_constant=refuse)


# ---- 1. decoder classifiers without a pad token -------------------------------------------------------
@pytest.mark.parametrize("family", ["gpt2", "opt", "llama"])
def test_a_decoder_classifier_without_a_pad_token_pads_with_eos(family, tmp_path, sst2_dir, capsys, caplog):
    """pad_token_id null in config.json and no pad token in the tokenizer: the run pads with the eos
    token, says so, and saves it (config.json pad_token_id, the tokenizer's pad token)."""
    teacher = save_folder(tmp_path / "teacher", decoder_classifier(family), no_pad_tokenizer())
    out = tmp_path / "out"
    with caplog.at_level(logging.INFO, logger="prunekit"):
        status, _, err = run(capsys, prune_args(teacher, sst2_dir, out))
    assert status == 0, err
    assert "padding with its eos token" in caplog.text and "pad_token_id" in caplog.text
    eos_id = build_tokenizer().convert_tokens_to_ids(EOS)
    assert json.loads((out / "config.json").read_text())["pad_token_id"] == eos_id
    assert json.loads((out / "tokenizer_config.json").read_text())["pad_token"] == EOS
    status, _, err = run(capsys, ["eval", "--model", teacher, "--task", "sst2", "--data", sst2_dir, "--device", "cpu"])
    assert status == 0, err


def test_the_callers_decoder_model_and_tokenizer_are_not_changed(sst2_dir):
    model, tokenizer = decoder_classifier("llama"), no_pad_tokenizer()
    result = prune(model, tokenizer, sst2_dir, task="sst2", keep_flops=0.5, num_tokens=200, device="cpu")
    assert model.config.pad_token_id is None and tokenizer.pad_token is None
    assert result.model.config.pad_token_id == tokenizer.eos_token_id
    assert result.tokenizer.pad_token == EOS


def test_a_tokenizer_without_pad_or_eos_is_one_clear_error(tmp_path, sst2_dir, capsys):
    tokenizer = build_tokenizer()
    tokenizer.pad_token = None
    teacher = save_folder(tmp_path / "teacher", decoder_classifier("gpt2"), tokenizer)
    status, _, err = run(capsys, prune_args(teacher, sst2_dir, tmp_path / "out"))
    assert_clean_error(status, err, "prune", "neither a pad token nor an eos token", "--tokenizer")
    assert_no_output(tmp_path / "out")


# ---- 2. --uniform under its smallest shape ------------------------------------------------------------
def _uniform_teacher(tmp_path: Path, kv_heads: int, heads: int = 4, hidden: int = 32) -> Path:
    torch.manual_seed(0)
    config = llama_config(heads=heads, kv_heads=kv_heads, hidden=hidden, num_labels=2, pad_token_id=0)
    return save_folder(tmp_path / f"teacher-{kv_heads}", LlamaForSequenceClassification(config).eval())


@pytest.mark.parametrize("kind, keep", [("params", "0.05"), ("flops", "0.02")])
def test_uniform_under_its_smallest_shape_is_refused_up_front(kind, keep, tmp_path, sst2_dir, capsys, monkeypatch):
    """MQA: one group, one query head and one neuron per layer is the least a uniform model keeps;
    a budget under it is refused before the method runs, naming the least budget."""
    teacher = _uniform_teacher(tmp_path, kv_heads=1)
    forbid_method(monkeypatch, "kprune")
    argv = [a if a != "--keep-flops" else f"--keep-{kind}" for a in prune_args(teacher, sst2_dir, tmp_path / "out",
                                                                              "--uniform", keep=keep)]
    status, _, err = run(capsys, argv)
    assert_clean_error(status, err, "prune", "--uniform keeps at least", f"keep_{kind} {keep}", "or more")
    assert_no_output(tmp_path / "out")


def test_uniform_meets_a_parameter_budget_the_methods_plan_met(tmp_path, sst2_dir, capsys):
    """GQA at a budget just over the smallest uniform shape: before, the uniform model kept more
    non-embedding parameters than asked ("this is a bug"); it now shrinks to meet the budget."""
    teacher = _uniform_teacher(tmp_path, kv_heads=2, heads=8, hidden=64)
    from prunekit.core.uniform import smallest_uniform_keep
    from prunekit.families import get_adapter
    from prunekit.io.folders import load_model

    least, _ = smallest_uniform_keep(get_adapter(load_model(teacher)), None)
    keep = math.ceil(least * 1000) / 1000 + 0.004
    argv = [a if a != "--keep-flops" else "--keep-params" for a in prune_args(
        teacher, sst2_dir, tmp_path / "out", "--uniform", "--no-eval", keep=str(keep))]
    status, _, err = run(capsys, argv)
    assert status == 0, err
    report = strict_json(tmp_path / "out" / "prune_report.json")
    assert report["non_embedding_params_kept"] <= keep * (1 + 1e-9)
    assert report["method_log"]["uniform"]["within_budget"]


# ---- 3. half precision (issue 21 item 3; the round trips are in tests/test_api_dtype.py) -------------------
def half_kernels_missing(monkeypatch) -> None:
    """This CPU as a torch build without float16 matmuls sees it: F.linear refuses half inputs with
    torch's own message."""
    linear = torch.nn.functional.linear

    def refuse_half(x, *args, **kwargs):
        if x.dtype == torch.float16:
            raise RuntimeError("\"addmm_impl_cpu_\" not implemented for 'Half'")
        return linear(x, *args, **kwargs)

    monkeypatch.setattr(torch.nn.functional, "linear", refuse_half)


def test_a_dtype_the_device_cannot_run_is_one_clear_line(tmp_path, sst2_dir, capsys, monkeypatch):
    teacher = save_folder(tmp_path / "teacher", build_tiny_model("bert", num_labels=2))
    half_kernels_missing(monkeypatch)
    forbid_method(monkeypatch, "kprune")
    out = tmp_path / "out"
    status, _, err = run(capsys, prune_args(teacher, sst2_dir, out, "--dtype", "float16"))
    assert_clean_error(status, err, "prune", "float16 cannot run on cpu", "not implemented for 'Half'",
                       "--dtype float32", "--no-eval --no-bench")
    assert_no_output(out)


def test_a_dtype_the_device_cannot_run_is_still_saved_when_nothing_runs_it(tmp_path, sst2_dir, capsys, monkeypatch):
    """The CPU computes in float32: a float16 model for another machine is pruned and saved here."""
    teacher = save_folder(tmp_path / "teacher", build_tiny_model("bert", num_labels=2))
    half_kernels_missing(monkeypatch)
    status, _, err = run(capsys, prune_args(teacher, sst2_dir, tmp_path / "out", "--dtype", "float16", "--no-eval"))
    assert status == 0, err
    assert json.loads((tmp_path / "out" / "config.json").read_text())["dtype"] == "float16"
    report = strict_json(tmp_path / "out" / "prune_report.json")
    assert report["dtype"] == {"teacher": "float32", "compute": "float32", "pruned": "float16"}


# ---- 4. NaN, infinity and mistyped method options --------------------------------------------------------
@pytest.mark.parametrize("extra, words", [
    (["--temperature", "nan"], ["temperature", "finite"]),
    (["--lam-pred", "nan"], ["lam_pred", "finite"]),
    (["--mu", "inf"], ["mu", "finite"]),
    (["--lam-rep=-inf"], ["lam_rep", "finite"]),
    (["--set", "ridge=NaN"], ["ridge", "finite"]),
    (["--set", "ridge=abc"], ["ridge", "must be a number", "'abc'"]),
    (["--set", "sublayer_tuning=yes"], ["sublayer_tuning", "true or false"]),
    (["--set", "top_k=2.5"], ["top_k", "an integer"]),
    (["--seq-len", "nan"], ["--seq-len", "finite"]),
    (["--method", "kwon", "--set", "damp=nan"], ["damp", "finite"]),
    (["--method", "kwon", "--set", "max_scale=Infinity"], ["max_scale", "finite"]),
    (["--method", "magnitude", "--set", "power=inf"], ["power", "finite"]),
    (["--method", "random", "--set", "seed=3"], ["--set seed=", "use --seed"]),
    (["--set", "device=cpu"], ["--set device=", "use --device"]),
    (["--method", "cofi", "--set", "lr=nan"], ["lr", "finite"]),
    (["--method", "cofi", "--epochs", "inf"], ["--epochs", "finite"]),
])
def test_non_finite_and_mistyped_method_options_are_refused(extra, words, workspace_bert, capsys):
    teacher, data, out = workspace_bert
    status, _, err = run(capsys, prune_args(teacher, data, out, *extra))
    assert_clean_error(status, err, "prune", *words)
    assert_no_output(out)


@pytest.fixture
def workspace_bert(tmp_path, teacher_dir, sst2_dir):
    return teacher_dir, sst2_dir, tmp_path / "out"


def test_every_method_config_checks_its_numbers_in_one_place():
    for name in ("kprune", "kwon", "magnitude", "random"):
        spec = get_method(name)
        with pytest.raises(ConfigError, match="keep_flops must be a finite number"):
            spec.make_config(keep_flops=float("nan"))
        with pytest.raises(ConfigError, match="seq_len must be a finite number"):
            spec.make_config(seq_len=float("inf"))
    with pytest.raises(ConfigError, match="seed must be an integer, got 'x'"):
        get_method("random").make_config(seed="x")
    config = get_method("kprune").make_config(ridge="1e-5", mu="32")  # text from a shell is read as a number
    assert config.ridge == 1e-5 and config.mu == 32.0
    cofi = get_method("cofi").make_config(keep_params=0.5, teacher_layers=[1, 2])
    assert cofi.teacher_layers == (1, 2)
    check_config_values(config)  # a valid config passes again unchanged


def test_reports_are_strict_json():
    text = json_text({"a": float("nan"), "b": [float("inf"), 1.5], "c": {"d": -float("inf")}, "e": torch.tensor(2.0)},
                     default=lambda v: v.item())
    assert json.loads(text) == {"a": None, "b": [None, 1.5], "c": {"d": None}, "e": 2.0}
    assert "NaN" not in text and "Infinity" not in text


def test_a_nan_metric_is_saved_as_null(tmp_path, teacher_dir, sst2_dir, monkeypatch):
    """STS-B's Pearson of a constant prediction is NaN: the report holds null, never a bare NaN."""
    import prunekit.tasks.evaluate
    from prunekit.api import prune_and_save

    monkeypatch.setattr(prunekit.tasks.evaluate, "evaluate", lambda *a, **k: {"accuracy": float("nan")})
    prune_and_save(teacher_dir, tmp_path / "out", sst2_dir, task="sst2", keep_flops=0.5, num_tokens=200,
                   run_bench=False, device="cpu")
    report = strict_json(tmp_path / "out" / "prune_report.json")
    assert report["eval"]["pruned"]["accuracy"] is None


# ---- 5. windows past the model's positions ----------------------------------------------------------------
@pytest.fixture
def lm_folder(tmp_path) -> Path:
    torch.manual_seed(0)
    return save_folder(tmp_path / "llama-lm", LlamaForCausalLM(llama_config(positions=64)).eval())


def test_a_window_past_the_positions_is_refused_before_pruning(lm_folder, tmp_path, capsys, monkeypatch):
    text = write_text(tmp_path / "text")
    forbid_method(monkeypatch, "kprune")
    status, _, err = run(capsys, lm_args(lm_folder, text, tmp_path / "out", "--keep-flops", "0.5", "--window", "128"))
    assert_clean_error(status, err, "prune", "128", "64", "max_position_embeddings")
    assert_no_output(tmp_path / "out")
    status, _, err = run(capsys, ["eval", "--model", lm_folder, "--task", "causal_lm", "--data", text,
                                  "--window", "65", "--device", "cpu"])
    assert_clean_error(status, err, "eval", "--window 65", "max_position_embeddings")
    from prunekit.io.folders import load_model
    from prunekit.tasks.causal_lm.family import evaluate_lm

    with pytest.raises(ConfigError, match="max_position_embeddings"):
        evaluate_lm(load_model(lm_folder, head="causal_lm"), build_tokenizer(), "causal_lm", text, window=100)


# ---- 6. a tokenizer larger than the vocabulary ----------------------------------------------------------
def test_a_tokenizer_larger_than_the_vocabulary_is_refused(tmp_path, sst2_dir, capsys):
    torch.manual_seed(0)
    folder = save_folder(tmp_path / "small-vocab", LlamaForCausalLM(llama_config(vocab=50)).eval())
    text = write_text(tmp_path / "text")
    status, _, err = run(capsys, ["eval", "--model", folder, "--task", "causal_lm", "--data", text, "--device", "cpu"])
    assert_clean_error(status, err, "eval", "99 tokens", "50", "--tokenizer")
    status, _, err = run(capsys, lm_args(folder, text, tmp_path / "out", "--keep-flops", "0.5"))
    assert_clean_error(status, err, "prune", "99 tokens", "50")
    assert_no_output(tmp_path / "out")


# ---- 7. ONNX exports and --generate that do not fit ------------------------------------------------------
@pytest.fixture(scope="module")
def classifier_export(tmp_path_factory) -> Path:
    from prunekit.deploy.export import export_onnx

    root = tmp_path_factory.mktemp("onnx")
    teacher = save_teacher(root / "teacher")
    return export_onnx(teacher, root / "export", exporter="torchscript")


@pytest.mark.parametrize("task, words", [
    ("squad", ["sequence classification model", "question answering head"]),
    ("causal_lm", ["sequence classification model", "causal lm head"]),
    ("stsb", ["2 labels", "regression"]),
    ("mnli", ["2 labels", "3 labels"]),
])
def test_eval_onnx_refuses_a_task_the_export_does_not_serve(task, words, classifier_export, tmp_path, capsys,
                                                            monkeypatch):
    import prunekit.tasks.evaluate

    monkeypatch.setattr(prunekit.tasks.evaluate, "evaluate", lambda *a, **k: pytest.fail("data was read"))
    status, _, err = run(capsys, ["eval", "--onnx", classifier_export, "--task", task, "--data", tmp_path])
    assert_clean_error(status, err, "eval", *words)


def test_eval_onnx_refuses_squad_features_longer_than_the_export(tmp_path, capsys, monkeypatch):
    """SQuAD builds 384-token features; a QA export of a 128-position model cannot take them (it failed
    inside ONNX Runtime after building every feature)."""
    import prunekit.tasks.evaluate
    from prunekit.deploy.export import export_onnx

    teacher = save_teacher(tmp_path / "qa", head="qa")
    export = export_onnx(teacher, tmp_path / "export", exporter="torchscript")
    monkeypatch.setattr(prunekit.tasks.evaluate, "evaluate", lambda *a, **k: pytest.fail("data was read"))
    status, _, err = run(capsys, ["eval", "--onnx", export, "--task", "squad", "--data", tmp_path])
    assert_clean_error(status, err, "eval", "384 tokens", "--max-length")


def test_bench_generate_refuses_an_encoder(teacher_dir, capsys):
    status, _, err = run(capsys, ["bench", "--model", teacher_dir, "--generate", "--batch-sizes", "1",
                                  "--seq-lens", "8", "--rounds", "1"])
    assert_clean_error(status, err, "bench", "--generate", "causal LM", "BertForSequenceClassification")


def test_exporting_an_export_folder(classifier_export, tmp_path, capsys):
    """A float32 export given to export: quantized with --quantize int8, else named; an int8 one is
    named as already quantized (it was told it has no weights)."""
    status, _, err = run(capsys, ["export", "--model", classifier_export, "--out", tmp_path / "again"])
    assert_clean_error(status, err, "export", "already an ONNX export", "--quantize int8")
    status, out, err = run(capsys, ["export", "--model", classifier_export, "--out", tmp_path / "int8",
                                    "--quantize", "int8"])
    assert status == 0, err
    status, _, err = run(capsys, ["export", "--model", tmp_path / "int8", "--out", tmp_path / "int8-again",
                                  "--quantize", "int8"])
    assert_clean_error(status, err, "export", "already quantized (int8)")
    assert_no_output(tmp_path / "int8-again")


# ---- 8. messages ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("model_type, architecture", [
    ("falcon", "FalconForCausalLM"), ("phimoe", "PhimoeForCausalLM"), ("gpt_neox", "GPTNeoXForCausalLM"),
    ("mixtral", "MixtralForCausalLM"),
])
def test_an_unsupported_architecture_is_named_as_such(model_type, architecture, tmp_path, capsys):
    folder = tmp_path / model_type
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"model_type": model_type, "architectures": [architecture]}))
    (folder / "model.safetensors").write_bytes(b"")
    build_tokenizer().save_pretrained(folder)
    status, _, err = run(capsys, lm_args(folder, write_text(tmp_path / "text"), tmp_path / "out", "--keep-flops", "0.5"))
    line = assert_clean_error(status, err, "prune", architecture, "does not support", "LlamaForCausalLM")
    assert "fine-tune" not in line and "Pruned" not in line


def test_a_wrong_head_lists_stock_classes_only(tmp_path, sst2_dir, capsys):
    folder = save_folder(tmp_path / "lm", LlamaForCausalLM(llama_config()).eval())
    status, _, err = run(capsys, prune_args(folder, sst2_dir, tmp_path / "out"))
    line = assert_clean_error(status, err, "prune", "LlamaForCausalLM", "sequence classification head",
                              "BertForSequenceClassification")
    assert "Pruned" not in line


def test_exporting_a_causal_lm_does_not_call_it_an_encoder(lm_folder, tmp_path, capsys):
    status, _, err = run(capsys, ["export", "--model", lm_folder, "--out", tmp_path / "onnx"])
    line = assert_clean_error(status, err, "export", "LlamaForCausalLM", "causal lm")
    assert "encoder" not in line


def test_a_decimal_comma_in_a_budget_is_named(teacher_dir, sst2_dir, tmp_path, capsys):
    status, _, err = run(capsys, prune_args(teacher_dir, sst2_dir, tmp_path / "out", keep="0,5"))
    assert_clean_error(status, err, "prune", "'0,5'", "dot", "'0.5'", "several budgets")


@pytest.mark.parametrize("method", ["kprune", "magnitude"])
def test_a_keep_params_report_does_not_list_a_flops_budget(method, teacher_dir, sst2_dir, tmp_path, capsys):
    argv = [a if a != "--keep-flops" else "--keep-params" for a in prune_args(
        teacher_dir, sst2_dir, tmp_path / "out", "--method", method, "--no-eval")]
    status, _, err = run(capsys, argv)
    assert status == 0, err
    report = strict_json(tmp_path / "out" / "prune_report.json")
    assert report["keep_flops"] is None and report["hyperparameters"]["keep_flops"] is None
    assert report["hyperparameters"]["keep_params"] == 0.5


def test_kwon_prunes_to_a_parameter_budget(teacher_dir, sst2_dir, tmp_path, capsys):
    """kwon --keep-params counted the parameters of the model, not of its view (AttributeError)."""
    argv = [a if a != "--keep-flops" else "--keep-params" for a in prune_args(
        teacher_dir, sst2_dir, tmp_path / "out", "--method", "kwon", "--num-sequences", "16", "--no-eval")]
    argv.remove("--num-tokens")
    argv.remove("200")
    status, _, err = run(capsys, argv)
    assert status == 0, err
    assert strict_json(tmp_path / "out" / "prune_report.json")["non_embedding_params_kept"] <= 0.5



# ---- probes: what a new user tries (each was run with the CLI first) ----------------------------------------
def _data_variant(root: Path, name: str) -> Path:
    """SST-2 folders and files with odd contents."""
    base = write_sst2(root / "base")
    folder = root / name
    folder.mkdir()
    train = (base / "train.tsv").read_text()
    if name == "empty":
        (folder / "train.tsv").write_text("")
    elif name == "header-only":
        (folder / "train.tsv").write_text("sentence\tlabel\n")
    elif name == "utf16":
        (folder / "train.tsv").write_bytes(train.encode("utf-16"))
    elif name == "label-out-of-range":
        (folder / "train.tsv").write_text(train.replace("\t1\n", "\t2\n"))
    elif name == "other-columns":
        for split in ("train", "dev"):
            rows = (base / f"{split}.tsv").read_text().splitlines()[1:]
            (folder / f"{split}.csv").write_text("text,label\n" + "\n".join(r.replace("\t", ",") for r in rows) + "\n")
        return folder
    elif name == "null-label.jsonl":
        folder.rmdir()
        folder.write_text('{"sentence": "good", "label": 1}\n{"sentence": "bad", "label": null}\n')
        return folder
    (folder / "dev.tsv").write_text((base / "dev.tsv").read_text())
    return folder


@pytest.mark.parametrize("name, words", [
    ("empty", ["train.tsv is empty"]),
    ("header-only", ["no train examples"]),
    ("utf16", ["not UTF-8", "iconv"]),
    ("label-out-of-range", ["unknown label '2'", "line"]),
    ("other-columns", ["lacks the column", "'sentence'", "'text'"]),
    ("null-label.jsonl", ["unknown label None", "line 2"]),
])
def test_odd_data_files_are_one_clear_error(name, words, teacher_dir, tmp_path, capsys, monkeypatch):
    """Probes that were already refused cleanly, kept as tests: empty, header-only, UTF-16, out-of-range
    labels, other column names, a null label."""
    forbid_method(monkeypatch, "kprune")
    status, _, err = run(capsys, prune_args(teacher_dir, _data_variant(tmp_path, name), tmp_path / "out"))
    assert_clean_error(status, err, "prune", *words)
    assert_no_output(tmp_path / "out")


@pytest.mark.parametrize("extra, words", [
    (["--set", "ridge="], ["ridge", "must be a number", "''"]),  # was a TypeError from '' < 0
    (["--set", "temperature=1e400"], ["temperature", "finite", "inf"]),  # JSON reads 1e400 as inf
    (["--new-tokens", "1"], ["--new-tokens", "2 or more"]),
    (["--device", "tpu"], ["unknown device 'tpu'"]),
    (["--keep-flops", "0.5,0.5"], ["0.5 twice"]),
    (["--stride", "8"], ["causal_lm only"]),
])
def test_prune_option_probes(extra, words, teacher_dir, sst2_dir, tmp_path, capsys, monkeypatch):
    forbid_method(monkeypatch, "kprune")
    argv = prune_args(teacher_dir, sst2_dir, tmp_path / "out", *extra)
    if "--keep-flops" in extra:
        index = argv.index("--keep-flops")
        del argv[index:index + 2]
    status, _, err = run(capsys, argv)
    assert_clean_error(status, err, "prune", *words)
    assert_no_output(tmp_path / "out")


def test_another_models_tokenizer_is_refused_before_work(teacher_dir, sst2_dir, tmp_path, capsys, monkeypatch):
    """--tokenizer of a model with a 30522-token vocabulary for a 99-token model: was an IndexError."""
    forbid_method(monkeypatch, "kprune")
    big = build_tokenizer()
    big.add_tokens([f"extra{i}" for i in range(20)])
    big.save_pretrained(tmp_path / "big-tokenizer")
    status, _, err = run(capsys, prune_args(teacher_dir, sst2_dir, tmp_path / "out", "--tokenizer",
                                            tmp_path / "big-tokenizer"))
    assert_clean_error(status, err, "prune", "119 tokens", "99")


def test_causal_lm_prune_option_probes(lm_folder, tmp_path, capsys, monkeypatch):
    """--new-tokens 0 failed after the whole prune with measure_generation's wording; --stride
    larger than the window is refused before work."""
    forbid_method(monkeypatch, "kprune")
    text = write_text(tmp_path / "text")
    status, _, err = run(capsys, lm_args(lm_folder, text, tmp_path / "out", "--keep-flops", "0.5", "--new-tokens", "0"))
    assert_clean_error(status, err, "prune", "--new-tokens", "2 or more")
    status, _, err = run(capsys, lm_args(lm_folder, text, tmp_path / "out", "--keep-flops", "0.5", "--stride", "100",
                                         "--window", "32"))
    assert_clean_error(status, err, "prune", "stride <= window")
    for flag in ("--window", "--stride"):  # 0 was read as "not given" (the default window)
        status, _, err = run(capsys, lm_args(lm_folder, text, tmp_path / "out", "--keep-flops", "0.5", flag, "0"))
        assert_clean_error(status, err, "prune", flag, "positive integer, got 0")
    assert_no_output(tmp_path / "out")


def test_a_decoder_with_fewer_positions_than_the_benchmark_length_is_benchmarked(lm_folder, tmp_path):
    """prune's benchmark ran 128 tokens and refused a 64-position model with 'bench_seq_len 128'
    (a name the CLI has no flag for); it now times min(128, positions), the decode prompt leaving
    room for the new tokens."""
    from prunekit.api import prune_and_save

    report = prune_and_save(lm_folder, tmp_path / "out", write_text(tmp_path / "text"), task="causal_lm",
                            keep_flops=0.5, num_sequences=4, calibration_length=16, run_eval=False,
                            bench_batch_size=1, bench_new_tokens=4, device="cpu")
    assert report["latency"]["results"][0]["seq_len"] == 64
    assert report["generation"]["results"][0]["prompt_len"] == 60


def test_bench_generate_past_the_positions_is_refused(lm_folder, capsys):
    status, _, err = run(capsys, ["bench", "--model", lm_folder, "--generate", "--batch-sizes", "1", "--seq-lens",
                                  "60", "--new-tokens", "10", "--rounds", "1"])
    assert_clean_error(status, err, "bench", "--seq-lens 60 plus --new-tokens", "64 positions")


@pytest.mark.parametrize("extra, words", [
    (["--opset", "99"], ["opset 99", "7 to 23"]),  # was an ONNX Runtime traceback after a long log
    (["--opset", "5", "--exporter", "torchscript"], ["opset 5", "torchscript", "7 to 20"]),
    (["--atol", "nan"], ["atol must be positive"]),
    (["--quantize", "int4"], ["int4", "int8"]),
])
def test_export_option_probes(extra, words, teacher_dir, tmp_path, capsys):
    status, _, err = run(capsys, ["export", "--model", teacher_dir, "--out", tmp_path / "onnx", *extra])
    assert_clean_error(status, err, "export", *words)
    assert_no_output(tmp_path / "onnx")


@pytest.mark.parametrize("extra, words", [
    (["--methods", "kprune,,kprune"], ["kprune more than once"]),  # ran kprune twice
    (["--methods", "kprune,cofi"], ["cofi trains", "prunekit prune --method cofi"]),  # failed after kprune's work
    (["--methods", "kprune", "--set", "kprune.temperature=nan"], ["temperature", "finite"]),  # after the teacher's eval
    (["--methods", "kprune", "--keep-params", "0.5,0.5"], ["keep_params lists 0.5 twice"]),  # silently one budget
    (["--methods", "kprun"], ["did you mean 'kprune'".capitalize()]),
])
def test_compare_option_probes(extra, words, teacher_dir, sst2_dir, tmp_path, capsys, monkeypatch):
    import prunekit.compare

    monkeypatch.setattr(prunekit.compare, "build_calibration_sample", lambda *a, **k: pytest.fail("work started"))
    argv = ["compare", "--model", teacher_dir, "--task", "sst2", "--data", sst2_dir, "--out", tmp_path / "cmp",
            "--num-tokens", "200", "--no-bench", "--device", "cpu", *extra]
    if "--keep-params" not in extra:
        argv += ["--keep-flops", "0.5"]
    status, _, err = run(capsys, argv)
    assert_clean_error(status, err, "compare", *words)
    assert_no_output(tmp_path / "cmp")


def test_more_sequences_than_training_rows_warns(caplog):
    from prunekit.tasks.calibration import draw_indices
    from prunekit.tasks.spec import get_task

    with caplog.at_level(logging.WARNING, logger="prunekit"):
        _, drawn = draw_indices(get_task("sst2"), 48, 100_000, 500, seed=0, replace=True, unit="sequence")
    assert len(drawn) == 500
    assert "more than the 48 sequences" in caplog.text and "with replacement" in caplog.text
