"""ToMe (Bolya et al., ICLR'23): bipartite soft matching, merging by size-weighted average."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from .tokens import Tokens, absorb, concat, every_other, prefix_of, take


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
    metric = F.normalize(metric, dim=-1)
    # strided views, not copies: A and B alternate
    similarity = metric[:, first_a::2] @ metric[:, 1 - first_a::2].transpose(1, 2)
    best, best_b = similarity.max(dim=-1)
    order = best.argsort(dim=1, descending=True)
    merged_a, unmerged_a = order[:, :r], order[:, r:].sort(dim=1).values
    # an A token's non-prefix index is 2 * (its index in A) + first_a; every B token absorbs the
    # A tokens merged into it (in the order of their match, as the sums are taken), by size
    merged = take(tokens, merged_a * 2 + first_a)
    b_tokens = absorb(every_other(tokens, 1 - first_a), merged, best_b.gather(1, merged_a))
    return concat(prefix_of(tokens), take(tokens, unmerged_a * 2 + first_a), b_tokens)
