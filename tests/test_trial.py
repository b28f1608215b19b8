"""Dense baseline (built once, cached) and trials, end to end on a tiny ViT and tiny synthetic data."""

import dataclasses
import json

import pytest
import timm
import torch

from autoprune import PruneConfig
from autoprune.data import SyntheticOptions, load_datasets, model_data_config
from autoprune.distill import DistillationError
from autoprune.teacher import TeacherError, TeacherSpec
from autoprune.train import TrainConfig
from autoprune.trial import BaselineError, ModelSpec, TrialResult, dense_baseline, run_trial

SPEC = ModelSpec("vit_tiny_patch16_224", {"img_size": 32, "patch_size": 8, "embed_dim": 48, "depth": 4, "num_heads": 3})
SYNTHETIC = SyntheticOptions(num_classes=4, train_size=64, val_size=32, test_size=32, image_size=32, seed=0)
RECIPE = TrainConfig(epochs=1, batch_size=16, lr=1e-3, workers=0)


@pytest.fixture(scope="module")
def datasets():
    return load_datasets("synthetic", model_data_config(SPEC.create(4)), synthetic=SYNTHETIC)


@pytest.fixture(scope="module")
def baseline(datasets, tmp_path_factory):
    return dense_baseline(SPEC, datasets, "synthetic", RECIPE, SYNTHETIC,
                          cache_dir=tmp_path_factory.mktemp("baselines"), log=lambda line: None)


def test_baseline_records_the_reference_measurements(baseline):
    metrics = baseline.metrics
    assert set(metrics["val"]) == {"top1", "loss"} and "test" in metrics
    assert metrics["flops"] > 0 and metrics["params"] > 0 and metrics["throughput"] > 0
    assert (baseline.path / "model.pt").exists() and json.loads((baseline.path / "baseline.json").read_text())


def test_baseline_is_trained_once_then_read_from_the_cache(baseline, datasets):
    logged = []
    again = dense_baseline(SPEC, datasets, "synthetic", RECIPE, SYNTHETIC,
                           cache_dir=baseline.path.parent, log=logged.append)
    assert not logged and again.path == baseline.path and again.metrics == baseline.metrics
    for key, value in baseline.model.state_dict().items():
        assert torch.equal(again.model.state_dict()[key], value)
    # anything that defines the baseline changes the key
    other = dense_baseline(SPEC, datasets, "synthetic", TrainConfig(epochs=0.5, batch_size=16, workers=0), SYNTHETIC,
                           cache_dir=baseline.path.parent, log=logged.append)
    assert other.path != baseline.path and logged


def test_baseline_does_not_depend_on_what_ran_before(baseline, datasets, tmp_path):
    """One model per cache key: the random init is seeded by the recipe, not by the caller's RNG."""
    torch.manual_seed(12345)
    torch.rand(1000)
    rebuilt = dense_baseline(SPEC, datasets, "synthetic", RECIPE, SYNTHETIC, cache_dir=tmp_path, log=lambda line: None)
    for key, value in baseline.model.state_dict().items():
        assert torch.equal(rebuilt.model.state_dict()[key], value), key


@pytest.mark.parametrize("cfg, recipe", [
    (PruneConfig(reducer="evit", layers=(1,), keep_rate=0.5), RECIPE),
    (PruneConfig(reducer="tome", r=4), TrainConfig(epochs=0.5, batch_size=16, workers=0, beta=1.0, distill="features")),
    (PruneConfig(reducer="sait", layers=(1,), mass_threshold=0.6),
     TrainConfig(epochs=2, batch_size=16, workers=0, sait_alternate=True, beta=0.5, distill="tis")),
])
def test_trial_returns_a_complete_json_record(baseline, datasets, cfg, recipe):
    epochs = []
    result = run_trial(baseline, datasets, cfg, recipe, on_epoch=epochs.append, flops_images=16, throughput_rounds=2)
    assert isinstance(result, TrialResult)
    record = json.loads(result.to_json())
    assert PruneConfig.from_dict(record["prune_config"]) == cfg
    assert TrainConfig.from_dict(record["train_config"]) == recipe
    assert 0 <= result.accuracy <= 100 and result.test_accuracy is not None
    assert result.flops < baseline.metrics["flops"]
    assert result.throughput > 0 and result.speedup == pytest.approx(result.throughput / result.dense_throughput)
    assert len(epochs) == len(result.history) >= 1
    assert (result.dense_mode_accuracy is not None) == recipe.sait_alternate
    assert result.flops_std == 0 or cfg.adaptive  # fixed schedules have no spread


def test_trials_are_reproducible(baseline, datasets):
    cfg = PruneConfig(reducer="tps", layers=(1,), keep_rate=0.5)
    first, second = (run_trial(baseline, datasets, cfg, RECIPE, flops_images=8, throughput_rounds=1) for _ in range(2))
    assert first.accuracy == second.accuracy and first.history == second.history


def test_local_checkpoint_initialises_the_model(tmp_path):
    source = SPEC.create(7)
    path = tmp_path / "weights.pth"
    torch.save(source.state_dict(), path)
    model = ModelSpec(SPEC.name, SPEC.kwargs, init=str(path)).create(num_classes=4)
    assert torch.equal(model.blocks[0].attn.qkv.weight, source.blocks[0].attn.qkv.weight)
    assert model.head.out_features == 4  # classifier adapted to the dataset
    with pytest.raises(BaselineError, match="does not exist"):
        ModelSpec(SPEC.name, SPEC.kwargs, init=str(tmp_path / "missing.pth")).create(4)
    (tmp_path / "bad.pth").write_bytes(b"not weights")
    with pytest.raises(BaselineError, match="does not fit"):
        ModelSpec(SPEC.name, SPEC.kwargs, init=str(tmp_path / "bad.pth")).create(4)


def test_unreachable_pretrained_weights_say_what_to_do(monkeypatch):
    import huggingface_hub.constants
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(BaselineError, match="pretrained weights for deit_tiny_patch16_224 could not be loaded.*local checkpoint"):
        ModelSpec("deit_tiny_patch16_224", init="pretrained").create(4)


# -- teachers other than the dense baseline -----------------------------------------------------

TEACHER_KWARGS = {"img_size": 32, "patch_size": 16, "embed_dim": 32, "depth": 2, "num_heads": 2}


def saved_teacher(tmp_path, num_classes: int, wrap: bool = False):
    """A vit_tiny teacher of another width (32) and patch size (16) saved as a checkpoint."""
    torch.manual_seed(5)
    model = timm.create_model("vit_tiny_patch16_224", num_classes=num_classes, **TEACHER_KWARGS)
    path = tmp_path / f"teacher{num_classes}.pth"
    torch.save({"state_dict": model.state_dict()} if wrap else model.state_dict(), path)
    return model, path


def test_a_teacher_checkpoint_brings_its_own_classifier(tmp_path):
    source, path = saved_teacher(tmp_path, 7, wrap=True)  # a training checkpoint holding a state dict
    teacher = TeacherSpec("vit_tiny_patch16_224", str(path), TEACHER_KWARGS).load()
    assert teacher.num_classes == 7 and not teacher.training
    assert torch.equal(teacher.head.weight, source.head.weight)  # not re-initialised
    headless = TeacherSpec("vit_tiny_patch16_224", str(saved_teacher(tmp_path, 0)[1]), TEACHER_KWARGS).load()
    assert headless.num_classes == 0


def test_a_teacher_is_identified_by_its_weights_content(tmp_path):
    _, path = saved_teacher(tmp_path, 4)
    copy = tmp_path / "moved.pth"
    copy.write_bytes(path.read_bytes())
    spec = TeacherSpec("vit_tiny_patch16_224", str(path), TEACHER_KWARGS)
    assert spec.identity() == TeacherSpec("vit_tiny_patch16_224", str(copy), TEACHER_KWARGS).identity()
    assert spec.identity()["weights"].startswith("sha256:")
    assert TeacherSpec("vit_small_patch16_224.dino").identity() == {
        "name": "vit_small_patch16_224.dino", "kwargs": {}, "weights": "pretrained"}


@pytest.mark.parametrize("make, message", [
    (lambda p: TeacherSpec("vit_nonexistent", str(p)), "--teacher: unknown timm model 'vit_nonexistent'"),
    (lambda p: TeacherSpec("vit_tiny_patch16_224", str(p.parent / "missing.pth")), "--teacher-checkpoint: .* does not exist"),
    (lambda p: TeacherSpec("vit_tiny_patch16_224", str(p.parent / "junk.pth")), "--teacher-checkpoint: .* is not a readable weights file"),
    (lambda p: TeacherSpec("vit_tiny_patch16_224", str(p), {"img_size": 32, "patch_size": 16}),
     "--teacher-checkpoint: .* does not fit vit_tiny_patch16_224 \\(Missing key"),
    (lambda p: TeacherSpec("vit_tiny_patch16_224", str(p), {"no_such_kwarg": 1}), "--teacher-kwargs: vit_tiny_patch16_224 does not accept"),
])
def test_bad_teachers_are_refused_in_one_line(tmp_path, make, message):
    _, path = saved_teacher(tmp_path, 4)
    (tmp_path / "junk.pth").write_bytes(b"not weights")
    with pytest.raises(TeacherError, match=message) as caught:
        make(path).load()
    assert "\n" not in str(caught.value)


def test_an_unreachable_pretrained_teacher_says_what_to_do(monkeypatch):
    import huggingface_hub.constants
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(TeacherError, match="--teacher-pretrained: the weights of deit_tiny_patch16_224 could not be "
                                           "loaded.*give --teacher-checkpoint"):
        TeacherSpec("deit_tiny_patch16_224", "pretrained", {"img_size": 32, "depth": 1}).load()


def test_a_trial_distils_from_a_teacher_spec(baseline, datasets, tmp_path):
    """Features from a narrower teacher with bigger patches: projection and grid resampling."""
    _, path = saved_teacher(tmp_path, 0)
    spec = TeacherSpec("vit_tiny_patch16_224", str(path), TEACHER_KWARGS)
    cfg = PruneConfig(reducer="evit", layers=(1,), keep_rate=0.5)
    recipe = TrainConfig(epochs=0.5, batch_size=16, workers=0, beta=1.0, distill="features")
    with_teacher = run_trial(baseline, datasets, cfg, recipe, teacher=spec, flops_images=8, throughput_rounds=1)
    from_baseline = run_trial(baseline, datasets, cfg, recipe, flops_images=8, throughput_rounds=1)
    assert with_teacher.history[0]["train_loss"] != from_baseline.history[0]["train_loss"]
    with pytest.raises(DistillationError, match="the teacher has 0"):
        run_trial(baseline, datasets, cfg, dataclasses.replace(recipe, distill="logits"), teacher=spec)
