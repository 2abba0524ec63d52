"""What a report records about where it ran: device choice, library versions, peak memory."""

from __future__ import annotations

import ctypes
import ctypes.util
import importlib.metadata
import logging
import os
import platform
import resource
import sys
from collections.abc import Iterator
from contextlib import contextmanager

import torch

from prunekit.core.errors import ConfigError

logger = logging.getLogger(__name__)

# glibc's mallopt parameter numbers (malloc.h).
_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
HEAP_MMAP_THRESHOLD = 4 * 1024 * 1024
# glibc's own ceiling for its moving mmap threshold on 64-bit systems, and its trim threshold then.
_DYNAMIC_MMAP_MAX = 32 * 1024 * 1024
HEAP_POLICY_MMAP_THRESHOLD = _DYNAMIC_MMAP_MAX  # heap_returned_only_when_asked's
# Inside temporaries_mapped: small enough for any activation, large enough for any kernel object.
_TEMPORARY_MMAP_THRESHOLD = 64 * 1024
_DYNAMIC_TRIM_MAX = 2 * _DYNAMIC_MMAP_MAX
# A trim threshold no heap top reaches: glibc then returns memory only when malloc_trim is called.
# mallopt takes a C int, and ctypes masks a larger Python int silently: 1 << 40 went in as 0, which
# made glibc return the heap's top at every free (3.5x the page faults once the heap was compact).
_NEVER_TRIM = 2**31 - 1


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


def _libc():
    try:
        return ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
    except OSError:
        return None


_LIBC = _libc() if sys.platform.startswith("linux") else None


def release_free_heap() -> None:
    """Hand the heap's free pages back to the system (glibc ``malloc_trim``; elsewhere nothing).

    Kprune calls it once, after its calibration (with ``low_memory`` after every batch): the passes'
    temporaries are freed by then, but glibc keeps their pages, so without it the process holds the
    largest batch's worth of temporaries per fragment of heap they landed in."""
    trim = getattr(_LIBC, "malloc_trim", None)
    if trim is not None:
        trim(0)


def limit_heap_growth(threshold: int = HEAP_MMAP_THRESHOLD) -> bool:
    """Serve CPU tensors of ``threshold`` bytes or more from their own mappings (glibc only).

    glibc's default mmap threshold rises to the largest block freed, which moves calibration
    passes' large temporaries onto the heap, where freed chunks trapped between live ones are
    neither reused nor returned. Kprune's ``low_memory`` sets it together with
    :func:`release_free_heap`. A threshold the user set through ``MALLOC_MMAP_THRESHOLD_`` is
    kept. Returns whether the setting was applied."""
    if "MALLOC_MMAP_THRESHOLD_" in os.environ or not sys.platform.startswith("linux"):
        return False
    mallopt = getattr(_LIBC, "mallopt", None)  # not glibc (musl has no mallopt): nothing to set
    if mallopt is None:
        return False
    applied = bool(mallopt(_M_MMAP_THRESHOLD, int(threshold)))
    if applied:
        logger.debug("malloc mmap threshold fixed at %d bytes", threshold)
    return applied


@contextmanager
def temporaries_mapped(restore: int) -> Iterator[bool]:
    """Inside the block, blocks of 64 KiB and more get mappings of their own, given back on free,
    so that what the block keeps for good lands packed in the heap with no freed temporaries
    between; on exit the mmap threshold becomes ``restore``. Yields whether it applied (glibc on
    Linux, no ``MALLOC_MMAP_THRESHOLD_`` of the user's)."""
    applied = limit_heap_growth(_TEMPORARY_MMAP_THRESHOLD)
    try:
        yield applied
    finally:
        if applied:
            limit_heap_growth(restore)


@contextmanager
def heap_returned_only_when_asked() -> Iterator[None]:
    """Inside the block, freed heap memory goes back to the system only through
    :func:`release_free_heap`, not whenever a ``free`` leaves a large block at the heap's top.

    After a trim the heap is compact, so each batch's temporaries end up at its top, and glibc
    would hand them back at every batch's end and fault them in again at the next batch's start:
    pruning runs trimmed once per layer that way were 2-7% slower. Blocks of 32 MiB and more
    (glibc's own ceiling for its moving threshold) keep mappings of their own. On exit the trim
    threshold becomes the one glibc pairs with that ceiling. Nothing is changed off glibc or where
    the user set ``MALLOC_TRIM_THRESHOLD_`` or ``MALLOC_MMAP_THRESHOLD_``."""
    mallopt = getattr(_LIBC, "mallopt", None)
    untouched = any(name in os.environ for name in ("MALLOC_TRIM_THRESHOLD_", "MALLOC_MMAP_THRESHOLD_"))
    if mallopt is None or untouched:
        yield
        return
    mallopt(_M_MMAP_THRESHOLD, _DYNAMIC_MMAP_MAX)
    mallopt(_M_TRIM_THRESHOLD, _NEVER_TRIM)
    try:
        yield
    finally:
        mallopt(_M_TRIM_THRESHOLD, _DYNAMIC_TRIM_MAX)
