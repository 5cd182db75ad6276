"""Read an ofData/<name> OFRecord dataset (any number of part files) into an ImageDataset."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import numpy as np
import torch

from pipeline.data.images import ImageDataset
from pipeline.data.ofrecord import IMAGE_FEATURE, LABEL_FEATURE, PART_FILE, is_image_shape, iter_records
from pipeline.errors import UsageError


def read_meta(directory: Path) -> dict[str, Any]:
    path = directory / "meta.json"
    if not path.is_file():
        raise UsageError(
            f"{path} not found; an OFRecord dataset needs meta.json (num_classes, image_shape, rgb_mean, rgb_std, "
            "num_examples, num_val_examples)"
        )
    try:
        meta = json.loads(path.read_text())
    except json.JSONDecodeError as error:
        raise UsageError(f"{path}: not valid JSON ({error})") from None
    if not isinstance(meta, dict):
        raise UsageError(f"{path}: must be a JSON object")
    shape = meta.get("image_shape")
    if not is_image_shape(shape):
        raise UsageError(f"{path}: image_shape must be three positive integers [C, H, W], got {shape!r}")
    for key in ("num_classes", "num_examples", "num_val_examples"):
        value = meta.get(key)
        if not isinstance(value, int) or isinstance(value, bool) or value < (2 if key == "num_classes" else 1):
            raise UsageError(
                f"{path}: {key} must be a positive integer{' >= 2' if key == 'num_classes' else ''}, got {value!r}"
            )
    for key in ("rgb_mean", "rgb_std"):
        value = meta.get(key)
        if (
            not isinstance(value, list)
            or len(value) != shape[0]
            or not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in value)
        ):
            raise UsageError(f"{path}: {key} must list one number per channel ({shape[0]}), got {value!r}")
    if any(v <= 0 for v in meta["rgb_std"]):
        raise UsageError(f"{path}: rgb_std must be positive, got {meta['rgb_std']!r}")
    return meta


def read_split(directory: Path, split: str, meta: dict[str, Any], expected: int) -> tuple[torch.Tensor, torch.Tensor]:
    """All records of one split, checked record by record; pixels stay on the 0..255 scale."""
    folder = directory / split
    parts = sorted(p for p in folder.glob("part-*") if PART_FILE.fullmatch(p.name)) if folder.is_dir() else []
    if not parts:
        raise UsageError(
            f"{folder} holds no part-NNNNN files; convert the dataset again (python ofrecordMake.py --dataName "
            f"{directory.name})"
        )
    channels, height, width = meta["image_shape"]
    size, num_classes = channels * height * width, meta["num_classes"]
    images = np.empty((expected, size), dtype=np.float32)
    labels = np.empty(expected, dtype=np.int64)
    count = 0
    for part in parts:
        for index, record in iter_records(part):
            where = f"{part}: record {index}"
            if IMAGE_FEATURE not in record.feature or LABEL_FEATURE not in record.feature:
                raise UsageError(f"{where} lacks the '{IMAGE_FEATURE}' or '{LABEL_FEATURE}' feature")
            pixels = record.feature[IMAGE_FEATURE].float_list.value
            label_values = record.feature[LABEL_FEATURE].int32_list.value
            if len(pixels) != size:
                raise UsageError(
                    f"{where} has {len(pixels)} pixel values, expected C*H*W = {size} for image_shape "
                    f"{meta['image_shape']} in meta.json"
                )
            if len(label_values) != 1 or not 0 <= label_values[0] < num_classes:
                raise UsageError(f"{where} has label {list(label_values)}, expected one value in 0..{num_classes - 1}")
            if count >= expected:
                raise UsageError(
                    f"{folder} holds more records than meta.json's {expected}; meta.json is inconsistent with the part "
                    "files"
                )
            images[count] = np.asarray(pixels, dtype=np.float32)
            labels[count] = label_values[0]
            count += 1
    if count != expected:
        raise UsageError(
            f"{folder} holds {count} records but meta.json says {expected}; meta.json is inconsistent with the part "
            "files"
        )
    return torch.from_numpy(images).view(expected, channels, height, width), torch.from_numpy(labels)


def content_identity(directory: Path) -> str:
    """A hash of meta.json and every part file, in order: two datasets under one name with other content differ here."""
    digest = hashlib.sha256()
    parts = [
        p
        for split in ("train", "test")
        for p in sorted((directory / split).glob("part-*"))
        if PART_FILE.fullmatch(p.name)
    ]
    for path in [directory / "meta.json", *parts]:
        with path.open("rb") as handle:
            digest.update(f"{path.relative_to(directory)}\0".encode() + hashlib.file_digest(handle, "sha256").digest())
    return digest.hexdigest()[:16]


def load_ofrecord_dataset(directory: str | Path, name: str) -> ImageDataset:
    directory = Path(directory)
    meta = read_meta(directory)
    train_images, train_labels = read_split(directory, "train", meta, meta["num_examples"])
    test_images, test_labels = read_split(directory, "test", meta, meta["num_val_examples"])
    mean, std = tuple(float(v) for v in meta["rgb_mean"]), tuple(float(v) for v in meta["rgb_std"])
    return ImageDataset(
        name,
        train_images,
        train_labels,
        test_images,
        test_labels,
        meta["num_classes"],
        mean,
        std,
        content_identity(directory),
    )
