"""Pruning methods, one module each; dispatch is a lookup in ``METHODS`` (style.md §2-3).

One contract for every method, calibration-based or training-based:

    method(view, data, config) -> (PruningPlan, log)

``view`` is the teacher's model view (a ``ModelAdapter``, built once by the pipeline), which the method
leaves unchanged; ``data`` is a :class:`prunekit.tasks.TaskData` (the loss kind and a calibration
sample, or training features with a dev scorer: methods never build datasets or evaluate);
``config`` is the method's config. The plan records everything the method decided and
``prunekit.core.surgery.apply_plan`` (the one surgery path) turns it into the pruned model; the log is
JSON for the report.

A method may also have a ``prepare(view, data, config)`` step whose result does not depend on the
budget (Kwon et al.'s Fisher gradients, Kprune's teacher pass and first knowledge pass); it is
computed once on the teacher and handed to every budget's run as ``data.prepared`` (one
calibration, many budgets).
"""

from __future__ import annotations

import difflib
from collections.abc import Callable
from dataclasses import dataclass, field, fields
from typing import Any

from prunekit.core.errors import ConfigError
from prunekit.methods.baselines import MagnitudeConfig, RandomConfig, magnitude, random_prune
from prunekit.methods.cofi import CofiConfig, cofi, cofi_report_fields
from prunekit.methods.flap import FlapConfig, flap
from prunekit.methods.kprune import KpruneConfig, kprune, kprune_prepare
from prunekit.methods.kwon import KwonConfig, kwon, kwon_fisher
from prunekit.methods.llm_pruner import LlmPrunerConfig, llm_pruner
from prunekit.methods.shortgpt import ShortGptConfig, shortgpt
from prunekit.methods.wanda_sp import WandaSpConfig, wanda_sp


@dataclass(frozen=True)
class MethodSpec:
    name: str
    config_class: type
    run: Callable[..., Any]
    needs_labels: bool = False
    description: str = ""
    prepare: Callable[..., Any] | None = None  # budget-independent first step, reused across budgets
    # Default calibration sample size: {"num_tokens": N} or {"num_sequences": N} (spec §1.2, §3.1).
    sample_size: dict[str, int] = field(default_factory=lambda: {"num_tokens": 100_000})
    # Training-based (CoFi): trains on the task's train split (prunekit.tasks.build_training_data)
    # instead of a calibration sample.
    training: bool = False
    # Extra report fields from (config, log), e.g. CoFi's achieved sparsity.
    report_fields: Callable[[Any, dict], dict] | None = None

    def make_config(self, **options: Any) -> Any:
        """The method's config from keyword options; unknown names get a clear error."""
        known = {f.name for f in fields(self.config_class)}
        unknown = sorted(set(options) - known)
        if unknown:
            raise ConfigError(
                f"method {self.name!r} has no option(s) {', '.join(unknown)}; its options are {', '.join(sorted(known))}"
            )
        return self.config_class(**options)


METHODS: dict[str, MethodSpec] = {
    "kprune": MethodSpec("kprune", KpruneConfig, kprune, prepare=kprune_prepare,
                         description="Kprune (ICLR 2024), retraining-free"),
    "kwon": MethodSpec(
        "kwon", KwonConfig, kwon, needs_labels=True, prepare=kwon_fisher, sample_size={"num_sequences": 2048},
        description="Kwon et al. (NeurIPS 2022): Fisher mask search, rearrangement, mask tuning",
    ),
    "magnitude": MethodSpec(
        "magnitude", MagnitudeConfig, magnitude, sample_size={"num_sequences": 2048},
        description="baseline: weight-norm importance, global knapsack search, no tuning",
    ),
    "cofi": MethodSpec(
        "cofi", CofiConfig, cofi, training=True, report_fields=cofi_report_fields,
        description="CoFi (ACL 2022): L0 gates on heads, sublayers, neurons and hidden dims, trained with distillation",
    ),
    "random": MethodSpec(
        "random", RandomConfig, random_prune, sample_size={"num_sequences": 2048},
        description="baseline: units kept in a seeded random order",
    ),
    # The LLM field's retraining-free methods (decoders.md §1); 128 calibration sequences, as their papers.
    "flap": MethodSpec(
        "flap", FlapConfig, flap, sample_size={"num_sequences": 128},
        description="FLAP (AAAI 2024): fluctuation scores, adaptive widths, bias compensation",
    ),
    "wanda_sp": MethodSpec(
        "wanda_sp", WandaSpConfig, wanda_sp, sample_size={"num_sequences": 128},
        description="Wanda-sp (FLAP's baseline): |W|·‖X‖ per head and neuron, one ratio in every layer",
    ),
    "llm_pruner": MethodSpec(
        "llm_pruner", LlmPrunerConfig, llm_pruner, needs_labels=True, sample_size={"num_sequences": 10},
        description="LLM-Pruner (NeurIPS 2023) without LoRA: first-order Taylor importance of coupled groups",
    ),
    "shortgpt": MethodSpec(
        "shortgpt", ShortGptConfig, shortgpt, sample_size={"num_sequences": 128},
        description="ShortGPT (2024): whole layers of lowest Block Influence removed",
    ),
}


def get_method(name: str) -> MethodSpec:
    if name not in METHODS:
        close = difflib.get_close_matches(name, list(METHODS), n=1)
        hint = f" Did you mean {close[0]!r}?" if close else ""
        raise ConfigError(f"unknown pruning method {name!r}; available: {', '.join(sorted(METHODS))}.{hint}")
    return METHODS[name]
