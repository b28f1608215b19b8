"""Export a trial's fine-tuned reduced model to a folder, and load it back as a ready timm model.

A folder holds `weights.pt` (the state dict) and `autoprune.json` (timm model name and kwargs,
class count, `PruneConfig`, and the metrics the model was chosen on). Loading needs only timm and
autoprune: `autoprune.load(DIR)`. An ONNX export (`onnx_export`) holds `model.onnx` instead of
the weights, with the same manifest.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import optuna
import timm
import torch
from torch import nn

from .config import PruneConfig
from .patch import apply
from .study import outcome_of
from .study_attrs import REASON, SETTINGS_ATTR

MANIFEST = "autoprune.json"
WEIGHTS = "weights.pt"
ONNX_FILE = "model.onnx"
PICKS = ("accuracy", "speed", "balanced")


class ExportError(ValueError):
    """A trial that cannot be exported, or a folder that cannot be written or read."""


def load(folder: str | Path, device: str = "cpu") -> nn.Module:
    """The exported model: a timm ViT with its token reduction applied, in eval mode."""
    folder = Path(folder)
    if not (folder / MANIFEST).is_file():
        raise ExportError(f"{str(folder)!r} holds no exported model (no {MANIFEST})")
    manifest = json.loads((folder / MANIFEST).read_text())
    if manifest.get("format") == "onnx":
        raise ExportError(f"{str(folder)!r} holds an ONNX export ({ONNX_FILE}): run it with onnxruntime, "
                          "or export again without --format onnx for autoprune.load")
    return model_from_manifest(manifest, folder / WEIGHTS, device)


def model_from_manifest(manifest: dict[str, Any], weights: Path, device: str = "cpu") -> nn.Module:
    """The timm model the manifest names, with `weights` loaded and its `PruneConfig` applied, in eval mode."""
    model = timm.create_model(manifest["model"], num_classes=manifest["num_classes"], **manifest["model_kwargs"])
    model.load_state_dict(torch.load(weights, map_location=device, weights_only=True))
    return apply(model.to(device), PruneConfig.from_dict(manifest["prune_config"])).eval()


def pick_trial(front: list[optuna.trial.FrozenTrial], pick: str, tolerance: float = 1.0) -> optuna.trial.FrozenTrial:
    """From the Pareto front (accuracy, throughput): the most accurate, the fastest within
    `tolerance` points of the best accuracy, or the knee (farthest from the line joining the two
    ends, in coordinates scaled to the front's ranges)."""
    if pick not in PICKS:
        raise ExportError(f"--pick: {pick!r} is invalid; accepted: {', '.join(PICKS)}")
    best = max(front, key=lambda t: t.values[0])
    if pick == "accuracy" or len(front) == 1:
        return best
    if pick == "speed":
        close = [t for t in front if t.values[0] >= best.values[0] - tolerance]
        return max(close, key=lambda t: t.values[1])
    fastest = max(front, key=lambda t: t.values[1])
    span = [max(abs(best.values[i] - fastest.values[i]), 1e-12) for i in (0, 1)]

    def distance(trial) -> float:
        x = [(trial.values[i] - fastest.values[i]) / span[i] for i in (0, 1)]
        end = [(best.values[i] - fastest.values[i]) / span[i] for i in (0, 1)]
        return abs(x[0] * end[1] - x[1] * end[0])

    return max(front, key=distance)


def export_trial(study: optuna.Study, trial: optuna.trial.FrozenTrial, out: str | Path, force: bool = False) -> Path:
    """Write `trial`'s fine-tuned model to `out` (refusing an existing folder unless `force`)."""
    manifest, checkpoint = trial_manifest(study, trial)

    def write(folder: Path) -> None:
        shutil.copyfile(checkpoint, folder / WEIGHTS)
        (folder / MANIFEST).write_text(json.dumps(manifest, indent=2))

    return write_folder(out, force, write)


def trial_manifest(study: optuna.Study, trial: optuna.trial.FrozenTrial) -> tuple[dict[str, Any], Path]:
    """The manifest of a complete trial's model, and the path of its fine-tuned weights."""
    if trial.state != optuna.trial.TrialState.COMPLETE:
        reason = trial.user_attrs.get(REASON) or outcome_of(trial) or "not run yet"
        raise ExportError(f"trial {trial.number} did not finish ({trial.state.name}: {reason}); only complete trials "
                          "can be exported")
    checkpoint = Path(trial.user_attrs.get("checkpoint_path") or "")
    if not checkpoint.is_file():
        raise ExportError(f"trial {trial.number}'s weights are missing ({str(checkpoint)!r}); was studies/ moved?")
    settings = study.user_attrs.get(SETTINGS_ATTR, {})
    state = torch.load(checkpoint, map_location="cpu", weights_only=True)
    manifest: dict[str, Any] = {
        "model": settings["model"]["name"],
        "model_kwargs": settings["model"]["kwargs"],
        "num_classes": int(state["head.weight"].shape[0]),
        "prune_config": trial.user_attrs["prune_config"],
        "study": study.study_name,
        "trial": trial.number,
        "data": settings.get("data"),
        "metrics": {key: trial.user_attrs.get(key) for key in
                    ("accuracy", "top5", "test_accuracy", "flops", "params", "throughput", "speedup")},
        "train_config": trial.user_attrs.get("train_config"),
    }
    return manifest, checkpoint


def write_folder(out: str | Path, force: bool, write: Callable[[Path], None]) -> Path:
    """Let `write` fill a new folder, then put it at `out` (refusing an existing folder unless `force`)."""
    out = Path(out)
    _check_writable(out, force)
    # written beside `out` and swapped in whole: a failed export leaves no half folder, and an
    # earlier export is replaced only once the new one is complete
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=f".{out.name}-", dir=out.parent))
        try:
            write(staging)
            if out.exists():
                shutil.rmtree(out)
            staging.rename(out)
        finally:
            shutil.rmtree(staging, ignore_errors=True)
    except OSError as error:
        raise ExportError(f"--out: {str(out)!r} cannot be written ({error.strerror or error})") from None
    return out


def _check_writable(out: Path, force: bool) -> None:
    """`--force` replaces an earlier export or an empty folder, never anything else."""
    if not out.exists() and not out.is_symlink():
        return
    if not out.is_dir() or out.is_symlink():
        raise ExportError(f"--out: {str(out)!r} exists and is not a folder; choose a folder path")
    earlier_export = (out / MANIFEST).is_file() and set(p.name for p in out.iterdir()) <= {MANIFEST, WEIGHTS, ONNX_FILE}
    if earlier_export or not any(out.iterdir()):
        if not force:
            raise ExportError(f"--out: {str(out)!r} exists; choose another folder or pass --force to overwrite it")
        return
    raise ExportError(f"--out: {str(out)!r} holds other files than an earlier export; "
                      "choose a new or empty folder (--force only replaces an earlier export)")
