"""Qwen2 and Qwen2.5 (``Qwen2ForCausalLM``, ``Qwen2ForSequenceClassification``): the Llama layout
(``prunekit.families.decoder``) with biases on the query, key and value projections and none on
the output projection or the FFN; an emptied attention therefore computes X exactly. Layers may
use a sliding window (``layer_types``), which each attention module keeps.
"""

from __future__ import annotations

from transformers import Qwen2ForCausalLM, Qwen2ForSequenceClassification, Qwen2Model

from prunekit.core.view import BlockFacts
from prunekit.families.decoder import LlamaLayoutAdapter


class Qwen2Adapter(LlamaLayoutAdapter):
    family = "qwen2"
    model_types = ("qwen2",)
    model_classes = {
        "causal_lm": Qwen2ForCausalLM,
        "sequence_classification": Qwen2ForSequenceClassification,
        "base": Qwen2Model,
    }

    @property
    def facts(self) -> BlockFacts:
        return BlockFacts("pre", "rmsnorm", frozenset({"query", "key", "value"}), gated_ffn=True)
