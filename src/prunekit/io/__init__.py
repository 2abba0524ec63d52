"""Saved folders: save and load pruned models (``folders``), the files that make a folder load
without prunekit (``files``), atomic output folders and files (``outdir``), and the report's plots
and tables (``reports``). Sits above the model families, whose registry it reads, and below tasks,
methods and the pipeline.

The 0.1 import path ``prunekit.io`` named the save/load module; its public names stay importable
from here.
"""

from prunekit.io.folders import (
    as_pruned_model,
    load_model,
    load_plan,
    load_pruned,
    load_tokenizer,
    save_pruned,
)

__all__ = ["as_pruned_model", "load_model", "load_plan", "load_pruned", "load_tokenizer", "save_pruned"]
