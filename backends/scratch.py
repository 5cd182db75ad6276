"""The `scratch` backend: our own OneFlow-style operators, graph analysis and surgery."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

import torch
from torch import nn

from algorithms.channel_pruning import (
    ChannelPruning,
    candidate_groups,
    check_request,
    check_round_to,
    excluded_producers,
    prune_channels,
)
from algorithms.criteria import DEFAULT_THRESHOLD, SCRATCH_METHODS
from algorithms.errors import PruningError
from algorithms.graph import analyze
from algorithms.modules import has_norm

from .base import NO_JOB, JobContext, PruneResult


def check_threshold_decides(model: nn.Module, result: ChannelPruning, threshold: float) -> None:
    """A threshold that gives every unit of every group the same count decides nothing (the highest indices would go,
    whatever the weights): refuse it, naming the range of |w| a useful threshold lies in."""
    if not result.scored or len(result.tied) < result.scored:
        return
    modules = dict(model.named_modules())
    weights = [modules[name].weight.detach().abs().flatten() for group in result.tied for name in group.split("+")]
    low, high = float(torch.cat(weights).min()), float(torch.cat(weights).max())
    raise PruningError(
        f"threshold {threshold:g} gives every filter of every layer the same count of |w| above it, so it decides "
        f"nothing; |w| here spans {low:.3g}..{high:.3g}: choose a threshold inside that range"
    )


class ScratchBackend:
    name = "scratch"
    methods: tuple[str, ...] = tuple(SCRATCH_METHODS)

    def default_method(self, model: nn.Module) -> str:
        """`bn` where the model has BatchNorm (the original default), else the DNN `neuron` operator."""
        return "bn" if has_norm(model) else "neuron"

    def default_methods(self, model: nn.Module) -> tuple[str, ...]:
        """The harness's default set: the original's default and the L1 magnitude operator (random runs as the harness's
        control)."""
        return (self.default_method(model), "conv_all")

    def physical(self, method: str) -> bool:
        return True

    def options(self, context: JobContext) -> dict[str, Any]:
        return {"threshold": context.threshold, "round_to": context.round_to, "attention": context.attention}

    def prunable_layers(
        self, model: nn.Module, method: str, example_input: torch.Tensor, exclude: Iterable[str] = ()
    ) -> list[str]:
        graph = analyze(model, example_input)
        modules = dict(model.named_modules())
        groups = set(
            candidate_groups(SCRATCH_METHODS[method], modules, graph, excluded_producers(graph, set(modules), exclude))
        )
        return [producer for producer, group in graph.group_of_producer.items() if group in groups]

    def kept_ratio(self, size: int, kept: int) -> float:
        return (size - kept) / size  # the operators remove floor(size x ratio), with a guard against float error

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
        threshold: float = DEFAULT_THRESHOLD,
        round_to: int | None = None,
        attention: str = "heads",
        **options: Any,
    ) -> PruneResult:
        """`attention`: "heads" (prune whole heads of multi-head attention blocks), "head_dim" or "none"."""
        if options:
            raise ValueError(f"the scratch backend takes no option(s) {', '.join(sorted(options))}")
        result = prune_channels(
            model,
            method,
            sparsity,
            example_input,
            scope=scope,
            exclude=exclude,
            seed=seed,
            threshold=threshold,
            round_to=round_to,
            attention=attention,
            methods=SCRATCH_METHODS,
        )
        info = {"why_unprunable": result.graph.why_unprunable(), "round_to": round_to}
        if result.heads:
            info["heads"] = {"mode": attention, "kept": result.heads}
        if result.graph.captured:  # the graph is the example input's: say so beside the result
            info["captured"] = result.graph.captured
        if SCRATCH_METHODS[method].takes_threshold:  # the threshold decided which units go: the job records it
            info["threshold"] = threshold
            check_threshold_decides(model, result, threshold)
            if result.tied:  # the threshold decided nothing there: the highest indices went
                info["threshold_ties"] = result.tied
        return PruneResult(
            result.model, result.kept, result.masks, result.original_units, self.name, method, result.scope, info=info
        )

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
        """The request errors prune() would raise, found before any training is spent (layer names are checked when
        the model is traced, in prune())."""
        check_request(model, method, sparsity, scope, SCRATCH_METHODS)
        check_round_to(context.round_to)
