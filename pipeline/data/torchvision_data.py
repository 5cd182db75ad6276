"""MNIST / CIFAR-10 / CIFAR-100 through torchvision's own readers, from --data_dir."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from pipeline.data.images import ImageDataset, channel_stats
from pipeline.errors import UsageError

# name -> (torchvision class name, folder torchvision keeps the files in, files that must exist there)
TORCHVISION_SOURCES: dict[str, tuple[str, str, tuple[str, ...]]] = {
    "mnist": (
        "MNIST",
        "MNIST/raw",
        ("train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
    ),
    "cifar10": (
        "CIFAR10",
        "cifar-10-batches-py",
        ("data_batch_1", "data_batch_2", "data_batch_3", "data_batch_4", "data_batch_5", "test_batch", "batches.meta"),
    ),
    "cifar100": ("CIFAR100", "cifar-100-python", ("train", "test", "meta")),
}


def _as_nchw_uint8(data: object) -> torch.Tensor:
    array = data.numpy() if isinstance(data, torch.Tensor) else np.asarray(data)
    tensor = torch.from_numpy(np.ascontiguousarray(array)).to(torch.uint8)
    if tensor.ndim == 3:  # MNIST: N x H x W
        return tensor.unsqueeze(1)
    return tensor.permute(0, 3, 1, 2).contiguous()  # CIFAR: N x H x W x C


def load_torchvision_dataset(name: str, data_dir: str | Path, download: bool) -> ImageDataset:
    import torchvision.datasets as tvd

    class_name, folder, files = TORCHVISION_SOURCES[name]
    root = Path(data_dir)
    missing = [f for f in files if not (root / folder / f).is_file()]
    if missing and not download:
        raise UsageError(
            f"{name} not found: {root / folder} lacks {', '.join(missing)}; pass --download to fetch it, or --data_dir "
            f"to point at the folder that holds {folder.split('/')[0]}"
        )
    dataset_class = getattr(tvd, class_name)
    try:
        train = dataset_class(str(root), train=True, download=download)
        test = dataset_class(str(root), train=False, download=download)
    except RuntimeError as error:  # torchvision: corrupted files (checksum), unreadable archives
        raise UsageError(
            f"{name} under {root / folder} could not be read ({error}); delete it and rerun with --download"
        ) from None
    except OSError as error:  # no network during --download
        raise UsageError(
            f"{name} could not be downloaded into {root} ({error}); copy the files there by hand"
        ) from None
    train_images, test_images = _as_nchw_uint8(train.data), _as_nchw_uint8(test.data)
    train_labels = torch.as_tensor(np.asarray(train.targets), dtype=torch.int64)
    test_labels = torch.as_tensor(np.asarray(test.targets), dtype=torch.int64)
    num_classes = len(train.classes)
    mean, std = channel_stats(train_images)
    return ImageDataset(name, train_images, train_labels, test_images, test_labels, num_classes, mean, std)
