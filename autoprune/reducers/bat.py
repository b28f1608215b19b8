"""BAT (Long et al., CVPR'23): keep attentive tokens (merging near-duplicate pairs among them)
and summarise the inattentive ones by density-peak clustering."""

from __future__ import annotations

import torch
from torch import Tensor

from .tokens import Tokens, combine, concat, gather_tokens, prefix_of, split_top, take
from .tome import tome


def bat(
    tokens: Tokens, scores: Tensor, metric: Tensor, keep: int, clusters: int, knn: int, pairs: int
) -> Tokens:
    """Keep the `keep` top-scored tokens, merging `pairs` of them by bipartite matching on `metric`
    (as ToMe); the others become `clusters` tokens (`density_peak_clusters` with `knn`), each the
    sum of its members weighted by their scores normalised within the cluster. Counts must fit
    (`schedule.bat_counts` caps them)."""
    if keep >= tokens.count:
        return tokens
    kept, rest = split_top(scores, keep)
    assign = density_peak_clusters(gather_tokens(tokens.body(tokens.x), rest), clusters, knn)
    summary = combine(tokens, rest, assign, scores.gather(1, rest), clusters, normalize=True)
    attentive = concat(prefix_of(tokens), take(tokens, kept))
    attentive = tome(attentive, gather_tokens(metric, kept), pairs)
    return concat(attentive, summary)


def density_peak_clusters(x: Tensor, clusters: int, knn: int) -> Tensor:
    """Cluster id in [0, clusters) of each of the m tokens in x [B, m, C] (DPC-kNN).

    Density rho_i = exp(-mean squared distance to the knn nearest); delta_i = distance to the
    nearest denser token (the largest distance for the densest); the `clusters` tokens of highest
    rho * delta are centres and every token joins its nearest centre."""
    distance = torch.cdist(x.float(), x.float())
    m = x.shape[1]
    neighbours = min(knn, m - 1)
    if neighbours > 0:
        nearest = distance.topk(neighbours + 1, dim=-1, largest=False).values[..., 1:]
        density = (-nearest.square().mean(dim=-1)).exp()
    else:
        density = distance.new_ones(distance.shape[:2])
    denser = density.unsqueeze(1) > density.unsqueeze(2)  # [b, i, j]: j is denser than i
    delta = distance.masked_fill(~denser, float("inf")).min(dim=-1).values
    delta = torch.where(torch.isinf(delta), distance.max(dim=-1).values, delta)
    centres = (density * delta).topk(clusters, dim=-1).indices
    assign = gather_tokens(distance, centres).argmin(dim=1)
    ids = torch.arange(clusters, device=x.device).expand_as(centres)
    return assign.scatter(1, centres, ids)  # a centre always joins its own cluster
