"""Qwen3 (``Qwen3ForCausalLM``, ``Qwen3ForSequenceClassification``): the Llama layout
(``prunekit.families.decoder``) plus per-head RMSNorms of queries and keys (``self_attn.q_norm``,
``self_attn.k_norm``). transformers applies them to q and k viewed as (..., heads, d_h), over d_h
only, with one weight of d_h entries shared by every head: removing heads leaves them unchanged,
every kept head still uses them, and they go only when the whole attention is emptied or removed.
Biases follow ``attention_bias`` (q, k, v and o); the FFN has none.
"""

from __future__ import annotations

from transformers import Qwen3ForCausalLM, Qwen3ForSequenceClassification, Qwen3Model

from prunekit.families.decoder import LlamaLayoutAdapter


class Qwen3Adapter(LlamaLayoutAdapter):
    family = "qwen3"
    model_types = ("qwen3",)
    model_classes = {
        "causal_lm": Qwen3ForCausalLM,
        "sequence_classification": Qwen3ForSequenceClassification,
        "base": Qwen3Model,
    }
