"""Save and load pruned models as standard Hugging Face folders (no pickles).

A pruned model is saved with ``save_pretrained`` (config.json + model.safetensors) under a
prunekit config class whose ``model_type`` is ``prunekit_<family>`` and whose ``prunekit_layers``
lists every layer's kept head count and FFN width (and, when set, that a sublayer was removed);
``prunekit_hidden_size`` is the narrowed residual width, or None. ``hidden_size`` itself stays the
original width, because Hugging Face derives the head size d_h from it. The config and model
classes are those of the family's remote code (``prunekit/families/remote_code``: thin subclasses
of the Hugging Face ones that build those shapes before the weights are loaded), the classes a
folder loads into without prunekit too; they are registered with the Auto classes here, once, so
after ``import prunekit``::

    AutoModelForSequenceClassification.from_pretrained(folder)

returns the pruned model. Output folders are written atomically: everything goes into a hidden
temporary folder beside the target, which is renamed into place only when complete
(:mod:`prunekit.io.outdir`, which also decides which folders ``overwrite`` may replace).
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from transformers import (
    AutoConfig,
    AutoModel,
    AutoModelForCausalLM,
    AutoModelForQuestionAnswering,
    AutoModelForSequenceClassification,
    AutoTokenizer,
    PreTrainedModel,
)

from prunekit.core.errors import ConfigError, ModelError
from prunekit.core.preflight import check_config_dict, check_tokenizer, check_tokenizer_files, json_text
from prunekit.core.surgery import PruningPlan
from prunekit.core.view import ModelAdapter
from prunekit.families import ADAPTERS, base_model_type, get_adapter
from prunekit.io.files import add_remote_code, head_of_architectures, pruned_classes, write_readme
from prunekit.io.outdir import atomic_output_dir, check_output_dir, check_work_dir  # noqa: F401  (re-exported)

logger = logging.getLogger(__name__)

# By the task-head names of ``ModelAdapter.model_classes``.
AUTO_CLASSES = {
    "sequence_classification": AutoModelForSequenceClassification,
    "question_answering": AutoModelForQuestionAnswering,
    "causal_lm": AutoModelForCausalLM,
    "base": AutoModel,
}

REPORT_FILE = "prune_report.json"
PLAN_FILE = "plan.json"  # the plan's indices and removals
PLAN_TENSORS = "plan.safetensors"  # its tensors (scales, re-fitted weights, gates, trained weights)
PLAN_FORMAT = 2  # plan.json's "format": 2 is the first with plan files (older folders have none)


def _register(adapters: dict[str, type] | None = None) -> dict[type, type]:
    """Register the pruned classes of the given adapters ({family: adapter}, default every
    registered one) with the Auto classes; returns {HF class: pruned class}. The classes are the
    ones the family's remote code defines (:func:`prunekit.io.files.pruned_classes`), the same a
    folder loads into without prunekit."""
    pruned: dict[type, type] = {}
    for adapter in (ADAPTERS if adapters is None else adapters).values():
        for head, pruned_class in pruned_classes(adapter).items():
            config_class = pruned_class.config_class
            AutoConfig.register(config_class.model_type, config_class, exist_ok=True)
            AUTO_CLASSES[head].register(config_class, pruned_class, exist_ok=True)
            pruned[adapter.model_classes[head]] = pruned_class
    return pruned


PRUNED_CLASSES: dict[type, type] = _register()


def register_pruned_classes(family: str, adapter: type) -> None:
    """Register the pruned classes of a family whose adapter was added to ``ADAPTERS`` after
    prunekit was imported (a test family, a plugin), so its pruned models save and reload; they
    are the classes of the modeling file its adapter names (``remote_code``)."""
    PRUNED_CLASSES.update(_register({family: adapter}))


def as_pruned_model(model: PreTrainedModel, view: ModelAdapter | None = None) -> PreTrainedModel:
    """Give a (physically pruned) model prunekit's config and class, in place, so that
    ``save_pretrained`` writes a folder the Auto classes can rebuild; ``view`` is the model's view
    when the caller has it. Returns the model."""
    adapter = view if view is not None else get_adapter(model)
    base_class = next((c for c in PRUNED_CLASSES if type(model) is c or type(model) is PRUNED_CLASSES[c]), None)
    if base_class is None:
        raise ModelError(f"no pruned class for {type(model).__name__}")
    pruned_class = PRUNED_CLASSES[base_class]
    old = model.config
    fields = old.to_dict()
    for key in ("model_type", "prunekit_layers", "prunekit_base_model_type", "prunekit_hidden_size",
                "transformers_version"):
        fields.pop(key, None)
    fields["architectures"] = [pruned_class.__name__]
    fields.update(adapter.pruned_config_updates())
    new = pruned_class.config_class(
        **fields,
        prunekit_layers=[shape.to_dict() for shape in adapter.layer_shapes()],
        prunekit_base_model_type=base_model_type(old),
        prunekit_hidden_size=adapter.hidden_size if adapter.hidden_size != adapter.full_hidden_size else None,
    )
    new._attn_implementation = old._attn_implementation
    for module in model.modules():  # submodules hold the config too (attention reads its backend)
        if getattr(module, "config", None) is old:
            module.config = new
    model.__class__ = pruned_class
    return model


def as_stock_model(model: PreTrainedModel, view: ModelAdapter | None = None) -> PreTrainedModel:
    """Give a physically pruned model whose every layer has the same query heads, key/value heads
    (equal groups), FFN width and the full residual width (or that only lost whole layers, in any
    family) the family's own stock config and class,
    in place, so that ``save_pretrained`` writes a folder any transformers (and vLLM, llama.cpp's
    converter) loads as it is. A ConfigError names what is not uniform. Returns the model."""
    adapter = view if view is not None else get_adapter(model)
    updates_of = getattr(adapter, "uniform_config_updates", None)
    if not adapter.is_pruned():
        # Every layer at the config's widths (a model that only lost whole layers, ShortGPT): its
        # own config, whose layer count surgery cut, is the stock config, in every family.
        updates_of = dict
    if updates_of is None:
        raise ConfigError(f"--uniform is not available for {type(model).__name__}: its family has no stock "
                          "form of pruned widths; save without --uniform")
    updates = updates_of()
    if updates is None:
        widths = ", ".join(f"{s.num_heads}/{s.num_kv_heads}/{s.intermediate_size}" for s in adapter.layer_shapes())
        raise ConfigError("--uniform needs every layer to keep the same query heads, key/value heads (equal "
                          "groups, at least one) and FFN width (at least one) and the full hidden size; got "
                          f"query/kv/FFN per layer {widths}. Prune with --uniform (PruneOptions.uniform) so the "
                          "plan is uniform, or save without it")
    stock_class = next((c for c in PRUNED_CLASSES if type(model) is c or type(model) is PRUNED_CLASSES[c]), None)
    if stock_class is None:
        raise ModelError(f"no stock class for {type(model).__name__}")
    old = model.config
    fields = old.to_dict()
    for key in ("model_type", "prunekit_layers", "prunekit_base_model_type", "prunekit_hidden_size",
                "transformers_version", "auto_map"):
        fields.pop(key, None)
    fields.update(updates, architectures=[stock_class.__name__])
    new = stock_class.config_class(**fields)
    new._attn_implementation = old._attn_implementation
    for module in model.modules():
        if getattr(module, "config", None) is old:
            module.config = new
    model.__class__ = stock_class
    return model


def save_pruned(
    model: PreTrainedModel,
    out_dir: str | Path,
    tokenizer: Any = None,
    report: dict | None = None,
    overwrite: bool = False,
    extra: Callable[[Path], None] | None = None,
    inputs: Iterable[str | Path | None] = (),
    plan: PruningPlan | None = None,
    uniform: bool = False,
    view: ModelAdapter | None = None,
) -> Path:
    """Write ``model`` (pruned or not), its tokenizer, ``prune_report.json`` and the plan
    (``plan.json`` + ``plan.safetensors``, when given) atomically; ``extra(folder)`` may add files
    (plots) before the folder is moved into place. ``inputs`` are the run's input paths, which the
    output may not touch (see :mod:`prunekit.io.outdir`). ``uniform``: the model's layers all have
    the same widths and the folder is the family's stock class (:func:`as_stock_model`), which
    loads with no prunekit and no remote code; a ConfigError if they differ. ``view``: the
    model's view, when the caller has it."""
    # Always re-derive the config: a reloaded pruned model may have been pruned again since.
    if uniform:
        as_stock_model(model, view)
    else:
        as_pruned_model(model, view)
    with atomic_output_dir(out_dir, overwrite, inputs) as tmp:
        model.save_pretrained(tmp)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        if plan is not None:
            save_plan(plan, tmp)
        if report is not None:
            (tmp / REPORT_FILE).write_text(json_text(report, default=_json_default) + "\n")  # NaN: null
        add_remote_code(tmp)  # loads in plain transformers with trust_remote_code=True
        write_readme(tmp, report, Path(out_dir).name)
        if extra is not None:
            extra(tmp)
    logger.info("saved pruned model to %s", out_dir)
    return Path(out_dir)


def save_plan(plan: PruningPlan, folder: str | Path) -> Path:
    """Write ``plan.json`` (indices, removals, tensor names) and ``plan.safetensors`` (its tensors,
    bit for bit) into ``folder``; returns the folder."""
    from safetensors.torch import save_file

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    # Contiguous CPU copies: safetensors refuses views and tensors that share storage (tied weights).
    tensors = {name: value.detach().to("cpu").contiguous().clone() for name, value in plan.tensors().items()}
    save_file(tensors, str(folder / PLAN_TENSORS), metadata={"format": "prunekit-plan"})
    # The replay facts (teacher, uniform) come last, beside the decisions: the rest is as before.
    data = {"format": PLAN_FORMAT, **plan.to_dict(), **plan.replay_dict()}
    (folder / PLAN_FILE).write_text(json.dumps(data, indent=1) + "\n")
    return folder


def load_plan(path: str | Path | PruningPlan) -> PruningPlan:
    """The plan saved in a pruned folder (``plan.json`` + ``plan.safetensors``), or a plan.json
    path; a plan passed in is returned as it is."""
    if isinstance(path, PruningPlan):
        return path
    path = Path(path)
    file = path / PLAN_FILE if path.is_dir() else path
    if not file.is_file():
        hint = (" (folders pruned before prunekit wrote plan files have none; prune the teacher again)"
                if (path / REPORT_FILE).is_file() else "")
        raise ConfigError(f"no pruning plan at {file}: pass a folder written by `prunekit prune`{hint}")
    try:
        data = json.loads(file.read_text())
    except json.JSONDecodeError as err:
        raise ConfigError(f"{file} is not valid JSON ({err}); it is not a prunekit plan") from err
    if not isinstance(data, dict) or "layers" not in data:
        raise ConfigError(f"{file} is not a prunekit plan: it has no 'layers'")
    if "format" in data and (type(data["format"]) is not int or data["format"] != PLAN_FORMAT):
        raise ConfigError(f"{file} has plan format {data['format']!r}; this prunekit reads format {PLAN_FORMAT} "
                          "(a plan from another prunekit release: rebuild it with that release or prune again)")
    if not isinstance(data.get("tensors", []), list):
        raise ConfigError(f"{file} is not a valid prunekit plan: 'tensors' must be a list of names")
    tensors = {}
    tensor_file = file.with_name(PLAN_TENSORS)
    if data.get("tensors"):
        if not tensor_file.is_file():
            raise ConfigError(f"{file} names {len(data['tensors'])} tensors but {tensor_file} is missing; "
                              "copy the whole pruned folder")
        from safetensors.torch import load_file

        try:
            tensors = load_file(str(tensor_file))
        except SafetensorError as err:
            raise ConfigError(f"{tensor_file} is not a readable safetensors file: {_first_line(err)}") from err
    try:
        return PruningPlan.from_dict(data, tensors)
    except (TypeError, ValueError) as err:
        raise ConfigError(f"{file} is not a valid prunekit plan: {_first_line(err)}") from err


def _json_default(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        return value.tolist()
    if isinstance(value, Path):
        return str(value)
    if hasattr(value, "item"):
        return value.item()
    raise TypeError(f"cannot write {type(value).__name__} to JSON")


# ---- loading --------------------------------------------------------------------------------------
def check_model_dir(path: str | Path) -> Path:
    """Raise a clear ModelError unless ``path`` is a local model folder (or leave hub names alone)."""
    folder = Path(path)
    if not folder.exists():
        if _looks_like_hub_id(str(path)):
            return folder
        raise ModelError(f"model folder {folder} does not exist; pass a folder made by save_pretrained or a hub id")
    if not folder.is_dir():
        raise ModelError(f"{folder} is a file, not a model folder; pass the folder that holds config.json")
    if not (folder / "config.json").is_file():
        raise ModelError(f"{folder} is not a model folder: it has no config.json (save models with save_pretrained)")
    if not any(folder.glob("*.safetensors")) and not any(folder.glob("*.bin")):
        raise ModelError(f"{folder} has a config.json but no weights (model.safetensors); it is not a complete model")
    try:
        config = json.loads((folder / "config.json").read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ModelError(f"{folder / 'config.json'} is not valid JSON ({err}); the folder is not a model") from err
    check_config_dict(folder, config)
    try:
        AutoConfig.from_pretrained(str(folder))
    except Exception as err:  # noqa: BLE001  (any failure to parse it means the same to the user)
        # Valid JSON that is not a valid config: a wrong type (huggingface_hub's strict dataclass
        # validation), an unknown model_type, a missing field.
        detail = " ".join(str(err).split())[:300] or type(err).__name__
        raise ModelError(f"{folder / 'config.json'} is not a valid model config: {detail}") from err
    return folder


def _looks_like_hub_id(name: str) -> bool:
    parts = name.split("/")
    return 1 <= len(parts) <= 2 and all(parts) and not name.startswith((".", "~")) and os.sep not in name.replace("/", "")


def folder_dtype(path: str | Path) -> str | None:
    """The dtype a local model folder's config.json records when it is not float32 (``bfloat16``,
    ``float16``), else None (float32, or a hub id)."""
    config_file = Path(path).expanduser() / "config.json"
    try:
        config = json.loads(config_file.read_text())
    except (OSError, ValueError):
        return None
    dtype = config.get("dtype", config.get("torch_dtype")) if isinstance(config, dict) else None
    return dtype if isinstance(dtype, str) and dtype not in ("float32", "auto") else None


def load_model(
    path: str | Path,
    head: str = "sequence_classification",
    device: str | torch.device | None = None,
    dtype: torch.dtype | str = torch.float32,
    **kwargs: Any,
) -> PreTrainedModel:
    """Load a model (pruned by prunekit or stock) with the given task head, in eval mode, in
    ``dtype`` (float32 by default; ``"auto"``: the dtype its config.json records)."""
    if head not in AUTO_CLASSES:
        raise ConfigError(f"unknown model head {head!r}; choose one of {sorted(AUTO_CLASSES)}")
    folder = check_model_dir(path)
    _check_architecture(folder, head)
    kwargs["dtype"] = dtype
    try:
        model = AUTO_CLASSES[head].from_pretrained(str(folder), **kwargs)
    except (ValueError, RuntimeError, TypeError, SafetensorError) as err:
        # RuntimeError: widths in config.json that do not match the weights; SafetensorError: a
        # corrupt weights file.
        if _has_prunekit_layers(folder) and isinstance(err, ValueError | RuntimeError | TypeError):
            raise ModelError(f"could not load {folder}: prunekit_layers in its config.json disagree with the "
                             f"weights ({_first_line(err)}); the folder was edited or mixed with another "
                             "model's files") from err
        raise ModelError(f"could not load {folder} as a {head.replace('_', ' ')} model: {_first_line(err)}") from err
    except OSError as err:
        raise ModelError(f"could not load {folder}: {_no_such_model(path, err)}") from err
    get_adapter(model)  # unsupported architectures fail here; a model prunekit loads is in working form
    return model.to(device or "cpu").eval()


def _first_line(err: BaseException) -> str:
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__


def _check_architecture(folder: Path, head: str) -> None:
    """A folder saved with another head (e.g. BertForMaskedLM, or a bare BertModel) would load
    with a randomly initialised task head; refuse it with the classes that would do."""
    if not (folder / "config.json").is_file():
        return  # a hub id: transformers checks it
    config = json.loads((folder / "config.json").read_text())
    architectures = config.get("architectures") or []
    stock = {cls.__name__ for adapter in ADAPTERS.values() for name, cls in adapter.model_classes.items()
             if name == head}
    accepted = stock | {PRUNED_CLASSES[cls].__name__ for cls in PRUNED_CLASSES if cls.__name__ in stock}
    if architectures and not accepted & set(architectures):
        model_type = config.get("prunekit_base_model_type") or config.get("model_type")
        if model_type not in ADAPTERS and not any(name.startswith("Pruned") for name in architectures):
            from prunekit.families import supported_models

            raise ModelError(
                f"{folder} holds a {', '.join(architectures)} (model_type {model_type!r}), an architecture prunekit "
                f"does not support; supported model classes: {', '.join(supported_models())}")
        fix = ("fine-tune it first with `prunekit finetune`" if head != "causal_lm" else
               "pass the folder of the model with its language-modelling head")
        raise ModelError(
            f"{folder} holds a {', '.join(architectures)}, not a model with a {head.replace('_', ' ')} head; "
            f"prunekit needs one of {', '.join(sorted(stock))} ({fix})"
        )


def load_tokenizer(path: str | Path) -> Any:
    """The tokenizer saved in a model folder (or a tokenizer folder, or a hub id). A folder with
    no tokenizer files is refused: transformers would build an empty tokenizer from config.json
    alone, which turns every word into [UNK]."""
    folder = Path(path)
    if folder.is_dir() and (folder / "config.json").is_file():
        check_model_dir(folder)
    elif not folder.exists() and not _looks_like_hub_id(str(path)):
        raise ModelError(f"folder {folder} does not exist; pass a model or tokenizer folder, or a hub id")
    check_tokenizer_files(folder)
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(path))
    except (OSError, ValueError, TypeError) as err:
        raise ModelError(f"could not load a tokenizer from {path}: {_no_such_model(path, err)}") from err
    check_tokenizer(tokenizer, str(path))
    return tokenizer


def _has_prunekit_layers(folder: Path) -> bool:
    try:
        return "prunekit_layers" in json.loads((folder / "config.json").read_text())
    except (OSError, ValueError):
        return False


def _no_such_model(path: str | Path, err: BaseException) -> str:
    """For a name that is not a local path and that the hub could not give: say both."""
    if not Path(path).exists():
        return (f"there is no local folder {path}, and as a hub id it could not be fetched "
                f"({_first_line(err)})")
    return _first_line(err)


def load_pruned(path: str | Path, device: str | torch.device | None = None,
                dtype: torch.dtype | str = "auto") -> PreTrainedModel:
    """Load a folder written by prunekit (or any supported model), choosing the head it was saved
    with, in the dtype it was saved in (``dtype="auto"``, as the Auto classes do) or in ``dtype``."""
    folder = check_model_dir(path)
    config = json.loads((folder / "config.json").read_text())
    architectures = config.get("architectures") or []
    head = head_of_architectures(architectures)
    return load_model(folder, head=head, device=device, dtype=dtype)


def read_report(path: str | Path) -> dict:
    """The prune_report.json of a saved pruned model."""
    return json.loads((Path(path) / REPORT_FILE).read_text())
