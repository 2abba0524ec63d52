"""Reports on top of everything else: Markdown tables and plots (matplotlib, headless).

- ``plot_structure``: kept heads and FFN neurons per layer of one pruned model;
  ``structure_report`` draws it for any saved model folder (``prunekit report DIR``).
- ``plot_compare``: metric against FLOPs kept and against measured speedup, one line per method,
  the teacher as a horizontal line (``prunekit compare``).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from prunekit.core.errors import ConfigError
from prunekit.families import get_adapter
from prunekit.io.folders import load_pruned


def _pyplot() -> Any:
    """matplotlib's pyplot, headless, imported only when a plot is drawn (``import prunekit``
    stays free of it)."""
    import matplotlib

    matplotlib.use("Agg")  # headless: no display on servers and CI
    import matplotlib.pyplot as plt

    return plt


def plot_structure(
    layers: Sequence[dict[str, int]],
    full_heads: int,
    full_neurons: int,
    path: str | Path,
    title: str = "kept structure per layer",
    full_kv_heads: int | None = None,
) -> Path:
    """Bar charts of kept heads and FFN neurons per layer against the original widths; with
    ``full_kv_heads`` (decoders with grouped-query attention, whose layers record
    ``num_kv_heads``) a third panel shows the key/value heads kept."""
    path = Path(path)
    index = list(range(len(layers)))
    plt = _pyplot()
    panels = [("num_heads", full_heads, "#3b75af", "query heads" if full_kv_heads else "attention heads"),
              ("intermediate_size", full_neurons, "#d9822b", "FFN neurons")]
    if full_kv_heads:
        panels.insert(1, ("num_kv_heads", full_kv_heads, "#5a9e4b", "key/value heads"))
    fig, axes = plt.subplots(1, len(panels), figsize=(5 * len(panels), 3.6))
    for ax, (key, full, color, label) in zip(axes, panels, strict=True):
        ax.bar(index, [full] * len(index), color="#dddddd", label="original")
        ax.bar(index, [layer.get(key, 0) for layer in layers], color=color, label="kept")
        ax.set_xlabel("layer")
        ax.set_ylabel(label)
        ax.set_xticks(index)
        ax.legend(loc="lower left", fontsize=8)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def structure_report(model_dir: str | Path, out: str | Path | None = None, overwrite: bool = False) -> Path:
    """Draw ``structure.png`` (kept heads and neurons per layer) for a saved model folder, pruned by
    prunekit or not; written into the folder unless ``out`` says where (a new file outside the
    folder, or one ``overwrite`` replaces). Returns the image path."""
    from prunekit.io.outdir import atomic_write, check_output_file, record_written_file, write_output_file

    model_dir = Path(model_dir)
    if out is not None:
        check_output_file(out, overwrite, (model_dir,), "--out")
    elif (model_dir / "structure.png").is_dir():
        raise ConfigError(f"{model_dir / 'structure.png'} is a folder; pass --out with an image file name")
    adapter = get_adapter(load_pruned(model_dir))
    layers = [shape.to_dict() for shape in adapter.layer_shapes()]
    kept = sum(layer["num_heads"] + layer["intermediate_size"] for layer in layers)
    full = len(layers) * (adapter.full_num_heads + adapter.full_intermediate_size)
    title = f"{model_dir.name}: {kept:,} of {full:,} heads and neurons kept"

    def draw(path: Path) -> None:
        plot_structure(layers, adapter.full_num_heads, adapter.full_intermediate_size, path, title=title,
                       full_kv_heads=kv_heads_panel(adapter))

    if out is not None:
        return write_output_file(out, draw, overwrite, (model_dir,), "--out")
    # The documented default: structure.png inside the model folder itself, redrawn in place.
    path = model_dir / "structure.png"
    atomic_write(path, draw)
    record_written_file(model_dir, "structure.png")
    return path


def kv_heads_panel(adapter: Any) -> int | None:
    """The full key/value head count to plot, for families with grouped-query attention; None else."""
    return adapter.full_num_kv_heads if adapter.grouped_kv and adapter.full_num_kv_heads != adapter.full_num_heads \
        else None


def plot_compare(results: Sequence[dict[str, Any]], path: str | Path) -> Path:
    """One row of two panels per comparison in ``results`` (the dicts ``prunekit.compare`` writes):
    the main metric against FLOPs kept, and against measured speedup, one line per method; the
    teacher is a horizontal line (and the point at speedup 1)."""
    path = Path(path)
    plt = _pyplot()
    fig, axes = plt.subplots(len(results), 2, figsize=(11, 4 * len(results)), squeeze=False)
    for (ax_flops, ax_speed), result in zip(axes, results, strict=True):
        metric, teacher = result["metric"], result["teacher"]["metrics"][result["metric"]]
        # x: the budget's own measure (non-embedding parameters kept for a params budget).
        x_key = "non_embedding_params_kept" if result.get("budget_kind") == "params" else "flops_kept"
        x_label = "non-embedding parameters kept" if x_key != "flops_kept" else "FLOPs kept"
        better = "" if result.get("higher_is_better", True) else " (lower is better)"
        for method in result["methods"]:
            rows = sorted((r for r in result["rows"] if r["method"] == method), key=lambda r: r[x_key])
            ax_flops.plot([r[x_key] for r in rows], [r["metrics"][metric] for r in rows], marker="o", label=method)
            timed = [r for r in rows if r.get("speedup") is not None]
            if timed:
                timed.sort(key=lambda r: r["speedup"])
                ax_speed.plot([r["speedup"] for r in timed], [r["metrics"][metric] for r in timed], marker="o",
                              label=method)
        for ax in (ax_flops, ax_speed):
            ax.axhline(teacher, color="black", linestyle="--", linewidth=1, label=f"teacher {teacher:.2f}")
            ax.set_ylabel(f"{result['task']} {result['teacher']['metrics'].get('split', 'dev')} {metric}{better}")
            ax.grid(alpha=0.3)
            ax.legend(fontsize=8)
        for ax in (ax_flops, ax_speed):  # the teacher keeps everything and runs at speedup 1
            ax.plot([1.0], [teacher], marker="*", color="black", markersize=10, linestyle="none")
        lowest = min((r[x_key] for r in result["rows"]), default=0.0)
        ax_flops.set_xlim(1.03, max(0.0, lowest - 0.05))  # inverted: less kept to the right
        ax_flops.ticklabel_format(axis="x", useOffset=False)
        ax_flops.set_xlabel(f"{x_label} (fraction of the teacher's)")
        bench = result.get("bench")
        ax_speed.set_xlabel(f"measured speedup ({bench['device']}, batch {bench['batch_size']}, seq {bench['seq_len']})"
                            if bench else "measured speedup (not measured)")
        ax_flops.set_title(f"{result['task']}: metric against {x_label}")
        ax_speed.set_title(f"{result['task']}: metric against speedup")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def markdown_table(rows: Sequence[dict[str, Any]], columns: Sequence[tuple[str, str]]) -> str:
    """A Markdown table; ``columns`` are (key, header) pairs; floats get sensible precision."""

    def cell(value: Any) -> str:
        if isinstance(value, float):
            return f"{value:.4g}" if abs(value) < 1000 else f"{value:,.0f}"
        return "" if value is None else str(value)

    header = "| " + " | ".join(h for _, h in columns) + " |"
    rule = "|" + "|".join("---" for _ in columns) + "|"
    body = ["| " + " | ".join(cell(row.get(key)) for key, _ in columns) + " |" for row in rows]
    return "\n".join([header, rule, *body])
