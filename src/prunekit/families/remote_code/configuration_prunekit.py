"""Configurations of models pruned by prunekit, for loading without prunekit.

This file is copied into every folder prunekit writes, next to ``modeling_prunekit.py``, and
``config.json`` names both in its ``auto_map``, so that plain transformers can rebuild the pruned
model in a process where prunekit is not installed::

    AutoModelForSequenceClassification.from_pretrained(folder, trust_remote_code=True)

It must not import prunekit. With prunekit installed, prefer ``import prunekit`` (then no remote
code is run) or ``prunekit.load_pruned(folder)``.
"""

from transformers import BertConfig, DistilBertConfig, RobertaConfig


class PrunekitBertConfig(BertConfig):
    """BertConfig plus the per-layer widths (``prunekit_layers``) and the narrowed residual width
    (``prunekit_hidden_size``, None when not narrowed)."""

    model_type = "prunekit_bert"
    prunekit_layers: list | None = None
    prunekit_base_model_type: str = "bert"
    prunekit_hidden_size: int | None = None


class PrunekitRobertaConfig(RobertaConfig):
    """RobertaConfig plus prunekit's per-layer widths, as PrunekitBertConfig."""

    model_type = "prunekit_roberta"
    prunekit_layers: list | None = None
    prunekit_base_model_type: str = "roberta"
    prunekit_hidden_size: int | None = None


class PrunekitDistilBertConfig(DistilBertConfig):
    """DistilBertConfig plus prunekit's per-layer widths, as PrunekitBertConfig."""

    model_type = "prunekit_distilbert"
    prunekit_layers: list | None = None
    prunekit_base_model_type: str = "distilbert"
    prunekit_hidden_size: int | None = None
