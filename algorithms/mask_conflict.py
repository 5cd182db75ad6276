"""Make channel masks physically consistent, as NNI's `fix_mask_conflict` does, with a report of what changed.

Rules: within a dependency set a channel stays if any member keeps it (only the
channels every member prunes are pruned; a member without a mask keeps all); a
set that a grouped conv constrains keeps the same number of channels in each of
its groups (short groups get back their strongest pruned channels, by L1 norm).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from .criteria import group_score, unit_sum
from .dependency import ChannelDependency, GroupDependency
from .errors import PruningError
from .graph import analyze
from .masks import Masks, unit_masks


@dataclass
class SetFix:
    """One dependency set: what the masks asked for and what stays pruned after the fix."""

    layers: list[str]
    channels: int
    asked: dict[str, int]  # layer -> channels its mask pruned
    pruned: int
    groups: int  # equal-count groups imposed by grouped convs (1: none)
    blocked_by: list[str]

    @property
    def changed(self) -> bool:
        return any(count != self.pruned for count in self.asked.values())


@dataclass
class MaskConflictFix:
    masks: Masks
    sets: list[SetFix]


def load_masks(masks_or_path: Masks | str | Path) -> Masks:
    if isinstance(masks_or_path, Mapping):
        return dict(masks_or_path)
    path = Path(masks_or_path)
    if not path.is_file():
        raise PruningError(
            f"no masks file at {path}; pass a file written by torch.save({{layer: {{'weight': mask, ...}}}})"
        )
    try:
        masks = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # torch raises pickle, zip and runtime errors for a file that is not a checkpoint
        # the error's own text may advise unpickling unsafely, which is never the fix here: name its kind only
        raise PruningError(
            f"{path} is not a masks file torch.load can read ({type(error).__name__}: corrupt or foreign)"
        ) from None
    if not isinstance(masks, Mapping) or not all(isinstance(v, Mapping) for v in masks.values()):
        raise PruningError(f"{path} does not hold masks: expected {{layer name: {{'weight': tensor, 'bias': tensor}}}}")
    return dict(masks)


def unit_mask(name: str, module: nn.Module, layer_masks: Mapping[str, torch.Tensor]) -> torch.Tensor:
    """The 0/1 mask over a layer's output units; refuses masks of the wrong shape or not over whole units."""
    if not isinstance(module, (nn.Conv2d, nn.Linear)):
        raise PruningError(
            f"masks name {name!r}, a {type(module).__name__}; channel masks cover Conv2d and Linear layers"
        )
    for key, mask in layer_masks.items():
        target = getattr(module, key, None) if isinstance(key, str) else None
        if not isinstance(target, torch.Tensor) or not isinstance(mask, torch.Tensor):
            raise PruningError(
                f"mask {name}.{key} names no tensor of {type(module).__name__} {name}; masks cover 'weight' and 'bias'"
            )
        if tuple(mask.shape) != tuple(target.shape):
            raise PruningError(
                f"mask {name}.{key} has shape {tuple(mask.shape)} but the layer's {key} is {tuple(target.shape)}"
            )
    if "weight" not in layer_masks:
        raise PruningError(f"masks for {name} lack 'weight'")
    # the fix is worked out on the CPU, whatever device the masks are on
    rows = layer_masks["weight"].detach().flatten(1).cpu() != 0
    kept, partial = rows.any(1), rows.any(1) & ~rows.all(1)
    if bool(partial.any()):
        raise PruningError(
            f"mask {name}.weight zeroes part of unit {int(partial.nonzero()[0])}: not a channel mask; only whole "
            "output units can be fixed"
        )
    return kept


def _equalise(kept: torch.Tensor, groups: int, importance: torch.Tensor) -> torch.Tensor:
    """Give every one of `groups` contiguous blocks as many kept units as the fullest block, restoring the strongest."""
    kept = kept.clone()
    blocks = kept.view(groups, -1)
    target = int(blocks.sum(1).max())
    for index, block in enumerate(blocks):
        missing = target - int(block.sum())
        if missing > 0:
            start = index * blocks.shape[1]
            candidates = (~block).nonzero().flatten()
            strongest = candidates[
                torch.argsort(importance[start + candidates], descending=True, stable=True)[:missing]
            ]
            kept[start + strongest] = True
    return kept


def resolve_mask_conflict(
    masks_or_path: Masks | str | Path, model: nn.Module, dummy_input: torch.Tensor
) -> MaskConflictFix:
    """Fixed masks for every layer the input masks cover, and a per-set account of asked vs pruned channels."""
    masks = load_masks(masks_or_path)
    modules = dict(model.named_modules())
    units: dict[str, torch.Tensor] = {}
    for name, layer_masks in masks.items():
        if name not in modules:
            raise PruningError(
                f"masks name layer {name!r}, which the model does not have; see model.named_modules() for names"
            )
        units[name] = unit_mask(name, modules[name], layer_masks)
    graph = analyze(model, dummy_input, attention="none")  # NNI's masks are over channels, not heads
    dependency, grouping = ChannelDependency(model, dummy_input, graph), GroupDependency(model, dummy_input, graph)
    fixed: Masks = {name: dict(layer_masks) for name, layer_masks in masks.items()}
    report: list[SetFix] = []
    for dependency_set in dependency.sets:
        asked = [layer for layer in dependency_set.layers if layer in units]
        if not asked:
            continue
        kept = torch.zeros(dependency_set.channels, dtype=torch.bool)
        for layer in dependency_set.layers:
            kept |= units[layer] if layer in units else True
        groups = math.lcm(*(grouping.dependency.get(layer, 1) for layer in dependency_set.layers))
        if groups > 1 and not bool(kept.all()):
            weights = [modules[layer].weight for layer in dependency_set.layers]
            kept = _equalise(kept, groups, group_score(unit_sum, weights))
        for layer in asked:
            fixed[layer] = unit_masks(modules[layer], kept.nonzero().flatten())
        pruned = int((~kept).sum())
        report.append(
            SetFix(
                dependency_set.layers,
                dependency_set.channels,
                {layer: int((~units[layer]).sum()) for layer in asked},
                pruned,
                groups,
                dependency_set.blocked_by,
            )
        )
    return MaskConflictFix(fixed, report)


def fix_mask_conflict(masks_or_path: Masks | str | Path, model: nn.Module, dummy_input: torch.Tensor) -> Masks:
    """NNI's entry point: the fixed masks only (see `resolve_mask_conflict` for the report)."""
    return resolve_mask_conflict(masks_or_path, model, dummy_input).masks
