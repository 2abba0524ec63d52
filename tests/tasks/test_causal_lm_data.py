"""Causal-LM task family data (prunekit.tasks.causal_lm.data): reading text from files, folders and JSON lines,
never calibrating on a test split, the seeded calibration windows, and perplexity against a direct count
of the next-token losses, for non-overlapping and strided windows."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from prunekit.core.errors import ConfigError, DataError
from prunekit.tasks.causal_lm.data import (
    build_lm_calibration_sample,
    perplexity,
    read_text,
    resolve_text_file,
    tokenize_text,
)

SHARED = Path(__file__).parents[3] / "shared"
WIKITEXT = SHARED / "data" / "wikitext2"


class CharTokenizer:
    """A byte tokenizer with a BOS (id 0), enough to test the token stream without a vocabulary file."""

    def __call__(self, text, return_attention_mask=False, verbose=False):
        return {"input_ids": [0] + [b % 60 + 1 for b in text.encode("utf-8")]}


@pytest.fixture
def tiny_lm() -> LlamaForCausalLM:
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=61, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    return LlamaForCausalLM(config).eval()


def test_a_text_file_is_read_as_rows_joined_by_blank_lines(tmp_path):
    file = tmp_path / "wiki.test.raw"
    file.write_text(" \n = Title = \n \n Body text . \n")
    assert read_text(file, "test") == "\n\n = Title = \n" + "\n\n" + "\n\n" + " Body text . \n"


def test_a_folder_gives_each_split_its_own_file_and_calibration_never_reads_test(tmp_path):
    (tmp_path / "wiki.test.raw").write_text("test text\n")
    (tmp_path / "wiki.valid.tokens").write_text("valid text\n")
    assert read_text(tmp_path, "test") == "test text\n"
    assert read_text(tmp_path, "calibration") == "valid text\n"  # no train file: validation
    (tmp_path / "wiki.train.raw").write_text("train text\n")
    assert read_text(tmp_path, "calibration") == "train text\n"
    with pytest.raises(DataError, match="never calibrates on test text"):
        read_text(tmp_path / "wiki.test.raw", "calibration")
    only_test = tmp_path / "only-test"
    only_test.mkdir()
    (only_test / "test.txt").write_text("x\n")
    with pytest.raises(DataError, match="holds no train/validation text"):
        read_text(only_test, "calibration")


def test_json_lines_need_a_text_field(tmp_path):
    good = tmp_path / "train.jsonl"
    good.write_text('{"text": "one"}\n\n{"text": "two", "id": 3}\n')
    assert read_text(good, "train") == "one\n\ntwo"
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "one"}\n{"content": "two"}\n')
    with pytest.raises(DataError, match="line 2 has no string field 'text'"):
        read_text(bad, "train")


def test_text_that_is_not_utf8_names_the_file_and_line(tmp_path):
    file = tmp_path / "train.txt"
    file.write_bytes(b"fine\nalso fine\n\xff\xfe broken\n")
    with pytest.raises(DataError, match=r"train.txt line 3 is not UTF-8"):
        read_text(file, "train")


def test_a_missing_local_path_is_reported_at_once(tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        resolve_text_file(tmp_path / "nope.txt", ("test",))
    assert resolve_text_file("wikitext:wikitext-2-raw-v1", ("test",)) is None  # a hub name


def test_calibration_windows_are_seeded_and_sized():
    stream = torch.arange(1000)
    sample = build_lm_calibration_sample(None, stream, num_sequences=10, seq_len=32, seed=3, batch_size=4)
    assert [b["input_ids"].shape for b in sample.batches] == [(4, 32), (4, 32), (2, 32)]
    assert sample.num_tokens == 320 and sample.mean_length == 32
    for batch in sample.batches:
        ids = batch["input_ids"]
        assert torch.equal(ids[:, 1:] - ids[:, :-1], torch.ones(ids.shape[0], 31, dtype=torch.long))  # windows
        assert torch.equal(batch["labels"], ids) and bool(batch["attention_mask"].all())
    again = build_lm_calibration_sample(None, stream, num_sequences=10, seq_len=32, seed=3, batch_size=4)
    other = build_lm_calibration_sample(None, stream, num_sequences=10, seq_len=32, seed=4, batch_size=4)
    assert again.indices == sample.indices != other.indices
    with pytest.raises(DataError, match="not more than one window"):
        build_lm_calibration_sample(None, torch.arange(32), num_sequences=1, seq_len=32)
    for bad in ({"num_sequences": 0}, {"seq_len": -1}, {"batch_size": 0}):
        with pytest.raises(ConfigError, match="must be a positive integer"):
            build_lm_calibration_sample(None, stream, **bad)


def _direct_nll(model, tokens: torch.Tensor, contexts: list[tuple[int, int]]) -> tuple[float, int]:
    """Sum of -log p(token t | tokens[begin:t]) for each (begin, t), one forward pass per token."""
    total = 0.0
    for begin, t in contexts:
        logits = model(input_ids=tokens[None, begin:t]).logits[0, -1]
        total -= float(torch.log_softmax(logits.double(), -1)[tokens[t]])
    return total, len(contexts)


@torch.no_grad()
def test_perplexity_of_non_overlapping_windows_matches_a_direct_count(tiny_lm):
    torch.manual_seed(1)
    tokens = torch.randint(0, 61, (45,))
    result = perplexity(tiny_lm, tokens, window=16, batch_size=2)
    # Windows [0,16) [16,32) [32,45): every token but each window's first, predicted within its window.
    contexts = [(begin, t) for begin in (0, 16, 32) for t in range(begin + 1, min(begin + 16, 45))]
    nll, count = _direct_nll(tiny_lm, tokens, contexts)
    assert result["num_scored"] == count == 42 and result["window"] == result["stride"] == 16
    assert result["perplexity"] == pytest.approx(math.exp(nll / count), rel=1e-5)
    # The model's own loss over one window is the same quantity.
    loss = tiny_lm(input_ids=tokens[None, :16], labels=tokens[None, :16]).loss
    assert perplexity(tiny_lm, tokens[:16], window=16)["perplexity"] == pytest.approx(math.exp(float(loss)), rel=1e-5)


@torch.no_grad()
def test_strided_perplexity_scores_each_token_once_with_carried_context(tiny_lm):
    torch.manual_seed(2)
    tokens = torch.randint(0, 61, (40,))
    result = perplexity(tiny_lm, tokens, window=16, stride=8)
    # Windows start at 0, 8, 16, 24 (the last reaches the end): the first scores 1..15, each later one
    # the 8 tokens after the previous window's end, with the window's earlier tokens as context.
    contexts = [(0, t) for t in range(1, 16)] + [(b, t) for b in (8, 16, 24) for t in range(b + 8, min(b + 16, 40))]
    nll, count = _direct_nll(tiny_lm, tokens, contexts)
    assert result["num_scored"] == count == 39
    assert result["perplexity"] == pytest.approx(math.exp(nll / count), rel=1e-5)
    with pytest.raises(ConfigError, match="stride"):
        perplexity(tiny_lm, tokens, window=16, stride=17)


@pytest.mark.skipif(not (WIKITEXT / "wiki.test.raw").is_file(), reason="needs ../shared/data/wikitext2")
def test_wikitext2_test_split_from_the_shared_folder():
    text = read_text(WIKITEXT, "test")
    assert text.startswith("\n\n = Robert Boulter = \n") and len(text.split("\n\n")) == 4358
    calibration = read_text(WIKITEXT, "calibration")
    assert calibration != text and "@-@" in calibration  # wiki.valid.tokens
    assert tokenize_text(CharTokenizer(), "ab").tolist() == [0, 38, 39]
