"""BAT (Long et al., CVPR'23): keep the attentive tokens (merging near-duplicate pairs among them)
and summarise the inattentive ones by density-peak clustering.

Every step is a fixed-shape tensor operation (comparisons, gathers, masks; loops only over the
configured pair count), so the reducer traces and exports; ties are broken by position, so
equal inputs always give equal outputs.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from .tokens import Tokens, combine, concat, gather_tokens, prefix_of, split_top, take


def bat(tokens: Tokens, scores: Tensor, keep: int, clusters: int, knn: int, pairs: int) -> Tokens:
    """Keep the `keep` top-scored tokens and merge the `pairs` most similar disjoint pairs among
    them (`merge_attentive_pairs`); the others become `clusters` tokens (`density_peak_clusters`
    with `knn`), each the sum of its members weighted by their scores normalised within the
    cluster. Output: prefix, attentive tokens in position order, cluster tokens. Counts must fit
    (`schedule.bat_counts` caps them)."""
    if keep >= tokens.count:
        return tokens
    kept, rest = split_top(scores, keep)
    assign = density_peak_clusters(gather_tokens(tokens.body(tokens.x), rest), clusters, knn)
    summary = combine(tokens, rest, assign, scores.gather(1, rest), clusters, normalize=True)
    attentive = merge_attentive_pairs(take(tokens, kept), scores.gather(1, kept), pairs)
    return concat(prefix_of(tokens), attentive, summary)


def merge_attentive_pairs(attentive: Tokens, scores: Tensor, pairs: int) -> Tokens:
    """Merge the `pairs` (at most K // 2) most similar disjoint pairs of a prefix-free token set
    [B, K, C].

    Similarity is the cosine between the tokens' features. Pairs are taken greedily: the most
    similar pair of still-unpaired tokens, `pairs` times (ties: the first in row-major order), so
    no token merges twice, unlike bipartite matching where several tokens can land on one. A pair
    becomes one token at the earlier member's position: the members' sum weighted by their
    attention scores, normalised over the pair; sizes and sources add. Unpaired tokens are
    returned exactly as they were."""
    count = attentive.x.shape[1]
    if pairs <= 0:
        return attentive
    features = F.normalize(attentive.x.float(), dim=-1)
    similarity = features @ features.transpose(1, 2)
    positions = torch.arange(count, device=similarity.device)
    unavailable = (positions[:, None] == positions[None, :]).expand_as(similarity)
    root = positions.expand(similarity.shape[0], -1)  # the token each one merges into
    for _ in range(pairs):
        best = similarity.masked_fill(unavailable, float("-inf")).flatten(1).argmax(dim=1)
        first, second = best // count, best % count
        early, late = torch.minimum(first, second), torch.maximum(first, second)
        root = root.scatter(1, late[:, None], early[:, None])
        used = (positions == first[:, None]) | (positions == second[:, None])
        unavailable = unavailable | used[:, :, None] | used[:, None, :]
    group = ((root == positions).cumsum(dim=1) - 1).gather(1, root)
    members = torch.zeros_like(root).scatter_add(1, root, torch.ones_like(root)).gather(1, root)
    weight = torch.where(members > 1, scores, torch.ones_like(scores))  # unpaired: x * 1 / 1 = x exactly
    return combine(attentive, positions.expand_as(root), group, weight, count - pairs, normalize=True)


def density_peak_clusters(x: Tensor, clusters: int, knn: int) -> Tensor:
    """Cluster id in [0, clusters) of each of the m tokens in x [B, m, C] (DPC-kNN).

    Distances are Euclidean divided by sqrt(C), as DPC-kNN does for token features. The local
    density is rho_i = exp(-mean squared distance to the knn nearest), kept as its logarithm:
    at real feature norms exp() underflows to 0 for every token and all densities tie. delta_i is
    the distance to the nearest denser token (the largest distance for the densest). The
    `clusters` tokens of highest rho * delta (ranked as log rho + log delta) are the centres; the
    densest token always is one. Each other token joins its nearest centre of higher density
    (BAT's rule; it needs no chaining through non-centre tokens, and the densest centre is
    denser than every other token, so there always is one); a centre heads its own cluster.
    Ties in density and in rank go to the earlier token, so the result is deterministic."""
    m = x.shape[1]
    x = x.float()
    distance = _pairwise_distance(x) / math.sqrt(x.shape[-1])
    neighbours = min(knn, m - 1)
    if neighbours > 0:
        nearest = distance.topk(neighbours + 1, dim=-1, largest=False).values[..., 1:]
        log_density = -nearest.square().mean(dim=-1)
    else:
        log_density = distance.new_zeros(distance.shape[:2])
    rank = _rank(log_density)  # 0 = densest
    denser = rank.unsqueeze(1) < rank.unsqueeze(2)  # [b, i, j]: token j is denser than token i
    delta = distance.masked_fill(~denser, float("inf")).min(dim=-1).values
    delta = torch.where(rank == 0, distance.max(dim=-1).values, delta)
    centre_score = torch.where(rank == 0, float("inf"), log_density + delta.log())
    centres = _descending_order(centre_score)[:, :clusters]
    to_centre = gather_tokens(distance.transpose(1, 2), centres).transpose(1, 2)  # [b, i, c]
    centre_denser = gather_tokens(denser.transpose(1, 2), centres).transpose(1, 2)
    assign = to_centre.masked_fill(~centre_denser, float("inf")).argmin(dim=-1)
    ids = torch.arange(clusters, device=x.device).expand_as(centres)
    return assign.scatter(1, centres, ids)


def _pairwise_distance(x: Tensor) -> Tensor:
    """Euclidean distances between the tokens of x [B, m, C] through one matmul, as torch.cdist
    computes them at these sizes, written out because cdist has no ONNX export. The diagonal is
    exactly 0 (cancellation would leave it slightly positive), so a token is its own nearest."""
    squared = x.square().sum(dim=-1)
    gram = x @ x.transpose(1, 2)
    distance_sq = (squared.unsqueeze(2) + squared.unsqueeze(1) - 2 * gram).clamp_min(0)
    self_pairs = torch.eye(x.shape[1], dtype=torch.bool, device=x.device)
    return distance_sq.masked_fill(self_pairs, 0).sqrt()


def _rank(values: Tensor) -> Tensor:
    """Position of each entry in descending order along dim 1, ties to the earlier entry.

    Counted by pairwise comparison (the entries above it, and the equal ones before it) rather
    than by a stable sort, which ONNX lacks; m is the few dozen tokens a BAT layer clusters."""
    m = values.shape[1]
    positions = torch.arange(m, device=values.device)
    earlier = positions[None, :] < positions[:, None]  # [i, j]: j comes before i
    above = values.unsqueeze(1) > values.unsqueeze(2)  # [b, i, j]: v_j > v_i
    tied_before = (values.unsqueeze(1) == values.unsqueeze(2)) & earlier
    return (above | tied_before).sum(dim=-1)


def _descending_order(values: Tensor) -> Tensor:
    """Indices that sort dim 1 descending, ties to the earlier entry: the inverse of `_rank`."""
    rank = _rank(values)
    positions = torch.arange(values.shape[1], device=values.device).expand_as(rank)
    return torch.empty_like(rank).scatter(1, rank, positions)
