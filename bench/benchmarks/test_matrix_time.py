"""The harness's wall-time targets (python -m pytest bench/benchmarks/test_matrix_time.py --benchmark-enable -m slow
-s).

The default matrix (lenet and vgg, the three backends, their default methods plus the random control, percents
0.3 / 0.5 / 0.7, one seed), base models trained from nothing: under 8 minutes on digits and under 30 on
mnist5k on this 2-core CPU. Latency used to be most of a vgg cell; the protocol times each architecture once, and
only as long as its figures need to settle. Minutes long, so marked slow.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
TARGET_S = {"digits": 8 * 60, "mnist5k": 30 * 60}


@pytest.mark.slow
@pytest.mark.parametrize("data_type", ["digits", "mnist5k"])
def test_default_matrix_time(benchmark, tmp_path, data_type):
    command = [
        sys.executable,
        "-m",
        "bench",
        "--models",
        "lenet,vgg",
        "--data_type",
        data_type,
        "--out",
        str(tmp_path / "out"),
        "--base_dir",
        str(tmp_path / "bases"),
    ]

    def run() -> float:
        started = time.perf_counter()
        subprocess.run(command, cwd=ROOT, check=True, capture_output=True)
        return time.perf_counter() - started

    seconds = benchmark.pedantic(run, rounds=1)
    rows = [json.loads(line) for line in (tmp_path / "out" / "results.jsonl").read_text().splitlines()]
    failed = [row["cell"] for row in rows if row["status"] != "ok"]
    benchmark.extra_info.update(seconds=seconds, cells=len(rows), failed=failed)
    print(
        f"\ndefault matrix on {data_type}: {len(rows)} cells in {seconds / 60:.1f} min ({len(failed)} failed: {failed})"
    )
    assert not failed
    assert seconds < TARGET_S[data_type], f"{seconds / 60:.1f} min >= the {TARGET_S[data_type] / 60:.0f}-minute target"
