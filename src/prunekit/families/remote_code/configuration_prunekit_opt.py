"""The configuration of an OPT model pruned by prunekit, for loading without prunekit.

Copied into every pruned OPT folder next to ``modeling_prunekit_opt.py``; ``config.json``'s
``auto_map`` names both, so that plain transformers rebuilds the pruned model where prunekit is
not installed (``AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True)``). It must
not import prunekit.
"""

from transformers import OPTConfig


class PrunekitOPTConfig(OPTConfig):
    """OPTConfig plus the per-layer widths (``prunekit_layers``) and the narrowed residual width
    (``prunekit_hidden_size``, None when not narrowed)."""

    model_type = "prunekit_opt"
    prunekit_layers: list | None = None
    prunekit_base_model_type: str = "opt"
    prunekit_hidden_size: int | None = None
