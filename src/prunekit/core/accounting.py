"""FLOPs and size accounting (spec kprune_kwon.md §2), the same for every method and for pruned
and unpruned models.

Costs are per sequence of length s. Per attention head (d hidden, d_h head size)::

    MACs = 3·s·d·d_h   (Q, K, V)  +  2·s²·d_h   (QKᵀ and attention × V)  +  s·d_h·d   (output)

when every query head has its own key and value head (the family's ``grouped_kv`` is False: BERT).
Under grouped-query attention a query head costs ``s·d·d_h + 2·s²·d_h + s·d_h·d`` and each kept
key/value head ``2·s·d·d_h`` (its K and V rows), counted once however many query heads read it.
Per FFN neuron ``2·s·d`` MACs (FFN-in row and FFN-out column; 3·s·d with a gate). FLOPs are
2 × MACs, as Kprune counts them. Embeddings, pooler, task head, LayerNorm, softmax, activations,
bias and residual adds are left out, so "FLOPs kept" is relative to the prunable encoder compute,
as in both papers. d is the model's current residual width (narrowed by CoFi, or the config's);
the unpruned reference (:func:`full_flops`) always uses the config's. A removed sublayer costs 0.

Parameters: :func:`count_params` counts every parameter (a tied output head once); :func:`count_prunable_params`
counts what CoFi's sparsity is measured against (cofi.md §8 pitfall 15, the L0 module's convention): the
weights and biases of the q/k/v/out and FFN linears only (biases where the family has them), no norms,
embeddings, pooler or head.
"""

from __future__ import annotations

from dataclasses import dataclass

from prunekit.core.errors import ConfigError
from prunekit.core.view import LayerShape, ModelAdapter


@dataclass(frozen=True)
class UnitCosts:
    """FLOPs of one (query) head, one key/value head and one neuron of a layer at ``seq_len``.

    ``kv_head`` is 0 for families whose query heads each own their key/value head: ``head`` then
    includes its K and V rows, since they go with it.
    """

    head: float
    neuron: float
    kv_head: float = 0.0


def unit_costs(adapter: ModelAdapter, layer: int, seq_len: float, hidden_size: int | None = None) -> UnitCosts:
    """Per-head, per-key/value-head and per-neuron FLOPs of ``layer`` (the same for every unit of a
    type) at residual width ``hidden_size``: by default the model's current one, so a narrowed
    model's units are cheaper; :func:`full_flops` passes the unpruned width."""
    s, d_h = float(seq_len), adapter.head_dim
    d = adapter.hidden_size if hidden_size is None else hidden_size
    neuron_macs = (3 if adapter.facts.gated_ffn else 2) * s * d
    if not adapter.grouped_kv:
        head_macs = 3 * s * d * d_h + 2 * s * s * d_h + s * d_h * d
        return UnitCosts(head=2 * head_macs, neuron=2 * neuron_macs)
    head_macs = s * d * d_h + 2 * s * s * d_h + s * d_h * d
    return UnitCosts(head=2 * head_macs, neuron=2 * neuron_macs, kv_head=2 * (2 * s * d * d_h))


def attention_flops(shape: LayerShape, cost: UnitCosts) -> float:
    """FLOPs of an attention sublayer of ``shape``: its query heads and, under grouped-query
    attention, its key/value heads."""
    flops = shape.num_heads * cost.head
    if shape.num_kv_heads:
        flops += shape.num_kv_heads * cost.kv_head
    return flops


def kv_head_flops(costs: list[UnitCosts], adapter: ModelAdapter) -> float:
    """The cost of every key/value head of the unpruned architecture, given per-layer unit costs;
    0 for families whose query heads own their key/value heads (counted in ``head``). The methods
    reserve it out of their budget (:func:`query_and_neuron_budget`)."""
    return sum(adapter.full_num_kv_heads * cost.kv_head for cost in costs)


def query_and_neuron_budget(keep: float, full_cost: float, kv_cost: float) -> float:
    """The budget left for the query heads and FFN neurons a method keeps, ``keep · full_cost −
    kv_cost``, when it may keep ``keep`` of ``full_cost``, the cost of the unpruned architecture
    with its key/value heads (``kv_cost`` of it, :func:`kv_head_flops`).

    Key/value heads are kept whole in this release: no search prices them (Kprune, Kwon et al.
    and the baselines score query heads and neurons), so their full cost is reserved. The key/value
    heads a method keeps then cost no more than all of them do and the counted FLOPs still meet the
    budget (a group whose query heads all go takes its key/value head with it, which only saves
    more). ``kv_cost`` is 0 where query heads own their key/value heads (counted in their cost) and
    under a latency budget (a latency table has no separate price for key/value heads). The caller sums
    ``full_cost`` in its own order, so that a method's budget stays the same to the last bit.
    """
    return keep * full_cost - kv_cost


def layer_flops(adapter: ModelAdapter, seq_len: float) -> list[dict[str, float]]:
    """Per layer: kept heads and neurons and their FLOPs at ``seq_len``; a removed sublayer has 0
    units and is flagged (``attention_removed`` / ``ffn_removed``, only when set)."""
    rows = []
    for layer, shape in enumerate(adapter.layer_shapes()):
        cost = unit_costs(adapter, layer, seq_len)
        row = {
            "heads": shape.num_heads,
            "neurons": shape.intermediate_size,
            "attn_flops": attention_flops(shape, cost),
            "ffn_flops": shape.intermediate_size * cost.neuron,
        }
        if shape.attention_removed:
            row["attention_removed"] = True
        if shape.ffn_removed:
            row["ffn_removed"] = True
        rows.append(row)
    return rows


def count_flops(adapter: ModelAdapter, seq_len: float = 128.0) -> float:
    """Encoder FLOPs (heads + FFN neurons) of one sequence of length ``seq_len``.

    Works for any supported model, pruned or not. ``seq_len`` may be fractional (a mean length).
    """
    if seq_len <= 0:
        raise ValueError(f"seq_len must be positive, got {seq_len}")
    return float(sum(row["attn_flops"] + row["ffn_flops"] for row in layer_flops(adapter, seq_len)))


def full_flops(adapter: ModelAdapter, seq_len: float = 128.0) -> float:
    """FLOPs of the unpruned architecture of the adapter's model (every head and neuron of the config, at
    the config's hidden size), so "FLOPs kept" compares against the teacher also after narrowing."""
    full = adapter.full_layer_shape()
    total = 0.0
    for layer in range(adapter.num_layers):
        cost = unit_costs(adapter, layer, seq_len, hidden_size=adapter.full_hidden_size)
        total += attention_flops(full, cost) + full.intermediate_size * cost.neuron
    return total


def count_params(adapter: ModelAdapter, encoder_only: bool = False) -> int:
    """Number of parameters; with ``encoder_only`` only those of the transformer layers."""
    module = adapter.layers() if encoder_only else adapter.model
    return sum(p.numel() for p in module.parameters())


def count_prunable_params(adapter: ModelAdapter) -> int:
    """Weights and biases of every layer's q/k/v/out and FFN linears, as the model is now.

    What CoFi's sparsity is measured against (its L0 module's M, cofi.md §8 pitfall 15): no
    LayerNorms, embeddings, pooler or task head. An emptied sublayer still counts its kept output
    bias (d, it is still added); a removed one counts 0.
    """
    total = 0
    for layer in range(adapter.num_layers):
        attn, ffn = adapter.attention(layer), adapter.ffn(layer)
        linears = []
        if attn is not None:
            linears += [attn.query, attn.key, attn.value, attn.out]
        if ffn is not None:
            linears += [ffn.up, ffn.down] + ([ffn.gate] if ffn.gate is not None else [])
        total += sum(p.numel() for linear in linears for p in linear.parameters())
        for kind, parts in (("attn", attn), ("ffn", ffn)):
            bias = adapter.sublayer_bias(layer, kind) if parts is None else None
            if bias is not None:  # an emptied sublayer's kept output bias
                total += bias.numel()
    return total


def full_prunable_params(adapter: ModelAdapter) -> int:
    """:func:`count_prunable_params` of the unpruned architecture, from the config's widths and the
    family's facts: per layer d·H·d_h (Q) + 2·d·H_kv·d_h (K, V) + H·d_h·d (out) and d·d_ff per FFN
    matrix (up, down, and the gate of a gated FFN), plus each projection's bias where the family
    has one (BERT: 3·(d·H·d_h + H·d_h) + H·d_h·d + d and 2·d·d_ff + d_ff + d; with H·d_h = d,
    L·(4d² + 4d) + L·(2·d·d_ff + d + d_ff), 85,017,600 for BERT-base)."""
    facts = adapter.facts
    d, d_ff = adapter.full_hidden_size, adapter.full_intermediate_size
    width = adapter.full_num_heads * adapter.head_dim  # H·d_h
    kv_width = adapter.full_num_kv_heads * adapter.head_dim  # H_kv·d_h
    outputs = {"query": width, "key": kv_width, "value": kv_width, "out": d, "up": d_ff, "gate": d_ff, "down": d}
    ffn_matrices = ("up", "gate", "down") if facts.gated_ffn else ("up", "down")
    weights = d * width + 2 * d * kv_width + width * d + len(ffn_matrices) * d * d_ff
    biases = sum(outputs[name] for name in ("query", "key", "value", "out", *ffn_matrices) if facts.has_bias(name))
    return adapter.num_layers * (weights + biases)


# ---- the non-embedding parameter budget (keep_params of the retraining-free methods) ----------------
def count_non_embedding_params(adapter: ModelAdapter) -> int:
    """Parameters of the model outside its embedding tables and its vocabulary
    output head, the convention of LLM pruning results ("20% of parameters removed" counts no
    embeddings): every layer (norms included), the final norm, a pooler and a classifier head. A
    tied output head is the word embedding table and is not counted twice; an untied vocabulary
    head is left out too."""
    model = adapter.model
    embedding = {id(p) for table in adapter.embedding_tables() for p in table.parameters()}
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if head is not None:
        embedding |= {id(p) for p in head.parameters()}
    seen: set[int] = set()
    total = 0
    for p in model.parameters():  # parameters() yields a shared (tied) tensor once
        if id(p) not in embedding and id(p) not in seen:
            seen.add(id(p))
            total += p.numel()
    return total


def param_unit_costs(adapter: ModelAdapter) -> UnitCosts:
    """Parameters of one query head, one key/value head and one FFN neuron, from the family's facts
    at the model's current hidden size: a query head owns its d_h rows of Q (and their biases) and
    d_h columns of the output projection; a key/value head its rows of K and V (with biases) under
    grouped-query attention, else they go with the query head; a neuron its row of the FFN input
    (and gate) with biases and its column of the FFN output. Removing a unit removes exactly these
    (surgery drops a key/value head only when no query head reads it)."""
    facts, d, d_h = adapter.facts, adapter.hidden_size, adapter.head_dim
    own = d * d_h + d_h * d + (d_h if facts.has_bias("query") else 0)  # Q rows (+ bias), out columns
    kv = 2 * d * d_h + d_h * (facts.has_bias("key") + facts.has_bias("value"))
    ins = ("up", "gate") if facts.gated_ffn else ("up",)
    neuron = len(ins) * d + d + sum(facts.has_bias(name) for name in ins)
    if not adapter.grouped_kv:
        return UnitCosts(head=float(own + kv), neuron=float(neuron))
    return UnitCosts(head=float(own), neuron=float(neuron), kv_head=float(kv))


def params_unit_budget(adapter: ModelAdapter, keep: float) -> tuple[UnitCosts, float]:
    """Per-unit parameter costs and the budget, in parameters, left for the query heads and FFN
    neurons a method keeps, so that the non-embedding parameters kept are at most ``keep`` of the
    model's: ``keep · N − (N − P_units) − P_kv``, where N is :func:`count_non_embedding_params`,
    P_units the parameters of every current query head and neuron, and P_kv those of every current
    key/value head, reserved in full (key/value heads are not search units in this release; see
    :func:`kv_head_flops`; a group whose query heads all go takes its key/value head with it, which
    only saves more)."""
    cost = param_unit_costs(adapter)
    total = count_non_embedding_params(adapter)
    heads = sum(shape.num_heads for shape in adapter.layer_shapes())
    neurons = sum(shape.intermediate_size for shape in adapter.layer_shapes())
    units = heads * cost.head + neurons * cost.neuron
    # Everything but the searched units stays (key/value heads included): the units must shed
    # (1 - keep) · N on their own.
    return cost, units - (1.0 - keep) * total


def budget_kind_of(config: object) -> str:
    """"params", "latency" or "flops": which budget a method config carries."""
    if getattr(config, "keep_params", None) is not None:
        return "params"
    return "latency" if getattr(config, "keep_latency", None) is not None else "flops"


def check_budget(keep_flops: float, keep_latency: float | None, lut: str | None, seq_len: float | None,
                 keep_params: float | None = None) -> None:
    """Validate a method config's budget fields, with messages that say how to fix them."""
    if keep_params is not None:
        if not 0.0 < keep_params <= 1.0:
            raise ConfigError(f"keep_params must be in (0, 1] (the fraction of non-embedding parameters kept), "
                              f"got {keep_params}")
        if keep_latency is not None:
            raise ConfigError("give either keep_params or keep_latency, not both: a pruning has one budget")
    if not 0.0 < keep_flops <= 1.0:
        raise ConfigError(f"keep_flops must be in (0, 1] (the fraction of FLOPs kept), got {keep_flops}")
    if keep_latency is not None:
        if not 0.0 < keep_latency <= 1.0:
            raise ConfigError(f"keep_latency must be in (0, 1] (the fraction of latency kept), got {keep_latency}")
        if lut is None:
            raise ConfigError("a latency budget needs a latency table: measure one with "
                              "`prunekit lut --model DIR --out lut.json` and pass lut='lut.json'")
    if seq_len is not None and seq_len <= 0:
        raise ConfigError(f"seq_len must be positive, got {seq_len}")
