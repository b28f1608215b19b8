"""ToMe (Bolya et al., ICLR'23): bipartite soft matching, merging by size-weighted average."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from .tokens import Tokens, combine, concat, prefix_of, take


def tome(tokens: Tokens, metric: Tensor, r: int) -> Tokens:
    """Merge r non-prefix tokens away.

    Tokens alternate between set A (even positions, counting prefix tokens, so A holds CLS) and
    set B (odd). Each non-prefix A token finds its most similar B token under `metric` [B, n, d]
    (cosine); the r best-matched A tokens are averaged into their B tokens, weighted by size.
    Output: prefix, unmerged A tokens, then all B tokens, each group in position order.
    """
    n = tokens.count
    r = min(r, n // 2)
    if r <= 0:
        return tokens
    first_a = tokens.prefix % 2  # non-prefix index of the first token at an even position
    a_pos = torch.arange(first_a, n, 2, device=metric.device)
    b_pos = torch.arange(1 - first_a, n, 2, device=metric.device)
    metric = F.normalize(metric, dim=-1)
    # strided views, not copies: A and B alternate
    similarity = metric[:, first_a::2] @ metric[:, 1 - first_a::2].transpose(1, 2)
    best, best_b = similarity.max(dim=-1)
    order = best.argsort(dim=1, descending=True)
    merged_a, unmerged_a = order[:, :r], order[:, r:].sort(dim=1).values
    batch = metric.shape[0]
    b_index = b_pos.expand(batch, -1)
    members = torch.cat([b_index, a_pos[merged_a]], dim=1)
    group = torch.cat([torch.arange(len(b_pos), device=metric.device).expand(batch, -1),
                       best_b.gather(1, merged_a)], dim=1)
    b_tokens = combine(tokens, members, group, None, len(b_pos), normalize=True)  # size-weighted
    return concat(prefix_of(tokens), take(tokens, a_pos[unmerged_a]), b_tokens)
