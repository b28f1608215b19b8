"""The budget solve: the one scalar a proposal leaves open, set so the config lands on its target cost.

A proposal fixes the reducer, its layers, the shape of its schedule and the share of the budget it
may spend; what remains is how much to reduce. A `Family` lays the configs of one proposal along a
scalar s in [0, high]: s = 0 reduces least, s = high most. `solve` bisects for the smallest s whose
config costs at most the target: the least reduction (the largest keep rate or mass threshold, the
smallest r) that fits. Token counts are integers, so the cost is a step function of s and the
answer is exact to one step: the next less-reducing config of the family costs more than the target.

The cost is any function of the config that does not rise as reduction grows: FLOPs per image
today (closed form, or measured on a calibration batch for mass-based SaiT); a predicted time per
image would plug in unchanged. Bisection keeps a config that fits whatever the cost's shape, so
a cost that is not monotone (BAT's clusters can add tokens back) may only miss the closest step,
never the budget.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable

from ..config import PruneConfig

Cost = Callable[[PruneConfig], float]
_DECIMALS = 6  # keep rates and thresholds are written with at most this many decimals


@dataclass(frozen=True)
class Family:
    """The configs of one proposal along s in [0, high]; `build(s)` is the config at s."""

    build: Callable[[float], PruneConfig]
    high: float

    @property
    def cheapest(self) -> PruneConfig:
        return self.build(self.high)


@dataclass(frozen=True)
class Solution:
    config: PruneConfig
    cost: float
    target: float
    scale: float                 # the solved s
    below: float | None = None   # cost of the next less-reducing config (over the target); None at s = 0

    @property
    def reached(self) -> bool:
        """False when even the cheapest config of the family costs more than the target."""
        return self.cost <= self.target


def solve(family: Family, cost: Cost, target: float, resolution: float = 1e-7) -> Solution:
    """The least-reducing config of `family` whose cost is at most `target` (or its cheapest)."""
    least = family.build(0.0)
    least_cost = cost(least)
    if least_cost <= target:
        return Solution(least, least_cost, target, 0.0)
    most = family.cheapest
    most_cost = cost(most)
    if most_cost > target or family.high <= 0:
        return Solution(most, most_cost, target, family.high)
    low, low_cost, high, high_cost = 0.0, least_cost, family.high, most_cost
    while high - low > resolution * family.high:  # far finer than one token of any layer
        middle = (low + high) / 2
        middle_cost = cost(family.build(middle))
        if middle_cost <= target:
            high, high_cost = middle, middle_cost
        else:
            low, low_cost = middle, middle_cost
    scale = _short_decimal(family, cost, high, high_cost)
    return Solution(family.build(scale), high_cost, target, scale, below=low_cost)


def _short_decimal(family: Family, cost: Cost, scale: float, scale_cost: float) -> float:
    """The shortest decimal (rounding `scale` up) with the same cost: every s of one step gives the
    same token counts, so the config can read 0.7 instead of 0.6953125."""
    for decimals in range(1, _DECIMALS + 1):
        factor = 10 ** decimals
        candidate = math.ceil(scale * factor - 1e-9) / factor
        if candidate <= family.high and cost(family.build(candidate)) == scale_cost:
            return candidate
    return scale


# -- schedules ------------------------------------------------------------------------------------

def schedule_weights(count: int, shape: float) -> tuple[float, ...]:
    """How much each of `count` reducing layers reduces, relative to the others.

    Linear in depth: shape 0 spreads the reduction evenly, -1 puts twice the mean at the first
    reducing layer and none at the last (ToMe's decreasing schedule), +1 the reverse."""
    if count <= 1:
        return (1.0,) * count
    return tuple(1 + shape * (2 * i / (count - 1) - 1) for i in range(count))


def shape_of(amounts: tuple[float, ...]) -> float:
    """The shape whose schedule puts per-layer `amounts` (reductions) at its first and last layer
    in the same ratio (0 when they are equal)."""
    first, last = amounts[0], amounts[-1]
    if len(amounts) <= 1 or first + last <= 0 or math.isclose(first, last, rel_tol=1e-9, abs_tol=1e-12):
        return 0.0
    return (last - first) / (last + first)


def _collapse(values: tuple) -> Any:
    """One value per layer, written as a scalar when all layers share it."""
    return values[0] if len(set(values)) == 1 else values


def keep_rate_family(base: dict[str, Any], weights: tuple[float, ...], low: float, high: float) -> Family:
    """evit, tps, bat, value-based sait: the reducing layer i keeps 1 - d_i of its tokens, where d_i
    grows with s along the weights, bounded to keep rates in [low, high]; at s = high every layer
    with a weight keeps `low`."""
    floor = 1 - low
    positive = [w for w in weights if w > 0] or [1.0]
    top = max(weights) if max(weights) > 0 else 1.0

    def build(s: float) -> PruneConfig:
        rates = tuple(round(min(high, max(low, 1 - min(floor, s * w / top))), _DECIMALS) for w in weights)
        return PruneConfig(**base, keep_rate=_collapse(rates))

    return Family(build, floor * top / min(positive))


def removal_family(base: dict[str, Any], weights: tuple[float, ...], low: int, high: int) -> Family:
    """tome (every block), ppt: the reducing layer i removes r_i tokens, r_i growing with s along
    the weights, bounded to [low, high]; at s = high every layer with a weight removes `high`.
    (Matching removes at most half the tokens a layer sees, however large r is.)"""
    positive = [w for w in weights if w > 0] or [1.0]
    top = max(weights) if max(weights) > 0 else 1.0

    def build(s: float) -> PruneConfig:
        amounts = tuple(min(high, max(low, math.floor(s * w / top + 0.5))) for w in weights)
        return PruneConfig(**base, r=_collapse(amounts))

    return Family(build, high * top / min(positive))


def mass_family(base: dict[str, Any], low: float, high: float) -> Family:
    """mass-based sait: the threshold falls from `high` (s = 0) to `low` (s = high - low)."""

    def build(s: float) -> PruneConfig:
        return PruneConfig(**base, mass_threshold=round(max(low, high - s), _DECIMALS))

    return Family(build, high - low)
