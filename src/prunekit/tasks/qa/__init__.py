"""Extractive question answering (SQuAD v1.1 and v2.0), split along its concerns.

- `files`: reading and validating the official JSON files (or a hub dataset), `split_by_article`;
- `features`: examples tokenized into overlapping windows (`prepare_features`), `collate_qa`;
- `answers`: start/end logits back to answer texts (`postprocess_predictions`);
- `metrics`: exact match and F1;
- `data`: the SQuAD TaskSpecs' splits and calibration sample;
- `family`: the task family handler that `prunekit.tasks.family.family_of` returns for SQuAD tasks.

The public names of `files`, `features`, `answers` and `data` are re-exported here (the first three
were `prunekit.data.squad` in 0.1).
"""

from prunekit.tasks.qa.answers import postprocess_predictions
from prunekit.tasks.qa.data import QaSource, build_qa_calibration_sample, load_squad_split, squad_task
from prunekit.tasks.qa.features import collate_qa, prepare_features
from prunekit.tasks.qa.files import load_squad, split_by_article

__all__ = [
    "QaSource",
    "build_qa_calibration_sample",
    "collate_qa",
    "load_squad",
    "load_squad_split",
    "postprocess_predictions",
    "prepare_features",
    "split_by_article",
    "squad_task",
]
