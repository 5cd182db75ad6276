"""Custom datasets (myData JSON -> ofData OFRecord). Seam filled by the dataset issue."""

from __future__ import annotations

from .data import ImageDataset


def load_custom_dataset(name: str, **options: object) -> ImageDataset | None:
    """Return the custom dataset `name`, or None when no such dataset exists."""
    return None
