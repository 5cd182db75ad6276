"""Structured channel pruning of any fx-traceable model: analyse, score, select, cut.

Used by the `scratch` backend; nothing here knows about the model zoo or any backend.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

import torch
from torch import nn

from .activation_scores import activation_scores
from .capture import capture, path_change, path_of
from .criteria import DEFAULT_THRESHOLD, METHODS, Method, gamma_magnitude, greedy_redundant, group_score, unit_sum
from .errors import PruningError
from .graph import ChannelGraph, ChannelGroup, analyze, unit_order
from .layer_subclasses import reads_like_its_layer
from .masks import Masks, apply_masks, build_masks
from .modules import eval_mode, has_norm, output_units
from .selection import keep_all_but, keep_in_blocks, removal_count, round_up_kept, select_global, select_per_layer
from .surgery import output_index, shrink

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
    heads: dict[str, int] = field(default_factory=dict)  # pruned attention block -> heads (or head dims) it keeps


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
        is_heads = graph.group(members[0]).heads is not None
        return [] if is_heads else [g for g in (_norm_gamma(modules, graph, m) for m in members) if g is not None]
    return [] if method.source == "data" else unit_weights(modules, graph, members)


def unit_weights(modules: dict[str, nn.Module], graph: ChannelGraph, members: list[str]) -> list[torch.Tensor]:
    """What a weight criterion scores a group's units by, one row per unit: its members' filters, or an attention
    block's q, k, v rows and proj columns per head (or head dim)."""
    if graph.group(members[0]).heads is None:
        return [modules[m].weight for m in members]
    return [_head_weights(modules, graph, members[0])]


def rounds(group: ChannelGroup) -> bool:
    """round_to is about the widths kernels see: whole heads keep a multiple of head_dim already."""
    return group.heads is None or group.heads.mode == "head_dim"


def _head_weights(modules: dict[str, nn.Module], graph: ChannelGraph, qkv: str) -> torch.Tensor:
    """One row per head (or head dim): its q, k and v rows of qkv and its columns of proj, so that every weight
    criterion (L1, L2, FPGM, ...) scores a head by all the weights it owns."""
    block = graph.group(qkv).heads
    rows = modules[qkv].weight.detach()[unit_order(graph.producer_layout[qkv])].reshape(block.units, -1)
    columns = modules[block.proj].weight.detach().t()[unit_order(graph.reads(block.proj))].reshape(block.units, -1)
    return torch.cat([rows, columns], 1)


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
        and (spec.source in ("random", "data") or _group_tensors(spec, modules, graph, group.members))
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
    attention: str = "heads",
) -> ChannelPruning:
    """Prune output channels of every prunable Conv2d / hidden Linear; `model` is left untouched.

    `round_to=N`: every pruned group keeps a multiple of N channels (the count rounded up; a group that would round up
    to its full size stays whole).

    `attention`: what a multi-head attention block prunes (attention.py): whole "heads" (the default: floor(heads x
    ratio) go, one always stays), "head_dim" (the same dims of every head; `round_to` then applies to head_dim), or
    "none". A head's score is its method's score of all its q, k, v rows and proj columns; under global scope each
    block still loses floor(units x ratio), as such a score does not compare with a channel's.

    A caller that prunes one model many times (sensitivity analysis) passes `graph=analyze(model, example_input)` once,
    and `verify=False` (skip the check that the pruned model runs) once the same structure has passed it.
    """
    spec, scope = check_request(model, method, sparsity, scope, methods)
    check_round_to(round_to)
    modules = dict(model.named_modules())
    per_layer = isinstance(sparsity, Mapping)
    graph = analyze(model, example_input, attention) if graph is None else graph
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
    _check_head_rounding(graph, candidates, round_to)

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
                if round_to and rounds(graph.groups[index]):
                    kept[index] = round_up_kept(importance, kept[index], round_to)
        else:
            scores = (
                activation_scores(model, graph, list(candidates), example_input)
                if spec.source == "data"
                else {
                    index: torch.rand(graph.groups[index].size, generator=generator, dtype=torch.float64)
                    if spec.source == "random"
                    else _score(spec, tensors, threshold)
                    for index, (_, tensors) in candidates.items()
                }
            )
            if spec.takes_threshold:  # groups whose every unit scores the same: the threshold did not decide there
                tied = [
                    "+".join(graph.groups[i].members) for i, score in scores.items() if bool((score == score[0]).all())
                ]
            if scope == "global":  # a head's score sums thousands of weights: no match for a channel's, so per block
                heads = {i: s for i, s in scores.items() if graph.groups[i].heads is not None}
                channels = {i: s for i, s in scores.items() if i not in heads}
                kept = select_global(channels, float(sparsity)) if channels else {}
                kept |= select_per_layer(heads, {i: float(sparsity) for i in heads})
            else:
                kept = select_per_layer(scores, {i: r for i, (r, _) in candidates.items()})
            for index in kept:
                if graph.groups[index].divisor > 1:
                    kept[index] = keep_in_blocks(scores[index], kept[index], graph.groups[index].divisor)
                if round_to and rounds(graph.groups[index]):
                    kept[index] = round_up_kept(scores[index], kept[index], round_to, graph.groups[index].divisor)
    kept = {g: k for g, k in kept.items() if len(k) < graph.groups[g].size}

    pruned = shrink(model, graph, kept)
    if verify:
        _check_runs(pruned, example_input)
        _check_heads(model, graph, kept, example_input)
        if graph.captured_path is not None and kept:
            _check_same_path(graph, pruned, example_input)
    kept_by_layer = {p: output_index(graph, p, kept).tolist() for p, g in graph.group_of_producer.items() if g in kept}
    original = {p: output_units(modules[p]) for p in kept_by_layer}
    masks = build_masks(model, graph, kept)
    heads = {graph.groups[g].heads.module: len(k) for g, k in kept.items() if graph.groups[g].heads is not None}
    return ChannelPruning(pruned, kept_by_layer, masks, original, scope, graph, tied, len(candidates), heads)


def _check_head_rounding(graph: ChannelGraph, groups: Iterable[int], round_to: int | None) -> None:
    """A head_dim that no multiple of round_to below it fits would silently stay whole: say so, naming the block."""
    for index in groups:
        block = graph.groups[index].heads
        if round_to and block is not None and block.mode == "head_dim" and round_to >= block.head_dim:
            raise PruningError(
                f"{block.module}: head_dim {block.head_dim} has no multiple of round_to {round_to} below it, so none "
                f"of its dims can go; choose a round_to below {block.head_dim}, or attention='heads'"
            )


def _check_heads(model: nn.Module, graph: ChannelGraph, kept: dict[int, torch.Tensor], x: torch.Tensor) -> None:
    """Pruned heads must compute what the original computes with their q, k and v zeroed: an op between qkv and proj
    that mixes heads (which attention.py cannot see) would make them differ. The blocks at fault are named."""
    heads = {g: k for g, k in kept.items() if graph.groups[g].heads is not None}
    if not heads:
        return
    error = _heads_error(model, graph, heads, x)
    if error <= 1e-4:
        return
    names = {g: graph.groups[g].heads.module for g in heads}
    if len(names) > 1:
        names = {g: n for g, n in names.items() if _heads_error(model, graph, {g: heads[g]}, x) > 1e-4} or names
    shown = list(names.values())[:3]
    more = f" and {len(names) - 3} more" if len(names) > 3 else ""
    raise PruningError(
        f"pruning heads of {', '.join(shown)}{more} changed what the model computes (relative error {error:.2g}): its "
        f"forward mixes heads in a way the analysis does not see; exclude it (exclude={shown!r}) or use "
        "attention='none'"
    )


def _heads_error(model: nn.Module, graph: ChannelGraph, heads: dict[int, torch.Tensor], x: torch.Tensor) -> float:
    """Relative error of the model with only these heads pruned against the original with their q, k, v zeroed."""
    pruned, masked = shrink(model, graph, heads), apply_masks(model, build_masks(model, graph, heads))
    with eval_mode(pruned, masked), torch.no_grad():
        actual, expected = pruned(x.clone()), masked(x.clone())
    # a model with several outputs: their first
    actual, expected = torch.utils._pytree.tree_leaves(actual)[0], torch.utils._pytree.tree_leaves(expected)[0]
    return float((actual - expected).abs().max() / expected.abs().max().clamp_min(1e-12))


def _check_same_path(graph: ChannelGraph, pruned: nn.Module, x: torch.Tensor) -> None:
    """A captured graph holds for the original's widths: the pruned model must take the same path on the example (in
    eval mode, as the analysis captured it)."""
    with eval_mode(pruned):
        change = path_change(graph.captured_path, path_of(capture(pruned, x, reads_like_its_layer)))
    if change:
        raise PruningError(
            f"the pruned {type(pruned).__name__} takes another path through its forward than the original ({change}): "
            "the forward asks a channel count in Python, which pruning changes; exclude the layers it asks about"
        )


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
