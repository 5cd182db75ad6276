"""Sensitivity analysis as NNI 2.x offered it, measured on the physically pruned model.

One unit at a time (a layer, or a set of layers whose channels are coupled, named
`a+b+c`), each sparsity pruned from the original weights, the user's `val_func`
scores the result. `mode="masked"` is NNI's way (conv weights and bias masked,
BatchNorm untouched, so beta still feeds the "pruned" channels) for comparison.
Values computed before the unit's first layer are reused across its sparsities
(`UpstreamCache`): the same numbers as re-running the whole model, fewer FLOPs.
"""

from __future__ import annotations

import csv
import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.fx
from torch import nn
from tqdm import tqdm

from .channel_pruning import check_request, prune_channels
from .criteria import DEFAULT_THRESHOLD, METHODS, NNI_NAMED, Method
from .csv_files import write_rows
from .errors import PruningError
from .graph import ChannelGraph, analyze
from .masks import apply_masks
from .modules import clone_tree, eval_mode
from .tracing import trace
from .upstream import FrontierRecorder, GraphSplit, UpstreamCache, split_graph, uninstall

PRUNE_TYPES: dict[str, Method] = {**METHODS, **NNI_NAMED}
EARLY_STOP_MODES = ("minimize", "maximize", "dropped", "raised")
MODES = ("pruned", "masked")
DEFAULT_SPARSITIES = tuple(round(0.1 * i, 1) for i in range(1, 10))
UNIT_JOINER = "+"

Sensitivity = dict[str, dict[float, float]]


def check_sparsities(sparsities: Iterable[float]) -> list[float]:
    values = list(sparsities)
    if not values:
        raise PruningError("sparsities is empty; give fractions in (0, 1) such as 0.1 0.2 ... 0.9")
    for value in values:
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 < float(value) < 1.0:
            raise PruningError(f"sparsity {value!r} is outside (0, 1); give fractions of channels removed, such as 0.5")
    return sorted({float(v) for v in values})


def check_early_stop(mode: str | None, value: float | None) -> None:
    if mode is not None and mode not in EARLY_STOP_MODES:
        raise PruningError(f"unknown early_stop_mode {mode!r}; choose one of: {', '.join(EARLY_STOP_MODES)}")
    if mode is not None and value is None:
        raise PruningError(f"early_stop_mode {mode!r} needs early_stop_value (the metric threshold)")
    if value is not None and (
        isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value)
    ):
        raise PruningError(f"early_stop_value must be a finite number, got {value!r}")


def should_stop(mode: str | None, value: float | None, original: float, metric: float) -> bool:
    """NNI's rule: minimize stops below value, maximize above, dropped below original - value, raised above original +
    value."""
    if mode is None or value is None:
        return False
    return {
        "minimize": metric < value,
        "maximize": metric > value,
        "dropped": metric < original - value,
        "raised": metric > original + value,
    }[mode]


def _substitute(value: Any, original: nn.Module, replacement: nn.Module) -> Any:
    """`value` with every occurrence of `original` (in lists, tuples, dicts) replaced; NNI's val_func saw the pruned
    model there."""
    if value is original:
        return replacement
    if isinstance(value, tuple) and hasattr(value, "_fields"):  # a namedtuple takes its fields as arguments
        return type(value)(*(_substitute(v, original, replacement) for v in value))
    if isinstance(value, (list, tuple)):
        return type(value)(_substitute(v, original, replacement) for v in value)
    if isinstance(value, dict):
        return {k: _substitute(v, original, replacement) for k, v in value.items()}
    return value


def _contains(value: Any, target: nn.Module) -> bool:
    if value is target:
        return True
    if isinstance(value, (list, tuple)):
        return any(_contains(v, target) for v in value)
    if isinstance(value, dict):
        return any(_contains(v, target) for v in value.values())
    return False


class SensitivityAnalysis:
    """`analysis()` -> {unit: {sparsity: metric}}; `export(csv)`; `ori_metric` is the unpruned model's metric.

    The model is never modified: every evaluation gets a pruned (or masked) copy in the model's place in val_args /
    val_kwargs. `example_input` (for tracing) defaults to the first batch val_func feeds the model.
    """

    def __init__(
        self,
        model: nn.Module,
        val_func: Callable[..., Any],
        sparsities: Sequence[float] | None = None,
        prune_type: str = "conv_all",
        early_stop_mode: str | None = None,
        early_stop_value: float | None = None,
        *,
        mode: str = "pruned",
        example_input: torch.Tensor | None = None,
        reuse_upstream: bool = True,
        threshold: float = DEFAULT_THRESHOLD,
        seed: int = 0,
        cache_limit_bytes: int = 2 << 30,
        progress: bool | None = None,
    ) -> None:
        check_request(model, prune_type, 0.5, "layer", PRUNE_TYPES)
        check_early_stop(early_stop_mode, early_stop_value)
        if mode not in MODES:
            raise PruningError(
                f"unknown mode {mode!r}; choose 'pruned' (physically smaller model) or 'masked' (NNI's weight masks)"
            )
        self.model, self.val_func, self.prune_type, self.mode = model, val_func, prune_type, mode
        self.sparsities = check_sparsities(DEFAULT_SPARSITIES if sparsities is None else sparsities)
        self.early_stop_mode, self.early_stop_value = early_stop_mode, early_stop_value
        self.example_input, self.reuse_upstream, self.threshold, self.seed = (
            example_input,
            reuse_upstream,
            threshold,
            seed,
        )
        self.cache_limit_bytes, self.progress = cache_limit_bytes, progress
        self.sensitivities: Sensitivity = {}
        self.units: dict[str, list[str]] = {}  # unit name -> its layers
        self.skipped: dict[str, str] = {}  # unit name -> why it cannot be pruned
        self.ori_metric: float | None = None
        # forward calls whose downstream part ran on cached upstream values (a fallback to the plain forward is not one)
        self.cache_hits = 0

    # -- what to analyse ------------------------------------------------------------------------
    def _find_units(self, graph: ChannelGraph, specified: Sequence[str] | None) -> dict[str, list[str]]:
        units, wanted = {}, None
        for group in graph.groups:
            name = UNIT_JOINER.join(group.members)
            if group.size <= 1:
                continue
            if not group.prunable:
                self.skipped[name] = group.blocked_by[0]
                continue
            units[name] = list(group.members)
        if specified is not None:
            wanted = {}
            for layer in specified:
                unit = next((n for n, members in units.items() if layer == n or layer in members), None)
                if unit is None:
                    blocked = next(
                        (reason for n, reason in self.skipped.items() if layer == n or layer in n.split(UNIT_JOINER)),
                        None,
                    )
                    why = (
                        f"it cannot be pruned: {blocked}"
                        if blocked
                        else "it is not a prunable Conv2d / hidden Linear of the model"
                    )
                    raise PruningError(
                        f"specified layer {layer!r} cannot be analysed: {why}; choose from {', '.join(units) or 'none'}"
                    )
                wanted[unit] = units[unit]
        return units if wanted is None else wanted

    # -- one evaluation -------------------------------------------------------------------------
    def _evaluate(self, candidate: nn.Module, args: list[Any], kwargs: dict[str, Any]) -> float:
        result = self.val_func(*_substitute(args, self.model, candidate), **_substitute(kwargs, self.model, candidate))
        try:
            return float(result)
        except (TypeError, ValueError):
            raise PruningError(
                f"val_func returned {type(result).__name__}, not a number; it must return the metric (e.g. top-1 "
                "accuracy)"
            ) from None

    def _variant(self, layers: list[str], sparsity: float, graph: ChannelGraph, example: torch.Tensor) -> nn.Module:
        result = prune_channels(
            self.model,
            self.prune_type,
            {layers[0]: sparsity},
            example,
            scope="layer",
            threshold=self.threshold,
            seed=self.seed,
            methods=PRUNE_TYPES,
            graph=graph,
            verify=sparsity == self.sparsities[0],
        )
        return result.model if self.mode == "pruned" else apply_masks(self.model, result.masks)

    def _changed_modules(self, layers: list[str], graph: ChannelGraph) -> set[str]:
        """Modules whose tensors differ from the original in a variant of this unit: the layers, and (pruned) every
        reader of their channels."""
        if self.mode == "masked":
            return set(layers)
        group = graph.group_of_producer[layers[0]]
        readers = {
            c.module for c in graph.consumers if any(graph.group_of_space.get(s.space) == group for s in c.layout)
        }
        return set(layers) | readers

    def _baseline(
        self, args: list[Any], kwargs: dict[str, Any], recorder: FrontierRecorder | None = None
    ) -> torch.Tensor:
        """Evaluate the unpruned model (a copy) and return the example input for tracing: the caller's, or val_func's
        first batch."""
        copy = clone_tree(self.model, {})
        if recorder is not None:
            recorder.install(copy)
        seen: list[torch.Tensor] = []

        def first_batch(_module: nn.Module, inputs: tuple[object, ...]) -> None:
            if not seen and inputs and isinstance(inputs[0], torch.Tensor):
                seen.append(inputs[0][:1].detach().clone())

        hook = copy.register_forward_pre_hook(first_batch)
        try:
            self.ori_metric = self._evaluate(copy, args, kwargs)
        finally:
            hook.remove()
            uninstall(copy)
        if self.example_input is not None:
            return self.example_input
        if not seen or not isinstance(seen[0], torch.Tensor):
            raise PruningError(
                "val_func never called the model with a tensor; pass example_input= so the model can be traced"
            )
        return seen[0]

    def _plan(
        self, example: torch.Tensor, specified: Sequence[str] | None
    ) -> tuple[ChannelGraph, dict[str, GraphSplit], torch.fx.GraphModule | None]:
        graph = analyze(self.model, example)
        self.units = self._find_units(graph, specified)
        with eval_mode(self.model):  # fx bakes `self.training` into the graph: trace the mode reuse runs in
            traced = _traced_or_none(self.model) if self.reuse_upstream else None
        splits = (
            {name: split_graph(traced, self._changed_modules(layers, graph)) for name, layers in self.units.items()}
            if traced is not None
            else {}
        )
        # the rest run whole
        return (graph, {name: split for name, split in splits.items() if split.reusable and split.skips_work}, traced)

    def analysis(
        self,
        val_args: Sequence[Any] | None = None,
        val_kwargs: Mapping[str, Any] | None = None,
        specified_layers: Sequence[str] | None = None,
    ) -> Sensitivity:
        """Scan every unit (or those holding `specified_layers`) over the sparsities; returns `self.sensitivities`."""
        args, kwargs = list(val_args or []), dict(val_kwargs or {})
        if not _contains((args, kwargs), self.model):
            raise PruningError(
                "val_func must receive the model through val_args or val_kwargs (e.g. analysis(val_args=[model])): "
                "each evaluation gets a pruned copy in its place. NNI pruned in place, so a val_func that closes over "
                "the model worked there; here it would score the unpruned model."
            )
        specified = list(specified_layers) if specified_layers is not None else None
        # plan first, so the baseline evaluation also records every unit's upstream values
        if self.example_input is not None:
            graph, splits, traced = self._plan(self.example_input, specified)
            wanted = {
                name for split in splits.values() if split.reusable and split.shareable for name in split.frontier
            }
            recorder = (
                FrontierRecorder(traced, wanted, self.cache_limit_bytes) if traced is not None and wanted else None
            )
            example = self._baseline(args, kwargs, recorder)
        else:
            example, recorder = self._baseline(args, kwargs), None
            graph, splits, _ = self._plan(example, specified)
        bar = tqdm(
            total=len(self.units) * len(self.sparsities),
            desc="sensitivity",
            disable=None if self.progress is None else not self.progress,
        )
        with bar:
            for name, layers in self.units.items():
                cache = UpstreamCache(splits[name], self.cache_limit_bytes) if name in splits else None
                if cache is not None and recorder is not None:
                    cache.seed(recorder)
                self.sensitivities[name] = {}
                for sparsity in self.sparsities:
                    bar.set_postfix_str(f"{name[:40]} @ {sparsity:g}", refresh=False)
                    variant = self._variant(layers, sparsity, graph, example)
                    if cache is not None:
                        cache.new_run()
                        cache.install(variant)
                    try:
                        metric = self._evaluate(variant, args, kwargs)
                    finally:
                        uninstall(variant)
                    self.sensitivities[name][sparsity] = metric
                    bar.update()
                    if should_stop(self.early_stop_mode, self.early_stop_value, self.ori_metric, metric):
                        bar.update(len(self.sparsities) - len(self.sensitivities[name]))
                        break
                self.cache_hits += cache.hits if cache is not None else 0
        return self.sensitivities

    def export(self, filepath: str | Path) -> Path:
        return export_sensitivity(self.sensitivities, filepath, self.sparsities)


def export_sensitivity(
    sensitivity: Mapping[str, Mapping[float, float]], filepath: str | Path, sparsities: Sequence[float] | None = None
) -> Path:
    """NNI's CSV: `layername,<sparsities...>`, one row per unit; a row stops where early stop cut it.

    The header holds `sparsities` (default: every sparsity measured); each row must be a prefix of it.
    """
    header = sorted(
        {float(s) for row in sensitivity.values() for s in row}
        if sparsities is None
        else {float(s) for s in sparsities}
    )
    if not header:
        raise PruningError("nothing to export: the sensitivity holds no measured point")
    rows = [["layername", *(repr(s) for s in header)]]
    for name, values in sensitivity.items():
        measured = sorted(float(s) for s in values)
        if measured != header[: len(measured)]:
            raise PruningError(
                f"row {name!r} measured {measured}, not a prefix of the sparsities {header}; NNI's CSV cannot hold it"
            )
        rows.append([name, *(repr(float(values[s])) for s in measured)])
    return write_rows(filepath, rows)


def load_sensitivity(filepath: str | Path) -> Sensitivity:
    """Read a CSV written by `export` (or by NNI 2.x) back into {unit: {sparsity: metric}}."""
    path = Path(filepath)
    if not path.is_file():
        raise PruningError(f"no sensitivity CSV at {path}")
    try:
        with open(path, newline="") as handle:
            rows = [row for row in csv.reader(handle) if row]
    except (OSError, UnicodeDecodeError, csv.Error) as error:
        raise PruningError(f"{path} is not a readable CSV ({error})") from None
    if not rows or rows[0][0].strip() != "layername" or len(rows[0]) < 2:
        raise PruningError(f"{path} is not a sensitivity CSV: its header must be 'layername,<sparsity>,<sparsity>,...'")
    try:
        sparsities = check_sparsities([float(s) for s in rows[0][1:]])
        if sparsities != [float(s) for s in rows[0][1:]]:
            raise ValueError("sparsities must be increasing")
        result: Sensitivity = {}
        for number, row in enumerate(rows[1:], start=2):
            if len(row) > len(rows[0]) or len(row) < 2:
                raise ValueError(f"line {number} has {len(row) - 1} values for {len(sparsities)} sparsities")
            result[row[0]] = {s: float(v) for s, v in zip(sparsities, row[1:], strict=False)}
    except ValueError as error:
        raise PruningError(f"{path} is not a sensitivity CSV: {error}") from None
    return result


def get_ratios_by_loss(
    sensitivity: Mapping[str, Mapping[float, float]] | SensitivityAnalysis,
    max_loss: float,
    *,
    baseline: float | None = None,
) -> dict[str, float]:
    """Per layer, the largest sparsity up to which the loss (baseline - metric) stays within `max_loss`, interpolated
    linearly between the last point within budget and the first one over it (a later point back within budget does not
    count: the curve is read from 0 upwards). Sparsity 0 counts as a measured point with loss 0. Units named `a+b` give
    each of their layers the unit's ratio, so the result goes straight into `prune(model, method, ratios, ...)`.
    """
    if isinstance(sensitivity, SensitivityAnalysis):
        baseline, sensitivity = sensitivity.ori_metric if baseline is None else baseline, sensitivity.sensitivities
    if baseline is None:
        raise PruningError(
            "get_ratios_by_loss needs the unpruned model's metric: pass baseline= (SensitivityAnalysis.ori_metric)"
        )
    if (
        isinstance(max_loss, bool)
        or not isinstance(max_loss, (int, float))
        or not math.isfinite(max_loss)
        or max_loss < 0
    ):
        raise PruningError(f"max_loss must be a non-negative number (an allowed drop of the metric), got {max_loss!r}")
    if isinstance(baseline, bool) or not isinstance(baseline, (int, float)) or not math.isfinite(baseline):
        raise PruningError(f"baseline must be a finite number (the unpruned model's metric), got {baseline!r}")
    ratios: dict[str, float] = {}
    for unit, values in sensitivity.items():
        points = [(0.0, 0.0), *((float(s), baseline - float(m)) for s, m in sorted(values.items()))]
        over = next((i for i, (_, loss) in enumerate(points) if loss > max_loss), None)
        if over is None:
            ratio = points[-1][0]  # within budget at every measured point: the last one, no extrapolation
        else:
            (r0, l0), (r1, l1) = points[over - 1], points[over]
            ratio = r0 + (max_loss - l0) * (r1 - r0) / (l1 - l0)
        for layer in unit.split(UNIT_JOINER):
            ratios[layer] = round(ratio, 6)
    return ratios


def _traced_or_none(model: nn.Module) -> torch.fx.GraphModule | None:
    """The symbolic graph reuse runs on, or None (every model then runs whole): a graph captured on the example input
    would fix its shapes, and a last, smaller batch would not fit them."""
    try:
        return trace(model)
    except PruningError:
        return None
