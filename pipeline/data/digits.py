"""scikit-learn's `load_digits`: 1,797 real 8x8 digits shipped inside sklearn, the offline default."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from pipeline.data.images import ImageDataset, channel_stats

DIGITS_SIZE = 32  # upsampled so every zoo model (lenet, vgg, resnet, ...) can take it
TEST_FRACTION = 0.2
SPLIT_SEED = 0  # fixed: the split never depends on --seed


def load_digits_dataset() -> ImageDataset:
    from sklearn.datasets import load_digits

    bunch = load_digits()
    images = torch.tensor(bunch.images, dtype=torch.float32).unsqueeze(1) * (255.0 / 16.0)
    images = F.interpolate(images, size=(DIGITS_SIZE, DIGITS_SIZE), mode="bilinear", align_corners=False)
    images = images.clamp(0.0, 255.0)
    labels = torch.tensor(bunch.target, dtype=torch.int64)
    order = torch.randperm(len(labels), generator=torch.Generator().manual_seed(SPLIT_SEED))
    num_test = int(round(len(labels) * TEST_FRACTION))
    test_idx, train_idx = order[:num_test], order[num_test:]
    mean, std = channel_stats(images[train_idx])
    return ImageDataset(
        "digits", images[train_idx], labels[train_idx], images[test_idx], labels[test_idx], 10, mean, std
    )
