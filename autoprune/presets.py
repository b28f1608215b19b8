"""Named starting points: the model, data and recipes a search or a trial runs with by default.

`quickstart` fits a 2-core CPU: a small ViT on the built-in synthetic data, whose dense baseline
trains in a few minutes and whose trials fine-tune in about one. `deit_small` is the papers'
setting for machines with a GPU (timm's pretrained DeiT-S; bring your own data). A model or
starting point no preset was made for gets the recipes of its starting point (`recipes_for`).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from .data import SyntheticOptions
from .trial import ModelSpec
from .train import TrainConfig


@dataclass(frozen=True)
class Recipes:
    """How the dense baseline is trained, and how each trial fine-tunes its reduced copy."""

    baseline: TrainConfig
    trial: TrainConfig


# The recipes for a model or starting point that no preset was made for (`recipes_for`).
FROM_SCRATCH = Recipes(
    # the model learns the data from nothing: many epochs at a high learning rate (the quickstart's
    # recipe: 96 % val top-1 on the synthetic task in 10 epochs)
    baseline=TrainConfig(epochs=10, batch_size=64, lr=1e-3, warmup=0.1),
    # a trial recovers from the reduction: a fifth of the baseline's rate, two epochs
    trial=TrainConfig(epochs=2, batch_size=64, lr=2e-4, warmup=0.1),
)
FINE_TUNE = Recipes(
    # trained weights: a short fine-tune, at a rate high enough for the new classifier that weights
    # trained on other classes get (1e-5 barely moves it), low enough to keep what the weights
    # know. A checkpoint already trained on this data needs none of it: 0 epochs take it as it is
    baseline=TrainConfig(epochs=2, batch_size=64, lr=1e-4, warmup=0.1),
    # a trial adapts the trained weights to fewer tokens: half the baseline's rate, the reduction
    # ramped in over the first 30 % (as EViT and BAT train)
    trial=TrainConfig(epochs=2, batch_size=64, lr=5e-5, warmup=0.1, keep_rate_warmup=0.3),
)


@dataclass(frozen=True)
class Preset:
    model: ModelSpec
    data: str
    synthetic: SyntheticOptions = field(default_factory=SyntheticOptions)
    baseline: TrainConfig = field(default_factory=TrainConfig)
    trial: TrainConfig = field(default_factory=TrainConfig)
    device: str = "cpu"
    screen: int = 64           # configs screened off the shelf before fine-tuning (0: no screening)
    screen_images: int = 256   # validation images each screen evaluates


PRESETS: dict[str, Preset] = {
    "quickstart": Preset(
        model=ModelSpec("vit_tiny_patch16_224",
                        {"img_size": 64, "patch_size": 8, "embed_dim": 128, "depth": 6, "num_heads": 4}),
        data="synthetic",
        synthetic=SyntheticOptions(),
        baseline=TrainConfig(epochs=10, batch_size=64, lr=1e-3, warmup=0.1, workers=0),
        trial=TrainConfig(epochs=2, batch_size=64, lr=2e-4, warmup=0.1, workers=0),
        screen=64, screen_images=256,  # about a minute on 2 cores
    ),
    "deit_small": Preset(
        model=ModelSpec("deit_small_patch16_224", {}, init="pretrained"),
        data="synthetic",
        baseline=FINE_TUNE.baseline,
        trial=TrainConfig(epochs=5, batch_size=256, lr=5e-5, warmup=0.1, keep_rate_warmup=0.3),
        device="cuda",
        screen=256, screen_images=2048,  # a few minutes of one GPU, against ~5 epochs per fine-tune
    ),
}


def get_preset(name: str) -> Preset:
    if name not in PRESETS:
        raise ValueError(f"preset {name!r} is unknown; accepted: {', '.join(PRESETS)}")
    return PRESETS[name]


def recipes_for(preset: Preset, model: ModelSpec) -> Recipes:
    """The recipes for `model`: the preset's own for the model it was made for, starting from the
    same kind of weights; otherwise those of the model's starting point (from scratch, or from
    pretrained weights or a checkpoint), whose learning rates are ten times apart."""
    own = (model.name, model.kwargs) == (preset.model.name, preset.model.kwargs)
    if own and (model.init == "scratch") == (preset.model.init == "scratch"):
        return Recipes(preset.baseline, preset.trial)
    return FROM_SCRATCH if model.init == "scratch" else FINE_TUNE
