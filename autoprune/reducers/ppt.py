"""PPT (Wu et al., 2023): per image, pool (ToMe merge) when scores are flat, else prune."""

from __future__ import annotations

from torch import Tensor

from .tokens import Tokens, concat, prefix_of, split_top, take
from .tome import tome


def ppt(tokens: Tokens, scores: Tensor, metric: Tensor, r: int, tau: float, tau_mode: str) -> Tokens:
    """Remove r tokens from each image. Images whose score variance (unbiased, over non-prefix
    tokens) is below `tau` merge r tokens ToMe-style; the others drop their r lowest-scored
    tokens. `tau_mode` "var" compares the raw variance (the paper's); "cv2" compares
    variance * n^2, the squared coefficient of variation, which does not shrink with n."""
    n = tokens.count
    r = min(r, n // 2)
    if r <= 0:
        return tokens
    spread = scores.var(dim=1)
    if tau_mode == "cv2":
        spread = spread * n * n
    pool = spread < tau
    if bool(pool.all()):
        return tome(tokens, metric, r)
    if not bool(pool.any()):
        return _prune(tokens, scores, n - r)
    pooled = tome(_images(tokens, pool), metric[pool], r)
    pruned = _prune(_images(tokens, ~pool), scores[~pool], n - r)
    return _join_images(pool, pooled, pruned)


def _prune(tokens: Tokens, scores: Tensor, keep: int) -> Tokens:
    kept, _ = split_top(scores, keep)
    return concat(prefix_of(tokens), take(tokens, kept))


def _images(tokens: Tokens, mask: Tensor) -> Tokens:
    return tokens.map_tensors(lambda t: t[mask])


def _join_images(pool: Tensor, pooled: Tokens, pruned: Tokens) -> Tokens:
    """The batch in its original image order, from the two branches' outputs."""
    def join(from_pool: Tensor, from_prune: Tensor) -> Tensor:
        out = from_pool.new_empty((pool.shape[0],) + from_pool.shape[1:])
        out[pool] = from_pool
        out[~pool] = from_prune
        return out

    return pooled.replace(
        x=join(pooled.x, pruned.x),
        size=join(pooled.size, pruned.size),
        source=None if pooled.source is None else join(pooled.source, pruned.source),
    )
