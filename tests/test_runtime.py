"""prunekit.core.runtime's allocator settings, against a stand-in for glibc that records its calls:
what Kprune asks of malloc, that it is undone on exit, and that a user's own MALLOC_* settings win;
and the CLI's oneDNN setting, against the real library in a fresh process."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from prunekit import cli
from prunekit.core import runtime

M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3


class FakeLibc:
    def __init__(self) -> None:
        self.calls: list[tuple] = []

    def mallopt(self, param: int, value: int) -> int:
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
        assert libc.calls == [("mallopt", M_MMAP_THRESHOLD, 32 * 2**20), ("mallopt", M_TRIM_THRESHOLD, 2**40)]
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


@pytest.mark.parametrize("low_memory", [False, True])
def test_only_a_low_memory_prune_leaves_onednn_primitives_uncached(monkeypatch, tmp_path, low_memory):
    monkeypatch.delenv(runtime.ONEDNN_CACHE_VARIABLE, raising=False)
    argv = ["prune", "--model", str(tmp_path / "no-model"), "--task", "sst2", "--data", str(tmp_path / "no-data"),
            "--keep-flops", "0.5", "--out", str(tmp_path / "out")]
    assert cli.main(argv + ["--low-memory"] * low_memory) == 2  # no such model: a clear error, after the setting
    assert os.environ.get(runtime.ONEDNN_CACHE_VARIABLE) == ("0" if low_memory else None)
    assert not (tmp_path / "out").exists()


def test_a_users_onednn_cache_setting_is_kept(monkeypatch):
    monkeypatch.setenv(runtime.ONEDNN_CACHE_VARIABLE, "512")
    assert not runtime.leave_onednn_primitives_uncached()
    assert os.environ[runtime.ONEDNN_CACHE_VARIABLE] == "512"


# GELU (oneDNN on CPU) forward and backward over 300 input lengths, as a calibration's batches come;
# prints the heap's growth in live bytes and a digest of every output and gradient.
_GELU_OVER_SHAPES = """
import ctypes, hashlib, json, sys
import torch
from prunekit.core import runtime
if sys.argv[1] == "uncached":
    runtime.leave_onednn_primitives_uncached()
class Info(ctypes.Structure):
    _fields_ = [(n, ctypes.c_size_t) for n in "arena ordblks smblks hblks hblkhd usmblks fsmblks uordblks fordblks keepcost".split()]
libc = ctypes.CDLL("libc.so.6")
libc.mallinfo2.restype = Info
torch.manual_seed(0)
digest, before = hashlib.sha256(), libc.mallinfo2().uordblks
for length in range(1, 301):
    x = torch.randn(2, length, 32, requires_grad=True)
    y = torch.nn.functional.gelu(x)
    y.sum().backward()
    digest.update(y.detach().numpy().tobytes() + x.grad.numpy().tobytes())
print(json.dumps({"growth": libc.mallinfo2().uordblks - before, "digest": digest.hexdigest()}))
"""


@pytest.mark.skipif(not sys.platform.startswith("linux") or runtime._LIBC is None
                    or not hasattr(runtime._LIBC, "mallinfo2"), reason="glibc's mallinfo2 reads the heap")
def test_uncached_onednn_primitives_leave_no_blocks_behind_and_the_same_numbers():
    env = {k: v for k, v in os.environ.items() if k != runtime.ONEDNN_CACHE_VARIABLE} | {"OMP_NUM_THREADS": "1"}
    runs = {}
    for mode in ("cached", "uncached"):
        done = subprocess.run([sys.executable, "-c", _GELU_OVER_SHAPES, mode], env=env, capture_output=True,
                              text=True, check=True)
        runs[mode] = json.loads(done.stdout.strip().splitlines()[-1])
    if runs["cached"]["growth"] < 4 * 2**20:
        pytest.skip("this torch build keeps no oneDNN primitive per shape (GELU not on oneDNN)")
    assert runs["uncached"]["growth"] < runs["cached"]["growth"] / 10  # 21.7 MB against 0.3 MB here
    assert runs["uncached"]["digest"] == runs["cached"]["digest"]
