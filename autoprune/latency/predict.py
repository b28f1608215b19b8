"""`predict_throughput`: images/s of a reduced model from its latency table, in closed form.

A batch costs the embedding, then per block either the whole block at its token count (with the
key bias the config calls for) or, for a reducing block, its attention half at the tokens it
receives, the reducer's own work and its MLP half at the tokens it keeps, then the head. The
token schedule comes from `schedule.block_token_counts`, the same one `predict_flops` reads.
"""

from __future__ import annotations

import dataclasses
import weakref

from torch import Tensor, nn

from ..config import ConfigError, PruneConfig
from ..patch import Reduction, apply, reductions
from ..reducers import NEEDS_PROBS
from ..schedule import BlockCounts, block_token_counts
from .table import LatencyError, LatencyTable, architecture_digest, reduce_kind

UNINFORMED_POOL_SHARE = 0.5  # ppt without images: each image as likely to pool as to prune

_DIGESTS: "weakref.WeakKeyDictionary[nn.Module, str]" = weakref.WeakKeyDictionary()


def predict_throughput(model: nn.Module, cfg: PruneConfig | None, table: LatencyTable,
                       images: Tensor | None = None) -> float:
    """Images/s of `model` reduced by `cfg` (None: dense) at the table's device and batch size.

    Fixed-schedule configs need no forward pass (microseconds a config). Configs whose work
    depends on the images need `images` and a trained `model`: mass-based sait (required: the
    batch computes its padded count, the largest an image keeps) and ppt (optional: which images
    pool or prune; without images each is taken as equally likely)."""
    digest = _DIGESTS.get(model)
    if digest is None:
        digest = _DIGESTS[model] = architecture_digest(model)
    if digest != table.meta.get("architecture"):
        raise LatencyError("the latency table was calibrated for another model architecture; "
                           "calibrate this model (autoprune calibrate, or latency.calibrate)")
    adaptive = cfg is not None and cfg.adaptive
    if adaptive and images is None:
        raise ConfigError("predict_throughput: mass-based sait keeps a per-image number of tokens; "
                          "pass images=<a batch of real inputs> with the trained model")
    found = None
    if images is not None and cfg is not None and (adaptive or cfg.reducer == "ppt"):
        found = _reductions(model, cfg, images)
    return table.batch_size / predict_seconds(table, cfg, found)


def predict_seconds(table: LatencyTable, cfg: PruneConfig | None,
                    found: list[Reduction] | None = None) -> float:
    """Seconds per batch: the table's parts along the config's token schedule, plus what a whole
    forward costs beyond them; `found` (from `patch.reductions` on calibration images) gives the
    per-image token counts of mass-based sait and the branches ppt took."""
    return _parts_seconds(table, cfg, found) + table.excess_seconds(cfg)


def _parts_seconds(table: LatencyTable, cfg: PruneConfig | None, found: list[Reduction] | None) -> float:
    if cfg is None or cfg.reducer == "none":
        return _seconds(table, None, block_token_counts(None, table.depth, table.patches), {})
    layers = cfg.resolved_layers(table.depth)
    by_block = {r.block: r for r in found or ()}
    if cfg.adaptive:
        return _expected_over_padding(table, cfg, by_block[layers[0]])
    schedule = block_token_counts(cfg, table.depth, table.patches)
    costs = {}
    for layer in layers:
        share = float(by_block[layer].merged_only.float().mean()) if layer in by_block else UNINFORMED_POOL_SHARE
        costs[layer] = _reduce_seconds(table, cfg, schedule[layer].attn, schedule[layer].out, share)
    return _seconds(table, cfg, schedule, costs)


def _seconds(table: LatencyTable, cfg: PruneConfig | None, schedule: list[BlockCounts],
             reduce_costs: dict[int, float], masked_after: int | None = None) -> float:
    prop = cfg is not None and bool(cfg.prop_attn)
    plain = "prop" if prop else "none"
    total = table.embed
    for block, counts in enumerate(schedule):
        if block in reduce_costs:  # attention, the reducer's own work, MLP (sait: before it reduces)
            total += table.attention_seconds(plain, counts.attn) + reduce_costs[block] + table.mlp_seconds(counts.mlp)
        else:
            masked = masked_after is not None and block > masked_after
            total += table.block_seconds("mask" if masked else plain, counts.attn)
    return total + table.head_seconds(schedule[-1].out)


def _reduce_seconds(table: LatencyTable, cfg: PruneConfig, n: int, n_out: int, pool_share: float) -> float:
    """One reducing layer's own work; for ppt, expected over which branch each image takes."""
    kind = reduce_kind(cfg)
    extra = table.probs_seconds("prop" if cfg.prop_attn else "none", n) if cfg.score in NEEDS_PROBS else 0.0
    if cfg.reducer != "ppt":
        return table.reduce_seconds(kind, n, n_out) + extra
    pool = table.reduce_seconds(f"{kind}/pool", n, n_out)
    prune = table.reduce_seconds(f"{kind}/prune", n, n_out)
    all_pool, all_prune = pool_share ** table.batch_size, (1 - pool_share) ** table.batch_size
    cost = all_pool * pool + all_prune * prune
    if table.batch_size > 1:
        # a mixed batch runs each branch on its images, plus the split and the join; the table
        # holds a half-and-half batch, whose overhead over the two branches' mean is that cost
        split = table.reduce_seconds(f"{kind}/mixed", n, n_out) - (pool + prune) / 2
        cost += (1 - all_pool - all_prune) * (pool_share * pool + (1 - pool_share) * prune + split)
    return cost + extra


def _expected_over_padding(table: LatencyTable, cfg: PruneConfig, reduction: Reduction) -> float:
    """Mass-based sait: a batch runs every later block at the largest count an image in it keeps.
    Expected over batches drawn from the calibration images: P(max <= k) = F(k) ** batch."""
    counts = sorted(int(c) for c in reduction.counts.tolist())
    layer, total, below = cfg.layers[0], 0.0, 0.0
    for kept in sorted(set(counts)):
        share = sum(1 for c in counts if c <= kept) / len(counts)
        chance = share ** table.batch_size - below ** table.batch_size
        below = share
        # the same schedule as value-based sait keeping that count
        twin = dataclasses.replace(cfg, mass_threshold=None, r=table.patches - kept)
        schedule = block_token_counts(twin, table.depth, table.patches)
        cost = _reduce_seconds(table, cfg, schedule[layer].attn, schedule[layer].out, 0.0)
        total += chance * _seconds(table, cfg, schedule, {layer: cost}, masked_after=layer)
    return total


def _reductions(model: nn.Module, cfg: PruneConfig, images: Tensor) -> list[Reduction]:
    """What each reducing layer of `cfg` does to `images`, with the model's own weights; the
    model is left as it was (its config and train/eval mode)."""
    previous = getattr(model, "prune_config", None)
    was_training = model.training
    model.eval()
    try:
        return reductions(model if previous == cfg else apply(model, cfg), images)
    finally:
        if previous != cfg:
            apply(model, previous)
        model.train(was_training)
