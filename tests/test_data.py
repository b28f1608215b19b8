"""The data layer: synthetic task, image folders, CIFAR, bad input and loaders (offline, tiny data)."""

from __future__ import annotations

import hashlib
import pickle
import random
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import timm
import torch
from PIL import Image

from autoprune.data import (
    DataError,
    Datasets,
    DataSpec,
    SyntheticOptions,
    generate_synthetic,
    load_datasets,
    make_loader,
    model_data_config,
    parse_data_spec,
    synthetic_class_names,
)

SMALL = SyntheticOptions(num_classes=4, train_size=40, val_size=12, test_size=8, image_size=32, seed=3)


@pytest.fixture(scope="module")
def config32() -> dict:
    """timm's data config for a tiny ViT with 32x32 input (mean/std 0.5)."""
    model = timm.create_model("vit_tiny_patch16_224", img_size=32, patch_size=8, depth=1, num_classes=4)
    return model_data_config(model)


def fresh(options: SyntheticOptions, stream: int, size: int):
    """Generate without the in-process cache."""
    return generate_synthetic.__wrapped__(options, stream, size)


def digest(images: torch.Tensor, labels: torch.Tensor) -> str:
    return hashlib.sha256(images.numpy().tobytes() + labels.numpy().tobytes()).hexdigest()


def check_error(excinfo, *parts: str) -> None:
    message = str(excinfo.value)
    assert "\n" not in message and "\r" not in message
    for part in parts:
        assert part in message, (part, message)


# ---------------------------------------------------------------------------------- specs


def test_parse_data_spec():
    assert parse_data_spec("synthetic") == DataSpec("synthetic", None)
    assert parse_data_spec("imagefolder:/data/x") == DataSpec("imagefolder", "/data/x")
    assert parse_data_spec("cifar10:rel/dir") == DataSpec("cifar10", "rel/dir")
    assert parse_data_spec("cifar100:/a:b") == DataSpec("cifar100", "/a:b")
    for bad in ("", "imagenet:/x", "imagefolder", "imagefolder:", "synthetic:/x", "cifar10"):
        with pytest.raises(DataError) as excinfo:
            parse_data_spec(bad)
        check_error(excinfo, repr(bad), "imagefolder:PATH", "cifar100:PATH")
    for kind, path in (("imagefolder", None), ("imagefolder", ""), ("synthetic", "/x"), ("mnist", "/x")):
        with pytest.raises(DataError):
            DataSpec(kind, path)


def test_model_data_config_uses_the_models_input_size(config32):
    assert config32["input_size"] == (3, 32, 32)
    assert {"mean", "std", "interpolation", "crop_pct"} <= set(config32)


def test_bad_data_config():
    with pytest.raises(DataError) as excinfo:
        load_datasets("synthetic", {"input_size": (3, 32, 32)})
    check_error(excinfo, "input_size/mean/std")


# ---------------------------------------------------------------------------------- synthetic


def test_synthetic_deterministic_and_seed_dependent():
    a, b = fresh(SMALL, 0, 40), fresh(SMALL, 0, 40)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    assert a[0].dtype == torch.uint8 and a[0].shape == (40, 3, 32, 32)
    other = fresh(SyntheticOptions(**{**SMALL.__dict__, "seed": 4}), 0, 40)
    assert not torch.equal(a[0], other[0])


def test_synthetic_identical_across_processes():
    options = SyntheticOptions(num_classes=10, train_size=30, val_size=10, test_size=10, image_size=24, seed=7)
    code = ("import hashlib; from autoprune.data import SyntheticOptions, generate_synthetic as g; "
            f"x, y = g({options!r}, 1, 30); "
            "print(hashlib.sha256(x.numpy().tobytes() + y.numpy().tobytes()).hexdigest())")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         cwd=Path(__file__).parents[1])
    assert out.stdout.strip() == digest(*fresh(options, 1, 30))


def test_synthetic_balanced_and_named():
    _, labels = fresh(SyntheticOptions(num_classes=7, train_size=70, val_size=7, test_size=0), 0, 70)
    assert torch.bincount(labels).tolist() == [10] * 7
    _, labels = fresh(SyntheticOptions(num_classes=4, train_size=10, val_size=4), 0, 10)
    counts = torch.bincount(labels, minlength=4)
    assert counts.max() - counts.min() <= 1 and counts.sum() == 10
    assert synthetic_class_names(2) == ["solid", "striped"]
    assert synthetic_class_names(10)[:2] == ["solid-warm", "striped-warm"]
    assert synthetic_class_names(10)[9] == "speckled-cool"
    names20 = synthetic_class_names(20)
    assert len(set(names20)) == 20 and names20[-1] == "speckled-blue"


def test_synthetic_splits_disjoint(config32):
    data = load_datasets("synthetic", config32, SMALL)
    assert isinstance(data, Datasets) and data.num_classes == 4 and data.classes == synthetic_class_names(4)
    assert (len(data.train), len(data.val), len(data.test)) == (40, 12, 8)
    hashes = [{hashlib.sha1(img.numpy().tobytes()).digest() for img in split.images}
              for split in (data.train, data.val, data.test)]
    assert len(hashes[0]) == 40 and not (hashes[0] & hashes[1] or hashes[0] & hashes[2] or hashes[1] & hashes[2])


def test_synthetic_items_at_model_size_and_normalised(config32):
    data = load_datasets("synthetic", config32, SMALL)
    image, label = data.val[0]
    assert image.shape == (3, 32, 32) and image.dtype == torch.float32 and isinstance(label, int)
    std, mean = torch.tensor(config32["std"]).view(3, 1, 1), torch.tensor(config32["mean"]).view(3, 1, 1)
    assert torch.allclose(image * std + mean, data.val.images[0].float() / 255, atol=1e-6)
    # generated at 48, returned at the model's 32 (and at a non-square size)
    big = SyntheticOptions(**{**SMALL.__dict__, "image_size": 48})
    image, _ = load_datasets("synthetic", config32, big).val[0]
    assert image.shape == (3, 32, 32) and torch.isfinite(image).all()
    wide = {**config32, "input_size": (3, 40, 56), "mean": (0.485, 0.456, 0.406), "std": (0.229, 0.224, 0.225)}
    image, _ = load_datasets("synthetic", wide, SMALL).train[0]
    assert image.shape == (3, 40, 56)
    assert (image * torch.tensor(wide["std"]).view(3, 1, 1) + torch.tensor(wide["mean"]).view(3, 1, 1)).min() > -1e-5


def test_synthetic_train_flips_only(config32):
    data = load_datasets("synthetic", config32, SMALL)
    plain = (data.train.images[5].float() / 255 - 0.5) / 0.5  # config32: mean = std = 0.5
    torch.manual_seed(0)
    items = [data.train[5][0] for _ in range(20)]
    assert all(torch.allclose(x, plain) or torch.allclose(x, plain.flip(-1)) for x in items)
    assert any(torch.allclose(x, plain) for x in items) and any(torch.allclose(x, plain.flip(-1)) for x in items)
    assert all(torch.allclose(data.val[5][0], (data.val.images[5].float() / 255 - 0.5) / 0.5) for _ in range(5))


def test_synthetic_options_validated():
    for kwargs, field in (({"num_classes": 1}, "num_classes"), ({"num_classes": 21}, "num_classes"),
                          ({"train_size": 3}, "train_size"), ({"image_size": 8}, "image_size"),
                          ({"test_size": 5}, "test_size"), ({"seed": 1.5}, "seed")):
        with pytest.raises(DataError) as excinfo:
            SyntheticOptions(**kwargs)
        check_error(excinfo, f"SyntheticOptions.{field}")


# ---------------------------------------------------------------------------------- image folders


def write_images(folder: Path, count: int, fmt: str = "png", seed: int = 0) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for i in range(count):
        pixels = rng.integers(0, 256, (12, 10, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(folder / f"img{i}.{fmt}")


def make_split_folder(root: Path, classes=("a", "b", "c"), test: bool = True) -> Path:
    for split, count in (("train", 6), ("val", 2), ("test", 2)):
        if split == "test" and not test:
            continue
        for k, name in enumerate(classes):
            write_images(root / split / name, count, "png" if k % 2 else "jpg", seed=k)
    return root


def test_imagefolder_with_splits(tmp_path, config32):
    root = make_split_folder(tmp_path / "data")
    data = load_datasets(f"imagefolder:{root}", config32)
    assert data.classes == ["a", "b", "c"] and data.num_classes == 3
    assert (len(data.train), len(data.val), len(data.test)) == (18, 6, 6)
    image, label = data.train[0]
    assert image.shape == (3, 32, 32) and image.dtype == torch.float32 and label == 0
    image, label = data.val[5]
    assert image.shape == (3, 32, 32) and label == 2
    no_test = load_datasets(f"imagefolder:{make_split_folder(tmp_path / 'nt', test=False)}", config32)
    assert no_test.test is None and len(no_test.val) == 6


def test_imagefolder_single_folder_stratified_split(tmp_path, config32):
    root = tmp_path / "flat"
    for k, name in enumerate(("cat", "dog")):
        write_images(root / name, 10 if k == 0 else 20, seed=k)
    (root / ".ipynb_checkpoints").mkdir()  # hidden folders are not classes
    data = load_datasets(f"imagefolder:{root}", config32, split_seed=1)
    assert data.classes == ["cat", "dog"]
    splits = (data.train, data.val, data.test)
    assert [len(s) for s in splits] == [24, 3, 3]
    assert [np.bincount(s.targets).tolist() for s in splits] == [[8, 16], [1, 2], [1, 2]]
    indices = [set(s.indices) for s in splits]
    assert set().union(*indices) == set(range(30)) and sum(map(len, indices)) == 30
    again = load_datasets(f"imagefolder:{root}", config32, split_seed=1)
    assert again.val.indices == data.val.indices
    other = load_datasets(f"imagefolder:{root}", config32, split_seed=2)
    assert other.train.indices != data.train.indices
    assert data.test[0][0].shape == (3, 32, 32)


# ---------------------------------------------------------------------------------- CIFAR


def write_cifar(root: Path, kind: str, per_class: int) -> Path:
    rng = np.random.default_rng(0)
    if kind == "cifar10":
        folder, classes, key = root / "cifar-10-batches-py", 10, "labels"
        files = [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]
        meta = ("batches.meta", {"label_names": [f"c{i}" for i in range(classes)], "num_vis": 3072})
    else:
        folder, classes, key = root / "cifar-100-python", 100, "fine_labels"
        files = ["train", "test"]
        meta = ("meta", {"fine_label_names": [f"f{i}" for i in range(classes)], "coarse_label_names": ["x"]})
    folder.mkdir(parents=True)
    for name in files:
        labels = [i % classes for i in range(classes * per_class)]
        batch = {"data": rng.integers(0, 256, (len(labels), 3072), dtype=np.uint8), key: labels,
                 "filenames": [f"{i}.png" for i in range(len(labels))]}
        (folder / name).write_bytes(pickle.dumps(batch))
    (folder / meta[0]).write_bytes(pickle.dumps(meta[1]))
    return root


def test_cifar10(tmp_path, config32):
    root = write_cifar(tmp_path, "cifar10", per_class=2)  # 5 batches x 20 + test 20
    data = load_datasets(f"cifar10:{root}", config32, split_seed=0)
    assert data.classes == [f"c{i}" for i in range(10)]
    assert (len(data.train), len(data.val), len(data.test)) == (90, 10, 20)
    assert np.bincount(data.val.targets).tolist() == [1] * 10
    assert not set(data.train.indices) & set(data.val.indices)
    image, label = data.test[3]
    assert image.shape == (3, 32, 32) and label == 3
    assert data.train[0][0].shape == (3, 32, 32)


def test_cifar100(tmp_path, config32):
    root = write_cifar(tmp_path, "cifar100", per_class=2)
    data = load_datasets(f"cifar100:{root}", config32)
    assert data.num_classes == 100 and data.classes[7] == "f7"
    assert (len(data.train), len(data.val), len(data.test)) == (100, 100, 200)
    assert data.val[0][0].shape == (3, 32, 32)


# ---------------------------------------------------------------------------------- bad input


def test_missing_path_and_not_a_directory(tmp_path, config32):
    missing = tmp_path / "nowhere"
    for kind in ("imagefolder", "cifar10"):
        with pytest.raises(DataError) as excinfo:
            load_datasets(f"{kind}:{missing}", config32)
        check_error(excinfo, str(missing), "does not exist")
    file = tmp_path / "file.txt"
    file.write_text("x")
    with pytest.raises(DataError) as excinfo:
        load_datasets(f"imagefolder:{file}", config32)
    check_error(excinfo, str(file), "is not a directory")


def test_empty_folder(tmp_path, config32):
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "readme.txt").write_text("no classes here")
    with pytest.raises(DataError) as excinfo:
        load_datasets(f"imagefolder:{tmp_path / 'empty'}", config32)
    check_error(excinfo, str(tmp_path / "empty"), "no class folders")


def test_class_folder_without_images(tmp_path, config32):
    root = tmp_path / "d"
    write_images(root / "a", 5)
    (root / "b").mkdir()
    (root / "b" / "notes.txt").write_text("not an image")
    with pytest.raises(DataError) as excinfo:
        load_datasets(f"imagefolder:{root}", config32)
    check_error(excinfo, str(root / "b"), "has no images")


def test_unbalanced_classes(tmp_path, config32):
    root = tmp_path / "d"
    write_images(root / "big", 40)
    write_images(root / "small", 3)
    with pytest.raises(DataError) as excinfo:
        load_datasets(f"imagefolder:{root}", config32)
    check_error(excinfo, str(root / "small"), "3 images", "10%", "40", "'big'")
    write_images(root / "small", 4)  # exactly 10 %: accepted
    assert load_datasets(f"imagefolder:{root}", config32).num_classes == 2


def test_split_missing_a_class(tmp_path, config32):
    root = make_split_folder(tmp_path / "d")
    for path in (root / "val" / "b").iterdir():
        path.unlink()
    (root / "val" / "b").rmdir()
    with pytest.raises(DataError) as excinfo:
        load_datasets(f"imagefolder:{root}", config32)
    check_error(excinfo, str(root / "val"), "split 'val'", "lacks class 'b'")
    write_images(root / "test" / "zebra", 2)
    write_images(root / "val" / "b", 2)
    with pytest.raises(DataError) as excinfo:
        load_datasets(f"imagefolder:{root}", config32)
    check_error(excinfo, str(root / "test"), "split 'test'", "'zebra'", "train/ lacks")


def test_train_without_val(tmp_path, config32):
    root = tmp_path / "d"
    write_images(root / "train" / "a", 3)
    with pytest.raises(DataError) as excinfo:
        load_datasets(f"imagefolder:{root}", config32)
    check_error(excinfo, str(root), "not both train/ and val/")


@pytest.mark.parametrize("damage", ["garbage", "truncated_png"])
def test_undecodable_image(tmp_path, config32, damage):
    root = make_split_folder(tmp_path / "d")
    bad = root / "val" / "b" / "img1.png"
    if damage == "garbage":
        bad.write_bytes(b"this is not a png at all" * 10)
    else:
        bad.write_bytes(bad.read_bytes()[:-30])
    with pytest.raises(DataError) as excinfo:
        load_datasets(f"imagefolder:{root}", config32)
    check_error(excinfo, str(bad), "cannot be decoded")


@pytest.mark.parametrize("kind", ["cifar10", "cifar100"])
def test_cifar_files_missing(tmp_path, config32, kind):
    with pytest.raises(DataError) as excinfo:
        load_datasets(f"{kind}:{tmp_path}", config32)
    folder = "cifar-10-batches-py" if kind == "cifar10" else "cifar-100-python"
    check_error(excinfo, str(tmp_path), folder, "never downloads")
    root = write_cifar(tmp_path / "partial", kind, per_class=1)
    victim = root / folder / ("data_batch_3" if kind == "cifar10" else "test")
    victim.unlink()
    with pytest.raises(DataError) as excinfo:
        load_datasets(f"{kind}:{root}", config32)
    check_error(excinfo, str(root), f"{folder}/{victim.name}", "never downloads")
    victim.write_bytes(b"not a pickle")
    with pytest.raises(DataError) as excinfo:
        load_datasets(f"{kind}:{root}", config32)
    check_error(excinfo, str(victim), "cannot be read")


# ---------------------------------------------------------------------------------- loaders


def batches(loader) -> list[tuple[torch.Tensor, torch.Tensor]]:
    return [(x.clone(), y.clone()) for x, y in loader]


def test_make_loader_synthetic(config32):
    data = load_datasets("synthetic", config32, SMALL)
    loader = make_loader(data.train, 16, train=True, seed=5)
    assert loader.num_workers == 0 and not loader.pin_memory
    first = batches(loader)
    assert len(first) == len(loader) == 2  # 40 // 16, the partial batch dropped
    x, y = first[0]
    assert x.shape == (16, 3, 32, 32) and x.dtype == torch.float32 and y.dtype == torch.int64
    # same seed, same batches (order and flips), whatever the global RNG does meanwhile
    torch.manual_seed(123)
    random.seed(123)
    before = torch.rand(3)
    torch.manual_seed(123)
    random.seed(123)
    second = batches(make_loader(data.train, 16, train=True, seed=5))
    assert torch.equal(torch.rand(3), before)  # the loader left the global RNG alone
    assert all(torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) for a, b in zip(first, second))
    epoch2 = batches(loader)  # a new epoch: a new order
    assert not torch.equal(epoch2[0][1], first[0][1]) or not torch.equal(epoch2[0][0], first[0][0])
    other = batches(make_loader(data.train, 16, train=True, seed=6))
    assert not torch.equal(other[0][1], first[0][1]) or not torch.equal(other[0][0], first[0][0])
    evaluation = batches(make_loader(data.val, 5, train=False))
    assert [len(y) for _, y in evaluation] == [5, 5, 2]
    assert torch.equal(torch.cat([y for _, y in evaluation]), data.val.labels)


def test_make_loader_files(tmp_path, config32):
    data = load_datasets(f"imagefolder:{make_split_folder(tmp_path / 'd')}", config32)
    loader = make_loader(data.train, 4, train=True, seed=1)
    cores = len(__import__("os").sched_getaffinity(0))
    assert loader.num_workers == min(4, cores - 1) and loader.persistent_workers == (cores > 1)
    in_process = [batches(make_loader(data.train, 4, train=True, workers=0, seed=1)) for _ in range(2)]
    assert len(in_process[0]) == 4 and in_process[0][0][0].shape == (4, 3, 32, 32)
    assert all(torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) for a, b in zip(*in_process))
    worker = [batches(make_loader(data.train, 4, train=True, workers=1, seed=1)) for _ in range(2)]
    assert all(torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) for a, b in zip(*worker))
    with pytest.raises(DataError) as excinfo:
        make_loader(data.train, 0, train=True)
    check_error(excinfo, "batch_size 0")
