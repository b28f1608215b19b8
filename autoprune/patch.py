"""The one place that knows timm: turns a `VisionTransformer` into a token-reduced one.

`apply` swaps the class of each reducing block to `ReducingBlock` (adding a `TokenReducer`
submodule with no parameters) and the model's class to a `Reduced...` subclass whose
`forward_features` threads `Tokens` through the blocks. Blocks that do not reduce run timm's own
forward (fused attention), given the key bias that merges or padding call for. The state dict
is unchanged, so weights load into either form. The forward also runs stage by stage (`embed`,
`run_block`, `attention_half`, `mlp_half`, `head`) for latency calibration, and `apply_slicing`
gives the physical floor of a token schedule (plain slicing) for `autoprune bench`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from timm.layers import Attention
from timm.models.vision_transformer import Block, VisionTransformer
from torch import Tensor, nn

from . import reducers
from .config import ConfigError, PruneConfig
from .reducers import Tokens
from .schedule import bat_counts, keep_count, merge_count


class TokenReducer(nn.Module):
    """The reduction of one layer: scores tokens from the block's attention, then runs the pure
    reducer. A module of its own so that its work can be told apart (e.g. by the FLOP counter)."""

    def __init__(self, cfg: PruneConfig, index: int) -> None:
        super().__init__()
        self.cfg = cfg
        self.target_keep_rate, self.target_r = cfg.amount(index)
        self.needs_probs = cfg.score in reducers.NEEDS_PROBS
        # SaiT runs its block P dense, MLP included, and prunes as tokens leave it
        self.after_mlp = cfg.reducer == "sait"
        self.strength = 1.0

    def extra_repr(self) -> str:
        if self.cfg.adaptive:
            amount = f"mass_threshold={self.cfg.mass_threshold}"
        else:
            amount = f"keep_rate={self.target_keep_rate}" if self.target_r is None else f"r={self.target_r}"
        return f"{self.cfg.reducer}, {amount}, strength={self.strength}"

    def amount(self) -> tuple[float | None, int | None, float | None]:
        """(keep_rate, r, mass_threshold) at the current strength: 0 keeps everything, 1 is the config."""
        s = self.strength
        keep_rate = None if self.target_keep_rate is None else 1 - s * (1 - self.target_keep_rate)
        r = None if self.target_r is None else round(s * self.target_r)
        mass = None if self.cfg.mass_threshold is None else 1 - s * (1 - self.cfg.mass_threshold)
        return keep_rate, r, mass

    def forward(self, tokens: Tokens, q: Tensor, k: Tensor, v: Tensor, scale: float,
                bias: Tensor | None, probs: Tensor | None) -> Tokens:
        if self.strength == 0:
            return tokens
        cfg, n = self.cfg, tokens.count
        keep_rate, r, mass = self.amount()
        if cfg.reducer == "tome":
            return reducers.tome(tokens, _key_metric(k, tokens), merge_count(n, keep_rate, r))
        scores = reducers.token_scores(cfg.score, tokens.prefix, q, k, v, scale, bias, probs)
        if cfg.reducer == "ppt":
            return reducers.ppt(tokens, scores, _key_metric(k, tokens), merge_count(n, keep_rate, r),
                                cfg.tau, cfg.tau_mode)
        if mass is not None:
            return reducers.sait_mass(tokens, scores, mass)
        keep = keep_count(n, keep_rate, r)
        if cfg.reducer == "evit":
            return reducers.evit(tokens, scores, keep, cfg.fuse)
        if cfg.reducer == "tps":
            return reducers.tps(tokens, scores, keep, cfg.temperature)
        if cfg.reducer == "bat":
            pairs, clusters = bat_counts(n, keep, cfg.clusters, cfg.pairs)
            return reducers.bat(tokens, scores, keep, clusters, cfg.knn, pairs)
        return reducers.sait(tokens, scores, keep)


def _key_metric(k: Tensor, tokens: Tokens) -> Tensor:
    """ToMe's similarity metric: keys averaged over heads, non-prefix tokens only."""
    return k.mean(dim=1)[:, tokens.prefix:]


def attention_parts(attn: Attention, x: Tensor, bias: Tensor | None, need_probs: bool):
    """timm `Attention.forward` that also returns q, k, v (and the probabilities when asked).

    Uses fused attention unless the probabilities are needed, then computes them explicitly once."""
    batch, count, _ = x.shape
    gate = attn.gate(x).sigmoid() if attn.gate is not None else None
    qkv = attn.qkv(x).reshape(batch, count, 3, attn.num_heads, attn.head_dim).permute(2, 0, 3, 1, 4)
    q, k, v = qkv.unbind(0)
    q, k = attn.q_norm(q), attn.k_norm(k)
    probs = None
    if need_probs:
        logits = (q * attn.scale) @ k.transpose(-2, -1)
        if bias is not None:
            logits = logits + bias
        probs = logits.softmax(dim=-1)
        out = attn.attn_drop(probs) @ v
    else:
        out = F.scaled_dot_product_attention(
            q, k, v, attn_mask=bias, dropout_p=attn.attn_drop.p if attn.training else 0.0)
    out = attn.norm(out.transpose(1, 2).reshape(batch, count, attn.attn_dim))
    if gate is not None:
        out = out * gate
    return attn.proj_drop(attn.proj(out)), q, k, v, probs


class ReducingBlock(Block):
    """A timm `Block` that reduces tokens between its attention and its MLP (reducers.md), or,
    for SaiT, after its MLP, with scores from its attention either way."""

    reducer: TokenReducer

    def forward_tokens(self, tokens: Tokens, bias: Tensor | None) -> Tokens:
        tokens, q, k, v, probs = attention_half(self, tokens, bias, self.reducer.needs_probs)
        if self.reducer.after_mlp:
            return self.reducer(mlp_half(self, tokens), q, k, v, self.attn.scale, bias, probs)
        return mlp_half(self, self.reducer(tokens, q, k, v, self.attn.scale, bias, probs))


def attention_half(block: Block, tokens: Tokens, bias: Tensor | None, need_probs: bool):
    """A block up to its attention residual: (tokens, q, k, v, probs), as a reducing block runs it."""
    x = tokens.x
    y, q, k, v, probs = attention_parts(block.attn, block.norm1(x), bias, need_probs)
    return tokens.replace(x=x + block.drop_path1(block.ls1(y))), q, k, v, probs


def mlp_half(block: Block, tokens: Tokens) -> Tokens:
    """A block's MLP residual."""
    x = tokens.x
    return tokens.replace(x=x + block.drop_path2(block.ls2(block.mlp(block.norm2(x)))))


def embed(model: VisionTransformer, images: Tensor) -> Tokens:
    """The tokens entering the first block: patch and position embedding, pre-norm."""
    x = model.norm_pre(model.patch_drop(model._pos_embed(model.patch_embed(images))))
    return Tokens.start(x, model.num_prefix_tokens, getattr(model, "track_source", False))


def run_block(block: Block, tokens: Tokens, prop_attn: bool) -> Tokens:
    """One block as a reduced model runs it: the key bias that merges or padding call for, then
    timm's own forward (fused attention), or attention, reduction and MLP for a reducing block."""
    bias = tokens.attn_bias(prop_attn)
    if isinstance(block, ReducingBlock):
        return block.forward_tokens(tokens, bias)
    return tokens.replace(x=block(tokens.x, attn_mask=bias))


def head(model: "ReducedVisionTransformer", tokens: Tokens) -> Tensor:
    """Final norm, pooling and classifier on the tokens leaving the last block."""
    model.final_tokens = tokens
    return model.forward_head(model.norm(tokens.x))


class ReducedVisionTransformer(VisionTransformer):
    """Mixed in front of a timm ViT class by `apply`; never instantiated directly."""

    prune_config: PruneConfig | None  # None: a slicing floor (`apply_slicing`)
    track_source: bool = False

    def forward_features(self, x: Tensor, attn_mask: Tensor | None = None, is_causal: bool = False) -> Tensor:
        if attn_mask is not None or is_causal:
            raise ValueError("a token-reduced model does not take attn_mask or is_causal")
        tokens = embed(self, x)
        prop_attn = self.prune_config is not None and bool(self.prune_config.prop_attn)
        for block in self.blocks:
            tokens = run_block(block, tokens, prop_attn)
        self.final_tokens = tokens
        return self.norm(tokens.x)

    def pool(self, x: Tensor, pool_type: str | None = None) -> Tensor:
        """timm's pooling, but averaging over the patches tokens stand for, without padding."""
        pool_type = self.global_pool if pool_type is None else pool_type
        if self.attn_pool is not None or pool_type in ("", "token"):
            return super().pool(x, pool_type)
        tokens = self.final_tokens
        start = 0 if self.pool_include_prefix else self.num_prefix_tokens
        x, weight = x[:, start:], tokens.size[:, start:].to(x.dtype)
        if tokens.valid is not None:
            weight = weight * tokens.valid[:, start:]
        mean = (x * weight.unsqueeze(-1)).sum(1) / weight.sum(1, keepdim=True)
        if pool_type == "avg":
            return mean
        masked = x if tokens.valid is None else x.masked_fill(~tokens.valid[:, start:, None], float("-inf"))
        if pool_type == "max":
            return masked.amax(1)
        if pool_type == "avgmax":
            return 0.5 * (masked.amax(1) + mean)
        raise ValueError(f"unsupported pool type {pool_type!r}")


_REDUCED_CLASSES: dict[type, type] = {}


def _reduced_class(cls: type) -> type:
    if cls not in _REDUCED_CLASSES:
        _REDUCED_CLASSES[cls] = type(f"Reduced{cls.__name__}", (ReducedVisionTransformer, cls), {})
    return _REDUCED_CLASSES[cls]


def _timm_class(module: nn.Module) -> type:
    """The class a module has without autoprune's patching."""
    if isinstance(module, ReducedVisionTransformer):
        return next(c for c in type(module).__mro__[1:] if c is not ReducedVisionTransformer)
    return Block if isinstance(module, ReducingBlock) else type(module)


def architecture(model: nn.Module) -> str:
    """What a model computes, whatever reduction is applied to it: each module's timm class and
    settings, the input size and the prefix tokens (latency tables are keyed by it)."""
    lines = [f"img_size={tuple(model.patch_embed.img_size)} prefix={model.num_prefix_tokens}"]
    for name, module in model.named_modules():
        if isinstance(module, (TokenReducer, SliceReducer)):
            continue
        fused = getattr(module, "fused_attn", None)
        lines.append(f"{name}: {_timm_class(module).__name__}({module.extra_repr()})"
                     + ("" if fused is None else f" fused_attn={fused}"))
    return "\n".join(lines)


def remove(model: VisionTransformer) -> VisionTransformer:
    """Undo `apply`: the model is the plain timm model again."""
    if isinstance(model, ReducedVisionTransformer):
        for block in model.blocks:
            if isinstance(block, ReducingBlock):
                del block.reducer
                block.__class__ = Block
        model.__class__ = _timm_class(model)
        for name in ("prune_config", "final_tokens"):
            model.__dict__.pop(name, None)
    return model


def set_strength(model: nn.Module, strength: float) -> None:
    """Scale how much every reducing layer removes: 0 runs the model dense, 1 as configured.

    Keep rates and mass thresholds move linearly from 1 to their targets, r from 0 to its target.
    Used for keep-rate warm-up and for SaiT's dense/sparse alternate training."""
    if not 0 <= strength <= 1:
        raise ValueError(f"set_strength: {strength} is outside [0, 1]")
    for module in model.modules():
        if isinstance(module, TokenReducer):
            module.strength = float(strength)


def apply(model: nn.Module, cfg: PruneConfig | None) -> nn.Module:
    """Patch a timm VisionTransformer in place with `cfg` (None or reducer none: dense) and return
    it. Applying again replaces the previous config."""
    if not isinstance(model, VisionTransformer):
        raise ConfigError(f"apply: expected a timm VisionTransformer, got {type(model).__name__}")
    remove(model)
    if cfg is None or cfg.reducer == "none":
        return model
    if not isinstance(cfg, PruneConfig):
        raise ConfigError(f"apply: expected a PruneConfig, got {type(cfg).__name__}")
    layers = cfg.resolved_layers(len(model.blocks))
    _check_model(model, cfg, layers)
    for index, layer in enumerate(layers):
        block = model.blocks[layer]
        block.__class__ = ReducingBlock
        block.reducer = TokenReducer(cfg, index)
    model.__class__ = _reduced_class(type(model))
    model.prune_config = cfg
    return model


def _check_model(model: VisionTransformer, cfg: PruneConfig, layers: tuple[int, ...]) -> None:
    if model.attn_pool is not None:
        raise ConfigError("apply: models with attention pooling (global_pool='map') are not supported")
    if cfg.score in ("cls", "cls_vnorm", "mean") and model.cls_token is None:
        raise ConfigError(
            f"PruneConfig.score: {cfg.score!r} needs a class token and this model has none "
            "(accepted here: tis, entropy)")
    for layer in layers:
        block = model.blocks[layer]
        if type(block) is not Block or type(block.attn) is not Attention:
            raise ConfigError(
                f"PruneConfig.layers: block {layer} is a {type(block).__name__} with "
                f"{type(getattr(block, 'attn', None)).__name__}; only timm's Block with Attention can reduce")


# -- the physical floor of a token schedule, and what reducers did on a batch ---------------------

class SliceReducer(nn.Module):
    """Keeps the first `keep` non-prefix tokens: no scores, no matching, no key bias. A model
    reduced this way runs a reducer's token schedule at the least cost the device allows."""

    needs_probs = False

    def __init__(self, keep: int, after_mlp: bool = False) -> None:
        super().__init__()
        self.keep = keep
        self.after_mlp = after_mlp

    def extra_repr(self) -> str:
        return f"keep={self.keep}, after_mlp={self.after_mlp}"

    def forward(self, tokens: Tokens, *attention) -> Tokens:
        end = tokens.prefix + self.keep
        return tokens.map_tensors(lambda t: t[:, :end])


def apply_slicing(model: VisionTransformer, keep: dict[int, int], like: nn.Module | None = None) -> VisionTransformer:
    """Patch `model` in place to keep, in each block of `keep`, its first keep[block] non-prefix
    tokens, where the reduced model `like` reduces (between attention and MLP, or after the MLP
    for SaiT); the floor `autoprune bench` reports."""
    remove(model)
    for layer, count in keep.items():
        block = model.blocks[layer]
        after_mlp = like is not None and getattr(like.blocks[layer], "reducer", None) is not None \
            and like.blocks[layer].reducer.after_mlp
        block.__class__ = ReducingBlock
        block.reducer = SliceReducer(count, after_mlp)
    model.__class__ = _reduced_class(type(model))
    model.prune_config = None
    return model


@dataclass(frozen=True)
class Reduction:
    """What one reducing layer did to each image of a batch."""

    block: int
    counts: Tensor        # [B] non-prefix tokens each image kept (padding excluded)
    merged_only: Tensor   # [B] True where the image lost no patch: its token sizes sum as before
                          # (merging only; for ppt, the pooling branch)


def reductions(model: nn.Module, images: Tensor, chunk: int = 64) -> list[Reduction]:
    """Run a reduced model on `images` (in chunks) and report every reducing layer, in block order."""
    found: dict[int, list[tuple[Tensor, Tensor]]] = {}

    def record(block: int, module: nn.Module, args: tuple, out: Tokens) -> None:
        before = args[0]
        counts = out.count if out.valid is None else out.body(out.valid).sum(dim=1)
        counts = torch.as_tensor(counts, device=out.x.device).expand(out.x.shape[0])
        merged = torch.isclose(_size_mass(out), _size_mass(before))
        found.setdefault(block, []).append((counts, merged))

    hooks = [block.reducer.register_forward_hook(lambda mod, args, out, i=i: record(i, mod, args, out))
             for i, block in enumerate(model.blocks) if isinstance(block, ReducingBlock)]
    try:
        with torch.inference_mode():
            for start in range(0, len(images), chunk):
                model(images[start:start + chunk])
    finally:
        for hook in hooks:
            hook.remove()
    return [Reduction(block, torch.cat([c for c, _ in parts]), torch.cat([m for _, m in parts]))
            for block, parts in sorted(found.items())]


def _size_mass(tokens: Tokens) -> Tensor:
    size = tokens.size if tokens.valid is None else tokens.size * tokens.valid
    return size.sum(dim=1)
