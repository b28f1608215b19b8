import json

import pytest

from autoprune import ConfigError, PruneConfig, apply
from conftest import make_model


def test_defaults_are_resolved_per_reducer():
    cfg = PruneConfig(reducer="evit", layers=(3, 6, 9), keep_rate=0.7)
    assert (cfg.score, cfg.fuse, cfg.prop_attn, cfg.tau) == ("cls", True, None, None)
    assert PruneConfig(reducer="ppt", layers=(1,), r=5).score == "cls_vnorm"
    assert PruneConfig(reducer="ppt", layers=(1,), r=5).tau == 7e-5
    assert PruneConfig(reducer="sait", layers=(3,), mass_threshold=0.7).score == "tis"
    assert PruneConfig(reducer="tome", r=13).prop_attn is True


@pytest.mark.parametrize("cfg", [
    PruneConfig(),
    PruneConfig(reducer="evit", layers=(3, 6, 9), keep_rate=(0.9, 0.7, 0.5), fuse=False),
    PruneConfig(reducer="tome", r=13, prop_attn=False),
    PruneConfig(reducer="ppt", layers=(3, 6, 9), r=50, tau=2.5, tau_mode="cv2"),
    PruneConfig(reducer="tps", layers=(2,), keep_rate=0.5, temperature=0.5),
    PruneConfig(reducer="bat", layers=(3, 6), keep_rate=0.7, clusters=8, knn=5, pairs=0),
    PruneConfig(reducer="sait", layers=(3,), mass_threshold=0.7, score="entropy"),
])
def test_round_trips_through_dict_and_json(cfg):
    assert PruneConfig.from_dict(cfg.to_dict()) == cfg
    assert PruneConfig.from_json(cfg.to_json()) == cfg
    assert json.loads(cfg.to_json()) == cfg.to_dict()


@pytest.mark.parametrize("kwargs, field, hint", [
    (dict(reducer="evict", keep_rate=0.7), "reducer", "evit"),
    (dict(reducer="evit", layers=(3,), keep_rate=0.0), "keep_rate", "(0, 1]"),
    (dict(reducer="evit", layers=(3,), keep_rate=1.5), "keep_rate", "(0, 1]"),
    (dict(reducer="evit", layers=(3, 6), keep_rate=(0.7,)), "keep_rate", "one value per layer"),
    (dict(reducer="tome", r=-1), "r", "non-negative"),
    (dict(reducer="tome", r=4, fuse=True), "fuse", "does not take"),
    (dict(reducer="evit", layers=(3,), keep_rate=0.7, tau=1e-4), "tau", "does not take"),
    (dict(reducer="evit", layers=(3,), keep_rate=0.7, score="attention"), "score", "cls_vnorm"),
    (dict(reducer="evit", layers=(6, 3), keep_rate=0.7), "layers", "increasing"),
    (dict(reducer="evit", layers=(-1,), keep_rate=0.7), "layers", "non-negative"),
    (dict(reducer="evit", layers=(3,)), "PruneConfig", "keep_rate or r"),
    (dict(reducer="evit", layers=(3,), keep_rate=0.7, r=3), "PruneConfig", "exactly one"),
    (dict(reducer="bat", layers=(3,), keep_rate=0.7, knn=5, pairs=2), "clusters", "needs it"),
    (dict(reducer="sait", layers=(3, 6), keep_rate=0.5), "layers", "exactly one layer"),
    (dict(reducer="sait", layers=(3,), mass_threshold=1.2), "mass_threshold", "(0, 1]"),
    (dict(reducer="ppt", layers=(3,), r=5, tau_mode="relative"), "tau_mode", "cv2"),
    (dict(reducer="tps", layers=(3,), keep_rate=0.5, temperature=0), "temperature", "positive"),
    (dict(reducer="none", layers=(3,)), "layers", "takes no"),
])
def test_bad_configs_name_the_field_and_what_is_accepted(kwargs, field, hint):
    with pytest.raises(ConfigError) as error:
        PruneConfig(**kwargs)
    message = str(error.value)
    assert field in message and hint in message and "\n" not in message


def test_from_dict_rejects_unknown_fields():
    with pytest.raises(ConfigError, match="unknown field 'keeprate'"):
        PruneConfig.from_dict({"reducer": "evit", "keeprate": 0.7})
    with pytest.raises(ConfigError, match="not valid JSON"):
        PruneConfig.from_json("{reducer: evit}")


def test_model_dependent_checks_happen_at_apply():
    model = make_model()  # 4 blocks
    with pytest.raises(ConfigError, match=r"layers: 4 is out of range .* 0\.\.3"):
        apply(model, PruneConfig(reducer="evit", layers=(1, 4), keep_rate=0.7))
    with pytest.raises(ConfigError, match="one value per layer"):
        apply(model, PruneConfig(reducer="tome", r=(2, 2)))
    no_cls = make_model("avgpool_no_class_token")
    with pytest.raises(ConfigError, match="score: 'cls' needs a class token"):
        apply(no_cls, PruneConfig(reducer="evit", layers=(1,), keep_rate=0.7))
    with pytest.raises(ConfigError, match="expected a timm VisionTransformer"):
        apply(object(), PruneConfig(reducer="tome", r=2))
