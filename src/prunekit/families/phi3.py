"""Phi-3 and Phi-4 mini (``Phi3ForCausalLM``, ``Phi3ForSequenceClassification``: Phi-3-mini/medium,
Phi-3.5-mini, Phi-4-mini): the Llama layout (``prunekit.families.decoder``) with q, k and v fused
into one ``qkv_proj`` (rows q; k; v, grouped key/value heads in Phi-3-medium, 3.5 and 4) and gate
and up into one ``gate_up_proj`` (rows gate; up), no biases, and partial rotary embeddings in some
versions (``partial_rotary_factor``: only the first part of each head is rotated).

Like GPT-2's ``c_attn``, the fused linears are presented to prunekit as separate projections
(``Layout.fused_qkv``/``fused_gate_up``: the adapter splits them into ``FusedLinear`` parts when it
first views the model, an exact copy) and saved fused, with Phi-3's names and shapes. Phi-3's
attention splits q, k and v at widths its config gives, so a pruned attention runs as the remote
code's ``MappedKvAttention``, which splits at its own widths.

Refused, with the feature named: Phi-3.5-MoE (``PhimoeForCausalLM``, model_type "phimoe"), whose
FFNs are mixtures of experts.
"""

from __future__ import annotations

from typing import ClassVar

from transformers import Phi3ForCausalLM, Phi3ForSequenceClassification, Phi3Model

from prunekit.core.view import BlockFacts
from prunekit.families.decoder import LlamaLayoutAdapter


class Phi3Adapter(LlamaLayoutAdapter):
    family = "phi3"
    model_types = ("phi3",)
    model_classes = {
        "causal_lm": Phi3ForCausalLM,
        "sequence_classification": Phi3ForSequenceClassification,
        "base": Phi3Model,
    }
    refused_model_types: ClassVar[dict[str, str]] = {
        "phimoe": "mixture-of-experts FFNs (Phi-3.5-MoE); prunekit prunes dense FFN neurons",
    }
    changes_modules = True  # fused qkv_proj / gate_up_proj -> FusedLinear parts

    @property
    def facts(self) -> BlockFacts:
        return BlockFacts("pre", "rmsnorm", frozenset(), gated_ffn=True)
