"""The contract every backend honours (DESIGN.md section 3)."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch
from torch import nn

TrainBatches = Callable[[], Iterator[tuple[torch.Tensor, torch.Tensor]]]  # a fresh pass of (images, labels) per call


@dataclass(frozen=True)
class JobContext:
    """What a job (run.py, a harness cell) offers every backend beyond the common contract. Each backend's `options`
    takes what its prune() uses and its `validate` reads what it checks, so the job names no backend, and a new backend
    touches only backends/."""

    # training data, for the methods that train or take gradients while pruning
    train_batches: TrainBatches | None = None
    training_steps: int = 50  # how long those train
    learning_rate: float = 1e-3
    round_to: int | None = None  # kept channel counts rounded up to multiples of this
    threshold: float = 0.06  # weight magnitude of threshold criteria (scratch conv_threshold)
    attention: str = "heads"  # what scratch prunes of an attention block: "heads", "head_dim" or "none"
    schedule_over: str = "l1"  # what iterative schedules rank by (NNI agp / linear)
    verbose: bool = False  # let a library's own log lines through


NO_JOB = JobContext()  # a library call outside a job: no training data, every default


@dataclass
class PruneResult:
    model: nn.Module  # a new model; physically smaller when `physical`
    kept: dict[str, list[int]]  # pruned layer -> sorted kept output units
    masks: dict[str, dict[str, torch.Tensor]]  # NNI shape: {layer: {"weight": mask, "bias": mask}}
    original_units: dict[str, int]  # pruned layer -> output units before pruning
    backend: str
    method: str
    scope: str
    physical: bool = True
    info: dict[str, Any] = field(default_factory=dict)

    def kept_table(self) -> list[dict[str, Any]]:
        """One row per pruned layer: how many units it had, kept, and the kept fraction."""
        return [
            {
                "layer": name,
                "before": self.original_units[name],
                "after": len(kept),
                "kept": round(len(kept) / self.original_units[name], 4),
            }
            for name, kept in self.kept.items()
        ]


class Backend(Protocol):
    name: str
    methods: tuple[str, ...]

    def default_method(self, model: nn.Module) -> str: ...

    def default_methods(self, model: nn.Module) -> tuple[str, ...]: ...

    def physical(self, method: str) -> bool:
        """Whether `method` makes a smaller model (False: masks only, the weights zeroed in place)."""
        ...

    def options(self, context: JobContext) -> dict[str, Any]:
        """The keyword options of prune() this backend takes from a job."""
        ...

    def prunable_layers(
        self, model: nn.Module, method: str, example_input: torch.Tensor, exclude: Iterable[str] = ()
    ) -> list[str]:
        """The layers a per-layer sparsity mapping may name for `method` (what a budget search allocates over)."""
        ...

    def kept_ratio(self, size: int, kept: int) -> float:
        """The per-layer ratio that makes this backend keep exactly `kept` of `size` units (each rounds its own way)."""
        ...

    def validate(
        self,
        model: nn.Module,
        method: str,
        sparsity: float | Mapping[str, float],
        scope: str | None = None,
        *,
        exclude: Iterable[str] = (),
        context: JobContext = NO_JOB,
    ) -> None:
        """The request errors prune() would raise, found before any training is spent."""
        ...

    def prune(
        self,
        model: nn.Module,
        method: str,
        sparsity: float | Mapping[str, float],
        example_input: torch.Tensor,
        *,
        scope: str | None = None,
        exclude: Iterable[str] = (),
        seed: int = 0,
        **options: Any,
    ) -> PruneResult: ...
