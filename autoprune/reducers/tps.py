"""eTPS (Wei et al., CVPR'23, parameter-free variant): prune as EViT, squeeze pruned tokens into
their most similar kept token."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from .tokens import Tokens, combine, concat, gather_tokens, prefix_of, split_top


def tps(tokens: Tokens, scores: Tensor, keep: int, temperature: float) -> Tokens:
    """Keep the `keep` top-scored tokens. Each pruned token p picks as host h the kept token of
    highest cosine similarity; each host becomes
    (exp(1/T) * x_h + sum_p exp(cos(p, h) / T) * x_p) / (exp(1/T) + sum_p exp(cos(p, h) / T)),
    a softmax at temperature T over the host (its similarity to itself is 1) and its guests.
    (The published code weights the host by e at every T, which only agrees at T = 1.) The
    weights are computed shifted by -1/T, which leaves the result unchanged and cannot overflow."""
    if keep >= tokens.count:
        return tokens
    kept, pruned = split_top(scores, keep)
    body = tokens.body(tokens.x)
    kept_x = F.normalize(gather_tokens(body, kept), dim=-1)
    pruned_x = F.normalize(gather_tokens(body, pruned), dim=-1)
    cosine, host = (pruned_x @ kept_x.transpose(1, 2)).max(dim=-1)
    batch = kept.shape[0]
    members = torch.cat([kept, pruned], dim=1)
    group = torch.cat([torch.arange(keep, device=kept.device).expand(batch, -1), host], dim=1)
    weight = torch.cat([torch.ones(kept.shape, device=kept.device, dtype=cosine.dtype),
                        ((cosine - 1) / temperature).exp()], dim=1)
    return concat(prefix_of(tokens), combine(tokens, members, group, weight, keep, normalize=True))
