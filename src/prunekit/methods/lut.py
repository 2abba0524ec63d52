"""Latency lookup tables and their piecewise-linear fit (spec kprune_kwon.md §3.4, P10).

A table holds the measured latency of one attention sublayer with n = 0..H heads and of one FFN
sublayer with n neurons (n in steps up to d_ff), on the current device at one batch size and
sequence length. Each is measured on a copy of one encoder layer, made narrower by prunekit's own
surgery: the other sublayer of that layer is emptied, and the time of the layer with both
sublayers empty (the residual adds and LayerNorms that remain) is subtracted, so n = 0 costs 0.

The fit (``fit_piecewise``) is the reference's shape: a constant c once the sublayer keeps any
unit, covering the first t units, then a slope per further unit::

    cost(0) = 0,    cost(n) = c + slope · max(0, n − t)

t is chosen among the measured counts by the smallest squared error, starting from an infinite
error (the reference starts at 10000, so on a slow CPU no threshold was ever chosen; P10). c is
the mean of the measurements up to t and the slope a least-squares fit of the excess over c, both
clamped at 0, so the fitted cost never decreases with n.

Tables are saved as JSON (``LatencyTable.save``/``load``) and turned into the per-sublayer costs
of ``prunekit.methods.search`` by ``LatencyTable.costs``; ``sublayer_costs`` picks FLOPs or latency costs
for a method.
"""

from __future__ import annotations

import copy
import json
import logging
import math
import statistics
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from prunekit.core.accounting import UnitCosts, unit_costs
from prunekit.core.errors import ConfigError, ModelError
from prunekit.core.surgery import prune_heads, prune_neurons
from prunekit.core.view import ModelAdapter
from prunekit.families import pruning_view
from prunekit.methods.search import SublayerCost, SublayerId, flops_costs

logger = logging.getLogger(__name__)

FORMAT = "prunekit-lut/1"


@dataclass
class LatencyTable:
    """Measured sublayer latencies (ms) by kept unit count, with what they were measured for."""

    attn_units: list[int]  # 0..H
    attn_ms: list[float]
    ffn_units: list[int]  # 0, step, 2·step, ..., d_ff
    ffn_ms: list[float]
    hidden_size: int
    head_dim: int
    num_heads: int
    intermediate_size: int
    batch_size: int
    seq_len: int
    device: str
    threads: int
    meta: dict[str, Any] = field(default_factory=dict)  # model type, empty-layer time, repeats, versions

    def fits(self) -> dict[str, SublayerCost]:
        """The fitted cost function of each sublayer type: {"attn": ..., "ffn": ...}."""
        return {"attn": fit_piecewise(self.attn_units, self.attn_ms),
                "ffn": fit_piecewise(self.ffn_units, self.ffn_ms)}

    def check(self, adapter: ModelAdapter) -> None:
        """Raise ConfigError unless the table was measured for this architecture."""
        expected = {"hidden_size": adapter.hidden_size, "head_dim": adapter.head_dim,
                    "num_heads": adapter.full_num_heads, "intermediate_size": adapter.full_intermediate_size}
        wrong = {k: (getattr(self, k), v) for k, v in expected.items() if getattr(self, k) != v}
        if wrong:
            detail = ", ".join(f"{k} {table} in the table, {model} in the model" for k, (table, model) in wrong.items())
            raise ConfigError(f"the latency table does not fit this model ({detail}); "
                              "measure one for it with `prunekit lut --model DIR --out FILE`")

    def costs(self, adapter: ModelAdapter) -> dict[SublayerId, SublayerCost]:
        """The fitted latency cost of every sublayer of ``adapter``'s model (the same for all layers)."""
        self.check(adapter)
        fits = self.fits()
        return {(kind, layer): fits[kind] for layer in range(adapter.num_layers) for kind in ("attn", "ffn")}

    def to_dict(self) -> dict[str, Any]:
        return {"format": FORMAT, **asdict(self), "fit": {kind: asdict(fit) for kind, fit in self.fits().items()}}

    def save(self, path: str | Path, overwrite: bool = False, inputs: Sequence[str | Path | None] = ()) -> Path:
        """Write the table as JSON, atomically: a new file (``overwrite`` replaces one), never onto
        or inside ``inputs`` (the model folder) (:func:`prunekit.io.outdir.write_output_file`)."""
        from prunekit.io.outdir import write_output_file

        return write_output_file(path, json.dumps(self.to_dict(), indent=2) + "\n", overwrite, inputs, "--out")

    @classmethod
    def load(cls, path: str | Path) -> LatencyTable:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"latency table {path} does not exist; make one with `prunekit lut --model DIR --out {path}`")
        try:
            data = json.loads(path.read_text())
        except json.JSONDecodeError as err:
            raise ConfigError(f"latency table {path} is not valid JSON ({err})") from err
        if data.get("format") != FORMAT:
            raise ConfigError(f"{path} is not a prunekit latency table (format {data.get('format')!r}, expected {FORMAT!r})")
        names = {f for f in cls.__dataclass_fields__}
        return cls(**{k: v for k, v in data.items() if k in names})


def fit_piecewise(units: list[int], ms: list[float]) -> SublayerCost:
    """Fit ``cost(n) = c + slope · max(0, n − t)`` (n ≥ 1; cost(0) = 0) to a measured table.

    Returns the fit as a ``SublayerCost(slope, const=c, free=t)``; see the module docstring.
    """
    points = sorted((int(n), float(y)) for n, y in zip(units, ms, strict=True) if n > 0)
    if not points:
        raise ValueError("a latency table needs at least one measurement with n > 0")
    best: tuple[float, SublayerCost] | None = None
    for threshold, _ in points:
        flat = [y for n, y in points if n <= threshold]
        const = max(0.0, sum(flat) / len(flat))
        rest = [(n - threshold, y - const) for n, y in points if n > threshold]
        denominator = sum(dn * dn for dn, _ in rest)
        slope = max(0.0, sum(dn * dy for dn, dy in rest) / denominator) if denominator else 0.0
        fit = SublayerCost(slope=slope, const=const, free=threshold)
        error = sum((fit(n) - y) ** 2 for n, y in points)
        if best is None or error < best[0]:  # starts from no fit at all (infinite error), P10
            best = (error, fit)
    return best[1]


def sublayer_costs(adapter: ModelAdapter, seq_len: float, lut: str | Path | LatencyTable | None = None
                   ) -> dict[SublayerId, SublayerCost]:
    """FLOPs costs at ``seq_len``, or, with a latency table (or its JSON path), its fitted latencies."""
    if lut is None:
        return flops_costs(adapter, seq_len)
    table = lut if isinstance(lut, LatencyTable) else LatencyTable.load(lut)
    return table.costs(adapter)


def per_unit_costs(adapter: ModelAdapter, seq_len: float, lut: str | Path | LatencyTable | None = None
                   ) -> list[UnitCosts]:
    """Per layer, the cost of one head and of one neuron, for methods that score unit by unit
    (Kprune): FLOPs at ``seq_len`` (spec §2), or with a latency table each sublayer type's fitted
    full-width latency spread evenly over its units. The fitted constant is shared out this way, so
    a partly pruned sublayer can take somewhat longer than the sum of its units."""
    if lut is None:
        return [unit_costs(adapter, layer, seq_len) for layer in range(adapter.num_layers)]
    table = lut if isinstance(lut, LatencyTable) else LatencyTable.load(lut)
    table.check(adapter)
    fits = table.fits()
    heads, neurons = adapter.full_num_heads, adapter.full_intermediate_size
    unit = UnitCosts(head=fits["attn"](heads) / heads, neuron=fits["ffn"](neurons) / neurons)
    return [unit] * adapter.num_layers


# ---- measuring ---------------------------------------------------------------------------------------
def _median_ms(fn, device: torch.device, warmup: int, repeats: int) -> float:
    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    for _ in range(warmup):
        fn()
    sync()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        sync()
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


def measure_latency_table(
    model: nn.Module,
    batch_size: int = 32,
    seq_len: int = 128,
    device: str | torch.device | None = None,
    neuron_step: int = 64,
    warmup: int = 3,
    repeats: int = 10,
    threads: int | None = None,
    seed: int = 0,
) -> LatencyTable:
    """Measure the latency table of ``model``'s encoder layer on ``device``.

    Args:
        model: an unpruned model of a supported family (layer 0 must have all heads and neurons).
        batch_size, seq_len: the input shape the table is for, (batch_size, seq_len, d).
        neuron_step: FFN widths measured are 0, step, 2·step, ... and always d_ff itself.
        warmup, repeats: untimed and timed calls per point; the median is kept.
        threads: CPU threads while measuring (default: torch's current setting).
    Returns:
        The table; ``.save(path)`` writes it as JSON.
    """
    if batch_size < 1 or seq_len < 1 or neuron_step < 1 or repeats < 1 or warmup < 0:
        raise ConfigError("batch_size, seq_len, neuron_step and repeats must be >= 1 and warmup >= 0")
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    adapter = pruning_view(model)  # a caller's model is never changed
    num_heads, width = adapter.full_num_heads, adapter.full_intermediate_size
    attn, ffn = adapter.attention(0), adapter.ffn(0)
    if attn is None or ffn is None or attn.num_heads != num_heads or ffn.width != width:
        raise ModelError("a latency table must be measured on an unpruned model (layer 0 has been pruned); "
                         "pass the teacher")
    probe_adapter = adapter.of(copy.deepcopy(adapter.model).to(device).eval())
    layers = probe_adapter.layers()
    template = layers[0]
    del layers[1:]  # one layer is all that is timed
    generator = torch.Generator().manual_seed(seed)
    hidden = torch.randn(batch_size, seq_len, adapter.hidden_size, generator=generator).to(device)  # (B, T, d)

    def time_layer(heads: int, neurons: int) -> float:
        layers[0] = copy.deepcopy(template)
        prune_heads(probe_adapter, 0, range(heads))
        prune_neurons(probe_adapter, 0, range(neurons))
        block = layers[0]
        return _median_ms(lambda: probe_adapter.call_layer(block, hidden), device, warmup, repeats)

    threads_before = torch.get_num_threads()
    threads = threads or threads_before
    neuron_units = sorted({*range(0, width, neuron_step), width})
    try:
        torch.set_num_threads(threads)
        with torch.inference_mode():
            empty = time_layer(0, 0)
            attn_ms = [0.0] + [max(0.0, time_layer(n, 0) - empty) for n in range(1, num_heads + 1)]
            ffn_ms = [0.0] + [max(0.0, time_layer(0, n) - empty) for n in neuron_units[1:]]
    finally:
        torch.set_num_threads(threads_before)
    table = LatencyTable(
        attn_units=list(range(num_heads + 1)), attn_ms=attn_ms, ffn_units=neuron_units, ffn_ms=ffn_ms,
        hidden_size=adapter.hidden_size, head_dim=adapter.head_dim, num_heads=num_heads,
        intermediate_size=width, batch_size=batch_size, seq_len=seq_len, device=str(device), threads=threads,
        meta={"model_type": model.config.model_type, "empty_layer_ms": empty, "warmup": warmup,
              "repeats": repeats, "torch": torch.__version__},
    )
    fits = table.fits()
    logger.info("latency table on %s (batch %d, seq %d, %d threads): full attention %.3f ms, full FFN %.3f ms; "
                "fit attn %s, ffn %s", device, batch_size, seq_len, threads, attn_ms[-1], ffn_ms[-1],
                fits["attn"], fits["ffn"])
    if not all(math.isfinite(v) for v in attn_ms + ffn_ms):
        raise RuntimeError("latency measurement gave a non-finite time")
    if attn_ms[-1] <= 0 or ffn_ms[-1] <= 0:
        logger.warning("a full sublayer took no measurable time beyond the empty layer (attention %.4f ms, FFN "
                       "%.4f ms); the table cannot guide a latency budget: measure with a larger batch or "
                       "sequence length, or more repeats", attn_ms[-1], ffn_ms[-1])
    return table
