"""Token importance scores from one block's attention (definitions in reducers.md).

Inputs are the block's per-head q, k, v [B, H, N, d] (after qk-norm), the additive key bias
[B, 1, 1, N] or None, and the full attention probabilities [B, H, N, N] for the scores that need
them (`NEEDS_PROBS`). Every score is returned for the non-prefix tokens only, [B, N - prefix].
`cls`, `cls_vnorm` and `mean` need a class token at position 0.
"""

from __future__ import annotations

from torch import Tensor

NEEDS_PROBS = frozenset({"tis", "entropy", "mean"})
_EPS = 1e-12


def cls_attention(q: Tensor, k: Tensor, scale: float, bias: Tensor | None) -> Tensor:
    """Attention of the CLS query (token 0) to every token, per head: [B, H, N].

    Costs H * N * d multiply-adds, so reducing blocks can keep fused attention for their output."""
    logits = (q[:, :, :1] * scale) @ k.transpose(-2, -1)
    if bias is not None:
        logits = logits + bias
    return logits.softmax(dim=-1).squeeze(2)


def value_norm(v: Tensor) -> Tensor:
    """||v_j||_2 over all heads' values concatenated: [B, N]."""
    return v.square().sum(dim=(1, 3)).sqrt()


def _normalized(scores: Tensor) -> Tensor:
    return scores / scores.sum(dim=1, keepdim=True).clamp_min(_EPS)


def token_scores(
    kind: str,
    prefix: int,
    q: Tensor,
    k: Tensor,
    v: Tensor,
    scale: float,
    bias: Tensor | None,
    probs: Tensor | None,
) -> Tensor:
    """Score `kind` (cls, cls_vnorm, tis, entropy, mean) of the non-prefix tokens."""
    if kind == "cls":
        return cls_attention(q, k, scale, bias).mean(dim=1)[:, prefix:]
    if kind == "cls_vnorm":
        scores = cls_attention(q, k, scale, bias).sum(dim=1) * value_norm(v)
        return _normalized(scores[:, prefix:])
    if kind == "tis":
        # SaiT's Eq. 1 normalises over every token, CLS included: the patch tokens' scores sum
        # to less than 1, and the rest is the prefix tokens' share (which mass-based sait counts)
        return _normalized(probs.sum(dim=(1, 2)))[:, prefix:]
    if kind == "mean":
        # the thesis's formula: how much token j, as the query, attends to the CLS key (token 0)
        return _normalized(probs[:, :, prefix:, 0].mean(dim=1))
    if kind == "entropy":
        row_entropy = -(probs * (probs + _EPS).log()).sum(dim=-1).mean(dim=1)
        return _normalized((row_entropy * value_norm(v))[:, prefix:])
    raise ValueError(f"unknown score {kind!r}")
