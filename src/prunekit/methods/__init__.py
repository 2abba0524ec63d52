"""Pruning methods, one module each; dispatch is a lookup in ``METHODS`` (style.md §2-3).

Every method has the signature ``method(model, sample, kind, config) -> (PruningPlan, log)``: it
prunes ``model`` in place (physically) and returns the record of what it kept.

A method may also have a ``prepare(model, sample, kind, config)`` step whose result does not
depend on the budget (Kwon et al.'s Fisher gradients, Kprune's teacher pass and first knowledge
pass); it is computed once on the unpruned model
and passed to every budget's run as ``run(..., prepared=state)`` (one calibration, many budgets).
"""

from __future__ import annotations

import difflib
from collections.abc import Callable
from dataclasses import dataclass, field, fields
from typing import Any

from ..errors import ConfigError
from .baselines import MagnitudeConfig, RandomConfig, magnitude, random_prune
from .cofi import CofiConfig, cofi
from .kprune import KpruneConfig, kprune, kprune_prepare
from .kwon import KwonConfig, kwon, kwon_fisher


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
    # Training-based (CoFi): trains on the task's train split instead of a calibration sample and
    # has its own entry point in prunekit.api.
    training: bool = False

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
        "cofi", CofiConfig, cofi, training=True,
        description="CoFi (ACL 2022): L0 gates on heads, sublayers, neurons and hidden dims, trained with distillation",
    ),
    "random": MethodSpec(
        "random", RandomConfig, random_prune, sample_size={"num_sequences": 2048},
        description="baseline: units kept in a seeded random order",
    ),
}


def get_method(name: str) -> MethodSpec:
    if name not in METHODS:
        close = difflib.get_close_matches(name, list(METHODS), n=1)
        hint = f" Did you mean {close[0]!r}?" if close else ""
        raise ConfigError(f"unknown pruning method {name!r}; available: {', '.join(sorted(METHODS))}.{hint}")
    return METHODS[name]
