"""Kprune's options for real LLMs on a tiny random Llama: predictive knowledge from the teacher's
sampled next tokens (not zero where the student equals the teacher), and the re-fit checked on
held-out sequences with a ridge toward the sliced weights, tokens weighted by their residual RMS."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from builders import view
from conftest import run_method
from transformers import LlamaConfig, LlamaForCausalLM

from prunekit import ConfigError
from prunekit.core.accounting import count_non_embedding_params
from prunekit.core.surgery import apply_plan
from prunekit.methods.kprune import RIDGE_GRID, KpruneConfig, _fold_rows, _ridge_path, kprune, kprune_prepare
from prunekit.tasks import TaskData
from prunekit.tasks.causal_lm.data import build_lm_calibration_sample
from prunekit.tasks.losses import sparse_next_token_targets

VOCAB = 61
LLM = {"temperature": 1.0, "predictive": "fisher", "refit_check": "holdout", "refit_weight": "rms"}


def tiny_lm(seed: int = 0) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=VOCAB, hidden_size=24, intermediate_size=40, num_hidden_layers=3,
                         num_attention_heads=4, num_key_value_heads=2, head_dim=6, max_position_embeddings=64,
                         tie_word_embeddings=True, pad_token_id=0)
    return LlamaForCausalLM(config).eval()


def lm_sample(sequences: int = 8, length: int = 16, seed: int = 1):
    tokens = torch.randint(1, VOCAB, (400,), generator=torch.Generator().manual_seed(seed))
    return build_lm_calibration_sample(None, tokens, num_sequences=sequences, seq_len=length, batch_size=4)


def test_sampled_tokens_follow_the_teachers_distribution():
    logits = torch.tensor([[2.0, 1.0, 0.0, -1.0, -3.0]]).repeat(20000, 1)  # (N, V)
    targets = sparse_next_token_targets(logits, 1.0, 2, torch.Generator().manual_seed(0))
    counts = torch.bincount(targets["sampled"].long(), minlength=5).double() / 20000
    assert torch.allclose(counts, F.softmax(logits[0].double(), -1), atol=0.01)  # the tail is drawn too
    again = sparse_next_token_targets(logits, 1.0, 2, torch.Generator().manual_seed(0))
    assert torch.equal(targets["sampled"], again["sampled"])
    assert "sampled" not in sparse_next_token_targets(logits, 1.0, 2)


def test_fisher_gives_the_first_sublayer_a_predictive_signal():
    """The KL's mask gradients are zero while the student is the teacher; the sampled tokens'
    log-likelihood gradients are not (their square estimates the teacher's Fisher information)."""
    model, sample = tiny_lm(), lm_sample()
    kl = kprune_prepare(view(model), TaskData("lm", sample), KpruneConfig(keep_params=0.7, temperature=1.0))
    fisher = kprune_prepare(view(model), TaskData("lm", sample), KpruneConfig(keep_params=0.7, **LLM))
    for key, grad_sq in kl.first_stats["grad_sq"].items():
        assert float(grad_sq.abs().max()) < 1e-12, key
        assert float(fisher.first_stats["grad_sq"][key].min()) > 0, key


def test_the_llm_options_meet_the_budget_replay_and_repeat():
    teacher, sample = tiny_lm(), lm_sample()
    student = copy.deepcopy(teacher)
    plan, log = run_method(kprune, student, sample, "lm", KpruneConfig(keep_params=0.6, **LLM))
    assert count_non_embedding_params(view(student)) <= 0.6 * count_non_embedding_params(view(teacher)) + 1
    replayed = apply_plan(view(copy.deepcopy(teacher)), plan)
    ids = sample.batches[0]["input_ids"]
    with torch.no_grad():
        assert torch.equal(replayed(input_ids=ids).logits, student(input_ids=ids).logits)
    again, _ = run_method(kprune, copy.deepcopy(teacher), sample, "lm", KpruneConfig(keep_params=0.6, **LLM))
    assert all(a.heads == b.heads and a.neurons == b.neurons for a, b in zip(plan.layers, again.layers, strict=True))
    tunings = [step["tuning"] for step in log["steps"] if step["kept"]]
    assert all(t.startswith(("solved, ridge", "kept sliced weights: held-out", "skipped")) for t in tunings), tunings
    assert teacher.model.layers[0].self_attn.o_proj.weight.shape == (24, 24)  # the caller's model stays whole


def test_the_ridge_path_solves_each_system():
    torch.manual_seed(0)
    z, y, prior = torch.randn(50, 7, dtype=torch.float64), torch.randn(50, 3, dtype=torch.float64), torch.randn(7, 3, dtype=torch.float64)
    sums = {"gram": z.T @ z, "cross": z.T @ y, "y_sq": (y * y).sum()}
    path = _ridge_path(sums, prior)
    for r in RIDGE_GRID:
        lam = r * float(torch.trace(sums["gram"])) / 7
        direct = torch.linalg.solve(sums["gram"] + lam * torch.eye(7, dtype=torch.float64), sums["cross"] + lam * prior)
        assert torch.allclose(path(r), direct, atol=1e-10)
    assert torch.allclose(path(1e9), prior, atol=1e-6)  # an infinite ridge keeps the sliced weights


def test_folds_split_the_sample_by_sequence():
    mask = torch.tensor([[1, 1, 0], [1, 1, 1], [1, 0, 0]], dtype=torch.bool)  # sequences 4, 5, 6 of the sample
    assert _fold_rows(mask, 4).tolist() == [True, True, False, False, False, True]


@pytest.mark.parametrize("options", [{"predictive": "entropy"}, {"refit_check": "cv"}, {"refit_weight": "l1"}])
def test_bad_llm_options_are_refused(options):
    with pytest.raises(ConfigError):
        KpruneConfig(**options)


def test_fisher_needs_a_language_models_targets(make_model, make_sample):
    with pytest.raises(ConfigError, match="causal LM"):
        run_method(kprune, make_model("bert", "classification"), make_sample("bert"), "classification",
                   KpruneConfig(keep_flops=0.5, predictive="fisher"))


def test_recomputed_layers_give_the_same_knowledge_and_plan(monkeypatch):
    """A causal LM's knowledge pass remakes each layer's intermediates in the backward pass; its
    hooks count each batch once, so the statistics and the plan equal those of a pass that keeps them."""
    from contextlib import nullcontext

    from prunekit.methods.layerwise import LayerRunner

    teacher, sample = tiny_lm(), lm_sample()
    config = KpruneConfig(keep_params=0.6, **LLM)
    recomputed = kprune_prepare(view(teacher), TaskData("lm", sample), config).first_stats
    plan, _ = kprune(view(teacher), TaskData("lm", sample), config)
    monkeypatch.setattr(LayerRunner, "recomputed_layers", lambda self: nullcontext())
    kept = kprune_prepare(view(teacher), TaskData("lm", sample), config).first_stats
    plan_kept, _ = kprune(view(teacher), TaskData("lm", sample), config)
    for key in ("grad_sq", "z_sq"):
        for unit in kept[key]:
            assert torch.allclose(recomputed[key][unit], kept[key][unit], rtol=1e-5, atol=1e-12), (key, unit)
    for name in ("gram", "cross", "y_sq"):
        assert torch.allclose(recomputed[name], kept[name], rtol=1e-6, atol=1e-9)
    for a, b in zip(plan.layers, plan_kept.layers, strict=True):
        assert a.heads == b.heads and a.neurons == b.neurons
