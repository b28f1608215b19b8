"""Pareto ranking and rank correlation: the pure arithmetic behind promotion and the proxy check.

Every objective is maximised. `pareto_order` ranks points as NSGA-II and SMAC3's successive
halving do: non-dominated fronts in order, and inside a front the points that spread the front
most (largest crowding distance) first. `kendall_tau` measures how well one ranking (the cheap
screen) predicts another (accuracy after fine-tuning).
"""

from __future__ import annotations

import math
from typing import Sequence

Point = Sequence[float]


def dominates(a: Point, b: Point) -> bool:
    """a is at least as good as b in every objective and better in one."""
    return all(x >= y for x, y in zip(a, b)) and any(x > y for x, y in zip(a, b))


def non_dominated_fronts(points: Sequence[Point]) -> list[list[int]]:
    """Indices of `points` in successive non-dominated fronts: front 0 is the Pareto front, front 1
    the Pareto front of the rest, and so on. Each front lists its indices in ascending order."""
    dominated_by = [0] * len(points)          # how many points dominate i
    dominating: list[list[int]] = [[] for _ in points]  # the points i dominates
    for i, a in enumerate(points):
        for j in range(i + 1, len(points)):
            if dominates(a, points[j]):
                dominating[i].append(j)
                dominated_by[j] += 1
            elif dominates(points[j], a):
                dominating[j].append(i)
                dominated_by[i] += 1
    fronts, current = [], [i for i, count in enumerate(dominated_by) if count == 0]
    while current:
        fronts.append(sorted(current))
        following = []
        for i in current:
            for j in dominating[i]:
                dominated_by[j] -= 1
                if dominated_by[j] == 0:
                    following.append(j)
        current = following
    return fronts


def crowding_distance(points: Sequence[Point], front: Sequence[int]) -> dict[int, float]:
    """NSGA-II's crowding distance of each index in `front`: the sum over objectives of the gap
    between its two neighbours, divided by the front's range. The ends of each objective get
    infinity, so the extremes of a front are always kept; an objective that does not vary adds 0."""
    distance = {i: 0.0 for i in front}
    if len(front) <= 2:
        return {i: math.inf for i in front}
    for k in range(len(points[front[0]])):
        ordered = sorted(front, key=lambda i: (points[i][k], i))
        low, high = points[ordered[0]][k], points[ordered[-1]][k]
        distance[ordered[0]] = distance[ordered[-1]] = math.inf
        if high == low:
            continue
        for before, i, after in zip(ordered, ordered[1:], ordered[2:]):
            distance[i] += (points[after][k] - points[before][k]) / (high - low)
    return distance


def pareto_order(points: Sequence[Point]) -> list[int]:
    """All indices, best first: by front, then by crowding distance (largest first), then by the
    first objective (highest first), then by index (earliest first), so the order is deterministic."""
    order = []
    for front in non_dominated_fronts(points):
        crowding = crowding_distance(points, front)
        order += sorted(front, key=lambda i: (-crowding[i], -points[i][0], i))
    return order


def kendall_tau(x: Sequence[float], y: Sequence[float]) -> float | None:
    """Kendall's tau-b between two paired samples (ties in either counted as neither concordant
    nor discordant, with the tie correction); None when fewer than two pairs, or when either
    sample is constant (no ranking to compare)."""
    if len(x) != len(y):
        raise ValueError(f"kendall_tau: {len(x)} values against {len(y)}")
    concordant = discordant = ties_x = ties_y = 0
    for i in range(len(x)):
        for j in range(i + 1, len(x)):
            dx, dy = x[i] - x[j], y[i] - y[j]
            if dx == 0 and dy == 0:
                continue
            if dx == 0:
                ties_x += 1
            elif dy == 0:
                ties_y += 1
            elif (dx > 0) == (dy > 0):
                concordant += 1
            else:
                discordant += 1
    denominator = math.sqrt((concordant + discordant + ties_x) * (concordant + discordant + ties_y))
    return None if denominator == 0 else (concordant - discordant) / denominator
