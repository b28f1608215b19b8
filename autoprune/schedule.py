"""How many tokens each reducing layer keeps: one set of rules for the runtime and the cost model.

All counts are of non-prefix tokens (prefix tokens are never reduced).
"""

from __future__ import annotations

import math
from typing import NamedTuple

from .config import ConfigError, PruneConfig


def keep_count(n: int, keep_rate: float | None, r: int | None) -> int:
    """Tokens a ranking reducer keeps out of n: ceil(rate * n), or n - r; at least one."""
    if keep_rate is not None:
        # round() first so that e.g. 0.7 * 100 = 70.00000000000001 keeps 70, not 71
        return max(1, min(n, math.ceil(round(keep_rate * n, 6))))
    return max(1, n - r)


def merge_count(n: int, keep_rate: float | None, r: int | None) -> int:
    """Tokens a bipartite-matching reducer (tome, ppt) removes: capped at n // 2."""
    removed = n - keep_count(n, keep_rate, None) if keep_rate is not None else r
    return min(removed, n // 2)


def bat_counts(n: int, kept: int, clusters: int, pairs: int) -> tuple[int, int]:
    """(pairs merged among the kept tokens, clusters made of the others), both capped to fit."""
    if kept == n:
        return 0, 0
    return min(pairs, kept // 2), min(clusters, n - kept)


def tokens_after(cfg: PruneConfig, index: int, n: int) -> int:
    """Non-prefix tokens after the `index`-th reducing layer of `cfg`, given n before it."""
    if cfg.adaptive:
        raise ConfigError("tokens_after: mass-based sait keeps a per-image count; measure it on images")
    keep_rate, r = cfg.amount(index)
    if cfg.reducer in ("tome", "ppt"):
        return n - merge_count(n, keep_rate, r)
    kept = keep_count(n, keep_rate, r)
    if kept == n:
        return n
    if cfg.reducer == "evit":
        return kept + int(cfg.fuse)
    if cfg.reducer == "bat":
        pairs, clusters = bat_counts(n, kept, cfg.clusters, cfg.pairs)
        return kept - pairs + clusters
    return kept  # tps, sait (value-based)


class BlockCounts(NamedTuple):
    """Non-prefix tokens one block's attention and MLP see, and how many leave it."""

    attn: int
    mlp: int
    out: int


def block_token_counts(cfg: PruneConfig | None, depth: int, n: int) -> list[BlockCounts]:
    """Token counts of each block: a reducing block reduces between its attention and its MLP,
    except SaiT's, which runs dense and reduces as tokens leave it."""
    layers = () if cfg is None else cfg.resolved_layers(depth)
    position = {layer: i for i, layer in enumerate(layers)}
    counts = []
    for block in range(depth):
        n_in = n
        if block in position:
            n = tokens_after(cfg, position[block], n)
        after_mlp = block in position and cfg.reducer == "sait"
        counts.append(BlockCounts(attn=n_in, mlp=n_in if after_mlp else n, out=n))
    return counts
