"""Write-then-rename: readers see a complete file or directory, or the previous one, never half of one."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any


@contextlib.contextmanager
def staged_directory(target: str | Path) -> Iterator[Path]:
    """Yield an empty directory beside `target`; on success it replaces `target`, on any error it vanishes."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
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
            handle, temp = tempfile.mkstemp(prefix=f".{name}.", dir=folder)
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
