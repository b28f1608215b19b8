"""CIFAR-10/100 from torchvision's python-pickle files (`--data cifar10:PATH`); never downloaded."""

from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np
from PIL import Image
from torch.utils.data import Dataset

from .common import DataError, Datasets, _Config, _stratified_split, _timm_transform, _Transformed

_CIFAR = {
    "cifar10": ("cifar-10-batches-py", [f"data_batch_{i}" for i in range(1, 6)], "test_batch",
                "batches.meta", "label_names", "labels"),
    "cifar100": ("cifar-100-python", ["train"], "test", "meta", "fine_label_names", "fine_labels"),
}


class _ArrayImages(Dataset):
    """uint8 HWC images in memory, yielded as PIL images so that timm's transforms apply as-is."""

    def __init__(self, images: np.ndarray, labels: np.ndarray) -> None:
        self.images, self.labels = images, labels

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int) -> tuple[Image.Image, int]:
        return Image.fromarray(self.images[index]), int(self.labels[index])


def _read_pickle(path: Path, kind: str) -> dict:
    try:
        with path.open("rb") as handle:
            content = pickle.load(handle, encoding="latin1")
    except Exception as error:
        raise DataError(f"{kind} file {str(path)!r} cannot be read as a CIFAR pickle "
                        f"({type(error).__name__}: {error})") from None
    if not isinstance(content, dict):
        raise DataError(f"{kind} file {str(path)!r} is not a CIFAR pickle (expected a dict)")
    return content


def _read_cifar_batches(
    paths: list[Path], kind: str, label_key: str, num_classes: int
) -> tuple[np.ndarray, np.ndarray]:
    images, labels = [], []
    for path in paths:
        batch = _read_pickle(path, kind)
        try:
            data = np.asarray(batch["data"], dtype=np.uint8)
            targets = np.asarray(batch[label_key], dtype=np.int64)
        except (KeyError, TypeError, ValueError) as error:
            raise DataError(f"{kind} file {str(path)!r} is not a CIFAR batch (no usable 'data'/{label_key!r}: "
                            f"{type(error).__name__})") from None
        if data.ndim != 2 or data.shape[1] != 3072 or targets.shape != (len(data),):
            raise DataError(f"{kind} file {str(path)!r} is not a CIFAR batch (data {data.shape}, "
                            f"{label_key} {targets.shape}; expected (N, 3072) and (N,))")
        if len(targets) and (targets.min() < 0 or targets.max() >= num_classes):
            raise DataError(f"{kind} file {str(path)!r} has labels outside 0..{num_classes - 1}")
        images.append(data.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1))
        labels.append(targets)
    return np.ascontiguousarray(np.concatenate(images)), np.concatenate(labels)


def _load_cifar(kind: str, root: Path, config: _Config, split_seed: int) -> Datasets:
    folder_name, train_files, test_file, meta_file, names_key, label_key = _CIFAR[kind]
    folder = root / folder_name
    for name in [meta_file, *train_files, test_file]:
        if not (folder / name).is_file():
            raise DataError(f"{kind} path {str(root)!r} lacks {folder_name}/{name}: expected the extracted "
                            f"python version of the dataset ({folder_name}/) there; autoprune never downloads")
    meta = _read_pickle(folder / meta_file, kind)
    classes = meta.get(names_key)
    if not isinstance(classes, list) or not classes:
        raise DataError(f"{kind} file {str(folder / meta_file)!r} has no {names_key!r} list")
    classes = [str(name) for name in classes]
    train_images, train_labels = _read_cifar_batches([folder / f for f in train_files], kind, label_key, len(classes))
    test_images, test_labels = _read_cifar_batches([folder / test_file], kind, label_key, len(classes))
    base, test_base = _ArrayImages(train_images, train_labels), _ArrayImages(test_images, test_labels)
    train, val = _stratified_split(train_labels, (0.9, 0.1), split_seed)
    train_tf, eval_tf = _timm_transform(config, True), _timm_transform(config, False)
    return Datasets(_Transformed(base, train, train_labels, train_tf),
                    _Transformed(base, val, train_labels, eval_tf),
                    _Transformed(test_base, range(len(test_base)), test_labels, eval_tf), classes)
