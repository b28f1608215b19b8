"""Distillation during fine-tuning: the losses, and what they need from student and teacher.

Kinds (`TrainConfig.distill`):
- `logits`: KL(teacher || student) on temperature-softened logits (Hinton et al.); the teacher
  must predict the student's classes.
- `tis`: SaiT's KL(TIS* || teacher's last-block CLS attention, head mean) at the student's
  first reducing layer.
- `features`: MSE of the student's CLS token and of every retained token against the teacher's
  features: its CLS token, and for a token the mean of the teacher's features of the patches it
  holds ("[CLS] + retained patch tokens"). `features_cls`: the CLS token only ("[CLS]").

The teacher may be any timm ViT. When its width differs, a linear projection from the student's
width to the teacher's is learned with the student (and dropped after training). When its patch
grid differs, teacher patches are resampled onto the student's grid by area (`patch_resampling`).
EViT's fused tokens (a weighted sum of inattentive tokens, not a patch) get no token target.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
import torch
import torch.nn.functional as F
from timm.models.vision_transformer import VisionTransformer
from torch import Tensor, nn

from .patch import ReducedVisionTransformer, TokenReducer
from .reducers import cls_attention

DISTILL_KINDS = ("logits", "tis", "features", "features_cls")
FEATURE_KINDS = ("features", "features_cls")


class DistillationError(ValueError):
    """A teacher or student that the distillation kind cannot use; the message says why."""


def check_teacher(teacher: nn.Module, student: nn.Module, kinds: Iterable[str]) -> None:
    """Refuse, in one line, a teacher that cannot teach `student` by each of `kinds`."""
    for kind in kinds:
        _check_kind(teacher, student, kind)


def _check_kind(teacher: nn.Module, student: nn.Module, kind: str) -> None:
    if kind == "logits":
        theirs, ours = getattr(teacher, "num_classes", None), getattr(student, "num_classes", None)
        if theirs != ours:
            raise DistillationError(f"logits distillation needs a teacher that predicts the student's {ours} classes; "
                                    f"the teacher has {theirs} (use tis or features distillation with it)")
        return
    if not isinstance(teacher, VisionTransformer):
        raise DistillationError(f"{kind} distillation needs a timm VisionTransformer teacher, got {type(teacher).__name__}")
    if tuple(teacher.patch_embed.img_size) != tuple(student.patch_embed.img_size) and not teacher.dynamic_img_size:
        raise DistillationError(
            f"the teacher takes {tuple(teacher.patch_embed.img_size)} images and the student "
            f"{tuple(student.patch_embed.img_size)}: give the teacher img_size or dynamic_img_size=true in its kwargs")
    if kind in ("tis", "features_cls") and teacher.cls_token is None:
        raise DistillationError(f"{kind} distillation needs a teacher with a class token")
    if kind == "features_cls" and student.cls_token is None:
        raise DistillationError("features_cls distillation needs a student with a class token")


# -- the losses ---------------------------------------------------------------------------------

def logit_distillation(student: Tensor, teacher: Tensor, temperature: float) -> Tensor:
    """KL(teacher || student) on temperature-softened logits, scaled by T^2 (Hinton et al.)."""
    t = temperature
    return F.kl_div(F.log_softmax(student / t, dim=-1), F.log_softmax(teacher / t, dim=-1),
                    reduction="batchmean", log_target=True) * t * t


def tis_star(probs: Tensor, prefix: int) -> Tensor:
    """SaiT's TIS*: per head, softmax over tokens of the attention column sums; then head mean."""
    column_sums = probs.sum(dim=2)[:, :, prefix:]
    return column_sums.softmax(dim=-1).mean(dim=1)


def tis_distillation(student_probs: Tensor, teacher_attention: Tensor, prefix: int) -> Tensor:
    """KL(TIS* || teacher attention): sum_j p_j log(p_j / q_j), p = the student's TIS* over its
    non-prefix tokens, q = the teacher's CLS attention on the same patches (normalised here)."""
    p = tis_star(student_probs, prefix)
    q = teacher_attention / teacher_attention.sum(dim=1, keepdim=True)
    return (p * (p.clamp_min(1e-12).log() - q.clamp_min(1e-12).log())).sum(dim=1).mean()


def patch_resampling(student_grid: tuple[int, int], teacher_grid: tuple[int, int]) -> Tensor:
    """R [Ps, Pt]: R[p, q] = the share of student patch p's area that teacher patch q covers (rows
    sum to 1; patches in timm's row-major order). R @ teacher patch features gives each student
    patch the area-weighted mean of the teacher patches over it; exact for any ratio."""
    rows = _overlap(student_grid[0], teacher_grid[0])
    cols = _overlap(student_grid[1], teacher_grid[1])
    return torch.kron(rows, cols).float()


def _overlap(student: int, teacher: int) -> Tensor:
    """[student, teacher] shares of each student cell of [0, 1] covered by each teacher cell."""
    s = torch.arange(student + 1, dtype=torch.float64) / student
    t = torch.arange(teacher + 1, dtype=torch.float64) / teacher
    covered = torch.minimum(s[1:, None], t[None, 1:]) - torch.maximum(s[:-1, None], t[None, :-1])
    return covered.clamp_min(0) * student


def feature_targets(source: Tensor, size: Tensor, teacher_patches: Tensor) -> Tensor:
    """The target of each token holding patches `source` [B, N, P] (sizes [B, N]): the mean of
    `teacher_patches` [B, P, C] (already on the student's grid) over the patches it holds."""
    return source @ teacher_patches / size.clamp_min(1e-12).unsqueeze(-1)


def fused_tokens(source: Tensor, fused_sources: list[Tensor]) -> Tensor:
    """[B, N] True for tokens whose patch set is that of a token an EViT layer fused. A token's
    patches are held by no other token, and EViT never merges ordinary tokens, so a fused token
    that a later layer kept is recognised by its unchanged source row."""
    if not fused_sources:
        return source.new_zeros(source.shape[:2], dtype=torch.bool)
    rows = torch.stack(fused_sources, dim=1)  # [B, L, P]
    return (source[:, :, None, :] == rows[:, None]).all(dim=-1).any(dim=-1)


# -- a run's distillation -------------------------------------------------------------------------

class Distillation:
    """Everything one fine-tuning run distils with: teacher, hooks, projection, resampling.

    `parameters()` are trained with the student (the projection, when widths differ); call
    `loss` after the student's forward pass on `images`, and `close` at the end of training."""

    def __init__(self, kind: str, student: nn.Module, teacher: nn.Module, temperature: float = 1.0) -> None:
        if kind not in DISTILL_KINDS:
            raise DistillationError(f"distill: {kind!r} is invalid; accepted: {', '.join(DISTILL_KINDS)}")
        check_teacher(teacher, student, (kind,))
        self.kind, self.temperature = kind, temperature
        self.teacher = teacher.to(_device(student)).eval()
        self.values: dict[str, Tensor] = {}
        self.fused: dict[int, Tensor | None] = {}  # per EViT layer: the source of its fused token
        self.handles: list = []
        self.projection: nn.Linear | None = None
        self.resampling: Tensor | None = None
        self.tracks_sources = False
        if kind != "logits" and tuple(teacher.patch_embed.grid_size) != tuple(student.patch_embed.grid_size):
            self.resampling = patch_resampling(student.patch_embed.grid_size, teacher.patch_embed.grid_size).to(_device(student))
        if kind == "tis":
            reducing = [m for m in student.modules() if isinstance(m, TokenReducer)]
            if not (reducing and reducing[0].needs_probs):
                raise DistillationError("distill='tis' needs a sait (or tis/entropy/mean-scored) student")
            # the reducer runs at every strength, dense epochs included: its block's attention is always captured
            self._hook(reducing[0], lambda mod, args, out: self.values.__setitem__("student_probs", args[6]))
            self._hook(teacher.blocks[-1].attn, self._teacher_cls_attention)
        if kind in FEATURE_KINDS and student.embed_dim != teacher.embed_dim:
            self.projection = nn.Linear(student.embed_dim, teacher.embed_dim).to(_device(student))
        if kind == "features" and isinstance(student, ReducedVisionTransformer):
            student.track_source = self.tracks_sources = True
            for index, module in enumerate(m for m in student.modules() if isinstance(m, TokenReducer)):
                if module.cfg.reducer == "evit" and module.cfg.fuse:
                    # a layer that reduced nothing (strength 0, keep all) returns its input itself
                    self._hook(module, lambda mod, args, out, index=index: self.fused.__setitem__(
                        index, None if out is args[0] else out.source[:, -1]))

    def parameters(self) -> list[nn.Parameter]:
        return [] if self.projection is None else list(self.projection.parameters())

    def close(self, student: nn.Module) -> None:
        for handle in self.handles:
            handle.remove()
        if self.tracks_sources:
            student.track_source = False

    def loss(self, student: nn.Module, images: Tensor, logits: Tensor, features: Tensor | None) -> Tensor:
        with torch.no_grad():
            if self.kind in FEATURE_KINDS:
                teacher_out = self.teacher.forward_features(images)
            else:
                teacher_out = self.teacher(images)
        if self.kind == "logits":
            return logit_distillation(logits.float(), teacher_out.float(), self.temperature)
        if self.kind == "tis":
            attention = self.values.pop("teacher_cls_attention").float()[:, self.teacher.num_prefix_tokens:]
            if self.resampling is not None:
                attention = attention @ self.resampling.T
            return tis_distillation(self.values.pop("student_probs").float(), attention, student.num_prefix_tokens)
        return self._feature_loss(student, features.float(), teacher_out.float())

    def _feature_loss(self, student: nn.Module, features: Tensor, teacher_features: Tensor) -> Tensor:
        if self.projection is not None:
            features = self.projection(features).float()
        loss = features.new_zeros(())
        if student.cls_token is not None and self.teacher.cls_token is not None:
            loss = loss + F.mse_loss(features[:, 0], teacher_features[:, 0])
        if self.kind == "features_cls":
            return loss
        prefix = student.num_prefix_tokens
        teacher_patches = teacher_features[:, self.teacher.num_prefix_tokens:]
        if self.resampling is not None:
            teacher_patches = self.resampling @ teacher_patches
        if not self.tracks_sources:  # a dense student: token j is patch j
            return loss + F.mse_loss(features[:, prefix:], teacher_patches)
        tokens = student.final_tokens
        source = tokens.source[:, prefix:]
        target = feature_targets(source, tokens.size[:, prefix:], teacher_patches)
        error = (features[:, prefix:] - target).square().mean(dim=-1)
        weight = (~fused_tokens(source, [s for s in self.fused.values() if s is not None])).float()
        if tokens.valid is not None:
            weight = weight * tokens.valid[:, prefix:]
        return loss + (error * weight).sum() / weight.sum().clamp_min(1)

    # -- hooks ----------------------------------------------------------------------------------

    def _hook(self, module: nn.Module, hook: Callable) -> None:
        self.handles.append(module.register_forward_hook(hook))

    def _teacher_cls_attention(self, attn: nn.Module, args, out) -> None:
        """The teacher's last-block CLS attention (head mean), recomputed from its input."""
        x = args[0]
        batch, count, _ = x.shape
        qkv = attn.qkv(x).reshape(batch, count, 3, attn.num_heads, attn.head_dim).permute(2, 0, 3, 1, 4)
        q, k = attn.q_norm(qkv[0]), attn.k_norm(qkv[1])
        self.values["teacher_cls_attention"] = cls_attention(q, k, attn.scale, None).mean(dim=1)


def _device(module: nn.Module) -> torch.device:
    return next(module.parameters()).device
