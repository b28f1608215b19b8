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

from torch import nn

from ..config import PruneConfig
from ..latency import LatencyTable, predict_seconds, predict_throughput
from ..patch import Reduction
from .budget import Budget, format_flops
from .calibration import Calibration


# The batch a search predicts and times throughput at unless told (`--serve-batch`). On a CPU a
# model serves one request at a time: DeiT-S on 2 cores runs 15.8 img/s at batch 1 and 17.0 at
# batch 32 (benchmarks/latency_validation_cpu.md), so batching buys 8 % more images for 32 times
# the latency, and reductions rank differently at the two sizes. On a GPU, batch 64, the size the
# EViT and ToMe reference benchmarks time at: batch 1 leaves a GPU idle between kernels.
DEFAULT_SERVE_BATCH = {"cpu": 1, "cuda": 64}


def default_serve_batch(device: str) -> int:
    """The serving batch size of `device` ("cpu", "cuda", "cuda:1", ...) when none is given."""
    return DEFAULT_SERVE_BATCH["cuda" if device.startswith("cuda") else "cpu"]


class SpeedModel:
    """Predicted images/s of configs of `model` on `table`, cached per config. Configs whose work
    depends on the images are expected over the `calibration` batch: mass-based SaiT from its
    per-image token counts (the scores the FLOPs calibration already holds: no forward pass),
    PPT from which images pool or prune (one forward pass per config). Without a calibration
    (before the baseline is trained), PPT takes each image as equally likely to pool."""

    def __init__(self, model: nn.Module, table: LatencyTable, calibration: Calibration | None) -> None:
        self.model, self.table, self.calibration = model, table, calibration
        self._cache: dict[str, float] = {}
        self.dense = self.throughput(None)

    def throughput(self, prune: PruneConfig | None) -> float:
        key = "dense" if prune is None else prune.to_json()
        if key not in self._cache:
            self._cache[key] = self._predict(prune)
        return self._cache[key]

    def _predict(self, prune: PruneConfig | None) -> float:
        if prune is not None and prune.adaptive:
            counts = self.calibration.kept_counts(prune)
            found = [Reduction(prune.layers[0], counts, counts.new_zeros(counts.shape, dtype=bool))]
            return self.table.batch_size / predict_seconds(self.table, prune, found)
        images = self.calibration.images if self.calibration and prune and prune.reducer == "ppt" else None
        return predict_throughput(self.model, prune, self.table, images=images)

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
