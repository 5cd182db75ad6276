"""The contract every backend honours (DESIGN.md section 3)."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch
from torch import nn


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
            {"layer": name, "before": self.original_units[name], "after": len(kept), "kept": round(len(kept) / self.original_units[name], 4)}
            for name, kept in self.kept.items()
        ]


class Backend(Protocol):
    name: str
    methods: tuple[str, ...]

    def default_method(self, model: nn.Module) -> str: ...

    def default_methods(self, model: nn.Module) -> tuple[str, ...]: ...

    def validate(self, model: nn.Module, method: str, sparsity: float | Mapping[str, float], scope: str | None = None) -> None: ...

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
