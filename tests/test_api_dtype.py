"""Issue 21 item 3, half precision: a model held or saved in bfloat16 or float16 is pruned (computed in
float32 on the CPU) and comes back, and is saved, in its own dtype, or in the one ``dtype`` /
``--dtype`` asks for; the saved config.json says it, and every load path (prunekit.load_pruned, the
Auto class after ``import prunekit``, trust_remote_code without prunekit) gives it, with the outputs
of the in-memory model. A half model's plan on the CPU is the plan of the float32 model with the same
weights; the GPU's path (compute in the model's dtype) runs every method. Tiny random Llama models."""

from __future__ import annotations

import copy
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from builders import WITHOUT_PRUNEKIT, spread_out
from conftest import assert_same_plan, build_tokenizer
from safetensors import safe_open
from test_cli import run
from test_cli_probes_inputs import llama_config, lm_args, strict_json, write_text
from transformers import AutoModelForCausalLM, LlamaForCausalLM

import prunekit.api
from prunekit import ConfigError, load_pruned
from prunekit.api import PruneOptions, apply_plan, prune
from prunekit.tasks.causal_lm.data import build_lm_calibration_sample

HALF = [torch.bfloat16, torch.float16]
SAFETENSORS_NAMES = {torch.bfloat16: "BF16", torch.float16: "F16"}
VOCAB = 99


def name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def tiny_lm(seed: int = 0) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    return spread_out(LlamaForCausalLM(llama_config(vocab=VOCAB, tie_word_embeddings=True, pad_token_id=0)))


def lm_sample():
    stream = torch.randint(1, VOCAB, (400,), generator=torch.Generator().manual_seed(1))
    return build_lm_calibration_sample(None, stream, num_sequences=8, seq_len=16, batch_size=4)


def logits(model, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=ids).logits


IDS = torch.randint(1, VOCAB, (2, 12), generator=torch.Generator().manual_seed(2))


def weights_dtypes(folder: Path) -> set[str]:
    with safe_open(str(folder / "model.safetensors"), "pt") as f:
        return {str(f.get_slice(key).get_dtype()) for key in f.keys()}  # noqa: SIM118  (safe_open has no iterator)


# ---- the plan of a half model, computed in float32 ----------------------------------------------------
@pytest.mark.parametrize("method", ["kprune", "kwon"])
def test_a_bfloat16_model_is_pruned_in_float32_with_the_plan_of_its_float32_widening(method):
    """The CPU widens the bfloat16 teacher (exactly) and computes in float32: the plan is the float32
    model's with the same weights, bit for bit; against the float32 model before rounding, about the
    same widths and most of the same units (near-ties may fall the other way)."""
    original = tiny_lm()
    half = copy.deepcopy(original).to(torch.bfloat16)
    options = PruneOptions(task="causal_lm", method=method, keep_params=0.7, device="cpu")
    result = prune(half, None, lm_sample(), options)
    assert next(half.parameters()).dtype == torch.bfloat16  # the caller's model is not changed
    assert {p.dtype for p in result.model.parameters()} == {torch.bfloat16}
    assert result.report["dtype"] == {"teacher": "bfloat16", "compute": "float32", "pruned": "bfloat16"}
    widened = prune(copy.deepcopy(half).float(), None, lm_sample(), options)
    assert_same_plan(result.plan, widened.plan)
    # The pruned half model is the widened one's pruned model rounded once.
    assert torch.equal(logits(result.model, IDS), logits(widened.model.to(torch.bfloat16), IDS))
    unrounded = prune(original, None, lm_sample(), options).plan
    shared = kept = kept_unrounded = 0
    for a, b in zip(result.plan.layers, unrounded.layers, strict=True):
        shared += len(set(a.heads) & set(b.heads)) + len(set(a.neurons) & set(b.neurons))
        kept, kept_unrounded = kept + len(a.heads) + len(a.neurons), kept_unrounded + len(b.heads) + len(b.neurons)
    # Rounding moves every weight by up to 2⁻⁹ of itself; a random model's scores lie close together,
    # so a few units near the threshold change sides (Kwon: 52 of 59 kept units shared, Kprune: all).
    assert abs(kept - kept_unrounded) <= 0.05 * kept and shared >= 0.8 * kept


# ---- folders in, folders out -------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", HALF)
def test_a_half_folder_is_pruned_and_saved_in_its_own_dtype(dtype, tmp_path, capsys):
    teacher = tmp_path / "teacher"
    tiny_lm().to(dtype).save_pretrained(teacher)
    build_tokenizer().save_pretrained(teacher)
    out = tmp_path / "out"
    status, _, err = run(capsys, lm_args(teacher, write_text(tmp_path / "text"), out, "--method", "kwon",
                                         "--keep-params", "0.7", "--window", "16"))
    assert status == 0, err
    config = json.loads((out / "config.json").read_text())
    assert config["dtype"] == name(dtype) and weights_dtypes(out) == {SAFETENSORS_NAMES[dtype]}
    report = strict_json(out / "prune_report.json")
    assert report["dtype"] == {"teacher": name(dtype), "compute": "float32", "pruned": name(dtype)}
    # `prunekit eval` scores the folder in its dtype too: the report's figure again.
    status, printed, err = run(capsys, ["eval", "--model", out, "--task", "causal_lm", "--data", tmp_path / "text",
                                        "--window", "16", "--device", "cpu"])
    assert status == 0, err
    assert json.loads(printed)["perplexity"] == report["eval"]["pruned"]["perplexity"]
    assert load_pruned(out).dtype == dtype
    assert AutoModelForCausalLM.from_pretrained(out).dtype == dtype


def test_dtype_asks_for_another_dtype(tmp_path, capsys):
    """--dtype bfloat16 from a float32 folder, and --dtype float32 from a bfloat16 one."""
    f32, bf16 = tmp_path / "f32", tmp_path / "bf16"
    tiny_lm().save_pretrained(f32)
    tiny_lm().to(torch.bfloat16).save_pretrained(bf16)
    text = write_text(tmp_path / "text")
    for teacher, wanted in ((f32, "bfloat16"), (bf16, "float32")):
        build_tokenizer().save_pretrained(teacher)
        out = tmp_path / f"out-{wanted}"
        status, _, err = run(capsys, lm_args(teacher, text, out, "--method", "magnitude", "--keep-params", "0.7",
                                             "--no-eval", "--dtype", wanted))
        assert status == 0, err
        assert json.loads((out / "config.json").read_text())["dtype"] == wanted
        assert strict_json(out / "prune_report.json")["dtype"]["pruned"] == wanted
        assert load_pruned(out).dtype == getattr(torch, wanted)


def test_an_unknown_dtype_is_refused_before_any_work():
    with pytest.raises(ConfigError, match="unknown dtype 'float8'; use one of float32, bfloat16, float16"):
        prune(tiny_lm(), None, lm_sample(), task="causal_lm", method="magnitude", keep_params=0.7, dtype="float8")


# ---- the three load paths ------------------------------------------------------------------------------
LOADER = WITHOUT_PRUNEKIT + r"""
results = {}
for name, (folder, ids_file) in json.loads(sys.argv[1]).items():
    model = transformers.AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True).eval()
    with torch.no_grad():
        results[name] = {"dtype": str(model.dtype), "logits": model(input_ids=torch.load(ids_file)).logits}
torch.save(results, sys.argv[2])
"""


def test_every_load_path_gives_the_saved_dtype_and_the_in_memory_outputs(tmp_path):
    """prunekit.load_pruned, the Auto class after ``import prunekit``, trust_remote_code without prunekit, and
    apply-plan from the teacher (a model or its folder)."""
    jobs, expected = {}, {}
    torch.save(IDS, tmp_path / "ids.pt")
    tiny_lm().save_pretrained(tmp_path / "teacher")
    for dtype in HALF:
        # As users hold a half model: loaded in its dtype, with the rotary frequencies still in float32.
        teacher = AutoModelForCausalLM.from_pretrained(tmp_path / "teacher", dtype=dtype)
        result = prune(teacher, None, lm_sample(), task="causal_lm", method="kprune", keep_params=0.7, device="cpu")
        folder = result.save(tmp_path / name(dtype))
        assert json.loads((folder / "config.json").read_text())["dtype"] == name(dtype)
        want = logits(result.model, IDS)
        for loaded in (load_pruned(folder), AutoModelForCausalLM.from_pretrained(folder)):
            assert loaded.dtype == dtype
            assert torch.equal(logits(loaded, IDS), want)
        # apply-plan rebuilds it from the teacher, in the teacher's dtype, bit for bit.
        teacher.save_pretrained(tmp_path / f"teacher-{name(dtype)}")
        for source in (teacher, tmp_path / f"teacher-{name(dtype)}"):
            rebuilt = apply_plan(source, folder)
            assert rebuilt.dtype == dtype and torch.equal(logits(rebuilt, IDS), want)
        jobs[name(dtype)] = (str(folder), str(tmp_path / "ids.pt"))
        expected[name(dtype)] = want
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env.update(HF_MODULES_CACHE=str(tmp_path / "hf_modules"), HF_HUB_OFFLINE="1")
    script, out_file = tmp_path / "load.py", tmp_path / "out.pt"
    script.write_text(LOADER)
    done = subprocess.run([sys.executable, "-I", str(script), json.dumps(jobs), str(out_file)], cwd=tmp_path,
                          env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    loaded = torch.load(out_file)
    for key, want in expected.items():
        assert loaded[key]["dtype"] == f"torch.{key}"
        assert torch.equal(loaded[key]["logits"], want), key


# ---- the GPU's path, run on the CPU ---------------------------------------------------------------------
@pytest.mark.parametrize("method", ["kprune", "kwon", "magnitude", "random"])
def test_every_method_runs_computing_in_bfloat16(method, monkeypatch):
    """A GPU computes in the model's dtype (prunekit.core.runtime.compute_dtype); the same code is made
    to do so here: every method runs on bfloat16 weights, meets its budget, and keeps the dtype."""
    monkeypatch.setattr(prunekit.api, "compute_dtype", lambda device, dtype, training=False: dtype)
    result = prune(tiny_lm().to(torch.bfloat16), None, lm_sample(), task="causal_lm", method=method,
                   keep_params=0.7, device="cpu")
    assert result.report["dtype"] == {"teacher": "bfloat16", "compute": "bfloat16", "pruned": "bfloat16"}
    assert result.report["non_embedding_params_kept"] <= 0.7
    assert {p.dtype for p in result.model.parameters()} == {torch.bfloat16}
    assert torch.isfinite(logits(result.model, IDS).float()).all()
