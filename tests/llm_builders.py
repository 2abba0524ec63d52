"""Tiny random decoders of every decoder family and a causal-LM calibration sample, for the tests of
the LLM methods (FLAP, Wanda-sp, ShortGPT: tests/methods/test_flap.py, ...); the masked form of a
plan that also carries output biases; and the checks every method's plan must pass (the pruned
model equals its masked form, saves and reloads identically, replays from the teacher)."""

from __future__ import annotations

import copy
from pathlib import Path
from types import SimpleNamespace

import torch
import transformers
from builders import spread_out, view
from torch import nn
from transformers import AutoModelForCausalLM

from prunekit.core.accounting import count_flops, count_non_embedding_params, full_flops
from prunekit.core.masks import apply_masks
from prunekit.core.surgery import PruningPlan, apply_plan
from prunekit.families import get_adapter
from prunekit.tasks import TaskData

D, H, H_KV, D_H, D_FF, VOCAB, LAYERS = 32, 4, 2, 8, 37, 97, 4
# Llama with and without biases (the no-bias case is the one FLAP must give a bias), Mistral, Qwen2
# (q/k/v biases), Qwen3 (q/k norms), OPT with and without biases, GPT-2.
VARIANTS = ("llama", "llama-bias", "mistral", "qwen2", "qwen3", "opt", "opt-nobias", "gpt2")
NORMS = ("norm.weight", "ln_1.weight", "ln_2.weight", "ln_f.weight", "layer_norm.weight")


def build(variant: str, seed: int = 0, layers: int = LAYERS) -> nn.Module:
    """A tiny causal LM of ``variant`` with spread-out random weights, in eval mode."""
    family = variant.split("-")[0]
    if family in ("llama", "mistral", "qwen2", "qwen3"):
        names = {"llama": "Llama", "mistral": "Mistral", "qwen2": "Qwen2", "qwen3": "Qwen3"}
        extra = {"attention_bias": True, "mlp_bias": True} if variant == "llama-bias" else {}
        if family == "qwen3":
            extra = {"attention_bias": False}
        config = getattr(transformers, names[family] + "Config")(
            vocab_size=VOCAB, hidden_size=D, intermediate_size=D_FF, num_hidden_layers=layers,
            num_attention_heads=H, num_key_value_heads=H_KV, head_dim=D_H, max_position_embeddings=64,
            tie_word_embeddings=True, pad_token_id=0, **extra,
        )  # fmt: skip
        model_class = getattr(transformers, names[family] + "ForCausalLM")
    elif family == "opt":
        config = transformers.OPTConfig(
            vocab_size=VOCAB, hidden_size=D, num_hidden_layers=layers, num_attention_heads=H, ffn_dim=D_FF,
            max_position_embeddings=64, enable_bias=variant != "opt-nobias", pad_token_id=1, dropout=0.0,
            attention_dropout=0.0,
        )  # fmt: skip
        model_class = transformers.OPTForCausalLM
    else:
        config = transformers.GPT2Config(vocab_size=VOCAB, n_embd=D, n_layer=layers, n_head=H, n_inner=D_FF,
                                         n_positions=64, pad_token_id=0, resid_pdrop=0.0, embd_pdrop=0.0,
                                         attn_pdrop=0.0)
        model_class = transformers.GPT2LMHeadModel
    torch.manual_seed(seed)
    return spread_out(model_class(config), NORMS)


def lm_sample(num_batches: int = 2, seed: int = 0) -> SimpleNamespace:
    """Right-padded batches of 3 sequences (ids from 2, so that no real token is a pad id)."""
    gen = torch.Generator().manual_seed(seed)
    batches = []
    for b in range(num_batches):
        lengths = torch.tensor([12 - b, 7 + b, 10])
        mask = (torch.arange(int(lengths.max()))[None, :] < lengths[:, None]).long()
        ids = torch.randint(2, VOCAB, mask.shape, generator=gen).masked_fill(mask == 0, 1)
        batches.append({"input_ids": ids, "attention_mask": mask, "labels": ids.masked_fill(mask == 0, -100)})
    tokens = sum(int(b["attention_mask"].sum()) for b in batches)
    count = 3 * num_batches
    return SimpleNamespace(batches=batches, num_sequences=count, num_tokens=tokens, mean_length=tokens / count)


def logits(model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Next-token logits at the real positions."""
    with torch.no_grad():
        out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    return out[batch["attention_mask"].bool()]


def run(method, config, teacher: nn.Module, sample=None) -> tuple[PruningPlan, dict, nn.Module]:
    """The method's plan and log on ``teacher`` (left unchanged), and the teacher's copy cut by it."""
    sample = sample or lm_sample()
    adapter = view(teacher)
    plan, log = method(adapter, TaskData(kind="lm", sample=sample), config)
    pruned = apply_plan(adapter.of(copy.deepcopy(adapter.model)), plan)
    return plan, log, pruned


def masked_logits(teacher: nn.Module, plan: PruningPlan, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """What the pruned model must compute: the teacher with the plan's masks, each output projection
    given the plan's output bias (hooks that add the difference to its output)."""
    adapter = view(teacher)
    heads, neurons = plan.masks(adapter)
    handles = []
    for layer, step in enumerate(plan.layers):
        for kind, bias in (("attn", step.attention_out_bias), ("ffn", step.ffn_out_bias)):
            if bias is None:
                continue
            out = adapter.sublayer(layer, kind).output
            delta = bias.to(out.weight) - (out.bias.detach() if out.bias is not None else 0.0)
            handles.append(out.register_forward_hook(lambda m, a, o, delta=delta: o + delta))
    try:
        with apply_masks(get_adapter(teacher), heads, neurons):
            return logits(teacher, batch)
    finally:
        for handle in handles:
            handle.remove()


def assert_reloads(pruned: nn.Module, folder: Path, plan: PruningPlan, batch: dict[str, torch.Tensor],
                   atol: float = 0.0) -> list[nn.Module]:
    """Saved with its plan, the pruned model reloads through prunekit and the Auto class with its
    layer shapes and outputs (bit for bit unless ``atol``); returns the reloaded models."""
    from prunekit.io.folders import load_pruned, save_pruned

    expected = logits(pruned, batch)
    shapes = get_adapter(pruned).layer_shapes()
    save_pruned(pruned, folder, plan=plan, uniform=plan.uniform)
    models = [load_pruned(folder), AutoModelForCausalLM.from_pretrained(folder).eval()]
    for model in models:
        assert get_adapter(copy.deepcopy(model)).layer_shapes() == shapes
        torch.testing.assert_close(logits(model, batch), expected, atol=atol, rtol=0)
    return models


def encoder_run(method, config, family: str, num_layers: int = 3):
    """The method on a tiny labelled ``family`` classifier (BERT, RoBERTa, DistilBERT): the plan, the
    pruned model, the teacher and its sample (padded, with 3-class labels)."""
    from builders import labelled_sample
    from conftest import VOCAB as ENCODER_VOCAB
    from conftest import build_tiny_model

    teacher = build_tiny_model(family, "classification", num_layers=num_layers)
    pad = 1 if family == "roberta" else 0
    sample = labelled_sample(ENCODER_VOCAB, low=2, pad=pad)
    if family == "distilbert":
        for batch in sample.batches:
            batch.pop("token_type_ids", None)
    adapter = view(teacher)
    plan, _ = method(adapter, TaskData(kind="classification", sample=sample), config)
    pruned = apply_plan(adapter.of(copy.deepcopy(teacher)), plan)
    return plan, pruned, teacher, sample


def encoder_logits(model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits


def encoder_masked(teacher: nn.Module, plan: PruningPlan, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """:func:`masked_logits` for an encoder classifier."""
    adapter = view(teacher)
    heads, neurons = plan.masks(adapter)
    handles = []
    for layer, step in enumerate(plan.layers):
        for kind, bias in (("attn", step.attention_out_bias), ("ffn", step.ffn_out_bias)):
            if bias is not None:
                out = adapter.sublayer(layer, kind).output
                delta = bias.to(out.weight) - (out.bias.detach() if out.bias is not None else 0.0)
                handles.append(out.register_forward_hook(lambda m, a, o, delta=delta: o + delta))
    try:
        with apply_masks(get_adapter(teacher), heads, neurons):
            return encoder_logits(teacher, batch)
    finally:
        for handle in handles:
            handle.remove()


def assert_budget_met(pruned: nn.Module, teacher: nn.Module, sample, budget: dict) -> None:
    """The pruned model keeps at most ``keep_params`` of the teacher's non-embedding parameters, or
    ``keep_flops`` of its FLOPs at the sample's mean length (the budget dict has one of them)."""
    if "keep_params" in budget:
        assert count_non_embedding_params(view(pruned)) <= budget["keep_params"] * count_non_embedding_params(
            view(teacher))
    else:
        seq = sample.mean_length
        assert count_flops(view(pruned), seq) <= budget["keep_flops"] * full_flops(view(teacher), seq) * (1 + 1e-9)
