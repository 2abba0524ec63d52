"""Task families: what a task is (`spec`), its data, features, evaluation and distillation loss.

One package per family: `glue` (classification and regression), `qa` (extractive QA: SQuAD v1.1
and v2) and `causal_lm` (next-token prediction, perplexity), each with a `family` module holding
its handler. `family` is the handler protocol (`TaskFamily`) and the registry (`family_of`,
`register_family`) keyed by `TaskSpec.kind`; `spec` holds the registry of named tasks
(`get_task`); `calibration` the sample every calibration method reads; `dispatch` routes
`load_examples`, `build_calibration_sample` and `check_split` to the task's family; `task_data` is
what the pipeline hands a method; `evaluate` and `finetune` score and train any task through its
family; `losses` are the distillation losses by kind. Everything a caller needs is re-exported
here: ``from prunekit.tasks import get_task, load_examples, build_calibration_sample``.
"""

from prunekit.tasks.spec import TASKS, GlueTsvLayout, TaskSpec, get_task  # noqa: I001  (first: the rest read it)
from prunekit.tasks.calibration import CalibrationSample
from prunekit.tasks.dispatch import build_calibration_sample, load_examples
from prunekit.tasks.family import TaskFamily
from prunekit.tasks.registry import family_of, register_family
from prunekit.tasks.glue.data import collate, iter_feature_batches, tokenize_examples
from prunekit.tasks.qa.data import build_qa_calibration_sample, load_squad_split
from prunekit.tasks.task_data import TaskData, TrainingData, build_training_data

__all__ = [
    "TASKS",
    "CalibrationSample",
    "GlueTsvLayout",
    "TaskData",
    "TaskFamily",
    "TaskSpec",
    "TrainingData",
    "build_calibration_sample",
    "build_qa_calibration_sample",
    "build_training_data",
    "collate",
    "family_of",
    "get_task",
    "iter_feature_batches",
    "load_examples",
    "load_squad_split",
    "register_family",
    "tokenize_examples",
]
