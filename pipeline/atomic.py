"""Write-then-rename: readers see a complete file or directory, or the previous one, never half of one."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
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


def write_bytes(path: str | Path, data: bytes) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, temp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(handle, "wb") as stream:
            stream.write(data)
        os.chmod(temp, 0o644)
        os.replace(temp, path)
    except BaseException:
        Path(temp).unlink(missing_ok=True)
        raise
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
