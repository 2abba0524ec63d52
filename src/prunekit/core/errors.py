"""Errors prunekit raises for bad input. Each message names the problem and the fix; the CLI
prints them as one line instead of a traceback."""


class PrunekitError(Exception):
    """Base class of prunekit's user-facing errors."""


class DataError(PrunekitError, ValueError):
    """Missing, empty or malformed data (files, columns, labels)."""


class ConfigError(PrunekitError, ValueError):
    """An option out of range or inconsistent with another (budget, task, method, output folder)."""


class ModelError(PrunekitError, ValueError):
    """A model that prunekit cannot use: unsupported architecture, or a folder that is not a model."""
