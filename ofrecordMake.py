"""Convert a custom JSON dataset to OneFlow's OFRecord format.

    python ofrecordMake.py --dataName randomData255

reads myData/<name>/train.json and test.json, writes ofData/<name>/{train,test}/part-NNNNN
and ofData/<name>/meta.json.
"""

from __future__ import annotations

import argparse
import json
import sys
import time

from tqdm import tqdm

from pipeline.cli import OneLineParser, guarded
from pipeline.data.ofrecord_convert import convert_json_dataset


def main(argv: list[str] | None = None) -> int:
    parser = OneLineParser(
        prog="ofrecordMake.py", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--dataName", required=True, help="folder name under myData/ (and ofData/)")
    parser.add_argument("--part_num", type=int, default=1, help="part files per split (default 1)")
    parser.add_argument("--myData_dir", default="myData", help="where the JSON datasets live (default ./myData)")
    parser.add_argument(
        "--ofData_dir",
        default="ofData",
        help="where OFRecord datasets are written, apart from --myData_dir (default ./ofData)",
    )
    parser.add_argument("--workers", type=int, default=None, help="encoding processes (default: one per CPU core)")
    args = parser.parse_args(argv)
    bar: tqdm | None = None

    def progress(total: int):  # noqa: ANN202
        nonlocal bar
        bar = tqdm(
            total=total, unit="rec", desc=f"converting {args.dataName}", leave=False, mininterval=0.5, disable=None
        )
        return bar.update

    def convert() -> int:
        started = time.perf_counter()
        try:
            target = convert_json_dataset(
                args.dataName, args.myData_dir, args.ofData_dir, args.part_num, progress, args.workers
            )
        finally:
            if bar is not None:
                bar.close()
        seconds = time.perf_counter() - started
        records = sum(json.loads((target / "meta.json").read_text())[k] for k in ("num_examples", "num_val_examples"))
        print(f"wrote {target} ({records} records in {seconds:.2f} s, {records / max(seconds, 1e-9):,.0f} records/s)")
        return 0

    return guarded(convert, "interrupted; nothing was written (any earlier conversion is as it was)")


if __name__ == "__main__":
    sys.exit(main())
