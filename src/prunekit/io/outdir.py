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
process is gone. The marker records each file's size and sha256, so ``overwrite`` also refuses a
folder in which a file prunekit wrote was changed since (a user's re-saved model). An existing empty
folder that cannot be renamed (a mount point, a folder in a read-only parent) is filled in place.

Single files (``eval --json``, ``bench --json``, ``lut --out``, ``report --out``) get the same rules
from :func:`check_output_file` and :func:`write_output_file`: never onto or inside an input, never a
folder, replaced only with ``overwrite``, written to a hidden temporary file beside the target and
renamed over it when complete.
"""

from __future__ import annotations

import errno
import hashlib
import json
import logging
import os
import re
import shutil
import tempfile
from collections.abc import Callable, Iterable, Iterator
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


def _own_temporaries(folder: Path) -> set[Path]:
    """The hidden temporary folders prunekit makes inside a folder it fills in place."""
    return {p for p in folder.iterdir() if p.is_dir() and (m := _LEFTOVER.match(p.name)) and m["name"] == folder.name}


def _entries(folder: Path) -> list[Path]:
    """``folder``'s entries, prunekit's own temporary folders aside."""
    temporaries = _own_temporaries(folder)
    return [p for p in folder.iterdir() if p not in temporaries]


def _owned_by_prunekit(folder: Path) -> tuple[bool, str]:
    """(True, "") when prunekit wrote ``folder`` and nothing else is in it; else (False, why)."""
    files = {p.relative_to(folder).as_posix() for top in _entries(folder)
             for p in ([top] if not top.is_dir() or top.is_symlink() else top.rglob("*"))
             if p.is_file() or p.is_symlink()}
    marker = folder / MARKER
    if marker.is_file():
        try:
            record = json.loads(marker.read_text())
            written = set(record.get("files", []))
            digests = record.get("digests") or {}
            if not isinstance(digests, dict) or not all(isinstance(v, dict) for v in digests.values()):
                raise TypeError("digests")
        except (json.JSONDecodeError, AttributeError, TypeError, UnicodeDecodeError):
            return False, f"its marker {MARKER} is unreadable"
        foreign = sorted(files - written - {MARKER})
        if foreign:
            more = f" and {len(foreign) - 1} more" if len(foreign) > 1 else ""
            return False, f"it holds {foreign[0]}{more}, which prunekit did not write"
        for name in sorted(files & set(digests)):
            if _digest(folder / name, digests[name].get("size")) != digests[name]:
                return False, f"its {name} was changed since prunekit wrote it"
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
    if out.is_dir() and _entries(out):
        if not overwrite:
            raise ConfigError(f"output folder {out} already exists and is not empty; {refuse} "
                              "or pass --overwrite (overwrite=True in Python)")
        owned, why = _owned_by_prunekit(out)
        if not owned:
            raise ConfigError(f"--overwrite refused: {out} is not a folder prunekit wrote ({why}); {refuse}, "
                              "or move its files away yourself")
    _check_creatable(out)
    return out


def check_work_dir(folder: str | Path | None, flag: str, outputs: Iterable[str | Path] = (),
                   inputs: Iterable[str | Path | None] = ()) -> None:
    """A folder a run writes as it goes (CoFi's checkpoints) must lie apart from the run's output
    folders, which are written only at the end and must then be new (or prunekit's), and from
    its inputs. Checked before any work."""
    if folder is None:
        return
    where = Path(folder).expanduser().resolve()
    for out in outputs:
        target = Path(out).expanduser().resolve()
        if _same_or_inside(where, target) or _same_or_inside(target, where):
            how = "is" if where == target else ("is inside" if _same_or_inside(where, target) else "holds")
            raise ConfigError(f"{flag} {folder} {how} the output folder {out}, which is written only at the end; "
                              f"choose a {flag} folder apart from it")
    for given in inputs:
        if given is None or not Path(given).expanduser().exists():
            continue
        source = Path(given).expanduser().resolve()
        if _same_or_inside(where, source) or _same_or_inside(source, where):
            how = "is" if where == source else ("is inside" if _same_or_inside(where, source) else "holds")
            raise ConfigError(f"{flag} {folder} {how} the input {given}; prunekit never writes into its inputs: "
                              f"choose a {flag} folder apart from it")


def _check_creatable(out: Path) -> None:
    """The nearest existing ancestor must be a writable folder, so the write at the end succeeds
    (an existing folder may instead be writable itself: it is then filled in place)."""
    if out.is_dir() and os.access(out, os.W_OK | os.X_OK) and (
            os.path.ismount(out) or not os.access(out.resolve().parent, os.W_OK | os.X_OK)):
        return
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


_DIGESTS: dict[tuple[str, int, int, int], str] = {}  # (path, inode, size, mtime_ns) -> sha256, this process's


def _digest(path: Path, size: int | None = None) -> dict[str, object]:
    """A file's size and sha256 (read in chunks); a file whose size is not ``size`` is not read.
    A file read before and unchanged since (same inode, size and mtime) is not read again, so the
    check before a run and the one after it hash a large model once."""
    if path.is_symlink() or not path.is_file():
        return {"size": None, "sha256": None}
    info = path.stat()
    if size is not None and info.st_size != size:
        return {"size": info.st_size, "sha256": None}
    key = (str(path.resolve()), info.st_ino, info.st_size, info.st_mtime_ns)
    if key not in _DIGESTS:
        sha = hashlib.sha256()
        with path.open("rb") as handle:
            while chunk := handle.read(1 << 22):
                sha.update(chunk)
        _DIGESTS[key] = sha.hexdigest()
    return {"size": info.st_size, "sha256": _DIGESTS[key]}


def _finish(folder: Path) -> None:
    """Write the marker (every file with its size and sha256) and give the tree the usual
    permissions (mkdtemp makes it 0700)."""
    files = sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file())
    record = {"written_by": "prunekit", "files": files, "digests": {name: _digest(folder / name) for name in files}}
    (folder / MARKER).write_text(json.dumps(record, indent=1) + "\n")
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
    in_place = _fill_in_place(out)
    if not in_place:
        out.parent.mkdir(parents=True, exist_ok=True)
        clean_leftovers(out)
    # Filled in place: the temporary folder sits inside the target, on its file system.
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-{os.getpid()}-", dir=out if in_place else out.parent))
    try:
        yield tmp
        _finish(tmp)
        check_output_dir(out, overwrite, inputs)  # the folder may have changed while we worked
        if in_place:
            _move_into(tmp, out)
        elif out.exists():
            _swap(tmp, out)
        else:
            os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _fill_in_place(out: Path) -> bool:
    """Whether an existing folder must be filled where it is rather than replaced by a rename: a
    mount point, or a folder whose parent is not writable (both refuse a rename)."""
    if not out.is_dir():
        return False
    return os.path.ismount(out) or not os.access(out.parent, os.W_OK | os.X_OK)


def _swap(tmp: Path, out: Path) -> None:
    """Replace the existing folder ``out`` by ``tmp``; if ``out`` refuses to be renamed (EBUSY,
    EXDEV, EPERM, EACCES), fill it in place instead."""
    old = out.with_name(f".{out.name}.old-{os.getpid()}")
    try:
        os.replace(out, old)
    except OSError as err:
        if err.errno not in (errno.EBUSY, errno.EXDEV, errno.EPERM, errno.EACCES, errno.EINVAL):
            raise
        logger.info("%s cannot be renamed (%s); filling it in place", out, os.strerror(err.errno))
        _move_into(tmp, out)
        return
    try:
        os.replace(tmp, out)
    except BaseException:
        os.replace(old, out)  # put the old folder back
        raise
    shutil.rmtree(old, ignore_errors=True)


def _move_into(tmp: Path, out: Path) -> None:
    """Fill ``out`` (empty, or a folder prunekit wrote, already checked) with ``tmp``'s files: its
    old entries go first, the marker comes last, and ``tmp`` is removed."""
    for entry in list(out.iterdir()):
        if entry == tmp:
            continue
        if entry.is_dir() and not entry.is_symlink():
            shutil.rmtree(entry)
        else:
            entry.unlink()
    entries = sorted(tmp.iterdir(), key=lambda p: p.name == MARKER)
    for entry in entries:
        shutil.move(str(entry), str(out / entry.name))
    shutil.rmtree(tmp, ignore_errors=True)


# ---- single files ---------------------------------------------------------------------------------
_MODEL_FILE_SUFFIXES = (".safetensors", ".bin", ".onnx", ".pt", ".pth", ".gguf")


def check_output_file(path: str | Path | None, overwrite: bool = False, inputs: Iterable[str | Path | None] = (),
                      flag: str = "--json") -> Path | None:
    """Fail early, before any work, if the single file ``path`` may not be written: it is a folder,
    it is or lies inside one of ``inputs`` (model, data, tokenizer, baseline), it is a file of a
    model folder or of a folder prunekit wrote, it exists and ``overwrite`` is not set, or its
    folder cannot be written. A link is followed: the file it points to is the one checked and
    replaced. Returns ``path`` as a Path (None stays None)."""
    if path is None:
        return None
    if not str(path).strip():
        raise ConfigError(f"{flag} is empty; give a file name, e.g. {'lut.json' if flag == '--out' else 'metrics.json'}")
    given = Path(path).expanduser()
    target = given.resolve()
    example = given / ("lut.json" if flag == "--out" else "metrics.json")
    if given.is_dir() or target.is_dir():
        raise ConfigError(f"{flag} {path} is a folder; give a file name, e.g. {example}")
    for source_path in inputs:
        if source_path is None or not Path(source_path).expanduser().exists():
            continue
        source = Path(source_path).expanduser().resolve()
        if _same_or_inside(target, source):
            how = "is" if target == source else "is inside"
            raise ConfigError(f"{flag} {path} {how} the input {source_path}; prunekit never writes over its inputs: "
                              "choose a file outside it")
    folder = target.parent
    if target.exists() and (folder / "config.json").is_file() and (
            target.name in _LEGACY_FILES or target.suffix in _MODEL_FILE_SUFFIXES):
        raise ConfigError(f"{flag} {path} is a file of the model folder {folder}; prunekit never writes over a "
                          "model's files: choose another file")
    if target.name == MARKER:
        raise ConfigError(f"{flag} {path} is the marker file prunekit keeps in its output folders; choose another file")
    owner = next((p for p in [folder, *folder.parents] if (p / MARKER).is_file()), None)
    if owner is not None and target.exists() and target.relative_to(owner).as_posix() in _marker_files(owner):
        raise ConfigError(f"{flag} {path} is a file of the folder {owner} that prunekit wrote; choose a file "
                          "outside it")
    if target.exists() or target.is_symlink():
        if not overwrite:
            raise ConfigError(f"{flag} {path} already exists; choose another file, or pass --overwrite "
                              "(overwrite=True in Python) to replace it")
        if not target.is_file():
            raise ConfigError(f"{flag} {path} is not a regular file; choose another file")
    ancestor = folder
    while not ancestor.exists():
        ancestor = ancestor.parent
    if not ancestor.is_dir():
        raise ConfigError(f"{flag} {path} cannot be written: {ancestor} is a file, not a folder")
    if not os.access(ancestor, os.W_OK | os.X_OK):
        raise ConfigError(f"{flag} {path} cannot be written: {ancestor} is not writable; choose another file")
    return given


def _marker_files(folder: Path) -> set[str]:
    try:
        return set(json.loads((folder / MARKER).read_text()).get("files", []))
    except (OSError, json.JSONDecodeError, AttributeError, TypeError, UnicodeDecodeError):
        return set()


def write_output_file(path: str | Path, content: str | bytes | Callable[[Path], object], overwrite: bool = False,
                      inputs: Iterable[str | Path | None] = (), flag: str = "--json") -> Path:
    """Write one file atomically after :func:`check_output_file`: ``content`` (text, bytes, or a
    function that writes the file at the path it is given) goes to a hidden temporary file beside
    the target, which replaces the target only when complete. Returns ``path`` as a Path."""
    inputs = list(inputs)
    given = check_output_file(path, overwrite, inputs, flag)
    atomic_write(given, content, lambda: check_output_file(given, overwrite, inputs, flag))
    return given


def atomic_write(path: Path, content: str | bytes | Callable[[Path], object],
                 recheck: Callable[[], object] | None = None) -> None:
    """Write ``path`` (a link: the file it points to) through a hidden temporary file beside it,
    renamed over it when complete; ``recheck`` runs just before the rename. No other checks."""
    target = path.resolve()
    target.parent.mkdir(parents=True, exist_ok=True)
    _clean_file_leftovers(target)
    handle, name = tempfile.mkstemp(prefix=f".{target.name}.tmp-{os.getpid()}-", suffix=target.suffix,
                                    dir=target.parent)
    tmp = Path(name)
    try:
        with os.fdopen(handle, "wb") as stream:
            if isinstance(content, str):
                stream.write(content.encode("utf-8"))
            elif isinstance(content, bytes):
                stream.write(content)
        if callable(content):
            content(tmp)
        umask = os.umask(0)
        os.umask(umask)
        tmp.chmod(0o666 & ~umask)
        if recheck is not None:
            recheck()  # the target may have appeared while we worked
        os.replace(tmp, target)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def _clean_file_leftovers(target: Path) -> None:
    """Remove the hidden temporary files a killed run left beside ``target``."""
    for path in target.parent.iterdir():
        match = _LEFTOVER.match(path.name)
        if match and match["name"] == target.name and path.is_file() and not _pid_alive(int(match["pid"])):
            path.unlink(missing_ok=True)


def record_written_file(folder: Path, name: str) -> None:
    """After prunekit rewrote ``name`` inside ``folder`` (a folder it wrote), record its new size
    and digest in the folder's marker, so ``overwrite`` still recognises the folder as its own."""
    marker = folder / MARKER
    try:
        record = json.loads(marker.read_text())
    except (OSError, json.JSONDecodeError, UnicodeDecodeError):
        return
    if not isinstance(record, dict):
        return
    record["files"] = sorted(set(record.get("files", [])) | {name})
    if isinstance(record.get("digests"), dict):
        record["digests"][name] = _digest(folder / name)
    atomic_write(marker, json.dumps(record, indent=1) + "\n")
