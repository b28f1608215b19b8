"""Fine-tuning and evaluation on tiny models and tensors (CPU, seconds)."""

import math

import pytest
import torch
from torch.utils.data import TensorDataset

from timm.models.vision_transformer import VisionTransformer

from autoprune import PruneConfig, apply
from autoprune.distill import (Distillation, DistillationError, feature_targets, fused_tokens, logit_distillation,
                               patch_resampling, tis_distillation, tis_star)
from autoprune.patch import TokenReducer, set_strength
from autoprune.train import EpochRecord, TrainConfig, TrainingFailed, evaluate, fine_tune
from conftest import make_model


def toy_data(count: int = 64, seed: int = 0) -> TensorDataset:
    """Labels a tiny ViT learns in a few epochs: the colour (red, green, blue, white) of a bright
    square at a random place over faint noise."""
    generator = torch.Generator().manual_seed(seed)
    images = 0.1 * torch.randn(count, 3, 32, 32, generator=generator)
    labels = torch.arange(count) % 4
    corners = torch.randint(0, 24, (count, 2), generator=generator).tolist()
    for i, label in enumerate(labels.tolist()):
        (row, col), channels = corners[i], [label] if label < 3 else [0, 1, 2]
        images[i, channels, row:row + 8, col:col + 8] += 2.0
    return TensorDataset(images, labels)


QUICK = TrainConfig(epochs=1, batch_size=16, lr=1e-3, warmup=0.25, seed=0, workers=0)


def test_training_is_deterministic_on_cpu():
    states = []
    for _ in range(2):
        model = apply(make_model(), PruneConfig(reducer="tome", r=6))
        fine_tune(model, toy_data(), QUICK)
        states.append(model.state_dict())
    for key in states[0]:
        assert torch.equal(states[0][key], states[1][key]), key


def test_training_learns_and_reports_every_epoch():
    model = apply(make_model(), PruneConfig(reducer="evit", layers=(1,), keep_rate=0.5))
    before = evaluate(model, toy_data(seed=1), batch_size=32)["top1"]
    seen: list[EpochRecord] = []
    records = fine_tune(model, toy_data(256), TrainConfig(epochs=4, batch_size=16, lr=1e-3, workers=0),
                        val_set=toy_data(seed=1), on_epoch=seen.append)
    assert seen == records and [r.epoch for r in records] == [1, 2, 3, 4]
    assert records[-1].metrics["top1"] >= max(before + 40, 90.0)
    assert records[-1].train_loss < records[0].train_loss


def test_fractional_epochs_stop_early():
    steps = []
    model = make_model()
    model.blocks[0].register_forward_hook(lambda *args: steps.append(1))
    records = fine_tune(model, toy_data(64), TrainConfig(epochs=0.5, batch_size=16, workers=0))
    assert len(steps) == 2 and len(records) == 1 and records[0].progress == 0.5


def test_a_callback_can_stop_training():
    class Stop(Exception):
        pass

    def stop_after_first(record):
        raise Stop(record.epoch)

    with pytest.raises(Stop):
        fine_tune(make_model(), toy_data(), TrainConfig(epochs=3, batch_size=16, workers=0), on_epoch=stop_after_first)


def test_non_finite_loss_fails_with_a_reason():
    data = toy_data()
    data.tensors[0][5] = float("nan")
    with pytest.raises(TrainingFailed, match=r"loss became nan at step 1 \(epoch 1\)"):
        fine_tune(make_model(), data, TrainConfig(epochs=1, batch_size=64, workers=0))


def test_keep_rate_warmup_ramps_the_strength():
    model = apply(make_model(), PruneConfig(reducer="evit", layers=(1,), keep_rate=0.5))
    reducer = next(m for m in model.modules() if isinstance(m, TokenReducer))
    strengths = []
    reducer.register_forward_pre_hook(lambda mod, args: strengths.append(mod.strength))
    fine_tune(model, toy_data(128), TrainConfig(epochs=1, batch_size=16, keep_rate_warmup=0.5, workers=0))
    assert strengths[0] == 0.0 and strengths[4:] == [1.0] * 4
    assert strengths[:4] == sorted(strengths[:4]) and 0 < strengths[2] < 1
    assert reducer.strength == 1.0


def test_sait_alternate_training_runs_even_epochs_dense():
    model = apply(make_model(), PruneConfig(reducer="sait", layers=(1,), mass_threshold=0.6))
    reducer = next(m for m in model.modules() if isinstance(m, TokenReducer))
    strengths = []
    reducer.register_forward_pre_hook(lambda mod, args: strengths.append(mod.strength) if mod.training else None)
    # the reducer's forward is skipped at strength 0 only inside; the hook still sees each call
    fine_tune(model, toy_data(32), TrainConfig(epochs=3, batch_size=16, sait_alternate=True, workers=0))
    assert strengths == [1.0, 1.0, 0.0, 0.0, 1.0, 1.0]


@pytest.mark.parametrize("kind, cfg", [
    ("logits", PruneConfig(reducer="evit", layers=(1,), keep_rate=0.5)),
    ("tis", PruneConfig(reducer="sait", layers=(1,), mass_threshold=0.6)),
    ("features", PruneConfig(reducer="tome", r=8)),
    ("features", PruneConfig(reducer="sait", layers=(1,), mass_threshold=0.6)),
])
def test_distillation_changes_the_update(kind, cfg):
    teacher = make_model(seed=3)
    results = []
    for beta in (0.0, 1.0):
        model = apply(make_model(), cfg)
        records = fine_tune(model, toy_data(32), TrainConfig(epochs=1, batch_size=16, distill=kind, beta=beta,
                                                            workers=0), teacher=teacher)
        results.append((records[0].train_loss, model.blocks[0].mlp.fc1.weight.detach().clone()))
    assert results[1][0] > results[0][0]  # the distillation term adds to the loss
    assert not torch.equal(results[0][1], results[1][1])
    assert not getattr(model, "track_source", False)


def test_distillation_needs_a_teacher_and_a_fitting_student():
    with pytest.raises(ValueError, match="needs a teacher"):
        fine_tune(make_model(), toy_data(), TrainConfig(beta=1.0, workers=0))
    evit = apply(make_model(), PruneConfig(reducer="evit", layers=(1,), keep_rate=0.5))
    with pytest.raises(ValueError, match="distill='tis' needs a sait"):
        fine_tune(evit, toy_data(), TrainConfig(beta=1.0, distill="tis", workers=0), teacher=make_model())


def test_loss_pieces_by_hand():
    # identical logits: no divergence; T^2 scaling keeps the gradient scale
    logits = torch.tensor([[2.0, 0.0, -1.0]])
    assert logit_distillation(logits, logits, 4.0).abs() < 1e-7
    teacher = torch.tensor([[0.0, 0.0, 0.0]])
    p = torch.softmax(teacher, -1)
    q = torch.softmax(logits, -1)
    expected = (p * (p.log() - q.log())).sum()
    assert logit_distillation(logits, teacher, 1.0) == pytest.approx(float(expected))
    # TIS*: per head softmax of column sums over non-prefix tokens, then head mean
    probs = torch.tensor([[[[0.5, 0.25, 0.25], [0.0, 1.0, 0.0], [0.0, 0.0, 1.0]]]])  # 1 head, 3 tokens
    column_sums = torch.tensor([1.25, 1.25])  # tokens 1 and 2 (prefix 1)
    torch.testing.assert_close(tis_star(probs, 1), torch.softmax(column_sums, 0)[None])


def test_evaluate_counts_top1_and_top5():
    class Fixed(torch.nn.Module):
        """Logits = the image's first 8 pixel values (so the test sets the ranking)."""
        def __init__(self):
            super().__init__()
            self.anchor = torch.nn.Parameter(torch.zeros(()))

        def forward(self, x):
            return x.flatten(1)[:, :8] + self.anchor

    images = torch.zeros(4, 1, 1, 8)
    images[0, 0, 0, 3] = 1  # label 3: top-1 right
    images[1, 0, 0] = torch.tensor([8, 7, 6, 5, 4, 3, 2, 1.0])  # label 4: 5th best -> top-5 only
    images[2, 0, 0] = torch.tensor([8, 7, 6, 5, 4, 3, 2, 1.0])  # label 6: 7th -> neither
    images[3, 0, 0, 0] = 1  # label 0: top-1 right
    metrics = evaluate(Fixed(), TensorDataset(images, torch.tensor([3, 4, 6, 0])), batch_size=3)
    assert metrics["top1"] == 50.0 and metrics["top5"] == 75.0
    assert math.isfinite(metrics["loss"])


# -- distillation: KL direction, captured attention, teachers of another width and grid --------

def other_teacher(**changes) -> VisionTransformer:
    """A teacher unlike the tiny student (width 48, 8x8 patches of 4 pixels): width 32 and a
    4x4 grid of 8-pixel patches."""
    torch.manual_seed(7)
    kwargs = dict(img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=2, num_classes=10)
    return VisionTransformer(**{**kwargs, **changes}).eval()


def test_tis_distillation_is_kl_of_tis_star_from_the_teacher():
    # one head, prefix 1: column sums of the non-prefix keys [2, 0] -> TIS* p = softmax = [e^2, 1] / (e^2 + 1)
    probs = torch.tensor([[[[0.0, 1.0, 0.0], [0.0, 1.0, 0.0], [1.0, 0.0, 0.0]]]])
    teacher = torch.tensor([[0.5, 1.5]])  # q = [.25, .75] once normalised
    p = torch.tensor([math.e ** 2, 1.0]) / (math.e ** 2 + 1)
    q = torch.tensor([0.25, 0.75])
    forward = float((p * (p / q).log()).sum())   # KL(TIS* || teacher) = 0.8900
    reverse = float((q * (q / p).log()).sum())   # KL(teacher || TIS*) = 1.0646
    assert tis_distillation(probs, teacher, prefix=1) == pytest.approx(forward, rel=1e-5)
    assert forward == pytest.approx(0.8900, abs=1e-4) and abs(forward - reverse) > 0.1


@pytest.mark.parametrize("teacher", [make_model(seed=3), other_teacher()], ids=["same", "other_grid"])
def test_tis_distillation_captures_the_student_attention_at_every_strength(teacher, images):
    student = apply(make_model(), PruneConfig(reducer="sait", layers=(1,), mass_threshold=0.6))
    distillation = Distillation("tis", student, teacher)
    try:
        for strength in (0.0, 1.0):  # 0: SaiT's dense epochs; the attention is captured all the same
            set_strength(student, strength)
            logits = student(images)
            assert distillation.values["student_probs"].shape == (4, 3, 65, 65)
            loss = distillation.loss(student, images, logits, None)
            assert torch.isfinite(loss) and loss > 0
            loss.backward()
            assert student.blocks[0].attn.qkv.weight.grad.abs().sum() > 0
            student.zero_grad()
    finally:
        distillation.close(student)


def test_patch_resampling_by_area():
    # student 2x2, teacher 4x4: student patch 0 is teacher patches 0, 1, 4, 5 in equal shares
    r = patch_resampling((2, 2), (4, 4))
    assert r.shape == (4, 16)
    assert r[0].nonzero().flatten().tolist() == [0, 1, 4, 5] and torch.allclose(r[0, [0, 1, 4, 5]], torch.full((4,), 0.25))
    assert r[3].nonzero().flatten().tolist() == [10, 11, 14, 15]
    # student 3x3 over teacher 2x2 (not a whole ratio): per side [[1, 0], [.5, .5], [0, 1]];
    # the centre patch takes a quarter of each teacher patch, a corner one teacher patch
    r = patch_resampling((3, 3), (2, 2))
    torch.testing.assert_close(r[4], torch.full((4,), 0.25))
    torch.testing.assert_close(r[0], torch.tensor([1.0, 0.0, 0.0, 0.0]))
    torch.testing.assert_close(r[1], torch.tensor([0.5, 0.5, 0.0, 0.0]))
    torch.testing.assert_close(r.sum(1), torch.ones(9))
    assert torch.equal(patch_resampling((2, 2), (2, 2)), torch.eye(4))


def test_feature_targets_are_the_teacher_features_of_the_patches_a_token_holds():
    # teacher 4x4 grid, features = the patch index; student 2x2 grid
    teacher_patches = torch.arange(16.0).reshape(1, 16, 1)
    on_student_grid = patch_resampling((2, 2), (4, 4)) @ teacher_patches
    # student patch 0 = mean of 0, 1, 4, 5 = 2.5; patch 3 = mean of 10, 11, 14, 15 = 12.5
    torch.testing.assert_close(on_student_grid.flatten(), torch.tensor([2.5, 4.5, 10.5, 12.5]))
    # token A holds student patches 0 and 3 (size 2), token B patch 1, token C patch 2
    source = torch.tensor([[[1.0, 0, 0, 1], [0, 1, 0, 0], [0, 0, 1, 0]]])
    targets = feature_targets(source, torch.tensor([[2.0, 1.0, 1.0]]), on_student_grid)
    torch.testing.assert_close(targets.flatten(), torch.tensor([7.5, 4.5, 10.5]))


def test_fused_tokens_are_recognised_by_their_patches():
    source = torch.tensor([[[1.0, 0, 0, 0], [0, 1, 1, 0], [0, 0, 0, 1]]])
    # layer 1 fused patches 1 and 2 (kept since); layer 2 fused patch 3 alone
    assert fused_tokens(source, [torch.tensor([[0.0, 1, 1, 0]]), torch.tensor([[0.0, 0, 0, 1]])]).tolist() == [[False, True, True]]
    assert fused_tokens(source, []).tolist() == [[False, False, False]]


@pytest.mark.parametrize("fuse", [True, False])
def test_evit_fused_tokens_get_no_token_target(fuse, images):
    student = apply(make_model(), PruneConfig(reducer="evit", layers=(1, 2), keep_rate=0.5, fuse=fuse))
    distillation = Distillation("features", student, make_model(seed=3))
    try:
        features = student.forward_features(images)
        tokens = student.final_tokens
        fused = fused_tokens(tokens.source[:, 1:], [s for s in distillation.fused.values() if s is not None])
        if fuse:
            # layer 2's fused token is last; layer 1's, where layer 2 kept it, just before it
            assert fused[:, -1].all() and (fused.sum(1) >= 1).all() and (fused.sum(1) <= 2).all()
            assert (tokens.size[:, 1:][fused] >= 1).all() and not fused[:, 0].any()
        else:
            assert not fused.any()
        assert torch.isfinite(distillation.loss(student, images, student.forward_head(features), features))
    finally:
        distillation.close(student)
    assert not student.track_source


@pytest.mark.parametrize("kind, cfg", [
    ("features", PruneConfig(reducer="tome", r=8)),
    ("features", PruneConfig(reducer="sait", layers=(1,), mass_threshold=0.6)),
    ("features_cls", PruneConfig(reducer="evit", layers=(1,), keep_rate=0.5)),
    ("tis", PruneConfig(reducer="sait", layers=(1,), keep_rate=0.5)),
])
def test_distillation_from_a_teacher_of_another_width_and_grid(kind, cfg):
    """A learned projection maps the student's width (48) to the teacher's (32); the teacher's
    4x4 patch grid is resampled onto the student's 8x8."""
    model = apply(make_model(), cfg)
    before = model.blocks[0].mlp.fc1.weight.detach().clone()
    records = fine_tune(model, toy_data(32), TrainConfig(epochs=1, batch_size=16, distill=kind, beta=1.0, workers=0),
                        teacher=other_teacher())
    assert math.isfinite(records[0].train_loss)
    assert not torch.equal(before, model.blocks[0].mlp.fc1.weight)


def test_feature_distillation_cls_only_compares_the_cls_tokens(images):
    student = apply(make_model(), PruneConfig(reducer="evit", layers=(1,), keep_rate=0.5))
    teacher = make_model(seed=3)
    distillation = Distillation("features_cls", student, teacher)
    features = student.forward_features(images)
    loss = distillation.loss(student, images, student.forward_head(features), features)
    expected = torch.nn.functional.mse_loss(features[:, 0], teacher.forward_features(images)[:, 0])
    torch.testing.assert_close(loss, expected)
    assert distillation.projection is None and not distillation.parameters()  # equal widths


def test_the_projection_trains_with_the_student(images):
    student = make_model()
    distillation = Distillation("features", student, other_teacher())
    assert distillation.projection.in_features == 48 and distillation.projection.out_features == 32
    features = student.forward_features(images)
    distillation.loss(student, images, student.forward_head(features), features).backward()
    assert distillation.projection.weight.grad.abs().sum() > 0


def test_teachers_that_cannot_teach_are_refused_in_one_line():
    student = make_model()
    with pytest.raises(DistillationError, match="predicts the student's 10 classes; the teacher has 0"):
        Distillation("logits", student, other_teacher(num_classes=0))
    with pytest.raises(DistillationError, match="needs a teacher with a class token"):
        Distillation("tis", apply(make_model(), PruneConfig(reducer="sait", layers=(1,), keep_rate=0.5)),
                     other_teacher(class_token=False, global_pool="avg"))
    with pytest.raises(DistillationError, match=r"takes \(64, 64\) images and the student \(32, 32\)"):
        Distillation("features", student, other_teacher(img_size=64))
