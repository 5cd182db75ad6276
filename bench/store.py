"""A results directory: run.json (the settings every row was made under) and results.jsonl (one line per finished cell).

One run writes a directory at a time (`exclusive`: a lock held for the run). A row is one appended line, written under
a lock on the file, so no row is lost whatever calls `record`; a line cut short by a crash is dropped on the next write
and never read. The last row of a cell wins (a failed attempt that was retried). run.json is replaced whole through a
temporary name. Keys keep their order: per-layer dicts stay in network order.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from pipeline.atomic import append_json_line, read_json_lines, write_json, write_text
from pipeline.errors import UsageError

MANIFEST = "run.json"
# a matrix's extent: may differ between runs that share a table
EXTENTS = ("models", "backends", "methods", "percents", "budgets", "allocations", "seeds")
RESULTS = "results.jsonl"
LATENCY = "latency.jsonl"  # latency measurements by architecture (pipeline.deploy.latency.Measurements)
LOCK = ".lock"


@contextlib.contextmanager
def exclusive(directory: Path) -> Iterator[None]:
    """Hold `directory` for this process: a second run on it is refused in one line naming the first one's pid. The lock
    file goes when the run ends, and so does a directory the run made and left empty (refused before it wrote)."""
    made = [p for p in (directory, *directory.parents) if not p.exists()]
    directory.mkdir(parents=True, exist_ok=True)
    with (directory / LOCK).open("a+") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.seek(0)
            holder = handle.read().strip() or "unknown"
            raise UsageError(
                f"{directory} is in use by another python -m bench run (pid {holder}); wait for it to finish, or give "
                "this run its own --out (shards: one directory each, then python -m bench merge)"
            ) from None
        except OSError:  # a file system without flock (some network mounts): go on unlocked, as before
            pass
        handle.truncate(0)
        handle.write(str(os.getpid()))
        handle.flush()
        try:
            yield
        finally:  # still held: a run that opens the lock file after this makes its own, as this one is done writing
            (directory / LOCK).unlink(missing_ok=True)
            for folder in made:  # deepest first; only what is still empty goes
                with contextlib.suppress(OSError):
                    folder.rmdir()


def read_manifest(directory: Path) -> dict[str, Any] | None:
    path = directory / MANIFEST
    if not path.is_file():
        return None
    try:
        manifest = json.loads(path.read_text())
    except (ValueError, OSError):
        manifest = None
    if not isinstance(manifest, dict) or not isinstance(manifest.get("fingerprint", {}), dict):
        raise UsageError(
            f"{path} is not the JSON object python -m bench writes (corrupt or edited by hand); move it away or use "
            "another --out"
        )
    return manifest


def write_manifest(directory: Path, manifest: dict[str, Any]) -> None:
    write_json(directory / MANIFEST, manifest)


# what runs made before a setting was recorded used: their fingerprints lack it
FINGERPRINT_DEFAULTS = {"device": "cpu", "other_layouts": True, "dataset": None, "iterations": 1}


def incompatibility(expected: dict[str, Any], found: dict[str, Any]) -> str | None:
    """The first setting two runs disagree on, in words; None when their rows may share a table."""
    # no setting of this version reproduces such a run
    if ("latency_layout" in expected) != ("latency_layout" in found):
        return "one of them was made before latency was timed in channels_last: its latency figures are NCHW only"
    if ("latency_tolerance" in expected) != ("latency_tolerance" in found):
        return "one of them was made before the latency stability protocol: its figures are a fixed number of runs"
    expected, found = {**FINGERPRINT_DEFAULTS, **expected}, {**FINGERPRINT_DEFAULTS, **found}
    for key in sorted(set(expected) | set(found)):
        if expected.get(key) != found.get(key):
            return f"{key} is {found.get(key)!r} there but {expected.get(key)!r} here"
    return None


def check_compatible(directory: Path, fingerprint: dict[str, Any]) -> dict[str, Any] | None:
    """The manifest of the run already in `directory` (None if none), refused when its settings differ from ours."""
    existing = read_manifest(directory)
    if existing is None:
        if (directory / RESULTS).exists():
            raise UsageError(f"{directory} holds results without {MANIFEST}; use another --out")
        return None
    difference = incompatibility(fingerprint, existing.get("fingerprint", {}))
    if difference:
        raise UsageError(
            f"{directory} holds results of an incompatible run ({difference}); use another --out or the same settings"
        )
    return existing


def read_rows(directory: Path) -> list[dict[str, Any]]:
    """One row per cell, the last recorded winning (a retried cell); a line a crash cut short is left out."""
    return read_json_lines(directory / RESULTS, "cell")


def write_rows(directory: Path, rows: list[dict[str, Any]]) -> None:
    write_text(directory / RESULTS, "".join(json.dumps(row) + "\n" for row in rows))


def record(directory: Path, row: dict[str, Any]) -> None:
    """Add one finished cell: one line appended under a lock on the file; a retried cell's row supersedes the old."""
    append_json_line(directory / RESULTS, row)


def merge_latency(directories: list[Path]) -> list[dict[str, Any]]:
    """Every latency measurement the directories hold, once per key (shards on one machine may share architectures)."""
    by_key: dict[str, dict[str, Any]] = {}
    for directory in directories:
        for row in read_json_lines(directory / LATENCY, "key"):
            by_key.setdefault(row["key"], row)
    return list(by_key.values())


def write_latency(directory: Path, rows: list[dict[str, Any]]) -> None:
    if rows:
        write_text(directory / LATENCY, "".join(json.dumps(row) + "\n" for row in rows))


def merge(directories: list[Path]) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """Join the results of shards (or separate runs) of one matrix; refuse runs made under other settings."""
    manifests = []
    for directory in directories:
        manifest = read_manifest(directory)
        if manifest is None:
            raise UsageError(f"{directory} is not a python -m bench results directory (no {MANIFEST})")
        if not isinstance(manifest.get("fingerprint"), dict) or not isinstance(manifest.get("spec"), dict):
            raise UsageError(
                f"{directory / MANIFEST} lacks the fingerprint or spec python -m bench writes; it cannot be merged"
            )
        manifests.append(manifest)
    first = manifests[0]
    for directory, manifest in zip(directories[1:], manifests[1:], strict=True):
        difference = incompatibility(first["fingerprint"], manifest["fingerprint"])
        if difference:
            raise UsageError(f"cannot merge {directory} with {directories[0]}: incompatible runs ({difference})")
    by_cell: dict[str, dict[str, Any]] = {}
    for directory in directories:
        for row in read_rows(directory):
            kept = by_cell.get(row["cell"])
            if kept is None or (kept.get("status") != "ok" and row.get("status") == "ok"):
                by_cell[row["cell"]] = row
    merged = {
        **joined(manifests),
        "merged_from": [str(d) for d in directories],
        "missing_shards": missing_shards(manifests),
    }
    return merged, list(by_cell.values())


def joined(manifests: list[dict[str, Any]]) -> dict[str, Any]:
    """One manifest for several runs of one matrix: the last one's settings and environment, their extents and shards
    unioned."""
    last = manifests[-1]
    extents = {e: list(dict.fromkeys(v for m in manifests for v in m["spec"].get(e, []))) for e in EXTENTS}
    return {
        **last,
        "spec": {**last["spec"], **extents},
        "shards": sorted({s for m in manifests for s in m.get("shards", [])}),
    }


def missing_shards(manifests: list[dict[str, Any]]) -> list[str]:
    """Shards of an i/n split that none of the merged directories ran (a Slurm task that failed, say)."""
    ran = {shard for manifest in manifests for shard in manifest.get("shards", [])}
    counts = {int(shard.split("/")[1]) for shard in ran}
    if counts == {1}:
        return []
    return [f"{i}/{n}" for n in sorted(counts) for i in range(n) if f"{i}/{n}" not in ran]
