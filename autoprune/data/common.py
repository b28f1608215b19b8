"""What every data source shares: `DataError`, the `Datasets` a loader returns, the checked
model data config, timm's transforms, and deterministic stratified splits."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset


class DataError(ValueError):
    """Data that autoprune cannot train on; the message (one line) names the path or value."""

    def __init__(self, message: str) -> None:
        super().__init__(" ".join(message.splitlines()))  # one line, whatever an error it quotes contains


@dataclass
class Datasets:
    """The splits one run uses. `test` is None when the data has no test split."""

    train: Dataset
    val: Dataset
    test: Dataset | None
    classes: list[str]

    @property
    def num_classes(self) -> int:
        return len(self.classes)


@dataclass(frozen=True)
class _Config:
    input_size: tuple[int, int, int]
    mean: tuple[float, ...]
    std: tuple[float, ...]
    interpolation: str
    raw: dict


def _check_data_config(data_config: Any) -> _Config:
    """The fields of timm's resolved data config that autoprune uses, checked."""
    if not isinstance(data_config, dict):
        raise DataError(f"data_config {data_config!r} is not a dict; pass model_data_config(model)")
    try:
        size = tuple(int(v) for v in data_config["input_size"])
        mean = tuple(float(v) for v in data_config["mean"])
        std = tuple(float(v) for v in data_config["std"])
    except (KeyError, TypeError, ValueError):
        raise DataError(f"data_config {data_config!r} lacks input_size/mean/std; "
                        "pass model_data_config(model)") from None
    if len(size) != 3 or size[0] != 3 or min(size) < 1:
        raise DataError(f"data_config input_size {size} is unsupported; accepted: (3, H, W) (RGB models)")
    if len(mean) != 3 or len(std) != 3 or min(std) <= 0:
        raise DataError(f"data_config mean {mean} / std {std} are invalid; accepted: 3 values each, std > 0")
    return _Config(size, mean, std, str(data_config.get("interpolation", "bilinear")), data_config)


def _timm_transform(config: _Config, train: bool):
    """timm's own train augmentation / eval resize-and-crop for the model, on PIL images."""
    from timm.data import create_transform

    keys = ("input_size", "interpolation", "mean", "std", "crop_pct", "crop_mode")
    return create_transform(**{k: config.raw[k] for k in keys if k in config.raw}, is_training=train)


class _Transformed(Dataset):
    """`indices` of a base dataset that yields (PIL image, label), with `transform` applied."""

    def __init__(self, base: Dataset, indices: Sequence[int], targets: Sequence[int], transform) -> None:
        self.base, self.indices, self.transform = base, list(indices), transform
        self.targets = [int(targets[i]) for i in self.indices]

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        image, label = self.base[self.indices[index]]
        return self.transform(image), int(label)


def _stratified_split(targets: Sequence[int], fractions: Sequence[float], seed: int) -> list[list[int]]:
    """Split indices per class by `fractions` (the first split takes the rest), deterministically.

    Every later split gets at least one image of each class that has enough for all splits, so
    that no class is missing from val/test.
    """
    rng = np.random.default_rng([seed, 0x5B117])
    by_class: dict[int, list[int]] = {}
    for index, label in enumerate(targets):
        by_class.setdefault(int(label), []).append(index)
    splits: list[list[int]] = [[] for _ in range(len(fractions))]
    for label in sorted(by_class):
        members = np.array(by_class[label])[rng.permutation(len(by_class[label]))]
        n = len(members)
        sizes = [max(1, round(f * n)) if n >= len(fractions) else 0 for f in fractions[1:]]
        start = n - sum(sizes)
        splits[0].extend(members[:start].tolist())
        for split, size in zip(splits[1:], sizes):
            split.extend(members[start:start + size].tolist())
            start += size
    return [sorted(s) for s in splits]
