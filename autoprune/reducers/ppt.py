"""PPT (Wu et al., 2023): per image, pool (ToMe merge) when scores are flat, else prune."""

from __future__ import annotations

import torch
from torch import Tensor

from .tokens import Tokens, concat, prefix_of, split_top, take
from .tome import tome


def ppt(tokens: Tokens, scores: Tensor, metric: Tensor, r: int, tau: float, tau_mode: str) -> Tokens:
    """Remove r tokens from each image. Images whose score variance (unbiased, over non-prefix
    tokens) is below `tau` merge r tokens ToMe-style; the others drop their r lowest-scored
    tokens. `tau_mode` "var" compares the raw variance (the paper's); "cv2" compares
    variance * n^2, the squared coefficient of variation, which does not shrink with n.

    Both branches run on the whole batch and each image takes its own: a select rather than a
    data-dependent branch, so the reducer traces (ONNX) and the batch stays one tensor."""
    n = tokens.count
    r = min(r, n // 2)
    if r <= 0:
        return tokens
    spread = scores.var(dim=1)
    if tau_mode == "cv2":
        spread = spread * n * n
    return _select(spread < tau, tome(tokens, metric, r), _prune(tokens, scores, n - r))


def _prune(tokens: Tokens, scores: Tensor, keep: int) -> Tokens:
    kept, _ = split_top(scores, keep)
    return concat(prefix_of(tokens), take(tokens, kept))


def _select(pool: Tensor, pooled: Tokens, pruned: Tokens) -> Tokens:
    """Per image, the pooled tokens where `pool` [B] is set, else the pruned ones (same shapes)."""
    def pick(from_pool: Tensor, from_prune: Tensor) -> Tensor:
        return torch.where(pool.reshape((-1,) + (1,) * (from_pool.dim() - 1)), from_pool, from_prune)

    return pooled.replace(
        x=pick(pooled.x, pruned.x),
        size=pick(pooled.size, pruned.size),
        source=None if pooled.source is None else pick(pooled.source, pruned.source),
    )
