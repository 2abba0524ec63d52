"""The files that make a saved pruned folder explain and load itself (issue 11, item 4).

- ``README.md``: what was pruned, from what, by which method to which budget, and how to load it.
- The remote code (from ``prunekit/families/remote_code``): ``configuration_prunekit.py`` (the one
  factory of the pruned config and model classes, and what the families share) and the family's
  modeling file (its adapter's ``remote_code``: its placeholder modules and builder), named in
  ``config.json``'s ``auto_map``: plain transformers without prunekit then rebuilds the pruned
  model with ``trust_remote_code=True``. These files never import prunekit. prunekit imports the
  same modules and registers the same classes, so with prunekit imported no remote code runs.
"""

from __future__ import annotations

import importlib
import json
import shutil
from pathlib import Path
from types import ModuleType
from typing import Any

from prunekit.families import ADAPTERS

# The files live with the model families (prunekit.families.remote_code); copied into folders from here.
REMOTE_CODE_DIR = Path(__file__).parents[1] / "families" / "remote_code"
REMOTE_CODE_PACKAGE = "prunekit.families.remote_code"
CONFIG_FILE = "configuration_prunekit.py"  # the factory: every family's folders carry it
README = "README.md"
_AUTO_FOR_HEAD = {"sequence_classification": "AutoModelForSequenceClassification",
                  "question_answering": "AutoModelForQuestionAnswering", "causal_lm": "AutoModelForCausalLM",
                  "base": "AutoModel"}


def remote_files(family: str) -> tuple[str, str] | None:
    """The remote-code files of ``family``: the shared configuration file and the modeling file its
    adapter names (``remote_code``); None if it has none."""
    adapter = _adapter(family)
    if adapter is None or not getattr(adapter, "remote_code", None):
        return None
    return CONFIG_FILE, Path(adapter.remote_code).name


def remote_module(adapter: Any) -> ModuleType | None:
    """The modeling module an adapter names (``prunekit.families.remote_code.<file>``), or None."""
    if not getattr(adapter, "remote_code", None):
        return None
    return importlib.import_module(f"{REMOTE_CODE_PACKAGE}.{Path(adapter.remote_code).stem}")


def pruned_classes(adapter: Any) -> dict[str, type]:
    """{task head: Pruned<Model>} of an adapter's model classes, made by its modeling module (the
    classes remote code defines, the same objects every call); empty without remote code."""
    module = remote_module(adapter)
    if module is None:
        return {}
    return {head: getattr(module, "Pruned" + cls.__name__) for head, cls in adapter.model_classes.items()}


def auto_map(family: str) -> dict[str, str]:
    """config.json's ``auto_map`` for a pruned model of ``family``: the configuration class and,
    for each head of the family's adapter, its pruned class in the remote code."""
    files = remote_files(family)
    if files is None:
        raise ValueError(f"no remote code for the {family} family")
    config_module, model_module = (name.removesuffix(".py") for name in files)
    classes = pruned_classes(_adapter(family))
    config_class = next(iter(classes.values())).config_class.__name__
    mapping = {"AutoConfig": f"{config_module}.{config_class}"}
    for head, cls in classes.items():
        mapping[_AUTO_FOR_HEAD[head]] = f"{model_module}.{cls.__name__}"
    return mapping


def add_remote_code(folder: Path) -> None:
    """Copy the remote-code files into ``folder`` and name them in its config.json."""
    config_file = folder / "config.json"
    config = json.loads(config_file.read_text())
    family = config.get("prunekit_base_model_type")
    files = remote_files(family) if isinstance(family, str) else None
    if files is None:
        return  # not a prunekit config, or a family without remote code: nothing to map
    for name in files:
        shutil.copyfile(REMOTE_CODE_DIR / name, folder / name)
    config["auto_map"] = auto_map(family)
    config_file.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")


def _adapter(family: str | None) -> Any:
    return ADAPTERS.get(family or "")


def head_of_architectures(architectures: list[str]) -> str:
    """The task head of a saved model: by the adapters' own class names and their pruned classes'
    first (GPT-2's causal LM is ``GPT2LMHeadModel``), then by the usual suffixes."""
    by_name = {cls.__name__: head for adapter in ADAPTERS.values() for head, cls in adapter.model_classes.items()}
    by_name |= {"Pruned" + name: head for name, head in by_name.items()}
    for name in architectures:
        if name in by_name:
            return by_name[name]
    head = "base"
    for name in architectures:
        if "QuestionAnswering" in name:
            head = "question_answering"
        elif "SequenceClassification" in name:
            head = "sequence_classification"
        elif "CausalLM" in name:
            head = "causal_lm"
    return head


def _head(config: dict[str, Any]) -> str:
    return head_of_architectures(config.get("architectures") or [])


def readme_text(name: str, config: dict[str, Any], report: dict[str, Any] | None, tokenizer: bool = False) -> str:
    """A short README.md for a saved folder called ``name`` (``tokenizer``: it holds one): what,
    from what, how to load."""
    report = report or {}
    family = config.get("prunekit_base_model_type", config.get("model_type", "?"))
    auto = _AUTO_FOR_HEAD[_head(config)]
    files = remote_files(family) if isinstance(family, str) else None
    layers = config.get("prunekit_layers") or []
    lines = [f"# A {family} model pruned by prunekit", ""]
    what = []
    if report.get("method"):
        budget = report.get("budget") or {}
        what.append(f"- Method: `{report['method']}`"
                    + (f", budget keep_{budget['kind']} {budget['keep']:g}" if budget else "")
                    + (f", task `{report['task']}`" if report.get("task") else "") + ".")
    if report.get("teacher"):
        what.append(f"- Pruned from: `{report['teacher']}`.")
    if report.get("flops_kept") is not None:
        what.append(f"- Encoder FLOPs kept: {report['flops_kept']:.4f}; parameters kept: "
                    f"{report.get('params_kept', float('nan')):.4f}"
                    + (f"; achieved keep_{report['budget']['kind']} {report['achieved_keep']:.4f}"
                       if report.get("achieved_keep") is not None else "") + ".")
    if layers:
        heads = ", ".join(str(layer.get("num_heads")) for layer in layers)
        neurons = ", ".join(str(layer.get("intermediate_size")) for layer in layers)
        what.append(f"- Heads kept per layer: {heads}; FFN neurons kept per layer: {neurons}.")
    if config.get("prunekit_hidden_size"):
        what.append(f"- Residual stream narrowed to {config['prunekit_hidden_size']} dimensions.")
    version = (report.get("versions") or {}).get("prunekit")
    what.append("- Written by prunekit" + (f" {version}" if version else "")
                + "; the full record is in `prune_report.json`." if report else "- Written by prunekit.")
    if "prunekit_base_model_type" not in config:  # a --uniform folder: the family's stock class
        architecture = (config.get("architectures") or ["the family's class"])[0]
        lines += what + ["", "## Loading it", "", f"Every layer has the same widths, so this is a stock "
                         f"`{architecture}` folder: it loads with no prunekit and no remote code.", "",
                         "```python", f"from transformers import {auto}",
                         f'model = {auto}.from_pretrained("PATH")', "```", ""]
        return "\n".join(lines).replace("PATH", name)
    family = config.get("prunekit_base_model_type")
    files = remote_files(family) if isinstance(family, str) else None
    lines += what + ["", "## Loading it", "", "```python", "import prunekit",
                     'model = prunekit.load_pruned("PATH")', "", "# or, after `import prunekit`, the Auto class:",
                     f"from transformers import {auto}", f'model = {auto}.from_pretrained("PATH")', "```", ""]
    if files is not None:  # a family without remote code (yet) needs prunekit to load
        lines += ["Without prunekit installed, plain transformers runs the code saved in this folder "
                  f"({', '.join(f'`{file}`' for file in files)}, which do not import prunekit):", "",
                  "```python", f"from transformers import {auto}",
                  f'model = {auto}.from_pretrained("PATH", trust_remote_code=True)', "```", ""]
        if tokenizer:  # AutoTokenizer reads config.json first, which names this code: say not to run it
            lines += ["The tokenizer alone loads with `AutoTokenizer.from_pretrained(\"PATH\", "
                      "trust_remote_code=False)` (without the argument transformers asks whether to run "
                      "the code above).", ""]
    lines += ["The per-layer widths are `prunekit_layers` in `config.json` (a layer may keep zero "
              "heads or neurons; a removed sublayer is the identity).", ""]
    return "\n".join(lines).replace("PATH", name)


def write_readme(folder: Path, report: dict[str, Any] | None, name: str) -> None:
    """Write README.md into ``folder`` (a temporary folder that becomes ``name``)."""
    config = json.loads((folder / "config.json").read_text())
    tokenizer = (folder / "tokenizer_config.json").is_file()
    (folder / README).write_text(readme_text(name, config, report, tokenizer))
