"""Structured channel pruning of any fx-traceable model: analyse, score, select, cut.

Used by the `scratch` backend; nothing here knows about the model zoo or any backend.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

import torch
from torch import nn

from .criteria import DEFAULT_THRESHOLD, METHODS, Method, gamma_magnitude, greedy_redundant, group_score, unit_sum
from .errors import PruningError
from .graph import ChannelGraph, analyze
from .masks import Masks, build_masks
from .modules import eval_mode, has_norm
from .selection import keep_all_but, keep_in_blocks, removal_count, round_up_kept, select_global, select_per_layer
from .surgery import shrink

SCOPES = ("global", "layer")


@dataclass
class ChannelPruning:
    model: nn.Module  # new, physically smaller
    kept: dict[str, list[int]]  # pruned layer -> sorted kept output units
    masks: Masks
    original_units: dict[str, int]  # pruned layer -> units before pruning
    scope: str
    graph: ChannelGraph
    # threshold methods: groups whose units all scored alike (index decided)
    tied: list[str] = field(default_factory=list)
    scored: int = 0  # groups that were scored (candidates for pruning)


def validate_sparsity(sparsity: float | Mapping[str, float]) -> None:
    ratios = sparsity.values() if isinstance(sparsity, Mapping) else [sparsity]
    for ratio in ratios:
        if isinstance(ratio, bool) or not isinstance(ratio, (int, float)) or not 0.0 <= float(ratio) < 1.0:
            raise PruningError(f"sparsity must be a fraction of channels in [0, 1), got {ratio!r}")


def excluded_producers(graph: ChannelGraph, module_names: set[str], exclude: Iterable[str]) -> set[str]:
    excluded = set()
    for name in exclude:
        if name not in module_names:
            raise PruningError(
                f"exclude names {name!r}, which the model does not have; see model.named_modules() for names"
            )
        excluded |= {p for p in graph.group_of_producer if p == name or p.startswith(name + ".")}
    return excluded


def _norm_gamma(modules: dict[str, nn.Module], graph: ChannelGraph, producer: str) -> torch.Tensor | None:
    norm = graph.norm_after.get(producer)
    return None if norm is None or modules[norm].weight is None else modules[norm].weight


def _group_tensors(
    method: Method, modules: dict[str, nn.Module], graph: ChannelGraph, members: list[str]
) -> list[torch.Tensor]:
    if method.source == "norm":
        return [g for g in (_norm_gamma(modules, graph, m) for m in members) if g is not None]
    return [modules[m].weight for m in members]


def _score(method: Method, tensors: list[torch.Tensor], threshold: float) -> torch.Tensor:
    """A group's score under `method` (criteria.group_score: the members' mean, on the CPU)."""
    extra = (threshold,) if method.takes_threshold else ()
    return group_score(lambda t: method.score(t, *extra), tensors)


def check_scope(scope: str | None, per_layer: bool) -> None:
    """None (the method's own scope), 'global' or 'layer'; per-layer ratios are layer scope by definition."""
    if scope is not None and scope not in SCOPES:
        raise PruningError(f"unknown scope {scope!r}; choose 'global' or 'layer'")
    if scope == "global" and per_layer:
        raise PruningError("per-layer sparsity ratios cannot use scope='global'; use scope='layer'")


def check_round_to(round_to: int | None) -> None:
    if round_to is not None and (isinstance(round_to, bool) or not isinstance(round_to, int) or round_to < 1):
        raise PruningError(f"round_to must be a positive whole number of channels, got {round_to!r}")


def check_request(
    model: nn.Module,
    method: str,
    sparsity: float | Mapping[str, float],
    scope: str | None,
    methods: Mapping[str, Method] = METHODS,
) -> tuple[Method, str]:
    """Validate a request without tracing; returns the method and the scope it resolves to."""
    if method not in methods:
        raise PruningError(f"unknown pruning method {method!r}; choose one of: {', '.join(methods)}")
    spec = methods[method]
    validate_sparsity(sparsity)
    per_layer = isinstance(sparsity, Mapping)
    check_scope(scope, per_layer)
    scope = ("layer" if per_layer else spec.default_scope) if scope is None else scope
    if scope == "global" and spec.greedy:
        raise PruningError(f"{method} (a greedy per-layer method) cannot use scope='global'; use scope='layer'")
    if spec.source == "norm" and not has_norm(model):
        raise PruningError(
            f"{method} ranks BatchNorm scales but {type(model).__name__} has no BatchNorm; use conv_all or neuron"
        )
    return spec, scope


def candidate_groups(spec: Method, modules: dict[str, nn.Module], graph: ChannelGraph, excluded: set[str]) -> list[int]:
    """The groups `spec` can prune: prunable, wider than one channel, nothing excluded, something to score (a norm
    method needs a BatchNorm after a member); a greedy pair method has no per-block form: grouped convs stay whole."""
    return [
        index
        for index, group in enumerate(graph.groups)
        if group.prunable
        and group.size > 1
        and not excluded.intersection(group.members)
        and (spec.source == "random" or _group_tensors(spec, modules, graph, group.members))
        and not (spec.greedy and group.divisor > 1)
    ]


def prune_channels(
    model: nn.Module,
    method: str,
    sparsity: float | Mapping[str, float],
    example_input: torch.Tensor,
    *,
    scope: str | None = None,
    exclude: Iterable[str] = (),
    seed: int = 0,
    threshold: float = DEFAULT_THRESHOLD,
    methods: Mapping[str, Method] = METHODS,
    graph: ChannelGraph | None = None,
    verify: bool = True,
    round_to: int | None = None,
) -> ChannelPruning:
    """Prune output channels of every prunable Conv2d / hidden Linear; `model` is left untouched.

    `round_to=N`: every pruned group keeps a multiple of N channels (the count rounded up; a group that would round up
    to its full size stays whole).

    A caller that prunes one model many times (sensitivity analysis) passes `graph=analyze(model, example_input)` once,
    and `verify=False` (skip the check that the pruned model runs) once the same structure has passed it.
    """
    spec, scope = check_request(model, method, sparsity, scope, methods)
    check_round_to(round_to)
    modules = dict(model.named_modules())
    per_layer = isinstance(sparsity, Mapping)
    graph = analyze(model, example_input) if graph is None else graph
    excluded = excluded_producers(graph, set(modules), exclude)
    ratios: dict[int, float] = {}
    if per_layer:
        for name, ratio in sparsity.items():
            if name not in graph.group_of_producer:
                kind = "is not a Conv2d or Linear layer" if name in modules else "is not in the model"
                raise PruningError(f"per-layer sparsity names {name!r}, which {kind}; use Conv2d / hidden Linear names")
            group = graph.group_of_producer[name]
            if not graph.groups[group].prunable:
                raise PruningError(f"{name} cannot be pruned: {graph.groups[group].blocked_by[0]}")
            if spec.greedy and graph.groups[group].divisor > 1:
                raise PruningError(
                    f"{name} feeds or is a grouped convolution, which {method} (a greedy pair method) cannot prune; "
                    "use conv_all or bn"
                )
            ratios[group] = max(ratios.get(group, 0.0), float(ratio))
    else:
        ratios = {g: float(sparsity) for g, group in enumerate(graph.groups) if group.prunable}

    prunable = set(candidate_groups(spec, modules, graph, excluded))
    candidates = {
        index: (ratio, _group_tensors(spec, modules, graph, graph.groups[index].members))
        for index, ratio in ratios.items()
        if index in prunable
    }

    generator = torch.Generator().manual_seed(seed)
    tied: list[str] = []
    with torch.no_grad():
        if spec.greedy:
            kept = {}
            for index, (ratio, tensors) in candidates.items():
                distances = torch.stack([spec.score(t) for t in tensors]).sum(0).cpu()
                importance = group_score(lambda t: gamma_magnitude(t) if t.ndim == 1 else unit_sum(t), tensors)
                removed = greedy_redundant(distances, importance, removal_count(graph.groups[index].size, ratio))
                kept[index] = keep_all_but(graph.groups[index].size, removed)
                if round_to:
                    kept[index] = round_up_kept(importance, kept[index], round_to)
        else:
            scores = {
                index: torch.rand(graph.groups[index].size, generator=generator, dtype=torch.float64)
                if spec.source == "random"
                else _score(spec, tensors, threshold)
                for index, (_, tensors) in candidates.items()
            }
            if spec.takes_threshold:  # groups whose every unit scores the same: the threshold did not decide there
                tied = [
                    "+".join(graph.groups[i].members) for i, score in scores.items() if bool((score == score[0]).all())
                ]
            if scope == "global":
                kept = select_global(scores, float(sparsity)) if scores else {}
            else:
                kept = select_per_layer(scores, {i: r for i, (r, _) in candidates.items()})
            for index in kept:
                if graph.groups[index].divisor > 1:
                    kept[index] = keep_in_blocks(scores[index], kept[index], graph.groups[index].divisor)
                if round_to:
                    kept[index] = round_up_kept(scores[index], kept[index], round_to, graph.groups[index].divisor)
    kept = {g: k for g, k in kept.items() if len(k) < graph.groups[g].size}

    pruned = shrink(model, graph, kept)
    if verify:
        _check_runs(pruned, example_input)
    kept_by_layer = {p: kept[g].tolist() for p, g in graph.group_of_producer.items() if g in kept}
    original = {p: graph.groups[graph.group_of_producer[p]].size for p in kept_by_layer}
    masks = build_masks(model, graph, kept)
    return ChannelPruning(pruned, kept_by_layer, masks, original, scope, graph, tied, len(candidates))


def _check_runs(model: nn.Module, example_input: torch.Tensor) -> None:
    """A forward with hard-coded channel counts (e.g. x.view(-1, 400)) breaks after pruning: say so."""
    try:
        with eval_mode(model), torch.no_grad():
            model(example_input.clone())
    except Exception as error:
        raise PruningError(
            f"the pruned {type(model).__name__} no longer runs ({str(error).splitlines()[0]}); its forward probably "
            "hard-codes a channel count (e.g. x.view(-1, 400)): use torch.flatten(x, 1)"
        ) from None
