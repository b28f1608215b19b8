"""What a search knows about speed before it trains: images/s predicted from the latency table
calibrated for its model, device and serving batch size, and the cost a budget limits.

The predicted throughput is the search's throughput objective: it is deterministic, so the front
is not ranked by timing noise (the trial still measures its throughput, recorded beside it). A
speed budget (`2x`, `1500img/s`) limits predicted seconds per image; a FLOPs budget limits FLOPs
per image. Either way the cost falls as reduction grows, which is all the budget-exact solver
needs.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from torch import Tensor, nn

from ..config import PruneConfig
from ..latency import LatencyTable, predict_throughput
from .budget import Budget, format_flops


class SpeedModel:
    """Predicted images/s of configs of `model` on `table`; adaptive configs (mass-based SaiT,
    PPT) are expected over `images` run through `model`'s own weights. Cached per config."""

    def __init__(self, model: nn.Module, table: LatencyTable, images: Tensor) -> None:
        self.model, self.table, self.images = model, table, images
        self._cache: dict[str, float] = {}
        self.dense = self.throughput(None)

    @property
    def batch_size(self) -> int:
        return self.table.batch_size

    def throughput(self, prune: PruneConfig | None) -> float:
        key = "dense" if prune is None else prune.to_json()
        if key not in self._cache:
            adaptive = prune is not None and (prune.adaptive or prune.reducer == "ppt")
            self._cache[key] = predict_throughput(self.model, prune, self.table,
                                                  images=self.images if adaptive else None)
        return self._cache[key]

    def speedup(self, prune: PruneConfig | None) -> float:
        return self.throughput(prune) / self.dense


@dataclass(frozen=True)
class Limit:
    """What a budget limits, in its own unit: a config fits when `cost(config) <= limit`.
    `name` is the key of the Optuna constraint the study records (`flops` or `seconds`)."""

    name: str
    limit: float
    cost: Callable[[PruneConfig], float]
    describe: Callable[[float], str]

    @classmethod
    def of(cls, budget: Budget, dense_flops: float, flops_of: Callable[[PruneConfig], float],
           speed: SpeedModel | None) -> "Limit":
        if not budget.speed:
            return cls("flops", budget.resolve(dense_flops), flops_of, format_flops)
        if speed is None:
            raise ValueError("a speed budget needs the calibrated speed model")
        required = budget.required_throughput(speed.dense)
        return cls("seconds", 1 / required, lambda prune: 1 / speed.throughput(prune),
                   lambda seconds: f"{1 / seconds:.0f} img/s")
