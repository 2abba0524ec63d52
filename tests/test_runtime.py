"""prunekit.core.runtime's allocator settings, against a stand-in for glibc that records its calls:
what Kprune asks of malloc, that it is undone on exit, and that a user's own MALLOC_* settings win."""

from __future__ import annotations

import pytest

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
