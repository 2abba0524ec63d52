"""prunekit: structured pruning of Hugging Face Transformers into smaller, faster, reloadable models.

Importing prunekit registers its pruned-model classes with the transformers Auto classes, so
``AutoModelForSequenceClassification.from_pretrained(pruned_folder)`` works after ``import prunekit``.
"""

from prunekit import _compat
from prunekit.api import PruneOptions, PruneResult, apply_plan, count_flops, count_params, prune
from prunekit.core.errors import ConfigError, DataError, ModelError, PrunekitError
from prunekit.deploy.bench import measure_latency
from prunekit.deploy.export import export_onnx
from prunekit.io.folders import load_model, load_plan, load_pruned, save_pruned

__version__ = "0.1.0"

_compat.install()  # the 0.1 import paths (prunekit.surgery, prunekit.data, ...) keep working

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
