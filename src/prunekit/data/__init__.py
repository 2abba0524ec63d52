"""Data for prunekit: reading task data, tokenizing, padding and the calibration sample.

GLUE lives in `prunekit.data.glue`; its public functions are re-exported here so callers write
`from prunekit.data import load_examples, build_calibration_sample`.
"""

from prunekit.data.glue import (
    CalibrationSample,
    build_calibration_sample,
    collate,
    iter_feature_batches,
    load_examples,
    tokenize_examples,
)

__all__ = [
    "CalibrationSample",
    "build_calibration_sample",
    "collate",
    "iter_feature_batches",
    "load_examples",
    "tokenize_examples",
]
