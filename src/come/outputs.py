"""Output files, folders and work folders: checked before any work, written atomically, cleaned after a crash.

Every file and folder `come` writes (a compressed model, a distilled model, a GGUF file,
a bench table, an --json report, a cache entry, a checkpoint) goes through here, so the same
rules hold everywhere:

- an output may not be, contain or sit inside the model it is made from;
- its location must be writable, checked before any work starts; a file is not written
  onto a folder, and an existing output is replaced only when asked to;
- it is written under a temporary name beside the target and renamed at the end,
  so an interrupted or failed run leaves nothing half-written: `atomic_file` (and
  `atomic_write_text` / `atomic_write_bytes` / `write_json_atomic` on it) for a file,
  `atomic_folder` for a folder, `publish_folder` to move a finished folder into place;
- temporary names carry the writing process's id, so the next run can remove
  what a killed run (kill -9, power loss) left behind;
- files and folders get the modes the user's umask gives, like any file.
"""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import sys
import tempfile
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path

from .errors import ComeError, OutputExists


class OutputNotWritable(ComeError):
    pass


# -- modes -----------------------------------------------------------------------
def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def apply_umask(path: str | Path) -> None:
    """Give `path` (and everything under it) the modes a plain mkdir / open would: mkdtemp and
    mkstemp make private 0700/0600 entries, which a shared output or cache should not have."""
    mask, path = _umask(), Path(path)
    entries = [path] + (list(path.rglob("*")) if path.is_dir() else [])
    for entry in entries:
        if entry.is_symlink():
            continue
        os.chmod(entry, (0o777 if entry.is_dir() else 0o666) & ~mask)


# -- stale temporaries --------------------------------------------------------------
def _alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's live process
        return True
    return True


_PID_TAG = re.compile(r"-p(\d+)-")


def temp_prefix(name: str) -> str:
    """Prefix of a temporary entry that records the writing process: '<name>-p<pid>-'."""
    return f"{name}-p{os.getpid()}-"


def remove_stale(folder: str | Path, pattern: str, quiet: bool = False) -> list[Path]:
    """Remove entries of `folder` matching the glob `pattern` whose writing process is gone."""
    folder, removed = Path(folder), []
    if not folder.is_dir():
        return removed
    for entry in folder.glob(pattern):
        match = _PID_TAG.search(entry.name)
        if match is None or _alive(int(match.group(1))):
            continue
        try:
            shutil.rmtree(entry) if entry.is_dir() and not entry.is_symlink() else entry.unlink()
        except OSError:
            continue
        removed.append(entry)
    if removed and not quiet:
        print(f"come: removed {len(removed)} leftover(s) of interrupted runs in {folder}: "
              + ", ".join(p.name for p in removed), file=sys.stderr)
    return removed


# -- checks -------------------------------------------------------------------------
def check_writable(folder: str | Path, what: str = "output") -> None:
    """Fail now, not after hours of work, if nothing can be created in `folder` (or the first
    existing folder above it, which is where it would be created)."""
    folder = Path(folder).expanduser().resolve()
    probe_dir = folder
    while not probe_dir.exists():
        probe_dir = probe_dir.parent
    if not probe_dir.is_dir():
        raise OutputNotWritable(f"cannot create the {what} folder {folder}: {probe_dir} is a file")
    try:
        fd, probe = tempfile.mkstemp(prefix=".come-write-test-", dir=probe_dir)
        os.close(fd)
        os.unlink(probe)
    except OSError as exc:
        raise OutputNotWritable(f"the {what} location {probe_dir} is not writable ({exc.strerror})") from None


def _related(a: Path, b: Path) -> bool:
    return a == b or a in b.parents or b in a.parents


def check_not_source(out: Path, sources: list[str | Path | None]) -> None:
    """Refuse an output folder that is, contains or is inside a model it is made from."""
    for source in sources:
        if source is None:
            continue
        src = Path(source).expanduser()
        if not src.exists():
            continue
        src = src.resolve()
        if _related(out, src):
            raise OutputExists(f"the output folder {out} would overwrite the model it is made from ({src}); "
                               "choose another --out")


def prepare_output(out: str | Path, overwrite: bool, sources: list | None = None) -> Path:
    """The resolved output folder, after every check that can be made before any work."""
    out = Path(out).expanduser().resolve()
    if out.exists() and not overwrite:
        raise OutputExists(f"output folder {out} exists; pass --overwrite to replace it")
    if out.exists() and not out.is_dir():
        raise OutputExists(f"output path {out} exists and is not a folder")
    check_not_source(out, sources or [])
    check_writable(out.parent if not out.exists() else out)
    remove_stale(out.parent, f".{out.name}.tmp-p*")
    remove_stale(out.parent, f".{out.name}.old-p*")
    return out


def _file_target(path: str | Path, overwrite: bool, what: str) -> Path:
    path = Path(path).expanduser().resolve()
    if path.is_dir():  # os.replace cannot put a file there, and --overwrite never replaces a folder
        raise OutputExists(f"the {what} path {path} is a folder; give the path of a file")
    if path.exists() and not overwrite:
        raise OutputExists(f"{path} exists; pass --overwrite to replace it")
    return path


def check_output_file(path: str | Path, overwrite: bool = True, sources: list | None = None,
                      what: str = "output") -> Path:
    """The resolved path of a file about to be written, after every check that can be made before
    any work: not a folder, absent unless `overwrite`, not a model it is made from (or inside one),
    and in a location where files can be created."""
    path = _file_target(path, overwrite, what)
    check_not_source(path, sources or [])
    check_writable(path.parent, what)
    return path


# -- writing ------------------------------------------------------------------------
def json_safe(obj):
    """`obj` with every non-finite float (a candidate whose model diverged) as None: strict JSON."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [json_safe(v) for v in obj]
    return obj


def json_text(obj) -> str:
    return json.dumps(json_safe(obj), indent=1, allow_nan=False)


@contextmanager
def atomic_file(path: str | Path, overwrite: bool = True, what: str = "output") -> Iterator[Path]:
    """Yield a temporary path beside `path` for any writer (open, torch.save, safetensors,
    GGUFWriter, savefig with an explicit format) to write the file to. It becomes `path`, with the
    modes the umask gives, only when the block completes; otherwise `path` is left as it was and
    the temporary is removed. A file is never written onto a folder, nor over an existing file
    unless `overwrite`."""
    path = _file_target(path, overwrite, what)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        remove_stale(path.parent, f".{path.name}.tmp-p*")
        fd, name = tempfile.mkstemp(prefix=temp_prefix(f".{path.name}.tmp"), dir=path.parent)
    except OSError:
        check_writable(path.parent, what)  # the reason, in the same words as the check before any work
        raise
    os.close(fd)
    tmp = Path(name)
    try:
        yield tmp
        apply_umask(tmp)  # mkstemp makes it 0600
        _file_target(path, overwrite, what)  # nothing appeared there meanwhile that may not be replaced
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def atomic_write_text(path: str | Path, text: str | Iterable[str], overwrite: bool = True,
                      what: str = "output") -> Path:
    """Write `text` (a string, or an iterable of strings written one after another) to `path` as
    UTF-8, atomically (see `atomic_file`); returns the resolved path."""
    with atomic_file(path, overwrite, what) as tmp, open(tmp, "w", encoding="utf-8") as f:
        if isinstance(text, str):
            f.write(text)
        else:
            f.writelines(text)
    return Path(path).expanduser().resolve()


def atomic_write_bytes(path: str | Path, data: bytes, overwrite: bool = True, what: str = "output") -> Path:
    """Write `data` to `path` atomically (see `atomic_file`); returns the resolved path."""
    with atomic_file(path, overwrite, what) as tmp:
        tmp.write_bytes(data)
    return Path(path).expanduser().resolve()


def write_json_atomic(path: str | Path, obj) -> None:
    """`obj` as strict JSON (non-finite floats as null), written atomically."""
    atomic_write_text(path, json_text(obj))


def publish_folder(staged: str | Path, out: str | Path, first_wins: bool = False) -> bool:
    """Move the finished folder `staged` to `out` (in the same file system: renames only).

    An existing `out` is set aside until the new one is in place, put back if that fails, and
    then removed. With `first_wins` (a cache entry that another process may have made meanwhile)
    an existing non-empty `out` is kept instead: `staged` stays where it is and False is returned.
    """
    staged, out = Path(staged), Path(out)
    if first_wins:
        try:
            os.replace(staged, out)  # onto a non-empty folder this fails
        except OSError:
            if out.is_dir():
                return False
            raise
        return True
    trash = None
    if out.exists():
        trash = Path(tempfile.mkdtemp(prefix=temp_prefix(f".{out.name}.old"), dir=out.parent))
        os.replace(out, trash / "old")
    try:
        os.replace(staged, out)
    except BaseException:
        if trash is not None:  # put the previous output back
            os.replace(trash / "old", out)
            shutil.rmtree(trash, ignore_errors=True)
        raise
    if trash is not None:
        shutil.rmtree(trash, ignore_errors=True)
    return True


@contextmanager
def atomic_folder(out: str | Path, overwrite: bool = False, sources: list | None = None,
                  first_wins: bool = False) -> Iterator[Path]:
    """Yield a temporary folder beside `out` that becomes `out` only if the block completes
    (see `publish_folder`; with `first_wins` an `out` that exists is never refused, nor replaced)."""
    out = prepare_output(out, overwrite or first_wins, sources)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=temp_prefix(f".{out.name}.tmp"), dir=out.parent))
    try:
        yield tmp
        apply_umask(tmp)  # mkdtemp and safetensors' own temporaries are private; the result should not be
        publish_folder(tmp, out, first_wins)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)  # a failed block's, or the one another process beat


def work_folder(root: str | Path):
    """A private work folder under `root` (removed at the end; a killed run's is removed by the next)."""
    root = Path(root).expanduser()
    root.mkdir(parents=True, exist_ok=True)
    remove_stale(root, "come-work-p*")
    return tempfile.TemporaryDirectory(prefix=temp_prefix("come-work"), dir=root)
