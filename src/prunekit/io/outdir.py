"""Output folders: checked before any work, written atomically, replaced only when prunekit owns them.

Every folder prunekit writes (a pruned model, a fine-tuned teacher, a comparison, an export) gets a
marker file, ``.prunekit-output.json``, that lists the files prunekit put there. ``overwrite``
replaces a folder only when that marker is there and the folder holds nothing else, and never the
current folder, a folder that holds the current folder, or a folder that contains or is contained
by one of the run's inputs (the model, the data). Anything else is refused with one line that says
why and what to do, because the folder may be the user's only copy of a fine-tuned model.

A folder is written into a hidden temporary folder beside the target and renamed into place only
when complete; the folder it replaces is kept until then. Hidden leftovers of a killed run
(``.NAME.tmp-PID-*``, ``.NAME.old-PID``) are removed by the next run that writes there, once their
process is gone.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import tempfile
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path

from prunekit.core.errors import ConfigError

logger = logging.getLogger(__name__)

MARKER = ".prunekit-output.json"

# Folders written before the marker existed: recognised only when every file in them is one of
# these names and one of prunekit's own report files is there.
_LEGACY_REPORTS = {"prune_report.json", "finetune_report.json", "compare.json"}
_LEGACY_FILES = _LEGACY_REPORTS | {
    "config.json", "model.safetensors", "generation_config.json", "structure.png", "compare.md",
    "compare.png", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.txt",
    "vocab.json", "merges.txt", "added_tokens.json", "chat_template.jinja",
}


def _same_or_inside(inner: Path, outer: Path) -> bool:
    return inner == outer or outer in inner.parents


def _owned_by_prunekit(folder: Path) -> tuple[bool, str]:
    """(True, "") when prunekit wrote ``folder`` and nothing else is in it; else (False, why)."""
    files = {p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file() or p.is_symlink()}
    marker = folder / MARKER
    if marker.is_file():
        try:
            written = set(json.loads(marker.read_text()).get("files", []))
        except (json.JSONDecodeError, AttributeError, UnicodeDecodeError):
            return False, f"its marker {MARKER} is unreadable"
        foreign = sorted(files - written - {MARKER})
        if foreign:
            more = f" and {len(foreign) - 1} more" if len(foreign) > 1 else ""
            return False, f"it holds {foreign[0]}{more}, which prunekit did not write"
        return True, ""
    if files & _LEGACY_REPORTS and files <= _LEGACY_FILES:
        return True, ""  # an output of an earlier prunekit release, before the marker
    return False, "prunekit did not write it (it has no prunekit marker)"


def check_output_dir(out_dir: str | Path, overwrite: bool = False, inputs: Iterable[str | Path | None] = ()) -> Path:
    """Fail early, before any work, if ``out_dir`` may not be written (or replaced, with
    ``overwrite``). ``inputs`` are the run's input paths (model, data) that the output must not
    touch; names that are not local paths (hub ids) are ignored. Returns ``out_dir`` as a Path."""
    out = Path(out_dir).expanduser()
    target = out.resolve()
    refuse = "choose another output folder"
    cwd = Path.cwd().resolve()
    if _same_or_inside(cwd, target):
        what = "the current folder" if target == cwd else "a folder that holds the current folder"
        raise ConfigError(f"output folder {out} is {what}; prunekit never writes over it: {refuse}")
    for given in inputs:
        if given is None or not Path(given).expanduser().exists():
            continue
        source = Path(given).expanduser().resolve()
        if _same_or_inside(source, target) or _same_or_inside(target, source):
            how = "is" if source == target else ("holds" if _same_or_inside(source, target) else "is inside")
            raise ConfigError(f"output folder {out} {how} the input {given}; prunekit never writes over its "
                              f"inputs: {refuse} outside it")
    if out.exists() and not out.is_dir():
        raise ConfigError(f"output path {out} exists and is a file, not a folder; {refuse}")
    if out.is_dir() and any(out.iterdir()):
        if not overwrite:
            raise ConfigError(f"output folder {out} already exists and is not empty; {refuse} "
                              "or pass --overwrite (overwrite=True in Python)")
        owned, why = _owned_by_prunekit(out)
        if not owned:
            raise ConfigError(f"--overwrite refused: {out} is not a folder prunekit wrote ({why}); {refuse}, "
                              "or move its files away yourself")
    _check_creatable(out)
    return out


def _check_creatable(out: Path) -> None:
    """The nearest existing ancestor must be a writable folder, so the write at the end succeeds."""
    parent = out.parent.resolve()
    while not parent.exists():
        parent = parent.parent
    if not parent.is_dir():
        raise ConfigError(f"output folder {out} cannot be created: {parent} is a file; choose another output folder")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise ConfigError(f"output folder {out} cannot be created: {parent} is not writable; "
                          "choose another output folder")


_LEFTOVER = re.compile(r"\.(?P<name>.+)\.(?:tmp|old)-(?P<pid>\d+)(?:-.*)?$")


def _pid_alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def clean_leftovers(out: Path) -> None:
    """Remove the hidden temporary folders a killed run left beside ``out``; if a run died between
    moving the old folder aside and moving the new one in, put the old one back."""
    if not out.parent.is_dir():
        return
    for path in out.parent.iterdir():
        match = _LEFTOVER.match(path.name)
        if not match or match["name"] != out.name or not path.is_dir() or _pid_alive(int(match["pid"])):
            continue
        if ".old-" in path.name and not out.exists():
            logger.warning("restoring %s from %s, left by a run that was killed while replacing it", out, path)
            os.replace(path, out)
            continue
        logger.info("removing %s, left by a run that was killed", path)
        shutil.rmtree(path, ignore_errors=True)


def _finish(folder: Path) -> None:
    """Write the marker and give the tree the usual permissions (mkdtemp makes it 0700)."""
    files = sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file())
    (folder / MARKER).write_text(json.dumps({"written_by": "prunekit", "files": files}, indent=1) + "\n")
    umask = os.umask(0)
    os.umask(umask)
    for path in [folder, *folder.rglob("*")]:
        if path.is_dir():
            path.chmod(0o777 & ~umask)
        elif path.is_file():
            path.chmod(0o666 & ~umask)


@contextmanager
def atomic_output_dir(out_dir: str | Path, overwrite: bool = False,
                      inputs: Iterable[str | Path | None] = ()) -> Iterator[Path]:
    """Yield a temporary folder; on success it replaces ``out_dir``, on failure it is deleted."""
    inputs = list(inputs)
    out = check_output_dir(out_dir, overwrite, inputs).resolve()
    out.parent.mkdir(parents=True, exist_ok=True)
    clean_leftovers(out)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-{os.getpid()}-", dir=out.parent))
    try:
        yield tmp
        _finish(tmp)
        check_output_dir(out, overwrite, inputs)  # the folder may have changed while we worked
        if out.exists():
            old = out.with_name(f".{out.name}.old-{os.getpid()}")
            os.replace(out, old)
            os.replace(tmp, out)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
