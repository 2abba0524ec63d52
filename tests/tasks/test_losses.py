"""Causal-LM losses made a chunk of positions at a time (issue 21, memory by design): the sparse
teacher targets, the sparse KL and its gradient, the model's own cross-entropy and the per-token NLL
of perplexity equal what the whole logits give (within 1e-6), and no tensor of (tokens x vocabulary)
is made, forward or backward."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from builders import LargestTensor
from transformers import LlamaConfig, LlamaForCausalLM

from prunekit.families import adapter_class
from prunekit.tasks.losses import (
    LmOutputs,
    distill_loss,
    next_token_loss,
    next_token_nll,
    sampled_nll,
    teacher_targets,
)

V, D, B, T = 97, 16, 3, 11  # a vocabulary larger than the hidden size, as in real LLMs


def head_and_hidden(seed: int = 0) -> tuple[torch.nn.Linear, torch.Tensor, torch.Tensor]:
    torch.manual_seed(seed)
    head = torch.nn.Linear(D, V, bias=False)
    with torch.no_grad():
        head.weight.mul_(4.0)  # peaked distributions: the top-k and the tail both matter
    hidden = torch.randn(B, T, D)
    mask = torch.ones(B, T, dtype=torch.long)
    mask[1, 7:] = 0  # right padding
    mask[2, :3] = 0  # left padding
    return head, hidden, mask


@pytest.mark.parametrize("rows", [1, 4, 7, 1000])
def test_chunked_targets_equal_those_of_the_whole_logits(rows):
    head, hidden, mask = head_and_hidden()
    whole = teacher_targets("lm", SimpleNamespace(logits=head(hidden)), 2.0, mask, top_k=5)
    chunked = teacher_targets("lm", LmOutputs(hidden, head, chunk_rows=rows), 2.0, mask, top_k=5)
    assert torch.equal(chunked["index"], whole["index"])
    for key in ("probs", "tail"):
        assert torch.allclose(chunked[key], whole[key], atol=1e-6, rtol=0)
    assert not any(t.requires_grad for t in chunked.values())


@pytest.mark.parametrize("rows", [1, 5, 1000])
def test_chunked_kl_and_its_gradients_equal_those_of_the_whole_logits(rows):
    head, t_hidden, mask = head_and_hidden()
    targets = teacher_targets("lm", LmOutputs(t_hidden, head), 2.0, mask, top_k=5)
    s_hidden = (t_hidden + 0.3 * torch.randn_like(t_hidden)).requires_grad_(True)
    head.weight.requires_grad_(True)  # gradients reach the head's weight too, through the recomputation

    whole = distill_loss("lm", SimpleNamespace(logits=head(s_hidden)), targets, 2.0, mask)
    g_hidden, g_head = torch.autograd.grad(whole, (s_hidden, head.weight))
    chunked = distill_loss("lm", LmOutputs(s_hidden, head, chunk_rows=rows), targets, 2.0, mask)
    c_hidden, c_head = torch.autograd.grad(chunked, (s_hidden, head.weight))

    assert whole.dtype == chunked.dtype == torch.float32 and float(whole.detach()) > 0
    assert abs(float(chunked.detach()) - float(whole.detach())) < 1e-6
    assert torch.allclose(c_hidden, g_hidden, atol=1e-6, rtol=0)
    assert torch.allclose(c_head, g_head, atol=1e-6, rtol=0)
    with torch.no_grad():  # student = teacher: no loss
        assert float(distill_loss("lm", LmOutputs(t_hidden, head, chunk_rows=rows), targets, 2.0, mask)) < 1e-6


def test_no_tensor_of_tokens_by_vocabulary_is_made_forward_or_backward():
    head, t_hidden, mask = head_and_hidden()
    s_hidden = (t_hidden + 0.3 * torch.randn_like(t_hidden)).requires_grad_(True)
    labels = torch.randint(0, V, (B, T))
    with LargestTensor() as largest:
        targets = teacher_targets("lm", LmOutputs(t_hidden, head, chunk_rows=4), 2.0, mask, top_k=5)
        distill_loss("lm", LmOutputs(s_hidden, head, chunk_rows=4), targets, 2.0, mask).backward()
        next_token_loss(LmOutputs(s_hidden, head, chunk_rows=4), labels).backward()
        next_token_nll(LmOutputs(t_hidden, head, chunk_rows=4), labels)
    # One chunk's logits at most, or the head's weight (V, d) itself.
    assert largest.numel <= max(4 * V, head.weight.numel()) < B * T * V


def tiny_lm() -> LlamaForCausalLM:
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=V, hidden_size=D, intermediate_size=24, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                         tie_word_embeddings=True)
    return LlamaForCausalLM(config).eval()


@pytest.mark.parametrize("rows", [3, 1000])
def test_next_token_loss_is_the_models_own_loss_with_the_same_gradients(rows):
    model = tiny_lm()
    parts = adapter_class(model).causal_lm_parts(model)
    input_ids = torch.randint(0, V, (B, T), generator=torch.Generator().manual_seed(1))
    labels = input_ids.masked_fill(torch.rand(B, T, generator=torch.Generator().manual_seed(2)) < 0.2, -100)
    weight = model.model.layers[0].mlp.down_proj.weight

    own = model(input_ids=input_ids, labels=labels).loss
    (g_own,) = torch.autograd.grad(own, weight)
    chunked = next_token_loss(LmOutputs(parts.final_hidden(input_ids=input_ids), parts.head, chunk_rows=rows), labels)
    (g_chunked,) = torch.autograd.grad(chunked, weight)
    assert abs(float(chunked.detach()) - float(own.detach())) < 1e-6
    assert torch.allclose(g_chunked, g_own, atol=1e-6, rtol=0)


def test_next_token_nll_is_that_of_the_whole_logits():
    model = tiny_lm()
    parts = adapter_class(model).causal_lm_parts(model)
    input_ids = torch.randint(0, V, (B, T), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        log_probs = torch.log_softmax(model(input_ids=input_ids).logits[:, :-1].float(), -1)
        whole = -log_probs.gather(-1, input_ids[:, 1:, None]).squeeze(-1)  # (B, T-1)
        chunked = next_token_nll(LmOutputs(parts.final_hidden(input_ids=input_ids), parts.head, chunk_rows=5),
                                 input_ids)
    assert chunked.shape == whole.shape
    assert torch.allclose(chunked, whole, atol=1e-6, rtol=0)


def test_default_chunks_hold_a_bounded_number_of_logits():
    head = torch.nn.Linear(8, 49_152, bias=False)
    assert LmOutputs(torch.zeros(1, 1, 8), head).rows_per_chunk() == 2**24 // 49_152  # 341 positions
    assert LmOutputs(torch.zeros(1, 1, 8), torch.nn.Linear(8, 2**25)).rows_per_chunk() == 1


@pytest.mark.parametrize("rows", [1, 5, 1000])
def test_sampled_tokens_and_their_loss_are_the_same_chunked(rows):
    """Kprune's predictive="fisher": the teacher's drawn tokens, and the student's summed NLL of them
    with its gradients, are the same whether the logits come whole or a chunk at a time."""
    head, t_hidden, mask = head_and_hidden()
    whole_t = teacher_targets("lm", SimpleNamespace(logits=head(t_hidden)), 2.0, mask, top_k=5,
                              generator=torch.Generator().manual_seed(3))
    chunked_t = teacher_targets("lm", LmOutputs(t_hidden, head, chunk_rows=rows), 2.0, mask, top_k=5,
                                generator=torch.Generator().manual_seed(3))
    # The CPU generator fills chunk after chunk as it fills the whole: the same draw.
    assert torch.equal(whole_t["sampled"], chunked_t["sampled"])
    s_hidden = (t_hidden + 0.3 * torch.randn_like(t_hidden)).requires_grad_(True)
    whole = sampled_nll(SimpleNamespace(logits=head(s_hidden)), whole_t, 2.0, mask)
    chunked = sampled_nll(LmOutputs(s_hidden, head, chunk_rows=rows), whole_t, 2.0, mask)
    (g_whole,), (g_chunked,) = torch.autograd.grad(whole, s_hidden), torch.autograd.grad(chunked, s_hidden)
    assert abs(float(whole.detach()) - float(chunked.detach())) < 1e-4 * float(whole.detach())
    assert torch.allclose(g_chunked, g_whole, atol=1e-6, rtol=0)
