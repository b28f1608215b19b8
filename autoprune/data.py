"""Datasets and loaders for fine-tuning: a built-in synthetic task, image folders and CIFAR.

`load_datasets(spec, data_config)` checks everything it can before any training starts (paths,
class folders, balance, splits, that every image decodes) and raises `DataError` with a one-line
message naming the path or value and the problem. Every dataset yields (float image [C, H, W] at
the model's input size, normalised with its mean/std, int label). `make_loader` builds the
matching DataLoader. autoprune never downloads anything.
"""

from __future__ import annotations

import functools
import math
import os
import pickle
import random
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch.utils.data import DataLoader, Dataset, Subset
from torchvision.datasets import ImageFolder
from torchvision.datasets.folder import IMG_EXTENSIONS

KINDS = ("synthetic", "imagefolder", "cifar10", "cifar100")
_FORMS = "synthetic, imagefolder:PATH, cifar10:PATH, cifar100:PATH"

# the synthetic task: the object's texture and hue family are the class, its shape is a nuisance
TEXTURES = ("solid", "striped", "checked", "dotted", "speckled")
SHAPES = ("disk", "square", "triangle", "cross", "ring")
_FAMILIES = {  # number of hue families -> (name, hue interval in turns); one family: any hue
    1: (("", (0.0, 1.0)),),
    2: (("warm", (-0.08, 0.14)), ("cool", (0.47, 0.69))),
    3: (("red", (-0.05, 0.05)), ("green", (0.28, 0.38)), ("blue", (0.58, 0.68))),
    4: (("red", (-0.04, 0.04)), ("yellow", (0.12, 0.18)), ("green", (0.28, 0.38)), ("blue", (0.58, 0.68))),
}
MAX_SYNTHETIC_CLASSES = len(TEXTURES) * max(_FAMILIES)


class DataError(ValueError):
    """Data that autoprune cannot train on; the message (one line) names the path or value."""

    def __init__(self, message: str) -> None:
        super().__init__(" ".join(message.splitlines()))  # one line, whatever an error it quotes contains


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


@dataclass(frozen=True)
class SyntheticOptions:
    """Size and seed of the built-in synthetic task (see `synthetic_class_names` for the classes)."""

    num_classes: int = 10
    train_size: int = 5000
    val_size: int = 1000
    test_size: int = 1000  # 0: no test split
    image_size: int = 64
    seed: int = 0

    def __post_init__(self) -> None:
        for f in fields(self):
            value = getattr(self, f.name)
            if not isinstance(value, int) or isinstance(value, bool):
                raise DataError(f"SyntheticOptions.{f.name}: {value!r} is not an int")
        if not 2 <= self.num_classes <= MAX_SYNTHETIC_CLASSES:
            raise DataError(f"SyntheticOptions.num_classes: {self.num_classes} is out of range; "
                            f"accepted: 2 to {MAX_SYNTHETIC_CLASSES}")
        for name in ("train_size", "val_size"):
            if getattr(self, name) < self.num_classes:
                raise DataError(f"SyntheticOptions.{name}: {getattr(self, name)} is fewer than the "
                                f"{self.num_classes} classes; every class needs an image")
        if self.test_size != 0 and self.test_size < self.num_classes:
            raise DataError(f"SyntheticOptions.test_size: {self.test_size} is fewer than the "
                            f"{self.num_classes} classes; use 0 for no test split")
        if self.seed < 0:
            raise DataError(f"SyntheticOptions.seed: {self.seed} is negative; accepted: an int >= 0")
        if not 16 <= self.image_size <= 512:
            raise DataError(f"SyntheticOptions.image_size: {self.image_size} is out of range; accepted: 16 to 512")


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


def make_loader(
    dataset: Dataset,
    batch_size: int,
    train: bool,
    workers: int | None = None,
    device: str | torch.device = "cpu",
    seed: int = 0,
) -> DataLoader:
    """A DataLoader for one split: train shuffles (seeded) and drops the last partial batch.

    `workers` defaults to 0 for the in-memory synthetic data (worker processes only add IPC cost
    there) and to min(4, cores - 1) for file-backed data. Augmentation randomness is seeded from
    `seed` too, also in-process (workers=0), so the same seed gives the same batches.
    """
    if not isinstance(batch_size, int) or batch_size < 1:
        raise DataError(f"make_loader: batch_size {batch_size!r} is invalid; accepted: an int >= 1")
    if workers is None:
        workers = 0 if _in_memory(dataset) else min(4, max(0, _cpu_count() - 1))
    if workers < 0:
        raise DataError(f"make_loader: workers {workers!r} is invalid; accepted: an int >= 0 or None")
    device = torch.device(device)
    generator = torch.Generator()
    generator.manual_seed(seed)
    return _SeededLoader(
        dataset,
        batch_size=batch_size,
        shuffle=train,
        drop_last=train,
        num_workers=workers,
        pin_memory=device.type == "cuda" and torch.cuda.is_available(),
        persistent_workers=workers > 0,
        generator=generator,
    )


# --------------------------------------------------------------------------------------------
# shared helpers


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


def _cpu_count() -> int:
    try:
        return len(os.sched_getaffinity(0))  # the cores this process may use (containers, taskset)
    except AttributeError:
        return os.cpu_count() or 1


def _in_memory(dataset: Dataset) -> bool:
    while isinstance(dataset, Subset):
        dataset = dataset.dataset
    return isinstance(dataset, _SyntheticDataset)


class _SeededLoader(DataLoader):
    """A DataLoader whose in-process augmentation draws from its own seeded RNG stream.

    Worker processes are seeded from the loader's generator by PyTorch; with workers=0 the
    transforms would instead consume (and depend on) the training loop's global RNG. Here each
    epoch draws a data seed from the generator and the global torch/python/numpy RNG states are
    swapped in only while a batch is being fetched.
    """

    def __iter__(self) -> Iterator:
        batches = super().__iter__()
        if self.num_workers > 0:
            return batches
        seed = int(torch.randint(2**62, (), generator=self.generator))
        return _isolated(batches, seed)


def _isolated(batches: Iterator, seed: int) -> Iterator:
    torch_state = torch.Generator().manual_seed(seed).get_state()
    py_state = random.Random(seed).getstate()
    np_state = np.random.RandomState(seed % 2**32).get_state()
    while True:
        saved = torch.get_rng_state(), random.getstate(), np.random.get_state()
        torch.set_rng_state(torch_state)
        random.setstate(py_state)
        np.random.set_state(np_state)
        try:
            batch = next(batches)
        except StopIteration:
            return
        finally:
            torch_state, py_state, np_state = torch.get_rng_state(), random.getstate(), np.random.get_state()
            torch.set_rng_state(saved[0])
            random.setstate(saved[1])
            np.random.set_state(saved[2])
        yield batch


# --------------------------------------------------------------------------------------------
# image folders

_MIN_CLASS_SHARE = 0.1  # a class with fewer than this share of the largest class's images is an error


class _ImageFolder(ImageFolder):
    """torchvision's ImageFolder, minus hidden folders (.ipynb_checkpoints and the like)."""

    def find_classes(self, directory: str) -> tuple[list[str], dict[str, int]]:
        classes = _class_folders(Path(directory))
        return classes, {name: i for i, name in enumerate(classes)}


def _class_folders(root: Path) -> list[str]:
    return sorted(e.name for e in os.scandir(root) if e.is_dir() and not e.name.startswith("."))


def _scan_folder(root: Path, what: str) -> _ImageFolder:
    """The class folders under `root` as an ImageFolder (PIL output), validated."""
    if not _class_folders(root):
        raise DataError(f"imagefolder {what} {str(root)!r} has no class folders (expected {root}/CLASS/IMAGE)")
    folder = _ImageFolder(str(root), allow_empty=True)
    counts = Counter(folder.targets)
    for index, name in enumerate(folder.classes):
        if counts[index] == 0:
            raise DataError(f"imagefolder class folder {str(root / name)!r} has no images "
                            f"(extensions: {' '.join(IMG_EXTENSIONS)})")
    largest = max(folder.classes, key=lambda name: counts[folder.class_to_idx[name]])
    most = counts[folder.class_to_idx[largest]]
    for index, name in enumerate(folder.classes):
        if counts[index] < _MIN_CLASS_SHARE * most:
            raise DataError(f"imagefolder class folder {str(root / name)!r} is too small: {counts[index]} images, "
                            f"fewer than {_MIN_CLASS_SHARE:.0%} of the {most} in the largest class {largest!r}")
    return folder


def _verify_images(folder: _ImageFolder) -> None:
    """Open every file once (PIL verify: header and, for PNG, the checksums; about 10k files/s)."""
    for path, _ in folder.samples:
        try:
            with Image.open(path) as image:
                image.verify()
        except Exception as error:
            raise DataError(f"imagefolder image {path!r} cannot be decoded ({type(error).__name__}: {error})") from None


def _load_imagefolder(root: Path, config: _Config, split_seed: int) -> Datasets:
    train_tf, eval_tf = _timm_transform(config, True), _timm_transform(config, False)
    present = [name for name in ("train", "val", "test") if (root / name).is_dir()]
    if present and present[:2] != ["train", "val"]:
        raise DataError(f"imagefolder {str(root)!r} has {'/, '.join(present)}/ but not both train/ and val/; "
                        "use train/ + val/ (+ test/), or class folders directly")
    if not present:  # one folder of class folders: a stratified 80/10/10 split
        folder = _scan_folder(root, "folder")
        for name, n in zip(folder.classes, np.bincount(folder.targets, minlength=len(folder.classes))):
            if n < 3:
                raise DataError(f"imagefolder class folder {str(root / name)!r} has {n} images; the "
                                "80/10/10 train/val/test split needs at least 3 per class")
        _verify_images(folder)
        train, val, test = _stratified_split(folder.targets, (0.8, 0.1, 0.1), split_seed)
        return Datasets(_Transformed(folder, train, folder.targets, train_tf),
                        _Transformed(folder, val, folder.targets, eval_tf),
                        _Transformed(folder, test, folder.targets, eval_tf), list(folder.classes))
    folders = {name: _scan_folder(root / name, f"split {name!r}") for name in present}
    classes = folders["train"].classes
    for name, folder in folders.items():
        missing = sorted(set(classes) - set(folder.classes))
        extra = sorted(set(folder.classes) - set(classes))
        if missing:
            raise DataError(f"imagefolder split {name!r} at {str(root / name)!r} lacks class {missing[0]!r} "
                            f"(present in train/; missing: {', '.join(missing)})")
        if extra:
            raise DataError(f"imagefolder split {name!r} at {str(root / name)!r} has class {extra[0]!r} "
                            f"that train/ lacks (extra: {', '.join(extra)})")
    for folder in folders.values():
        _verify_images(folder)
    made = {name: _Transformed(folder, range(len(folder)), folder.targets, train_tf if name == "train" else eval_tf)
            for name, folder in folders.items()}
    return Datasets(made["train"], made["val"], made.get("test"), list(classes))


# --------------------------------------------------------------------------------------------
# CIFAR (torchvision's python-pickle layout)

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


# --------------------------------------------------------------------------------------------
# synthetic


def _families(num_classes: int) -> int:
    return -(-num_classes // len(TEXTURES))


def synthetic_class_names(num_classes: int) -> list[str]:
    """Class c is texture c % 5 in hue family c // 5: "striped" while 5 classes or fewer (any
    hue), else "striped-warm"/"-cool" (up to 10), red/green/blue (15), red/yellow/green/blue (20)."""
    families = _FAMILIES[_families(num_classes)]
    return [f"{TEXTURES[c % len(TEXTURES)]}-{families[c // len(TEXTURES)][0]}".rstrip("-") for c in range(num_classes)]


class _SyntheticDataset(Dataset):
    """The synthetic images, kept as uint8 [N, 3, S, S]; resized and normalised per item."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, config: _Config, train: bool) -> None:
        self.images, self.labels, self.train = images, labels, train
        self.targets = labels.tolist()
        self.size = config.input_size[1:]
        self.mode = {"bicubic": "bicubic", "nearest": "nearest"}.get(config.interpolation, "bilinear")
        self.mean = torch.tensor(config.mean).view(3, 1, 1)
        self.std = torch.tensor(config.std).view(3, 1, 1)

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        image = self.images[index].float().div_(255)
        if self.train and torch.rand(()) < 0.5:  # the only augmentation: cheap, and class-preserving
            image = image.flip(-1)
        if tuple(image.shape[1:]) != tuple(self.size):
            smaller = self.size[0] < image.shape[1] or self.size[1] < image.shape[2]
            image = F.interpolate(image[None], size=self.size, mode=self.mode,
                                  antialias=smaller and self.mode != "nearest")[0].clamp_(0, 1)
        return image.sub_(self.mean).div_(self.std), self.targets[index]


def _load_synthetic(options: SyntheticOptions, config: _Config) -> Datasets:
    def split(stream: int, size: int, train: bool) -> _SyntheticDataset:
        images, labels = generate_synthetic(options, stream, size)
        return _SyntheticDataset(images, labels, config, train)

    test = split(2, options.test_size, False) if options.test_size else None
    return Datasets(split(0, options.train_size, True), split(1, options.val_size, False), test,
                    synthetic_class_names(options.num_classes))


@functools.lru_cache(maxsize=6)
def generate_synthetic(options: SyntheticOptions, stream: int, size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """`size` images (uint8 [N, 3, S, S]) and balanced labels of stream 0/1/2 (train/val/test).

    Built so that token reduction matters: each image holds ONE object, covering 15-40 % of the
    image (bounding box) at a random position, scale and rotation, over clutter that carries no
    class information (a low-saturation background with low-contrast blobs, stripes and blotchy
    noise, colours independent of the class). The class is the object's texture (solid, striped,
    checked, dotted, speckled) and, beyond 5 classes, its hue family; its shape (disk, square,
    triangle, cross, ring) and exact colour vary freely. So the evidence sits in the object's
    tokens only, and most tokens are background that a ViT can drop. Texture rather than shape
    defines the class because it is what a small ViT learns in minutes on 2 CPU cores: with
    outline shapes as classes it stayed near 35 % after 10 epochs. Global statistics do not solve
    it: an MLP on the mean colour gets 20 % (the hue family), on mean/std/min/max per channel 48 %.

    Deterministic in (options, stream), across processes; streams are independent. Cached,
    since search trials in one process reuse the same data (do not modify the tensors).
    """
    rng = np.random.default_rng([options.seed, stream, 0x5A1E])
    labels = np.arange(size) % options.num_classes
    labels = labels[rng.permutation(size)]
    params = _draw_params(rng, labels, options.num_classes, options.image_size)
    generator = torch.Generator().manual_seed(int(rng.integers(2**62)))
    images = torch.empty(size, 3, options.image_size, options.image_size, dtype=torch.uint8)
    chunk = max(1, 2**21 // options.image_size**2)  # ~8 MB float planes per chunk
    for start in range(0, size, chunk):
        part = {k: torch.as_tensor(v[start:start + chunk], dtype=torch.float32) for k, v in params.items()}
        images[start:start + chunk] = _render(part, options.image_size, generator)
    return images, torch.as_tensor(labels, dtype=torch.int64)


_BLOBS = 6  # clutter ellipses per image


def _hsv_to_rgb(h: np.ndarray, s: np.ndarray, v: np.ndarray) -> np.ndarray:
    k = (np.array([5.0, 3.0, 1.0]) + (h[..., None] % 1.0) * 6) % 6
    return v[..., None] * (1 - s[..., None] * np.clip(np.minimum(k, 4 - k), 0, 1))


def _draw_params(rng: np.random.Generator, labels: np.ndarray, num_classes: int, size: int) -> dict[str, np.ndarray]:
    """Every random choice per image, drawn up front (so rendering in chunks changes nothing)."""
    n = len(labels)
    hue_range = np.array([r for _, r in _FAMILIES[_families(num_classes)]])[labels // len(TEXTURES)]
    p: dict[str, np.ndarray] = {"texture": labels % len(TEXTURES), "shape": rng.integers(len(SHAPES), size=n)}
    # background: a low-saturation base colour, low-contrast coloured blobs and stripes
    p["background"] = _hsv_to_rgb(rng.random(n), rng.uniform(0, 0.35, n), rng.uniform(0.2, 0.7, n))
    p["blob_x"], p["blob_y"] = rng.uniform(0, size, (2, n, _BLOBS))
    p["blob_rx"], p["blob_ry"] = rng.uniform(0.04, 0.3, (2, n, _BLOBS)) * size
    p["blob_colour"] = rng.normal(0, 0.07, (n, _BLOBS, 3))
    angle = rng.uniform(0, np.pi, n)
    wavelength = rng.uniform(0.06, 0.3, n) * size
    p["stripe_kx"], p["stripe_ky"] = np.stack([np.cos(angle), np.sin(angle)]) * 2 * np.pi / wavelength
    p["stripe_phase"] = rng.uniform(0, 2 * np.pi, n)
    p["stripe_colour"] = rng.normal(0, 0.035, (n, 3))
    p["noise_amp"] = rng.uniform(0.02, 0.06, n)
    # the object: bounding box 15-40 % of the image, anywhere inside it, any rotation
    radius = np.sqrt(rng.uniform(0.15, 0.40, n)) * size / 2
    p["radius"] = radius
    p["x"], p["y"] = rng.uniform(1.1 * radius, size - 1.1 * radius, (2, n))
    p["angle"] = rng.uniform(0, 2 * np.pi, n)
    hue = rng.uniform(hue_range[:, 0], hue_range[:, 1])
    p["colour"] = _hsv_to_rgb(hue, rng.uniform(0.5, 1, n), rng.uniform(0.6, 1, n))
    p["colour2"] = p["colour"] * rng.uniform(0.15, 0.45, (n, 1))  # the texture's darker shade
    p["period"] = rng.uniform(0.09, 0.14, n) * size
    p["phase_u"], p["phase_v"] = rng.uniform(0, 2 * np.pi, (2, n))
    return p


def _render(p: dict[str, torch.Tensor], size: int, generator: torch.Generator) -> torch.Tensor:
    """Draw a chunk of images from their parameters: masks from coordinate grids, all batched."""
    n = len(p["shape"])
    grid = torch.arange(size, dtype=torch.float32) + 0.5
    x, y = grid.view(1, 1, size), grid.view(1, size, 1)

    def col(t: torch.Tensor) -> torch.Tensor:  # per-image scalars broadcast over [n, size, size]
        return t.view(n, 1, 1)

    image = p["background"].view(n, 3, 1, 1).expand(n, 3, size, size).clone()
    for k in range(_BLOBS):
        d = ((x - col(p["blob_x"][:, k])) / col(p["blob_rx"][:, k])).square_() \
            + ((y - col(p["blob_y"][:, k])) / col(p["blob_ry"][:, k])).square_()
        alpha = d.neg_().add_(1).mul_(3).clamp_(0, 1)  # soft-edged ellipse
        image += alpha.unsqueeze(1) * p["blob_colour"][:, k].view(n, 3, 1, 1)
    wave = torch.sin(x * col(p["stripe_kx"]) + y * col(p["stripe_ky"]) + col(p["stripe_phase"]))
    image += wave.unsqueeze(1) * p["stripe_colour"].view(n, 3, 1, 1)
    for cells in (4, 8):  # blotchy low-frequency noise at two scales
        coarse = torch.randn(n, 3, cells, cells, generator=generator) * p["noise_amp"].view(n, 1, 1, 1)
        image += F.interpolate(coarse, size=(size, size), mode="bilinear", align_corners=False)

    # object frame: u, v in units of the radius; sdf = signed distance to the outline (pixels)
    radius = col(p["radius"])
    cos, sin = col(torch.cos(p["angle"])), col(torch.sin(p["angle"]))
    dx, dy = x - col(p["x"]), y - col(p["y"])
    u, v = (dx * cos + dy * sin) / radius, (dy * cos - dx * sin) / radius
    sdf = torch.empty(n, size, size)
    for index, shape in enumerate(SHAPES):
        sel = p["shape"] == index
        if sel.any():
            sdf[sel] = _shape_sdf(shape, u[sel], v[sel]) * radius[sel]
    alpha = (sdf + 0.5).clamp_(0, 1).unsqueeze(1)  # one pixel of anti-aliasing

    scale = radius * (2 * math.pi) / col(p["period"])
    a, b = u * scale + col(p["phase_u"]), v * scale + col(p["phase_v"])
    mix = torch.zeros(n, size, size)
    texture = p["texture"]
    for index, pattern in enumerate(TEXTURES[1:], start=1):
        sel = texture == index
        if sel.any():
            mix[sel] = _texture(pattern, a[sel], b[sel], generator, size)
    mix = mix.unsqueeze(1)
    obj = p["colour"].view(n, 3, 1, 1) * (1 - mix) + p["colour2"].view(n, 3, 1, 1) * mix
    image += alpha * (obj - image)
    image += torch.randn(image.shape, generator=generator) * 0.02
    return image.clamp_(0, 1).mul_(255).round_().to(torch.uint8)


def _texture(pattern: str, a: torch.Tensor, b: torch.Tensor, generator: torch.Generator, size: int) -> torch.Tensor:
    """Share of the darker shade per pixel (0..1); a, b are phases along the object's axes."""
    if pattern == "striped":
        return (torch.sin(a) * 2 + 0.5).clamp_(0, 1)
    if pattern == "checked":  # cells of half a period
        return (torch.sin(a) * torch.sin(b) * 4 + 0.5).clamp_(0, 1)
    if pattern == "dotted":  # round dots, one per period
        return ((torch.cos(a) + torch.cos(b) - 1.1) * 3).clamp_(0, 1)
    # speckled: random 2x2-pixel grains, about 40 % dark
    grains = torch.rand(len(a), (size + 1) // 2, (size + 1) // 2, generator=generator) < 0.4
    return grains.repeat_interleave(2, 1).repeat_interleave(2, 2)[:, :size, :size].float()


def _shape_sdf(shape: str, u: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Signed distance (inside > 0) to each outline, in radius units; areas are 1.9-3.1 r^2."""
    if shape == "disk":
        return 1 - torch.sqrt(u * u + v * v)
    if shape == "square":  # area pi, like the disk
        return 0.886 - torch.maximum(u.abs(), v.abs())
    if shape == "triangle":  # equilateral, circumradius 1.2
        edges = [u * math.cos(a) + v * math.sin(a) for a in (math.pi / 2, math.pi * 7 / 6, math.pi * 11 / 6)]
        return 0.6 - torch.maximum(torch.maximum(edges[0], edges[1]), edges[2])
    if shape == "cross":  # two bars 0.7 wide
        au, av = u.abs(), v.abs()
        return torch.maximum(torch.minimum(0.35 - au, 1 - av), torch.minimum(0.35 - av, 1 - au))
    rho = torch.sqrt(u * u + v * v)  # ring
    return torch.minimum(rho - 0.5, 1 - rho)
