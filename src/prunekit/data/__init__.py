"""Data for prunekit: reading task data, tokenizing, padding and the calibration sample.

GLUE lives in `prunekit.data.glue`, SQuAD in `prunekit.data.squad` (files, features, answers) and
`prunekit.data.qa` (SQuAD tasks, QA calibration sample). `load_examples` and
`build_calibration_sample` here take any task and route it by kind (`prunekit.data.dispatch`), so
callers write `from prunekit.data import load_examples, build_calibration_sample`.
"""

from prunekit.data.dispatch import build_calibration_sample, load_examples
from prunekit.data.glue import (
    CalibrationSample,
    collate,
    iter_feature_batches,
    tokenize_examples,
)
from prunekit.data.qa import build_qa_calibration_sample, load_squad_split
from prunekit.data.task_data import TaskData, TrainingData, build_training_data

__all__ = [
    "CalibrationSample",
    "TaskData",
    "TrainingData",
    "build_calibration_sample",
    "build_qa_calibration_sample",
    "build_training_data",
    "collate",
    "iter_feature_batches",
    "load_examples",
    "load_squad_split",
    "tokenize_examples",
]
