"""Datasets and loaders for fine-tuning: a built-in synthetic task, image folders and CIFAR.

`load_datasets(spec, data_config)` checks everything it can before any training starts (paths,
class folders, balance, splits, that every image decodes) and raises `DataError` with a one-line
message naming the path or value and the problem. Every dataset yields (float image [C, H, W] at
the model's input size, normalised with its mean/std, int label). `make_loader` builds the
matching DataLoader. autoprune never downloads anything.

One module per part: `spec` (the `--data` spec, `load_datasets`, `model_data_config`), `loaders`
(`make_loader` and its seeding), `imagefolder`, `cifar`, `synthetic` (`SyntheticOptions` and the
generator), `common` (`DataError`, `Datasets`, transforms, splits).
"""

from .common import DataError, Datasets
from .loaders import make_loader
from .spec import KINDS, DataSpec, load_datasets, model_data_config, parse_data_spec
from .synthetic import (MAX_SYNTHETIC_CLASSES, SHAPES, TEXTURES, SyntheticOptions, generate_synthetic,
                        synthetic_class_names)

__all__ = ["KINDS", "MAX_SYNTHETIC_CLASSES", "SHAPES", "TEXTURES", "DataError", "DataSpec", "Datasets",
           "SyntheticOptions", "generate_synthetic", "load_datasets", "make_loader", "model_data_config",
           "parse_data_spec", "synthetic_class_names"]
