"""A results directory: run.json (the settings every row was made under) and results.jsonl (one line per finished cell).

Every write replaces the whole file through a temporary name, so a crash or Ctrl-C leaves the
previous complete file, never half a line. Keys keep their order: per-layer dicts stay in network order.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from pipeline.atomic import write_json, write_text
from pipeline.errors import UsageError

MANIFEST = "run.json"
EXTENTS = ("models", "backends", "methods", "percents", "seeds")  # a matrix's extent: may differ between runs that share a table
RESULTS = "results.jsonl"


def read_manifest(directory: Path) -> dict[str, Any] | None:
    path = directory / MANIFEST
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError:
        raise UsageError(f"{path} is not valid JSON; it was not written by python -m bench, or was edited by hand") from None


def write_manifest(directory: Path, manifest: dict[str, Any]) -> None:
    write_json(directory / MANIFEST, manifest)


# what runs made before a setting was recorded used: their fingerprints lack it
FINGERPRINT_DEFAULTS = {"device": "cpu", "other_layouts": True}


def incompatibility(expected: dict[str, Any], found: dict[str, Any]) -> str | None:
    """The first setting two runs disagree on, in words; None when their rows may share a table."""
    if ("latency_layout" in expected) != ("latency_layout" in found):  # no setting of this version reproduces such a run
        return "one of them was made before latency was timed in channels_last: its latency figures are NCHW only"
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
        raise UsageError(f"{directory} holds results of an incompatible run ({difference}); use another --out or the same settings")
    return existing


def read_rows(directory: Path) -> list[dict[str, Any]]:
    path = directory / RESULTS
    if not path.is_file():
        return []
    rows = []
    for number, line in enumerate(path.read_text().splitlines(), 1):
        if line.strip():
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:
                raise UsageError(f"{path} line {number} is not valid JSON; the file was edited or not written by python -m bench") from None
    return rows


def write_rows(directory: Path, rows: list[dict[str, Any]]) -> None:
    write_text(directory / RESULTS, "".join(json.dumps(row) + "\n" for row in rows))


def record(directory: Path, row: dict[str, Any]) -> None:
    """Add one finished cell, replacing an earlier row of the same cell (a failed attempt that was retried)."""
    rows = [r for r in read_rows(directory) if r["cell"] != row["cell"]]
    write_rows(directory, [*rows, row])


def merge(directories: list[Path]) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """Join the results of shards (or separate runs) of one matrix; refuse runs made under other settings."""
    manifests = []
    for directory in directories:
        manifest = read_manifest(directory)
        if manifest is None:
            raise UsageError(f"{directory} is not a python -m bench results directory (no {MANIFEST})")
        if not isinstance(manifest.get("fingerprint"), dict) or not isinstance(manifest.get("spec"), dict):
            raise UsageError(f"{directory / MANIFEST} lacks the fingerprint or spec python -m bench writes; it cannot be merged")
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
    merged = {**joined(manifests), "merged_from": [str(d) for d in directories], "missing_shards": missing_shards(manifests)}
    return merged, list(by_cell.values())


def joined(manifests: list[dict[str, Any]]) -> dict[str, Any]:
    """One manifest for several runs of one matrix: the last one's settings and environment, their extents and shards unioned."""
    last = manifests[-1]
    extents = {e: list(dict.fromkeys(v for m in manifests for v in m["spec"].get(e, []))) for e in EXTENTS}
    return {**last, "spec": {**last["spec"], **extents}, "shards": sorted({s for m in manifests for s in m.get("shards", [])})}


def missing_shards(manifests: list[dict[str, Any]]) -> list[str]:
    """Shards of an i/n split that none of the merged directories ran (a Slurm task that failed, say)."""
    ran = {shard for manifest in manifests for shard in manifest.get("shards", [])}
    counts = {int(shard.split("/")[1]) for shard in ran}
    if counts == {1}:
        return []
    return [f"{i}/{n}" for n in sorted(counts) for i in range(n) if f"{i}/{n}" not in ran]
