"""Turn per-group scores into kept indices: one ratio per layer, or one threshold over all layers."""

from __future__ import annotations

import math

import torch

EPSILON = 1e-9  # so 0.29 * 100 removes 29, not 28


def removal_count(size: int, ratio: float) -> int:
    """floor(size * ratio), never all units: a layer keeps at least one."""
    return min(math.floor(size * ratio + EPSILON), size - 1)


def keep_all_but(size: int, removed: torch.Tensor | list[int]) -> torch.Tensor:
    mask = torch.ones(size, dtype=torch.bool)
    mask[torch.as_tensor(removed, dtype=torch.long)] = False
    return mask.nonzero().flatten()


def select_per_layer(scores: dict[int, torch.Tensor], ratios: dict[int, float]) -> dict[int, torch.Tensor]:
    """Remove the floor(C * ratio) lowest-scoring units of each group (ties: lower index goes first)."""
    kept = {}
    for group, score in scores.items():
        count = removal_count(len(score), ratios[group])
        order = torch.argsort(score, stable=True)
        kept[group] = keep_all_but(len(score), order[:count])
    return kept


def select_global(scores: dict[int, torch.Tensor], ratio: float) -> dict[int, torch.Tensor]:
    """Pool every group's scores, remove the floor(N * ratio) lowest; a group keeps its best unit."""
    groups = list(scores)
    pooled = torch.cat([scores[g] for g in groups])
    count = math.floor(len(pooled) * ratio + EPSILON)
    removed = torch.zeros(len(pooled), dtype=torch.bool)
    removed[torch.argsort(pooled, stable=True)[:count]] = True
    kept, start = {}, 0
    for group in groups:
        size = len(scores[group])
        gone = removed[start : start + size]
        if bool(gone.all()):
            gone = gone.clone()
            gone[int(torch.argmax(scores[group]))] = False
        kept[group] = (~gone).nonzero().flatten()
        start += size
    return kept


def keep_in_blocks(scores: torch.Tensor, kept: torch.Tensor, blocks: int) -> torch.Tensor:
    """Re-choose `kept` so each of `blocks` equal contiguous blocks keeps the same count (a grouped conv reads or writes
    them).

    As many units go as `kept` removed, rounded down to a multiple of `blocks`; within each block the lowest-scoring
    go (ties: lower index first), and every block keeps at least one.
    """
    size = len(scores)
    per_block = size // blocks
    removed_per_block = min((size - len(kept)) // blocks, per_block - 1)
    if removed_per_block <= 0:
        return torch.arange(size)
    lowest = torch.argsort(scores.view(blocks, per_block), dim=1, stable=True)[:, :removed_per_block]
    mask = torch.ones(blocks, per_block, dtype=torch.bool)
    mask.scatter_(1, lowest, False)
    return mask.flatten().nonzero().flatten()


def round_up_kept(scores: torch.Tensor, kept: torch.Tensor, multiple: int, blocks: int = 1) -> torch.Tensor:
    """Keep a multiple of `multiple` units, rounding the count up (never past the group's size): GPU kernels run
    fastest on channel counts that are multiples of 8 or 16. The best-scoring removed units come back, block by
    block, so a grouped conv's blocks still keep equal counts."""
    size = len(scores)
    per_block = size // blocks
    step = multiple // math.gcd(multiple, blocks)  # blocks x per-block count must be a multiple of `multiple`
    target = min(-(-(len(kept) // blocks) // step) * step, per_block)
    if target >= per_block:
        return torch.arange(size)
    mask = torch.zeros(size, dtype=torch.bool)
    mask[kept] = True
    by_block, block_scores = mask.view(blocks, per_block), scores.view(blocks, per_block)
    for block in range(blocks):
        removed = (~by_block[block]).nonzero().flatten()
        returning = removed[
            torch.argsort(block_scores[block][removed], descending=True, stable=True)[
                : target - int(by_block[block].sum())
            ]
        ]
        by_block[block, returning] = True
    return mask.nonzero().flatten()
