"""Import paths of the 0.1 layout, kept working after the package was regrouped.

`prunekit.surgery`, `prunekit.data.squad`, `prunekit.adapters` and the other modules that moved
into `core/`, `families/`, `methods/` and `tasks/` still import, with a DeprecationWarning that
names the new path. An old module is answered with the module at its new place (the same object);
an old package (`prunekit.data`, `prunekit.adapters`, ...) with a stand-in whose attributes are the
new package's, so that importing an old submodule through it (`prunekit.data.glue`) cannot replace
an attribute of the new package (`prunekit.tasks.glue`).
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.util
import sys
import types
import warnings

_FAMILIES = ("bert", "roberta", "distilbert", "decoder", "llama", "qwen2", "qwen3", "opt", "gpt2")
_REMOTE = ("configuration_prunekit", "modeling_prunekit", "modeling_prunekit_decoder", "modeling_prunekit_gpt2",
           "modeling_prunekit_opt")
# GPT-2's and OPT's own configuration files became the shared one (its factory makes their classes).
_REMOTE_CONFIGS = ("configuration_prunekit_gpt2", "configuration_prunekit_opt")

MOVED: dict[str, str] = {
    "prunekit.errors": "prunekit.core.errors",
    "prunekit.runtime": "prunekit.core.runtime",
    "prunekit.masks": "prunekit.core.masks",
    "prunekit.surgery": "prunekit.core.surgery",
    "prunekit.accounting": "prunekit.core.accounting",
    "prunekit.outdir": "prunekit.io.outdir",
    "prunekit.folder_files": "prunekit.io.files",
    "prunekit.core.io": "prunekit.io.folders",
    "prunekit.core.outdir": "prunekit.io.outdir",
    "prunekit.core.folder_files": "prunekit.io.files",
    "prunekit.bench": "prunekit.deploy.bench",
    "prunekit.export": "prunekit.deploy.export",
    "prunekit.onnxrt": "prunekit.deploy.onnxrt",
    "prunekit.reports": "prunekit.io.reports",
    "prunekit.uniform": "prunekit.core.uniform",
    "prunekit.preflight": "prunekit.core.preflight",
    "prunekit.adapters": "prunekit.families",
    "prunekit.adapters.base": "prunekit.core.view",
    **{f"prunekit.adapters.{name}": f"prunekit.families.{name}" for name in _FAMILIES},
    "prunekit.remote_code": "prunekit.families.remote_code",
    **{f"prunekit.remote_code.{name}": f"prunekit.families.remote_code.{name}" for name in _REMOTE},
    **{f"{package}.{name}": "prunekit.families.remote_code.configuration_prunekit"
       for package in ("prunekit.remote_code", "prunekit.families.remote_code") for name in _REMOTE_CONFIGS},
    "prunekit.search": "prunekit.methods.search",
    "prunekit.lut": "prunekit.methods.lut",
    "prunekit.layerwise": "prunekit.methods.layerwise",
    "prunekit.l0": "prunekit.methods.cofi.l0",
    "prunekit.methods.cofi_target": "prunekit.methods.cofi.target",
    "prunekit.data": "prunekit.tasks",
    "prunekit.data.glue": "prunekit.tasks.glue.data",
    "prunekit.data.squad": "prunekit.tasks.qa",
    "prunekit.data.qa": "prunekit.tasks.qa.data",
    "prunekit.data.causal_lm": "prunekit.tasks.causal_lm.data",
    "prunekit.data.calibration": "prunekit.tasks.calibration",
    "prunekit.data.dispatch": "prunekit.tasks.dispatch",
    "prunekit.data.task_data": "prunekit.tasks.task_data",
    "prunekit.metrics": "prunekit.tasks.metrics",
    "prunekit.metrics.glue": "prunekit.tasks.glue.metrics",
    "prunekit.metrics.squad": "prunekit.tasks.qa.metrics",
    "prunekit.evaluate": "prunekit.tasks.evaluate",
    "prunekit.finetune": "prunekit.tasks.finetune",
    "prunekit.losses": "prunekit.tasks.losses",
}


class _MovedModules(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """Answers an old module name with the already importable module at its new place."""

    def find_spec(self, fullname, path=None, target=None):
        if fullname not in MOVED:
            return None
        return importlib.util.spec_from_loader(fullname, self)

    def create_module(self, spec):
        new = MOVED[spec.name]
        warnings.warn(f"{spec.name} moved to {new}; import it from there", DeprecationWarning, stacklevel=2)
        module = importlib.import_module(new)
        if not any(old.startswith(spec.name + ".") for old in MOVED):
            return module
        stand_in = types.ModuleType(spec.name, module.__doc__)
        stand_in.__path__ = []  # a package, so its old submodules import
        stand_in.__getattr__ = lambda name: getattr(module, name)
        stand_in.__all__ = list(getattr(module, "__all__", ()))
        return stand_in

    def exec_module(self, module) -> None:
        pass  # the module at the new place is already executed


def install() -> None:
    # First in line: an old name such as prunekit.data.glue would otherwise find the new package
    # prunekit.tasks.glue through its parent's search path.
    if not any(isinstance(finder, _MovedModules) for finder in sys.meta_path):
        sys.meta_path.insert(0, _MovedModules())
