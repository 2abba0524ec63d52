"""Kwon et al. (prunekit.methods.kwon) on tiny random models: the budget is met, runs are
deterministic, the physically pruned model equals its masked form with the tuned scales folded in
(spec P15), a failing sublayer is skipped without stopping later layers (P6), and the Fisher
gradients of one run serve every budget."""

from __future__ import annotations

import copy
from types import SimpleNamespace

import pytest
import torch
from builders import view
from conftest import make_sample, model_inputs_for, outputs_of, run_method

from prunekit.core.accounting import count_flops, full_flops
from prunekit.core.errors import ConfigError
from prunekit.core.masks import apply_masks
from prunekit.families import get_adapter
from prunekit.methods import get_method
from prunekit.methods.kwon import KwonConfig, _rearrange, kwon, kwon_fisher
from prunekit.methods.lut import LatencyTable
from prunekit.methods.search import full_widths, total_cost
from prunekit.tasks import TaskData


def labelled_sample(family: str, head: str, num_batches: int = 3, seed: int = 0) -> SimpleNamespace:
    """conftest's hand-built sample with ground-truth labels of the head's kind."""
    sample = make_sample(family, num_batches=num_batches, seed=seed)
    generator = torch.Generator().manual_seed(seed)
    for batch in sample.batches:
        n = batch["input_ids"].shape[0]
        lengths = batch["attention_mask"].sum(1)
        if head == "classification":
            batch["labels"] = torch.randint(0, 3, (n,), generator=generator)
        elif head == "regression":
            batch["labels"] = torch.rand(n, generator=generator) * 5
        else:
            batch["start_positions"] = (torch.rand(n, generator=generator) * lengths).long()
            batch["end_positions"] = torch.minimum(batch["start_positions"] + 1, lengths - 1)
    return sample


def kind_of(head: str) -> str:
    return head  # the conftest heads are named after the loss kinds


def masked_outputs(teacher, plan, batch):
    adapter = get_adapter(teacher)
    heads, neurons = plan.masks(view(teacher))
    with apply_masks(adapter, heads, neurons):
        return outputs_of(teacher, batch)


@pytest.mark.parametrize("keep", [0.7, 0.3])
def test_meets_the_flops_budget_and_equals_its_masked_form(tiny_model, family, head, keep):
    teacher = copy.deepcopy(tiny_model)
    sample = labelled_sample(family, head)
    model = tiny_model
    plan, log = run_method(kwon, model, sample, kind_of(head), KwonConfig(keep_flops=keep))
    seq_len = sample.mean_length
    assert count_flops(view(model), seq_len) <= keep * full_flops(view(teacher), seq_len) * (1 + 1e-9)
    assert log["search"]["cost"] <= log["budget"] * (1 + 1e-9)
    for batch in sample.batches:
        torch.testing.assert_close(outputs_of(model, batch), masked_outputs(teacher, plan, batch), rtol=1e-4, atol=1e-5)


def test_tuned_scales_are_folded_into_the_weights(make_model):
    teacher = make_model("bert", "classification", num_layers=3)
    model = copy.deepcopy(teacher)
    sample = labelled_sample("bert", "classification", num_batches=4)
    plan, log = run_method(kwon, model, sample, "classification", KwonConfig(keep_flops=0.5, damp=1e-3))
    tuned = [step for step in log["tuning"] if step["status"] == "tuned"]
    assert tuned, log["tuning"]
    scales = [float(s) for layer in plan.layers for values in (layer.head_scales, layer.neuron_scales)
              if values is not None for s in values]
    assert any(abs(s - 1.0) > 1e-3 for s in scales)
    for step in tuned:
        assert step["residual_after"] <= step["residual_before"] * (1 + 1e-9)
    for batch in sample.batches:
        torch.testing.assert_close(outputs_of(model, batch), masked_outputs(teacher, plan, batch), rtol=1e-4, atol=1e-5)


def test_deterministic(family, make_model):
    sample = labelled_sample(family, "classification")
    runs = []
    for _ in range(2):
        model = make_model(family, "classification")
        plan, _ = run_method(kwon, model, sample, "classification", KwonConfig(keep_flops=0.5))
        runs.append(plan)
    assert runs[0] == runs[1]  # indices and every tuned scale


def test_a_rejected_sublayer_does_not_stop_later_layers(make_model):
    """P6: with an impossible scale limit every tuned sublayer is rejected on its own."""
    model = make_model("bert", "classification", num_layers=3)
    sample = labelled_sample("bert", "classification")
    plan, log = run_method(kwon, model, sample, "classification", KwonConfig(keep_flops=0.6, max_scale=1e-6))
    statuses = [(step["layer"], step["sublayer"], step["status"]) for step in log["tuning"]]
    assert len(statuses) == 6  # every sublayer of every layer was visited
    attempted = [s for s in statuses if not s[2].startswith("skipped")]
    assert {layer for layer, _, _ in attempted} == {0, 1, 2}
    assert all(status.startswith("rejected") for _, _, status in attempted)
    assert all(layer.head_scales is None and layer.neuron_scales is None for layer in plan.layers)


def test_skips_the_first_attention_like_the_reference(make_model):
    model = make_model("bert", "classification")
    _, log = run_method(kwon, model, labelled_sample("bert", "classification"), "classification", KwonConfig(keep_flops=0.6))
    first = next(step for step in log["tuning"] if step["layer"] == 0 and step["sublayer"] == "attn")
    assert first["status"].startswith("skipped: first attention")


def test_fisher_gradients_are_reused_across_budgets(make_model):
    teacher = make_model("bert", "regression")
    sample = labelled_sample("bert", "regression")
    config = KwonConfig(keep_flops=0.5)
    fisher = kwon_fisher(view(teacher), TaskData(kind="regression", sample=sample), config)
    assert fisher.heads[0].shape == (len(sample.batches), 4) and fisher.neurons[1].shape == (len(sample.batches), 37)
    fresh, reused = copy.deepcopy(teacher), copy.deepcopy(teacher)
    plan_fresh, _ = run_method(kwon, fresh, sample, "regression", config)
    plan_reused, _ = run_method(kwon, reused, sample, "regression", config, prepared=fisher)
    assert plan_fresh.to_dict() == plan_reused.to_dict()
    assert get_method("kwon").prepare is kwon_fisher


def test_needs_labels(make_model):
    model = make_model("bert", "classification")
    with pytest.raises(ConfigError, match="labels"):
        run_method(kwon, model, make_sample("bert"), "classification", KwonConfig())


def test_latency_budget_with_a_table(make_model, tmp_path):
    model = make_model("bert", "classification")
    table = LatencyTable(
        attn_units=[0, 1, 2, 3, 4], attn_ms=[0.0, 1.0, 1.2, 1.4, 1.6],
        ffn_units=[0, 8, 16, 24, 32, 37], ffn_ms=[0.0, 0.5, 0.9, 1.3, 1.7, 1.95],
        hidden_size=32, head_dim=8, num_heads=4, intermediate_size=37, batch_size=2, seq_len=8,
        device="cpu", threads=1,
    )
    path = table.save(tmp_path / "lut.json")
    config = KwonConfig(keep_latency=0.5, lut=str(path))
    plan, log = run_method(kwon, model, labelled_sample("bert", "classification"), "classification", config)
    costs = table.costs(get_adapter(model))
    shapes = get_adapter(model).layer_shapes()
    counts = {(k, layer): (s.num_heads if k == "attn" else s.intermediate_size)
              for layer, s in enumerate(shapes) for k in ("attn", "ffn")}
    assert log["budget_kind"] == "latency"
    assert total_cost(costs, counts) <= 0.5 * total_cost(costs, full_widths(get_adapter(model))) * (1 + 1e-9)


def test_config_errors_say_how_to_fix():
    with pytest.raises(ConfigError, match="prunekit lut"):
        KwonConfig(keep_latency=0.5)
    with pytest.raises(ConfigError, match=r"\(0, 1\]"):
        KwonConfig(keep_flops=1.5)


def test_rearrangement_keeps_the_count_and_lowers_the_block_fisher_loss():
    generator = torch.Generator().manual_seed(0)
    grads = torch.randn(16, 12, generator=generator, dtype=torch.float64)  # (num_batches, units)
    grads[:, :4] += 2.0  # correlated units: pruning them together costs more than the diagonal says
    diagonal = (grads**2).sum(0)
    kept = torch.sort(torch.sort(diagonal, descending=True).indices[:5]).values
    new, before, after = _rearrange(kept, grads)
    assert new.numel() == kept.numel()
    pruned = torch.ones(12, dtype=torch.bool)
    pruned[new] = False
    total = grads[:, pruned].sum(1)
    assert after == pytest.approx(float(total @ total))
    assert after <= before + 1e-9


def test_the_model_keeps_taking_inputs_after_pruning(make_model):
    model = make_model("distilbert", "qa")
    sample = labelled_sample("distilbert", "qa")
    run_method(kwon, model, sample, "qa", KwonConfig(keep_flops=0.4))
    with torch.no_grad():
        out = model(**model_inputs_for(model, sample.batches[0]))
    assert torch.isfinite(out.start_logits).all()


def test_fisher_rows_takes_one_gradient_per_chunk_of_sequences():
    """fisher_rows=1: one Fisher gradient per sequence, the same as a sample batched one sequence
    at a time; the plan still meets the budget."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from prunekit.methods.kwon import _fisher
    from prunekit.tasks.causal_lm.data import build_lm_calibration_sample

    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=61, hidden_size=24, intermediate_size=40, num_hidden_layers=2,
                                         num_attention_heads=4, num_key_value_heads=2, head_dim=6,
                                         max_position_embeddings=64, tie_word_embeddings=True)).eval()
    tokens = torch.randint(1, 61, (400,), generator=torch.Generator().manual_seed(1))

    def sample(batch_size):
        return build_lm_calibration_sample(None, tokens, num_sequences=6, seq_len=16, batch_size=batch_size)

    chunked = _fisher(view(model), sample(4), "lm", rows=1)
    single = _fisher(view(model), sample(1), "lm")
    assert chunked.num_batches == single.num_batches == 6
    for layer in chunked.neurons:
        assert torch.allclose(chunked.neurons[layer], single.neurons[layer], atol=1e-6)
        assert torch.allclose(chunked.heads[layer], single.heads[layer], atol=1e-6)
    plan, _ = run_method(kwon, copy.deepcopy(model), sample(4), "lm", KwonConfig(keep_params=0.7, fisher_rows=1))
    assert plan.layers


def test_fisher_rows_must_be_positive():


    with pytest.raises(ConfigError):
        KwonConfig(fisher_rows=0)


# ---- causal LMs: logits a chunk of positions at a time (issue 21) ----------------------------------
def test_a_causal_lm_plan_is_that_of_the_whole_logits_and_no_logits_tensor_is_whole(monkeypatch):
    """Kwon et al. on a tiny Llama keeps the same units with the same scales as with the model's own
    loss on its whole logits, and makes no tensor of (a batch's tokens x vocabulary), forward or
    backward (Fisher pass and mask tuning)."""
    import importlib

    from builders import LargestTensor, lm_windows, tiny_causal_lm

    from prunekit.methods.layerwise import model_inputs
    from prunekit.tasks import losses

    def whole_logits_loss(runner, batch, kind):  # _task_loss as it was before chunking
        return runner.model(**model_inputs(batch), labels=batch["labels"]).loss

    vocab, sample = 211, lm_windows(211)
    config = KwonConfig(keep_params=0.6)
    kwon_module = importlib.import_module("prunekit.methods.kwon")  # prunekit.methods.kwon is also the function
    with monkeypatch.context() as patch:
        patch.setattr(kwon_module, "_task_loss", whole_logits_loss)
        with LargestTensor() as before:  # the check sees whole logits where they are made
            whole, _ = run_method(kwon, tiny_causal_lm(vocab), sample, "lm", config)
    monkeypatch.setattr(losses, "LM_CHUNK_ENTRIES", 5 * vocab)
    with LargestTensor() as largest:
        chunked, _ = run_method(kwon, tiny_causal_lm(vocab), sample, "lm", config)
    assert [(s.heads, s.neurons) for s in chunked.layers] == [(s.heads, s.neurons) for s in whole.layers]
    for a, b in zip(chunked.layers, whole.layers, strict=True):
        for name in ("head_scales", "neuron_scales"):
            x, y = getattr(a, name), getattr(b, name)
            assert (x is None) == (y is None) and (x is None or torch.allclose(x, y, atol=1e-5, rtol=1e-5))
    assert largest.numel < sample.batches[0]["input_ids"].numel() * vocab <= before.numel


def test_recomputed_layers_give_the_same_fisher_gradients(monkeypatch):
    """A causal LM's Fisher pass recomputes each layer's intermediates in the backward pass
    (LayerRunner.recomputed_layers): the per-batch mask gradients equal those of a plain backward
    pass, and the model gets its own layers back."""
    import contextlib

    from builders import lm_windows, tiny_causal_lm

    from prunekit.methods.layerwise import LayerRunner

    model, sample = tiny_causal_lm(), lm_windows()
    layers = list(get_adapter(model).layers())
    recomputed = kwon_fisher(get_adapter(model), TaskData(kind="lm", sample=sample))
    assert list(get_adapter(model).layers()) == layers
    monkeypatch.setattr(LayerRunner, "recomputed_layers", lambda self: contextlib.nullcontext())
    stored = kwon_fisher(get_adapter(model), TaskData(kind="lm", sample=sample))
    for mine, theirs in ((recomputed.heads, stored.heads), (recomputed.neurons, stored.neurons)):
        for layer in mine:
            assert torch.allclose(mine[layer], theirs[layer], atol=1e-6, rtol=0)
