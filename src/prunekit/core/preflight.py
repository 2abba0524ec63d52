"""Checks that run before any work (issue 11): everything a run can know is wrong before it starts
is refused up front with one line that names the problem and the fix, so that no run spends
minutes pruning and then fails, or, worse, finishes with a silently wrong result.

Each function checks one thing and raises a :mod:`prunekit.core.errors` error (or, for what is
allowed but almost certainly not meant, logs a warning and returns it). The API, the CLI and the
methods call them at their entry points.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import math
import numbers
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import torch

from prunekit.core.errors import ConfigError, DataError, ModelError
from prunekit.core.view import LayerShape, ModelAdapter

logger = logging.getLogger(__name__)

# Files of which a saved tokenizer has at least one; a folder with none of them would make
# transformers build an empty tokenizer (five special tokens) that maps every word to [UNK].
TOKENIZER_FILES = ("tokenizer.json", "vocab.txt", "vocab.json", "spiece.model", "sentencepiece.bpe.model",
                   "tokenizer.model", "merges.txt")


# ---- sizes ---------------------------------------------------------------------------------------------
def check_positive(name: str, value: float | None, minimum: float = 1, integer: bool = True) -> None:
    """``value`` (None: not given) must be >= ``minimum``; ``name`` is how the user wrote it."""
    if value is None:
        return
    if isinstance(value, bool) or not isinstance(value, int | float) or (integer and float(value) != int(value)):
        kind = "an integer" if integer else "a number"
        raise ConfigError(f"{name} must be {kind}, got {value!r}")
    if not math.isfinite(value):
        raise ConfigError(f"{name} must be a finite number, got {value}")
    if minimum == 0 and value < 0:
        raise ConfigError(f"{name} must be 0 or more, got {value}")
    if minimum > 0 and (value < minimum or value <= 0):
        what = "a positive integer" if integer else "positive"
        raise ConfigError(f"{name} must be {what}, got {value}")


# CLI flags that are sizes: (attribute, smallest allowed value, integer?). A flag a subcommand does
# not have is skipped, so one table serves every subcommand.
_CLI_SIZES: tuple[tuple[str, float, bool], ...] = (
    ("num_tokens", 1, True), ("num_sequences", 1, True), ("batch_size", 1, True), ("bench_batch_size", 1, True),
    ("seq_len", 1e-9, False), ("bench_seq_len", 1, True), ("max_length", 1, True), ("doc_stride", 0, True),
    ("rounds", 1, True), ("repeats", 1, True), ("warmup", 0, True), ("neuron_step", 1, True), ("threads", 1, True),
    ("max_examples", 1, True), ("max_eval_examples", 1, True), ("max_train_samples", 1, True),
    ("train_samples", 0, True), ("epochs", 1e-9, False), ("finetune_epochs", 0, False), ("seed", 0, True),
    ("window", 1, True), ("stride", 1, True), ("calibration_length", 1, True),
)


def check_cli_sizes(args: argparse.Namespace) -> None:
    """Every size flag of a parsed command line: zero or below is refused, never replaced by a default."""
    for attr, minimum, integer in _CLI_SIZES:
        check_positive("--" + attr.replace("_", "-"), getattr(args, attr, None), minimum, integer)
    new_tokens = getattr(args, "new_tokens", None)
    if new_tokens is not None and (isinstance(new_tokens, bool) or new_tokens < 2):
        raise ConfigError(f"--new-tokens must be 2 or more (the decode benchmark times the tokens after the "
                          f"first), got {new_tokens}")
    for attr in ("batch_sizes", "seq_lens"):
        text = getattr(args, attr, None)
        if text is None:
            continue
        for part in str(text).split(","):
            try:
                value = int(part)
            except ValueError:
                raise ConfigError(f"--{attr.replace('_', '-')} {text!r} is not a comma-separated list of "
                                  "integers, e.g. 1,8,32") from None
            check_positive(f"--{attr.replace('_', '-')}", value)


def check_sample_size(num_tokens: int | None, num_sequences: int | None) -> None:
    """A calibration sample size of 0 or below must not fall back to the method's default."""
    check_positive("num_tokens", num_tokens)
    check_positive("num_sequences", num_sequences)


def max_positions(config: Any) -> int | None:
    """How many token positions a model can embed (RoBERTa's first two are taken by padding)."""
    positions = getattr(config, "max_position_embeddings", None)
    if positions is None:
        return None
    base = getattr(config, "prunekit_base_model_type", None) or getattr(config, "model_type", "")
    if base == "roberta":
        positions -= (getattr(config, "pad_token_id", 1) or 0) + 1
    return int(positions)


def check_seq_len(config: Any, length: float | None, name: str) -> None:
    """A sequence length above the model's positions cannot run (or counts FLOPs the model never has)."""
    limit = max_positions(config)
    if length is None or limit is None:
        return
    if length > limit:
        raise ConfigError(f"{name} {length:g} exceeds the model's {limit} positions "
                          f"(max_position_embeddings); use {limit} or less")


# ---- budgets ------------------------------------------------------------------------------------------
def check_distinct_budgets(kind: str, values: Sequence[float]) -> None:
    """Two equal budgets would write the same folder twice (the second after minutes of work)."""
    seen: set[float] = set()
    for value in values:
        if float(value) in seen:
            raise ConfigError(f"keep_{kind} lists {value:g} twice; give each budget once")
        seen.add(float(value))


def check_lut_used(budget_kind: str, options: Mapping[str, Any]) -> None:
    """A latency table is read only for a latency budget; given with another it would be ignored."""
    if options.get("lut") is not None and budget_kind != "latency":
        raise ConfigError(f"a latency table (--lut / lut=) was given but the budget is keep_{budget_kind}, "
                          "which does not use it; budget latency with --keep-latency, or drop --lut")


def warn_if_all_pruned(adapter: ModelAdapter, budget: str) -> str | None:
    """After pruning: warn (and return the warning) when a budget left no heads or no neurons at
    all; the model then barely depends on its input."""
    shapes = adapter.layer_shapes()
    heads = sum(shape.num_heads for shape in shapes)
    neurons = sum(shape.intermediate_size for shape in shapes)
    if heads and neurons:
        return None
    full_heads = adapter.full_num_heads * adapter.num_layers
    full_neurons = adapter.full_intermediate_size * adapter.num_layers
    message = (f"{budget} leaves {heads} of {full_heads} heads and {neurons} of {full_neurons} FFN neurons: "
               f"{'every unit' if not heads and not neurons else 'every ' + ('head' if not heads else 'neuron')} "
               "was pruned, so the model hardly depends on its input; give a larger budget")
    logger.warning(message)
    return message


# ---- model, tokenizer, task ---------------------------------------------------------------------------
def check_tokenizer_files(folder: Path) -> None:
    """A local model folder must hold a tokenizer (or one must be given with --tokenizer)."""
    if folder.is_dir() and not any((folder / name).is_file() for name in TOKENIZER_FILES):
        raise ModelError(f"{folder} holds no tokenizer files ({', '.join(TOKENIZER_FILES[:3])}, ...); pass the "
                         "tokenizer with --tokenizer PATH (tokenizer= in Python), or save it into the folder "
                         "with tokenizer.save_pretrained")


def check_tokenizer(tokenizer: Any, where: str) -> None:
    """A loaded tokenizer that knows only its special tokens turns every word into [UNK]."""
    size = len(tokenizer) if hasattr(tokenizer, "__len__") else None
    specials = len(set(getattr(tokenizer, "all_special_tokens", []) or []))
    if size is not None and size <= max(specials, 5):
        raise ModelError(f"the tokenizer from {where} has only {size} entries (its special tokens), so every "
                         "word would become [UNK]; pass a real tokenizer with --tokenizer PATH")


def check_vocabulary(model: torch.nn.Module, tokenizer: Any) -> None:
    """A tokenizer with more tokens than the model's embedding table gives ids the model cannot embed."""
    embeddings = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    rows = getattr(embeddings, "num_embeddings", None)
    size = len(tokenizer) if hasattr(tokenizer, "__len__") else None
    if rows is None or size is None or size <= rows:
        return
    raise ModelError(f"the tokenizer has {size} tokens but the model's embedding table has {rows} (vocab_size), so "
                     f"token ids {rows} and up cannot be embedded; pass the tokenizer the model was trained with "
                     "(--tokenizer PATH)")


def settle_pad_token(model: torch.nn.Module, tokenizer: Any, task: Any) -> Any:
    """Decoders (GPT-2, OPT, Llama) often have no pad token. A task that pads its batches (every task
    but causal_lm's fixed windows) pads with the tokenizer's eos token then, and a decoder classifier,
    which pools the last real token, gets the tokenizer's pad id as its config's ``pad_token_id``
    (saved in config.json with the pruned model). Both are logged. Returns the tokenizer: a copy
    with its pad token set where it had none (the caller's is not changed); the config is the
    model's own (the caller copies a model it does not own)."""
    if tokenizer is None or task.head == "causal_lm":  # fixed windows of a token stream: no padding
        return tokenizer
    if getattr(tokenizer, "pad_token_id", None) is None:
        eos = getattr(tokenizer, "eos_token", None)
        if eos is None:
            raise ModelError("the tokenizer has neither a pad token nor an eos token to pad batches with; pass a "
                             "tokenizer that has one (--tokenizer PATH)")
        import copy

        tokenizer = copy.deepcopy(tokenizer)
        tokenizer.pad_token = eos
        logger.info("the tokenizer has no pad token: padding with its eos token %r (id %d); the saved tokenizer "
                    "keeps it as its pad token", eos, tokenizer.pad_token_id)
    config = getattr(model, "config", None)
    if task.head == "sequence_classification" and config is not None and getattr(config, "pad_token_id", 1) is None:
        config.pad_token_id = tokenizer.pad_token_id
        logger.info("the model's config has no pad_token_id: set to the tokenizer's pad id %d, so the classifier "
                    "finds the last real token of padded batches (saved in config.json)", tokenizer.pad_token_id)
    return tokenizer


def needs_pad_token_id(model: torch.nn.Module, task: Any) -> bool:
    """Whether :func:`settle_pad_token` would set the model config's pad_token_id."""
    config = getattr(model, "config", None)
    return (task.head == "sequence_classification" and config is not None
            and getattr(config, "pad_token_id", 1) is None)


def check_head_fits_task(config: Any, task: Any) -> None:
    """The head's label count and problem type must be the task's, also when nothing is evaluated."""
    if task.head != "sequence_classification":
        return
    num_labels = getattr(config, "num_labels", None)
    problem = getattr(config, "problem_type", None)
    want = "a regression head (1 output)" if task.is_regression else f"{task.num_labels} labels"
    have = "a regression head (1 output)" if num_labels == 1 else f"{num_labels} labels"
    if num_labels is not None and num_labels != task.num_labels:
        raise ModelError(f"the model's head has {have} but task {task.name!r} needs {want}; "
                         f"prune a model fine-tuned on {task.name} (prunekit finetune) or pick the matching task")
    if problem is not None and (problem == "regression") != task.is_regression:
        raise ModelError(f"the model's head is for {problem.replace('_', ' ')} but task {task.name!r} is "
                         f"{'regression' if task.is_regression else 'classification'}; prune a model "
                         f"fine-tuned on {task.name} (prunekit finetune)")


def check_dtype_runs(dtype: torch.dtype, device: torch.device, fix: str) -> None:
    """A dtype whose kernels this device lacks (float16 on a CPU build without half matmuls,
    bfloat16 on an old GPU) is refused before any model is loaded, with ``fix`` (what to pass
    instead): a tiny linear layer, softmax and RMS norm, which every model runs, are tried on the
    device."""
    try:
        x = torch.ones(2, 4, dtype=dtype, device=device)
        y = torch.nn.functional.linear(x, torch.ones(3, 4, dtype=dtype, device=device))  # (2, 3)
        torch.softmax(y, dim=-1) * torch.rsqrt(y.pow(2).mean(-1, keepdim=True))
    except (RuntimeError, TypeError) as err:
        name = str(dtype).removeprefix("torch.")
        detail = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise ConfigError(f"{name} cannot run on {device} here ({detail}); {fix}") from None


def check_onnx_fits_task(record: Mapping[str, Any], task: Any, max_length: int | None, folder: Any) -> None:
    """An ONNX export (its export.json ``record``) serves one head, with the labels and positions it
    was exported with: a task that needs another head, other labels or longer inputs is refused
    before any data is read."""
    head = record.get("head")
    if head != task.head:
        have = str(head).replace("_", " ")
        raise ConfigError(f"the ONNX export in {folder} is a {have} model but task {task.name!r} needs a "
                          f"{task.head.replace('_', ' ')} head; export a model fine-tuned on {task.name}")
    config = record.get("config", {})
    check_head_fits_task(SimpleNamespace(num_labels=config.get("num_labels"), problem_type=None), task)
    limit, length = config.get("max_length"), max_length or task.max_length
    if task.head == "question_answering" and limit and length and length > limit:
        raise ConfigError(f"task {task.name!r} builds features of {length} tokens but the ONNX export in {folder} "
                          f"takes at most {limit} (its model's positions); pass --max-length {limit} or less")


def check_not_meta(model: torch.nn.Module) -> None:
    """A model on the meta device has shapes but no weights; pruning it would compute nothing."""
    if any(p.is_meta for p in model.parameters()) or any(b.is_meta for b in model.buffers()):
        raise ModelError("the model's weights are on the meta device (not loaded); load it with "
                         "from_pretrained without device_map='meta' or init_empty_weights, then prune it")


def check_config_dict(folder: Path, config: Any) -> None:
    """config.json must be a JSON object, and prunekit's layer list must be well formed."""
    if not isinstance(config, dict):
        raise ModelError(f"{folder / 'config.json'} holds a JSON {type(config).__name__}, not an object with the "
                         "model's settings; the folder is not a model")
    if "prunekit_layers" in config or "prunekit_hidden_size" in config:
        check_prunekit_layers(folder, config)


def check_prunekit_layers(folder: Path, config: Mapping[str, Any]) -> None:
    """``prunekit_layers``: one {num_heads, intermediate_size[, attention_removed, ffn_removed,
    num_kv_heads, kv_map]} per layer, each width between 0 and the config's;
    ``prunekit_hidden_size`` None or in (0, d]."""
    where = f"prunekit_layers in {folder / 'config.json'}"
    layers = config.get("prunekit_layers")
    num_layers = config.get("num_hidden_layers", config.get("n_layers"))
    heads = config.get("num_attention_heads", config.get("n_heads"))
    ffn = config.get("intermediate_size", config.get("hidden_dim"))
    hidden = config.get("hidden_size", config.get("dim"))
    if layers is not None:
        if not isinstance(layers, list):
            raise ModelError(f"{where} must be a list with one entry per layer, got a {type(layers).__name__}")
        if isinstance(num_layers, int) and len(layers) != num_layers:
            raise ModelError(f"{where} lists {len(layers)} layers but the model has {num_layers}")
        for index, layer in enumerate(layers):
            if not isinstance(layer, dict):
                raise ModelError(f"{where}: entry {index} must be an object like "
                                 f'{{"num_heads": 12, "intermediate_size": 3072}}, got {layer!r}')
            unknown = set(layer) - {f.name for f in dataclasses.fields(LayerShape)}
            if unknown:
                raise ModelError(f"{where}: entry {index} has unknown key(s) {', '.join(sorted(unknown))}")
            _check_kv_fields(where, index, layer, config.get("num_key_value_heads"))
            for key, limit in (("num_heads", heads), ("intermediate_size", ffn)):
                value = layer.get(key)
                if isinstance(value, bool) or not isinstance(value, int) or value < 0 or (
                        isinstance(limit, int) and value > limit):
                    raise ModelError(f"{where}: entry {index} has {key} {value!r}; it must be an integer from 0 "
                                     f"to {limit}")
            for key in ("attention_removed", "ffn_removed"):
                if not isinstance(layer.get(key, False), bool):
                    raise ModelError(f"{where}: entry {index} has {key} {layer[key]!r}; it must be true or false")
            try:  # the shape's own rules (key/value heads and their map agree with the query heads)
                LayerShape(**layer)
            except (TypeError, ValueError) as err:
                raise ModelError(f"{where}: entry {index} is not a valid layer shape: {err}") from err
    narrowed = config.get("prunekit_hidden_size")
    if narrowed is not None and (isinstance(narrowed, bool) or not isinstance(narrowed, int) or narrowed < 1
                                 or (isinstance(hidden, int) and narrowed > hidden)):
        raise ModelError(f"prunekit_hidden_size in {folder / 'config.json'} is {narrowed!r}; it must be null or "
                         f"an integer from 1 to {hidden}")


def _check_kv_fields(where: str, index: int, layer: Mapping[str, Any], full_kv: Any) -> None:
    """Grouped-query families: ``num_kv_heads`` from 0 to the config's key/value heads and
    ``kv_map``, one key/value head per query head, using each of them."""
    if "num_kv_heads" not in layer and "kv_map" not in layer:
        return
    kv, kv_map = layer.get("num_kv_heads"), layer.get("kv_map")
    if isinstance(kv, bool) or not isinstance(kv, int) or kv < 0 or (isinstance(full_kv, int) and kv > full_kv):
        raise ModelError(f"{where}: entry {index} has num_kv_heads {kv!r}; it must be an integer from 0 to {full_kv}")
    if not isinstance(kv_map, list) or len(kv_map) != layer.get("num_heads") or any(
            isinstance(k, bool) or not isinstance(k, int) for k in kv_map) or set(kv_map) != set(range(kv)):
        raise ModelError(f"{where}: entry {index} has kv_map {kv_map!r}; it must list, for each of its "
                         f"{layer.get('num_heads')} query heads, one of its {kv} key/value heads, using each")


# ---- data, devices, paths ------------------------------------------------------------------------------
def read_utf8(path: Path, encoding: str = "utf-8-sig") -> str:
    """The text of ``path``; a file that is not UTF-8 is a DataError naming the file and line."""
    raw = path.read_bytes()
    try:
        return raw.decode(encoding)
    except UnicodeDecodeError as err:
        line = raw[: err.start].count(b"\n") + 1
        raise DataError(f"{path} is not UTF-8 text: line {line} holds the byte 0x{raw[err.start]:02x}; "
                        "save the file as UTF-8 (e.g. iconv -f latin1 -t utf-8)") from err


def check_device(device: str | torch.device | None) -> None:
    """An unknown or unavailable device is refused before any model is loaded."""
    from prunekit.core.runtime import resolve_device

    resolve_device(device)


def finite_json(value: Any) -> Any:
    """``value`` with every NaN or infinite float replaced by None (JSON null): JSON has no NaN."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, Mapping):
        return {key: finite_json(item) for key, item in value.items()}
    if isinstance(value, list | tuple):
        return [finite_json(item) for item in value]
    return value


def json_text(content: Any, indent: int | None = 2, default: Any = None) -> str:
    """Strict JSON of ``content`` (``default`` converts other objects first, as json.dumps' does):
    a NaN or infinite number is written as null, never as the bare ``NaN`` that JSON readers refuse."""
    if default is not None:
        content = json.loads(json.dumps(content, default=default))
    return json.dumps(finite_json(content), indent=indent, allow_nan=False)


# ---- method options --------------------------------------------------------------------------------
def check_config_values(config: Any) -> None:
    """Every field of a method config (a dataclass) holds a value of its declared type: numbers are
    finite (NaN or infinity would make a degenerate plan or fail inside torch), a number given as
    text (``--set ridge=1e-5`` from a shell) is read as one, and anything else is a ConfigError that
    names the option. Called first by each method config's ``__post_init__``."""
    import typing

    hints = typing.get_type_hints(type(config))
    for item in dataclasses.fields(config):
        value = getattr(config, item.name)
        coerced = _coerce_option(type(config).__name__, item.name, value, hints.get(item.name, Any))
        if coerced is not value:
            object.__setattr__(config, item.name, coerced)


def _coerce_option(owner: str, name: str, value: Any, hint: Any) -> Any:
    import types
    import typing

    args = typing.get_args(hint) if isinstance(hint, types.UnionType) or typing.get_origin(hint) is typing.Union \
        else (hint,)
    if value is None:
        if type(None) in args or Any in args:
            return value
        raise ConfigError(f"option {name} of {owner} needs a value, got None")
    kinds = [a for a in args if a is not type(None)]
    if Any in kinds:
        return value
    for kind in kinds:
        if kind is bool and isinstance(value, bool):
            return value
        if kind is int and isinstance(value, numbers.Integral) and not isinstance(value, bool):
            return value
        if kind is float and isinstance(value, numbers.Real) and not isinstance(value, bool):
            if not math.isfinite(value):
                raise ConfigError(f"option {name} must be a finite number, got {value}")
            return value
        if kind is str and isinstance(value, str | os.PathLike):
            return value
        if typing.get_origin(kind) is tuple and isinstance(value, list | tuple) and all(
                isinstance(v, int) and not isinstance(v, bool) for v in value):
            return tuple(value)
    if isinstance(value, str):  # text from a command line: read it as the number or flag it names
        text = value.strip()
        for kind in kinds:
            if kind is bool and text.lower() in ("true", "false"):
                return text.lower() == "true"
            try:
                number = int(text) if kind is int else float(text) if kind is float else None
            except ValueError:
                continue
            if number is not None and not math.isfinite(number):
                raise ConfigError(f"option {name} must be a finite number, got {value}")
            if number is not None:
                return number
    names = " or ".join(_type_name(kind) for kind in kinds) + (" or null" if type(None) in args else "")
    raise ConfigError(f"option {name} must be {names}, got {value!r}")


def _type_name(kind: Any) -> str:
    import typing

    if typing.get_origin(kind) is tuple:
        return "a list of integers"
    return {bool: "true or false", int: "an integer", float: "a number", str: "text"}.get(kind, str(kind))

