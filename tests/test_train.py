"""Fine-tuning and evaluation on tiny models and tensors (CPU, seconds)."""

import math

import pytest
import torch
from torch.utils.data import TensorDataset

from autoprune import PruneConfig, apply
from autoprune.patch import TokenReducer
from autoprune.train import (EpochRecord, TrainConfig, TrainingFailed, evaluate, fine_tune,
                             logit_distillation, tis_star)
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
