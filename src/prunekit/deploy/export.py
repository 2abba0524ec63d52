"""Deployment: export a (pruned) model to ONNX, check it in ONNX Runtime, quantize it to int8.

A pruned model's layers differ: one keeps 3 heads, the next none, a third lost its attention
sublayer, and the residual stream may be narrower than the config says. Exporters that build
their inputs from one global head count (Optimum, ecosystem.md) cannot follow that; prunekit's
models carry their shapes in their weights, so tracing the model itself exports every layer as it
is. The exporter is torch's recommended one, ``torch.onnx.export(..., dynamo=True)`` (built on
``torch.export`` and onnxscript); ``exporter="torchscript"`` picks the older TorchScript tracer,
which torch deprecates but which is faster to run and needs no onnxscript.

An export folder holds ``model.onnx``, the tokenizer files, ``config.json`` and ``export.json``
(graph input and output names, dynamic axes, per-layer shapes, the numerical check). The folder is
written atomically (:mod:`prunekit.io.outdir`): when the export, the check or the quantization fails,
nothing is left behind.

What is exported is described by a :class:`GraphSpec` per model head (sequence classification,
question answering). A causal LM's prefill graph (and its per-layer key/value cache) is one more
spec: it adds its inputs and outputs and its check batches; the export, check, quantize and
folder code stays as it is.

onnx, onnxruntime and onnxscript are imported inside the functions that need them, so that
``import prunekit`` stays light.
"""

from __future__ import annotations

import importlib.metadata
import inspect
import json
import logging
import re
import traceback
import warnings
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from prunekit.core.errors import ConfigError, ModelError
from prunekit.families import adapter_class, pruning_view
from prunekit.io.outdir import atomic_output_dir, check_output_dir

logger = logging.getLogger(__name__)

GRAPH_FILE = "model.onnx"
EXPORT_FILE = "export.json"
FORMATS = ("onnx",)
QUANTIZATIONS = ("int8",)
EXPORTERS = ("dynamo", "torchscript")
DYNAMIC_AXES = {0: "batch", 1: "sequence"}

# Text the numerical check tokenizes: real words, so every tokenizer produces real sub-word ids,
# special tokens and padding (not random ids the model never sees).
_CHECK_TEXT = (
    "The film opens slowly, but its quiet second half is among the most moving things I have seen "
    "this year. Nobody in the cast seems to know why they are there, and the script gives them no "
    "help at all. A warm, funny and surprisingly sharp comedy about growing up in a small town. "
    "When was the bridge over the river finished, and who paid for it? Engineers began the work in "
    "1887; the city council covered two thirds of the cost and a railway company the rest."
).split()


@dataclass(frozen=True)
class GraphSpec:
    """What one model head's graph takes and returns (names in graph order)."""

    head: str
    outputs: tuple[str, ...]
    output_axes: Mapping[str, Mapping[int, str]]
    pairs: bool = False  # check with text pairs (question, context), as the head is used

    def outputs_of(self, output: Any) -> tuple[torch.Tensor, ...]:
        return tuple(getattr(output, name) for name in self.outputs)


GRAPH_SPECS: dict[str, GraphSpec] = {
    "sequence_classification": GraphSpec(
        "sequence_classification", ("logits",), {"logits": {0: "batch"}}),
    "question_answering": GraphSpec(
        "question_answering", ("start_logits", "end_logits"),
        {"start_logits": DYNAMIC_AXES, "end_logits": DYNAMIC_AXES}, pairs=True),
}


@dataclass
class ExportOptions:
    """How to export.

    Attributes:
        format: only "onnx".
        quantize: None (float32) or "int8": ONNX Runtime dynamic quantization of the MatMul/Gemm
            weights (the linear layers), after the float32 graph passed the check.
        exporter: "dynamo" (torch's recommended exporter, the default) or "torchscript".
        opset: ONNX opset; None lets the exporter choose.
        check_lengths: padded lengths of the check batches (capped at the model's positions).
        check_batch_size: sequences per check batch (of different lengths, so padding is checked).
        atol: largest absolute difference allowed between ONNX Runtime and PyTorch outputs.
    """

    format: str = "onnx"
    quantize: str | None = None
    exporter: str = "dynamo"
    opset: int | None = None
    check_lengths: Sequence[int] = (16, 64, 128)
    check_batch_size: int = 4
    atol: float = 1e-4

    def validate(self) -> None:
        if self.format != "onnx":
            raise ConfigError(f"export format {self.format!r} is not supported; prunekit exports {', '.join(FORMATS)}")
        if self.quantize not in (None, *QUANTIZATIONS):
            raise ConfigError(f"quantization {self.quantize!r} is not supported; use int8 (or none for float32)")
        if self.exporter not in EXPORTERS:
            raise ConfigError(f"exporter {self.exporter!r} is unknown; choose one of {', '.join(EXPORTERS)}")
        if not self.check_lengths or min(self.check_lengths) < 2 or self.check_batch_size < 2:
            raise ConfigError("the check needs lengths >= 2 and a batch of >= 2 sequences")
        if not self.atol > 0:
            raise ConfigError(f"atol must be positive, got {self.atol}")
        if self.opset is not None:
            from torch.onnx import _constants

            top = (_constants.ONNX_TORCHSCRIPT_EXPORTER_MAX_OPSET if self.exporter == "torchscript"
                   else _constants.ONNX_MAX_OPSET)
            if isinstance(self.opset, bool) or not isinstance(self.opset, int) or not (
                    _constants.ONNX_MIN_OPSET <= self.opset <= top):
                raise ConfigError(f"opset {self.opset!r} is out of the {self.exporter} exporter's range "
                                  f"{_constants.ONNX_MIN_OPSET} to {top}; give one in it, or leave --opset out")


@dataclass
class CheckResult:
    """ONNX Runtime against PyTorch on the check batches."""

    max_abs_diff: float
    atol: float
    batches: list[list[int]]  # [batch size, padded length] of each check batch
    per_batch: list[float] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


# ---- what to export -------------------------------------------------------------------------------
def graph_spec(model: nn.Module) -> GraphSpec:
    """The graph spec of ``model``'s head; a ModelError for anything prunekit cannot export."""
    adapter = adapter_class(model)  # unsupported architectures fail here, with the supported list
    head = next((name for name, cls in adapter.model_classes.items() if isinstance(model, cls)), "base")
    if head not in GRAPH_SPECS:
        kinds = " and ".join(GRAPH_SPECS).replace("_", " ")
        if head == "base":
            raise ModelError(f"cannot export a {type(model).__name__}: prunekit exports models with a task head "
                             f"({kinds}); a bare encoder has no outputs to serve or check")
        raise ModelError(f"cannot export a {type(model).__name__}: prunekit exports {kinds} models, not "
                         f"{head.replace('_', ' ')} ones; time and serve it in PyTorch (prunekit bench --generate "
                         "for a causal LM)")
    return GRAPH_SPECS[head]


def model_input_names(model: nn.Module) -> list[str]:
    """The graph inputs: input_ids and attention_mask, and token_type_ids where the model takes them."""
    parameters = inspect.signature(model.forward).parameters
    return ["input_ids", "attention_mask"] + (["token_type_ids"] if "token_type_ids" in parameters else [])


class _GraphModule(nn.Module):
    """The model as a graph sees it: tensors in (in ``input_names`` order), a tuple of tensors out."""

    def __init__(self, model: nn.Module, spec: GraphSpec, input_names: Sequence[str]) -> None:
        super().__init__()
        self.model, self.spec, self.input_names = model, spec, list(input_names)

    def forward(self, *inputs: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return self.spec.outputs_of(self.model(**dict(zip(self.input_names, inputs, strict=True)), return_dict=True))


# ---- check batches --------------------------------------------------------------------------------
def _usable_length(model: nn.Module, tokenizer: Any) -> int:
    # RoBERTa's positions start after the padding index, so keep 2 positions spare in every family.
    positions = getattr(model.config, "max_position_embeddings", None) or 512
    limit = getattr(tokenizer, "model_max_length", None) or positions
    return int(min(positions - 2, limit))


def check_batches(tokenizer: Any, spec: GraphSpec, input_names: Sequence[str], options: ExportOptions,
                  usable: int) -> list[dict[str, np.ndarray]]:
    """Tokenizer-made batches, one per check length (at most ``usable``): ``check_batch_size``
    texts of about 1/4, 2/4, ... of the length each (pairs for QA), truncated and padded to the
    batch's longest."""
    lengths = sorted({min(int(n), usable) for n in options.check_lengths})
    batches = []
    for length in lengths:
        size = options.check_batch_size
        texts = [" ".join(_CHECK_TEXT[j % len(_CHECK_TEXT)] for j in range(max(1, length * (i + 1) // size)))
                 for i in range(size)]
        if spec.pairs:
            questions = [" ".join(_CHECK_TEXT[i: i + 6]) for i in range(size)]
            encoded = tokenizer(questions, texts, truncation="only_second", max_length=length, padding="longest")
        else:
            encoded = tokenizer(texts, truncation=True, max_length=length, padding="longest")
        batch = {name: np.asarray(encoded[name], dtype=np.int64) for name in input_names if name in encoded}
        if "token_type_ids" in input_names and "token_type_ids" not in batch:
            batch["token_type_ids"] = np.zeros_like(batch["input_ids"])
        batches.append(batch)
    return batches


def torch_outputs(model: nn.Module, spec: GraphSpec, batch: Mapping[str, np.ndarray]) -> list[np.ndarray]:
    with torch.inference_mode():
        output = model(**{k: torch.from_numpy(v) for k, v in batch.items()}, return_dict=True)
    return [t.float().numpy() for t in spec.outputs_of(output)]


# ---- export ---------------------------------------------------------------------------------------
def _versions() -> dict[str, str]:
    versions = {"torch": torch.__version__}
    for name in ("onnx", "onnxruntime", "onnxscript", "transformers"):
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            versions[name] = "not installed"
    return versions


def _failing_part(model: nn.Module, err: BaseException) -> str:
    """The innermost submodule of ``model`` whose forward was running when ``err`` was raised."""
    names = {id(module): name for name, module in model.named_modules()}
    part = None
    seen: set[int] = set()
    while err is not None and id(err) not in seen:
        seen.add(id(err))
        for frame, _ in traceback.walk_tb(err.__traceback__):
            owner = frame.f_locals.get("self")
            if isinstance(owner, nn.Module) and id(owner) in names and names[id(owner)]:
                part = f"{names[id(owner)]} ({type(owner).__name__})"
        err = err.__cause__ or err.__context__
    return part or f"the model ({type(model).__name__})"


def _root_cause(err: BaseException) -> BaseException:
    seen = {id(err)}
    while (err.__cause__ or err.__context__) is not None and id(err.__cause__ or err.__context__) not in seen:
        err = err.__cause__ or err.__context__
        seen.add(id(err))
    return err


def _first_line(err: BaseException) -> str:
    for line in re.sub(r"\x1b\[[0-9;]*m", "", str(err)).strip().splitlines():
        if line.strip():
            return line.strip()[:300]
    return type(err).__name__


def _export_graph(model: nn.Module, spec: GraphSpec, input_names: list[str], sample: Mapping[str, np.ndarray],
                  path: Path, options: ExportOptions) -> None:
    graph = _GraphModule(model, spec, input_names).eval()
    args = tuple(torch.from_numpy(sample[name]) for name in input_names)
    big = sum(p.numel() * p.element_size() for p in model.parameters()) > 1.5 * 2**30  # ONNX's 2 GiB protobuf limit
    try:
        with torch.inference_mode(False), torch.no_grad(), _quiet_exporters():
            if options.exporter == "dynamo":
                _require("onnxscript", "the dynamo exporter", "or pass exporter='torchscript' (--exporter torchscript)")
                batch, sequence = torch.export.Dim("batch"), torch.export.Dim("sequence")
                program = torch.onnx.export(
                    graph, args, input_names=input_names, output_names=list(spec.outputs),
                    dynamic_shapes={"inputs": tuple({0: batch, 1: sequence} for _ in input_names)},
                    opset_version=options.opset, dynamo=True, verbose=False,
                )  # fmt: skip
                program.save(str(path), external_data=big)
            else:
                torch.onnx.export(
                    graph, args, str(path), input_names=input_names, output_names=list(spec.outputs),
                    dynamic_axes={**{name: DYNAMIC_AXES for name in input_names}, **spec.output_axes},
                    opset_version=options.opset or 17, dynamo=False,
                )  # fmt: skip
    except ConfigError:
        raise
    except Exception as err:  # the exporters raise many kinds; name the part and the reason
        other = "torchscript" if options.exporter == "dynamo" else "dynamo"
        raise ModelError(
            f"cannot export {type(model).__name__} to ONNX with the {options.exporter} exporter: "
            f"{_failing_part(model, err)} failed: {_first_line(_root_cause(err))} (exporter={other!r} may get past it)"
        ) from err


@contextmanager
def _quiet_exporters() -> Iterator[None]:
    """The exporters warn about Hugging Face code they trace (Python booleans, optional ops of
    packages that are not installed); none of it is the user's to act on, and the check below
    is what says whether the graph is right."""
    registration = logging.getLogger("torch.onnx._internal.exporter._registration")
    level = registration.level
    registration.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", torch.jit.TracerWarning)
            warnings.filterwarnings("ignore", module=r"torch\.onnx\..*")
            warnings.filterwarnings("ignore", message=r".*torch\.onnx.*")
            yield
    finally:
        registration.setLevel(level)


def _require(module: str, what: str, hint: str = "") -> Any:
    try:
        return __import__(module)
    except ImportError as err:
        raise ConfigError(f"{what} needs the {module} package: pip install {module} {hint}".strip()) from err


def ort_session(path: str | Path, threads: int | None = None) -> Any:
    """An ONNX Runtime CPU session on ``path``, with ``threads`` intra-op threads (default: ORT's)."""
    ort = _require("onnxruntime", "running an ONNX graph")
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.inter_op_num_threads = 1
    if threads:
        options.intra_op_num_threads = int(threads)
    options.log_severity_level = 3  # warnings about unused initializers etc. are not the user's business
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def _compare(session: Any, batches: list[dict[str, np.ndarray]], reference: list[list[np.ndarray]],
             output_names: Sequence[str]) -> list[float]:
    diffs = []
    for batch, expected in zip(batches, reference, strict=True):
        got = session.run(list(output_names), batch)
        diffs.append(max(float(np.max(np.abs(g.astype(np.float64) - e))) if g.size else 0.0
                         for g, e in zip(got, expected, strict=True)))
    return diffs


def check_graph(path: Path, batches: list[dict[str, np.ndarray]], reference: list[list[np.ndarray]],
                spec: GraphSpec, atol: float) -> CheckResult:
    """Run the graph in ONNX Runtime on ``batches``; a ModelError when an output differs from
    ``reference`` (PyTorch's) by more than ``atol`` (NaN counts as a difference)."""
    diffs = _compare(ort_session(path), batches, reference, spec.outputs)
    shapes = [list(batch["input_ids"].shape) for batch in batches]
    result = CheckResult(max_abs_diff=max(diffs), atol=atol, batches=shapes, per_batch=diffs)
    bad = [(shape, diff) for shape, diff in zip(shapes, diffs, strict=True) if not diff <= atol]
    if bad:
        (size, length), diff = bad[0]
        raise ModelError(
            f"the exported graph does not compute what the PyTorch model computes: ONNX Runtime's "
            f"{'/'.join(spec.outputs)} differ by {diff:.3g} > atol {atol:g} on a batch of {size} at padded "
            f"length {length}; nothing was written (try exporter='torchscript' or report the model)"
        )
    logger.info("ONNX Runtime matches PyTorch: max |diff| %.3g on batches %s", result.max_abs_diff, shapes)
    return result


def quantize_int8(src: Path, dst: Path) -> None:
    """ONNX Runtime dynamic quantization: int8 weights for every MatMul/Gemm with a constant weight
    (the linear layers), one scale per output channel, activations quantized per batch at run
    time. Embeddings, LayerNorms and the attention's activation-by-activation products stay
    float32. Per-channel scales: on the SST-2 MiniLM pruned to keep 0.5, one scale per matrix
    lost 0.46 dev points against float32, one per channel none (+0.11)."""
    _require("onnxruntime", "int8 quantization")
    from onnxruntime.quantization import QuantType, quantize_dynamic

    # quantize_dynamic asks (on the root logger) for ORT's pre-processing; its symbolic shape
    # inference fails on dynamo graphs, and its optimisation pass alone did not change int8 latency
    # here (MiniLM, batch 32, length 128), so it is left out and the request kept quiet.
    root = logging.getLogger()
    quiet = _DropMessage("pre-processing before quantization")
    root.addFilter(quiet)
    try:
        quantize_dynamic(str(src), str(dst), weight_type=QuantType.QInt8, op_types_to_quantize=["MatMul", "Gemm"],
                         per_channel=True, reduce_range=False)
    except Exception as err:
        raise ModelError(f"ONNX Runtime could not quantize {src.name} to int8: {_first_line(err)}") from err
    finally:
        root.removeFilter(quiet)


class _DropMessage(logging.Filter):
    def __init__(self, text: str) -> None:
        super().__init__()
        self.text = text

    def filter(self, record: logging.LogRecord) -> bool:
        return self.text not in record.getMessage()


def _int8_report(path: Path, batches: list[dict[str, np.ndarray]], reference: list[list[np.ndarray]],
                 spec: GraphSpec) -> dict[str, Any]:
    """How far the int8 graph is from float32: no 1e-4 bound applies, so this is recorded, and
    only non-finite outputs fail."""
    session = ort_session(path)
    diffs = _compare(session, batches, reference, spec.outputs)
    if not all(np.isfinite(diffs)):
        raise ModelError("the int8 graph gives NaN or inf outputs; nothing was written (export without --quantize)")
    agree, total = 0, 0
    for batch, expected in zip(batches, reference, strict=True):
        got = session.run(list(spec.outputs), batch)
        for g, e in zip(got, expected, strict=True):
            agree += int((g.argmax(-1) == e.argmax(-1)).sum())
            total += int(np.prod(e.shape[:-1]))
    return {"max_abs_diff": max(diffs), "per_batch": diffs, "argmax_agreement": agree / max(total, 1)}


def _layers_record(model: nn.Module) -> dict[str, Any]:
    adapter = pruning_view(model)  # a caller's model is never changed
    return {"layers": [shape.to_dict() for shape in adapter.layer_shapes()], "hidden_size": adapter.hidden_size,
            "full_hidden_size": adapter.full_hidden_size}


def _config_record(model: nn.Module, tokenizer: Any) -> dict[str, Any]:
    config = model.config
    return {"num_labels": int(getattr(config, "num_labels", 0) or 0),
            "vocab_size": int(getattr(config, "vocab_size", 0) or 0),
            "type_vocab_size": int(getattr(config, "type_vocab_size", 0) or 0),
            "pad_token_id": getattr(tokenizer, "pad_token_id", None),
            "max_length": _usable_length(model, tokenizer),
            "model_type": getattr(config, "prunekit_base_model_type", None) or config.model_type}


def _load(model: nn.Module | str | Path, tokenizer: Any) -> tuple[nn.Module, Any, Path | None]:
    from prunekit.io.folders import load_pruned, load_tokenizer

    if isinstance(model, (str, Path)):
        source = Path(model)
        if not source.is_dir():  # no hub ids: the export reads the folder's files and checks it offline
            raise ModelError(f"model folder {source} does not exist or is not a folder; export takes a local model "
                             "folder (a pruned model from `prunekit prune`, or a fine-tuned one)")
        loaded = load_pruned(source, dtype=torch.float32)  # ONNX Runtime's CPU kernels are float32's
        return loaded, tokenizer if tokenizer is not None else load_tokenizer(source), source
    if tokenizer is None:
        raise ConfigError("export_onnx(model, ...) with a model object needs its tokenizer= (for the check "
                          "batches and the folder); or pass the model's folder")
    return model, tokenizer, None


def export_onnx(
    model: nn.Module | str | Path,
    out_dir: str | Path,
    options: ExportOptions | None = None,
    *,
    tokenizer: Any = None,
    overwrite: bool = False,
    **overrides: Any,
) -> Path:
    """Export ``model`` (a folder prunekit wrote, any supported model folder, or a model object
    with its ``tokenizer``) to an ONNX folder ``out_dir`` with dynamic batch and sequence axes.

    The graph is run in ONNX Runtime on tokenizer-made padded batches of several lengths and must
    give the PyTorch model's outputs within ``options.atol`` (1e-4); otherwise, or when the export
    fails, a ModelError names the problem and nothing is written. ``overrides`` set
    :class:`ExportOptions` fields, e.g. ``export_onnx(folder, out, quantize="int8")``.
    Returns ``out_dir``.
    """
    options = replace(options or ExportOptions(), **overrides)
    options.validate()
    source = Path(model) if isinstance(model, (str, Path)) else None
    if source is not None and is_export_dir(source):  # an export folder has no PyTorch weights to export
        record = read_export(source)
        if record.get("quantize"):
            raise ConfigError(f"{source} is an ONNX export that is already quantized ({record['quantize']}); "
                              "quantize its float32 export, or export the model folder it came from")
        if options.quantize == "int8":
            return quantize_onnx(source, out_dir, overwrite=overwrite)
        raise ConfigError(f"{source} is already an ONNX export (float32); pass the model folder it was exported "
                          "from, or add --quantize int8 to quantize it")
    check_output_dir(out_dir, overwrite, inputs=[source])  # before loading anything
    model, tokenizer, source = _load(model, tokenizer)
    spec = graph_spec(model)
    if any(p.device.type != "cpu" for p in model.parameters()):
        raise ConfigError("export_onnx runs the check on the CPU: move the model there first (model.to('cpu'))")
    was_training = model.training
    try:
        model.eval()
        _export_folder(model, tokenizer, spec, Path(out_dir), options, source, overwrite)
    finally:
        model.train(was_training)
    logger.info("ONNX export written to %s", out_dir)
    return Path(out_dir)


def _export_folder(model: nn.Module, tokenizer: Any, spec: GraphSpec, out_dir: Path, options: ExportOptions,
                   source: Path | None, overwrite: bool) -> None:
    input_names = model_input_names(model)
    batches = check_batches(tokenizer, spec, input_names, options, _usable_length(model, tokenizer))
    reference = [torch_outputs(model, spec, batch) for batch in batches]
    with atomic_output_dir(out_dir, overwrite, inputs=[source]) as tmp:
        fp32 = tmp / (GRAPH_FILE if options.quantize is None else "model.fp32.onnx")
        _export_graph(model, spec, input_names, batches[0], fp32, options)
        check = check_graph(fp32, batches, reference, spec, options.atol)
        record: dict[str, Any] = {"check": check.to_dict()}
        if options.quantize == "int8":
            quantize_int8(fp32, tmp / GRAPH_FILE)
            record["int8"] = _int8_report(tmp / GRAPH_FILE, batches, reference, spec)
            fp32.unlink()
            for extra in tmp.glob("model.fp32.onnx*"):  # external data of a large graph
                extra.unlink()
        tokenizer.save_pretrained(tmp)
        model.config.save_pretrained(tmp)
        _write_record(tmp, model, tokenizer, spec, input_names, options, source, record)


def _write_record(folder: Path, model: nn.Module, tokenizer: Any, spec: GraphSpec, input_names: list[str],
                  options: ExportOptions, source: Path | None, extra: dict[str, Any]) -> None:
    onnx = _require("onnx", "reading an ONNX graph")
    graph = onnx.load(str(folder / GRAPH_FILE), load_external_data=False)
    record = {
        "format": "onnx",
        "file": GRAPH_FILE,
        "head": spec.head,
        "inputs": input_names,
        "outputs": list(spec.outputs),
        "dynamic_axes": {**{name: DYNAMIC_AXES for name in input_names}, **spec.output_axes},
        "quantize": options.quantize,
        "exporter": options.exporter,
        "opset": next((o.version for o in graph.opset_import if o.domain in ("", "ai.onnx")), None),
        "source": str(source) if source is not None else None,
        "config": _config_record(model, tokenizer),
        **_layers_record(model),
        **extra,
        "versions": _versions(),
    }
    (folder / EXPORT_FILE).write_text(json.dumps(record, indent=2, default=str) + "\n")


# ---- reading an export folder ---------------------------------------------------------------------
def is_export_dir(path: str | Path) -> bool:
    return (Path(path) / EXPORT_FILE).is_file()


def read_export(path: str | Path) -> dict[str, Any]:
    """The export.json of an ONNX folder written by ``export_onnx``; a clear ModelError otherwise."""
    folder = Path(path)
    if not folder.is_dir():
        raise ModelError(f"ONNX folder {folder} does not exist or is not a folder; make one with `prunekit export`")
    if not is_export_dir(folder):
        raise ModelError(f"{folder} is not an ONNX export folder (it has no {EXPORT_FILE}); make one with "
                         f"`prunekit export --model MODEL_DIR --format onnx --out {folder}`")
    try:
        record = json.loads((folder / EXPORT_FILE).read_text())
    except json.JSONDecodeError as err:
        raise ModelError(f"{folder / EXPORT_FILE} is not valid JSON ({err}); export the model again") from err
    if not (folder / record.get("file", GRAPH_FILE)).is_file():
        raise ModelError(f"{folder} has no {record.get('file', GRAPH_FILE)}; export the model again")
    return record


def quantize_onnx(export_dir: str | Path, out_dir: str | Path, overwrite: bool = False) -> Path:
    """Quantize a float32 export folder to int8 into ``out_dir`` (tokenizer and records copied);
    the int8 graph's distance from float32 on the check batches is recorded in export.json."""
    import shutil

    source = Path(export_dir)
    record = read_export(source)
    if record.get("quantize"):
        raise ConfigError(f"{source} is already quantized ({record['quantize']}); quantize a float32 export")
    spec = GRAPH_SPECS[record["head"]]
    check_output_dir(out_dir, overwrite, inputs=[source])
    tokenizer = export_tokenizer(source)
    with atomic_output_dir(out_dir, overwrite, inputs=[source]) as tmp:
        quantize_int8(source / record["file"], tmp / GRAPH_FILE)
        fp32 = ort_session(source / record["file"])
        batches = check_batches(tokenizer, spec, record["inputs"], ExportOptions(), record["config"]["max_length"])
        reference = [fp32.run(list(spec.outputs), batch) for batch in batches]
        record["int8"] = _int8_report(tmp / GRAPH_FILE, batches, reference, spec)
        for path in source.iterdir():
            if path.is_file() and path.name not in (record["file"], EXPORT_FILE) and not path.name.startswith("."):
                shutil.copy2(path, tmp / path.name)
        record.update(file=GRAPH_FILE, quantize="int8", source=str(source))
        (tmp / EXPORT_FILE).write_text(json.dumps(record, indent=2, default=str) + "\n")
    return Path(out_dir)


def export_tokenizer(folder: str | Path) -> Any:
    """The tokenizer saved in an export folder."""
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(str(folder))
    except (OSError, ValueError) as err:
        raise ModelError(f"could not load the tokenizer saved in {folder}: {_first_line(err)}") from err
