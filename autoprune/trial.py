"""The dense baseline every trial starts from, and the trial itself: reduce, fine-tune, measure.

`dense_baseline` builds (pretrained weights, a local checkpoint, or from scratch), fine-tunes and
measures the dense model once, caching it on disk under a key of everything that defines it.
`run_trial` applies a `PruneConfig` to a copy, fine-tunes it and returns a `TrialResult` that
serialises to JSON.
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import timm
import torch
from filelock import FileLock
from timm.models.vision_transformer import VisionTransformer
from torch import nn
from torch.utils.data import TensorDataset

from . import __version__
from .bench import time_interleaved
from .config import PruneConfig
from .data import Datasets, SyntheticOptions, make_loader
from .digest import file_sha256
from .flops import count_flops
from .patch import apply, set_strength
from .progress import LiveProgress
from .teacher import TeacherSpec
from .train import EpochRecord, TrainConfig, evaluate, fine_tune, model_device, seed_everything

DEFAULT_CACHE = Path("studies") / "baselines"


class BaselineError(RuntimeError):
    """The dense baseline cannot be built (weights unreachable, checkpoint unreadable...)."""


class ModelError(ValueError):
    """An unknown timm model, kwargs it refuses, or a model autoprune cannot reduce."""


def create_unweighted(name: str, kwargs: dict[str, Any]) -> nn.Module:
    """The timm ViT with random weights: checks name and kwargs, and gives shapes, before anything
    is downloaded or trained."""
    if not timm.is_model(name):
        raise ModelError(f"--model: unknown timm model {name!r} (e.g. deit_small_patch16_224, vit_base_patch16_224)")
    try:
        model = timm.create_model(name, **kwargs)
    except Exception as error:  # timm raises TypeError, ValueError or AssertionError for bad kwargs
        detail = str(error).splitlines()[0] if str(error) else type(error).__name__
        raise ModelError(f"--model-kwargs: {name} does not accept {kwargs} ({detail})") from None
    if not isinstance(model, VisionTransformer):
        raise ModelError(f"--model: {name} is not a timm VisionTransformer (DeiT/ViT)")
    return model


@dataclass(frozen=True)
class ModelSpec:
    """Which network: a timm model name, its create_model kwargs, and where weights come from:
    "scratch", "pretrained" (timm's hub weights) or a path to a local checkpoint."""

    name: str
    kwargs: dict[str, Any] = field(default_factory=dict)
    init: str = "scratch"

    def create(self, num_classes: int) -> nn.Module:
        """The timm model with `num_classes` outputs and its initial weights."""
        if self.init == "scratch":
            return timm.create_model(self.name, num_classes=num_classes, **self.kwargs)
        if self.init == "pretrained":
            try:
                return timm.create_model(self.name, pretrained=True, num_classes=num_classes, **self.kwargs)
            except Exception as error:
                raise BaselineError(
                    f"pretrained weights for {self.name} could not be loaded ({type(error).__name__}: "
                    f"{str(error).splitlines()[0] if str(error) else 'no detail'}); without network access "
                    "use a local checkpoint or train from scratch") from None
        path = Path(self.init)
        if not path.is_file():
            raise BaselineError(f"checkpoint {self.init!r} does not exist (expected a timm/PyTorch weights file)")
        try:
            # timm's own loader (checkpoint dict layouts, position embeddings resampled to the model's
            # size); told the checkpoint's class count, it keeps a classifier that fits the data and
            # replaces one that does not (told nothing, it assumes 1000 and replaces any other)
            head = timm.models.load_state_dict(str(path)).get("head.weight")
            overlay = {"file": str(path.resolve()), "num_classes": None if head is None else head.shape[0]}
            return timm.create_model(self.name, pretrained=True, num_classes=num_classes,
                                     pretrained_cfg_overlay=overlay, **self.kwargs)
        except Exception as error:
            raise BaselineError(f"checkpoint {self.init!r} does not fit {self.name}: "
                                f"{str(error).splitlines()[0] if str(error) else type(error).__name__}") from None

    def identity(self) -> dict[str, Any]:
        """What defines the initial weights (a checkpoint by content, not by name)."""
        init = self.init
        if init not in ("scratch", "pretrained"):
            init = "sha256:" + _file_digest(Path(init))
        return {"name": self.name, "kwargs": self.kwargs, "init": init}


@dataclass
class Baseline:
    """The fine-tuned dense model and its reference measurements."""

    spec: ModelSpec
    model: nn.Module
    metrics: dict[str, Any]   # val (and test) accuracy, flops, params, throughput, device
    path: Path

    def fresh_copy(self) -> nn.Module:
        """An independent copy of the dense model, to reduce and fine-tune."""
        return copy.deepcopy(self.model)


def baseline_key(spec: ModelSpec, data: str, synthetic: SyntheticOptions, recipe: TrainConfig) -> str:
    payload = {"model": spec.identity(), "data": _data_identity(data), "synthetic": dataclasses.asdict(synthetic),
               "recipe": recipe.to_dict(), "autoprune": __version__}
    return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()[:16]


def dense_baseline(
    spec: ModelSpec,
    datasets: Datasets,
    data: str,
    recipe: TrainConfig,
    synthetic: SyntheticOptions = SyntheticOptions(),
    device: str = "cpu",
    cache_dir: Path = DEFAULT_CACHE,
    log: Callable[[str], None] = print,
    live: LiveProgress | None = None,
) -> Baseline:
    """The dense baseline for (model, data, recipe), trained once and then read from the cache.
    Its epochs show on `live` (default: one line per epoch through `log`)."""
    key = baseline_key(spec, data, synthetic, recipe)
    folder = Path(cache_dir) / f"{spec.name}-{key}"
    folder.mkdir(parents=True, exist_ok=True)
    with FileLock(str(folder / ".lock")):
        if (folder / "baseline.json").exists():
            try:
                return load_baseline(folder, spec, device)
            except Exception as error:  # a damaged cache is rebuilt, not trusted
                log(f"the cached baseline in {folder} is unreadable ({type(error).__name__}); training it again")
        seed_everything(recipe.seed)  # the random init too: the cache key promises one model per key
        model = spec.create(datasets.num_classes).to(device)
        started = time.perf_counter()
        history: list[EpochRecord] = []
        if recipe.epochs == 0:  # the starting weights as they are: measured, not trained
            log(f"measuring the dense baseline {spec.name} as it starts (0 epochs) -> {folder}")
        else:
            log(f"training the dense baseline {spec.name} ({recipe.epochs:g} epochs) -> {folder}")
            live = live or LiveProgress(log)
            live.start(folder, "  baseline", recipe.epochs)
            try:
                history = fine_tune(model, datasets.train, recipe, val_set=datasets.val, on_epoch=lambda r: live.update(
                    folder, r.progress, f"loss {r.train_loss:.3f}, val top-1 {r.metrics.get('top1', float('nan')):.2f}%"))
            finally:
                live.finish(folder)
        model.eval()
        metrics = measure(model, datasets, recipe.batch_size, recipe.workers)
        metrics.update(train_seconds=time.perf_counter() - started, history=[dataclasses.asdict(h) for h in history],
                       key=key, spec=dataclasses.asdict(spec), data=data, recipe=recipe.to_dict())
        # weights first: a folder with baseline.json is complete
        _atomic_write(folder / "model.pt", lambda tmp: torch.save(model.state_dict(), tmp))
        _atomic_write(folder / "baseline.json", lambda tmp: Path(tmp).write_text(json.dumps(metrics, indent=2, default=str)))
        return Baseline(spec, model, metrics, folder)


def load_baseline(folder: Path, spec: ModelSpec, device: str = "cpu") -> Baseline:
    """A baseline that `dense_baseline` built earlier, read from its folder."""
    metrics = json.loads((Path(folder) / "baseline.json").read_text())
    state = torch.load(Path(folder) / "model.pt", map_location=device, weights_only=True)
    model = timm.create_model(spec.name, num_classes=state["head.weight"].shape[0], **spec.kwargs).to(device)
    model.load_state_dict(state)
    return Baseline(spec, model.eval(), metrics, Path(folder))


def measure(model: nn.Module, datasets: Datasets, batch_size: int, workers: int | None) -> dict[str, Any]:
    """Accuracy on val (and test), FLOPs per image, params and throughput of one model alone."""
    metrics: dict[str, Any] = {"val": evaluate(model, datasets.val, batch_size, workers)}
    if datasets.test is not None:
        metrics["test"] = evaluate(model, datasets.test, batch_size, workers)
    images = _sample_images(datasets.val, batch_size, model_device(model))
    metrics["flops"] = count_flops(model, images)
    metrics["params"] = sum(p.numel() for p in model.parameters())
    metrics["throughput"] = time_interleaved({"model": model}, images, rounds=5, warmup=1)["model"]
    metrics["device"] = str(model_device(model))
    return metrics


@dataclass
class TrialResult:
    """What one trial measured; `to_dict()` is JSON-ready."""

    prune_config: dict[str, Any]
    train_config: dict[str, Any]
    accuracy: float                 # val top-1 (%), the search's first objective
    top5: float | None
    test_accuracy: float | None
    flops: float                    # per image; mean over val images for adaptive configs
    flops_std: float
    params: int
    throughput: float               # img/s on the trial's device
    dense_throughput: float         # the dense baseline, timed interleaved in the same process
    speedup: float
    dense_accuracy: float           # the baseline's val top-1 (%)
    dense_mode_accuracy: float | None  # SaiT alternate training: the same weights run dense
    history: list[dict[str, Any]]
    seconds: float

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict())


def run_trial(
    baseline: Baseline,
    datasets: Datasets,
    prune_config: PruneConfig,
    train_config: TrainConfig,
    teacher: nn.Module | TeacherSpec | None = None,
    on_epoch: Callable[[EpochRecord], None] | None = None,
    flops_images: int = 256,
    throughput_rounds: int = 5,
    throughput_batch: int | None = None,
    save_to: Path | None = None,
) -> TrialResult:
    """Reduce a copy of the baseline with `prune_config`, fine-tune it, and measure it.

    The teacher for distillation (train_config.beta > 0) is the dense baseline unless `teacher`
    gives another model, or a `TeacherSpec` to load one (e.g. a DINO ViT for SaiT's tis).
    With `save_to`, the fine-tuned weights are written there (a state dict; the config is in the
    result). Throughput is timed at `throughput_batch` images a batch (default: the recipe's batch
    size; a search times at its serving batch size, where its prediction holds)."""
    started = time.perf_counter()
    if train_config.beta > 0 and teacher is None:
        teacher = baseline.model
    if train_config.beta > 0 and isinstance(teacher, TeacherSpec):
        teacher = teacher.load()
    seed_everything(train_config.seed)
    model = apply(baseline.fresh_copy(), prune_config)
    history = fine_tune(model, datasets.train, train_config, teacher=teacher, val_set=datasets.val, on_epoch=on_epoch)
    model.eval()
    if save_to is not None:
        Path(save_to).parent.mkdir(parents=True, exist_ok=True)
        _atomic_write(Path(save_to), lambda tmp: torch.save(model.state_dict(), tmp))
    batch, workers = train_config.batch_size, train_config.workers
    val = history[-1].metrics if history and history[-1].metrics else evaluate(model, datasets.val, batch, workers)
    test = evaluate(model, datasets.test, batch, workers) if datasets.test is not None else None
    dense_mode = None
    if train_config.sait_alternate:
        set_strength(model, 0.0)
        dense_mode = evaluate(model, datasets.val, batch, workers)["top1"]
        set_strength(model, 1.0)
    device = model_device(model)
    flops_sample = _sample_images(datasets.val, flops_images, device)
    per_image = torch.tensor(count_flops(model, flops_sample, per_image=True), dtype=torch.float64)
    timing_images = _sample_images(datasets.val, throughput_batch or batch, device)
    rates = time_interleaved({"dense": baseline.model.eval(), "reduced": model}, timing_images,
                             rounds=throughput_rounds, warmup=1,
                             autocast_dtype=torch.bfloat16 if device.type == "cuda" else None)
    return TrialResult(
        prune_config=prune_config.to_dict(), train_config=train_config.to_dict(),
        accuracy=val["top1"], top5=val.get("top5"), test_accuracy=test["top1"] if test else None,
        flops=float(per_image.mean()), flops_std=float(per_image.std(unbiased=False)),
        params=sum(p.numel() for p in model.parameters()),
        throughput=rates["reduced"], dense_throughput=rates["dense"], speedup=rates["reduced"] / rates["dense"],
        dense_accuracy=baseline.metrics["val"]["top1"], dense_mode_accuracy=dense_mode,
        history=[dataclasses.asdict(h) for h in history], seconds=time.perf_counter() - started,
    )


def time_reduced(baseline: Baseline, datasets: Datasets, models: dict[str, tuple[PruneConfig, Path | None]],
                 batch_size: int, rounds: int) -> dict[str, float]:
    """Images/s of the dense baseline ("dense") and of each reduced model, timed interleaved in
    one process on `batch_size` val images (median of `rounds`). A model is the baseline reduced
    by its config with, when a checkpoint is given, its fine-tuned weights (what adaptive
    reducers keep depends on them)."""
    device = model_device(baseline.model)
    timed: dict[str, nn.Module] = {"dense": baseline.model.eval()}
    for name, (prune_config, checkpoint) in models.items():
        model = baseline.fresh_copy()
        if checkpoint is not None:
            model.load_state_dict(torch.load(checkpoint, map_location=device, weights_only=True))
        timed[name] = apply(model, prune_config).eval()
    images = _sample_images(datasets.val, batch_size, device)
    return time_interleaved(timed, images, rounds=rounds, warmup=2,
                            autocast_dtype=torch.bfloat16 if device.type == "cuda" else None)


def screen_subset(dataset, count: int, seed: int) -> TensorDataset:
    """A fixed, seeded sample of `count` images of `dataset` (all of it when smaller), loaded once:
    every config of a study is screened on the same images, so their scores compare pairwise."""
    order = torch.randperm(len(dataset), generator=torch.Generator().manual_seed(seed))[:count].sort().values
    images, labels = zip(*(dataset[int(i)] for i in order))
    return TensorDataset(torch.stack(images), torch.as_tensor(labels))


def screen_config(model: nn.Module, prune_config: PruneConfig, subset: TensorDataset, batch_size: int) -> dict[str, float]:
    """Top-1 (%) and mean loss of `model` reduced by `prune_config` as it is, without training
    ("off the shelf"). The model is patched in place; its weights are not touched."""
    return evaluate(apply(model, prune_config), subset, batch_size, workers=0)


def _sample_images(dataset, count: int, device: torch.device) -> torch.Tensor:
    """The first `count` images of a dataset (deterministic), as one batch on `device`."""
    loader = make_loader(dataset, min(count, len(dataset)), train=False, workers=0, device=device)
    images, _ = next(iter(loader))
    return images.to(device)


def _data_identity(data: str) -> dict[str, Any]:
    """A data spec plus, for folders, what is in them (so changed data retrains the baseline)."""
    kind, _, path = data.partition(":")
    if not path:
        return {"spec": data}
    root = Path(path)
    files = sorted(p for p in root.rglob("*") if p.is_file()) if root.is_dir() else []
    listing = hashlib.sha256("\n".join(f"{p.relative_to(root)}:{p.stat().st_size}" for p in files).encode())
    return {"spec": f"{kind}:{root.resolve()}", "files": len(files), "listing": listing.hexdigest()}


def _file_digest(path: Path) -> str:
    digest = file_sha256(path)
    if digest is None:
        raise BaselineError(f"checkpoint {str(path)!r} does not exist (expected a timm/PyTorch weights file)")
    return digest


def _atomic_write(path: Path, write: Callable[[str], None]) -> None:
    tmp = f"{path}.tmp-{os.getpid()}"
    write(tmp)
    os.replace(tmp, path)
