"""What a report records about where it ran: device choice, library versions, peak memory."""

from __future__ import annotations

import importlib.metadata
import platform
import resource
import sys

import torch

from prunekit.core.errors import ConfigError


def resolve_device(device: str | torch.device | None) -> torch.device:
    """"auto"/None picks CUDA when present, else CPU; anything else is taken as given."""
    if device in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(device)
    except (RuntimeError, TypeError):
        raise ConfigError(f"unknown device {str(device)!r}; use cpu, cuda, cuda:N or auto") from None
    if device.type == "meta":
        raise ConfigError("device 'meta' holds no weights and cannot run a model; use cpu, cuda or auto")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"device {str(device)!r} was asked for but no CUDA GPU is available; use --device cpu")
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        raise ConfigError(f"device {str(device)!r} was asked for but there are only {torch.cuda.device_count()} "
                          "CUDA GPU(s); use cuda:0 .. cuda:N-1")
    if device.type not in ("cpu", "cuda") and not _available(device):
        raise ConfigError(f"device {str(device)!r} is not available on this machine; use cpu, cuda or auto")
    return device


def _available(device: torch.device) -> bool:
    backend = getattr(torch, device.type, None) or getattr(torch.backends, device.type, None)
    is_available = getattr(backend, "is_available", None)
    return bool(is_available()) if callable(is_available) else False


def library_versions() -> dict[str, str]:
    versions = {"python": platform.python_version(), "torch": torch.__version__}
    for name in ("prunekit", "transformers", "safetensors", "datasets", "numpy"):
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            versions[name] = "not installed"
    return versions


def peak_rss_bytes() -> int:
    """Peak resident memory of this process so far (Linux reports KiB, macOS bytes)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(peak if sys.platform == "darwin" else peak * 1024)


# ---- dtypes -----------------------------------------------------------------------------------------
# The dtypes a model is pruned and saved in (--dtype), by the names config.json's ``dtype`` uses.
DTYPES: dict[str, torch.dtype] = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def resolve_dtype(dtype: str | torch.dtype | None) -> torch.dtype | None:
    """``dtype`` as a torch dtype (a name in :data:`DTYPES` or a torch dtype); None stays None
    (the model's own dtype)."""
    if dtype is None or dtype in DTYPES.values():
        return dtype
    name = str(dtype).removeprefix("torch.")
    if name not in DTYPES:
        raise ConfigError(f"unknown dtype {str(dtype)!r}; use one of {', '.join(DTYPES)}")
    return DTYPES[name]


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def model_dtype(model: torch.nn.Module) -> torch.dtype:
    """The dtype of ``model``'s floating weights (float32 for a model without any)."""
    return next((p.dtype for p in model.parameters() if p.is_floating_point()), torch.float32)


def compute_dtype(device: torch.device, dtype: torch.dtype, training: bool = False) -> torch.dtype:
    """The dtype a method computes in for a model held in ``dtype`` on ``device``.

    On the CPU, float32: a half model is widened (exactly) for the run and its pruned result cast back,
    so its plan is the plan of the float32 model with the same weights. bfloat16 matmuls are not
    slow on every CPU (1.5x float32 on an AVX512-BF16 EPYC, measured in
    benchmarks/results/llm_dtype.md), but float16's are (4x slower there), gradients and re-fits need
    float32 precision, and the plan would otherwise depend on which CPU ran it. On an accelerator,
    the model's own dtype (half the memory, the fast kernels), with float32/float64 accumulators in
    the methods. A training method (CoFi) keeps float32 weights everywhere: its optimizer steps
    would be lost in half-precision weights."""
    if training or device.type == "cpu":
        return torch.float32
    return dtype


def cast_model(model: torch.nn.Module, dtype: torch.dtype, device: torch.device | str | None = None) -> torch.nn.Module:
    """``model.to(device, dtype)`` in place, except that buffers that are not saved (non-persistent:
    values derived at construction, such as rotary inverse frequencies) keep their own dtype, as
    ``from_pretrained(..., dtype=...)`` builds them: a model cast here computes what the folder it is
    saved to computes when loaded. Returns the model."""
    derived = {(module, name): buffer for module in model.modules() for name, buffer in module._buffers.items()
               if buffer is not None and name in module._non_persistent_buffers_set}
    model.to(device=device, dtype=dtype)
    for (module, name), buffer in derived.items():
        module._buffers[name] = buffer.to(device=module._buffers[name].device)
    return model
