"""Issue 11 item 4: a saved pruned folder explains itself (README.md) and loads in plain transformers
without prunekit (remote code named in config.json's auto_map, trust_remote_code=True), for every
family and head, with the outputs of the in-process model; prunekit's own loading stays preferred."""

from __future__ import annotations

import copy
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from builders import WITHOUT_PRUNEKIT, view
from conftest import make_batch, model_inputs_for, outputs_of
from transformers import AutoConfig

from prunekit import load_pruned, save_pruned
from prunekit.core.surgery import LayerPlan, PruningPlan, apply_plan
from prunekit.families import get_adapter

D_FF = 37
# Every structure a saved folder may describe: narrowed heads and neurons, an emptied sublayer (zero
# heads), a removed FFN and a removed attention sublayer, and a narrowed residual stream (24 of 32).
PLAN = PruningPlan(
    layers=[
        LayerPlan(heads=[0, 2], neurons=list(range(0, D_FF, 3))),
        LayerPlan(heads=[], neurons=[5, 6], ffn_removed=True),
        LayerPlan(heads=[1, 2, 3], neurons=[4, 8, 9], attention_removed=True),
    ],
    hidden=[i for i in range(32) if i % 4 != 1],
)

# Runs in a fresh interpreter where `import prunekit` is made to fail (builders.WITHOUT_PRUNEKIT):
# plain transformers, remote code only. One interpreter loads every folder (starting one costs
# seconds on a shared machine).
LOADER = WITHOUT_PRUNEKIT + r"""
results = {}
for name, (folder, auto, batch_file) in json.loads(sys.argv[1]).items():
    model = getattr(transformers, auto).from_pretrained(folder, trust_remote_code=True).eval()
    with torch.no_grad():
        out = model(**torch.load(batch_file))
    value = torch.stack([out.start_logits, out.end_logits], -1) if hasattr(out, "start_logits") else out.logits
    results[name] = {"out": value, "class": type(model).__name__, "module": type(model).__module__,
                     "config": type(model.config).__name__}
assert not [m for m, v in sys.modules.items() if m.split(".")[0] == "prunekit" and v is not None], "prunekit loaded"
torch.save(results, sys.argv[2])
"""
CASES = [(family, head) for family in ("bert", "roberta", "distilbert") for head in ("classification", "qa")]


def _pruned(make_model, family: str, head: str):
    model = make_model(family, head, num_layers=3)
    return apply_plan(view(model), copy.deepcopy(PLAN)).eval()


def _plain_transformers_load(jobs: dict, tmp_path: Path) -> dict:
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env.update(HF_MODULES_CACHE=str(tmp_path / "hf_modules"), HF_HUB_OFFLINE="1")
    script, out_file = tmp_path / "load.py", tmp_path / "out.pt"
    script.write_text(LOADER)
    done = subprocess.run([sys.executable, "-I", str(script), json.dumps(jobs), str(out_file)], cwd=tmp_path,
                          env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    return torch.load(out_file)


def test_pruned_folders_load_in_plain_transformers_without_prunekit(make_model, tokenizer, tmp_path):
    """BERT, RoBERTa and DistilBERT, classification and QA heads, with narrowed heads and neurons, an
    emptied sublayer, removed sublayers and a narrowed hidden size: same outputs within 1e-6."""
    jobs, expected, folders = {}, {}, {}
    for family, head in CASES:
        name = f"{family}-{head}"
        model = _pruned(make_model, family, head)
        folders[name] = save_pruned(model, tmp_path / name, tokenizer=tokenizer)
        batch = model_inputs_for(model, make_batch([9, 5, 2, 7], seed=1, token_type_ids=family != "distilbert",
                                                   pad_id=1 if family == "roberta" else 0))
        torch.save(batch, tmp_path / f"{name}.pt")
        expected[name] = (outputs_of(model, batch), batch)
        auto = "AutoModelForQuestionAnswering" if head == "qa" else "AutoModelForSequenceClassification"
        jobs[name] = (str(folders[name]), auto, str(tmp_path / f"{name}.pt"))
    loaded = _plain_transformers_load(jobs, tmp_path)
    for name, (want, batch) in expected.items():
        assert loaded[name]["class"].startswith("Pruned"), name
        assert loaded[name]["module"].split(".")[0] != "prunekit", name
        # One config class name on every path (prunekit registers the remote code's classes).
        assert loaded[name]["config"] == type(AutoConfig.from_pretrained(folders[name])).__name__, name
        assert loaded[name]["config"] in {"PrunekitBertConfig", "PrunekitRobertaConfig", "PrunekitDistilBertConfig"}
        torch.testing.assert_close(loaded[name]["out"], want, atol=1e-6, rtol=0, msg=name)
        # prunekit's own loading is still preferred: no remote code runs after `import prunekit`.
        reloaded = load_pruned(folders[name])
        assert type(reloaded).__module__ == "prunekit.families.remote_code.modeling_prunekit", name
        assert torch.equal(outputs_of(reloaded, batch), want), name


def test_the_folder_readme_says_what_was_pruned_and_how_to_load_it(teacher_dir, sst2_dir, tmp_path):
    from prunekit.api import prune_and_save

    prune_and_save(str(teacher_dir), tmp_path / "pruned", str(sst2_dir), task="sst2", keep_flops=0.5,
                   num_tokens=200, run_eval=False, run_bench=False)
    text = (tmp_path / "pruned" / "README.md").read_text()
    for words in ("kprune", "keep_flops 0.5", "sst2", str(teacher_dir), "prunekit.load_pruned",
                  "import prunekit", "AutoModelForSequenceClassification", "trust_remote_code=True",
                  'from_pretrained("pruned")', 'AutoTokenizer.from_pretrained("pruned", trust_remote_code=False)'):
        assert words in text, words
    config = json.loads((tmp_path / "pruned" / "config.json").read_text())
    assert config["auto_map"]["AutoModelForSequenceClassification"] == (
        "modeling_prunekit.PrunedBertForSequenceClassification")
    assert (tmp_path / "pruned" / "modeling_prunekit.py").is_file()


def test_a_folder_saved_before_the_remote_code_still_loads(make_model, tokenizer, tmp_path):
    model = _pruned(make_model, "bert", "classification")
    out = save_pruned(model, tmp_path / "old", tokenizer=tokenizer)
    # What an earlier release wrote: no auto_map, no remote code, no README.
    config = json.loads((out / "config.json").read_text())
    del config["auto_map"]
    (out / "config.json").write_text(json.dumps(config))
    for name in ("modeling_prunekit.py", "configuration_prunekit.py", "README.md"):
        (out / name).unlink()
    batch = make_batch([6, 3], seed=2)
    assert torch.equal(outputs_of(load_pruned(out), batch), outputs_of(model, batch))
    from transformers import AutoModelForSequenceClassification

    assert torch.equal(outputs_of(AutoModelForSequenceClassification.from_pretrained(out).eval(), batch),
                       outputs_of(model, batch))


# Loads only the tokenizer, in a fresh interpreter without prunekit and with stdin closed, once as a
# user would (no trust_remote_code) and once with trust_remote_code=False; what transformers prints
# during each call is kept, to find its "run the custom code?" question.
TOKENIZER_LOADER = WITHOUT_PRUNEKIT + r"""
import contextlib, io
from transformers import AutoTokenizer
results = {}
for name, kwargs in (("default", {}), ("untrusted", {"trust_remote_code": False})):
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed), contextlib.redirect_stderr(printed):
        tokenizer = AutoTokenizer.from_pretrained(sys.argv[1], **kwargs)
    results[name] = {"class": type(tokenizer).__name__, "ids": tokenizer(sys.argv[2])["input_ids"],
                     "printed": printed.getvalue()}
print(json.dumps(results))
"""
ASKS = "Do you wish to run the custom code"


@pytest.fixture(scope="module")
def tokenizer_alone(tmp_path_factory) -> tuple[dict, list[int], str]:
    """(what the loader saw, the ids prunekit's tokenizer gives, its class name) for a pruned folder."""
    from conftest import build_tiny_model, build_tokenizer

    tmp_path = tmp_path_factory.mktemp("tokenizer_alone")
    tokenizer = build_tokenizer()
    model = apply_plan(get_adapter(build_tiny_model("bert", "classification", num_layers=3)), copy.deepcopy(PLAN))
    folder = save_pruned(model, tmp_path / "pruned", tokenizer=tokenizer)
    text = "a good film"
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env.update(HF_MODULES_CACHE=str(tmp_path / "hf_modules"), HF_HUB_OFFLINE="1")
    script = tmp_path / "load_tokenizer.py"
    script.write_text(TOKENIZER_LOADER)
    done = subprocess.run([sys.executable, "-I", str(script), str(folder), text], cwd=tmp_path, env=env,
                          stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1]), tokenizer(text)["input_ids"], type(tokenizer).__name__


def test_the_tokenizer_of_a_pruned_folder_loads_without_prunekit(tokenizer_alone):
    """Plain transformers loads the saved tokenizer alone, with or without trust_remote_code=False;
    with it, nothing is asked."""
    loaded, ids, cls = tokenizer_alone
    for name in ("default", "untrusted"):
        assert loaded[name]["class"] == cls and loaded[name]["ids"] == ids, name
    assert ASKS not in loaded["untrusted"]["printed"]


@pytest.mark.xfail(strict=True, reason=(
    "transformers' AutoTokenizer first loads the model config with AutoConfig and the caller's "
    "trust_remote_code (None); config.json names remote code for AutoConfig (auto_map) under a "
    "model_type plain transformers does not know (prunekit_bert), so resolve_trust_remote_code asks "
    "before the tokenizer files are read. Both are needed for trust_remote_code=True model loading."))
def test_loading_the_tokenizer_alone_asks_nothing(tokenizer_alone):
    loaded, _, _ = tokenizer_alone
    assert ASKS not in loaded["default"]["printed"]
