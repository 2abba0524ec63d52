"""prunekit.core.runtime's allocator settings, against a stand-in for glibc that records its calls:
what Kprune asks of malloc, that it is undone on exit, and that a user's own MALLOC_* settings win;
and, against the real glibc and oneDNN in a fresh process, what building the kernels first buys."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from prunekit.core import runtime

M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3


class FakeLibc:
    def __init__(self) -> None:
        self.calls: list[tuple] = []

    def mallopt(self, param: int, value: int) -> int:
        assert -(2**31) <= value < 2**31, "mallopt takes a C int; ctypes would mask this value"
        self.calls.append(("mallopt", param, value))
        return 1

    def malloc_trim(self, pad: int) -> int:
        self.calls.append(("malloc_trim", pad))
        return 1


@pytest.fixture
def libc(monkeypatch):
    fake = FakeLibc()
    monkeypatch.setattr(runtime, "_LIBC", fake)
    for name in ("MALLOC_TRIM_THRESHOLD_", "MALLOC_MMAP_THRESHOLD_"):
        monkeypatch.delenv(name, raising=False)
    return fake


def test_the_heap_is_returned_only_when_asked_inside_the_block(libc):
    with runtime.heap_returned_only_when_asked():
        assert libc.calls == [("mallopt", M_MMAP_THRESHOLD, 32 * 2**20), ("mallopt", M_TRIM_THRESHOLD, 2**31 - 1)]
        runtime.release_free_heap()
    assert libc.calls[2:] == [("malloc_trim", 0), ("mallopt", M_TRIM_THRESHOLD, 64 * 2**20)]


def test_the_trim_threshold_is_restored_when_the_block_raises(libc):
    with pytest.raises(RuntimeError), runtime.heap_returned_only_when_asked():
        raise RuntimeError("boom")
    assert libc.calls[-1] == ("mallopt", M_TRIM_THRESHOLD, 64 * 2**20)


@pytest.mark.parametrize("name", ["MALLOC_TRIM_THRESHOLD_", "MALLOC_MMAP_THRESHOLD_"])
def test_a_users_malloc_settings_are_left_alone(libc, monkeypatch, name):
    monkeypatch.setenv(name, "131072")
    with runtime.heap_returned_only_when_asked():
        pass
    assert libc.calls == []


def test_nothing_is_set_without_glibc(monkeypatch):
    monkeypatch.setattr(runtime, "_LIBC", None)
    with runtime.heap_returned_only_when_asked():
        runtime.release_free_heap()
    assert runtime.limit_heap_growth() is False


# GELU (oneDNN on CPU) forward and backward over 300 input lengths, as a calibration's batches
# come, twice; with "built", the kernels are built first with the temporaries mapped (as Kprune's
# _build_kernels does). Prints the heap's growth in live bytes over each loop and its size after.
_GELU_OVER_SHAPES = """
import ctypes, json, sys
import torch
from prunekit.core import runtime
class Info(ctypes.Structure):
    _fields_ = [(n, ctypes.c_size_t) for n in "arena ordblks smblks hblks hblkhd usmblks fsmblks uordblks fordblks keepcost".split()]
libc = ctypes.CDLL("libc.so.6")
libc.mallinfo2.restype = Info
torch.manual_seed(0)
def loop():
    before = libc.mallinfo2().uordblks
    for length in range(1, 301):
        x = torch.randn(2, length, 32, requires_grad=True)
        torch.nn.functional.gelu(x).sum().backward()
    return libc.mallinfo2().uordblks - before
if sys.argv[1] == "built":
    with runtime.temporaries_mapped(runtime.HEAP_POLICY_MMAP_THRESHOLD):
        loop()
print(json.dumps({"growth": loop()}))
"""


@pytest.mark.skipif(not sys.platform.startswith("linux") or runtime._LIBC is None
                    or not hasattr(runtime._LIBC, "mallinfo2"), reason="glibc's mallinfo2 reads the heap")
def test_kernels_built_first_leave_no_long_lived_blocks_in_a_pass():
    env = os.environ | {"OMP_NUM_THREADS": "1"}
    growth = {}
    for mode in ("in the pass", "built"):
        done = subprocess.run([sys.executable, "-c", _GELU_OVER_SHAPES, mode], env=env, capture_output=True,
                              text=True, check=True)
        growth[mode] = json.loads(done.stdout.strip().splitlines()[-1])["growth"]
    if growth["in the pass"] < 4 * 2**20:
        pytest.skip("this torch build keeps no oneDNN kernel per shape (GELU not on oneDNN)")
    assert growth["built"] < growth["in the pass"] / 10
