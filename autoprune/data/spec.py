"""The `--data` spec (synthetic, imagefolder:PATH, cifar10:PATH, cifar100:PATH), `load_datasets`
that turns it into checked train/val/test splits for a model, and `model_data_config`."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from .cifar import _load_cifar
from .common import DataError, Datasets, _check_data_config
from .imagefolder import _load_imagefolder
from .synthetic import SyntheticOptions, _load_synthetic

KINDS = ("synthetic", "imagefolder", "cifar10", "cifar100")
_FORMS = "synthetic, imagefolder:PATH, cifar10:PATH, cifar100:PATH"


@dataclass(frozen=True)
class DataSpec:
    """Where the data comes from: `kind` is one of KINDS; `path` is None exactly for synthetic."""

    kind: str
    path: str | None = None

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise DataError(f"data kind {self.kind!r} is unknown; accepted: {_FORMS}")
        if (self.path is None) != (self.kind == "synthetic") or self.path == "":
            raise DataError(f"data kind {self.kind!r} with path {self.path!r} is invalid; accepted: {_FORMS}")

    def __str__(self) -> str:
        return self.kind if self.path is None else f"{self.kind}:{self.path}"


def parse_data_spec(text: str) -> DataSpec:
    """Parse the command-line form: "synthetic", "imagefolder:PATH", "cifar10:PATH", "cifar100:PATH"."""
    if isinstance(text, str):
        text = text.strip()
        if text == "synthetic":
            return DataSpec("synthetic")
        kind, colon, path = text.partition(":")
        if colon and path and kind in KINDS[1:]:
            return DataSpec(kind, path)
    raise DataError(f"data spec {text!r} is not understood; accepted: {_FORMS}")


def load_datasets(
    spec: DataSpec | str,
    data_config: dict,
    synthetic: SyntheticOptions = SyntheticOptions(),
    split_seed: int = 0,
) -> Datasets:
    """Build and validate train/val/test for `spec`, transformed for the model that `data_config`
    describes: timm's resolved data config; use `model_data_config(model)`, which fixes its
    input_size for models built at a non-default img_size.

    Everything is checked here so that bad data fails in seconds, not mid-run. `split_seed` fixes
    the stratified splits that image folders without train/val and CIFAR's val need; the synthetic
    task is fixed by `synthetic.seed` instead.
    """
    if not isinstance(spec, DataSpec):
        spec = parse_data_spec(spec)
    config = _check_data_config(data_config)
    if spec.kind == "synthetic":
        return _load_synthetic(synthetic, config)
    root = Path(spec.path).expanduser()
    if not root.exists():
        raise DataError(f"{spec.kind} path {str(root)!r} does not exist")
    if not root.is_dir():
        raise DataError(f"{spec.kind} path {str(root)!r} is not a directory")
    if spec.kind == "imagefolder":
        return _load_imagefolder(root, config, split_seed)
    return _load_cifar(spec.kind, root, config, split_seed)


def model_data_config(model: torch.nn.Module) -> dict:
    """timm's resolved data config for `model`, with `input_size` set to the size the model was
    built for: timm takes it from the pretrained config, so a ViT made with img_size=64 says 224."""
    from timm.data import resolve_data_config

    config = resolve_data_config({}, model=model)
    img_size = getattr(getattr(model, "patch_embed", None), "img_size", None)
    if img_size is not None and not getattr(model, "dynamic_img_size", False):
        config["input_size"] = (config["input_size"][0], *img_size)
    return config
