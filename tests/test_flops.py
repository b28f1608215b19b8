"""FLOPs: the published DeiT figures, and the closed form agreeing with the measurement."""

import pytest
import timm

from autoprune import ConfigError, PruneConfig, apply, count_flops, predict_flops
from conftest import VARIANTS, make_model

EVIT = dict(reducer="evit", layers=(3, 6, 9))
PUBLISHED_DEIT_S = [  # reducers.md, GFLOPs in fvcore's convention
    (None, 4.608),
    (PruneConfig(**EVIT, keep_rate=0.9), 4.030),
    (PruneConfig(**EVIT, keep_rate=0.7), 3.036),
    (PruneConfig(**EVIT, keep_rate=0.7, fuse=False), 3.003),
    (PruneConfig(**EVIT, keep_rate=0.6), 2.641),
    (PruneConfig(**EVIT, keep_rate=0.5), 2.314),
    (PruneConfig(reducer="tome", r=8), 3.424),
    (PruneConfig(reducer="tome", r=13), 2.708),
    (PruneConfig(reducer="tome", r=16), 2.296),
    (PruneConfig(reducer="ppt", layers=(3, 6, 9), r=50), 2.947),
]


@pytest.fixture(scope="module")
def deit_small():
    return timm.create_model("deit_small_patch16_224").eval()


@pytest.mark.parametrize("cfg, gflops", PUBLISHED_DEIT_S)
def test_published_deit_small_figures(deit_small, cfg, gflops):
    assert predict_flops(deit_small, cfg) / 1e9 == pytest.approx(gflops, abs=0.01)
    assert count_flops(apply(deit_small, cfg)) / 1e9 == pytest.approx(gflops, abs=0.01)


def test_dense_counts_fused_attention(deit_small):
    """fvcore alone gives 4.251 for DeiT-S: it counts fused attention as zero."""
    assert count_flops(apply(deit_small, None)) == 4_608_338_304


@pytest.mark.parametrize("name, gflops", [("deit_tiny_patch16_224", 1.258), ("deit_base_patch16_224", 17.583)])
def test_published_dense_figures(name, gflops):
    model = timm.create_model(name)
    assert predict_flops(model) / 1e9 == pytest.approx(gflops, abs=0.001)
    assert count_flops(model) / 1e9 == pytest.approx(gflops, abs=0.001)


def fixed_schedule_configs(variant: str) -> list[PruneConfig]:
    score = {"score": "tis"} if variant == "avgpool_no_class_token" else {}
    return [
        None,
        PruneConfig(reducer="evit", layers=(0, 2), keep_rate=(0.5, 0.7), **score),
        PruneConfig(reducer="evit", keep_rate=0.8, fuse=False, **score),
        PruneConfig(reducer="tome", r=9),
        PruneConfig(reducer="tome", layers=(1, 3), keep_rate=0.5, prop_attn=False),
        PruneConfig(reducer="ppt", layers=(1, 2), r=(20, 30), **({"score": "tis"} if score else {})),
        PruneConfig(reducer="tps", layers=(1,), r=40, **score),
        PruneConfig(reducer="bat", layers=(1, 2), keep_rate=0.5, clusters=4, knn=3, pairs=3, **score),
        PruneConfig(reducer="sait", layers=(2,), keep_rate=0.3),
        PruneConfig(reducer="sait", layers=(3,), r=50),  # the final norm sees the pruned tokens
    ]


@pytest.mark.parametrize("variant", VARIANTS)
def test_prediction_matches_measurement(variant):
    model = make_model(variant)
    for cfg in fixed_schedule_configs(variant):
        measured = count_flops(apply(model, cfg))
        assert predict_flops(model, cfg) == pytest.approx(measured, rel=0.005), cfg


def test_sait_block_costs_its_mlp_on_every_token():
    """Block P runs dense: against EViT without fusing, which prunes before its MLP, sait costs
    exactly the MLP on the pruned tokens more."""
    model = make_model()
    sait = predict_flops(model, PruneConfig(reducer="sait", layers=(1,), keep_rate=0.5))
    evit = predict_flops(model, PruneConfig(reducer="evit", layers=(1,), keep_rate=0.5, fuse=False))
    mlp = model.blocks[1].mlp
    per_token = mlp.fc1.in_features * mlp.fc1.out_features * 2 + 5 * model.embed_dim  # fc1, fc2, norm2
    assert sait - evit == 32 * per_token
    assert count_flops(apply(model, PruneConfig(reducer="sait", layers=(1,), keep_rate=0.5))) == pytest.approx(sait, rel=0.005)


def test_adaptive_flops_are_averaged_over_images(images):
    model = apply(make_model(), PruneConfig(reducer="sait", layers=(1,), mass_threshold=0.6))
    per_image = count_flops(model, images, per_image=True)
    assert len(per_image) == 4 and len(set(per_image)) > 1
    assert count_flops(model, images) == pytest.approx(sum(per_image) / 4)
    # each image's figure is the fixed-schedule figure for the count it kept
    for image, flops in zip(images, per_image):
        model(image[None])
        kept = model.final_tokens.x.shape[1] - model.num_prefix_tokens
        fixed = PruneConfig(reducer="sait", layers=(1,), r=64 - kept)
        assert flops == count_flops(apply(make_model(), fixed))


def test_adaptive_configs_need_images():
    model = apply(make_model(), PruneConfig(reducer="sait", layers=(1,), mass_threshold=0.6))
    with pytest.raises(ConfigError, match="pass images="):
        count_flops(model)
    with pytest.raises(ConfigError, match="count_flops"):
        predict_flops(model, model.prune_config)


def test_counting_leaves_the_model_as_it_was(images):
    model = apply(make_model(), PruneConfig(reducer="tome", r=5)).train()
    count_flops(model)
    assert model.training
    assert all(p.grad is None for p in model.parameters())
