"""The token set that flows through a reduced ViT, and the two moves every reducer is made of.

Reducers are pure functions from `Tokens` to fewer `Tokens`. Each one picks indices and weights,
then uses `take` (keep some tokens as they are) and `combine` (weighted sums of groups of tokens);
both carry sizes, and sources when tracked, so every reducer gets them right for free.
Indices passed to reducers address non-prefix tokens only: prefix tokens are never reduced.
"""

from __future__ import annotations

from dataclasses import dataclass, field

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
    # attn_bias results by (prop_attn, dtype), shared by the copies `replace` makes while sizes
    # and padding stay the same, so blocks that do not reduce reuse their input's bias
    _biases: dict = field(default_factory=dict, repr=False, compare=False)

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
        """A copy with some of x, size, prefix, valid, source changed (called in every block, so
        built directly rather than through dataclasses.replace)."""
        unknown = changes.keys() - _FIELDS
        if unknown:
            raise TypeError(f"Tokens.replace: unknown field(s) {sorted(unknown)}")
        same_keys = "size" not in changes and "valid" not in changes
        return Tokens(x=changes.get("x", self.x), size=changes.get("size", self.size),
                      prefix=changes.get("prefix", self.prefix), valid=changes.get("valid", self.valid),
                      source=changes.get("source", self.source), _biases=self._biases if same_keys else {})

    def attn_bias(self, prop_attn: bool) -> Tensor | None:
        """Additive key bias [B, 1, 1, N]: log(size) with proportional attention, -inf on padding."""
        if not prop_attn and self.valid is None:
            return None
        key = (prop_attn, self.x.dtype)
        bias = self._biases.get(key)
        if bias is None:
            bias = self.size.log() if prop_attn else torch.zeros_like(self.size)
            if self.valid is not None:
                bias = bias.masked_fill(~self.valid, float("-inf"))
            if bias.dtype != self.x.dtype:
                bias = bias.to(self.x.dtype)
            bias = self._biases[key] = bias.reshape(bias.shape[0], 1, 1, bias.shape[1])
        return bias

    def map_tensors(self, fn) -> "Tokens":
        """Apply fn to every per-token tensor (x, size, valid, source)."""
        return self.replace(**{
            name: fn(getattr(self, name))
            for name in ("x", "size", "valid", "source")
            if getattr(self, name) is not None
        })


_FIELDS = frozenset({"x", "size", "prefix", "valid", "source"})


def gather_tokens(tensor: Tensor, index: Tensor, offset: int = 0) -> Tensor:
    """tensor[b, offset + index[b, i], ...] for a [B, N, ...] tensor and [B, K] index."""
    return _select_rows(tensor, _flat_rows(index, tensor.shape[1], offset), index.shape)


# Selecting and adding whole rows (index_select, index_add_) over the batch flattened is many times
# faster on a CPU than gather / scatter_add_ with an index expanded over the channels, which read
# an index per element; index_add_ sums in member order, as scatter_add_ does. One image needs no
# flattening, so batch 1 runs fewer operations.

def _flat_rows(index: Tensor, count: int, offset: int = 0) -> Tensor:
    """Row of each token of index [B, K] (+ offset) in its [B, count] tensor, flattened; for one
    image, just its positions."""
    batch = index.shape[0]
    if batch == 1:
        return index[0] + offset if offset else index[0]
    starts = torch.arange(offset, batch * count, count, device=index.device)
    return (index + starts.unsqueeze(1)).reshape(-1)


def _select_rows(tensor: Tensor, rows: Tensor, index_shape: torch.Size) -> Tensor:
    batch, count = tensor.shape[:2]
    if batch == 1:
        return tensor.index_select(1, rows)
    picked = tensor.reshape((batch * count,) + tensor.shape[2:]).index_select(0, rows)
    return picked.reshape(index_shape + tensor.shape[2:])


def _add_rows(values: Tensor, rows: Tensor, groups: int) -> Tensor:
    """[B, groups, ...] sums of the [B, M, ...] values at rows (from `_flat_rows`)."""
    batch, tail = values.shape[0], values.shape[2:]
    if batch == 1:
        return values.new_zeros((1, groups) + tail).index_add_(1, rows, values)
    out = values.new_zeros((batch * groups,) + tail).index_add_(0, rows, values.reshape((-1,) + tail))
    return out.reshape((batch, groups) + tail)


def prefix_of(tokens: Tokens) -> Tokens:
    """Just the prefix tokens."""
    p = tokens.prefix
    return tokens.map_tensors(lambda t: t[:, :p])


def take(tokens: Tokens, index: Tensor) -> Tokens:
    """The non-prefix tokens at `index` [B, K], unchanged (a prefix-free part)."""
    rows = _flat_rows(index, tokens.x.shape[1], tokens.prefix)

    def pick(tensor: Tensor | None) -> Tensor | None:
        return None if tensor is None else _select_rows(tensor, rows, index.shape)

    return Tokens(x=pick(tokens.x), size=pick(tokens.size), prefix=0, valid=pick(tokens.valid),
                  source=pick(tokens.source))


def combine(
    tokens: Tokens,
    index: Tensor,
    group: Tensor,
    weight: Tensor | None,
    groups: int,
    normalize: bool,
) -> Tokens:
    """New tokens, one per group: sum of weight * x over the members, divided by the summed weight
    when `normalize`. Members are the non-prefix tokens at `index` [B, M]; `group` [B, M] says
    which of the `groups` outputs each joins; weight None weighs each by its size (the summed
    sizes are then the divisor too). Sizes and sources add up."""
    members = _flat_rows(index, tokens.x.shape[1], tokens.prefix)
    targets = _flat_rows(group, groups)

    def pool(values: Tensor) -> Tensor:
        return _add_rows(values, targets, groups)

    x = _select_rows(tokens.x, members, index.shape)
    member_size = _select_rows(tokens.size, members, index.shape)
    w = member_size if weight is None else weight
    w = w if w.dtype == x.dtype else w.to(x.dtype)
    pooled = pool(x * w.unsqueeze(-1))
    size = pool(member_size)
    if normalize:
        total = size if w is member_size else pool(w)
        pooled = pooled / total.clamp_min(torch.finfo(w.dtype).tiny).unsqueeze(-1)
    source = None
    if tokens.source is not None:
        source = pool(_select_rows(tokens.source, members, index.shape))
    return Tokens(x=pooled, size=size, prefix=0, source=source)


def every_other(tokens: Tokens, start: int) -> Tokens:
    """The non-prefix tokens at positions start, start + 2, ... (views, no copy), prefix-free."""
    begin = tokens.prefix + start

    def stride(tensor: Tensor | None) -> Tensor | None:
        return None if tensor is None else tensor[:, begin::2]

    return Tokens(x=stride(tokens.x), size=stride(tokens.size), prefix=0, valid=stride(tokens.valid),
                  source=stride(tokens.source))


def absorb(into: Tokens, members: Tokens, group: Tensor) -> Tokens:
    """Each of the prefix-free `into` tokens averaged, by size, with the `members` (prefix-free,
    [B, M]) that `group` [B, M] assigns to it; sizes and sources add. The same sums, in the same
    order, as `combine` over the `into` tokens followed by the members, with fewer operations
    (the `into` tokens are not gathered: they seed the sums)."""
    rows = _flat_rows(group, into.x.shape[1])
    into_weight, member_weight = (t.size if t.size.dtype == t.x.dtype else t.size.to(t.x.dtype) for t in (into, members))
    pooled = _add_rows_to(into.x * into_weight.unsqueeze(-1), rows, members.x * member_weight.unsqueeze(-1))
    size = _add_rows_to(into.size.clone(), rows, members.size)
    total = size if into_weight is into.size else _add_rows_to(into_weight.clone(), rows, member_weight)
    pooled = pooled / total.clamp_min(torch.finfo(total.dtype).tiny).unsqueeze(-1)
    source = None if into.source is None else _add_rows_to(into.source.clone(), rows, members.source)
    return Tokens(x=pooled, size=size, prefix=0, source=source)


def _add_rows_to(base: Tensor, rows: Tensor, values: Tensor) -> Tensor:
    """`base` [B, G, ...] (a fresh tensor: it is written) plus the [B, M, ...] values added at rows
    (from `_flat_rows`), in member order."""
    batch, groups, tail = base.shape[0], base.shape[1], base.shape[2:]
    if batch == 1:
        return base.index_add_(1, rows, values)
    flat = base.reshape((batch * groups,) + tail).index_add_(0, rows, values.reshape((-1,) + tail))
    return flat.reshape((batch, groups) + tail)


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
