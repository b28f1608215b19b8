"""Distillation teachers other than the dense baseline: any timm model with trained weights.

SaiT distils from a self-supervised DINO ViT and reports that a DeiT-S teacher does worse than
no distillation; task-agnostic feature distillation uses a large teacher of another width and
patch size. `TeacherSpec` names such a model; `load` builds it with the classifier its weights
bring (a checkpoint's own class count, never a re-initialised head), so logits distillation
only runs where the classes match (`distill.check_teacher`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import timm
from torch import nn

from .digest import file_sha256


class TeacherError(ValueError):
    """A teacher that cannot be built or does not fit the run; the message names the option."""


@dataclass(frozen=True)
class TeacherSpec:
    """A timm model name, its create_model kwargs, and its weights: "pretrained" (timm's hub) or
    the path of a checkpoint (a state dict, or a training checkpoint holding one)."""

    name: str
    weights: str = "pretrained"
    kwargs: dict[str, Any] = field(default_factory=dict)

    def load(self) -> nn.Module:
        """The teacher in eval mode, on the CPU."""
        if not timm.is_model(self.name):
            raise TeacherError(f"--teacher: unknown timm model {self.name!r} (e.g. vit_small_patch16_224.dino)")
        if self.weights == "pretrained":
            return self._pretrained().eval()
        return self._from_checkpoint(Path(self.weights)).eval()

    def identity(self) -> dict[str, Any]:
        """What defines the teacher: a checkpoint by its content, not by its path."""
        weights = self.weights
        if weights != "pretrained":
            weights = "sha256:" + _digest(Path(weights))
        return {"name": self.name, "kwargs": self.kwargs, "weights": weights}

    def _create(self, **extra) -> nn.Module:
        try:
            return timm.create_model(self.name, **{**extra, **self.kwargs})
        except Exception as error:  # timm raises TypeError, ValueError or AssertionError for bad kwargs
            raise TeacherError(f"--teacher-kwargs: {self.name} does not accept {self.kwargs} ({_first_line(error)})") from None

    def _pretrained(self) -> nn.Module:
        self._create()  # bad kwargs are the user's mistake, not the network's
        try:
            return timm.create_model(self.name, pretrained=True, **self.kwargs)
        except Exception as error:
            raise TeacherError(
                f"--teacher-pretrained: the weights of {self.name} could not be loaded ({type(error).__name__}: "
                f"{_first_line(error)}); without network access give --teacher-checkpoint PATH") from None

    def _from_checkpoint(self, path: Path) -> nn.Module:
        if not path.is_file():
            raise TeacherError(f"--teacher-checkpoint: {str(path)!r} does not exist (expected a timm/PyTorch weights file)")
        try:
            state = timm.models.load_state_dict(str(path))
        except Exception as error:
            raise TeacherError(f"--teacher-checkpoint: {str(path)!r} is not a readable weights file "
                               f"({type(error).__name__}: {_first_line(error)})") from None
        classifier = self._create().pretrained_cfg.get("classifier", "head")
        head = state.get(f"{classifier}.weight")
        model = self._create(num_classes=0 if head is None else head.shape[0])
        try:
            model.load_state_dict(state)
        except RuntimeError as error:
            # torch's first line only says that loading failed; the next says which keys or shapes
            lines = [line.strip() for line in str(error).strip().splitlines() if line.strip()]
            detail = lines[1] if len(lines) > 1 else lines[0]
            detail = detail if len(detail) <= 160 else detail[:160] + "..."
            raise TeacherError(f"--teacher-checkpoint: {str(path)!r} does not fit {self.name} ({detail})") from None
        return model


def _first_line(error: Exception) -> str:
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__


def _digest(path: Path) -> str:
    digest = file_sha256(path)
    if digest is None:
        raise TeacherError(f"--teacher-checkpoint: {str(path)!r} does not exist (expected a timm/PyTorch weights file)")
    return digest
