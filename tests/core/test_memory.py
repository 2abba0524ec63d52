"""prunekit.core.memory: Kprune's allocator policy and the host-state guard around a pipeline run.

Against a stand-in for glibc that records its calls: what the policy asks of malloc, in which
order during a Kprune run, that it is undone on exit, and that a user's own MALLOC_* settings win.
Against the real glibc in a fresh process: that the thresholds probed before a policy (and before
``prunekit.prune``, with and without ``low_memory``) are the ones in force after it, an 8 MB block
mapped or not as before; what building oneDNN's kernels first buys. In process: that the guard
puts back torch's RNG, threads and flags, the environment, warning filters and the root logger.
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch
from builders import view
from conftest import run_method

from prunekit.core import memory
from prunekit.core.surgery import LayerPlan, PruningPlan, apply_plan
from prunekit.families import get_adapter
from prunekit.methods.kprune import KpruneConfig, _build_kernels, kprune

M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3
NEVER_TRIM = 2**31 - 1
FOUND = 8 * 2**20  # the mmap threshold the stand-in's probe reports
TESTS = Path(__file__).resolve().parents[1]  # where conftest.py is
GLIBC = (sys.platform.startswith("linux") and memory._LIBC is not None and hasattr(memory._LIBC, "mallinfo2"))


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

    def mallinfo2(self) -> None:
        raise AssertionError("the probe is replaced in these tests")


@pytest.fixture
def libc(monkeypatch):
    fake = FakeLibc()
    monkeypatch.setattr(memory, "_LIBC", fake)
    monkeypatch.setattr(memory, "_probe_mmap_threshold", lambda: FOUND)
    for name in ("MALLOC_TRIM_THRESHOLD_", "MALLOC_MMAP_THRESHOLD_", "GLIBC_TUNABLES"):
        monkeypatch.delenv(name, raising=False)
    return fake


RESTORED = [("mallopt", M_MMAP_THRESHOLD, FOUND), ("mallopt", M_TRIM_THRESHOLD, 2 * FOUND)]


def test_the_heap_is_returned_only_when_asked_inside_the_policy(libc):
    with memory.memory_policy() as policy:
        assert libc.calls == [("mallopt", M_MMAP_THRESHOLD, 32 * 2**20), ("mallopt", M_TRIM_THRESHOLD, NEVER_TRIM)]
        policy.after_batch()  # nothing without low_memory
        policy.after_calibration()
    assert libc.calls[2:] == [("malloc_trim", 0), *RESTORED]


def test_low_memory_maps_large_blocks_and_trims_after_every_batch(libc):
    with memory.memory_policy(low_memory=True) as policy:
        assert libc.calls == [("mallopt", M_MMAP_THRESHOLD, 4 * 2**20)]  # glibc's own returns left as they are
        policy.after_batch()
        policy.after_batch()
    assert libc.calls[1:] == [("malloc_trim", 0), ("malloc_trim", 0), *RESTORED]


def test_kernels_are_built_with_temporaries_mapped_then_the_policys_threshold_is_back(libc):
    built = []
    with memory.memory_policy() as policy:
        assert policy.build_kernels(lambda: built.append(list(libc.calls))) is True
    assert built == [[("mallopt", M_MMAP_THRESHOLD, 32 * 2**20), ("mallopt", M_TRIM_THRESHOLD, NEVER_TRIM),
                      ("mallopt", M_MMAP_THRESHOLD, 64 * 2**10)]]
    assert libc.calls[3:] == [("mallopt", M_MMAP_THRESHOLD, 32 * 2**20), *RESTORED]


def test_the_thresholds_are_restored_when_the_block_raises(libc):
    with pytest.raises(RuntimeError), memory.memory_policy() as policy:
        policy.build_kernels(lambda: (_ for _ in ()).throw(RuntimeError("boom")))
    assert libc.calls[-3:] == [("mallopt", M_MMAP_THRESHOLD, 32 * 2**20), *RESTORED]


def test_a_nested_policy_restores_the_outer_ones_settings(libc):
    with memory.memory_policy(), memory.memory_policy(low_memory=True):
        pass
    assert libc.calls[3:] == [("mallopt", M_MMAP_THRESHOLD, 32 * 2**20), ("mallopt", M_TRIM_THRESHOLD, NEVER_TRIM),
                              *RESTORED]


def test_glibcs_starting_thresholds_are_restored_as_a_pair_of_128_kib(libc, monkeypatch):
    monkeypatch.setattr(memory, "_probe_mmap_threshold", lambda: 128 * 2**10)
    with memory.memory_policy():
        pass
    assert libc.calls[-2:] == [("mallopt", M_MMAP_THRESHOLD, 128 * 2**10), ("mallopt", M_TRIM_THRESHOLD, 128 * 2**10)]


@pytest.mark.parametrize("name", ["MALLOC_TRIM_THRESHOLD_", "MALLOC_MMAP_THRESHOLD_", "GLIBC_TUNABLES"])
def test_a_users_malloc_settings_are_left_alone(libc, monkeypatch, name):
    monkeypatch.setenv(name, "glibc.malloc.mmap_threshold=131072" if name == "GLIBC_TUNABLES" else "131072")
    with memory.memory_policy() as policy:
        assert policy.build_kernels(lambda: pytest.fail("built without mappings of their own")) is False
        policy.after_calibration()  # returning free pages changes no setting
    assert libc.calls == [("malloc_trim", 0)]


def test_nothing_is_set_without_glibc(monkeypatch):
    monkeypatch.setattr(memory, "_LIBC", None)
    assert memory.allocator_settings() is None
    with memory.memory_policy(low_memory=True) as policy:
        policy.after_batch()
        policy.after_calibration()
        assert policy.build_kernels(lambda: None) is False


@pytest.mark.parametrize("low_memory", [False, True])
def test_kprune_returns_the_heap_after_the_calibration_or_after_every_batch(libc, low_memory, make_model,
                                                                           make_sample):
    """The policy Kprune's memory figures rest on: the kernels built first with the temporaries
    mapped; one trim, after the calibration (low_memory: also after every batch of every pass);
    glibc's thresholds as found on exit."""
    teacher, sample = make_model("bert", "classification", num_layers=3), make_sample("bert")
    run_method(kprune, teacher, sample, "classification",
               KpruneConfig(keep_flops=0.4, low_memory=low_memory))
    policy = 4 * 2**20 if low_memory else 32 * 2**20
    settings = [("mallopt", M_MMAP_THRESHOLD, policy)]
    if not low_memory:  # freed heap goes back only when asked
        settings.append(("mallopt", M_TRIM_THRESHOLD, NEVER_TRIM))
    kernels = [("mallopt", M_MMAP_THRESHOLD, 64 * 2**10), ("mallopt", M_MMAP_THRESHOLD, policy)]
    opts = [call for call in libc.calls if call[0] == "mallopt"]
    assert opts == [*settings, *kernels, *RESTORED]
    trims = libc.calls.count(("malloc_trim", 0))
    if not low_memory:
        assert trims == 1 and libc.calls.index(("malloc_trim", 0)) == len(settings) + len(kernels)
    else:  # every pass's batches: the teacher passes, six knowledge passes and the student passes
        assert trims > 6 * len(sample.batches)


class _Policy:
    def __init__(self, applies: bool) -> None:
        self.applies = applies

    def build_kernels(self, build) -> bool:
        if self.applies:
            build()
        return self.applies


@pytest.mark.parametrize("applies", [True, False])
def test_each_ffn_width_runs_once_per_batch_shape_before_the_calibration(make_model, make_sample, applies):
    model = make_model("bert", num_layers=4)
    # Layer 0's FFN emptied, 1 and 3 of one width, 2 of another: layers 1 and 2 run.
    apply_plan(view(model), PruningPlan([LayerPlan(neurons=[]), LayerPlan(neurons=[0, 2, 5]), LayerPlan(neurons=[1]),
                                   LayerPlan(neurons=[3, 4, 7])]))
    sample = make_sample("bert", num_batches=4)
    sample.batches.append(sample.batches[0])  # a shape seen twice runs once
    adapter, runs = get_adapter(model), []
    for layer in range(4):
        if adapter.ffn(layer) is not None:
            adapter.sublayer_module(layer, "ffn").register_forward_hook(
                lambda module, args, out, layer=layer: runs.append((layer, tuple(args[0].shape[:2]),
                                                                     torch.is_grad_enabled())))
    _build_kernels(adapter, sample.batches, _Policy(applies))
    shapes = sorted({tuple(batch["attention_mask"].shape) for batch in sample.batches})
    assert 2 < len(shapes) < len(sample.batches)
    expected = [(layer, shape, grad) for layer in (1, 2) for shape in shapes for grad in (False, True)]
    assert runs == (expected if applies else [])  # without mappings of their own: nothing run
    assert all(p.grad is None for p in model.parameters())


# ---- the real glibc, in a fresh process -------------------------------------------------------------
# Whether a block of `size` bytes is mapped, read as the policy's probe reads it (a block from a
# hole of the heap says nothing, so it is held and the size asked again), nothing moved by asking.
_MAPPED = """
from prunekit.core import memory
def mapped(size):
    libc, held = memory._LIBC, []
    libc.malloc_trim(0)
    try:
        for _ in range(64):
            before = libc.mallinfo2()
            held.append(libc.malloc(size))
            after = libc.mallinfo2()
            if after.hblks > before.hblks or after.arena > before.arena:
                return after.hblks > before.hblks
        return False
    finally:
        for block in held:
            libc.free(libc.realloc(block, 1))
def state():
    return {"settings": str(memory.allocator_settings()), "8 MB mapped": mapped(8 * 2**20),
            "200 KiB mapped": mapped(200 * 2**10)}
"""

_POLICY_IN_A_FRESH_PROCESS = _MAPPED + """
import json
import torch
found = [state()]
for low_memory in (False, True):
    with memory.memory_policy(low_memory) as policy:
        big = [torch.ones(2**20 * (i + 1)) for i in range(12)]  # up to 48 MB: mapped, freed
        del big
        policy.after_batch()
        policy.after_calibration()
    found.append(state())
print(json.dumps(found))
"""


@pytest.mark.skipif(not GLIBC, reason="glibc's mallinfo2 reads the heap")
def test_the_allocators_thresholds_are_as_before_after_the_policy():
    done = subprocess.run([sys.executable, "-c", _POLICY_IN_A_FRESH_PROCESS], capture_output=True, text=True,
                          check=True, env=os.environ | {"OMP_NUM_THREADS": "1"})
    before, *after = json.loads(done.stdout.strip().splitlines()[-1])
    assert before["settings"] != "None" and before["8 MB mapped"]
    assert after == [before, before]


_PRUNE_IN_A_FRESH_PROCESS = _MAPPED + """
import json, logging, sys, warnings
import torch
sys.path.insert(0, sys.argv[1])
from conftest import build_tiny_model, build_tokenizer, write_sst2
import prunekit
torch.set_num_threads(1)
model, tokenizer, data = build_tiny_model("bert", num_labels=2), build_tokenizer(), write_sst2(__import__("pathlib").Path(sys.argv[2]))
def host():
    return {"rng": torch.get_rng_state().tolist(), "threads": torch.get_num_threads(),
            "deterministic": [torch.are_deterministic_algorithms_enabled(), torch.backends.cudnn.deterministic,
                              torch.backends.cudnn.benchmark],
            "environ": dict(__import__("os").environ), "warnings": [repr(f) for f in warnings.filters],
            "root": [repr(h) for h in logging.getLogger().handlers] + [logging.getLogger().level],
            **state()}
torch.manual_seed(1234)
torch.rand(3)
found = [host()]
for low_memory in (False, True):
    result = prunekit.prune(model, tokenizer, data, task="sst2", method="kprune", keep_flops=0.5, num_tokens=200,
                            low_memory=low_memory)
    assert result.report["hyperparameters"]["low_memory"] is low_memory
    found.append(host())
print(json.dumps(found))
"""


@pytest.mark.skipif(not GLIBC, reason="glibc's mallinfo2 reads the heap")
def test_prune_leaves_the_host_process_as_it_found_it(tmp_path):
    done = subprocess.run([sys.executable, "-c", _PRUNE_IN_A_FRESH_PROCESS, str(TESTS), str(tmp_path / "sst2")],
                          capture_output=True, text=True, env=os.environ | {"OMP_NUM_THREADS": "1"})
    assert done.returncode == 0, done.stderr[-3000:]
    before, *after = json.loads(done.stdout.strip().splitlines()[-1])
    assert before["settings"] != "None" and before["8 MB mapped"]
    for state in after:
        assert {key: state[key] for key in before if state[key] != before[key]} == {}


def test_the_guard_puts_back_what_a_run_changed(monkeypatch):
    monkeypatch.delenv("PRUNEKIT_TEST_ADDED", raising=False)
    monkeypatch.setenv("PRUNEKIT_TEST_CHANGED", "before")
    root = logging.getLogger()
    rng, threads, handlers, level, filters = (torch.get_rng_state(), torch.get_num_threads(), list(root.handlers),
                                              root.level, list(warnings.filters))
    cudnn = (torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark)
    with pytest.raises(RuntimeError), memory.host_state_kept():
        torch.manual_seed(7)
        torch.set_num_threads(threads + 1)
        torch.use_deterministic_algorithms(True, warn_only=True)
        torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = not cudnn[0], not cudnn[1]
        os.environ["PRUNEKIT_TEST_ADDED"] = "1"
        os.environ["PRUNEKIT_TEST_CHANGED"] = "after"
        warnings.simplefilter("ignore")
        logging.basicConfig(level=logging.DEBUG, force=True)
        root.addHandler(logging.NullHandler())
        raise RuntimeError("the run failed")
    assert torch.equal(torch.get_rng_state(), rng)
    assert torch.get_num_threads() == threads
    assert not torch.are_deterministic_algorithms_enabled()
    assert not torch.is_deterministic_algorithms_warn_only_enabled()
    assert (torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark) == cudnn
    assert "PRUNEKIT_TEST_ADDED" not in os.environ and os.environ["PRUNEKIT_TEST_CHANGED"] == "before"
    assert warnings.filters == filters
    assert (root.handlers, root.level) == (handlers, level)


# ---- oneDNN's kernels -------------------------------------------------------------------------------
# GELU (oneDNN on CPU) forward and backward over 300 input lengths, as a calibration's batches
# come, twice; with "built", the kernels are built first with the temporaries mapped (as Kprune's
# _build_kernels does). Prints the heap's growth in live bytes over each loop and its size after.
_GELU_OVER_SHAPES = """
import json, sys
import torch
from prunekit.core import memory
libc = memory._LIBC
torch.manual_seed(0)
def loop():
    before = libc.mallinfo2().uordblks
    for length in range(1, 301):
        x = torch.randn(2, length, 32, requires_grad=True)
        torch.nn.functional.gelu(x).sum().backward()
    return libc.mallinfo2().uordblks - before
with memory.memory_policy() as policy:
    if sys.argv[1] == "built":
        assert policy.build_kernels(loop)
    print(json.dumps({"growth": loop()}))
"""


@pytest.mark.skipif(not GLIBC, reason="glibc's mallinfo2 reads the heap")
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

