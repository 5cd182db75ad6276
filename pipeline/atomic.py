"""Write-then-rename: readers see a complete file or directory, or the previous one, never half of one.

Staging names carry the host and process that made them (`.<name>.staging-<host>-<pid>-<random>`), so a later run
can tell a staging path left by a killed process (same host, process gone) from one another run is still filling,
and remove it: nothing half-written outlives the run that was killed while writing it, and no reader opens one.
"""

from __future__ import annotations

import contextlib
import glob
import json
import os
import shutil
import socket
import tempfile
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

HOST = socket.gethostname().replace("-", "_")


def _staging_prefix(name: str) -> str:
    return f".{name}.staging-{HOST}-{os.getpid()}-"


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process
        return True
    return True


def remove_abandoned(folder: Path, name: str) -> list[Path]:
    """Staging paths for `name` in `folder` whose writer (a process of this host) is gone: a run killed while writing.
    A retired copy (`.<name>.old`) left between the two renames of a killed swap goes back into place when `name` is
    missing (it was the complete previous version), else it is removed."""
    removed: list[Path] = []
    if not folder.is_dir():
        return removed
    for path in folder.glob(f".{glob.escape(name)}.staging-*"):
        host, _, rest = path.name.removeprefix(f".{name}.staging-").partition("-")
        pid = rest.split("-", 1)[0]
        if host == HOST and pid.isdigit() and not _alive(int(pid)):
            shutil.rmtree(path, ignore_errors=True) if path.is_dir() else path.unlink(missing_ok=True)
            removed.append(path)
    retired, target = folder / f".{name}.old", folder / name
    if retired.exists() and not target.exists():
        retired.rename(target)
    elif retired.exists():
        shutil.rmtree(retired, ignore_errors=True)
        removed.append(retired)
    return removed


@contextlib.contextmanager
def staged_directory(target: str | Path) -> Iterator[Path]:
    """Yield an empty directory beside `target`; on success it replaces `target`, on any error it vanishes."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    remove_abandoned(target.parent, target.name)
    staging = Path(tempfile.mkdtemp(prefix=_staging_prefix(target.name), dir=target.parent))
    staging.chmod(0o755)
    try:
        yield staging
        retired = target.with_name(f".{target.name}.old")
        if target.exists():
            shutil.rmtree(retired, ignore_errors=True)
            target.rename(retired)
        staging.rename(target)
        shutil.rmtree(retired, ignore_errors=True)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


@contextlib.contextmanager
def staged_files(folder: str | Path, names: Iterable[str]) -> Iterator[dict[str, Path]]:
    """Temporary files in `folder`, one per name, for the caller to fill; on success all are renamed onto their names
    together, on any error they vanish, with any folder made for them: readers never meet a half-written set."""
    folder = Path(folder)
    created = [p for p in (folder, *folder.parents) if not p.exists()]
    folder.mkdir(parents=True, exist_ok=True)
    temps: dict[str, Path] = {}
    try:
        for name in names:
            remove_abandoned(folder, name)
            handle, temp = tempfile.mkstemp(prefix=_staging_prefix(name), dir=folder)
            os.close(handle)
            temps[name] = Path(temp)
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
