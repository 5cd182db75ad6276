"""In-memory image datasets and the DataLoader the train/eval loops read them through.

Images stay on the 0..255 scale (uint8 where the source is uint8) and are
normalised per batch, so a 50,000-image CIFAR split costs 150 MB, not 600 MB.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch
from torch.utils.data import BatchSampler, DataLoader, Dataset, DistributedSampler, Sampler


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
    identity: str | None = None  # a content hash of a custom dataset's files (builtins: None, their name says it all)

    @property
    def input_shape(self) -> tuple[int, int, int]:
        return tuple(int(d) for d in self.train_images.shape[1:])  # type: ignore[return-value]

    def normalize(self, images: torch.Tensor) -> torch.Tensor:
        mean = torch.tensor(self.mean, dtype=torch.float32).view(1, -1, 1, 1)
        std = torch.tensor(self.std, dtype=torch.float32).view(1, -1, 1, 1)
        return (images.float() - mean) / std

    def batches(
        self, split: str, batch_size: int, generator: torch.Generator | None = None, limit: int | None = None
    ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """Normalised (images, labels) batches, in this process; shuffled when a generator is given."""
        return iter(self.loader(split, batch_size, generator, limit))

    def loader(
        self,
        split: str,
        batch_size: int,
        generator: torch.Generator | None = None,
        limit: int | None = None,
        *,
        workers: int = 0,
        pin_memory: bool = False,
        shard: tuple[int, int, int] | None = None,
    ) -> Batches:
        """A DataLoader over one split, iterable once per epoch.

        Shuffled from `generator` when one is given: each pass draws a new order from it, so a seeded run repeats.
        `shard=(rank, world_size, seed)`: this process's share, through a DistributedSampler when training (shuffled
        from `seed` and the epoch, padded to equal shares so every process takes the same number of steps), and as
        every world_size-th test sample when evaluating (no padding, so reduced counts are exact; a `limit` then
        applies to the split as one process would read it, so the processes together see the same images).
        """
        images, labels = (
            (self.train_images, self.train_labels) if split == "train" else (self.test_images, self.test_labels)
        )
        split_data = _Split(images, labels, self.normalize)
        order: Sampler[int] | list[int]
        if shard is not None and split == "train":
            rank, world_size, seed = shard
            order = DistributedSampler(
                split_data, num_replicas=world_size, rank=rank, shuffle=generator is not None, seed=seed
            )
        elif shard is not None:
            order = list(range(len(labels) if limit is None else min(len(labels), limit * batch_size)))[
                shard[0] :: shard[1]
            ]
            limit = None
        else:
            order = _SeededOrder(len(labels), generator) if generator is not None else list(range(len(labels)))
        loader = DataLoader(
            split_data,
            sampler=BatchSampler(order, batch_size, drop_last=False),
            batch_size=None,
            num_workers=workers,
            pin_memory=pin_memory,
            persistent_workers=workers > 0,
        )
        return Batches(loader, limit)

    def example_input(self, batch: int = 1) -> torch.Tensor:
        return self.normalize(self.test_images[:batch])


class _Split(Dataset[tuple[torch.Tensor, torch.Tensor]]):
    """One split, fetched a batch at a time (the sampler hands over index lists): one tensor index, one normalisation
    per batch."""

    def __init__(
        self, images: torch.Tensor, labels: torch.Tensor, normalize: Callable[[torch.Tensor], torch.Tensor]
    ) -> None:
        self.images, self.labels, self.normalize = images, labels, normalize

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, indices: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        chosen = torch.as_tensor(indices, dtype=torch.long)
        return self.normalize(self.images[chosen]), self.labels[chosen]


class _SeededOrder(Sampler[int]):
    """A fresh permutation from the caller's generator on every pass: one draw per epoch, so epoch k's order depends
    only on the seed (RandomSampler also draws once more at the end of a pass, which a pass cut short by a batch limit
    skips)."""

    def __init__(self, size: int, generator: torch.Generator) -> None:
        self.size, self.generator = size, generator

    def __len__(self) -> int:
        return self.size

    def __iter__(self) -> Iterator[int]:
        return iter(torch.randperm(self.size, generator=self.generator).tolist())


@dataclass
class Batches:
    """A DataLoader cut to at most `limit` batches per pass."""

    loader: DataLoader[tuple[torch.Tensor, torch.Tensor]]
    limit: int | None = None

    def __len__(self) -> int:
        return len(self.loader) if self.limit is None else min(len(self.loader), self.limit)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        return itertools.islice(iter(self.loader), self.limit)

    def set_epoch(self, epoch: int) -> None:
        """A DistributedSampler shuffles by epoch; every process must be told the same one."""
        batches = self.loader.sampler  # with batch_size=None the DataLoader keeps our BatchSampler as its sampler
        order = batches.sampler if isinstance(batches, BatchSampler) else batches
        if isinstance(order, DistributedSampler):
            order.set_epoch(epoch)


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
