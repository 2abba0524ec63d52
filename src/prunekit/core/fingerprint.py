"""Who a plan was made on: a teacher's family, class, architecture and weights, recorded in the plan
(``plan.json``'s ``teacher``) so that replaying it on another model is refused, not silently done.

- ``config``: the architecture-defining fields of the config that the model has (sizes, counts,
  activation, norm epsilon, positions, rope, prunekit's pruned widths, the number of labels), and
  ``config_sha256``, their digest;
- ``weights_sha256``: sha256 over the state dict, key by key in sorted order: each key, dtype and
  shape, then the tensor's bytes. Floating tensors are hashed as float32, so the same teacher held
  in bfloat16 or float16 and loaded in float32 has the same digest (the widening is exact). One
  tensor at a time is brought to the CPU: the state dict is never copied whole.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any

import torch
from torch import nn

from prunekit.core.view import ModelAdapter

# Present ones only; names differ by family (BERT hidden_size, DistilBERT dim, GPT-2 n_embd, ...).
ARCHITECTURE_FIELDS = (
    "model_type", "prunekit_base_model_type", "prunekit_layers", "prunekit_hidden_size",
    "vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
    "intermediate_size", "head_dim", "max_position_embeddings", "type_vocab_size", "hidden_act",
    "layer_norm_eps", "rms_norm_eps", "position_embedding_type", "tie_word_embeddings", "rope_theta",
    "rope_scaling", "rope_parameters", "attention_bias", "mlp_bias", "dim", "n_layers", "n_heads",
    "hidden_dim", "activation", "sinusoidal_pos_embds", "n_embd", "n_layer", "n_head", "n_inner",
    "n_positions", "activation_function", "layer_norm_epsilon", "ffn_dim", "word_embed_proj_dim",
    "do_layer_norm_before", "enable_bias", "use_qk_norm", "sliding_window", "layer_types",
    # Gemma 2/3: what the stock modules compute with besides the widths
    "hidden_activation", "query_pre_attn_scalar", "attn_logit_softcapping", "final_logit_softcapping",
    "use_bidirectional_attention",
)


def config_fields(config: Any) -> dict[str, Any]:
    """The architecture-defining fields of ``config`` (JSON values), with its number of labels."""
    values = config.to_dict()
    fields = {name: values[name] for name in ARCHITECTURE_FIELDS if name in values}
    num_labels = getattr(config, "num_labels", None)
    if num_labels is not None:
        fields["num_labels"] = num_labels
    return json.loads(json.dumps(fields, sort_keys=True, default=str))


def _sha256(value: Any) -> str:
    return hashlib.sha256(json.dumps(value, sort_keys=True, default=str).encode()).hexdigest()


def weights_digest(model: nn.Module) -> str:
    """sha256 over ``model``'s state dict (see the module's docstring)."""
    sha = hashlib.sha256()
    state = model.state_dict()
    for key in sorted(state):
        tensor = state[key].detach()
        if tensor.is_floating_point():
            tensor = tensor.to(torch.float32)
        tensor = tensor.to("cpu").contiguous()
        sha.update(f"{key}\0{str(tensor.dtype).removeprefix('torch.')}\0{tuple(tensor.shape)}\0".encode())
        sha.update(tensor.reshape(-1).view(torch.uint8).numpy().data)
    return sha.hexdigest()


def teacher_fingerprint(view: ModelAdapter) -> dict[str, Any]:
    """What a plan records of the teacher it was made on."""
    fields = config_fields(view.model.config)
    return {"family": view.family, "class": type(view.model).__name__, "config": fields,
            "config_sha256": _sha256(fields), "weights_sha256": weights_digest(view.model)}


def teacher_differences(recorded: dict[str, Any], actual: dict[str, Any]) -> list[str]:
    """What differs between the teacher a plan records and ``actual`` (both as from
    :func:`teacher_fingerprint`), in words; empty when they are the same."""
    differences = []
    for key, what in (("family", "family"), ("class", "class")):
        if key in recorded and recorded[key] != actual[key]:
            differences.append(f"{what} {recorded[key]} (plan) vs {actual[key]} (model)")
    if "config_sha256" in recorded and recorded["config_sha256"] != actual["config_sha256"]:
        old, new = recorded.get("config") or {}, actual["config"]
        changed = [f"{name} {old.get(name)!r} vs {new.get(name)!r}" for name in sorted(set(old) | set(new))
                   if old.get(name) != new.get(name)]
        differences.append("config " + (", ".join(changed[:4]) if changed else "digest"))
    if "weights_sha256" in recorded and recorded["weights_sha256"] != actual["weights_sha256"]:
        differences.append(f"weights (sha256 {str(recorded['weights_sha256'])[:12]}... vs "
                           f"{actual['weights_sha256'][:12]}...)")
    return differences
