"""The pipeline (prunekit.api): the teacher's view is built once per run, and a caller's model is
never changed, for every family (issue 20, item 1)."""

from __future__ import annotations

import pytest
import torch
import transformers
from conftest import build_tiny_model
from torch import nn

import prunekit
import prunekit.families as families
from prunekit.core.view import ModelAdapter

FAMILIES = ("bert", "roberta", "distilbert", "llama", "mistral", "qwen2", "qwen3", "opt", "gpt2")


def decoder_classifier(family: str, vocab: int) -> nn.Module:
    """A tiny 2-label decoder classifier of ``family`` (grouped-query attention where it has it)."""
    shape = dict(vocab_size=vocab, num_labels=2, pad_token_id=0, max_position_embeddings=128)
    if family == "gpt2":
        config = transformers.GPT2Config(n_embd=32, n_layer=2, n_head=4, n_inner=48, n_positions=128,
                                         **{k: v for k, v in shape.items() if k != "max_position_embeddings"})
        return transformers.GPT2ForSequenceClassification(config)
    if family == "opt":
        config = transformers.OPTConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, ffn_dim=48,
                                        word_embed_proj_dim=32, **shape)
        return transformers.OPTForSequenceClassification(config)
    config_class = {"llama": transformers.LlamaConfig, "mistral": transformers.MistralConfig,
                    "qwen2": transformers.Qwen2Config, "qwen3": transformers.Qwen3Config}[family]
    config = config_class(hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
                          num_key_value_heads=2, head_dim=8, **shape)
    model_class = {"llama": transformers.LlamaForSequenceClassification,
                   "mistral": transformers.MistralForSequenceClassification,
                   "qwen2": transformers.Qwen2ForSequenceClassification,
                   "qwen3": transformers.Qwen3ForSequenceClassification}[family]
    return model_class(config)


def teacher_of(family: str, vocab: int) -> nn.Module:
    torch.manual_seed(0)
    if family in ("bert", "roberta", "distilbert"):
        return build_tiny_model(family, "classification", num_labels=2)
    return decoder_classifier(family, vocab).eval()


@pytest.fixture
def views(monkeypatch: pytest.MonkeyPatch) -> dict[str, list]:
    """Every adapter built (with its model, kept alive so no id is reused) and every registry lookup."""
    seen: dict[str, list] = {"models": [], "lookups": []}
    build, lookup = ModelAdapter.__init__, families.adapter_class

    def counted_init(self, model):
        seen["models"].append(model)
        build(self, model)

    def counted_lookup(model):
        seen["lookups"].append(model)
        return lookup(model)

    monkeypatch.setattr(ModelAdapter, "__init__", counted_init)
    monkeypatch.setattr(families, "adapter_class", counted_lookup)
    return seen


@pytest.mark.parametrize("method", ["kprune", "kwon", "magnitude"])
@pytest.mark.parametrize("family", ["bert", "llama", "gpt2"])
def test_the_teachers_view_is_built_once_per_run(family, method, views, tokenizer, sst2_dir) -> None:
    teacher = teacher_of(family, tokenizer.vocab_size)
    prunekit.prune(teacher, tokenizer, sst2_dir, task="sst2", method=method, keep_flops=0.6, num_tokens=300)
    assert len(views["lookups"]) == 1, "the registry is asked once per run"
    per_model: dict[int, int] = {}
    for model in views["models"]:
        per_model[id(model)] = per_model.get(id(model), 0) + 1
    assert max(per_model.values()) == 1, "a model got a second view"
    # The teacher (or, for GPT-2, the pipeline's own copy of it), a method's working copies and the
    # student the plan is applied to: each viewed once.
    assert 2 <= len(per_model) <= 3


def _snapshot(model: nn.Module) -> tuple:
    return ([(name, type(module)) for name, module in model.named_modules()],
            {name: tensor.clone() for name, tensor in model.state_dict().items()},
            [(name, p.requires_grad) for name, p in model.named_parameters()], model.training, type(model))


@pytest.mark.parametrize("family", FAMILIES)
def test_the_callers_model_is_never_changed(family, tokenizer, sst2_dir) -> None:
    """Module types, weights, parameter objects (an optimizer built before the call keeps them all),
    requires_grad flags, train/eval mode and class are as before, after Kprune and the uniform path."""
    teacher = teacher_of(family, tokenizer.vocab_size).train()
    optimizer = torch.optim.SGD(teacher.parameters(), lr=0.1)
    before = _snapshot(teacher)
    parameters = list(teacher.parameters())
    prunekit.prune(teacher, tokenizer, sst2_dir, task="sst2", method="kprune", keep_flops=0.6, num_tokens=300)
    if family not in ("bert", "roberta", "distilbert", "opt", "gpt2"):
        prunekit.prune(teacher, tokenizer, sst2_dir, task="sst2", method="magnitude", keep_flops=0.6,
                       num_tokens=300, uniform=True)
    after = _snapshot(teacher)
    assert after[0] == before[0] and after[2:] == before[2:]
    assert after[1].keys() == before[1].keys()
    assert all(torch.equal(after[1][name], before[1][name]) for name in before[1])
    assert [p for group in optimizer.param_groups for p in group["params"]] == parameters
    assert all(a is b for a, b in zip(teacher.parameters(), parameters, strict=True))


@pytest.mark.parametrize("family", ["gpt2", "opt"])
def test_counting_a_callers_model_does_not_change_it(family, tokenizer) -> None:
    teacher = teacher_of(family, tokenizer.vocab_size)
    before = _snapshot(teacher)
    assert prunekit.count_flops(teacher, 16) > 0 and prunekit.count_params(teacher) > 0
    assert _snapshot(teacher)[0] == before[0]
