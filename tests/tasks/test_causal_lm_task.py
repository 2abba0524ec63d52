"""Causal language modelling as a task family (issue 10, items 3, 4, 6's bench and 7), on tiny
random Llama models seen through the test-only adapter (tests/llama_view.py): the pipeline from
calibration text to a saved, reloaded, scored model; every retraining-free method under FLOPs and
non-embedding-parameter budgets, counted against a hand count; the sparse next-token targets
(exact KL on top-k + tail, memory independent of the vocabulary); perplexity that states its
window; prefill/decode benchmarking; compare, report and the CLI on a decoder."""

from __future__ import annotations

import copy
import json
import math
import shutil
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from builders import view
from llama_view import LlamaTestAdapter, registered
from transformers import LlamaConfig, LlamaForCausalLM

from prunekit.api import PruneOptions, prune
from prunekit.core.accounting import count_flops, count_non_embedding_params, full_flops, param_unit_costs
from prunekit.core.errors import ConfigError
from prunekit.deploy.bench import measure_generation
from prunekit.families import get_adapter
from prunekit.io.folders import load_pruned, register_pruned_classes
from prunekit.methods.kprune import KpruneConfig, kprune_prepare
from prunekit.tasks import TaskData
from prunekit.tasks.causal_lm.data import build_lm_calibration_sample, perplexity
from prunekit.tasks.losses import distill_loss, sparse_target_bytes, teacher_targets
from prunekit.tasks.spec import get_task

SHARED = Path(__file__).parents[3] / "shared"
GQA = SHARED / "models" / "llama-wiki-gqa"
WIKITEXT = SHARED / "data" / "wikitext2"
D, FF, LAYERS, H, H_KV, D_H = 32, 48, 2, 4, 2, 8
METHODS = ("kprune", "kwon", "magnitude", "random")


@pytest.fixture(autouse=True)
def llama_family():
    with registered():
        register_pruned_classes("llama", LlamaTestAdapter)
        yield


def tiny_lm(vocab: int = 61, seed: int = 0) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=vocab, hidden_size=D, intermediate_size=FF, num_hidden_layers=LAYERS,
                         num_attention_heads=H, num_key_value_heads=H_KV, head_dim=D_H, max_position_embeddings=64,
                         tie_word_embeddings=True, pad_token_id=0)
    return LlamaForCausalLM(config).eval()


def stream(vocab: int = 61, n: int = 400, seed: int = 1) -> torch.Tensor:
    return torch.randint(1, vocab, (n,), generator=torch.Generator().manual_seed(seed))


def lm_sample(vocab: int = 61, sequences: int = 8, length: int = 16):
    return build_lm_calibration_sample(None, stream(vocab), num_sequences=sequences, seq_len=length, batch_size=4)


def hand_non_embedding_params(model) -> int:
    """Non-embedding parameters from the layer shapes: q/o per query head, k/v per key/value head,
    gate/up/down per neuron, a norm per non-empty sublayer, and the final norm."""
    total = D  # final norm
    for shape in get_adapter(model).layer_shapes():
        total += 2 * D * D_H * shape.num_heads + 2 * D * D_H * (shape.num_kv_heads or 0) + 3 * D * shape.intermediate_size
        total += D * (shape.num_heads > 0) + D * (shape.intermediate_size > 0)  # an emptied sublayer's norm goes
    return total


def test_the_task_is_declared_with_a_lower_is_better_metric():
    task = get_task("causal_lm")
    assert (task.kind, task.head, task.distill_loss, task.main_metric) == ("causal_lm", "causal_lm", "next_token_kl",
                                                                          "perplexity")
    assert not task.higher_is_better and task.calibration_sequences == 128 and task.max_length == 2048


def test_prune_save_reload_perplexity(tmp_path):
    """The whole pipeline: calibration windows -> Kprune -> surgery -> folder -> reload; the reloaded
    model's perplexity is the pruned model's, to the bit, and the budget is met on the saved model."""
    model = tiny_lm()
    result = prune(model, None, lm_sample(), PruneOptions(task="causal_lm", method="kprune", keep_params=0.7))
    assert result.report["budget"] == {"kind": "params", "keep": 0.7}
    assert result.report["method_log"]["config"]["temperature"] == 1.0  # the next-token distribution itself
    folder = result.save(tmp_path / "pruned")
    reloaded = load_pruned(folder)
    tokens = stream(seed=5)
    before, after = perplexity(result.model, tokens, window=16), perplexity(reloaded, tokens, window=16)
    assert before == after and after["window"] == 16 and math.isfinite(after["perplexity"])
    assert count_non_embedding_params(view(reloaded)) <= 0.7 * count_non_embedding_params(view(model))
    saved = json.loads((folder / "prune_report.json").read_text())
    assert saved["non_embedding_params_kept"] <= 0.7
    assert (folder / "structure.png").is_file()


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("budget", ["keep_flops", "keep_params"])
def test_every_method_meets_its_budget_on_a_decoder(method, budget):
    """Counted = hand count, and counted <= budget (a little below: units are whole)."""
    model = tiny_lm(seed=3)
    teacher = copy.deepcopy(model)
    result = prune(model, None, lm_sample(), PruneOptions(task="causal_lm", method=method, **{budget: 0.6}))
    pruned, seq_len = result.model, result.report["flops_seq_len"]
    assert count_non_embedding_params(view(pruned)) == hand_non_embedding_params(pruned)
    assert count_non_embedding_params(view(model)) == hand_non_embedding_params(model)
    if budget == "keep_params":
        kept = count_non_embedding_params(view(pruned)) / count_non_embedding_params(view(teacher))
        assert kept == pytest.approx(result.report["non_embedding_params_kept"])
        # At most the budget, within one head's worth of parameters of it.
        slack = param_unit_costs(get_adapter(teacher)).head / count_non_embedding_params(view(teacher))
        assert 0.6 - slack - 0.02 <= kept <= 0.6
    else:
        assert seq_len == 16  # FLOPs at the calibration window length
        assert 0.45 * full_flops(view(teacher), seq_len) < count_flops(view(pruned), seq_len) <= 0.6 * full_flops(view(teacher), seq_len)
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), teacher.state_dict().values(),
                                                 strict=True))  # the teacher is left unchanged


def test_an_out_of_range_parameter_budget_fails_clearly():
    with pytest.raises(ConfigError, match="keep_params must be in"):
        prune(tiny_lm(), None, lm_sample(), task="causal_lm", method="magnitude", keep_params=1.5)


# ---- sparse next-token targets ---------------------------------------------------------------------
def full_kl(student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    return F.kl_div(F.log_softmax(student, -1), F.softmax(teacher, -1), reduction="batchmean")


def test_sparse_targets_give_the_exact_kl_of_top_k_plus_tail():
    torch.manual_seed(0)
    t_logits, s_logits = torch.randn(2, 6, 40) * 3, torch.randn(2, 6, 40) * 3
    mask = torch.ones(2, 6, dtype=torch.long)
    mask[1, 4:] = 0
    t_out, s_out = SimpleNamespace(logits=t_logits), SimpleNamespace(logits=s_logits)
    rows = mask.bool()
    full = full_kl(s_logits[rows], t_logits[rows])
    dense = teacher_targets("lm", t_out, 1.0, mask, top_k=40)
    assert torch.allclose(distill_loss("lm", s_out, dense, 1.0, mask), full, atol=1e-5)
    sparse = teacher_targets("lm", t_out, 1.0, mask, top_k=5)
    # The coarsened KL by hand: the teacher's top 5 tokens and one outcome for all others.
    p, q = F.softmax(t_logits[rows], -1), F.softmax(s_logits[rows], -1)
    top = p.topk(5, -1).indices
    p_top, q_top = p.gather(-1, top), q.gather(-1, top)
    p_tail, q_tail = 1 - p_top.sum(-1), 1 - q_top.sum(-1)
    by_hand = ((p_top * (p_top / q_top).log()).sum(-1) + p_tail * (p_tail / q_tail).log()).mean()
    value = distill_loss("lm", s_out, sparse, 1.0, mask)
    assert torch.allclose(value, by_hand, atol=1e-5) and value <= full + 1e-6
    assert torch.allclose(sparse["tail"], p_tail, atol=1e-6)
    assert abs(float(distill_loss("lm", t_out, sparse, 1.0, mask))) < 1e-5  # student = teacher: no loss


def test_the_cached_targets_do_not_grow_with_the_vocabulary():
    """Kprune's teacher targets over the sample: (8 k + 4) bytes per non-padding token whatever the
    vocabulary, far below the dense N x V float32 distributions."""
    sizes = {}
    for vocab in (61, 997):
        sample = lm_sample(vocab)
        prepared = kprune_prepare(view(tiny_lm(vocab)), TaskData("lm", sample), KpruneConfig(top_k=4))
        sizes[vocab] = sum(sparse_target_bytes(t) for t in prepared.targets)
        assert sizes[vocab] == sample.num_tokens * (8 * 4 + 4)
        assert sizes[vocab] < sample.num_tokens * vocab * 4
    assert sizes[61] == sizes[997]


# ---- evaluation, benchmarking, compare, report, CLI -----------------------------------------------------
class CharTokenizer:
    def __call__(self, text, return_attention_mask=False, verbose=False):
        return {"input_ids": [0] + [b % 60 + 1 for b in text.encode("utf-8")]}


def test_perplexity_states_its_window(tmp_path):
    from prunekit.tasks.evaluate import default_window, evaluate

    (tmp_path / "train.txt").write_text("calibration text only\n" * 20)
    (tmp_path / "test.txt").write_text("the test text, scored\n" * 20)
    model = tiny_lm()
    result = evaluate(model, CharTokenizer(), "causal_lm", tmp_path)
    assert default_window(model) == 64  # 2048 capped at max_position_embeddings
    assert (result["window"], result["stride"], result["split"]) == (64, 64, "test")
    tokens = CharTokenizer()("\n\n".join(["the test text, scored\n"] * 20))["input_ids"]
    assert result["num_tokens"] == len(tokens)
    strided = evaluate(model, CharTokenizer(), "causal_lm", tmp_path, window=16, stride=8)
    assert (strided["window"], strided["stride"]) == (16, 8) and strided["num_scored"] == len(tokens) - 1
    with pytest.raises(ConfigError, match="window"):
        evaluate(model, CharTokenizer(), "sst2", tmp_path, window=16)


def test_bench_measures_prefill_and_decode_against_the_original():
    teacher = tiny_lm()
    pruned = prune(teacher, None, lm_sample(), task="causal_lm", method="magnitude", keep_params=0.5).model
    result = measure_generation(pruned, baseline=teacher, prompt_len=8, new_tokens=4, repeats=2)
    row = result["results"][0]
    assert result["mode"] == "greedy decode with KV cache" and len(row["prefill_ms_repeats"]) == 2
    for key in ("prefill_ms", "decode_tokens_per_s", "baseline_prefill_ms", "baseline_decode_tokens_per_s"):
        assert row[key] > 0
    assert row["prefill_speedup"] == pytest.approx(row["baseline_prefill_ms"] / row["prefill_ms"])
    with pytest.raises(ConfigError):
        measure_generation(pruned, new_tokens=1)


@pytest.fixture
def lm_folder(tmp_path) -> tuple[Path, Path]:
    """A tiny random Llama with llama-wiki-gqa's tokenizer, and a text folder from WikiText-2."""
    if not GQA.is_dir() or not WIKITEXT.is_dir():
        pytest.skip("needs ../shared (llama-wiki-gqa, wikitext2)")
    model_dir, data_dir = tmp_path / "teacher", tmp_path / "text"
    tiny_lm(vocab=8192, seed=4).save_pretrained(model_dir)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(GQA / name, model_dir / name)
    data_dir.mkdir()
    valid = (WIKITEXT / "wiki.valid.tokens").read_text(encoding="utf-8").splitlines()[:60]
    test = (WIKITEXT / "wiki.test.raw").read_text(encoding="utf-8").splitlines()[:12]
    (data_dir / "validation.txt").write_text("\n".join(valid) + "\n", encoding="utf-8")
    (data_dir / "test.txt").write_text("\n".join(test) + "\n", encoding="utf-8")
    return model_dir, data_dir


def test_compare_and_report_on_a_decoder(lm_folder, tmp_path):
    from prunekit.compare import compare
    from prunekit.io.reports import structure_report

    model_dir, data_dir = lm_folder
    result = compare(model_dir, "causal_lm", data_dir, tmp_path / "cmp", methods=["magnitude", "random"],
                     keep_params=[0.8, 0.6], num_sequences=4, calibration_length=32, eval_window=32,
                     max_eval_examples=4, bench_seq_len=8, bench_new_tokens=3, bench_rounds=1, save_models=True)
    assert result["budget_kind"] == "params" and result["higher_is_better"] is False
    assert result["teacher"]["metrics"]["window"] == 32
    for row in result["rows"]:
        assert row["non_embedding_params_kept"] <= row["keep_params"]
        assert len(row["kv_heads"]) == LAYERS and row["decode_speedup"] > 0
    table = (tmp_path / "cmp" / "compare.md").read_text()
    assert "lower is better" in table and "windows of 32 tokens" in table and "kv heads per layer" in table
    assert (tmp_path / "cmp" / "compare.png").is_file()
    saved = tmp_path / "cmp" / "models" / "magnitude-keep-params-0.6"
    assert structure_report(saved, tmp_path / "s.png").is_file()


def test_cli_prunes_a_causal_lm(lm_folder, tmp_path, capsys):
    from prunekit.cli import main

    model_dir, data_dir = lm_folder
    out = tmp_path / "out"
    code = main(["prune", "--model", str(model_dir), "--task", "causal_lm", "--data", str(data_dir),
                 "--method", "kwon", "--keep-params", "0.75", "--num-sequences", "4", "--seq-len", "32",
                 "--window", "32", "--no-bench", "--device", "cpu", "--out", str(out)])
    assert code == 0, capsys.readouterr().err
    report = json.loads((out / "prune_report.json").read_text())
    assert report["budget"] == {"kind": "params", "keep": 0.75} and report["non_embedding_params_kept"] <= 0.75
    assert report["sample"]["num_sequences"] == 4 and report["sample"]["max_length"] == 32
    assert report["flops_seq_len"] == 32
    assert report["eval"]["pruned"]["window"] == 32 and report["eval"]["teacher"]["split"] == "test"
    assert "perplexity" in capsys.readouterr().out
    bench = tmp_path / "bench.json"
    code = main(["bench", "--model", str(out), "--baseline", str(model_dir), "--generate", "--batch-sizes", "1",
                 "--seq-lens", "8", "--new-tokens", "3", "--rounds", "1", "--device", "cpu", "--json", str(bench)])
    assert code == 0
    row = json.loads(bench.read_text())["results"][0]
    assert row["prompt_len"] == 8 and row["new_tokens"] == 3 and row["decode_speedup"] > 0


@pytest.mark.parametrize("method", ["flap", "wanda_sp", "llm_pruner", "shortgpt"])
@pytest.mark.parametrize("budget", ["keep_flops", "keep_params"])
def test_the_llm_methods_meet_their_budget_through_the_pipeline(method, budget):
    """The pipeline's own check passes (the pruned model itself meets the budget, FLAP's added
    biases and ShortGPT's removed layers included) and the teacher is left unchanged."""
    model = tiny_lm(seed=4)
    teacher = copy.deepcopy(model)
    extra = {"protected_first": 0, "protected_last": 0} if method == "llm_pruner" else {}
    result = prune(model, None, lm_sample(), PruneOptions(task="causal_lm", method=method, method_options=extra,
                                                          **{budget: 0.6}))
    pruned, seq_len = result.model, result.report["flops_seq_len"]
    if budget == "keep_params":
        assert count_non_embedding_params(view(pruned)) <= 0.6 * count_non_embedding_params(view(teacher))
    else:
        assert count_flops(view(pruned), seq_len) <= 0.6 * full_flops(view(teacher), seq_len) * (1 + 1e-9)
    assert result.uniform == (method == "shortgpt")  # ShortGPT's folders are the stock class
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), teacher.state_dict().values(),
                                                 strict=True))
