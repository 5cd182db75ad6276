"""Run a matrix (or one shard of it) into a results directory, resumably; re-render reports from saved rows."""

from __future__ import annotations

import sys
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

from tqdm import tqdm

from pipeline.data.datasets import load_dataset
from pipeline.data.images import ImageDataset
from pipeline.deploy.latency import Measurements
from pipeline.errors import UsageError

from . import store
from .cell import environment, failed_row, run_cell
from .matrix import THIN, Cell, MatrixSpec, check_names, expand, shard
from .plots import draw_all
from .report import render


def manifest_for(spec: MatrixSpec, shard_of: tuple[int, int], previous: dict[str, Any] | None) -> dict[str, Any]:
    """run.json: the fingerprint, the full settings (matrix extents joined with an earlier run's) and the
    environment."""
    settings = {**asdict(spec), "base_epochs_resolved": spec.base_epoch_count}
    current = {
        "fingerprint": spec.fingerprint(),
        "spec": settings,
        "env": environment(spec),
        "shards": [f"{shard_of[0]}/{shard_of[1]}"],
    }
    return store.joined([previous, current]) if previous else current


def render_all(directory: Path, manifest: dict[str, Any], rows: list[dict[str, Any]]) -> list[Path]:
    """results.csv, report.md and the plots, all from the saved rows."""
    stats, ok = render(directory, manifest, rows)
    return [directory / "results.csv", directory / "report.md", *draw_all(directory, stats, ok)]


def plan(spec: MatrixSpec, data: ImageDataset, shard_of: tuple[int, int] = (0, 1)) -> list[Cell]:
    return shard(expand(spec, data), *shard_of)


def run_matrix(
    spec: MatrixSpec,
    out: Path,
    *,
    base_root: Path,
    shard_of: tuple[int, int] = (0, 1),
    data: ImageDataset | None = None,
    keep_snapshots: bool = False,
    data_options: dict[str, Any] | None = None,
) -> list[dict[str, Any]]:
    """Every cell of this shard not already finished in `out`; a failing cell is recorded with its error and the
    matrix goes on."""
    check_names(spec)
    if out.exists() and not out.is_dir():
        raise UsageError(f"--out {out} is a file; give a directory for the results")
    if base_root.exists() and not base_root.is_dir():
        raise UsageError(f"--base_dir {base_root} is a file; give a directory for the cached base models")
    with store.exclusive(out):
        data = data or load_dataset(spec.data_type, **(data_options or {}))
        spec = replace(spec, dataset=data.identity)  # a custom dataset's content is part of what the rows share
        return _run_locked(spec, out, base_root, shard_of, data, keep_snapshots)


def _run_locked(
    spec: MatrixSpec, out: Path, base_root: Path, shard_of: tuple[int, int], data: ImageDataset, keep_snapshots: bool
) -> list[dict[str, Any]]:
    """run_matrix's body, while this process holds `out`."""
    cells = plan(spec, data, shard_of)  # refuses impossible requests before anything is trained or written
    previous = store.check_compatible(out, spec.fingerprint())
    manifest = manifest_for(spec, shard_of, previous)
    try:
        base_root.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise UsageError(
            f"--base_dir {base_root} cannot be created ({error.strerror}); choose a writable directory"
        ) from None
    store.write_manifest(out, manifest)
    finished = {row["cell"] for row in store.read_rows(out) if is_finished(row, spec)}
    todo = [cell for cell in cells if cell.key not in finished]
    measurements = Measurements(out / store.LATENCY)  # by architecture: read back on resume, shared by every cell
    bar = tqdm(todo, desc="matrix", unit="cell", disable=None, dynamic_ncols=True)
    try:
        for cell in bar:
            bar.set_postfix_str(cell.key, refresh=True)
            try:
                cell_dir = out / "cells" / cell.key.replace("/", "_")
                row = run_cell(spec, cell, data, base_root, cell_dir, keep_snapshots, measurements)
            except Exception as error:  # any failure of one cell: record it in one line, go on with the rest
                row = failed_row(cell, error, spec)
                tqdm.write(f"cell {cell.key} failed: {row['error']}", file=sys.stderr)
            store.record(out, row)
    except KeyboardInterrupt:
        bar.close()
        try:  # reports of what finished; a failure here must not hide the interrupt
            render_all(out, manifest, store.read_rows(out))
        except Exception as error:
            tqdm.write(
                f"reports not rendered ({type(error).__name__}: {error}); run: python -m bench report {out}",
                file=sys.stderr,
            )
        raise
    bar.close()
    render_all(out, manifest, store.read_rows(out))
    return store.read_rows(out)


def is_finished(row: dict[str, Any], spec: MatrixSpec) -> bool:
    """A cell to skip on resume: it succeeded, its latency settled, and it has its from-scratch control if asked."""
    if row.get("status") != "ok" or row.get("unstable"):  # a figure that did not settle is taken again
        return False
    thin = row.get("backend") == THIN[0]  # the thin control is itself trained from scratch
    return not (spec.scratch_control and row.get("physical") and not thin and "scratch_top1" not in row)
