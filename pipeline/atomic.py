"""Write-then-rename: readers see a complete file or directory, or the previous one, never half of one.

A staging path (`.<name>.staging-<pid>-<random>`) is held by its writer, from before it takes that name until it is
renamed into place or removed, with an flock on the path's own descriptor. One that nobody holds was left by a writer
that was killed (kill -9 during a save), on whatever machine or container it ran, and the next writer of that name
removes it: nothing half-written outlives the run that was writing it, and no reader opens one. Swapping a directory
into place takes two renames; the copy it retires between them (`.<name>.retired-...`) is held the same way, so one
nobody holds is a swap that was killed there: it goes back into place when the name is missing (it was the complete
previous version), else it is removed.
"""

from __future__ import annotations

import contextlib
import fcntl
import glob
import json
import os
import shutil
import tempfile
import time
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

from pipeline.errors import UsageError

MAKING_GRACE_S = 60  # a path still under its first name this long after it was made belongs to a killed writer


def _open(path: Path) -> int:
    return os.open(path, os.O_RDONLY | (os.O_DIRECTORY if path.is_dir() and not path.is_symlink() else 0))


def _hold(fd: int) -> int:
    """Take the exclusive flock of an open path (blocking: only a swap of the same name waits here) and return `fd`."""
    with contextlib.suppress(OSError):  # a file system without flock: single writers, as before
        fcntl.flock(fd, fcntl.LOCK_EX)
    return fd


def _abandoned(path: Path) -> bool:
    """Nobody holds `path`: its writer is gone. Unknown (no flock here, or unreadable) counts as held."""
    try:
        fd = _open(path)
    except OSError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return True
    except OSError:
        return False
    finally:
        os.close(fd)


def _remove(path: Path) -> None:
    shutil.rmtree(path, ignore_errors=True) if path.is_dir() and not path.is_symlink() else path.unlink(missing_ok=True)


def remove_abandoned(folder: Path, name: str) -> list[Path]:
    """Clear what killed writers of `name` left in `folder`: staging paths nobody holds, and a directory retired by a
    swap that was killed between its renames (put back when `name` is missing, else removed). Returns the removed."""
    removed: list[Path] = []
    if not folder.is_dir():
        return removed
    pattern = glob.escape(f".{name}.")
    for path in sorted(folder.glob(f"{pattern}staging-*")) + sorted(folder.glob(f"{pattern}making-*")):
        young = path.name.startswith(f".{name}.making-") and time.time() - path.lstat().st_mtime < MAKING_GRACE_S
        if not young and _abandoned(path):
            _remove(path)
            removed.append(path)
    for retired in sorted(folder.glob(f"{pattern}retired-*")):
        if retired.is_dir() and not retired.is_symlink() and _abandoned(retired):
            with contextlib.suppress(OSError):  # another reader put it back first
                if not (folder / name).exists():
                    retired.rename(folder / name)
                    continue
                _remove(retired)
                removed.append(retired)
    return removed


def recover(target: str | Path) -> None:
    """Before reading `target`: put back the complete previous version a killed swap left retired beside it."""
    target = Path(target)
    if not target.exists():
        remove_abandoned(target.parent, target.name)


@contextlib.contextmanager
def _staging(folder: Path, name: str, directory: bool) -> Iterator[Path]:
    """A new staging directory or file for `name` in `folder`, held by this process, after clearing abandoned ones.
    It is made under a first name cleaners leave alone, held, then renamed: never seen unheld under its staging name."""
    folder.mkdir(parents=True, exist_ok=True)
    remove_abandoned(folder, name)
    making = f".{name}.making-{os.getpid()}-"
    if directory:
        first = Path(tempfile.mkdtemp(prefix=making, dir=folder))
        fd = _hold(_open(first))
    else:
        fd, temp = tempfile.mkstemp(prefix=making, dir=folder)
        first = Path(temp)
        _hold(fd)
    path = first.with_name(first.name.replace(".making-", ".staging-", 1))
    try:
        first.rename(path)
        yield path
    finally:
        os.close(fd)


@contextlib.contextmanager
def staged_directory(target: str | Path) -> Iterator[Path]:
    """Yield an empty directory beside `target`; on success it replaces `target`, on any error it vanishes."""
    target = Path(target)
    with _staging(target.parent, target.name, directory=True) as staging:
        staging.chmod(0o755)
        try:
            yield staging
            _swap(staging, target)
        except BaseException:
            _remove(staging)
            raise


def _swap(staging: Path, target: Path) -> None:
    """Rename `staging` onto `target`; the previous `target`, if any, is retired (and held) in between, then removed."""
    if not target.exists():
        staging.rename(target)
        return
    fd = _hold(_open(target))
    try:
        retired = target.with_name(staging.name.replace(".staging-", ".retired-", 1))
        target.rename(retired)
        staging.rename(target)
        _remove(retired)
    finally:
        os.close(fd)


@contextlib.contextmanager
def temporary_directory(folder: str | Path, name: str) -> Iterator[Path]:
    """A held scratch directory in `folder`, removed when the block ends (one a killed run left: by the next run)."""
    with _staging(Path(folder), name, directory=True) as path:
        try:
            yield path
        finally:
            _remove(path)


@contextlib.contextmanager
def staged_files(folder: str | Path, names: Iterable[str]) -> Iterator[dict[str, Path]]:
    """Temporary files in `folder`, one per name, for the caller to fill; on success all are renamed onto their names
    together, on any error they vanish, with any folder made for them: readers never meet a half-written set."""
    folder = Path(folder)
    created = [p for p in (folder, *folder.parents) if not p.exists()]
    with contextlib.ExitStack() as held:
        temps: dict[str, Path] = {}
        try:
            for name in names:
                temps[name] = held.enter_context(_staging(folder, name, directory=False))
            yield temps
            for name, temp in temps.items():
                os.chmod(temp, 0o644)
                os.replace(temp, folder / name)
        finally:
            for temp in temps.values():
                temp.unlink(missing_ok=True)
            for made in created:  # deepest first; a folder that now holds the renamed files is not empty and stays
                with contextlib.suppress(OSError):
                    made.rmdir()


def append_json_line(path: str | Path, row: dict[str, Any]) -> None:
    """Append `row` as one JSON line under an flock on the file: no line is lost whatever appends, and a line a crash
    cut short (no newline) is dropped first."""
    line = (json.dumps(row) + "\n").encode()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_APPEND, 0o644)
    try:
        with contextlib.suppress(OSError):  # no flock on this file system: single writers, as before
            fcntl.flock(fd, fcntl.LOCK_EX)
        size = os.fstat(fd).st_size
        if size and os.pread(fd, 1, size - 1) != b"\n":
            os.ftruncate(fd, os.pread(fd, size, 0).rfind(b"\n") + 1)
        while line:  # a short write (a full disk, a signal) goes on where it stopped, or raises
            line = line[os.write(fd, line) :]
        os.fsync(fd)
    finally:
        os.close(fd)


def read_json_lines(path: str | Path, key: str) -> list[dict[str, Any]]:
    """The rows of a JSON-lines file, one per `key` value, the last written winning (in the order they last came); a
    final line without its newline is a write a crash cut short, and is left out."""
    path = Path(path)
    if not path.is_file():
        return []
    by_key: dict[str, dict[str, Any]] = {}
    for number, line in enumerate(path.read_text().split("\n")[:-1], 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            row = None
        if not isinstance(row, dict) or not isinstance(row.get(key), str):
            raise UsageError(f"{path} line {number} is not a row this project writes; the file was edited or corrupted")
        by_key.pop(row[key], None)
        by_key[row[key]] = row
    return list(by_key.values())


def write_bytes(path: str | Path, data: bytes) -> Path:
    path = Path(path)
    with staged_files(path.parent, [path.name]) as temps:
        temps[path.name].write_bytes(data)
    return path


def write_text(path: str | Path, text: str) -> Path:
    return write_bytes(path, text.encode())


def write_torch(path: str | Path, obj: Any) -> Path:
    """torch.save, whole or not at all."""
    import io

    import torch

    buffer = io.BytesIO()
    torch.save(obj, buffer)
    return write_bytes(path, buffer.getvalue())


def write_json(path: str | Path, payload: dict[str, Any]) -> Path:
    return write_text(path, json.dumps(payload, indent=2, sort_keys=True))
