"""What a run changes in its host process, and the putting back of it.

Two context managers, each restoring on exit what it changed:

- :func:`memory_policy`: Kprune's allocator policy (glibc only), when the heap's freed pages go back
  to the system and which blocks get mappings of their own. The run calls the yielded
  :class:`MemoryPolicy` at the few points the policy acts: after a calibration batch, after the
  calibration, and around the building of oneDNN's kernels.
- :func:`host_state_kept`: the process-wide state around a pipeline run: torch's global RNG, its
  thread count and determinism flags, the environment, warning filters and the root logger.

A library must leave its host as it found it: a user's program that prunes a model and then goes
on allocating must see malloc behave as before (an 8 MB block mapped as before, say), draw the same
random numbers, and keep its logging. Nothing here knows of models or methods.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import mmap
import os
import sys
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch

logger = logging.getLogger(__name__)

# glibc's mallopt parameter numbers (malloc.h).
_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
# glibc's start for both thresholds, and the floor of its moving mmap threshold.
_DEFAULT_THRESHOLD = 128 * 1024
# glibc's ceiling for its moving mmap threshold on 64-bit systems (4 MiB · sizeof(long)).
_DYNAMIC_MMAP_MAX = 32 * 1024 * 1024
# The default policy's: only blocks past glibc's own ceiling keep mappings of their own.
HEAP_POLICY_MMAP_THRESHOLD = _DYNAMIC_MMAP_MAX
# low_memory's: a calibration pass's large temporaries get mappings of their own, given back on
# free, instead of landing on the heap where freed chunks trapped between live ones are neither
# reused nor returned.
LOW_MEMORY_MMAP_THRESHOLD = 4 * 1024 * 1024
# While kernels are built: small enough for any activation, large enough for any kernel object.
_KERNEL_BUILD_MMAP_THRESHOLD = 64 * 1024
# A trim threshold no heap top reaches: glibc then returns memory only when malloc_trim is called.
# mallopt takes a C int, and ctypes masks a larger Python int silently: 1 << 40 went in as 0, which
# made glibc return the heap's top at every free (3.5x the page faults once the heap was compact).
_NEVER_TRIM = 2**31 - 1
# Settings of the user's own that glibc reads at start-up; where any is set, malloc is left alone.
_USER_SETTINGS = ("MALLOC_TRIM_THRESHOLD_", "MALLOC_MMAP_THRESHOLD_")
# A probe block that came from a free chunk of the heap says nothing; give up on a size after this many.
_PROBE_TRIES = 64


class _MallInfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in
                ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks", "fordblks",
                 "keepcost")]


def _libc() -> ctypes.CDLL | None:
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
    except OSError:
        return None
    # The probe's functions take and return pointers and sizes; ctypes' default int would cut them.
    for name, restype, argtypes in (("malloc", ctypes.c_void_p, [ctypes.c_size_t]),
                                    ("realloc", ctypes.c_void_p, [ctypes.c_void_p, ctypes.c_size_t]),
                                    ("free", None, [ctypes.c_void_p]),
                                    ("mallinfo2", _MallInfo2, [])):
        function = getattr(libc, name, None)  # mallinfo2 came with glibc 2.33; musl has none of it
        if function is not None:
            function.restype, function.argtypes = restype, argtypes
    return libc


_LIBC = _libc()


@dataclass(frozen=True)
class AllocatorSettings:
    """glibc's two thresholds, as far as they can be read back (:func:`allocator_settings`)."""

    mmap_threshold: int
    trim_threshold: int


# The settings this module put in force, innermost last: a nested policy restores its outer one's
# (probing would read the mmap threshold but not the trim threshold). One run at a time per process.
_in_force: list[AllocatorSettings] = []


def release_free_heap() -> None:
    """Hand the heap's free pages back to the system (glibc ``malloc_trim``; elsewhere nothing).

    A calibration pass's temporaries are freed by its end, but glibc keeps their pages, so without
    it the process holds the largest batch's worth of temporaries per fragment of heap they landed
    in. Returns memory only; no setting changes."""
    trim = getattr(_LIBC, "malloc_trim", None)
    if trim is not None:
        trim(0)


def allocator_settings() -> AllocatorSettings | None:
    """glibc's mmap and trim thresholds in force, or None where this module leaves malloc alone:
    off glibc, without ``mallinfo2`` to probe with, or where the user set ``MALLOC_*_`` variables
    (or their ``GLIBC_TUNABLES``), or where not even a 32 MiB block is mapped (a setting of
    someone's that cannot be read back).

    glibc has no getter for either, so the mmap threshold is probed (:func:`_probe_mmap_threshold`)
    and the trim threshold is taken to be the one glibc pairs with it: its start of 128 KiB at the
    start's mmap threshold, twice the mmap threshold once glibc has moved it."""
    if _in_force:
        return _in_force[-1]
    tunables = os.environ.get("GLIBC_TUNABLES", "")
    if (_LIBC is None or not all(hasattr(_LIBC, name) for name in ("mallopt", "mallinfo2", "malloc_trim"))
            or any(name in os.environ for name in _USER_SETTINGS)
            or "mmap_threshold" in tunables or "trim_threshold" in tunables):
        return None
    threshold = _probe_mmap_threshold()
    if threshold is None:
        return None
    return AllocatorSettings(threshold, threshold if threshold <= _DEFAULT_THRESHOLD else 2 * threshold)


def _probe_mmap_threshold() -> int | None:
    """The smallest block glibc serves from a mapping of its own, from 128 KiB to 32 MiB in pages
    (at most 128 KiB reads as 128 KiB; None: not even 32 MiB), found by binary search.

    Each probe block is a request whose chunk is exactly a whole number of pages, so the block is
    mapped exactly when that is at least the threshold, unless a free chunk of the heap can serve
    it: the heap's top is trimmed first, and a block that neither grew the heap nor was mapped
    (``mallinfo2``'s ``arena`` and ``hblks``) came from a hole and is kept while the same size is
    asked for again. Every block is held to the end, so that the heap answers each probe afresh.
    A mapped block freed plainly would move glibc's dynamic threshold up to its size: each is first
    shrunk in place to one page by ``realloc`` (glibc remaps it) and then freed, which moves nothing."""
    page = mmap.PAGESIZE
    chunk_header = ctypes.sizeof(ctypes.c_size_t)  # glibc's request-to-chunk overhead on this platform
    held: list[int] = []

    def mapped(pages: int) -> bool:
        for _ in range(_PROBE_TRIES):
            before = _LIBC.mallinfo2()
            block = _LIBC.malloc(pages * page - chunk_header)
            if not block:
                raise MemoryError("malloc failed while probing the allocator's mmap threshold")
            held.append(block)
            after = _LIBC.mallinfo2()
            if after.hblks > before.hblks:
                return True
            if after.arena > before.arena:
                return False
        return False

    try:
        _LIBC.malloc_trim(0)
        low, high = _DEFAULT_THRESHOLD // page, _DYNAMIC_MMAP_MAX // page
        if mapped(low):
            return low * page
        if not mapped(high):
            return None
        while high - low > 1:  # low's size lands on the heap, high's is mapped
            middle = (low + high) // 2
            low, high = (low, middle) if mapped(middle) else (middle, high)
        return high * page
    finally:
        for block in held:
            _LIBC.free(_LIBC.realloc(block, 1))


def _apply(settings: AllocatorSettings) -> None:
    # Once mallopt sets the mmap threshold, glibc's dynamic threshold (which follows the largest
    # mapped block freed) is off for the rest of the process, and nothing turns it back on: putting
    # back the values probed gives the behaviour in force when the policy began, not its future moves.
    _LIBC.mallopt(_M_MMAP_THRESHOLD, settings.mmap_threshold)
    _LIBC.mallopt(_M_TRIM_THRESHOLD, settings.trim_threshold)


class MemoryPolicy:
    """The calls a run makes at the points the allocator policy acts (from :func:`memory_policy`)."""

    def __init__(self, low_memory: bool, settings: AllocatorSettings | None) -> None:
        self.low_memory = low_memory
        self.settings = settings  # the policy's own, in force inside the block; None: malloc left alone

    def after_batch(self) -> None:
        """After each calibration batch: with ``low_memory`` the heap's free pages go back, for a
        lower peak at about 18% more time (page faults); else nothing."""
        if self.low_memory:
            release_free_heap()

    def after_calibration(self) -> None:
        """Once the calibration's temporaries are freed: its heap goes back before the deepest pass."""
        release_free_heap()

    def build_kernels(self, build: Callable[[], None]) -> bool:
        """Run ``build`` with every block of 64 KiB and more in a mapping of its own, given back on free,
        so that what it keeps for good (oneDNN's per-shape kernels: small, long-lived blocks) lands
        packed in the heap with no freed temporaries between. Runs nothing where the mappings cannot be
        had: without them the temporaries would fragment the heap there. Returns whether it ran."""
        if self.settings is None:
            return False
        _LIBC.mallopt(_M_MMAP_THRESHOLD, _KERNEL_BUILD_MMAP_THRESHOLD)
        try:
            build()
        finally:
            _LIBC.mallopt(_M_MMAP_THRESHOLD, self.settings.mmap_threshold)
        return True


@contextmanager
def memory_policy(low_memory: bool = False) -> Iterator[MemoryPolicy]:
    """Kprune's allocator policy inside the block; on exit glibc's thresholds are as they were.

    Default: freed heap goes back to the system only when the run asks (:meth:`MemoryPolicy.after_calibration`),
    not whenever a free leaves a large block at the heap's top. After a trim the heap is compact, so
    each batch's temporaries end up at its top, and glibc would hand them back at every batch's end
    and fault them in again at the next batch's start: pruning runs trimmed once per layer that way
    were 2-7% slower. Blocks of 32 MiB and more keep mappings of their own.

    ``low_memory``: blocks of 4 MiB and more get mappings of their own, and the heap goes back after
    every calibration batch too; glibc's own returns at the heap's top are left as they are.

    Nothing is changed off glibc or where the user set malloc's thresholds (:func:`allocator_settings`);
    the trims still run there."""
    found = allocator_settings()
    if found is None:
        yield MemoryPolicy(low_memory, None)
        return
    if low_memory:
        settings = AllocatorSettings(LOW_MEMORY_MMAP_THRESHOLD, found.trim_threshold)
        _LIBC.mallopt(_M_MMAP_THRESHOLD, settings.mmap_threshold)
    else:
        settings = AllocatorSettings(HEAP_POLICY_MMAP_THRESHOLD, _NEVER_TRIM)
        _apply(settings)
    logger.debug("malloc thresholds %s inside the memory policy, %s after", settings, found)
    _in_force.append(settings)
    try:
        yield MemoryPolicy(low_memory, settings)
    finally:
        _in_force.pop()
        _apply(found)


@contextmanager
def host_state_kept() -> Iterator[None]:
    """On exit, the process-wide state a run may change is as it was on entry: torch's global RNG
    (CPU, and CUDA where initialised on entry), ``torch.get_num_threads()``, torch's and cuDNN's
    determinism flags, ``os.environ``, ``warnings.filters`` and the root logger's handlers and level.

    A run that initialises CUDA leaves its generators as the run seeded them: before CUDA starts
    there is no state to read back."""
    cpu_rng = torch.get_rng_state()
    cuda_rng = torch.cuda.get_rng_state_all() if torch.cuda.is_initialized() else None
    threads = torch.get_num_threads()
    deterministic = (torch.are_deterministic_algorithms_enabled(),
                     torch.is_deterministic_algorithms_warn_only_enabled())
    cudnn = (torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark)
    environ = dict(os.environ)
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    try:
        with warnings.catch_warnings():  # saves warnings.filters (and showwarning), restores them on exit
            yield
    finally:
        torch.set_rng_state(cpu_rng)
        if cuda_rng is not None:
            torch.cuda.set_rng_state_all(cuda_rng)
        if torch.get_num_threads() != threads:
            torch.set_num_threads(threads)
        if (torch.are_deterministic_algorithms_enabled(),
                torch.is_deterministic_algorithms_warn_only_enabled()) != deterministic:
            torch.use_deterministic_algorithms(deterministic[0], warn_only=deterministic[1])
        torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = cudnn
        for name in set(os.environ) - set(environ):
            del os.environ[name]
        for name, value in environ.items():
            if os.environ.get(name) != value:
                os.environ[name] = value
        if root.handlers != handlers:
            root.handlers[:] = handlers
        root.setLevel(level)
