"""Task registry: what prunekit needs to know about a dataset, declared as data.

This module owns `TaskSpec` and the `TASKS` registry (architecture.md, flow step 1; style.md
"For prunekit" §3 and §13). A task says where its data lives (the datasets hub, or the GLUE TSV
layout on disk), which columns hold the text and the label, how many labels the head has, the
loss a retraining-free method uses for predictive knowledge, the metrics, the tokenizer's maximum
length, and the average dev-set length that the calibration sample and the FLOPs accounting use
(kprune_kwon.md §1.2 and §2). SQuAD tasks ("squad", "squad_v2") add the doc stride of their
overlapping windows, the official file names, and a fixed FLOPs sequence length of 170 tokens
(§2, P13) that `prunekit.prune` uses when the method is given none.

Nothing here reads files or imports models; `prunekit.tasks` and `prunekit.tasks.metrics` read these
specs.
"""

from __future__ import annotations

import dataclasses
import difflib
from dataclasses import dataclass
from typing import Any

from prunekit.core.errors import ConfigError

__all__ = ["GlueTsvLayout", "TaskSpec", "TASKS", "add_task_kind", "get_task"]

# Predictive-knowledge losses a task can name (architecture.md, flow step 1): KL with temperature
# (classification), MSE (regression), start/end KL (extractive QA), next-token KL (decoders).
_DISTILL_LOSSES = ("kl", "mse", "start_end_kl", "next_token_kl")
# The task families a task may name: the built-in ones, and those added by
# prunekit.tasks.family.register_family (through add_task_kind).
_KINDS: dict[str, None] = dict.fromkeys(("glue", "squad", "causal_lm"))


@dataclass(frozen=True)
class GlueTsvLayout:
    """How one GLUE task is laid out in the original GLUE TSV download.

    Column names are the ones in the TSV header; `columns` names the columns of a file without a
    header (CoLA) by position. Files are read with tabs and no quoting (csv.QUOTE_NONE), because
    the sentences contain unbalanced quote characters.
    """

    text_columns: tuple[str, ...]
    label_column: str
    train_file: str = "train.tsv"
    dev_file: str = "dev.tsv"
    header: bool = True
    columns: tuple[str, ...] | None = None  # positional names, only for header-less files
    folder_names: tuple[str, ...] = ()  # sub-folder names of a GLUE download root, e.g. "SST-2"

    def __post_init__(self) -> None:
        if not self.header:
            if not self.columns:
                raise ConfigError("a GLUE TSV layout without a header must name its columns (columns=...)")
            missing = [c for c in (*self.text_columns, self.label_column) if c not in self.columns]
            if missing:
                raise ConfigError(f"GLUE TSV layout names columns {missing} that are not in {self.columns}")

    def file_for(self, split: str) -> str:
        """The TSV file name of `split` ("train" or "dev")."""
        return self.train_file if split == "train" else self.dev_file


@dataclass(frozen=True)
class TaskSpec:
    """One task: data location and layout, head, loss, metrics and lengths.

    `text_columns` and `label_column` are the canonical column names: the ones the datasets hub
    uses, and the keys of the example dicts that `prunekit.tasks.load_examples` returns. Local
    CSV/JSON-lines files may use these names or the GLUE TSV names in `tsv`.
    """

    name: str
    kind: str  # the task family: "glue", "squad", "causal_lm" or a registered one (prunekit.tasks.family)
    text_columns: tuple[str, ...]
    num_labels: int  # 1 for regression (STS-B)
    metrics: tuple[str, ...]  # names in prunekit.tasks.metrics.METRICS (GLUE), or keys of squad_scores (SQuAD)
    main_metric: str
    max_length: int  # tokens, truncation length for training, calibration and evaluation
    avg_seq_len: float  # tokens, average dev-set length of the reference (kprune_kwon.md §2)
    label_column: str = "label"
    is_regression: bool = False
    label_values: tuple[str, ...] = ()  # class labels as written in the TSV files; index = class id
    label_names: tuple[str, ...] = ()  # human-readable names, index = class id (config.id2label)
    head: str = "sequence_classification"
    distill_loss: str = "kl"  # predictive-knowledge loss, one of _DISTILL_LOSSES
    batch_size: int = 32  # calibration batch size of the reference (kprune_kwon.md §1.2)
    hub_path: str = "glue"
    hub_config: str | None = None
    hub_train_split: str = "train"
    hub_dev_split: str = "validation"
    tsv: GlueTsvLayout | None = None
    description: str = ""
    # Extractive QA (kind "squad") only:
    doc_stride: int | None = None  # tokens shared by consecutive windows of a long context (§1.2: 128)
    version_2: bool = False  # unanswerable questions allowed (SQuAD v2.0)
    squad_files: tuple[str, ...] = ()  # (train, dev) official file names inside a SQuAD folder
    # FLOPs accounting length when the method is given none (§2: 170 for SQuAD); None: the
    # calibration sample's mean length, as for GLUE.
    flops_seq_len: float | None = None  # tokens
    # Whether a larger main metric is better (False for perplexity): compare, reports and plots
    # read it instead of assuming accuracy-like metrics.
    higher_is_better: bool = True
    # Causal LM (kind "causal_lm") only: calibration windows (N sequences of L tokens, the LLM
    # pruning literature's 128 x 2048) and the perplexity window; None: min(2048, the model's
    # max_position_embeddings), stated in every result.
    calibration_sequences: int | None = None
    eval_window: int | None = None

    def __post_init__(self) -> None:
        # A malformed task must fail when the registry is built, never later (style.md §13).
        where = f"task {self.name!r}"
        if self.kind not in _KINDS:
            raise ConfigError(f"{where}: kind must be one of {tuple(_KINDS)} (the registered task families), "
                              f"got {self.kind!r}")
        if self.flops_seq_len is not None and self.flops_seq_len <= 0:
            raise ConfigError(f"{where}: flops_seq_len must be a positive number of tokens, or None")
        if self.kind == "squad":
            if self.head != "question_answering" or self.distill_loss != "start_end_kl":
                raise ConfigError(f"{where}: a SQuAD task has head 'question_answering' and distill_loss 'start_end_kl'")
            if self.doc_stride is None or not 0 <= self.doc_stride < self.max_length:
                raise ConfigError(f"{where}: a SQuAD task needs 0 <= doc_stride < max_length, got {self.doc_stride}")
            if len(self.squad_files) != 2:
                raise ConfigError(f"{where}: squad_files must name the (train, dev) files, got {self.squad_files}")
        if self.kind == "causal_lm":
            if self.head != "causal_lm" or self.distill_loss != "next_token_kl":
                raise ConfigError(f"{where}: a causal LM task has head 'causal_lm' and distill_loss 'next_token_kl'")
            if self.higher_is_better:
                raise ConfigError(f"{where}: a causal LM task's metric is perplexity, where lower is better")
        if len(self.text_columns) not in (1, 2):
            raise ConfigError(f"{where}: text_columns must name 1 or 2 columns, got {self.text_columns}")
        if self.num_labels < 1:
            raise ConfigError(f"{where}: num_labels must be >= 1, got {self.num_labels}")
        if self.head == "sequence_classification":
            if self.is_regression != (self.num_labels == 1):
                raise ConfigError(f"{where}: a regression task has num_labels=1 and a classification task >= 2")
            if self.distill_loss != ("mse" if self.is_regression else "kl"):
                raise ConfigError(f"{where}: a regression task has distill_loss 'mse' and a classification "
                                  f"task 'kl', got {self.distill_loss!r}")
            if not self.is_regression and len(self.label_values) != self.num_labels:
                raise ConfigError(
                    f"{where}: label_values {self.label_values} must list one value per class ({self.num_labels})"
                )
        if self.label_names and len(self.label_names) != self.num_labels:
            raise ConfigError(f"{where}: label_names {self.label_names} must list {self.num_labels} names")
        if self.main_metric not in self.metrics:
            raise ConfigError(f"{where}: main_metric {self.main_metric!r} is not one of metrics {self.metrics}")
        if self.max_length < 1 or self.avg_seq_len <= 0:
            raise ConfigError(f"{where}: max_length and avg_seq_len must be positive")
        if self.distill_loss not in _DISTILL_LOSSES:
            raise ConfigError(f"{where}: distill_loss must be one of {_DISTILL_LOSSES}, got {self.distill_loss!r}")
        if self.tsv is not None and len(self.tsv.text_columns) != len(self.text_columns):
            raise ConfigError(f"{where}: the TSV layout must name as many text columns as text_columns")

    @property
    def id2label(self) -> dict[int, str]:
        """Class id to name, for `config.id2label` ("score" for a regression head)."""
        if self.is_regression:
            return {0: "score"}
        names = self.label_names or self.label_values
        return dict(enumerate(names))

    @property
    def label2id(self) -> dict[str, int]:
        """Name to class id, the inverse of `id2label`."""
        return {name: i for i, name in self.id2label.items()}

    @property
    def problem_type(self) -> str:
        """The Hugging Face `config.problem_type` of this task's head."""
        return "regression" if self.is_regression else "single_label_classification"


def _glue(name: str, **fields: Any) -> TaskSpec:
    """A GLUE task: hub config equal to the name, everything else given."""
    return TaskSpec(name=name, kind="glue", hub_path="glue", hub_config=name, **fields)


_BINARY = ("0", "1")
_NLI2 = ("entailment", "not_entailment")

# avg_seq_len: average tokenized dev-set length used by both reference repositories
# (kprune_kwon.md §1.2 and §2). RTE 64.59 and CoLA 11.67 are the same table's values for the two
# tasks the spec does not list (WoosukKwon/retraining-free-pruning:dataset/glue.py).
# max_length: 128, except 64 for SST-2 and CoLA, again as in the reference table: their sentences
# are short, so 64 truncates (almost) nothing and halves the padding cost.
# MNLI's TSV label is the last column, gold_label; train has 12 columns and dev 16 (label1..label5).
_MNLI_TSV = GlueTsvLayout(
    text_columns=("sentence1", "sentence2"),
    label_column="gold_label",
    dev_file="dev_matched.tsv",
    folder_names=("mnli", "MNLI"),
)
_MNLI = _glue(
    "mnli",
    text_columns=("premise", "hypothesis"),
    num_labels=3,
    label_values=("entailment", "neutral", "contradiction"),
    label_names=("entailment", "neutral", "contradiction"),
    metrics=("accuracy",),
    main_metric="accuracy",
    max_length=128,
    avg_seq_len=39.05,
    hub_dev_split="validation_matched",
    tsv=_MNLI_TSV,
    description="MultiNLI, matched dev set: entailment / neutral / contradiction",
)

# SQuAD (kprune_kwon.md §1.2, §2, P13): features of at most 384 tokens, question first, windows
# overlapping by 128 tokens; calibration batches of 12 features; the sample size and the FLOPs
# are both taken at the reference's fixed length of 170 tokens. num_labels 2 is the start and end
# logit of Hugging Face's question-answering head. Data: the official JSON files (a file, or a
# folder holding them) or the hub datasets "squad" / "squad_v2".
_SQUAD = TaskSpec(
    name="squad",
    kind="squad",
    text_columns=("question", "context"),
    label_column="answers",
    num_labels=2,
    head="question_answering",
    distill_loss="start_end_kl",
    metrics=("exact_match", "f1"),
    main_metric="f1",
    max_length=384,
    doc_stride=128,
    avg_seq_len=170.0,
    flops_seq_len=170.0,
    batch_size=12,
    squad_files=("train-v1.1.json", "dev-v1.1.json"),
    hub_path="squad",
    description="SQuAD v1.1: extractive question answering, exact match and token F1",
)

# Causal language modelling (issue 10): text in, next-token KL as the predictive loss, perplexity
# out (lower is better). Calibration: 128 windows of 2048 tokens of the train (else validation)
# text by default, as SparseGPT, Wanda and LLM-Pruner; the FLOPs length is the window length.
# Evaluation: the whole test text joined with "\n\n", in non-overlapping windows (prunekit.tasks.causal_lm.data).
_CAUSAL_LM = TaskSpec(
    name="causal_lm",
    kind="causal_lm",
    text_columns=("text",),
    label_column="text",
    num_labels=1,
    head="causal_lm",
    distill_loss="next_token_kl",
    metrics=("perplexity",),
    main_metric="perplexity",
    higher_is_better=False,
    max_length=2048,
    avg_seq_len=2048.0,
    batch_size=8,
    calibration_sequences=128,
    hub_path="wikitext",
    hub_config="wikitext-2-raw-v1",
    description="causal language modelling: perplexity of the test text (WikiText-2 style)",
)

# The registry: one entry per task, filled here and nowhere else (style.md §3).
TASKS: dict[str, TaskSpec] = {
    "sst2": _glue(
        "sst2",
        text_columns=("sentence",),
        num_labels=2,
        label_values=_BINARY,
        label_names=("negative", "positive"),
        metrics=("accuracy",),
        main_metric="accuracy",
        max_length=64,
        avg_seq_len=25.16,
        tsv=GlueTsvLayout(text_columns=("sentence",), label_column="label", folder_names=("sst2", "SST-2")),
        description="Stanford Sentiment Treebank, binary sentiment",
    ),
    "mrpc": _glue(
        "mrpc",
        text_columns=("sentence1", "sentence2"),
        num_labels=2,
        label_values=_BINARY,
        label_names=("not_equivalent", "equivalent"),
        metrics=("accuracy", "f1"),
        main_metric="accuracy",
        max_length=128,
        avg_seq_len=53.24,
        tsv=GlueTsvLayout(
            text_columns=("#1 String", "#2 String"), label_column="Quality", folder_names=("mrpc", "MRPC")
        ),
        description="Microsoft Research Paraphrase Corpus",
    ),
    "stsb": _glue(
        "stsb",
        text_columns=("sentence1", "sentence2"),
        num_labels=1,
        is_regression=True,
        distill_loss="mse",
        metrics=("pearson", "spearman"),
        main_metric="spearman",
        max_length=128,
        avg_seq_len=31.47,
        tsv=GlueTsvLayout(
            text_columns=("sentence1", "sentence2"), label_column="score", folder_names=("stsb", "STS-B")
        ),
        description="Semantic Textual Similarity Benchmark, similarity score in [0, 5]",
    ),
    "qnli": _glue(
        "qnli",
        text_columns=("question", "sentence"),
        num_labels=2,
        label_values=_NLI2,
        label_names=_NLI2,
        metrics=("accuracy",),
        main_metric="accuracy",
        max_length=128,
        avg_seq_len=50.97,
        tsv=GlueTsvLayout(
            text_columns=("question", "sentence"), label_column="label", folder_names=("qnli", "QNLI")
        ),
        description="Question NLI (from SQuAD): does the sentence answer the question",
    ),
    "qqp": _glue(
        "qqp",
        text_columns=("question1", "question2"),
        num_labels=2,
        label_values=_BINARY,
        label_names=("not_duplicate", "duplicate"),
        metrics=("accuracy", "f1"),
        main_metric="accuracy",
        max_length=128,
        avg_seq_len=30.55,
        tsv=GlueTsvLayout(
            text_columns=("question1", "question2"), label_column="is_duplicate", folder_names=("qqp", "QQP")
        ),
        description="Quora Question Pairs",
    ),
    "mnli": _MNLI,
    # A variant overrides fields of its base entry instead of repeating it (style.md §13).
    "mnli-mm": dataclasses.replace(
        _MNLI,
        name="mnli-mm",
        hub_dev_split="validation_mismatched",
        tsv=dataclasses.replace(_MNLI_TSV, dev_file="dev_mismatched.tsv"),
        description="MultiNLI, mismatched dev set",
    ),
    "rte": _glue(
        "rte",
        text_columns=("sentence1", "sentence2"),
        num_labels=2,
        label_values=_NLI2,
        label_names=_NLI2,
        metrics=("accuracy",),
        main_metric="accuracy",
        max_length=128,
        avg_seq_len=64.59,
        tsv=GlueTsvLayout(
            text_columns=("sentence1", "sentence2"), label_column="label", folder_names=("rte", "RTE")
        ),
        description="Recognizing Textual Entailment",
    ),
    "squad": _SQUAD,
    "causal_lm": _CAUSAL_LM,
    # v2.0 adds unanswerable questions: its own files and hub dataset, same settings otherwise.
    "squad_v2": dataclasses.replace(
        _SQUAD,
        name="squad_v2",
        version_2=True,
        squad_files=("train-v2.0.json", "dev-v2.0.json"),
        hub_path="squad_v2",
        description="SQuAD v2.0: extractive question answering with unanswerable questions",
    ),
    "cola": _glue(
        "cola",
        text_columns=("sentence",),
        num_labels=2,
        label_values=_BINARY,
        label_names=("unacceptable", "acceptable"),
        metrics=("matthews_correlation", "accuracy"),
        main_metric="matthews_correlation",
        max_length=64,
        avg_seq_len=11.67,
        tsv=GlueTsvLayout(
            text_columns=("sentence",),
            label_column="label",
            header=False,
            columns=("source", "label", "original_mark", "sentence"),
            folder_names=("cola", "CoLA"),
        ),
        description="Corpus of Linguistic Acceptability",
    ),
}


def get_task(name: str | TaskSpec) -> TaskSpec:
    """Look a task up by name (a TaskSpec is returned as is).

    Raises:
        ConfigError: (a ValueError) naming the unknown key, the available keys and the closest match.
    """
    if isinstance(name, TaskSpec):
        return name
    key = str(name).strip().lower()
    if key in TASKS:
        return TASKS[key]
    close = difflib.get_close_matches(key, list(TASKS), n=1)
    hint = f" Did you mean {close[0]!r}?" if close else ""
    raise ConfigError(f"unknown task {name!r}; available tasks: {', '.join(sorted(TASKS))}.{hint}")


def add_task_kind(kind: str) -> None:
    """Let TaskSpecs name ``kind``: called by `prunekit.tasks.family.register_family` for its family."""
    _KINDS.setdefault(kind)
