"""Train and evaluate loops shared by step 1 (base) and step 3 (refine)."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from algorithms.modules import eval_mode
from pipeline.data.images import ImageDataset
from pipeline.errors import UsageError
from pipeline.train.distributed import all_reduce_max, all_reduce_sum, average_gradients, data_parallel
from pipeline.train.runtime import CPU, Runtime, synchronize

OPTIMIZERS: dict[str, tuple[type[torch.optim.Optimizer], dict[str, float]]] = {
    "adam": (torch.optim.Adam, {}),
    "momentum": (torch.optim.SGD, {"momentum": 0.9}),
    "sgd": (torch.optim.SGD, {}),
}
LossFunction = Callable[[nn.Module, torch.Tensor, torch.Tensor], torch.Tensor]  # (model, images, labels) -> loss


def cross_entropy(model: nn.Module, images: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(model(images), labels)


@dataclass
class EvalResult:
    top1: float
    top_k: float
    k: int
    samples_per_s: float


def make_optimizer(
    name: str, params: object, lr: float, wrap: Callable[[type], type] = lambda cls: cls
) -> torch.optim.Optimizer:
    """`wrap` lets a library that rebuilds the optimizer record its arguments (NNI's nni.trace)."""
    if name not in OPTIMIZERS:
        raise UsageError(f"unknown --model_update {name!r}; choose one of: {', '.join(OPTIMIZERS)}")
    cls, options = OPTIMIZERS[name]
    return wrap(cls)(params, lr=lr, **options)


def top_k_for(num_classes: int) -> int:
    return min(5, num_classes)


@torch.inference_mode()
def evaluate(
    model: nn.Module, data: ImageDataset, batch_size: int, limit: int | None = None, runtime: Runtime = CPU
) -> EvalResult:
    """Top-1 / top-k accuracy on the test split and inference throughput.

    Under several processes each evaluates every world_size-th test image and the counts are summed across them,
    so every process returns the same, exact figures (throughput: all images over the slowest process's time).
    """
    k = top_k_for(data.num_classes)
    counts = torch.zeros(3, dtype=torch.float64)  # top-1 hits, top-k hits, images
    elapsed = 0.0
    shard = (runtime.rank, runtime.world_size, 0) if runtime.distributed else None
    with eval_mode(model):
        for images, labels in data.loader(
            "test", batch_size, limit=limit, workers=runtime.workers, pin_memory=runtime.pin_memory, shard=shard
        ):
            images, labels = runtime.inputs(images), labels.to(runtime.device, non_blocking=True)
            start = time.perf_counter()
            with runtime.autocast():
                logits = model(images)
            synchronize(runtime.device)
            elapsed += time.perf_counter() - start
            top = logits.topk(k, dim=1).indices
            counts += torch.tensor(
                [float((top[:, 0] == labels).sum()), float((top == labels[:, None]).any(dim=1).sum()), len(labels)],
                dtype=torch.float64,
            )
    if runtime.distributed:
        counts, elapsed = all_reduce_sum(counts, runtime), float(all_reduce_max(torch.tensor([elapsed]), runtime))
    correct1, correct_k, seen = counts.tolist()
    seen = max(seen, 1)
    return EvalResult(correct1 / seen, correct_k / seen, k, seen / max(elapsed, 1e-9))


def train(
    model: nn.Module,
    data: ImageDataset,
    *,
    epochs: int,
    batch_size: int,
    val_batch_size: int,
    lr: float,
    optimizer_name: str,
    seed: int,
    limit_batches: int | None = None,
    limit_val_batches: int | None = None,
    desc: str = "train",
    on_epoch: Callable[[int, EvalResult], None] | None = None,
    after_step: Callable[[nn.Module], None] | None = None,
    loss_fn: LossFunction = cross_entropy,
    runtime: Runtime = CPU,
) -> list[EvalResult]:
    """Train with a seeded shuffle; evaluate after every epoch. Deterministic for a seed.

    A loss with parameters of its own (feature distillation's projections) trains them alongside the model's. Under
    several processes the model trains as DistributedDataParallel, each process on its share of every epoch with
    `batch_size` images per step, and the loss's own parameters get their gradients averaged the same way.
    """
    torch.manual_seed(seed)  # dropout masks
    generator = torch.Generator().manual_seed(seed)
    extra = list(loss_fn.parameters()) if hasattr(loss_fn, "parameters") else []
    optimizer = make_optimizer(optimizer_name, [*model.parameters(), *extra], lr)
    scaler = runtime.grad_scaler()
    shard = (runtime.rank, runtime.world_size, seed) if runtime.distributed else None
    batches = data.loader(
        "train",
        batch_size,
        generator,
        limit_batches,
        workers=runtime.workers,
        pin_memory=runtime.pin_memory,
        shard=shard,
    )
    trained = data_parallel(model, runtime) if runtime.distributed else model
    history: list[EvalResult] = []
    for epoch in range(epochs):
        model.train()
        trained.train()  # a SyncBatchNorm view keeps its own mode flags
        batches.set_epoch(epoch)
        bar = tqdm(
            batches,
            total=len(batches),
            desc=f"{desc} epoch {epoch + 1}/{epochs}",
            leave=False,
            disable=None if runtime.is_main else True,
        )
        for images, labels in bar:
            images, labels = runtime.inputs(images), labels.to(runtime.device, non_blocking=True)
            optimizer.zero_grad(set_to_none=True)
            with runtime.autocast():
                loss = loss_fn(trained, images, labels)
            scaler.scale(loss).backward()
            if runtime.distributed and extra:
                average_gradients(extra, runtime)
            scaler.step(optimizer)
            scaler.update()
            if after_step is not None:
                after_step(model)
            bar.set_postfix(loss=f"{loss.item():.3f}", refresh=False)
        result = evaluate(model, data, val_batch_size, limit_val_batches, runtime)
        history.append(result)
        if on_epoch is not None:
            on_epoch(epoch, result)
    return history
