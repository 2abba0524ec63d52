"""The task families' registry: ``family_of(task)`` answers which handler a task's kind has.

It sits above the protocol (`prunekit.tasks.family`) and the three built-in families, which it
registers; a new kind of task is one `TaskFamily` subclass handed to `register_family`.
"""

from __future__ import annotations

from prunekit.core.errors import ConfigError
from prunekit.tasks.causal_lm.family import CausalLmFamily
from prunekit.tasks.family import TaskFamily
from prunekit.tasks.glue.family import GlueFamily
from prunekit.tasks.qa.family import QaFamily
from prunekit.tasks.spec import TaskSpec, add_task_kind, get_task

__all__ = ["family_of", "register_family"]

_FAMILIES: dict[str, TaskFamily] = {family.kind: family for family in (GlueFamily(), QaFamily(), CausalLmFamily())}


def register_family(family: TaskFamily) -> TaskFamily:
    """Register (or replace) the handler of ``family.kind``, which TaskSpecs may then name; returns it."""
    if not family.kind:
        raise ConfigError(f"{type(family).__name__} names no kind; set its class attribute `kind`")
    add_task_kind(family.kind)
    _FAMILIES[family.kind] = family
    return family


def family_of(task: TaskSpec | str) -> TaskFamily:
    """The family that handles a task (a TaskSpec or a registered task name), by its kind."""
    spec = get_task(task)
    families = _FAMILIES
    if spec.kind not in families:
        raise ConfigError(f"task {spec.name!r} has kind {spec.kind!r}, which no task family handles "
                          f"(registered: {', '.join(sorted(families))}); register one with register_family")
    return families[spec.kind]
