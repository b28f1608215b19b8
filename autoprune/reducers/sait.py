"""SaiT (2022): prune once, by token importance; value-based (fixed keep) or mass-based
(per image: the fewest tokens holding a given share of the importance).

The model runs SaiT's block P entirely dense and prunes as tokens leave it (patch.py); these
functions only choose the tokens."""

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
    """Keep, per image, the fewest highest-scored tokens that bring the kept share of the
    importance to `mass` (at least one token; `mass` 1 keeps every token).

    `scores` are shares of the importance of all tokens, prefix tokens included (SaiT's Eq. 1;
    reducers.md): what the non-prefix scores leave of 1 is the prefix tokens' share. Prefix
    tokens are always kept, so their share counts toward the mass from the start. The paper
    notes that the mass concentrates in CLS and reports M 0.7 <-> mean density 0.42 on DeiT-S,
    which only fits when CLS's share counts. Scores normalised over the non-prefix tokens
    alone (cls_vnorm, entropy, mean) leave the prefix no share.

    Counts differ per image, so the batch is padded to its largest count: kept tokens come first
    in descending score order and `valid` marks them; later blocks mask the padding as keys, so
    each image's output equals its output when run alone."""
    if mass >= 1:
        return tokens
    ranked, order = scores.sort(dim=1, descending=True)
    counts = mass_counts(ranked, mass)
    longest = int(counts.max())
    kept = concat(prefix_of(tokens), take(tokens, order[:, :longest]))
    slots = torch.arange(longest, device=scores.device)
    valid_body = slots.unsqueeze(0) < counts.unsqueeze(1)
    prefix_valid = valid_body.new_ones(valid_body.shape[0], tokens.prefix)
    return kept.replace(valid=torch.cat([prefix_valid, valid_body], dim=1))


def mass_counts(ranked: Tensor, mass: float) -> Tensor:
    """Per image, how many of its non-prefix scores (sorted in descending order; shares of all
    tokens' importance) bring the kept share, the prefix tokens' share included, to `mass`."""
    prefix_share = (1 - ranked.sum(dim=1, keepdim=True)).clamp_min(0)
    kept_mass = prefix_share + ranked.cumsum(dim=1)
    return ((kept_mass < mass).sum(dim=1) + 1).clamp(max=ranked.shape[1])
