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

from .data import ImageDataset, num_batches
from .errors import UsageError

OPTIMIZERS = ("adam", "momentum", "sgd")
LossFunction = Callable[[nn.Module, torch.Tensor, torch.Tensor], torch.Tensor]  # (model, images, labels) -> loss


def cross_entropy(model: nn.Module, images: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(model(images), labels)


@dataclass
class EvalResult:
    top1: float
    top_k: float
    k: int
    samples_per_s: float


def make_optimizer(name: str, params: object, lr: float) -> torch.optim.Optimizer:
    if name == "adam":
        return torch.optim.Adam(params, lr=lr)
    if name == "momentum":
        return torch.optim.SGD(params, lr=lr, momentum=0.9)
    if name == "sgd":
        return torch.optim.SGD(params, lr=lr)
    raise UsageError(f"unknown --model_update {name!r}; choose one of: {', '.join(OPTIMIZERS)}")


def top_k_for(num_classes: int) -> int:
    return min(5, num_classes)


@torch.inference_mode()
def evaluate(model: nn.Module, data: ImageDataset, batch_size: int, limit: int | None = None) -> EvalResult:
    """Top-1 / top-k accuracy on the test split and inference throughput."""
    k = top_k_for(data.num_classes)
    correct1 = correct_k = seen = 0
    elapsed = 0.0
    with eval_mode(model):
        for images, labels in data.batches("test", batch_size, limit=limit):
            start = time.perf_counter()
            logits = model(images)
            elapsed += time.perf_counter() - start
            top = logits.topk(k, dim=1).indices
            correct1 += int((top[:, 0] == labels).sum())
            correct_k += int((top == labels[:, None]).any(dim=1).sum())
            seen += len(labels)
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
) -> list[EvalResult]:
    """Train with a seeded shuffle; evaluate after every epoch. Deterministic for a seed."""
    torch.manual_seed(seed)  # dropout masks
    generator = torch.Generator().manual_seed(seed)
    optimizer = make_optimizer(optimizer_name, model.parameters(), lr)
    history: list[EvalResult] = []
    steps = num_batches(len(data.train_labels), batch_size, limit_batches)
    for epoch in range(epochs):
        model.train()
        bar = tqdm(
            data.batches("train", batch_size, generator, limit_batches), total=steps, desc=f"{desc} epoch {epoch + 1}/{epochs}", leave=False, disable=None
        )
        for images, labels in bar:
            optimizer.zero_grad(set_to_none=True)
            loss = loss_fn(model, images, labels)
            loss.backward()
            optimizer.step()
            if after_step is not None:
                after_step(model)
            bar.set_postfix(loss=f"{loss.item():.3f}", refresh=False)
        result = evaluate(model, data, val_batch_size, limit_val_batches)
        history.append(result)
        if on_epoch is not None:
            on_epoch(epoch, result)
    return history
