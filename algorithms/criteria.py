"""The OneFlow ChannelSlimming importance operators, per output unit (conv filter or Linear row).

Where the original had a bug we implement its documented intent:
`conv_threshold` counts weights *above* the threshold (the original counted
below), `conv_similarity`/`bn_similarity` index the filters they compare
correctly, and `bn` ranks |gamma| as network slimming does (the original
ranked signed gamma, which prunes large negative scales first).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

DEFAULT_THRESHOLD = 0.06


def _units(weight: torch.Tensor) -> torch.Tensor:
    return weight.detach().flatten(1).abs()


def unit_sum(weight: torch.Tensor) -> torch.Tensor:
    """L1 norm per unit (float32 accumulation, as NNI's L1 pruner: same ranking, half the time)."""
    return torch.linalg.vector_norm(weight.detach().flatten(1), ord=1, dim=1).double()


def unit_l2(weight: torch.Tensor) -> torch.Tensor:
    return torch.linalg.vector_norm(weight.detach().flatten(1).double(), ord=2, dim=1)


def geometric_median_distance(weight: torch.Tensor) -> torch.Tensor:
    """FPGM (He et al. 2019): a unit's summed Euclidean distance to every other; the lowest sit nearest the geometric
    median, so are replaceable."""
    units = weight.detach().flatten(1).double()
    return torch.cdist(units, units).sum(1)


def unit_mean(weight: torch.Tensor) -> torch.Tensor:
    return unit_sum(weight) / weight[0].numel()


def unit_max(weight: torch.Tensor) -> torch.Tensor:
    return _units(weight).amax(1).double()


def unit_threshold_count(weight: torch.Tensor, threshold: float = DEFAULT_THRESHOLD) -> torch.Tensor:
    return (_units(weight) > threshold).sum(1).double()


def gamma_magnitude(gamma: torch.Tensor) -> torch.Tensor:
    return gamma.detach().abs().double()


def filter_distances(weight: torch.Tensor) -> torch.Tensor:
    """sum((|a_i| - |a_j|)^2) for every pair of units."""
    units = _units(weight).double()
    return torch.cdist(units, units).pow(2)


def gamma_distances(gamma: torch.Tensor) -> torch.Tensor:
    values = gamma_magnitude(gamma)
    return (values[:, None] - values[None, :]).pow(2)


def group_score(score: Callable[[torch.Tensor], torch.Tensor], tensors: list[torch.Tensor]) -> torch.Tensor:
    """A coupled group's per-channel score: the mean of its members' (coupled channel for channel), on the CPU, where
    the channel selection runs whatever device the model is on (one number per channel)."""
    return torch.stack([score(t) for t in tensors]).mean(0).cpu()


def greedy_redundant(distances: torch.Tensor, importance: torch.Tensor, count: int) -> list[int]:
    """Remove `count` units one at a time: take the closest remaining pair, drop its less important member.

    Ties in importance drop the higher index, so the result is deterministic. Each
    row's nearest neighbour is cached and refreshed only when it was the one dropped,
    so a 4096-unit layer takes milliseconds, not a full matrix scan per removal.
    """
    size = distances.shape[0]
    dist = distances.clone().double()
    dist.fill_diagonal_(float("inf"))
    nearest, neighbour = dist.min(1)
    removed: list[int] = []
    for _ in range(min(count, size - 1)):
        i = int(torch.argmin(nearest))
        j = int(neighbour[i])
        drop = j if (float(importance[j]), -j) < (float(importance[i]), -i) else i
        removed.append(drop)
        dist[drop, :] = float("inf")
        dist[:, drop] = float("inf")
        nearest[drop] = float("inf")
        stale = (neighbour == drop).nonzero().flatten()
        stale = stale[stale != drop]
        if len(stale):
            nearest[stale], neighbour[stale] = dist[stale].min(1)
    return sorted(removed)


@dataclass(frozen=True)
class Method:
    """How a method scores units: from weights, from BN gammas, at random, or by greedy similarity."""

    source: str  # "weight" | "norm" | "random" | "data" (a forward pass on the example input)
    default_scope: str  # the original platform's scope
    score: Callable[..., torch.Tensor] | None = None
    greedy: bool = False
    takes_threshold: bool = False


METHODS: dict[str, Method] = {
    "bn": Method("norm", "global", gamma_magnitude),
    "conv_avg": Method("weight", "global", unit_mean),
    "conv_all": Method("weight", "global", unit_sum),
    "conv_max": Method("weight", "global", unit_max),
    "neuron": Method("weight", "global", unit_mean),
    "random": Method("random", "layer"),
    "conv_threshold": Method("weight", "layer", unit_threshold_count, takes_threshold=True),
    "conv_similarity": Method("weight", "layer", filter_distances, greedy=True),
    "bn_similarity": Method("norm", "layer", gamma_distances, greedy=True),
}

# NNI's names for the same kind of per-layer ranking, for users coming from NNI's SensitivityAnalysis.
NNI_NAMED: dict[str, Method] = {
    "l1": Method("weight", "layer", unit_sum),
    "l2": Method("weight", "layer", unit_l2),
    "fpgm": Method("weight", "layer", geometric_median_distance),
}

# The scratch backend's own: L2 beside the operators' L1, and a data-driven ranking (activation_scores.py), which no
# weight-only operator of the original offers.
SCRATCH_METHODS: dict[str, Method] = {**METHODS, "l2": NNI_NAMED["l2"], "activation": Method("data", "layer")}
