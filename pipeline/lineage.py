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
    "model_prune": ("backend", "method", "percent", "scope", "exclude", "threshold", "round_to", "prune_steps"),
    "model_refine": ("distill", "kd_alpha", "kd_temperature", "kd_features", "kd_feature_weight"),
}


def snapshot_identity(directory: str | Path, files: Iterable[str] = ("weights.pt", "meta.json")) -> str:
    """A content hash of a snapshot's files (read in chunks: a vgg's weights are tens of MB)."""
    digest = hashlib.sha256()
    for name in files:
        with (Path(directory) / name).open("rb") as handle:
            digest.update(hashlib.file_digest(handle, "sha256").digest())
    return digest.hexdigest()[:IDENTITY_LENGTH]


def entry(meta: dict[str, Any], identity: str) -> dict[str, Any]:
    """How descendants of this snapshot name it."""
    return {"stage": meta.get("stage"), "identity": identity, "settings": meta.get("settings", {})}


def descendant_lineage(parent_meta: dict[str, Any], parent_identity: str) -> list[dict[str, Any]]:
    """The lineage a snapshot made from this parent records: the parent's own ancestors, then the parent."""
    return [*parent_meta.get("lineage", []), entry(parent_meta, parent_identity)]


def describe(settings: dict[str, Any]) -> str:
    """A few words for a stage's settings: 'scratch bn 0.5, seed 0'."""
    what = " ".join(
        str(settings[k]) for k in ("backend", "method", "percent", "quantize") if settings.get(k) is not None
    )
    seed = f"seed {settings['seed']}" if "seed" in settings else ""
    return ", ".join(part for part in (what, seed) if part) or "settings not recorded"


def stale_ancestor(where: Path, meta: dict[str, Any], current: Callable[[str], str | None]) -> str | None:
    """Why the snapshot in `where` is stale, or None: an ancestor it was made from has since been replaced.
    `current(stage)` is that stage's identity now (this run's, else on disk beside `where`; None where unknown)."""
    for ancestor in meta.get("lineage", []):
        now = current(ancestor["stage"])
        if now is not None and now != ancestor["identity"]:
            stage = ancestor["stage"]
            rerun = "".join(str(s) for s in range(int(STEP_OF_STAGE[stage]) + 1, int(STEP_OF_STAGE[meta["stage"]]) + 1))
            return (
                f"{where} was made from an earlier {stage} ({describe(ancestor['settings'])}, "
                f"{ancestor['identity'][:8]}), not the "
                f"{stage} there now ({now[:8]}); run --step {rerun} again so it is made from the current one"
            )
    return None


def unmet_request(
    where: Path, meta: dict[str, Any], identity: str, asked: dict[str, Any], skipped: Callable[[str], bool]
) -> str | None:
    """Why the snapshot in `where` is not what this run asked for, or None: a setting the user gave explicitly differs
    from the one recorded for a stage (the snapshot itself or an ancestor) that this run builds on without making."""
    for ancestor in [*meta.get("lineage", []), entry(meta, identity)]:
        stage = ancestor["stage"]
        if not skipped(stage):
            continue
        recorded = ancestor["settings"]
        for key in ASKED_OF_STAGE.get(stage, ()):
            if key in asked and key in recorded and _plain(asked[key]) != _plain(recorded[key]):
                step = STEP_OF_STAGE[stage]
                return (
                    f"this run asks for {key} {_plain(asked[key])!r} but the {stage} it builds on ({where}) was made "
                    "with "
                    f"{_plain(recorded[key])!r}; add {step} to --step to make it again, or leave that flag out"
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


def check(message: str | None) -> None:
    if message:
        raise UsageError(message)
