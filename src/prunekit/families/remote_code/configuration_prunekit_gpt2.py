"""The configuration of a GPT-2 model pruned by prunekit, for loading without prunekit.

Copied into every pruned GPT-2 folder next to ``modeling_prunekit_gpt2.py``; ``config.json``'s
``auto_map`` names both, so that plain transformers rebuilds the pruned model where prunekit is
not installed (``AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True)``). It must
not import prunekit.
"""

from transformers import GPT2Config


class PrunekitGPT2Config(GPT2Config):
    """GPT2Config plus the per-layer widths (``prunekit_layers``) and the narrowed residual width
    (``prunekit_hidden_size``, None when not narrowed)."""

    model_type = "prunekit_gpt2"
    prunekit_layers: list | None = None
    prunekit_base_model_type: str = "gpt2"
    prunekit_hidden_size: int | None = None
