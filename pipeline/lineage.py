"""Lineage: every snapshot names its ancestors by content and the settings that made each, so no step builds on a
stale parent and no table or results file mixes two runs.

A snapshot's meta.json holds `settings` (what made it: seed, method, percent, ...) and `lineage`, its ancestors oldest
first, each `{"stage", "identity", "settings"}`. An identity is a hash of the snapshot's two files: a base trained
again, or a prune redone at another percent, gets a new one, and every snapshot made from the old one is then stale.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

from pipeline.errors import UsageError

IDENTITY_LENGTH = 16  # hex digits of sha256: enough to tell snapshots apart, short enough to read in a table
STEP_OF_STAGE = {"model_base": "1", "model_prune": "2", "model_refine": "3", "model_quant": "4"}

# settings a run may ask for explicitly that shape an earlier stage: checked against that stage when this run
# builds on it without making it again
ASKED_OF_STAGE: dict[str, tuple[str, ...]] = {
    "model_prune": (
        "backend",
        "method",
        "percent",
        "target",
        "allocation",
        "iterations",
        "scope",
        "exclude",
        "threshold",
        "round_to",
        "prune_steps",
    ),
    "model_refine": ("distill", "kd_alpha", "kd_temperature", "kd_features", "kd_feature_weight"),
}


def snapshot_identity(directory: str | Path, files: Iterable[str] = ("weights.pt", "meta.json")) -> str:
    """A content hash of a snapshot's files (read in chunks: a vgg's weights are tens of MB)."""
    digest = hashlib.sha256()
    for name in files:
        with (Path(directory) / name).open("rb") as handle:
            digest.update(hashlib.file_digest(handle, "sha256").digest())
    return digest.hexdigest()[:IDENTITY_LENGTH]


def entry(meta: dict[str, Any], identity: str, path: str | Path) -> dict[str, Any]:
    """How descendants of this snapshot name it: its stage, content identity, where it lay, and what made it."""
    return {"stage": meta.get("stage"), "identity": identity, "path": str(path), "settings": settings_of(meta)}


def settings_of(meta: dict[str, Any]) -> dict[str, Any]:
    """What made a snapshot; one written before settings were recorded still names its prune at the top of its meta."""
    if "settings" in meta:
        return meta["settings"]
    return {key: meta[key] for key in ("seed", *ASKED_OF_STAGE["model_prune"]) if key in meta}


def descendant_lineage(
    parent_meta: dict[str, Any], parent_identity: str, parent_path: str | Path
) -> list[dict[str, Any]]:
    """The lineage a snapshot made from this parent records: the parent's own ancestors, then the parent."""
    return [*parent_meta.get("lineage", []), entry(parent_meta, parent_identity, parent_path)]


def describe(settings: dict[str, Any]) -> str:
    """A few words for a stage's settings: 'scratch bn 0.5, seed 0'."""
    named = ("backend", "method", "percent", "target", "allocation", "quantize")
    what = " ".join(str(settings[key]) for key in named if settings.get(key) is not None)
    seed = f"seed {settings['seed']}" if "seed" in settings else ""
    return ", ".join(part for part in (what, seed) if part) or "settings not recorded"


def stale_ancestor(where: Path, meta: dict[str, Any], current: Callable[[dict[str, Any]], str | None]) -> str | None:
    """Why the snapshot in `where` is stale, or None: an ancestor it was made from has since been replaced where it lay.
    `current(ancestor)` is the identity of what lies at the ancestor's path now (None: gone, or not recorded)."""
    for ancestor in meta.get("lineage", []):
        now = current(ancestor)
        if now is not None and now != ancestor["identity"]:
            stage, made = ancestor["stage"], int(STEP_OF_STAGE[meta["stage"]])
            rerun = "".join(str(step) for step in range(int(STEP_OF_STAGE[stage]) + 1, made + 1))
            return (
                f"{where} was made from an earlier {stage} ({describe(ancestor['settings'])}, "
                f"{ancestor['identity'][:8]}), not the one in {ancestor['path']} now ({now[:8]}); run --step {rerun} "
                "again so it is made from that one"
            )
    return None


def unmet_request(
    where: Path, meta: dict[str, Any], identity: str, asked: dict[str, Any], skipped: Callable[[str], bool]
) -> str | None:
    """Why the snapshot in `where` is not what this run asked for, or None: a setting the user gave explicitly differs
    from the one recorded for a stage (the snapshot itself or an ancestor) that this run builds on without making."""
    for ancestor in [*meta.get("lineage", []), entry(meta, identity, where)]:
        stage, recorded = ancestor["stage"], ancestor["settings"]
        if not skipped(stage):
            continue
        for key in ASKED_OF_STAGE.get(stage, ()):
            wanted = asked.get(key)  # None: the default (a method's own scope, say), which asks for nothing
            if wanted is not None and key in recorded and _plain(wanted) != _plain(recorded[key]):
                return (
                    f"this run asks for {key} {_plain(wanted)!r} but the {stage} it builds on ({where}) was made with "
                    f"{_plain(recorded[key])!r}; add {STEP_OF_STAGE[stage]} to --step to remake it, or drop that flag"
                )
    return None


def _plain(value: Any) -> Any:
    """JSON's view of a value (a tuple and the list it was saved as compare equal)."""
    return json.loads(json.dumps(value))


def dataset_mismatch(where: Path, meta: dict[str, Any], name: str, identity: str | None) -> str | None:
    """Why the snapshot in `where` does not belong to the dataset loaded now, or None (identities are recorded for
    custom datasets, whose files can change under one name)."""
    recorded = meta.get("dataset", {}).get("identity")
    if recorded is None or identity is None or recorded == identity:
        return None
    return (
        f"{where} was trained on another version of dataset {name!r} (its files changed since: {recorded[:8]} then, "
        f"{identity[:8]} now); rerun step 1 on the current data (add 1 to --step)"
    )


def shape_problem(meta: dict[str, Any]) -> str | None:
    """What is wrong with the lineage keys of a snapshot's meta, in words, or None (older snapshots lack them)."""
    for key in ("settings", "dataset"):
        if key in meta and not isinstance(meta[key], dict):
            return f"has a {key!r} that is not an object"
    if "stage" in meta and meta["stage"] not in STEP_OF_STAGE:
        return f"names an unknown stage {meta['stage']!r}"
    ancestors = meta.get("lineage", [])
    fields = {"stage": str, "identity": str, "path": str, "settings": dict}
    if not isinstance(ancestors, list) or not all(
        isinstance(a, dict) and all(isinstance(a.get(k), t) for k, t in fields.items()) and a["stage"] in STEP_OF_STAGE
        for a in ancestors
    ):
        return "has a 'lineage' that is not a list of ancestors (stage, identity, path, settings)"
    return None


def check(message: str | None) -> None:
    if message:
        raise UsageError(message)
