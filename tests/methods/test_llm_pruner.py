"""LLM-Pruner without LoRA (prunekit.methods.llm_pruner) on tiny random decoders of every family:
every budget kind is met with the first and last layers whole and one ratio in the others, the
pruned model equals the masked teacher within 1e-5, it saves, reloads and replays; the importance is
|w · ∂L/∂w| summed over each coupled group (element-wise) or over its vectors (vector-wise), with
gradients taken one block at a time equal to a whole-model backward pass, and the teacher keeps
its requires_grad flags and no gradient."""

from __future__ import annotations

import pytest
import torch
from builders import view
from llm_builders import (
    LAYERS,
    VARIANTS,
    assert_budget_met,
    assert_reloads,
    build,
    encoder_run,
    lm_sample,
    logits,
    masked_logits,
    run,
)

import prunekit
from prunekit.core.accounting import count_flops, full_flops
from prunekit.core.errors import ConfigError
from prunekit.methods import get_method
from prunekit.methods.llm_pruner import LlmPrunerConfig, llm_pruner, pruned_layers, taylor_importance
from prunekit.tasks import TaskData

ATOL = 1e-5


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("budget", [{"keep_params": 0.7}, {"keep_flops": 0.7}])
def test_meets_the_budget_leaves_the_ends_whole_and_equals_the_masked_teacher(variant, budget):
    teacher = build(variant)
    sample = lm_sample()
    plan, log, pruned = run(llm_pruner, LlmPrunerConfig(**budget), teacher, sample)
    assert_budget_met(pruned, teacher, sample, budget)  # added output biases counted too
    assert log["pruned_layers"] == [1, 2]  # 4 layers: the first and the last are left whole
    assert plan.layers[0].heads is None and plan.layers[LAYERS - 1].neurons is None
    assert len(plan.layers[1].neurons) == len(plan.layers[2].neurons) < 37
    for batch in sample.batches:
        torch.testing.assert_close(logits(pruned, batch), masked_logits(teacher, plan, batch), atol=ATOL, rtol=0)


def test_saves_reloads_and_replays(tmp_path):
    teacher = build("qwen2")
    plan, _, pruned = run(llm_pruner, LlmPrunerConfig(keep_params=0.75, aggregation="vector"), teacher)
    batch = lm_sample(seed=6).batches[0]
    assert_reloads(pruned, tmp_path / "out", plan, batch)
    replayed = prunekit.apply_plan(teacher, tmp_path / "out")
    assert torch.equal(logits(replayed, batch), logits(pruned, batch))


@pytest.mark.parametrize("aggregation", ["element", "vector"])
def test_the_importance_is_first_order_taylor_from_a_whole_model_gradient(aggregation):
    teacher = build("llama")
    sample = lm_sample()
    adapter = view(teacher)
    flags = [p.requires_grad for p in teacher.parameters()]
    scores = taylor_importance(adapter, [2], TaskData(kind="lm", sample=sample), aggregation)
    assert [p.requires_grad for p in teacher.parameters()] == flags
    assert all(p.grad is None for p in teacher.parameters())
    # The reference's way: one backward pass with every weight requiring gradients.
    teacher.zero_grad()
    with torch.enable_grad():
        for batch in sample.batches:
            labels = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)
            out = teacher(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], labels=labels)
            (out.loss / len(sample.batches)).backward()
    ffn = adapter.ffn(2)

    def reduce(lin, dim):
        s = (lin.weight * lin.weight.grad).double()
        return s.abs().sum(dim) if aggregation == "element" else s.sum(dim).abs()

    expected = reduce(ffn.up, 1) + reduce(ffn.gate, 1) + reduce(ffn.down, 0)
    teacher.zero_grad(set_to_none=True)
    torch.testing.assert_close(scores[("ffn", 2)], expected.detach(), rtol=1e-6, atol=1e-12)
    assert scores[("attn", 2)].shape == (4,)
    # Two layers per backward pass give the same scores.
    both = taylor_importance(adapter, [1, 2], TaskData(kind="lm", sample=sample), aggregation)
    torch.testing.assert_close(both[("ffn", 2)], scores[("ffn", 2)], rtol=1e-6, atol=1e-12)


def test_refuses_what_it_cannot_serve():
    assert get_method("llm_pruner").needs_labels
    with pytest.raises(ConfigError, match="aggregation"):
        LlmPrunerConfig(aggregation="hessian")
    with pytest.raises(ConfigError, match="none is left to prune"):
        pruned_layers(2, LlmPrunerConfig())
    # With the ends whole the middle layers cannot shed 90% of the model.
    with pytest.raises(ConfigError, match="cannot meet the budget"):
        run(llm_pruner, LlmPrunerConfig(keep_params=0.1), build("llama"))


@pytest.mark.parametrize("family", ["bert", "distilbert"])
def test_encoders_use_the_task_loss(family):
    plan, pruned, teacher, sample = encoder_run(llm_pruner, LlmPrunerConfig(keep_flops=0.8, protected_first=0,
                                                                            protected_last=1), family)
    seq = sample.mean_length
    assert count_flops(view(pruned), seq) <= 0.8 * full_flops(view(teacher), seq) * (1 + 1e-9)
    assert plan.layers[2].heads is None and plan.layers[0].heads is not None
