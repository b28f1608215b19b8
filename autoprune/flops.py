"""FLOPs per image in the papers' convention (fvcore: one multiply-add = one FLOP, batch 1).

`count_flops` measures a (patched) model with fvcore, counting fused attention, which fvcore
skips, and leaving out the reducers' own bookkeeping (sorts, similarities), as the papers do.
`predict_flops` gives the same figure in closed form from the model's shapes and the token
schedule, cheaply enough to screen thousands of candidate configs.
"""

from __future__ import annotations

import math
import warnings
import weakref
from dataclasses import dataclass

import torch
from timm.models.vision_transformer import VisionTransformer
from torch import Tensor, nn

from .config import ConfigError, PruneConfig
from .patch import TokenReducer
from .schedule import block_token_counts

with warnings.catch_warnings():
    # fvcore scripts a loss function at import time, which current torch flags as deprecated
    warnings.simplefilter("ignore", FutureWarning)
    from fvcore.nn import FlopCountAnalysis
    from fvcore.nn.jit_handles import get_shape


def _sdpa_flops(inputs, outputs) -> int:
    """q @ k^T and probs @ v: 2 * B * H * Nq * Nk * d multiply-adds."""
    q, k = get_shape(inputs[0]), get_shape(inputs[1])
    return 2 * math.prod(q[:-1]) * k[-2] * q[-1]


def _trace_flops(model: nn.Module, image: Tensor) -> int:
    analysis = (
        FlopCountAnalysis(model, image)
        .set_op_handle("aten::scaled_dot_product_attention", _sdpa_flops)
        .unsupported_ops_warnings(False)
        .uncalled_modules_warnings(False)
    )
    with warnings.catch_warnings():
        # token counts become Python ints in the trace: right for the one image traced
        warnings.simplefilter("ignore", torch.jit.TracerWarning)
        by_module = analysis.by_module()
    reducer_flops = sum(by_module.get(name, 0) for name, module in model.named_modules()
                        if isinstance(module, TokenReducer))
    return analysis.total() - reducer_flops


def count_flops(model: nn.Module, images: Tensor | None = None, per_image: bool = False):
    """FLOPs per image of `model`, measured.

    Fixed-schedule models need no data (a blank image of the model's input size is traced).
    Adaptive ones (mass-based sait) need `images` [B, C, H, W]: the mean over them is returned,
    or with `per_image=True` the list of per-image figures (for the spread)."""
    cfg = getattr(model, "prune_config", None)
    adaptive = cfg is not None and cfg.adaptive
    if images is None:
        if adaptive:
            raise ConfigError("count_flops: mass-based sait keeps a different number of tokens per "
                              "image; pass images=<a batch of real inputs>")
        images = torch.zeros((1,) + _input_shape(model), device=_device(model))
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            if adaptive:
                figures = _adaptive_flops(model, images)
            else:
                figures = [_trace_flops(model, images[:1])] * len(images)
    finally:
        model.train(was_training)
    return figures if per_image else sum(figures) / len(figures)


def _adaptive_flops(model: nn.Module, images: Tensor) -> list[int]:
    """Per-image FLOPs, tracing one image per distinct token schedule (exact, and fast)."""
    kept: dict[str, Tensor] = {}
    hooks = [module.register_forward_hook(
                 lambda mod, args, out, name=name: kept.__setitem__(name, _token_counts(out)))
             for name, module in model.named_modules() if isinstance(module, TokenReducer)]
    try:
        schedules = []
        for start in range(0, len(images), 64):
            model(images[start:start + 64])
            counts = torch.stack([kept[name] for name in sorted(kept)], dim=1)
            schedules.extend(tuple(row) for row in counts.tolist())
    finally:
        for hook in hooks:
            hook.remove()
    flops_of: dict[tuple, int] = {}
    for index, schedule in enumerate(schedules):
        if schedule not in flops_of:
            flops_of[schedule] = _trace_flops(model, images[index:index + 1])
    return [flops_of[schedule] for schedule in schedules]


def _token_counts(tokens) -> Tensor:
    if tokens.valid is None:
        return torch.full((tokens.x.shape[0],), tokens.x.shape[1], device=tokens.x.device)
    return tokens.valid.sum(dim=1)


# -- closed form ---------------------------------------------------------------------------------

@dataclass(frozen=True)
class CostProfile:
    """Multiply-adds of a ViT as a function of token counts, read off its modules once."""

    depth: int
    patches: int
    prefix: int
    fixed: int                      # patch embedding, pooled-feature norm, heads
    per_token_start: int            # norms before the blocks (norm_pre)
    attn_token: tuple[int, ...]     # per block: norm1, qkv, qk-norm, proj ... per token
    attn_pair: tuple[int, ...]      # per block: q k^T and probs v per (query, key) pair
    mlp_token: tuple[int, ...]      # per block: norm2 and the MLP per token
    per_token_end: int              # final norm per token

    def flops(self, cfg: PruneConfig | None) -> int:
        total = self.fixed + self.per_token_start * (self.prefix + self.patches)
        n_last = self.patches
        for block, counts in enumerate(block_token_counts(cfg, self.depth, self.patches)):
            a, m = self.prefix + counts.attn, self.prefix + counts.mlp
            total += self.attn_token[block] * a + self.attn_pair[block] * a * a + self.mlp_token[block] * m
            n_last = counts.out
        return total + self.per_token_end * (self.prefix + n_last)


def _norm_cost(module: nn.Module | None, width: int) -> int:
    """fvcore's count for a layer norm over `width` features: 5 per element (4 without affine)."""
    if isinstance(module, nn.LayerNorm):
        return width * (5 if module.elementwise_affine else 4)
    return 0


def _linear_cost(module: nn.Module | None) -> int:
    return module.in_features * module.out_features if isinstance(module, nn.Linear) else 0


def _subtree_cost(module: nn.Module) -> int:
    """Per-token cost of every Linear and LayerNorm inside `module` (norms over their own width)."""
    total = 0
    for sub in module.modules():
        total += _linear_cost(sub)
        if isinstance(sub, nn.LayerNorm):
            total += _norm_cost(sub, math.prod(sub.normalized_shape))
    return total


def cost_profile(model: VisionTransformer) -> CostProfile:
    embed = model.patch_embed
    patches = embed.num_patches
    conv = embed.proj
    fixed = patches * conv.out_channels * (conv.in_channels // conv.groups) * math.prod(conv.kernel_size)
    fixed += patches * _norm_cost(getattr(embed, "norm", None), conv.out_channels)
    width = model.embed_dim
    fixed += _norm_cost(model.fc_norm, width)
    fixed += sum(_linear_cost(getattr(model, name, None)) for name in ("head", "head_dist"))
    attn_token, attn_pair, mlp_token = [], [], []
    for block in model.blocks:
        attn = block.attn
        attn_token.append(
            _norm_cost(block.norm1, width) + _linear_cost(attn.qkv) + _linear_cost(attn.proj)
            + _linear_cost(getattr(attn, "gate", None)) + _norm_cost(attn.norm, attn.attn_dim)
            + _norm_cost(attn.q_norm, attn.attn_dim) + _norm_cost(attn.k_norm, attn.attn_dim))
        attn_pair.append(2 * attn.attn_dim)
        mlp_token.append(_norm_cost(block.norm2, width) + _subtree_cost(block.mlp))
    return CostProfile(
        depth=len(model.blocks), patches=patches, prefix=model.num_prefix_tokens, fixed=fixed,
        per_token_start=_norm_cost(model.norm_pre, width),
        attn_token=tuple(attn_token), attn_pair=tuple(attn_pair), mlp_token=tuple(mlp_token),
        per_token_end=_norm_cost(model.norm, width),
    )


_PROFILES: "weakref.WeakKeyDictionary[nn.Module, CostProfile]" = weakref.WeakKeyDictionary()


def predict_flops(model: nn.Module, cfg: PruneConfig | None = None) -> int:
    """FLOPs per image of `model` reduced by `cfg` (None: dense), in closed form, no forward pass.

    Agrees with `count_flops` for every fixed-schedule config; mass-based sait has no fixed
    schedule and is refused (measure it with `count_flops(model, images)`)."""
    if not isinstance(model, VisionTransformer):
        raise ConfigError(f"predict_flops: expected a timm VisionTransformer, got {type(model).__name__}")
    if cfg is not None and cfg.adaptive:
        raise ConfigError("predict_flops: mass-based sait keeps a per-image number of tokens; "
                          "use count_flops(model, images)")
    profile = _PROFILES.get(model)
    if profile is None:
        profile = _PROFILES[model] = cost_profile(model)
    return profile.flops(cfg)


def _input_shape(model: nn.Module) -> tuple[int, int, int]:
    embed = model.patch_embed
    return (embed.proj.in_channels,) + tuple(embed.img_size)


def _device(model: nn.Module) -> torch.device:
    return next(model.parameters()).device
