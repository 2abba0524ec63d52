"""Latency tables (prunekit.methods.lut): a table measured on a tiny model has the expected shape, round-trips
through JSON, and its piecewise-linear fit is monotone; the fit recovers a known curve and works
whatever the size of the errors (spec P10)."""

from __future__ import annotations

import json

import pytest

from prunekit.core.errors import ConfigError, ModelError
from prunekit.core.surgery import prune_heads
from prunekit.families import get_adapter
from prunekit.methods.lut import LatencyTable, fit_piecewise, measure_latency_table, sublayer_costs
from prunekit.methods.search import SublayerCost


@pytest.fixture(scope="module")
def tiny_table():
    from conftest import build_tiny_model

    model = build_tiny_model("bert")
    return measure_latency_table(model, batch_size=2, seq_len=8, neuron_step=8, warmup=1, repeats=3, threads=1)


def test_measured_table_has_the_expected_shape(tiny_table):
    assert tiny_table.attn_units == [0, 1, 2, 3, 4]
    assert tiny_table.ffn_units == [0, 8, 16, 24, 32, 37]
    assert len(tiny_table.attn_ms) == 5 and len(tiny_table.ffn_ms) == 6
    assert tiny_table.attn_ms[0] == 0.0 and tiny_table.ffn_ms[0] == 0.0
    assert all(v >= 0 for v in tiny_table.attn_ms + tiny_table.ffn_ms)
    assert (tiny_table.batch_size, tiny_table.seq_len, tiny_table.threads) == (2, 8, 1)
    assert (tiny_table.num_heads, tiny_table.intermediate_size, tiny_table.head_dim) == (4, 37, 8)


def test_fit_is_monotone(tiny_table):
    for kind, fit in tiny_table.fits().items():
        full = 4 if kind == "attn" else 37
        values = [fit(n) for n in range(full + 1)]
        assert values[0] == 0.0
        assert all(b >= a for a, b in zip(values, values[1:], strict=False)), (kind, fit)


def test_round_trip_through_json(tiny_table, tmp_path):
    path = tiny_table.save(tmp_path / "lut.json")
    data = json.loads(path.read_text())
    assert data["format"] == "prunekit-lut/1" and set(data["fit"]) == {"attn", "ffn"}
    loaded = LatencyTable.load(path)
    assert loaded.attn_ms == tiny_table.attn_ms and loaded.ffn_units == tiny_table.ffn_units
    assert loaded.fits() == tiny_table.fits()


def test_fit_recovers_a_known_curve():
    truth = SublayerCost(slope=0.5, const=2.0, free=3)
    units = list(range(0, 13))
    fit = fit_piecewise(units, [truth(n) for n in units])
    assert fit.free == 3
    assert fit.const == pytest.approx(2.0) and fit.slope == pytest.approx(0.5)


def test_fit_works_with_large_errors():
    """P10: the reference started its error at 10000, so large tables (ms² on a slow CPU) got no fit."""
    units = [0, 1, 2, 3, 4, 5, 6]
    ms = [0.0, 900.0, 400.0, 1300.0, 800.0, 1700.0, 1200.0]
    fit = fit_piecewise(units, ms)
    assert fit.const > 0
    assert all(fit(n + 1) >= fit(n) for n in range(6))


def test_fit_clamps_a_falling_table():
    fit = fit_piecewise([0, 1, 2, 3], [0.0, 3.0, 2.0, 1.0])
    assert fit.slope == 0.0 and fit.const == pytest.approx(2.0)


def test_table_must_fit_the_model(tiny_table, make_model):
    costs = sublayer_costs(get_adapter(make_model("bert", num_layers=3)), 10.0, tiny_table)
    assert len(costs) == 6
    other = make_model("bert")
    other.config.intermediate_size = 64
    with pytest.raises(ConfigError, match="prunekit lut"):
        tiny_table.costs(get_adapter(other))


def test_bad_files_give_clear_errors(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        LatencyTable.load(tmp_path / "missing.json")
    (tmp_path / "other.json").write_text(json.dumps({"format": "something"}))
    with pytest.raises(ConfigError, match="not a prunekit latency table"):
        LatencyTable.load(tmp_path / "other.json")


def test_refuses_a_pruned_model(make_model):
    model = make_model("bert")
    prune_heads(get_adapter(model), 0, [0, 1])
    with pytest.raises(ModelError, match="unpruned"):
        measure_latency_table(model, batch_size=1, seq_len=4, repeats=1, warmup=0)


@pytest.mark.parametrize("family", ["roberta", "distilbert"])
def test_other_families(make_model, family):
    table = measure_latency_table(make_model(family), batch_size=1, seq_len=4, neuron_step=16, warmup=0,
                                  repeats=1, threads=1)
    assert table.ffn_units == [0, 16, 32, 37]


def test_kprune_takes_latency_per_unit_costs(make_model, tmp_path):
    """Under a latency budget Kprune scores and budgets with per-unit latencies (a sublayer type's
    fitted full latency over its units); the kept per-unit cost fits the budget."""
    from conftest import make_sample, run_method

    from prunekit.methods.kprune import KpruneConfig, kprune
    from prunekit.methods.lut import per_unit_costs

    table = LatencyTable(
        attn_units=[0, 1, 2, 3, 4], attn_ms=[0.0, 2.0, 2.4, 2.8, 3.2],
        ffn_units=[0, 16, 32, 37], ffn_ms=[0.0, 0.5, 1.0, 1.1],
        hidden_size=32, head_dim=8, num_heads=4, intermediate_size=37, batch_size=2, seq_len=8,
        device="cpu", threads=1,
    )
    path = str(table.save(tmp_path / "lut.json"))
    model = make_model("bert")
    adapter = get_adapter(model)
    unit = per_unit_costs(adapter, 10.0, path)[0]
    fits = table.fits()
    assert unit.head == pytest.approx(fits["attn"](4) / 4) and unit.neuron == pytest.approx(fits["ffn"](37) / 37)
    full = 2 * (4 * unit.head + 37 * unit.neuron)
    _, log = run_method(kprune, model, make_sample("bert"), "classification", KpruneConfig(keep_latency=0.4, lut=path))
    assert sum(step["kept_cost"] for step in log["steps"]) <= 0.4 * full * (1 + 1e-9)
    with pytest.raises(ConfigError, match="prunekit lut"):
        KpruneConfig(keep_latency=0.4)
