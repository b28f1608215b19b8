"""The built-in synthetic task (`--data synthetic`): images of a textured, coloured object on
clutter, where texture and hue family are the class and shape is a nuisance. Generated from a
seed, in memory, identical on every machine."""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass, fields

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import Dataset

from .common import DataError, Datasets, _Config

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
