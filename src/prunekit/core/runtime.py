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
