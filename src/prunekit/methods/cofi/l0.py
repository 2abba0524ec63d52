"""Hard-concrete (L0) gates for every granularity CoFi prunes (cofi.md §2).

One free parameter ``log α`` per gate. In training a gate is *sampled* with the reparameterisation

    u ~ U(ε, 1-ε),  s = σ((log u − log(1−u) + log α) / β),  z = clamp(s·(r − l) + l, 0, 1)

so it is exactly 0 or exactly 1 with positive probability and still passes gradients to log α; at
evaluation it is *deterministic* (per group, the expected number of closed gates is closed, the
others keep a soft value). The keep probability P(z > 0) = σ(log α − β·log(−l/r)) is what the
expected model size (and the Lagrangian on it) is made of.

Groups (a layer with a removed sublayer has none for it):

- ``head[l]`` (H_l,), ``mha[l]`` (1,): attention heads and the whole attention sublayer;
- ``neuron[l]`` (d_ff_l,), ``ffn[l]`` (1,): FFN neurons and the whole FFN sublayer;
- ``hidden`` (d,): hidden dimensions, shared by the embeddings and every layer.

The module holds only gate parameters; how the values act on a model is ``prunekit.core.masks``'s job.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn

# Stretch limits, temperature and clamping of the reference implementation (cofi.md §2).
LIMIT_L, LIMIT_R = -0.1, 1.1
TEMPERATURE = 2.0 / 3.0
EPS = 1e-6
LOG_ALPHA_MIN, LOG_ALPHA_MAX = math.log(0.01), math.log(100.0)
# The deterministic soft value is σ(0.8 · log α / β); 0.8 comes from the FLOP hard-concrete code.
SOFT_FACTOR = 0.8


@dataclass
class GateValues:
    """One set of gate values for a whole model, sampled or deterministic.

    Lists are per layer; an entry is None where the sublayer has no gates (removed). ``mha[l]``
    and ``ffn[l]`` are 0-d tensors. ``attn_on``/``ffn_on`` say whether the sublayer contributes
    at all (its layer gate is non-zero and at least one of its units is): plain bools, computed
    once per step so that no hook needs a device-to-host sync.
    """

    head: list[torch.Tensor | None]
    mha: list[torch.Tensor | None]
    neuron: list[torch.Tensor | None]
    ffn: list[torch.Tensor | None]
    hidden: torch.Tensor | None
    attn_on: list[bool]
    ffn_on: list[bool]


def keep_probability(log_alpha: torch.Tensor) -> torch.Tensor:
    """P(z > 0) = 1 − Q(z ≤ 0 | α), elementwise."""
    return 1.0 - closed_probability(log_alpha)


def closed_probability(log_alpha: torch.Tensor) -> torch.Tensor:
    """Q(z ≤ 0 | α): the probability that a gate is exactly closed, clamped to [ε, 1−ε]."""
    x0 = (0.0 - LIMIT_L) / (LIMIT_R - LIMIT_L)  # 1/12
    logits = TEMPERATURE * math.log(x0 / (1.0 - x0)) - log_alpha
    return torch.sigmoid(logits).clamp(EPS, 1.0 - EPS)


def sample_gate(log_alpha: torch.Tensor) -> torch.Tensor:
    """One hard-concrete sample per entry (differentiable in log α)."""
    u = torch.rand(log_alpha.shape, device=log_alpha.device, dtype=torch.float32).clamp(EPS, 1.0 - EPS)
    s = torch.sigmoid((torch.log(u) - torch.log1p(-u) + log_alpha.float()) / TEMPERATURE)
    return (s * (LIMIT_R - LIMIT_L) + LIMIT_L).clamp(0.0, 1.0)


def deterministic_gate(log_alpha: torch.Tensor, binary: bool = False) -> torch.Tensor:
    """The evaluation value of one group: the round(Σ Q) gates with the smallest log α are 0, the
    others keep σ(0.8 · log α / β) (or 1 with ``binary``)."""
    log_alpha = log_alpha.detach().float()
    closed = int(round(float(closed_probability(log_alpha).sum())))
    values = torch.ones_like(log_alpha) if binary else torch.sigmoid(SOFT_FACTOR * log_alpha / TEMPERATURE)
    if closed > 0:
        order = torch.argsort(log_alpha, stable=True)  # ties: the lower index closes first
        values[order[:closed]] = 0.0
    return values


class CofiGates(nn.Module):
    """Every gate of a model, for the widths it has now.

    Args:
        heads, neurons: per layer, the head count and FFN width (0 for a removed or empty sublayer,
            which then gets no gates).
        hidden_size: the residual width; ``prune_hidden=False`` leaves it ungated.
        init: mean of the initial log α (cofi.md §2: 10, clamped to log 100 after the first step).
        neuron_init: mean for FFN neurons; the reference starts them at 0 (P(keep) ≈ 0.83), which its
            authors call "mostly a typo"; kept as the default because it is what the published
            results used.
    """

    def __init__(
        self,
        heads: Sequence[int],
        neurons: Sequence[int],
        hidden_size: int,
        prune_hidden: bool = True,
        prune_layers: bool = True,
        init: float = 10.0,
        neuron_init: float = 0.0,
        init_std: float = 0.01,
    ) -> None:
        super().__init__()
        if len(heads) != len(neurons):
            raise ValueError(f"{len(heads)} head counts but {len(neurons)} FFN widths")

        def param(n: int, mean: float) -> nn.Parameter:
            return nn.Parameter(torch.randn(n) * init_std + mean)

        self.num_layers = len(heads)
        self.head = nn.ParameterList([param(h, init) for h in heads])
        self.neuron = nn.ParameterList([param(n, neuron_init) for n in neurons])
        # Whole-sublayer gates exist only where the sublayer has units; ungated layers use size 0.
        self.mha = nn.ParameterList([param(1 if prune_layers and h else 0, init) for h in heads])
        self.ffn = nn.ParameterList([param(1 if prune_layers and n else 0, init) for n in neurons])
        self.hidden = param(hidden_size if prune_hidden else 0, init)

    def groups(self) -> list[torch.Tensor]:
        return [*self.head, *self.neuron, *self.mha, *self.ffn, self.hidden]

    @torch.no_grad()
    def clamp_(self) -> None:
        """Keep every log α in [log 0.01, log 100] (after each optimiser step, cofi.md §2)."""
        for log_alpha in self.groups():
            log_alpha.clamp_(LOG_ALPHA_MIN, LOG_ALPHA_MAX)

    # ---- values ---------------------------------------------------------------------------------
    def sample(self) -> GateValues:
        """A training sample of every gate (one per forward pass, shared by the batch)."""
        return self._values(sample_gate, lambda la: sample_gate(la))

    def deterministic(self) -> GateValues:
        """Evaluation values. Hidden gates are binarised (kept dims are exactly 1): a narrowed
        LayerNorm can then reproduce the gated one exactly (cofi.md §8, pitfall 4); head, neuron
        and layer gates keep soft values, which surgery folds into the weights."""
        return self._values(deterministic_gate, lambda la: deterministic_gate(la, binary=True))

    def _values(self, unit_fn, hidden_fn) -> GateValues:
        def unit(log_alpha: torch.Tensor) -> torch.Tensor | None:
            return unit_fn(log_alpha) if log_alpha.numel() else None

        def layer(log_alpha: torch.Tensor) -> torch.Tensor | None:
            return unit_fn(log_alpha)[0] if log_alpha.numel() else None  # () from (1,)

        head = [unit(g) for g in self.head]
        neuron = [unit(g) for g in self.neuron]
        mha = [layer(g) for g in self.mha]
        ffn = [layer(g) for g in self.ffn]
        hidden = hidden_fn(self.hidden) if self.hidden.numel() else None
        return GateValues(
            head=head, mha=mha, neuron=neuron, ffn=ffn, hidden=hidden,
            attn_on=[_on(units, gate) for units, gate in zip(head, mha, strict=True)],
            ffn_on=[_on(units, gate) for units, gate in zip(neuron, ffn, strict=True)],
        )  # fmt: skip

    # ---- expected size ---------------------------------------------------------------------------
    def expected_counts(self) -> dict[str, object]:
        """Differentiable expected counts: per layer E[kept heads] and E[kept neurons] (each times
        its layer gate's keep probability, gates taken as independent), and E[kept hidden dims]."""
        heads, neurons = [], []
        for layer in range(self.num_layers):
            h = keep_probability(self.head[layer]).sum() if self.head[layer].numel() else self.hidden.new_zeros(())
            n = keep_probability(self.neuron[layer]).sum() if self.neuron[layer].numel() else self.hidden.new_zeros(())
            if self.mha[layer].numel():
                h = h * keep_probability(self.mha[layer])[0]
            if self.ffn[layer].numel():
                n = n * keep_probability(self.ffn[layer])[0]
            heads.append(h)
            neurons.append(n)
        hidden = keep_probability(self.hidden).sum() if self.hidden.numel() else None
        return {"heads": heads, "neurons": neurons, "hidden": hidden}


def _on(units: torch.Tensor | None, gate: torch.Tensor | None) -> bool:
    if units is None:
        return False
    if gate is not None and float(gate.detach()) == 0.0:
        return False
    return bool((units.detach() != 0).any())
