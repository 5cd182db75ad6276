"""The original platform's outputs: per-epoch log lines and the results JSON."""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from tqdm import tqdm

from pipeline.atomic import staged_files, write_json
from pipeline.train.loop import EvalResult


def epoch_line(epoch: int, result: EvalResult) -> str:
    return (
        f"epoch{epoch} top_1_accuracy: {result.top1:.4f}; top_k_accuracy: {result.top_k:.4f}; top_k: {result.k}; "
        f"samples/s: {result.samples_per_s:.1f}"
    )


class EpochLog:
    """One line per epoch as it ends, in the original platform's format, into `write_to` (a staging file that
    `epoch_log` renames onto `path` when the step completes); the terminal copy (when a prefix is given) names the
    step, since step 1 and step 3 otherwise print identical-looking `epoch0 ...` lines."""

    def __init__(self, write_to: Path, path: Path, terminal_prefix: str | None = "") -> None:
        self.write_to, self.path, self.terminal_prefix = write_to, path, terminal_prefix

    def __call__(self, epoch: int, result: EvalResult) -> None:
        line = epoch_line(epoch, result)
        with self.write_to.open("a") as handle:
            handle.write(line + "\n")
        if self.terminal_prefix is not None:
            tqdm.write(f"{self.terminal_prefix} {line}".lstrip(), file=sys.stderr)


@contextlib.contextmanager
def epoch_log(
    log_dir: str | Path, model: str, data: str, log_type: str, terminal_prefix: str | None = ""
) -> Iterator[EpochLog]:
    """log/log_<model>_<data>_<log_type>.txt, replaced only when the step completes: an interrupted step leaves the
    previous run's log as it was."""
    path = Path(log_dir) / f"log_{model}_{data}_{log_type}.txt"
    with staged_files(path.parent, [path.name]) as temps:
        yield EpochLog(temps[path.name], path, terminal_prefix)


def results_payload(result: EvalResult, size_mb: float, params: int, macs: int, **extra: Any) -> dict[str, Any]:
    """The original keys (accuracy, top_k_accuracy, top_k, modelSize, reasoningTime) plus ours."""
    return {
        "accuracy": round(result.top1, 6),
        "top_k_accuracy": round(result.top_k, 6),
        "top_k": result.k,
        "modelSize": round(size_mb, 4),
        "reasoningTime": None,  # samples/s: the job's timing fills it in (batch-64 throughput by the protocol)
        "params": params,
        "macs": macs,
        **extra,
    }


def write_results(result_dir: str | Path, model: str, data: str, log_type: str, payload: dict[str, Any]) -> Path:
    return write_json(Path(result_dir) / f"results_{model}_{data}_{log_type}.json", payload)
