"""Custom datasets: ofData/<name> (OFRecord), converted from myData/<name> (JSON) on the fly when that is missing or
stale (the JSON changed since, by the hash the conversion recorded)."""

from __future__ import annotations

import sys
from pathlib import Path

from pipeline.data.images import ImageDataset
from pipeline.data.ofrecord_convert import convert_json_dataset, stale_conversion
from pipeline.data.ofrecord_dataset import load_ofrecord_dataset
from pipeline.errors import UsageError


def load_custom_dataset(
    name: str,
    dataset_dir: str | Path | None = None,
    ofdata_root: str | Path = "ofData",
    mydata_root: str | Path = "myData",
) -> ImageDataset | None:
    """Return the custom dataset `name`, or None when no such dataset exists.

    `dataset_dir` (run.py --dataset_dir, as in the original) points straight at an OFRecord directory.
    """
    if dataset_dir is not None:
        if not Path(dataset_dir).is_dir():
            raise UsageError(
                f"--dataset_dir {dataset_dir} is not a directory; point it at an OFRecord dataset (meta.json, train/, "
                "test/)"
            )
        return load_ofrecord_dataset(dataset_dir, name)
    converted, source = Path(ofdata_root) / name, Path(mydata_root) / name
    if source.is_dir():
        why = stale_conversion(converted, source) if converted.is_dir() else "first"
        if why is not None:
            print(
                f"converting {source} to {converted} (OFRecord) {why if why == 'first' else f'again: {why}'}",
                file=sys.stderr,
            )
            convert_json_dataset(name, mydata_root, ofdata_root, unless_current=True)
    if converted.is_dir():
        return load_ofrecord_dataset(converted, name)
    return None
