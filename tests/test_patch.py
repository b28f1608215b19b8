"""The patched timm models: dense equivalence, token schedules, batching, training, re-applying."""

import pytest
import torch

from autoprune import ConfigError, PruneConfig, apply, remove
from autoprune.patch import TokenReducer, set_strength
from autoprune.schedule import block_token_counts
from conftest import VARIANTS, make_model, ppt_score_spreads


def configs_for(variant: str, full: bool) -> list[PruneConfig]:
    """One config per reducer; `full` = keep everything (must equal the dense model)."""
    score = {} if variant != "avgpool_no_class_token" else {"score": "tis"}
    rate = 1.0 if full else 0.6
    r = 0 if full else 6
    configs = [
        PruneConfig(reducer="evit", layers=(1, 2), keep_rate=rate, **score),
        PruneConfig(reducer="evit", layers=(1, 2), keep_rate=rate, fuse=False, **score),
        PruneConfig(reducer="tome", r=r),
        PruneConfig(reducer="ppt", layers=(1, 2), r=r, **({"score": "entropy"} if score else {})),
        PruneConfig(reducer="tps", layers=(1, 2), keep_rate=rate, **score),
        PruneConfig(reducer="bat", layers=(1, 2), keep_rate=rate, clusters=3, knn=3, pairs=2, **score),
        PruneConfig(reducer="sait", layers=(1,), keep_rate=rate),
        PruneConfig(reducer="sait", layers=(1,), keep_rate=rate, score="entropy" if score else "mean"),
    ]
    if full:
        configs.append(PruneConfig(reducer="sait", layers=(1,), mass_threshold=1.0))
    return configs


@pytest.mark.parametrize("variant", VARIANTS)
def test_keeping_everything_reproduces_the_dense_logits(variant, images):
    model = make_model(variant)
    with torch.no_grad():
        dense = model(images)
        for cfg in configs_for(variant, full=True):
            out = apply(model, cfg)(images)
            torch.testing.assert_close(out, dense, atol=1e-5, rtol=1e-5, msg=lambda m: f"{cfg}: {m}")
        assert torch.equal(apply(model, None)(images), dense)


@pytest.mark.parametrize("variant", VARIANTS)
def test_token_counts_per_layer_follow_the_schedule(variant, images):
    model = make_model(variant)
    prefix = model.num_prefix_tokens
    for cfg in configs_for(variant, full=False):
        apply(model, cfg)
        seen = []
        hooks = [m.register_forward_hook(lambda mod, args, out: seen.append(out.x.shape[1]))
                 for m in model.modules() if isinstance(m, TokenReducer)]
        with torch.no_grad():
            model(images)
        for hook in hooks:
            hook.remove()
        expected = [prefix + counts.out for counts in block_token_counts(cfg, 4, 64)]
        assert seen == [expected[layer] for layer in cfg.resolved_layers(4)], cfg
        assert seen[-1] < prefix + 64, cfg


@pytest.mark.parametrize("variant", ["plain", "distilled", "avgpool_no_class_token"])
def test_batched_output_equals_per_image_output(variant, images):
    model = make_model(variant)
    configs = configs_for(variant, full=False) + [
        PruneConfig(reducer="sait", layers=(1,), mass_threshold=0.6),
        PruneConfig(reducer="sait", layers=(2,), mass_threshold=0.3, score="entropy"),
    ]
    for cfg in configs:
        apply(model, cfg)
        with torch.no_grad():
            batched = model(images)
            alone = torch.cat([model(image[None]) for image in images])
        torch.testing.assert_close(batched, alone, atol=1e-5, rtol=1e-4, msg=lambda m: f"{cfg}: {m}")


@pytest.mark.parametrize("cfg", [PruneConfig(reducer="sait", layers=(1,), keep_rate=0.5),
                                 PruneConfig(reducer="sait", layers=(1,), mass_threshold=0.6)])
def test_sait_block_runs_dense_and_prunes_as_tokens_leave_it(cfg, images):
    """SaiT's block P runs its MLP on every token; the next block sees the kept ones."""
    model = apply(make_model(), cfg)
    seen = {}
    hooks = [model.blocks[i].mlp.register_forward_hook(
        lambda mod, args, out, i=i: seen.__setitem__(i, args[0].shape[1])) for i in (1, 2)]
    with torch.no_grad():
        model(images)
    for hook in hooks:
        hook.remove()
    assert seen[1] == 1 + 64
    assert seen[2] == model.final_tokens.x.shape[1] < 1 + 64


def test_mean_score_needs_a_class_token():
    with pytest.raises(ConfigError, match="'mean' needs a class token"):
        apply(make_model("avgpool_no_class_token"), PruneConfig(reducer="sait", layers=(1,), keep_rate=0.5, score="mean"))


def test_mass_based_sait_keeps_a_different_count_per_image(images):
    model = apply(make_model(), PruneConfig(reducer="sait", layers=(1,), mass_threshold=0.6))
    counts = []
    for image in images:
        model(image[None])
        counts.append(model.final_tokens.x.shape[1])
    model(images)
    valid = model.final_tokens.valid
    assert valid.sum(1).tolist() == counts
    assert len(set(counts)) > 1, "random images should differ in how many tokens reach the mass"


def test_ppt_mixes_policies_within_a_batch(images):
    """With tau at the median of the images' score spreads, some images pool and the others
    prune; merged sizes show which branch each image took."""
    model = apply(make_model(), PruneConfig(reducer="ppt", layers=(1,), r=10, tau=0.0, tau_mode="cv2"))
    cv2 = ppt_score_spreads(model, images)
    tau = float(cv2.median())
    apply(model, PruneConfig(reducer="ppt", layers=(1,), r=10, tau=tau, tau_mode="cv2"))
    with torch.no_grad():
        model(images)
    merged = (model.final_tokens.size > 1).any(dim=1)
    assert merged.tolist() == (cv2 < tau).tolist()
    assert 0 < int(merged.sum()) < len(images)


@pytest.mark.parametrize("cfg", configs_for("plain", full=False) + [
    PruneConfig(reducer="sait", layers=(1,), mass_threshold=0.6)])
def test_trains_with_gradients(cfg, images):
    model = apply(make_model(), cfg).train()
    loss = torch.nn.functional.cross_entropy(model(images), torch.tensor([0, 1, 2, 3]))
    loss.backward()
    grads = [p.grad for p in model.parameters() if p.requires_grad]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)
    assert model.blocks[3].mlp.fc1.weight.grad.abs().sum() > 0


def test_bf16_autocast_runs(images):
    for cfg in configs_for("plain", full=False):
        model = apply(make_model(), cfg)
        with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
            out = model(images)
        assert torch.isfinite(out.float()).all(), cfg


def test_apply_replaces_and_remove_restores(images):
    model = make_model()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    with torch.no_grad():
        dense = model(images)
    evit = PruneConfig(reducer="evit", layers=(1,), keep_rate=0.5)
    tome = PruneConfig(reducer="tome", layers=(2,), r=5)
    apply(model, evit)
    apply(model, tome)
    assert [type(b).__name__ for b in model.blocks] == ["Block", "Block", "ReducingBlock", "Block"]
    assert model.prune_config == tome
    assert model.state_dict().keys() == state.keys()
    with torch.no_grad():
        once = apply(make_model(), tome)(images)
        torch.testing.assert_close(model(images), once)
    remove(model)
    assert type(model).__name__ == "VisionTransformer" and not hasattr(model, "prune_config")
    with torch.no_grad():
        assert torch.equal(model(images), dense)


def test_reduced_tokens_are_physically_removed(images):
    model = apply(make_model(), PruneConfig(reducer="evit", layers=(0,), keep_rate=0.25, fuse=False))
    with torch.no_grad():
        features = model.forward_features(images)
    assert features.shape == (4, 1 + 16, 48)


def test_sources_track_which_patches_each_token_holds(images):
    model = apply(make_model(), PruneConfig(reducer="tome", r=8))
    model.track_source = True
    with torch.no_grad():
        model(images)
    tokens = model.final_tokens
    body_source = tokens.source[:, tokens.prefix:]
    # every patch is held by exactly one token, and a token's size is the patches it holds
    torch.testing.assert_close(body_source.sum(1), torch.ones(4, 64))
    torch.testing.assert_close(body_source.sum(2), tokens.size[:, tokens.prefix:])


def test_strength_scales_the_reduction(images):
    model = make_model()
    with torch.no_grad():
        dense = model(images)
    apply(model, PruneConfig(reducer="evit", layers=(1, 2), keep_rate=0.5))
    counts = {}
    for strength in (0.0, 0.5, 1.0):
        set_strength(model, strength)
        with torch.no_grad():
            out = model(images)
        counts[strength] = model.final_tokens.x.shape[1]
        if strength == 0.0:
            torch.testing.assert_close(out, dense)
    # keep rate 1 - s * (1 - 0.5): at half strength 0.75: 64 -> 48 + fused = 49 -> 37 + fused = 38;
    # at full strength 0.5: 64 -> 32 + 1 = 33 -> 17 + 1 = 18; plus CLS
    assert counts == {0.0: 65, 0.5: 39, 1.0: 19}
    with pytest.raises(ValueError, match="outside"):
        set_strength(model, 1.5)
