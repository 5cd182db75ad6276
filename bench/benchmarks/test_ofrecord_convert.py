"""ofrecordMake on 50,000 CIFAR-sized records (python -m pytest bench/benchmarks/test_ofrecord_convert.py
--benchmark-enable -s).

Targets from the dataset issue: peak memory under 1 GiB, >= 5,000 records/s on this CPU.
"""

from __future__ import annotations

import json
import resource
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[2]
TRAIN, TEST = 50_000, 10_000


def _write_split(path: Path, rows: int, seed: int, with_shape: bool) -> None:
    """Stream a CIFAR-like split to disk without holding it (the writer must not be the memory hog)."""
    rng = np.random.default_rng(seed)
    with path.open("w") as handle:
        handle.write('{"shape": [3, 32, 32], "data": [' if with_shape else '{"data": [')
        for start in range(0, rows, 1000):
            block = rng.integers(0, 256, (min(1000, rows - start), 3072))
            text = ",".join("[" + ",".join(map(str, row)) + "]" for row in block.tolist())
            handle.write(("," if start else "") + text)
        handle.write('], "label": ' + json.dumps(rng.integers(0, 10, rows).tolist()) + "}")


@pytest.fixture(scope="module")
def cifar_json(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("ofrecord_bench")
    folder = root / "myData" / "cifarlike"
    folder.mkdir(parents=True)
    _write_split(folder / "train.json", TRAIN, 0, True)
    _write_split(folder / "test.json", TEST, 1, False)
    return root


def test_convert_50k_cifar_records(benchmark, cifar_json):
    def convert() -> float:
        started = time.perf_counter()
        subprocess.run(
            [sys.executable, str(ROOT / "ofrecordMake.py"), "--dataName", "cifarlike"],
            cwd=cifar_json,
            check=True,
            capture_output=True,
        )
        return time.perf_counter() - started

    seconds = benchmark.pedantic(convert, rounds=1)
    peak_mib = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024  # the largest process: main or a worker
    rate = (TRAIN + TEST) / seconds
    benchmark.extra_info.update(records_per_s=rate, peak_mib=peak_mib)
    print(
        f"\nofrecordMake: {TRAIN + TEST:,} CIFAR-sized records in {seconds:.1f} s = {rate:,.0f} records/s; peak RSS "
        f"{peak_mib:,.0f} MiB"
    )
    assert peak_mib < 1024, f"peak memory {peak_mib:.0f} MiB >= 1 GiB"
    assert rate >= 5000, f"{rate:,.0f} records/s < the 5,000 records/s target"
