"""Prune to a budget: the same MACs, parameters or latency after pruning, on any backend, with any method.

`prune_to_budget(backend, model, method, "macs=2x", example_input, allocation="uniform")` decides how many channels
every prunable group keeps (algorithms.allocation) so that the cost lands on the target, hands the backend those counts
as per-layer ratios (its criterion still decides which channels go), and checks the pruned model's real cost: the
result meets the target (cost <= base / target) and lands within `tolerance` (2%) of it, or it is the closest point the
allocation reaches under the target, with the reason it could not get closer. A method that trains while pruning
(NNI's slim, taylor, agp, linear) keeps these semantics: the counts per layer are fixed by the allocation, the training
decides only which channels they are.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from algorithms import allocation as strategies
from algorithms.channel_pruning import rounds, unit_weights
from algorithms.cost import CostModel, Plan
from algorithms.criteria import group_score, unit_l2
from algorithms.errors import PruningError
from algorithms.graph import ChannelGraph, analyze
from algorithms.latency_table import LatencyTable
from algorithms.modules import eval_mode
from algorithms.surgery import shrink

from . import get_backend
from .base import NO_JOB, Backend, JobContext, PruneResult

COSTS = ("macs", "params", "latency_b64", "latency_b1")
ALLOCATIONS = ("uniform", "global", "sensitivity", "latency")
SUFFIXES = {"": 1.0, "k": 1e3, "m": 1e6, "g": 1e9, "ms": 1e-3, "s": 1.0}
TOLERANCE = 0.02
CORRECTIONS = 3  # re-allocations when the backend's pruned model lands off the plan's cost

Sensitivity = dict[str, dict[float, float]]  # unit ("a+b", coupled layers) -> sparsity -> metric (a scan)


@dataclass(frozen=True)
class Target:
    """A budget: `cost` at most base / value (relative, "2x") or at most value (absolute, "120M", "30ms")."""

    cost: str
    value: float
    relative: bool

    def goal(self, base: float) -> float:
        return base / self.value if self.relative else self.value

    @property
    def batch(self) -> int | None:
        """The batch a latency target is timed at."""
        return int(self.cost.removeprefix("latency_b")) if self.cost.startswith("latency_b") else None

    def __str__(self) -> str:
        """The form parse_target reads back: macs=2x, macs=120M, latency_b64=30ms."""
        if self.relative:
            return f"{self.cost}={self.value:.12g}x"
        if self.batch is not None:
            return f"{self.cost}={self.value * 1e3:.12g}ms"
        unit = next((u for u in ("g", "m", "k") if self.value >= SUFFIXES[u]), "")
        return f"{self.cost}={self.value / SUFFIXES[unit]:.12g}{unit.upper()}"


def parse_target(text: str) -> Target:
    """ "macs=2x", "params=4x", "latency_b64=2x", "latency_b1=1.5x" (base / pruned), or an absolute ceiling:
    "macs=120M", "params=1.5m", "latency_b64=30ms". Raises PruningError in one line on anything else."""
    name, equals, value = str(text).strip().partition("=")
    name = name.strip().lower()
    if not equals or name not in COSTS:
        raise PruningError(
            f"target {text!r} must be COST=VALUE with COST one of {', '.join(COSTS)}, e.g. macs=2x or params=1.5M"
        )
    match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+(?:e[+-]?\d+)?)\s*(x|k|m|g|ms|s)?\s*", value.lower())
    if not match:
        raise PruningError(f"target {text!r}: {value!r} is not a number, a ratio such as 2x, or a size such as 120M")
    number, unit = float(match.group(1)), match.group(2) or ""
    if unit == "x":
        if not (math.isfinite(number) and number > 1):
            raise PruningError(
                f"target {text!r}: a ratio is base / pruned, so it must be above 1x (2x halves the cost)"
            )
        return Target(name, number, True)
    if unit in ("ms", "s") and not name.startswith("latency"):
        raise PruningError(
            f"target {text!r}: {unit} is a time; {name} takes a count such as 120M or a ratio such as 2x"
        )
    if name.startswith("latency") and unit not in ("ms", "s"):
        raise PruningError(f"target {text!r}: an absolute latency needs its unit, e.g. {name}=30ms (or a ratio: 2x)")
    if not (math.isfinite(number) and number > 0):
        raise PruningError(f"target {text!r}: the cost must be positive")
    return Target(name, number * SUFFIXES[unit], False)


@dataclass
class Budget:
    """Everything a search needs about one model: its graph, groups, cost model and, for latency, how to time it."""

    model: nn.Module
    example_input: torch.Tensor
    graph: ChannelGraph
    groups: strategies.Groups
    members: dict[int, list[str]]  # group -> the layers the backend takes a ratio for
    costs: CostModel
    latency_of: Callable[[nn.Module], float] | None = None  # seconds per batch of a (pruned) model, as deployed

    def cost(self, target: Target) -> Callable[[Plan], float]:
        """The target's cost of a plan: counted from the plan (MACs, params) or timed on a model of its widths."""
        if target.cost in ("macs", "params"):
            return lambda plan: self.costs.costs(plan)[target.cost]
        if self.latency_of is None:
            raise PruningError(f"a {target.cost} target needs a way to time the model (latency_of)")
        timed: dict[tuple[tuple[int, int], ...], float] = {}

        def latency(plan: Plan) -> float:
            key = tuple(sorted(plan.items()))
            if key not in timed:
                kept = {g: torch.arange(k) for g, k in plan.items() if k < self.groups.sizes[g]}
                timed[key] = self.latency_of(shrink(self.model, self.graph, kept))
            return timed[key]

        return latency


def plan_budget(
    backend: Backend,
    model: nn.Module,
    method: str,
    example_input: torch.Tensor,
    *,
    exclude: Iterable[str] = (),
    round_to: int | None = None,
    latency_of: Callable[[nn.Module], float] | None = None,
    attention: str = "heads",
) -> Budget:
    """The groups `backend` can prune with `method`, their steps (grouped-conv blocks, round_to; not whole heads, which
    keep a multiple of head_dim anyway), and the cost model."""
    example_input = example_input.clone()
    graph = analyze(model, example_input, attention)
    layers = set(backend.prunable_layers(model, method, example_input, exclude))
    members: dict[int, list[str]] = {}
    for producer, group in graph.group_of_producer.items():
        if producer in layers and graph.groups[group].size > 1 and graph.groups[group].prunable:
            members.setdefault(group, []).append(producer)
    steps = {
        g: math.lcm(graph.groups[g].divisor, round_to if rounds(graph.groups[g]) and round_to else 1) for g in members
    }
    groups = strategies.Groups({g: graph.groups[g].size for g in members}, steps)
    return Budget(model, example_input, graph, groups, members, CostModel.of(model, example_input, graph), latency_of)


def allocate(
    budget: Budget,
    target: Target,
    goal: float,
    allocation: str,
    *,
    sensitivity: tuple[Sensitivity, float] | None = None,
    latency_table: LatencyTable | None = None,
    tolerance: float = TOLERANCE,
) -> strategies.Allocation:
    """The plan of `allocation` whose cost is the largest within `goal`; where the cost is counted, not timed (MACs,
    parameters), and the plan stops short of the goal by more than half the tolerance, channels are then given back
    as far as the goal allows (uniform keeps its one ratio)."""
    cost, scale = budget.cost(target), 1.0
    if target.batch is not None and allocation in ("sensitivity", "latency"):
        # a greedy takes hundreds of steps, too many to time each: it searches on the table's prediction, scaled to
        # the measured base, and the measured pruned model then corrects the aim (prune_to_budget)
        if latency_table is None:
            raise PruningError(f"the {allocation} allocation of a {target.cost} target needs a latency table")
        measured_base = cost({})
        cost = lambda plan: latency_table.predict(plan, budget.costs)  # noqa: E731
        scale = cost({}) / measured_base
    found = _search(budget, allocation, cost, goal * scale, sensitivity, latency_table)
    found = strategies.Allocation(found.plan, found.cost / scale, found.evaluations)
    if allocation == "uniform" or target.cost not in ("macs", "params") or found.cost >= goal * (1 - tolerance / 2):
        return found
    filled = strategies.give_back(budget.groups, found.plan, unit_norms(budget), budget.cost(target), goal)
    return strategies.Allocation(filled.plan, filled.cost, found.evaluations + filled.evaluations)


def _search(
    budget: Budget,
    allocation: str,
    cost: strategies.Cost,
    goal: float,
    sensitivity: tuple[Sensitivity, float] | None,
    latency_table: LatencyTable | None,
) -> strategies.Allocation:
    if allocation == "uniform":
        return strategies.uniform(budget.groups, cost, goal)
    if allocation == "global":
        return strategies.global_threshold(budget.groups, unit_norms(budget), cost, goal)
    if allocation == "sensitivity":
        if sensitivity is None:
            raise PruningError("the sensitivity allocation needs a sensitivity scan (sensitivity=(scan, baseline))")
        scan, baseline = sensitivity
        by_group = {}
        for unit, values in scan.items():
            group = budget.graph.group_of_producer.get(unit.split("+")[0])
            if group in budget.members:
                by_group[group] = values
        return strategies.sensitivity_greedy(budget.groups, by_group, baseline, cost, goal)
    if allocation == "latency":
        if latency_table is None:
            raise PruningError("the latency allocation needs a latency table (algorithms.latency_table)")
        predicted = lambda plan: latency_table.predict(plan, budget.costs)  # noqa: E731
        return strategies.importance_greedy(budget.groups, unit_norms(budget), cost, goal, rate_cost=predicted)
    raise PruningError(f"unknown allocation {allocation!r}; choose one of: {', '.join(ALLOCATIONS)}")


def unit_norms(budget: Budget) -> dict[int, torch.Tensor]:
    """Each group's per-channel L2 norm of its members' filters (the mean over coupled members): what the global and
    latency allocations rank units by, whatever criterion the backend then uses."""
    modules = dict(budget.model.named_modules())
    return {
        g: group_score(unit_l2, unit_weights(modules, budget.graph, members)) for g, members in budget.members.items()
    }


def measured_cost(
    model: nn.Module, example_input: torch.Tensor, cost: str, latency_of: Callable[[nn.Module], float] | None = None
) -> float:
    """The real `cost` of a (pruned) model: counted on it (torch's FlopCounterMode, the parameters), or timed."""
    if cost == "macs":
        with eval_mode(model), torch.no_grad(), FlopCounterMode(display=False) as counter:
            model(example_input[:1])
        return float(counter.get_total_flops() // 2)
    if cost == "params":
        return float(sum(p.numel() for p in model.parameters()))
    if latency_of is None:
        raise PruningError(f"a {cost} target needs a way to time the model (latency_of)")
    return latency_of(model)


def prune_to_budget(
    backend: Backend | str,
    model: nn.Module,
    method: str,
    target: Target | str,
    example_input: torch.Tensor,
    *,
    allocation: str = "uniform",
    exclude: Iterable[str] = (),
    seed: int = 0,
    context: JobContext = NO_JOB,
    latency_of: Callable[[nn.Module], float] | None = None,
    sensitivity: tuple[Sensitivity, float] | None = None,
    latency_table: LatencyTable | None = None,
    tolerance: float = TOLERANCE,
) -> PruneResult:
    """Prune `model` with `backend`'s `method` to `target` (see the module docstring); `model` is left untouched.

    `latency_of(model) -> seconds` times a model for a latency target; `sensitivity=(scan, baseline)` feeds the
    sensitivity allocation, `latency_table` the latency one. The result's `info["budget"]` records the target, the
    base and achieved cost and their ratio, the allocation, the per-layer ratios found, and why it is not within
    `tolerance` of the target where it is not.
    """
    backend = get_backend(backend) if isinstance(backend, str) else backend
    target = parse_target(target) if isinstance(target, str) else target
    if allocation not in ALLOCATIONS:
        raise PruningError(f"unknown allocation {allocation!r}; choose one of: {', '.join(ALLOCATIONS)}")
    if not backend.physical(method):
        raise PruningError(f"{method} prunes single weights, not channels: a budget needs a method that shrinks layers")
    budget = plan_budget(
        backend,
        model,
        method,
        example_input,
        exclude=exclude,
        round_to=context.round_to,
        latency_of=latency_of,
        attention=context.attention,
    )
    base, goal = check_reachable(budget, target, f"{backend.name}:{method}")
    options = backend.options(context)
    best: tuple[PruneResult, float, strategies.Allocation] | None = None
    aim, evaluations, attempts = goal, 0, 0
    for _ in range(1 + CORRECTIONS):
        planned = allocate(
            budget, target, aim, allocation, sensitivity=sensitivity, latency_table=latency_table, tolerance=tolerance
        )
        evaluations, attempts = evaluations + planned.evaluations, attempts + 1
        ratios = {
            layer: backend.kept_ratio(budget.groups.sizes[g], kept)
            for g, kept in planned.plan.items()
            if kept < budget.groups.sizes[g]
            for layer in budget.members[g]
        }
        result = backend.prune(
            model, method, ratios, example_input, scope="layer", exclude=exclude, seed=seed, **options
        )
        achieved = measured_cost(result.model, example_input, target.cost, budget.latency_of)
        if best is None or _closer(achieved, best[1], goal):
            best = (result, achieved, planned)
        if goal * (1 - tolerance) <= achieved <= goal or math.isclose(achieved, planned.cost, rel_tol=1e-9):
            break  # on target, or exactly where the allocation planned: aiming elsewhere cannot get closer
        aim = aim * goal / achieved  # the backend landed off the plan (its own rounding): aim as far the other way
    result, achieved, planned = best
    result.info["budget"] = {
        "target": str(target),
        "cost": target.cost,
        "base": base,
        "goal": goal,
        "achieved": achieved,
        "achieved_ratio": round(base / achieved, 4),
        "within_tolerance": goal * (1 - tolerance) <= achieved <= goal,
        "allocation": allocation,
        "ratios": {layer: round(r, 4) for layer, r in _layer_ratios(result).items()},
        "evaluations": evaluations,
        "attempts": attempts,
        "reason": shortfall(achieved, goal, tolerance, allocation, budget),
    }
    return result


def check_reachable(budget: Budget, target: Target, who: str) -> tuple[float, float]:
    """The base cost and the goal; refuses a goal below what the narrowest network `who` can make here costs."""
    cost = budget.cost(target)
    base = cost({})
    goal = target.goal(base)
    narrowest = cost(budget.groups.narrowest())
    if goal >= base:
        raise PruningError(
            f"target {target} is met by the unpruned model ({_amount(base, target)}): nothing to prune; give a ratio "
            f"above 1x or a ceiling below {_amount(base, target)}"
        )
    if goal < narrowest:
        raise PruningError(
            f"target {target} is out of reach: the narrowest network {who} can make here keeps "
            f"{_amount(narrowest, target)} of {_amount(base, target)} ({base / narrowest:.2f}x less); "
            f"the reachable range is 1x to {base / narrowest:.2f}x"
        )
    return base, goal


def _closer(achieved: float, best: float, goal: float) -> bool:
    """Within the goal beats over it; then the nearer to the goal."""
    if (achieved <= goal) != (best <= goal):
        return achieved <= goal
    return abs(achieved - goal) < abs(best - goal)


def _layer_ratios(result: PruneResult) -> dict[str, float]:
    return {name: 1 - len(kept) / result.original_units[name] for name, kept in result.kept.items()}


def _amount(value: float, target: Target) -> str:
    if target.cost.startswith("latency"):
        return f"{value * 1e3:.2f} ms"
    return f"{value:,.0f} {'MACs' if target.cost == 'macs' else 'parameters'}"


def shortfall(achieved: float, goal: float, tolerance: float, allocation: str, budget: Budget) -> str | None:
    """Why the result is not within the tolerance of the goal, in words (None when it is)."""
    if achieved > goal:
        return (
            f"the pruned model's real cost is {achieved / goal - 1:.1%} over the goal (the backend rounds channel "
            "counts its own way, or the latency measured differs from the table's prediction)"
        )
    if achieved >= goal * (1 - tolerance):
        return None
    steps = sorted({s for s in budget.groups.steps.values() if s > 1})
    why = (
        f"channel counts move in steps of {', '.join(map(str, steps))}"
        if steps
        else "each group moves a channel at a time"
    )
    if allocation == "uniform":
        why = "one ratio moves every group at once"
    elif allocation in ("sensitivity", "latency"):
        why = f"the greedy's last step went past the goal, and no channel given back fits under it; {why}"
    return f"the nearest point under the goal is {1 - achieved / goal:.1%} below it ({why})"


__all__ = [
    "ALLOCATIONS",
    "COSTS",
    "Target",
    "check_reachable",
    "parse_target",
    "plan_budget",
    "prune_to_budget",
    "shortfall",
]
