"""Fine-tuning and evaluation of (token-reduced) ViTs: what every search trial runs.

`fine_tune` trains with AdamW, a cosine schedule with warm-up, gradient clipping, bf16 autocast
on CUDA, optional keep-rate warm-up, distillation and SaiT dense/sparse alternation; `evaluate`
measures top-1/top-5. Both work on any model `apply` produced (or a dense one).
"""

from __future__ import annotations

import dataclasses
import math
import random
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from timm.optim import create_optimizer_v2
from timm.scheduler import CosineLRScheduler
from torch import nn

from .data import make_loader
from .distill import DISTILL_KINDS, FEATURE_KINDS, Distillation
from .patch import set_strength


class TrainingFailed(RuntimeError):
    """A run that cannot go on: non-finite loss, out of memory. The message says which and where."""


@dataclass(frozen=True)
class TrainConfig:
    """A fine-tuning recipe. `epochs` may be fractional (quick trials); 0 trains nothing (a dense
    baseline taken as it is; `fine_tune` refuses it). Warm-ups are fractions of the whole run.
    `distill` picks the distillation loss (with weight `beta`; 0 disables it): logits, tis,
    features or features_cls (distill.py)."""

    epochs: float = 1.0
    batch_size: int = 64
    lr: float = 5e-4
    weight_decay: float = 0.05
    warmup: float = 0.1
    min_lr: float = 1e-6
    clip_grad: float | None = 1.0
    label_smoothing: float = 0.0
    keep_rate_warmup: float = 0.0
    distill: str = "logits"
    beta: float = 0.0
    distill_temperature: float = 1.0
    sait_alternate: bool = False
    seed: int = 0
    workers: int | None = None

    def __post_init__(self) -> None:
        checks = {
            "epochs": self.epochs >= 0, "batch_size": self.batch_size >= 1, "lr": self.lr > 0,
            "weight_decay": self.weight_decay >= 0, "warmup": 0 <= self.warmup < 1,
            "min_lr": self.min_lr >= 0, "clip_grad": self.clip_grad is None or self.clip_grad > 0,
            "label_smoothing": 0 <= self.label_smoothing < 1,
            "keep_rate_warmup": 0 <= self.keep_rate_warmup <= 1, "beta": self.beta >= 0,
            "distill_temperature": self.distill_temperature > 0,
        }
        for name, ok in checks.items():
            if not ok:
                raise ValueError(f"TrainConfig.{name}: {getattr(self, name)!r} is out of range")
        if self.distill not in DISTILL_KINDS:
            raise ValueError(f"TrainConfig.distill: {self.distill!r} is invalid; accepted: {', '.join(DISTILL_KINDS)}")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "TrainConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"TrainConfig: unknown field {unknown[0]!r}; accepted: {', '.join(sorted(known))}")
        return cls(**data)


MAX_SEED = 2**32 - 1  # numpy's seed range; larger seeds are taken modulo MAX_SEED + 1


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % (MAX_SEED + 1))
    torch.manual_seed(seed)


def autocast_for(device: torch.device):
    """bf16 autocast on CUDA; full precision elsewhere (bf16 on CPU is slower than fp32 here)."""
    return torch.autocast("cuda", dtype=torch.bfloat16, enabled=device.type == "cuda")


def model_device(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


# -- the training loop --------------------------------------------------------------------------

@dataclass
class EpochRecord:
    epoch: int
    progress: float           # epochs done, fractional
    train_loss: float
    metrics: dict[str, float]  # from the evaluation after the epoch (empty without a val set)


def fine_tune(
    model: nn.Module,
    train_set,
    cfg: TrainConfig,
    teacher: nn.Module | None = None,
    val_set=None,
    on_epoch: Callable[[EpochRecord], None] | None = None,
) -> list[EpochRecord]:
    """Train `model` in place on `train_set` with recipe `cfg`; return one record per (partial) epoch.

    `teacher` (any timm model; distill.py says what each kind needs of it) is needed when
    cfg.beta > 0. After each epoch (and at the end of a fractional one) the model is evaluated
    on `val_set` when given and `on_epoch` receives the record; it may raise to stop training
    (a scheduler's early stop). Raises TrainingFailed on a non-finite loss or CUDA out-of-memory."""
    if cfg.epochs <= 0:
        raise ValueError(f"fine_tune: epochs {cfg.epochs!r} trains nothing; accepted: a positive number")
    device = model_device(model)
    if cfg.beta > 0 and teacher is None:
        raise ValueError("fine_tune: beta > 0 needs a teacher")
    seed_everything(cfg.seed)
    loader = make_loader(train_set, cfg.batch_size, train=True, workers=cfg.workers, device=device, seed=cfg.seed)
    steps_per_epoch = len(loader)
    if steps_per_epoch == 0:
        raise ValueError(f"fine_tune: the training set ({len(train_set)} images) is smaller than one batch ({cfg.batch_size})")
    distillation = Distillation(cfg.distill, model, teacher, cfg.distill_temperature) if cfg.beta > 0 else None
    total_steps = max(1, math.ceil(cfg.epochs * steps_per_epoch))
    optimizer = create_optimizer_v2(model, "adamw", lr=cfg.lr, weight_decay=cfg.weight_decay)
    if distillation is not None and distillation.parameters():
        optimizer.add_param_group({"params": distillation.parameters(), "weight_decay": cfg.weight_decay})
    scheduler = CosineLRScheduler(optimizer, t_initial=total_steps, lr_min=cfg.min_lr,
                                  warmup_t=round(cfg.warmup * total_steps), warmup_lr_init=cfg.lr * 1e-3,
                                  t_in_epochs=False)
    records: list[EpochRecord] = []
    step, epoch = 0, 0
    try:
        while step < total_steps:
            model.train()
            losses = []
            dense_epoch = cfg.sait_alternate and epoch % 2 == 1  # epochs 1, 3, ... (the 2nd, 4th) dense
            for images, labels in loader:
                if step >= total_steps:
                    break
                images = images.to(device, non_blocking=True)
                labels = labels.to(device, non_blocking=True)
                ramp = 1.0 if cfg.keep_rate_warmup == 0 else _cosine_ramp(step / (cfg.keep_rate_warmup * total_steps))
                set_strength(model, 0.0 if dense_epoch else ramp)
                loss = _train_step(model, distillation, images, labels, cfg, optimizer, device)
                scheduler.step_update(step + 1)
                if not math.isfinite(loss):
                    raise TrainingFailed(f"loss became {loss} at step {step + 1} (epoch {epoch + 1}); "
                                         "lower the learning rate or check the data")
                losses.append(loss)
                step += 1
            set_strength(model, 1.0)
            record = EpochRecord(epoch=epoch + 1, progress=step / steps_per_epoch,
                                 train_loss=float(np.mean(losses)),
                                 metrics=evaluate(model, val_set, cfg.batch_size, cfg.workers) if val_set is not None else {})
            records.append(record)
            if on_epoch is not None:
                on_epoch(record)
            epoch += 1
    except torch.cuda.OutOfMemoryError:
        raise TrainingFailed(f"out of memory on {device} at batch size {cfg.batch_size}") from None
    finally:
        if distillation is not None:
            distillation.close(model)
        set_strength(model, 1.0)
    return records


def _cosine_ramp(progress: float) -> float:
    """0 -> 1 over progress 0 -> 1 along a half cosine; 1 after."""
    return 1.0 if progress >= 1 else 0.5 * (1 - math.cos(math.pi * progress))


def _train_step(model, distillation: Distillation | None, images, labels, cfg: TrainConfig, optimizer,
                device) -> float:
    with autocast_for(device):
        features = None
        if distillation is not None and cfg.distill in FEATURE_KINDS:
            features = model.forward_features(images)
            logits = model.forward_head(features)
        else:
            logits = model(images)
        loss = F.cross_entropy(logits.float(), labels, label_smoothing=cfg.label_smoothing)
        if distillation is not None:
            # tis: in SaiT's dense epochs (strength 0) the student's block P attention is
            # captured and distilled all the same; only the pruning is off
            loss = loss + cfg.beta * distillation.loss(model, images, logits, features)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    if cfg.clip_grad is not None:
        nn.utils.clip_grad_norm_(model.parameters(), cfg.clip_grad)
    optimizer.step()
    return float(loss.detach())


# -- evaluation ---------------------------------------------------------------------------------

@torch.no_grad()
def evaluate(model: nn.Module, dataset, batch_size: int = 128, workers: int | None = None) -> dict[str, float]:
    """Top-1 (and top-5 when there are more than 5 classes) accuracy in percent, and mean loss."""
    device = model_device(model)
    was_training = model.training
    model.eval()
    loader = make_loader(dataset, batch_size, train=False, workers=workers, device=device)
    correct1 = correct5 = seen = 0
    loss_sum = 0.0
    try:
        for images, labels in loader:
            images, labels = images.to(device, non_blocking=True), labels.to(device, non_blocking=True)
            with autocast_for(device):
                logits = model(images).float()
            loss_sum += float(F.cross_entropy(logits, labels, reduction="sum"))
            top = logits.topk(min(5, logits.shape[1]), dim=1).indices
            correct1 += int((top[:, 0] == labels).sum())
            correct5 += int((top == labels[:, None]).any(dim=1).sum())
            seen += len(labels)
    finally:
        model.train(was_training)
    metrics = {"top1": 100.0 * correct1 / seen, "loss": loss_sum / seen}
    if logits.shape[1] > 5:
        metrics["top5"] = 100.0 * correct5 / seen
    return metrics
