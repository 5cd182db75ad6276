"""In-memory image datasets and the batch iterator the train/eval loops use.

Images stay on the 0..255 scale (uint8 where the source is uint8) and are
normalised per batch, so a 50,000-image CIFAR split costs 150 MB, not 600 MB.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import torch


@dataclass
class ImageDataset:
    name: str
    train_images: torch.Tensor  # N x C x H x W, 0..255
    train_labels: torch.Tensor  # N, int64
    test_images: torch.Tensor
    test_labels: torch.Tensor
    num_classes: int
    mean: tuple[float, ...]  # per channel, 0..255 scale
    std: tuple[float, ...]

    @property
    def input_shape(self) -> tuple[int, int, int]:
        return tuple(int(d) for d in self.train_images.shape[1:])  # type: ignore[return-value]

    def normalize(self, images: torch.Tensor) -> torch.Tensor:
        mean = torch.tensor(self.mean, dtype=torch.float32).view(1, -1, 1, 1)
        std = torch.tensor(self.std, dtype=torch.float32).view(1, -1, 1, 1)
        return (images.float() - mean) / std

    def batches(
        self,
        split: str,
        batch_size: int,
        generator: torch.Generator | None = None,
        limit: int | None = None,
    ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """Yield normalised (images, labels); shuffled when a generator is given."""
        images, labels = (self.train_images, self.train_labels) if split == "train" else (self.test_images, self.test_labels)
        order = torch.randperm(len(labels), generator=generator) if generator is not None else torch.arange(len(labels))
        count = num_batches(len(labels), batch_size, limit)
        for index in range(count):
            chosen = order[index * batch_size : (index + 1) * batch_size]
            yield self.normalize(images[chosen]), labels[chosen]

    def example_input(self, batch: int = 1) -> torch.Tensor:
        return self.normalize(self.test_images[:batch])


def num_batches(num_samples: int, batch_size: int, limit: int | None) -> int:
    total = -(-num_samples // batch_size)
    return total if limit is None else min(total, limit)


def channel_stats(images: torch.Tensor) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Per-channel mean and std of an N x C x H x W tensor, computed in chunks (float64)."""
    channels = images.shape[1]
    total = torch.zeros(channels, dtype=torch.float64)
    total_sq = torch.zeros(channels, dtype=torch.float64)
    count = 0
    for start in range(0, len(images), 4096):
        chunk = images[start : start + 4096].double().transpose(0, 1).reshape(channels, -1)
        total += chunk.sum(1)
        total_sq += (chunk * chunk).sum(1)
        count += chunk.shape[1]
    mean = total / max(count, 1)
    std = (total_sq / max(count, 1) - mean * mean).clamp_min(1e-12).sqrt()
    return tuple(float(m) for m in mean), tuple(max(float(s), 1e-3) for s in std)
