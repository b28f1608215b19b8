"""Whole-forward terms of a latency table: what parts timed one at a time do not see.

A part timed alone runs after other parts of the calibration, not after the block before it in a
real forward, and a reducing block in a forward does more than its parts (the first reduction
starts the token sizes, every reduction allocates tensors of a new shape). On the quickstart model
at batch 1 on a 2-core CPU, every block of a forward took 0.05-0.1 ms more than alone and EViT's
first reducing block 0.25 ms more, next to blocks of about 0.4 ms: predicted speedups came out
10-20 % high. Calibration therefore also times whole forwards, interleaved with the parts: the
dense model, whose ratio to the sum of its parts scales every prediction, and per reducer a config
reducing at one block and one reducing at every block but the first, whose excess over their
scaled parts gives that reducer a cost per forward and a cost per reducing block.
"""

from __future__ import annotations

import copy
import dataclasses
import itertools

from torch import Tensor, nn

from ..config import PruneConfig
from ..patch import Reduction, apply, reductions
from .predict import predict_seconds
from .table import LatencyTable

ONE_LAYER_KEEP = 0.7        # keep rate of the one-block config; tome and ppt remove 30 % of the tokens
EVERY_LAYER_KEEP = 0.9      # per block in the every-block config; tome and ppt remove half in all


def forward_configs(kinds: dict[str, PruneConfig], depth: int, patches: int) -> dict[str, PruneConfig]:
    """'dense' (None) and, per reducer among `kinds` (its first kind), '<reducer>/one' at the
    middle block and '<reducer>/all' at blocks 1 to depth - 1 (not for sait, which reduces at
    one block, nor below depth 3)."""
    configs: dict[str, PruneConfig | None] = {"dense": None}
    for cfg in kinds.values():
        if f"{cfg.reducer}/one" in configs:
            continue
        configs[f"{cfg.reducer}/one"] = _at(cfg, (depth // 2,), patches)
        if cfg.reducer != "sait" and depth >= 3:
            configs[f"{cfg.reducer}/all"] = _at(cfg, tuple(range(1, depth)), patches)
    return configs


def _at(cfg: PruneConfig, layers: tuple[int, ...], patches: int) -> PruneConfig:
    one = len(layers) == 1
    if cfg.reducer in ("tome", "ppt"):
        r = round((1 - ONE_LAYER_KEEP) * patches) if one else round(patches / (2 * len(layers)))
        return dataclasses.replace(cfg, layers=layers, r=max(1, r), keep_rate=None, mass_threshold=None)
    keep = ONE_LAYER_KEEP if one else EVERY_LAYER_KEEP
    if cfg.adaptive:  # mass-based sait keeps the tokens holding that share of the attention mass
        return dataclasses.replace(cfg, layers=layers, mass_threshold=keep)
    return dataclasses.replace(cfg, layers=layers, keep_rate=keep, r=None)


def forward_models(model: nn.Module, configs: dict[str, PruneConfig | None]) -> dict[str, nn.Module]:
    """`model` reduced by each config, every copy sharing its weights (as one served model would
    read them, and as the parts timed on `model` read them)."""
    shared = {id(t): t for t in itertools.chain(model.parameters(), model.buffers())}
    return {name: apply(copy.deepcopy(model, dict(shared)), cfg).eval() for name, cfg in configs.items()}


def observed(models: dict[str, nn.Module], configs: dict[str, PruneConfig | None],
             images: Tensor) -> dict[str, list[Reduction] | None]:
    """What the configs whose work depends on the images (ppt's branches, mass-based sait's
    counts) do to the calibration images: their prediction needs it."""
    return {name: reductions(models[name], images) if cfg is not None and (cfg.reducer == "ppt" or cfg.adaptive)
            else None for name, cfg in configs.items()}


def fit_terms(points: list[tuple[int, float]]) -> list[float]:
    """[per forward, per reducing block] through (reducing blocks, excess seconds) by least
    squares; with a single block count, all of the excess is per block."""
    layers = [n for n, _ in points]
    if len(set(layers)) < 2:
        return [0.0, sum(excess / n for n, excess in points) / len(points)]
    mean_n = sum(layers) / len(points)
    mean_e = sum(e for _, e in points) / len(points)
    slope = (sum((n - mean_n) * (e - mean_e) for n, e in points)
             / sum((n - mean_n) ** 2 for n in layers))
    return [mean_e - slope * mean_n, slope]


def with_forward_terms(parts: LatencyTable, seconds: dict[str, float], configs: dict[str, PruneConfig | None],
                       found: dict[str, list[Reduction] | None]) -> LatencyTable:
    """`parts` (a table without forward terms) with them fitted from the whole forwards' median
    `seconds` by config name."""
    scale = seconds["dense"] / predict_seconds(parts, None)
    points: dict[str, list[tuple[int, float]]] = {}
    for name, cfg in configs.items():
        if cfg is not None:
            excess = seconds[name] - scale * predict_seconds(parts, cfg, found[name])
            points.setdefault(cfg.reducer, []).append((len(cfg.resolved_layers(parts.depth)), excess))
    return dataclasses.replace(parts, forward_scale=scale,
                               forward_extra={reducer: fit_terms(p) for reducer, p in points.items()})
