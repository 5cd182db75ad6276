"""How many channels every prunable group keeps so that a cost lands on a budget: the allocation strategies.

An allocation decides counts only; which channels go is the pruning criterion's business. Every strategy searches
plans (group -> kept channels) against a cost function that falls as channels go (MACs, parameters or latency of the
plan) and returns the plan of largest cost that does not exceed the goal, so the budget holds and is used up:

* `uniform`: one ratio for every group, by bisection.
* `global_threshold`: one threshold over LAMP scores (Lee et al. 2021: a unit's squared norm over the sum of the squared
  norms at least as large in its group), which makes magnitudes comparable across layers; by bisection over how many
  of the lowest-scoring units go, in that order.
* `sensitivity_greedy`: from a sensitivity scan (metric per group and sparsity), repeatedly take the next sparsity step
  of the group that loses the least metric per unit of cost saved, then refine the last step to the goal (past the
  scan, a step to the floor counts as losing the whole metric).
* `importance_greedy`: repeatedly remove the chunk of lowest-scoring units that costs the least importance per unit of
  cost saved (with a latency table as the cost: importance per millisecond).

`give_back` then returns channels, most important first, wherever the goal still allows one more: on a small model a
single channel can be several percent of the cost, and the plain searches stop short by that much.

Every group keeps at least its floor (FLOOR_FRACTION of its channels, at least one) and moves in steps of its `step`
(grouped-convolution blocks, round_to).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch

from .selection import removal_count

Plan = dict[int, int]
Cost = Callable[[Plan], float]
FLOOR_FRACTION = 0.05  # no allocation takes a group below 5% of its channels (and never below one)
BISECTIONS = 12


@dataclass
class Groups:
    """The prunable groups an allocation may shrink: their sizes, floors and steps."""

    sizes: dict[int, int]
    steps: dict[int, int]  # kept counts are multiples of this (1: any count)

    def floor(self, group: int) -> int:
        return self.snap(group, max(1, math.ceil(FLOOR_FRACTION * self.sizes[group])))

    def snap(self, group: int, kept: int) -> int:
        """`kept` rounded up to the group's step, within [1 step, size]."""
        step, size = self.steps.get(group, 1), self.sizes[group]
        return min(size, max(step, -(-kept // step) * step))

    def narrowest(self) -> Plan:
        return {g: self.floor(g) for g in self.sizes}

    def at_ratio(self, ratio: float) -> Plan:
        """Every group at one ratio of channels removed (floor(size x ratio), as the scratch operators count)."""
        return {
            g: max(self.floor(g), self.snap(g, size - removal_count(size, ratio))) for g, size in self.sizes.items()
        }


@dataclass
class Allocation:
    plan: Plan
    cost: float
    evaluations: int  # cost evaluations the search took


class _Counted:
    """The cost function, counting its calls."""

    def __init__(self, cost: Cost) -> None:
        self.cost, self.calls = cost, 0

    def __call__(self, plan: Plan) -> float:
        self.calls += 1
        return self.cost(plan)


def _largest_under(count: int, plan_at: Callable[[int], Plan], cost: _Counted, goal: float) -> tuple[Plan, float]:
    """The plan of the smallest index in 0..count whose cost is <= goal (costs fall with the index), by bisection: the
    caller knows index 0 is over the goal and index `count` within it, so only the ceil(log2(count)) middles are
    evaluated (one more when no middle is within the goal)."""
    low, high = 0, count  # cost(low) > goal >= cost(high)
    best: tuple[Plan, float] | None = None
    while high - low > 1:
        middle = (low + high) // 2
        plan = plan_at(middle)
        value = cost(plan)
        if value <= goal:
            high, best = middle, (plan, value)
        else:
            low = middle
    if best is None:
        plan = plan_at(high)
        best = plan, cost(plan)
    return best


def uniform(groups: Groups, cost: Cost, goal: float) -> Allocation:
    """One ratio for every group: the smallest that brings the cost within the goal (bisection over 2^12 ratios: 12
    evaluations). The goal must lie between the cost of the narrowest plan and the full model's."""
    counted = _Counted(cost)
    resolution = 2**BISECTIONS
    plan, value = _largest_under(resolution, lambda i: groups.at_ratio(i / resolution * 0.999999), counted, goal)
    return Allocation(plan, value, counted.calls)


def lamp_scores(norms: torch.Tensor) -> torch.Tensor:
    """LAMP (Lee et al., ICLR 2021): each unit's squared norm over the sum of the squared norms at least as large in
    its group, so scores compare across layers of any size and scale (the largest unit of a group scores 1)."""
    squared = norms.double().square()
    order = torch.argsort(squared, stable=True)
    tail = torch.flip(torch.cumsum(torch.flip(squared[order], [0]), 0), [0])
    scores = torch.empty_like(squared)
    scores[order] = squared[order] / tail.clamp_min(1e-300)
    return scores


def removal_order(groups: Groups, scores: dict[int, torch.Tensor]) -> list[int]:
    """Groups in the order their units go, lowest score first, each group's floor kept back (one entry per unit)."""
    entries = []
    for group, score in scores.items():
        removable = groups.sizes[group] - groups.floor(group)
        entries += [(float(value), group) for value in torch.sort(score).values[:removable]]
    return [group for _, group in sorted(entries, key=lambda entry: entry[0])]


def _plan_after(groups: Groups, order: list[int], count: int) -> Plan:
    removed: dict[int, int] = {}
    for group in order[:count]:
        removed[group] = removed.get(group, 0) + 1
    return {g: max(groups.floor(g), groups.snap(g, size - removed.get(g, 0))) for g, size in groups.sizes.items()}


def global_threshold(groups: Groups, scores: dict[int, torch.Tensor], cost: Cost, goal: float) -> Allocation:
    """One threshold over LAMP scores, as the share of the lowest-scoring units removed, by bisection over 2^12 shares
    (12 evaluations; a unit at a time on networks of up to 4,096 prunable units, within 0.025% of them above)."""
    counted = _Counted(cost)
    order = removal_order(groups, {g: lamp_scores(s) for g, s in scores.items()})
    resolution = min(len(order), 2**BISECTIONS)
    plan, value = _largest_under(
        resolution, lambda i: _plan_after(groups, order, round(i * len(order) / resolution)), counted, goal
    )
    return Allocation(plan, value, counted.calls)


def sensitivity_greedy(
    groups: Groups, metrics: dict[int, dict[float, float]], baseline: float, cost: Cost, goal: float
) -> Allocation:
    """Greedy over a sensitivity scan: each step moves one group to its next scanned sparsity, the one that loses the
    least metric per unit of cost saved (a step that gains metric goes first), until the cost is within the goal; the
    last step is then refined by bisection on that group's ratio, so the plan uses the budget up.

    Past its deepest scanned sparsity (and for a group the scan left out) a group can still go to its floor, a step
    assumed to lose the whole metric, taken only once every scanned step is: so every goal the narrowest plan meets
    is reached, and one the scan reaches is reached as before."""
    counted = _Counted(cost)
    levels = {g: [0.0, *sorted(s for s in metrics.get(g, {}) if 0 < s < 1), 1.0] for g in groups.sizes}
    loss = {g: {s: baseline - metrics.get(g, {}).get(s, baseline) for s in levels[g][:-1]} for g in groups.sizes}
    for g in groups.sizes:  # to the floor: the metric assumed lost (never less than the deepest scanned loss)
        loss[g][1.0] = max(baseline, *loss[g].values())
    at = dict.fromkeys(groups.sizes, 0)

    def plan_of(state: dict[int, float]) -> Plan:
        return {
            g: max(groups.floor(g), groups.snap(g, size - removal_count(size, state.get(g, 0.0))))
            for g, size in groups.sizes.items()
        }

    state = dict.fromkeys(groups.sizes, 0.0)
    plan = plan_of(state)
    current = counted(plan)

    def next_step(g: int) -> int | None:
        """The next level of `g` that changes its kept count (a small group skips levels that round to the same)."""
        return next(
            (j for j in range(at[g] + 1, len(levels[g])) if plan_of(state | {g: levels[g][j]})[g] < plan[g]), None
        )

    moved: tuple[int, float] | None = None  # the last group moved, and the level it came from
    while current > goal:
        steps = {g: j for g in groups.sizes if (j := next_step(g)) is not None}
        scanned = {g: j for g, j in steps.items() if j < len(levels[g]) - 1}
        best, best_rate, best_cost = None, math.inf, current
        for g, j in (scanned or steps).items():  # steps to the floor only once the scan is used up
            trial = counted(plan_of(state | {g: levels[g][j]}))
            saved = current - trial
            if saved <= 0:
                continue
            rate = (loss[g][levels[g][j]] - loss[g][levels[g][at[g]]]) / saved
            if rate < best_rate:
                best, best_rate, best_cost = g, rate, trial
        if best is None:
            break  # every group at its floor: the caller refused such a goal up front
        moved = best, state[best]
        at[best] = steps[best]
        state[best] = levels[best][at[best]]
        plan, current = plan_of(state), best_cost
    if moved is not None and current <= goal:  # the last step may overshoot: give back what the goal allows there
        group, (low, high) = moved[0], (moved[1], state[moved[0]])
        resolution = 2**6
        plan, current = _largest_under(
            resolution, lambda i: plan_of(state | {group: low + (high - low) * i / resolution}), counted, goal
        )
    return Allocation(plan, current, counted.calls)


def importance_greedy(
    groups: Groups,
    scores: dict[int, torch.Tensor],
    cost: Cost,
    goal: float,
    rate_cost: Cost | None = None,
    chunks: int = 16,
) -> Allocation:
    """Greedy removal of chunks (1/`chunks` of a group, at least its step) of the lowest-LAMP units, each time from the
    group whose chunk costs the least importance per unit of `rate_cost` saved (a latency table's milliseconds; by
    default the budget's own cost), until `cost` is within the goal; the last chunk is then given back unit by unit as
    far as the goal allows."""
    counted = _Counted(cost)
    rate_of = rate_cost or counted
    lamp = {g: torch.sort(lamp_scores(s)).values for g, s in scores.items()}
    plan = {g: groups.sizes[g] for g in groups.sizes}
    current, current_rate = counted(plan), rate_of(plan)
    last: tuple[int, int] | None = None
    while current > goal:
        best, best_rate, best_plan = None, math.inf, plan
        for g in scores:
            chunk = max(groups.steps.get(g, 1), groups.sizes[g] // chunks)
            target = max(groups.floor(g), groups.snap(g, plan[g] - chunk))
            if target >= plan[g]:
                continue
            trial = plan | {g: target}
            saved = max(current_rate - rate_of(trial), 1e-12)  # a chunk that saves nothing by this measure goes last
            importance = float(lamp[g][groups.sizes[g] - plan[g] : groups.sizes[g] - target].sum())
            if importance / saved < best_rate:
                best, best_rate, best_plan = g, importance / saved, trial
        if best is None:
            break
        last = (best, plan[best])
        plan = best_plan
        current, current_rate = counted(plan), rate_of(plan)
    if last is not None and current <= goal:
        group, before = last
        after = plan[group]
        plan, current = _largest_under(
            before - after, lambda i: plan | {group: groups.snap(group, before - i)}, counted, goal
        )
    return Allocation(plan, current, counted.calls)


def give_back(groups: Groups, plan: Plan, scores: dict[int, torch.Tensor], cost: Cost, goal: float) -> Allocation:
    """Add back one step of channels at a time, to the group whose next channel back scores highest (LAMP), for as
    long as the cost stays within the goal; a group that would go over is passed over."""
    counted = _Counted(cost)
    lamp = {g: torch.sort(lamp_scores(s), descending=True).values for g, s in scores.items()}
    plan, current = dict(plan), counted(plan)
    closed: set[int] = set()
    while True:
        open_groups = [g for g in plan if g not in closed and plan[g] < groups.sizes[g]]
        if not open_groups:
            break
        group = max(open_groups, key=lambda g: float(lamp[g][plan[g]]))  # its best channel not kept
        trial = plan | {group: groups.snap(group, plan[group] + groups.steps.get(group, 1))}
        value = counted(trial)
        if value <= goal:
            plan, current = trial, value
        else:
            closed.add(group)
    return Allocation(plan, current, counted.calls)
