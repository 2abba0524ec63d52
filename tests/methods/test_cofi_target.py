"""CoFi meets the budget the user gave (issue 11, cofi.md §8 pitfall 5): a schedule that cannot reach its
target is refused before training, and when a short run ends off target the deterministic gates are
projected onto it, so the pruned model keeps at most the target and misses it by less than 1%."""

from __future__ import annotations

import pytest
from builders import view
from conftest import build_tiny_model, build_tokenizer, write_sst2
from test_cofi import run_cofi

from prunekit import ConfigError
from prunekit.core.accounting import count_flops, count_prunable_params, full_flops, full_prunable_params
from prunekit.methods.cofi import CofiConfig
from prunekit.tasks import build_training_data

SEQ_LEN = 16.0


def _cofi(tmp_path, **options):
    base = dict(finetune_epochs=0, batch_size=8, eval_steps=0, reg_lr=0.1, lr=1e-3)
    config = CofiConfig(**{**base, **options})
    data = build_training_data("sst2", build_tokenizer(), str(write_sst2(tmp_path / "sst2", n_train=48, n_dev=8)),
                               max_length=config.max_length, device="cpu")
    teacher = build_tiny_model("bert", "classification", num_labels=2)
    student = build_tiny_model("bert", "classification", num_labels=2)
    return run_cofi(teacher, student, data, config, SEQ_LEN)


@pytest.mark.parametrize("options, kept", [
    (dict(keep_params=0.3), lambda m: count_prunable_params(view(m)) / full_prunable_params(view(m))),
    (dict(keep_params=0.5, prune_hidden=False), lambda m: count_prunable_params(view(m)) / full_prunable_params(view(m))),
    (dict(keep_params=None, keep_flops=0.4), lambda m: count_flops(view(m), SEQ_LEN) / full_flops(view(m), SEQ_LEN)),
])  # fmt: skip
def test_a_short_valid_schedule_meets_its_budget(options, kept, tmp_path):
    # 12 steps (warm-up 6): far too few for the controller, so the projection has to do the work.
    model, _, log = _cofi(tmp_path, epochs=2, warmup_epochs=1, **options)
    target = options.get("keep_flops") or options["keep_params"]
    projection = log["target_projection"]
    assert projection["applied"] and projection["keep_before"] > target + 0.05
    assert target - 0.01 <= kept(model) <= target
    assert projection["keep_after"] == pytest.approx(kept(model), rel=1e-9)  # the size model is exact
    assert log["surgery_max_abs_diff"] < 1e-4  # the projected gates are what surgery folded


def test_a_schedule_shorter_than_its_warm_up_is_refused(tmp_path):
    with pytest.raises(ConfigError, match="cannot reach its target keep_params 0.3.*warm-up takes 12 steps"):
        _cofi(tmp_path, keep_params=0.3, epochs=1, warmup_epochs=2)
    with pytest.raises(ConfigError, match="cannot reach"):  # max_steps cuts the stage short of the warm-up
        _cofi(tmp_path, keep_params=0.3, epochs=10, warmup_epochs=1, max_steps=6)
