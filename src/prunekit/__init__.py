"""prunekit: structured pruning of Hugging Face Transformers into smaller, faster, reloadable models.

Importing prunekit registers its pruned-model classes with the transformers Auto classes, so
``AutoModelForSequenceClassification.from_pretrained(pruned_folder)`` works after ``import prunekit``.
"""

from .accounting import count_flops, count_params
from .api import PruneOptions, PruneResult, apply_plan, prune
from .bench import measure_latency
from .errors import ConfigError, DataError, ModelError, PrunekitError
from .export import export_onnx
from .io import load_model, load_plan, load_pruned, save_pruned

__version__ = "0.1.0"

__all__ = [
    "ConfigError",
    "DataError",
    "ModelError",
    "PruneOptions",
    "PruneResult",
    "PrunekitError",
    "__version__",
    "apply_plan",
    "count_flops",
    "count_params",
    "export_onnx",
    "load_model",
    "load_plan",
    "load_pruned",
    "measure_latency",
    "prune",
    "save_pruned",
]
