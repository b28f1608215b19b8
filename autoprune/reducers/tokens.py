"""The token set that flows through a reduced ViT, and the two moves every reducer is made of.

Reducers are pure functions from `Tokens` to fewer `Tokens`. Each one picks indices and weights,
then uses `take` (keep some tokens as they are) and `combine` (weighted sums of groups of tokens);
both carry sizes, and sources when tracked, so every reducer gets them right for free.
Indices passed to reducers address non-prefix tokens only: prefix tokens are never reduced.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass(frozen=True)
class Tokens:
    """Tokens [B, N, C] with the first `prefix` of them fixed (CLS, distillation, registers).

    size:   [B, N] how many patches each token stands for (1 until something merges).
    valid:  [B, N] bool, False for padding; only adaptive reducers (mass-based sait) create it.
    source: [B, N, P] optional, how much of each of the P patches a token holds (for maps).
    """

    x: Tensor
    size: Tensor
    prefix: int
    valid: Tensor | None = None
    source: Tensor | None = None

    @classmethod
    def start(cls, x: Tensor, prefix: int, track_source: bool = False) -> "Tokens":
        batch, count, _ = x.shape
        size = x.new_ones(batch, count, dtype=torch.float32)
        source = None
        if track_source:
            patches = count - prefix
            eye = torch.eye(patches, device=x.device, dtype=torch.float32)
            source = torch.cat([eye.new_zeros(prefix, patches), eye]).expand(batch, -1, -1)
        return cls(x=x, size=size, prefix=prefix, source=source)

    @property
    def count(self) -> int:
        """Non-prefix tokens (padding included); a plain int, also while tracing."""
        return int(self.x.shape[1]) - self.prefix

    def body(self, tensor: Tensor) -> Tensor:
        """The non-prefix part of a per-token tensor."""
        return tensor[:, self.prefix:]

    def replace(self, **changes) -> "Tokens":
        return dataclasses.replace(self, **changes)

    def attn_bias(self, prop_attn: bool) -> Tensor | None:
        """Additive key bias [B, 1, 1, N]: log(size) with proportional attention, -inf on padding."""
        if not prop_attn and self.valid is None:
            return None
        bias = self.size.log() if prop_attn else torch.zeros_like(self.size)
        if self.valid is not None:
            bias = bias.masked_fill(~self.valid, float("-inf"))
        return bias.to(self.x.dtype)[:, None, None, :]

    def map_tensors(self, fn) -> "Tokens":
        """Apply fn to every per-token tensor (x, size, valid, source)."""
        return self.replace(**{
            name: fn(getattr(self, name))
            for name in ("x", "size", "valid", "source")
            if getattr(self, name) is not None
        })


def gather_tokens(tensor: Tensor, index: Tensor) -> Tensor:
    """tensor[b, index[b, i], ...] for a [B, N, ...] tensor and [B, K] index."""
    shape = index.shape + tensor.shape[2:]
    expanded = index.reshape(index.shape + (1,) * (tensor.dim() - 2)).expand(shape)
    return tensor.gather(1, expanded)


def prefix_of(tokens: Tokens) -> Tokens:
    """Just the prefix tokens."""
    p = tokens.prefix
    return tokens.map_tensors(lambda t: t[:, :p])


def take(tokens: Tokens, index: Tensor) -> Tokens:
    """The non-prefix tokens at `index` [B, K], unchanged (a prefix-free part)."""
    part = tokens.map_tensors(lambda t: gather_tokens(tokens.body(t), index))
    return part.replace(prefix=0)


def combine(
    tokens: Tokens,
    index: Tensor,
    group: Tensor,
    weight: Tensor,
    groups: int,
    normalize: bool,
) -> Tokens:
    """New tokens, one per group: sum of weight * x over the members, divided by the summed weight
    when `normalize`. Members are the non-prefix tokens at `index` [B, M]; `group` [B, M] says
    which of the `groups` outputs each joins. Sizes and sources add up."""
    def scatter(values: Tensor) -> Tensor:
        out = values.new_zeros((values.shape[0], groups) + values.shape[2:])
        return out.scatter_add_(1, group.reshape(group.shape + (1,) * (values.dim() - 2)).expand_as(values), values)

    x = gather_tokens(tokens.body(tokens.x), index)
    w = weight.to(x.dtype)
    pooled = scatter(x * w.unsqueeze(-1))
    if normalize:
        pooled = pooled / scatter(w).clamp_min(torch.finfo(w.dtype).tiny).unsqueeze(-1)
    size = scatter(gather_tokens(tokens.body(tokens.size), index))
    source = None
    if tokens.source is not None:
        source = scatter(gather_tokens(tokens.body(tokens.source), index))
    return Tokens(x=pooled, size=size, prefix=0, source=source)


def concat(first: Tokens, *rest: Tokens) -> Tokens:
    """Tokens of `first` (which keeps its prefix) followed by prefix-free parts."""
    parts = (first,) + rest
    return first.replace(
        x=torch.cat([p.x for p in parts], 1),
        size=torch.cat([p.size for p in parts], 1),
        source=None if first.source is None else torch.cat([p.source for p in parts], 1),
    )


def split_top(scores: Tensor, keep: int) -> tuple[Tensor, Tensor]:
    """(indices of the `keep` highest scores in position order, the other indices by score)."""
    order = scores.argsort(dim=1, descending=True)
    kept = order[:, :keep].sort(dim=1).values
    return kept, order[:, keep:]
