"""What a whole forward costs beyond the sum of its parts, from the probe forwards `measure` times.

On a CPU, sub-millisecond parts run slower among other code than one at a time, and a reducer's
first run in a forward slower than its next; where fixed costs dominate a block, a table adds that
excess to every prediction. Each term is taken round by round and kept only where the rounds
resolve it.
"""

from __future__ import annotations

import dataclasses
import math
import statistics
from collections.abc import Callable

from torch import Tensor, nn

from ..config import PruneConfig
from ..patch import reductions
from .predict import predict_seconds
from .table import LatencyTable

# A block at the fewest tokens costing at least this share of one at all tokens: fixed costs
# dominate, and what a forward adds to its parts is fixed costs (the quickstart model at batch 1:
# 0.59). Below it (DeiT-S: 0.22 at batch 1, 0.02 at batch 32) the probes' excess measured drift and
# the grid's interpolation instead: DeiT-S at batch 32 kept +205 ms a reduced forward, and its
# predicted speedups fell 10-18 % under the measured ones (benchmarks/latency_validation_cpu.md).
OVERHEAD_BOUND = 1 / 3


def overhead_bound(fewest_tokens: float, all_tokens: float) -> bool:
    """Whether fixed costs dominate a block costing these seconds at the fewest and at all tokens
    (see OVERHEAD_BOUND)."""
    return fewest_tokens >= OVERHEAD_BOUND * all_tokens


RESOLVED = 2.0  # standard errors


def _resolved(value: float, error: float) -> float:
    return value if abs(value) > RESOLVED * error else 0.0


def _median_error(samples: list[float]) -> float:
    """The standard error of the samples' median: 1.25 sigma / sqrt(n), sigma from the median
    absolute deviation (a slow round does not widen it)."""
    center = statistics.median(samples)
    sigma = 1.4826 * statistics.median(abs(value - center) for value in samples)
    return 1.2533 * sigma / math.sqrt(len(samples))


def with_forward_excess(table: LatencyTable, build: Callable[[dict[tuple, float]], LatencyTable],
                        samples: dict[tuple, list[float]], probes: dict[str, tuple[PruneConfig, nn.Module]],
                        images: Tensor) -> LatencyTable:
    """`table` with what whole forwards cost beyond its parts: the dense model's excess, and the
    `probes'` further excess (kind -> (config, model), timed on `images`) fitted as a cost per
    reduced forward plus one per reducing block; `samples` are the rounds' times by part.

    Each excess is taken round by round (a forward against the table `build` makes of the same
    round's parts), so a machine whose speed drifts within a round widens its spread; a term within
    RESOLVED standard errors of zero is left out as noise of the rounds (DeiT-S at batch 32 over 5
    rounds otherwise fitted -157 ms for the dense forward and +256 ms a reduced forward, where the
    effect is a few ms). The tables have no excess yet: their predictions are sums of parts."""
    rounds = [build({key: values[r] for key, values in samples.items()})
              for r in range(len(samples[("forward", "dense")]))]

    def excess_by_round(key: tuple, cfg: PruneConfig | None, found=None) -> list[float]:
        return [seconds - predict_seconds(parts_table, cfg, found) for seconds, parts_table in zip(samples[key], rounds)]

    dense = excess_by_round(("forward", "dense"), None)
    dense_excess = _resolved(statistics.median(dense), _median_error(dense))
    # one line through every reducer's probe: a term per reducer would fit each probe's noise
    # (DeiT-S at batch 1: +-5 ms a forward from 10 rounds, where the effect is a fraction of a ms)
    blocks, excess, errors = [], [], []
    for kind, (cfg, probe) in probes.items():
        found = reductions(probe, images) if cfg.adaptive or cfg.reducer == "ppt" else None
        probe_excess = excess_by_round(("forward", kind), cfg, found)
        blocks.append(len(cfg.layers))
        excess.append(statistics.median(probe_excess) - dense_excess)
        errors.append(_median_error(probe_excess))
    if not blocks:  # no reducer timed
        return dataclasses.replace(table, forward_excess=dense_excess)
    count, mean_blocks, mean_excess = len(blocks), statistics.mean(blocks), statistics.mean(excess)
    mean_error = math.sqrt(sum(e * e for e in errors)) / count
    spread = sum((n - mean_blocks) ** 2 for n in blocks)
    per_block = 0.0
    if spread:
        slope = sum((n - mean_blocks) * (e - mean_excess) for n, e in zip(blocks, excess)) / spread
        slope_error = math.sqrt(sum((n - mean_blocks) ** 2 * e * e for n, e in zip(blocks, errors))) / spread
        per_block = _resolved(slope, slope_error)
        if per_block:
            mean_error = math.hypot(mean_error, mean_blocks * slope_error)
    once = _resolved(mean_excess - per_block * mean_blocks, mean_error)
    return dataclasses.replace(table, forward_excess=dense_excess, reduce_excess=(once, per_block))
