"""Bringing your own model and data: image folders as people have them, recipes from the command
line and --config, the baseline gate (near chance: stop before any trial), and a checkpoint
already trained on the data taken as it is (--baseline-epochs 0)."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import optuna
import pytest
import timm
import torch
from PIL import Image

from autoprune.cli import main
from autoprune.data import (DataError, SyntheticOptions, generate_synthetic, load_datasets, make_loader,
                            model_data_config, synthetic_class_names)
from autoprune.data.imagefolder import load_rgb
from autoprune.presets import FINE_TUNE, FROM_SCRATCH, get_preset
from autoprune.search import SearchError, SearchSettings, search
from autoprune.search.baseline_gate import baseline_refusal
from autoprune.study_attrs import DENSE_ATTR, SETTINGS_ATTR
from autoprune.train import TrainConfig, evaluate, fine_tune
from autoprune.trial import ModelSpec

KWARGS = "img_size=32,patch_size=8,embed_dim=48,depth=2,num_heads=3"
TINY = ["--model", "vit_tiny_patch16_224", "--model-kwargs", KWARGS]
SIZES = [(20, 20), (48, 30), (33, 57), (64, 64), (17, 40)]


def write_gray_folder(root: Path, classes: int = 4, train: int = 8, val: int = 4) -> Path:
    """train/ and val/ class folders of grayscale PNGs of different sizes, each class a different
    brightness; in class c0 of train/ one palette, one RGBA and one 16-bit grayscale image."""
    rng = np.random.default_rng(0)
    for split, count in (("train", train), ("val", val)):
        for c in range(classes):
            folder = root / split / f"c{c}"
            folder.mkdir(parents=True)
            for i in range(count):
                h, w = SIZES[(i + c) % len(SIZES)]
                level = 40 + 50 * c
                pixels = np.clip(rng.normal(level, 20, (h, w)), 0, 255).astype(np.uint8)
                Image.fromarray(pixels, mode="L").save(folder / f"{i}.png")
    special = root / "train" / "c0"
    Image.fromarray(np.full((24, 36), 40, np.uint8), mode="L").convert("P").save(special / "palette.png")
    rgba = np.zeros((30, 30, 4), np.uint8)
    rgba[..., 0] = 255          # red everywhere, but only the centre is opaque
    rgba[10:20, 10:20, 3] = 255
    Image.fromarray(rgba, mode="RGBA").save(special / "rgba.png")
    Image.fromarray(np.full((40, 28), 40 * 257, np.uint16)).save(special / "sixteen.png")
    return root


def write_synthetic_folder(root: Path, classes: int = 4, train: int = 32, val: int = 32) -> Path:
    """The built-in synthetic task saved as train/ and val/ folders of 32x32 PNGs: a task a tiny ViT
    needs epochs to learn (a textured object in clutter), as a folder a user would bring."""
    options = SyntheticOptions(num_classes=classes, train_size=train, val_size=val, test_size=0, image_size=32)
    names = synthetic_class_names(classes)
    for split, stream, count in (("train", 0, train), ("val", 1, val)):
        images, labels = generate_synthetic(options, stream, count)
        for i, (image, label) in enumerate(zip(images, labels.tolist())):
            folder = root / split / names[label]
            folder.mkdir(parents=True, exist_ok=True)
            Image.fromarray(image.permute(1, 2, 0).numpy()).save(folder / f"{i}.png")
    return root


@pytest.fixture
def workdir(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # baselines and Ray results go under ./studies
    return tmp_path


@pytest.fixture(scope="module")
def config32() -> dict:
    return model_data_config(timm.create_model("vit_tiny_patch16_224", img_size=32, patch_size=8, depth=1))


# -- image folders as people have them --------------------------------------------------------------

def test_every_image_is_read_as_upright_8_bit_rgb(tmp_path):
    gray = tmp_path / "gray.png"
    Image.fromarray(np.arange(12, dtype=np.uint8).reshape(3, 4) * 20, mode="L").save(gray)
    image = load_rgb(str(gray))
    assert image.mode == "RGB" and image.size == (4, 3)
    pixels = np.asarray(image)
    assert (pixels[..., 0] == pixels[..., 1]).all() and (pixels[..., 1] == pixels[..., 2]).all()
    assert pixels[2, 3, 0] == 220

    palette = tmp_path / "palette.png"
    indexed = Image.fromarray(np.array([[1, 0]], np.uint8), mode="P")
    indexed.putpalette([250, 5, 5, 10, 200, 30] + [0] * 762)
    indexed.save(palette)
    assert np.asarray(load_rgb(str(palette))).tolist() == [[[10, 200, 30], [250, 5, 5]]]

    rgba = tmp_path / "rgba.png"
    Image.fromarray(np.array([[[255, 0, 0, 0], [0, 0, 255, 255], [0, 255, 0, 128]]], np.uint8), mode="RGBA").save(rgba)
    # transparent shows the white it is viewed on (not the red it hides); half-transparent blends
    assert np.asarray(load_rgb(str(rgba))).tolist() == [[[255, 255, 255], [0, 0, 255], [127, 255, 127]]]

    keyed = tmp_path / "keyed.png"  # a palette image with a transparent entry
    indices = Image.fromarray(np.array([[0, 1]], np.uint8), mode="P")
    indices.putpalette([0, 0, 0, 9, 9, 9] + [0] * 762)
    indices.save(keyed, transparency=0)
    assert np.asarray(load_rgb(str(keyed))).tolist() == [[[255, 255, 255], [9, 9, 9]]]

    sixteen = tmp_path / "sixteen.png"
    Image.fromarray(np.array([[0, 32896, 65535]], np.uint16)).save(sixteen)
    assert Image.open(sixteen).mode.startswith("I")
    assert np.asarray(load_rgb(str(sixteen)))[0, :, 0].tolist() == [0, 128, 255]  # not saturated to white

    rotated = tmp_path / "rotated.jpg"  # a camera image stored sideways, upright by its EXIF tag
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise to view
    Image.new("RGB", (40, 20), (90, 90, 90)).save(rotated, exif=exif)
    assert load_rgb(str(rotated)).size == (20, 40)


def test_a_folder_of_grayscale_images_of_mixed_sizes_trains(tmp_path, config32):
    root = write_gray_folder(tmp_path / "data")
    data = load_datasets(f"imagefolder:{root}", config32)
    assert data.classes == ["c0", "c1", "c2", "c3"] and (len(data.train), len(data.val)) == (35, 16)
    for split in (data.train, data.val):
        for index in range(len(split)):
            image, _ = split[index]
            assert image.shape == (3, 32, 32) and torch.isfinite(image).all()
    image, _ = data.val[0]  # grayscale: the three channels agree (the model's mean/std are equal)
    assert torch.equal(image[0], image[1]) and torch.equal(image[1], image[2])
    images, labels = next(iter(make_loader(data.train, 35, train=True, workers=0)))  # one batch of every size
    assert images.shape == (35, 3, 32, 32) and labels.shape == (35,)
    model = timm.create_model("vit_tiny_patch16_224", img_size=32, patch_size=8, embed_dim=48, depth=1,
                              num_heads=3, num_classes=4)
    records = fine_tune(model, data.train, TrainConfig(epochs=1, batch_size=8, workers=0), val_set=data.val)
    assert len(records) == 1 and np.isfinite(records[0].train_loss)


def test_one_unreadable_image_is_named_before_training(tmp_path, config32):
    root = write_gray_folder(tmp_path / "data")
    bad = root / "val" / "c2" / "1.png"
    bad.write_bytes(bad.read_bytes()[:40])
    with pytest.raises(DataError, match=re.escape(str(bad)) + ".*cannot be decoded"):
        load_datasets(f"imagefolder:{root}", config32)


# -- recipes --------------------------------------------------------------------------------------

class Stop(Exception):
    pass


@pytest.fixture
def captured(monkeypatch):
    """Runs `autoprune search` up to the call of search(): the settings and options it gets."""
    import autoprune.search

    seen = {}

    def stand_in(settings, **options):
        seen.update(settings=settings, **options)
        raise Stop

    monkeypatch.setattr(autoprune.search, "search", stand_in)

    def run(*argv):
        seen.clear()
        with pytest.raises(Stop):
            main(["search", "--budget", "60%", *argv])
        return seen
    return run


def test_recipe_defaults_follow_the_starting_point(captured, capsys, tmp_path):
    checkpoint = tmp_path / "weights.pt"
    # the first run: the default preset (pretrained DeiT-S) with a small model from scratch
    settings = captured(*TINY)["settings"]
    assert settings.model.init == "scratch"
    assert (settings.baseline_recipe, settings.recipe) == (FROM_SCRATCH.baseline, FROM_SCRATCH.trial)
    out = capsys.readouterr().out
    assert "recipes: baseline 10 epochs at lr 0.001, batch 64; trials 2 epochs at lr 0.0002, batch 64" in out
    for weights in (["--pretrained"], ["--checkpoint", str(checkpoint)]):
        settings = captured("--preset", "quickstart", *weights)["settings"]
        assert (settings.baseline_recipe, settings.recipe) == (FINE_TUNE.baseline, FINE_TUNE.trial)
    # a preset's own model and starting point keep the preset's own recipes
    deit = get_preset("deit_small")
    settings = captured()["settings"]
    assert (settings.baseline_recipe, settings.recipe) == (deit.baseline, deit.trial)
    quick = get_preset("quickstart")
    settings = captured("--preset", "quickstart", "--data", "imagefolder:somewhere")["settings"]
    assert (settings.baseline_recipe, settings.recipe) == (quick.baseline, quick.trial)
    # the Python API does the same
    api = SearchSettings.from_preset("deit_small", "60%", model=ModelSpec("vit_tiny_patch16_224", {}, "scratch"))
    assert api.baseline_recipe == FROM_SCRATCH.baseline


def test_recipe_flags_and_config_keys(captured, capsys, tmp_path):
    seen = captured(*TINY, "--lr", "3e-4", "--train-batch", "32", "--epochs", "1.5", "--baseline-epochs", "4",
                    "--baseline-lr", "2e-3", "--min-baseline-accuracy", "40")
    trial, baseline = seen["settings"].recipe, seen["settings"].baseline_recipe
    assert (trial.epochs, trial.lr, trial.batch_size) == (1.5, 3e-4, 32)
    assert (baseline.epochs, baseline.lr, baseline.batch_size) == (4, 2e-3, 32)  # --train-batch: both
    assert seen["min_baseline_accuracy"] == 40
    assert "recipes: baseline 4 epochs at lr 0.002, batch 32; trials 1.5 epochs at lr 0.0003, batch 32" in capsys.readouterr().out
    config = tmp_path / "search.yaml"
    config.write_text("lr: 1e-4\ntrain-batch: 16\nbaseline_epochs: 0\nmin_baseline_accuracy: 12.5\n")
    seen = captured(*TINY, "--config", str(config), "--train-batch", "8")
    trial, baseline = seen["settings"].recipe, seen["settings"].baseline_recipe
    assert (trial.lr, trial.batch_size, baseline.epochs, baseline.batch_size) == (1e-4, 8, 0, 8)  # the flag wins
    assert seen["min_baseline_accuracy"] == 12.5
    assert "recipes: baseline 0 epochs (the starting weights as they are: measured, not trained)" in capsys.readouterr().out
    assert captured(*TINY)["min_baseline_accuracy"] is None  # the default rule: chance + 5 points


@pytest.mark.parametrize("argv, message", [
    (["--lr", "0"], "--lr: '0' is invalid; accepted: a positive number"),
    (["--lr", "fast"], "--lr: 'fast' is invalid; accepted: a positive number"),
    (["--lr", "nan"], "--lr: 'nan' is invalid"),
    (["--lr", "inf"], "--lr: 'inf' is invalid"),
    (["--train-batch", "0"], "--train-batch: '0' is invalid; accepted: a positive integer"),
    (["--train-batch", "2.5"], "--train-batch: '2.5' is invalid; accepted: a positive integer"),
    (["--baseline-epochs", "-1"], "--baseline-epochs: '-1' is invalid; accepted: a number >= 0"),
    (["--baseline-epochs", "ten"], "--baseline-epochs: 'ten' is invalid"),
    (["--baseline-lr=-1e-3"], "--baseline-lr: '-1e-3' is invalid; accepted: a positive number"),
    (["--min-baseline-accuracy", "101"], "--min-baseline-accuracy: '101' is invalid; accepted: a percentage from 0 to 100"),
    (["--min-baseline-accuracy", "-5"], "--min-baseline-accuracy: '-5' is invalid"),
    (["--min-baseline-accuracy", "90%"], "--min-baseline-accuracy: '90%' is invalid"),
    (["--baseline-epochs", "0", "--baseline-lr", "1e-3"], "--baseline-lr: a baseline of 0 epochs is not trained"),
    (["--epochs", "0"], "--epochs: 0.0 is invalid; accepted: a positive number"),  # argparse's float
])
def test_bad_recipe_flags_exit_2_with_one_line(workdir, capsys, argv, message):
    assert main(["search", "--budget", "60%", *TINY, *argv]) == 2
    captured = capsys.readouterr()
    assert message in captured.err and captured.err.count("\n") == 1, captured.err
    assert not (workdir / "studies").exists()  # before anything is built or trained


@pytest.mark.parametrize("line, message", [
    ("lr: 0", "--lr: 0 is invalid"),
    ("train_batch: 1.5", "--train-batch: 1.5 is invalid"),
    ("baseline_epochs: -0.5", "--baseline-epochs: -0.5 is invalid"),
    ("baseline-lr: [1]", "--baseline-lr: [1] is invalid"),
    ("min_baseline_accuracy: true", "--min-baseline-accuracy: True is invalid"),
])
def test_bad_recipe_keys_in_a_config_exit_2_with_one_line(workdir, capsys, line, message):
    config = workdir / "search.yaml"
    config.write_text(f"budget: 60%\n{line}\n")
    assert main(["search", "--config", str(config)]) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1, err


def test_only_the_baseline_may_take_0_epochs():
    with pytest.raises(ValueError, match="epochs 0 trains nothing"):
        fine_tune(torch.nn.Linear(2, 2), [], TrainConfig(epochs=0))
    with pytest.raises(ValueError, match="TrainConfig.epochs: -1"):
        TrainConfig(epochs=-1)
    settings = SearchSettings(budget="60%", recipe=TrainConfig(epochs=0))
    with pytest.raises(SearchError, match="recipe.epochs: 0 is invalid for trials"):
        search(settings, trials=1, log=lambda line: None)


# -- the baseline gate ------------------------------------------------------------------------------

def test_the_gate_names_what_the_baseline_reached_and_what_to_change():
    scratch, trained = ModelSpec("m"), ModelSpec("m", init="weights.pt")
    recipe = TrainConfig(epochs=0.25, lr=1e-3)
    assert baseline_refusal(30.0, 4, "d", scratch, recipe, None, Path("b")) is None   # chance 25 + 5
    message = baseline_refusal(29.9, 4, "imagefolder:d", scratch, recipe, None, Path("b"))
    assert message.startswith("the dense baseline reached 29.9% val top-1 on imagefolder:d (4 classes, chance 25.0%), "
                              "below the 30.0% (chance + 5 points)")
    assert "--baseline-epochs, now 0.25" in message and "--checkpoint" in message and "--pretrained" in message
    assert message.endswith("it stays cached in b") and "\n" not in message
    message = baseline_refusal(12.0, 10, "d", trained, TrainConfig(epochs=0), None, Path("b"))
    assert "--baseline-epochs 2 or more" in message and "without exactly 10 outputs" in message
    message = baseline_refusal(60.0, 10, "d", trained, TrainConfig(epochs=2, lr=1e-4), 80, Path("b"))
    assert "below the 80.0% (--min-baseline-accuracy)" in message and "--baseline-lr, now 0.0001" in message
    assert baseline_refusal(3.0, 10, "d", scratch, recipe, 0, Path("b")) is None


def test_a_baseline_near_chance_stops_the_search_before_any_trial(workdir, capsys):
    data = write_synthetic_folder(workdir / "objects")
    storage = f"sqlite:///{workdir / 'studies.db'}"
    argv = ["search", "--budget", "75%", *TINY, "--data", f"imagefolder:{data}", "--train-batch", "8",
            "--baseline-epochs", "0.25", "--study", "s", "--storage", storage, "--trials", "1"]
    assert main(argv) == 2
    captured = capsys.readouterr()
    assert captured.err.count("\n") == 1, captured.err
    assert re.match(rf"autoprune: the dense baseline reached \d+\.\d% val top-1 on imagefolder:{re.escape(str(data))} "
                    r"\(4 classes, chance 25\.0%\), below the 30\.0% \(chance \+ 5 points\) that makes it worth "
                    r"reducing: train it longer \(--baseline-epochs, now 0\.25\)", captured.err), captured.err
    assert "training the dense baseline" in captured.out and "warm start" not in captured.out
    assert re.search(r"^  baseline: epoch 1/1, loss \d\.\d{3}, val top-1 \d+\.\d\d% \| ", captured.out, re.M)
    cached = list((workdir / "studies" / "baselines").iterdir())
    assert len(cached) == 1 and (cached[0] / "model.pt").is_file() and (cached[0] / "baseline.json").is_file()
    assert f"it stays cached in {cached[0].relative_to(workdir)}" in captured.err
    study = optuna.load_study(study_name="s", storage=storage)
    assert not study.trials and SETTINGS_ATTR not in study.user_attrs and DENSE_ATTR not in study.user_attrs
    # the same command again: the cached baseline answers at once, nothing is trained again
    assert main(argv) == 2
    captured = capsys.readouterr()
    assert "training the dense baseline" not in captured.out and "val top-1" in captured.err
    # another recipe is a new baseline for the same study: the refused run did not define the study
    # (refused again here by an unreachable minimum: a tiny baseline passing would run trials)
    assert main([*argv, "--baseline-epochs", "0.5", "--min-baseline-accuracy", "100"]) == 2
    captured = capsys.readouterr()
    assert "other settings" not in captured.err and "(--min-baseline-accuracy)" in captured.err
    assert "training the dense baseline" in captured.out
    assert len(list((workdir / "studies" / "baselines").iterdir())) == 2  # both kept


# -- a checkpoint trained on the data, taken as it is ---------------------------------------------------

@pytest.fixture(scope="module")
def ray_session():
    import ray
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, logging_level="ERROR")
    yield
    ray.shutdown()


def test_a_checkpoint_with_0_baseline_epochs_is_measured_as_it_is(ray_session, workdir, capsys, config32):
    data = write_synthetic_folder(workdir / "objects")
    torch.manual_seed(7)
    trained = timm.create_model("vit_tiny_patch16_224", num_classes=4, img_size=32, patch_size=8, embed_dim=48,
                                depth=2, num_heads=3)
    checkpoint = workdir / "fine-tuned.pt"
    torch.save({"state_dict": trained.state_dict()}, checkpoint)  # a training script's layout
    storage = f"sqlite:///{workdir / 'studies.db'}"
    argv = ["search", "--budget", "75%", *TINY, "--checkpoint", str(checkpoint), "--data", f"imagefolder:{data}",
            "--baseline-epochs", "0", "--min-baseline-accuracy", "0", "--train-batch", "8", "--epochs", "0.5",
            "--trials", "1", "--cpus-per-trial", "1", "--study", "s", "--storage", storage]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "recipes: baseline 0 epochs (the starting weights as they are" in out
    assert "measuring the dense baseline vit_tiny_patch16_224 as it starts (0 epochs)" in out
    assert "baseline: epoch" not in out  # nothing trained
    cached = next((workdir / "studies" / "baselines").iterdir())
    weights = torch.load(cached / "model.pt", weights_only=True)
    assert weights.keys() == trained.state_dict().keys()
    assert all(torch.equal(weights[key], value) for key, value in trained.state_dict().items())  # classifier too
    datasets = load_datasets(f"imagefolder:{data}", config32)
    expected = evaluate(trained.eval(), datasets.val, 8)["top1"]
    study = optuna.load_study(study_name="s", storage=storage)
    assert study.user_attrs[DENSE_ATTR]["val"]["top1"] == expected
    assert f"dense baseline: val top-1 {expected:.2f}%" in out
    assert len([t for t in study.trials if t.values]) == 1
    # resuming with another recipe is refused, naming the difference
    assert main([*argv, "--lr", "1e-3"]) == 2
    err = capsys.readouterr().err
    assert "created with other settings" in err and "recipe.lr: stored 5e-05, requested 0.001" in err
    assert err.count("\n") == 1
    assert main([*argv, "--baseline-epochs", "1"]) == 2  # the last of a repeated flag counts
    assert "baseline_recipe.epochs: stored 0.0, requested 1.0" in capsys.readouterr().err
