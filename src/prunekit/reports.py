"""Reports on top of everything else: Markdown tables and plots (matplotlib, headless)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")  # headless: no display on servers and CI
import matplotlib.pyplot as plt  # noqa: E402


def plot_structure(
    layers: Sequence[dict[str, int]],
    full_heads: int,
    full_neurons: int,
    path: str | Path,
    title: str = "kept structure per layer",
) -> Path:
    """Bar charts of kept heads and FFN neurons per layer against the original widths."""
    path = Path(path)
    index = list(range(len(layers)))
    fig, (ax_heads, ax_neurons) = plt.subplots(1, 2, figsize=(10, 3.6))
    ax_heads.bar(index, [full_heads] * len(index), color="#dddddd", label="original")
    ax_heads.bar(index, [layer["num_heads"] for layer in layers], color="#3b75af", label="kept")
    ax_heads.set_xlabel("layer")
    ax_heads.set_ylabel("attention heads")
    ax_heads.set_xticks(index)
    ax_heads.legend(loc="lower left", fontsize=8)
    ax_neurons.bar(index, [full_neurons] * len(index), color="#dddddd", label="original")
    ax_neurons.bar(index, [layer["intermediate_size"] for layer in layers], color="#d9822b", label="kept")
    ax_neurons.set_xlabel("layer")
    ax_neurons.set_ylabel("FFN neurons")
    ax_neurons.set_xticks(index)
    ax_neurons.legend(loc="lower left", fontsize=8)
    fig.suptitle(title)
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
