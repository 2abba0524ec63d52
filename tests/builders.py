"""Helpers shared by the decoder-family tests (test_model_view, test_decoders_llama,
test_decoders_opt_gpt2): spread-out random weights for a tiny model, right-padded batches and
labelled samples, the outputs compared across masked and pruned models, a layer's input and
output, a hand count of multiply-adds, and the largest tensor a computation makes. Each test file keeps its own model configs."""

from __future__ import annotations

import subprocess
from types import SimpleNamespace

import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from prunekit.core.masks import apply_masks
from prunekit.core.surgery import PruningPlan
from prunekit.core.view import ModelAdapter
from prunekit.families import get_adapter
from prunekit.families.gpt2 import FusedQKV

# The opening of the loader scripts that run in a fresh interpreter where `import prunekit` fails
# (the venv holds an editable install, so a clean sys.path alone would still find it): plain
# transformers only. Each test appends the loop over its folders.
WITHOUT_PRUNEKIT = r"""
import json, sys
sys.modules["prunekit"] = None  # not importable in this process
try:
    import prunekit  # noqa: F401
    raise SystemExit("prunekit was importable")
except ImportError:
    pass
import torch
import transformers
"""

class LargestTensor(TorchDispatchMode):
    """Inside ``with LargestTensor() as largest:``, ``largest.numel`` is the element count of the
    largest tensor any operation returned (views included), backward passes included: what bounds
    a computation's memory by design, independent of the allocator."""

    def __init__(self) -> None:
        super().__init__()
        self.numel = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for value in tree_flatten(out)[0]:
            if isinstance(value, torch.Tensor):
                self.numel = max(self.numel, value.numel())
        return out


def tiny_causal_lm(vocab: int = 211, seed: int = 0) -> nn.Module:
    """A tiny random Llama causal LM whose vocabulary is large next to its width (as in real LLMs),
    so that a (tokens x vocabulary) tensor is the largest a method could make."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=vocab, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, head_dim=8, max_position_embeddings=64,
                         tie_word_embeddings=True, pad_token_id=0)
    return spread_out(LlamaForCausalLM(config).eval())


def lm_windows(vocab: int = 211, sequences: int = 8, length: int = 16, batch_size: int = 4) -> SimpleNamespace:
    """A causal-LM calibration sample of random-token windows (labels = input_ids)."""
    from prunekit.tasks.causal_lm.data import build_lm_calibration_sample

    stream = torch.randint(1, vocab, (400,), generator=torch.Generator().manual_seed(1))
    return build_lm_calibration_sample(None, stream, num_sequences=sequences, seq_len=length, batch_size=batch_size)


def dead_pid() -> int:
    """The id of a process that has ended (what a killed writer leaves in its temporary names)."""
    child = subprocess.Popen(["true"])
    child.wait()
    return child.pid


def view(model: nn.Module | ModelAdapter) -> ModelAdapter:
    """What core functions and methods take: a test's model viewed (a view is used as it is)."""
    return model if isinstance(model, ModelAdapter) else get_adapter(model)


NORM_WEIGHTS = ("norm.weight",)  # Llama-layout names: input_layernorm, post_attention_layernorm, norm


def spread_out(model: nn.Module, norm_weights: tuple[str, ...] = NORM_WEIGHTS) -> nn.Module:
    """``model`` in eval mode with spread-out random values, so that equalities cannot hold by
    accident: norm scales (parameters ending in ``norm_weights``) near 1, everything else N(0, 0.25)
    (matrices) or N(0, 0.2) (vectors). Draws from torch's global generator."""
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith(norm_weights):
                param.copy_(1.0 + 0.2 * torch.randn_like(param))
            else:
                param.normal_(0.0, 0.25 if param.dim() >= 2 else 0.2)
    return model.eval()


def padded_pair(vocab: int, seed: int = 0, low: int = 1, pad: int = 0) -> dict[str, torch.Tensor]:
    """Two sequences of 9 and 6 tokens (ids from ``low``), the second right-padded with ``pad``, so
    that a classifier pools the last real token."""
    generator = torch.Generator().manual_seed(seed)
    input_ids = torch.randint(low, vocab, (2, 9), generator=generator)
    attention_mask = torch.ones_like(input_ids)
    attention_mask[1, 6:] = 0
    return {"input_ids": input_ids.masked_fill(attention_mask == 0, pad), "attention_mask": attention_mask}


def labelled_sample(vocab: int, num_batches: int = 3, seed: int = 0, low: int = 1, pad: int = 0) -> SimpleNamespace:
    """A calibration sample of right-padded batches of 4 sequences with 3-class labels."""
    gen = torch.Generator().manual_seed(seed)
    batches = []
    for b in range(num_batches):
        lengths = torch.tensor([4 + (b * 5 + i * 3) % 9 for i in range(4)])
        mask = (torch.arange(int(lengths.max()))[None, :] < lengths[:, None]).long()
        ids = torch.randint(low, vocab, mask.shape, generator=gen).masked_fill(mask == 0, pad)
        batches.append({"input_ids": ids, "attention_mask": mask, "labels": torch.randint(0, 3, (4,), generator=gen)})
    tokens = sum(int(b["attention_mask"].sum()) for b in batches)
    return SimpleNamespace(batches=batches, num_sequences=4 * num_batches, num_tokens=tokens,
                           mean_length=tokens / (4 * num_batches))


def outputs(model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """The logits, at the real positions only for a causal LM (padding logits are not compared)."""
    with torch.no_grad():
        logits = model(**batch).logits
    if logits.dim() == 3:
        return logits[batch["attention_mask"].bool()]
    return logits


def masked(model: nn.Module, plan: PruningPlan, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """:func:`outputs` of ``model`` with ``plan``'s masks applied (what the pruned model must compute)."""
    head_masks, neuron_masks = plan.masks(view(model))
    with apply_masks(get_adapter(model), head_masks, neuron_masks):
        return outputs(model, batch)


def layer_io(model: nn.Module, layer: int, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Input and output hidden states of ``layer`` on ``batch`` (a block returning a tuple gives its first)."""
    record = {}
    block = get_adapter(model).layers()[layer]
    handles = [block.register_forward_pre_hook(lambda m, args: record.__setitem__("x", args[0])),
               block.register_forward_hook(lambda m, args, out: record.__setitem__("y", out))]
    try:
        outputs(model, batch)
    finally:
        for handle in handles:
            handle.remove()
    y = record["y"][0] if isinstance(record["y"], tuple) else record["y"]
    return record["x"], y


def macs_by_hand(model: nn.Module, s: int) -> float:
    """Multiply-adds of every q/k/v/out and FFN matrix, read off the modules, plus 2·s²·d_h per query
    head (QKᵀ and attention × V); a layer without a query projection (emptied attention) has none."""
    total = 0.0
    for block in get_adapter(model).layers():
        for linear in (m for m in block.modules() if isinstance(m, torch.nn.Linear)):
            total += s * linear.in_features * linear.out_features
        attn = block.attn if hasattr(block, "attn") else block.self_attn
        query = attn.c_attn.q if isinstance(getattr(attn, "c_attn", None), FusedQKV) else getattr(attn, "q_proj", None)
        if query is not None:
            total += 2 * s * s * query.out_features
    return total
