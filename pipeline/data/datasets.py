"""Dataset names -> loaders. Custom datasets (myData JSON, ofData OFRecord) resolve after the builtins."""

from __future__ import annotations

from pathlib import Path

from pipeline.data.digits import load_digits_dataset
from pipeline.data.images import ImageDataset
from pipeline.data.mnist5k import load_mnist5k_dataset
from pipeline.data.torchvision_data import TORCHVISION_SOURCES, load_torchvision_dataset
from pipeline.errors import UsageError

BUILTIN_DATASETS: tuple[str, ...] = ("digits", "mnist5k", *TORCHVISION_SOURCES)


def load_dataset(name: str, data_dir: str | Path = "data", download: bool = False, **custom: object) -> ImageDataset:
    """Load a dataset by name: builtins first, then the custom-dataset resolver."""
    if name == "digits":
        return load_digits_dataset()
    if name == "mnist5k":
        return load_mnist5k_dataset()
    if name in TORCHVISION_SOURCES:
        return load_torchvision_dataset(name, data_dir, download)
    from pipeline.data.custom_data import load_custom_dataset

    dataset = load_custom_dataset(name, **custom)
    if dataset is None:
        raise UsageError(
            f"unknown data type {name!r}: not one of {', '.join(BUILTIN_DATASETS)} and no ofData/<name> or "
            "myData/<name> folder holds it"
        )
    return dataset
