"""SaiT (2022): prune once, by token importance; value-based (fixed keep) or mass-based
(per image: the fewest tokens holding a given share of the importance)."""

from __future__ import annotations

import torch
from torch import Tensor

from .tokens import Tokens, concat, prefix_of, split_top, take


def sait(tokens: Tokens, scores: Tensor, keep: int) -> Tokens:
    """Keep the `keep` highest-scored non-prefix tokens, in position order."""
    if keep >= tokens.count:
        return tokens
    kept, _ = split_top(scores, keep)
    return concat(prefix_of(tokens), take(tokens, kept))


def sait_mass(tokens: Tokens, scores: Tensor, mass: float) -> Tokens:
    """Keep, per image, the fewest highest-scored tokens whose scores (summing to 1) reach `mass`.

    Counts differ per image, so the batch is padded to its largest count: kept tokens come first
    in descending score order and `valid` marks them; later blocks mask the padding as keys, so
    each image's output equals its output when run alone."""
    ranked, order = scores.sort(dim=1, descending=True)
    counts = mass_counts(ranked, mass)
    longest = int(counts.max())
    kept = concat(prefix_of(tokens), take(tokens, order[:, :longest]))
    slots = torch.arange(longest, device=scores.device)
    valid_body = slots.unsqueeze(0) < counts.unsqueeze(1)
    prefix_valid = valid_body.new_ones(valid_body.shape[0], tokens.prefix)
    return kept.replace(valid=torch.cat([prefix_valid, valid_body], dim=1))


def mass_counts(ranked: Tensor, mass: float) -> Tensor:
    """Per image, how many of its scores (sorted in descending order) reach `mass`."""
    return ((ranked.cumsum(dim=1) < mass).sum(dim=1) + 1).clamp(max=ranked.shape[1])
