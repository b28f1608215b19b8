"""EViT (Liang et al., ICLR'22): keep the top-scored tokens, optionally fuse the rest into one."""

from __future__ import annotations

import torch
from torch import Tensor

from .tokens import Tokens, combine, concat, prefix_of, split_top, take


def evit(tokens: Tokens, scores: Tensor, keep: int, fuse: bool) -> Tokens:
    """Keep the `keep` highest-scored non-prefix tokens (in position order). With `fuse`, the
    others become one extra token, their sum weighted by their raw (not renormalised) scores."""
    if keep >= tokens.count:
        return tokens
    kept, pruned = split_top(scores, keep)
    parts = [take(tokens, kept)]
    if fuse:
        one_group = torch.zeros_like(pruned)
        parts.append(combine(tokens, pruned, one_group, scores.gather(1, pruned), 1, normalize=False))
    return concat(prefix_of(tokens), *parts)
