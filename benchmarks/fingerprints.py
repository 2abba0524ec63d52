"""Fingerprints of prunekit's outputs, to check that a refactor changes no result (issue 20).

Run mode prunes a fixed set of cases, deterministically on the CPU with one thread, through the
public API only (``prunekit.api.prune_and_save``, ``prunekit.apply_plan``, ``prunekit.load_pruned``),
so the same script runs unchanged on the code before and after the refactor, and writes one JSON:

* tiny random models built here (2 layers, hidden 32, 4 heads, FFN 37/48, vocab 128, fixed seeds):
  BERT, RoBERTa, DistilBERT (SST-2-style classification on a generated GLUE TSV folder) and Llama
  (GQA), Mistral, Qwen2, Qwen3 (all GQA), OPT, GPT-2 (causal LM on a generated text folder), each with
  kprune, kwon, magnitude and random at keep_flops 0.6; plus Llama kprune ``uniform=True``, and
  Llama kprune / Qwen3 kwon at keep_params 0.7;
* real models: minilm-sst2 with kprune and kwon at keep_flops 0.5 (num_tokens 4000, dev accuracy),
  llama-wiki-gqa with kprune at keep_params 0.8 (4 windows of 128 calibration tokens from
  wiki.valid.tokens; perplexity on the first 200 lines of wiki.test.raw, window 256).

Per case: sha256 of the saved folder's plan.json (its JSON, without the teacher's identity a plan
records for replay checks: ``teacher``, ``uniform``), plan.safetensors, model.safetensors, of
config.json with its volatile keys removed (``transformers_version``, ``_name_or_path``) and the
remote code's class names (``auto_map``) kept apart (the per-layer shapes stay), and of the weights tensor by tensor (name, dtype, shape, raw bytes; so that a change of the
safetensors header alone shows as such); the report's flops/params kept and dev metrics (exact
``repr`` of every float); the plan's kept units per layer; and the state dict of ``apply_plan``
(teacher, saved folder), with whether it equals the saved folder's reloaded state dict. Other files of
the folder (tokenizer files, remote code, README.md with this run's temporary paths replaced by
placeholders) and the identity keys set apart above are digested as information only: compare lists them but does not fail on them.
prune_report.json (timings, versions) and structure.png are not digested. A case that raises is
recorded with its error (and then differs from a case that ran).

Usage (from any checkout; PYTHONPATH picks the prunekit under test):

    PYTHONPATH=/path/to/checkout/src python benchmarks/fingerprints.py --out A.json
    python benchmarks/fingerprints.py --compare A.json B.json     # exit 1 on any difference
    ... --only bert-kprune,llama-gqa-kprune-uniform   # a subset of cases (for debugging)
    ... --skip-real                                   # tiny models only (20-40 s)

One run takes about 1 min 45 s of CPU time (about 20 s for the 39 tiny cases, the rest the three
real-model cases): 2 minutes wall on an idle 2-core machine, 4-4.5 minutes when it is shared.
Library versions (torch, transformers) are recorded, and compare warns when they differ:
fingerprints are only comparable on the same library versions and CPU type.
"""

from __future__ import annotations

import os

for _var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
    os.environ.setdefault(_var, "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("TQDM_DISABLE", "1")  # progress bars off (the log stays readable)

import argparse  # noqa: E402
import hashlib  # noqa: E402
import json  # noqa: E402
import shutil  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any  # noqa: E402

SHARED = Path(__file__).resolve().parents[2] / "shared"
if not SHARED.is_dir():
    SHARED = Path("/work/wt/shared")
WORDS = "a the movie film good bad great awful is was not very and it of to man dog runs sits cat".split()
SPECIALS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
VOCAB = 128
METHODS = ("kprune", "kwon", "magnitude", "random")
ENCODERS = ("bert", "roberta", "distilbert")
DECODERS = ("llama-gqa", "mistral", "qwen2", "qwen3", "opt", "gpt2")
VOLATILE_CONFIG_KEYS = ("transformers_version", "_name_or_path")
# What a saved folder says about where its code and its teacher are, not what it computes: the remote
# code's class names (config.json's auto_map) and the teacher's identity a plan records for replay
# checks (plan.json's "teacher", "uniform"). Recorded and compared for information only, so that a
# change to them shows without hiding a change to the units, weights or shapes.
IDENTITY_CONFIG_KEYS = ("auto_map",)
IDENTITY_PLAN_KEYS = ("teacher", "uniform")
# Files of a saved folder that are not fingerprinted: timings and versions; a rendered figure.
NOT_DIGESTED = ("prune_report.json", "structure.png")
STRICT_FILES = ("plan.json", "plan.safetensors", "model.safetensors", "config.json")


# ---- digests ---------------------------------------------------------------------------------------------
def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def sha256_file(path: Path) -> str:
    return sha256_bytes(path.read_bytes())


def tensor_digest(tensor: Any) -> str:
    """sha256 of a tensor's dtype, shape and raw bytes (contiguous, on the CPU)."""
    import torch

    t = tensor.detach().to("cpu").contiguous()
    raw = t.view(torch.uint8).numpy().tobytes() if t.numel() else b""
    return sha256_bytes(f"{t.dtype}|{tuple(t.shape)}|".encode() + raw)


def state_digest(tensors: dict[str, Any]) -> str:
    """One sha256 over tensors by sorted name (name and each tensor's digest)."""
    lines = [f"{name}:{tensor_digest(tensors[name])}" for name in sorted(tensors)]
    return sha256_bytes("\n".join(lines).encode())


def safetensors_digest(path: Path) -> str:
    from safetensors.torch import load_file

    return state_digest(load_file(str(path)))


def exact(value: Any) -> Any:
    """Floats as their exact repr (strings), recursively; other JSON values as they are."""
    if isinstance(value, float):
        return repr(value)
    if isinstance(value, dict):
        return {str(k): exact(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [exact(v) for v in value]
    return value


def clean_metrics(metrics: Any) -> Any:
    """An eval dict without timings."""
    if isinstance(metrics, dict):
        return {k: clean_metrics(v) for k, v in metrics.items()
                if not any(w in k for w in ("seconds", "time", "_ms", "per_s"))}
    return metrics


def normalized(data: bytes, paths: dict[str, Path]) -> bytes:
    """File bytes with this run's own paths (the temporary work folder, the shared folder) named
    by placeholders: README.md names the teacher's folder."""
    for placeholder, path in paths.items():
        data = data.replace(str(path).encode(), placeholder.encode())
    return data


def folder_fingerprint(folder: Path, paths: dict[str, Path]) -> dict[str, Any]:
    config = json.loads((folder / "config.json").read_text())
    for key in VOLATILE_CONFIG_KEYS:
        config.pop(key, None)
    identity = {f"config.{key}": config.pop(key, None) for key in IDENTITY_CONFIG_KEYS}
    plan = json.loads((folder / "plan.json").read_text())
    identity |= {f"plan.{key}": plan.pop(key, None) for key in IDENTITY_PLAN_KEYS}
    files = {
        "plan.json": sha256_bytes(json.dumps(plan, sort_keys=True).encode()),
        "plan.safetensors": sha256_file(folder / "plan.safetensors"),
        "model.safetensors": sha256_file(folder / "model.safetensors"),
        "config.json": sha256_bytes(json.dumps(config, sort_keys=True).encode()),
        "model.tensors": safetensors_digest(folder / "model.safetensors"),
        "plan.tensors": safetensors_digest(folder / "plan.safetensors"),
    }
    other = {p.relative_to(folder).as_posix(): sha256_bytes(normalized(p.read_bytes(), paths))
             for p in sorted(folder.rglob("*"))
             if p.is_file() and p.name not in NOT_DIGESTED and p.name not in STRICT_FILES}
    other |= {key: sha256_bytes(json.dumps(value, sort_keys=True).encode()) for key, value in identity.items()}
    return {"files": files, "other_files": other, "plan": plan,
            "layer_shapes": config.get("prunekit_layers")}


# ---- tiny models and data --------------------------------------------------------------------------------
def write_tokenizer(folder: Path) -> None:
    from transformers import BertTokenizer

    tokens = SPECIALS + WORDS
    tokens += [f"tok{i}" for i in range(VOCAB - len(tokens))]
    BertTokenizer(vocab={t: i for i, t in enumerate(tokens)}).save_pretrained(folder)


def write_sst2(folder: Path, n_train: int = 64, n_dev: int = 32, seed: int = 0) -> Path:
    """GLUE-style SST-2 folder: 'good' is 1, 'bad' 0, with random filler words."""
    import numpy as np

    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    for name, n in (("train.tsv", n_train), ("dev.tsv", n_dev)):
        lines = ["sentence\tlabel"]
        for _ in range(n):
            label = int(rng.integers(0, 2))
            words = " ".join(rng.choice(WORDS[8:], size=int(rng.integers(1, 10))))
            lines.append(f"{words} {'good' if label else 'bad'} it was\t{label}")
        (folder / name).write_text("\n".join(lines) + "\n")
    return folder


def write_text(folder: Path, seed: int = 0) -> Path:
    """A causal-LM text folder (train.txt, test.txt) of random in-vocabulary words."""
    import numpy as np

    rng = np.random.default_rng(seed)
    words = WORDS + [f"tok{i}" for i in range(20, 60)]
    folder.mkdir(parents=True, exist_ok=True)
    for name, n in (("train.txt", 300), ("test.txt", 30)):
        lines = [" ".join(rng.choice(words, size=int(rng.integers(4, 14)))) for _ in range(n)]
        (folder / name).write_text("\n".join(lines) + "\n")
    return folder


def spread_out(model: Any) -> Any:
    """Spread-out random weights (the HF init makes a tiny model's scores nearly degenerate): norms
    near 1 (biases near 0), matrices N(0, 0.25), other vectors N(0, 0.2); from torch's global RNG."""
    import torch

    with torch.no_grad():
        for name, param in model.named_parameters():
            if "norm" in name.lower() or name.split(".")[-2:-1] in (["ln_1"], ["ln_2"], ["ln_f"]):
                base = 1.0 if name.endswith("weight") else 0.0
                param.copy_(base + 0.2 * torch.randn_like(param))
            elif param.dim() >= 2:
                param.normal_(0.0, 0.25)
            else:
                param.normal_(0.0, 0.2)
    return model.eval()


def build_tiny(family: str, seed: int) -> Any:
    import torch
    import transformers as tf

    enc = {"vocab_size": VOCAB, "max_position_embeddings": 128, "num_labels": 2}
    if family == "bert":
        model_class, config = tf.BertForSequenceClassification, tf.BertConfig(
            hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=37, **enc)
    elif family == "roberta":
        enc["max_position_embeddings"] += 2  # positions start after padding_idx
        model_class, config = tf.RobertaForSequenceClassification, tf.RobertaConfig(
            hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=37, pad_token_id=0,
            bos_token_id=2, eos_token_id=3, **enc)
    elif family == "distilbert":
        model_class, config = tf.DistilBertForSequenceClassification, tf.DistilBertConfig(
            dim=32, n_layers=2, n_heads=4, hidden_dim=37, **enc)
    else:
        dec = {"vocab_size": VOCAB, "hidden_size": 32, "intermediate_size": 48, "num_hidden_layers": 2,
               "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 8, "max_position_embeddings": 64,
               "tie_word_embeddings": True, "pad_token_id": 0, "bos_token_id": 2, "eos_token_id": 3}
        if family == "llama-gqa":
            model_class, config = tf.LlamaForCausalLM, tf.LlamaConfig(**dec)
        elif family == "mistral":
            model_class, config = tf.MistralForCausalLM, tf.MistralConfig(sliding_window=16, **dec)
        elif family == "qwen2":
            # transformers reads a qwen2 folder's vocabulary with its Qwen2Tokenizer, which adds
            # <|endoftext|> as token 128: the embedding table has a row for it.
            model_class, config = tf.Qwen2ForCausalLM, tf.Qwen2Config(**(dec | {"vocab_size": VOCAB + 1}))
        elif family == "qwen3":
            model_class, config = tf.Qwen3ForCausalLM, tf.Qwen3Config(**dec)
        elif family == "opt":
            model_class, config = tf.OPTForCausalLM, tf.OPTConfig(
                vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, ffn_dim=48,
                max_position_embeddings=64, word_embed_proj_dim=32, pad_token_id=0, bos_token_id=2,
                eos_token_id=3, dropout=0.0, attention_dropout=0.0)
        elif family == "gpt2":
            model_class, config = tf.GPT2LMHeadModel, tf.GPT2Config(
                vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=4, n_inner=48, n_positions=64, pad_token_id=0,
                bos_token_id=2, eos_token_id=3, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
        else:
            raise ValueError(family)
    torch.manual_seed(seed)
    return spread_out(model_class(config))


# ---- cases -----------------------------------------------------------------------------------------------
def cases() -> list[dict[str, Any]]:
    out = []
    for i, family in enumerate(ENCODERS + DECODERS):
        for method in METHODS:
            out.append({"name": f"{family}-{method}", "kind": "tiny", "family": family, "seed": 100 + i,
                        "options": {"method": method, "keep_flops": 0.6}})
    llama_seed = 100 + len(ENCODERS)
    out += [
        {"name": "llama-gqa-kprune-uniform", "kind": "tiny", "family": "llama-gqa", "seed": llama_seed,
         "options": {"method": "kprune", "keep_flops": 0.6, "uniform": True}},
        {"name": "llama-gqa-kprune-params0.7", "kind": "tiny", "family": "llama-gqa", "seed": llama_seed,
         "options": {"method": "kprune", "keep_params": 0.7}},
        {"name": "qwen3-kwon-params0.7", "kind": "tiny", "family": "qwen3", "seed": llama_seed + 3,
         "options": {"method": "kwon", "keep_params": 0.7}},
        {"name": "minilm-sst2-kprune-flops0.5", "kind": "real", "model": "minilm-sst2", "data": "sst2",
         "options": {"task": "sst2", "method": "kprune", "keep_flops": 0.5, "num_tokens": 4000}},
        {"name": "minilm-sst2-kwon-flops0.5", "kind": "real", "model": "minilm-sst2", "data": "sst2",
         "options": {"task": "sst2", "method": "kwon", "keep_flops": 0.5, "num_tokens": 4000}},
        {"name": "llama-wiki-gqa-kprune-params0.8", "kind": "real", "model": "llama-wiki-gqa", "data": "wikitext2",
         "options": {"task": "causal_lm", "method": "kprune", "keep_params": 0.8, "num_sequences": 4,
                     "calibration_length": 128, "eval_window": 256}},
    ]
    return out


def prepare_inputs(case: dict[str, Any], work: Path) -> tuple[Path, Path, dict[str, Any]]:
    """The teacher folder, the data source and the full prune_and_save options of a case."""
    options = {"seed": 0, "device": "cpu", "run_bench": False, "run_eval": True, **case["options"]}
    if case["kind"] == "real":
        teacher = SHARED / "models" / case["model"]
        if case["data"] == "wikitext2":
            data = work / "wikitext2-short"
            if not data.is_dir():  # calibration: the valid split; perplexity: the test split's first 200 lines
                data.mkdir()
                shutil.copy(SHARED / "data" / "wikitext2" / "wiki.valid.tokens", data / "wiki.valid.tokens")
                lines = (SHARED / "data" / "wikitext2" / "wiki.test.raw").read_text(encoding="utf-8").splitlines()
                (data / "wiki.test.raw").write_text("\n".join(lines[:200]) + "\n", encoding="utf-8")
        else:
            data = SHARED / "data" / case["data"]
        return teacher, data, options
    family = case["family"]
    teacher = work / f"teacher-{family}-{case['seed']}"
    if not teacher.is_dir():
        build_tiny(family, case["seed"]).save_pretrained(teacher)
        write_tokenizer(teacher)
    if family in ENCODERS:
        data = write_sst2(work / "sst2") if not (work / "sst2").is_dir() else work / "sst2"
        options = {"task": "sst2", "num_tokens": 400, **options}
    else:
        data = write_text(work / "text") if not (work / "text").is_dir() else work / "text"
        options = {"task": "causal_lm", "num_sequences": 8, "calibration_length": 32, "eval_window": 32, **options}
    return teacher, data, options


def run_case(case: dict[str, Any], work: Path) -> dict[str, Any]:
    import torch

    import prunekit
    from prunekit.api import prune_and_save

    teacher, data, options = prepare_inputs(case, work)
    out = work / "out" / case["name"]
    torch.manual_seed(0)
    start = time.perf_counter()
    report = prune_and_save(teacher, out, data, **options)
    seconds = time.perf_counter() - start
    record: dict[str, Any] = {"options": exact(options)}
    record |= folder_fingerprint(out, {"<work>": work, "<shared>": SHARED})
    record["report"] = exact({key: report.get(key) for key in (
        "flops_kept", "params_kept", "non_embedding_params_kept", "flops_seq_len", "hidden_size", "layers")})
    record["report"]["sample"] = exact(report.get("sample"))
    record["eval"] = exact(clean_metrics(report.get("eval")))
    replayed = prunekit.apply_plan(teacher, out)
    reloaded = prunekit.load_pruned(out)
    record["replay"] = {"state_dict": state_digest(replayed.state_dict()),
                        "equals_saved": state_digest(reloaded.state_dict()) == state_digest(replayed.state_dict())}
    record["seconds"] = round(seconds, 1)  # not compared
    return record


def run(args: argparse.Namespace) -> int:
    import torch
    import transformers

    import prunekit

    torch.set_num_threads(1)
    torch.set_num_interop_threads(1)
    transformers.logging.set_verbosity_error()
    transformers.logging.disable_progress_bar()
    wanted = set(args.only.split(",")) if args.only else None
    selected = [c for c in cases() if (wanted is None or c["name"] in wanted)
                and not (args.skip_real and c["kind"] == "real")]
    if wanted and len(selected) != len(wanted):
        raise SystemExit(f"unknown cases: {sorted(wanted - {c['name'] for c in selected})}")
    result: dict[str, Any] = {
        "prunekit_file": str(Path(prunekit.__file__).resolve()),
        "versions": {"torch": torch.__version__, "transformers": transformers.__version__,
                     "python": sys.version.split()[0]},
        "cases": {},
    }
    total = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="prunekit-fingerprints-") as tmp:
        work = Path(tmp)
        for case in selected:
            print(f"{case['name']} ...", end=" ", flush=True)
            try:
                result["cases"][case["name"]] = run_case(case, work)
                print(f"{result['cases'][case['name']]['seconds']} s", flush=True)
            except Exception as err:  # noqa: BLE001 -- a failing case is a fingerprint too
                result["cases"][case["name"]] = {"error": f"{type(err).__name__}: {err}"}
                print(f"ERROR {type(err).__name__}: {err}", flush=True)
    result["seconds"] = round(time.perf_counter() - total, 1)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=1, sort_keys=True) + "\n")
    print(f"wrote {args.out} ({len(selected)} cases, {result['seconds']} s)")
    return 0


# ---- compare ---------------------------------------------------------------------------------------------
NOT_COMPARED = ("seconds",)


def _diff_keys(a: Any, b: Any, prefix: str = "") -> list[str]:
    """Dotted paths where two JSON values differ."""
    if isinstance(a, dict) and isinstance(b, dict):
        out = []
        for key in sorted(set(a) | set(b)):
            if key in NOT_COMPARED:
                continue
            path = f"{prefix}.{key}" if prefix else key
            if key not in a or key not in b:
                out.append(path + (" (only in B)" if key not in a else " (only in A)"))
            else:
                out += _diff_keys(a[key], b[key], path)
        return out
    return [] if a == b else [prefix or "(value)"]


def compare(path_a: str, path_b: str) -> int:
    a, b = (json.loads(Path(p).read_text()) for p in (path_a, path_b))
    print(f"A: {path_a} ({a.get('prunekit_file')})\nB: {path_b} ({b.get('prunekit_file')})")
    if a.get("versions") != b.get("versions"):
        print(f"note: library versions differ: {a.get('versions')} vs {b.get('versions')}")
    rows, differ = [], 0
    for name in sorted(set(a["cases"]) | set(b["cases"]), key=lambda n: (n not in a["cases"], n)):
        if name not in a["cases"] or name not in b["cases"]:
            rows.append((name, "MISSING", "only in " + ("B" if name not in a["cases"] else "A")))
            differ += 1
            continue
        diffs = _diff_keys(a["cases"][name], b["cases"][name])
        strict = [d for d in diffs if not d.startswith("other_files")]
        info = [d for d in diffs if d.startswith("other_files")]
        if strict:
            differ += 1
        status = "DIFFERS" if strict else ("same (other files differ)" if info else "identical")
        rows.append((name, status, ", ".join(strict + info)))
    width, status_width = (max(len(r[i]) for r in rows) for i in (0, 1))
    print(f"{'case':<{width}}  {'status':<{status_width}}  what differs")
    for name, status, what in rows:
        print(f"{name:<{width}}  {status:<{status_width}}  {what}".rstrip())
    print(f"\n{differ} of {len(rows)} cases differ" if differ else f"\nall {len(rows)} cases identical")
    return 1 if differ else 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", help="write the fingerprints of this PYTHONPATH's prunekit here")
    parser.add_argument("--compare", nargs=2, metavar=("A", "B"), help="compare two fingerprint files")
    parser.add_argument("--only", help="comma-separated case names")
    parser.add_argument("--skip-real", action="store_true", help="tiny models only")
    args = parser.parse_args(argv)
    if args.compare:
        return compare(*args.compare)
    if not args.out:
        parser.error("give --out FILE (run) or --compare A B")
    return run(args)


if __name__ == "__main__":
    sys.exit(main())
