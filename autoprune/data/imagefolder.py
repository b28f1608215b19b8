"""Image folders (`--data imagefolder:PATH`): class subfolders, with or without train/val/test
splits, every image checked to decode before training starts. Images come as people have them
(grayscale, 16-bit, palette, transparent, rotated by an EXIF tag, any size): each is read as an
upright 8-bit RGB image, and the model's transforms bring it to the model's input size."""

from __future__ import annotations

import os
from collections import Counter
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps
from torchvision.datasets import ImageFolder
from torchvision.datasets.folder import IMG_EXTENSIONS

from .common import DataError, Datasets, _Config, _stratified_split, _timm_transform, _Transformed

_MIN_CLASS_SHARE = 0.1  # a class with fewer than this share of the largest class's images is an error


_BACKGROUND = (255, 255, 255)  # what transparent pixels show: the white they are usually viewed on
_SIXTEEN_BIT = ("I;16", "I;16B", "I;16L", "I")  # PIL's modes for 16-bit grayscale (PNG, TIFF)


def load_rgb(path: str) -> Image.Image:
    """An image file as the upright 8-bit RGB image a viewer shows. PIL's own convert("RGB") gets
    three cases wrong: 16-bit grayscale saturates to white, transparent pixels show whatever colour
    they hide, and the EXIF orientation of camera images is ignored."""
    with Image.open(path) as image:
        image = ImageOps.exif_transpose(image)
        if image.mode in _SIXTEEN_BIT:
            image = Image.fromarray((np.asarray(image, dtype=np.float32) / 257).round().clip(0, 255).astype(np.uint8))
        if image.mode in ("RGBA", "LA", "PA") or "transparency" in image.info:
            image = image.convert("RGBA")
            background = Image.new("RGBA", image.size, (*_BACKGROUND, 255))
            return Image.alpha_composite(background, image).convert("RGB")
        return image.convert("RGB")


class _ImageFolder(ImageFolder):
    """torchvision's ImageFolder, minus hidden folders (.ipynb_checkpoints and the like), reading
    every image with `load_rgb`."""

    def __init__(self, root: str, allow_empty: bool = False) -> None:
        super().__init__(root, loader=load_rgb, allow_empty=allow_empty)

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
