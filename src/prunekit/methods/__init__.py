"""Pruning methods, one module each; dispatch is a lookup in ``METHODS`` (style.md §2-3).

Every method has the signature ``method(model, sample, kind, config) -> (PruningPlan, log)``: it
prunes ``model`` in place (physically) and returns the record of what it kept.
"""

from __future__ import annotations

import difflib
from collections.abc import Callable
from dataclasses import dataclass, fields
from typing import Any

from ..errors import ConfigError
from .kprune import KpruneConfig, kprune


@dataclass(frozen=True)
class MethodSpec:
    name: str
    config_class: type
    run: Callable[..., Any]
    needs_labels: bool = False
    description: str = ""

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
    "kprune": MethodSpec("kprune", KpruneConfig, kprune, description="Kprune (ICLR 2024), retraining-free"),
}


def get_method(name: str) -> MethodSpec:
    if name not in METHODS:
        close = difflib.get_close_matches(name, list(METHODS), n=1)
        hint = f" Did you mean {close[0]!r}?" if close else ""
        raise ConfigError(f"unknown pruning method {name!r}; available: {', '.join(sorted(METHODS))}.{hint}")
    return METHODS[name]
