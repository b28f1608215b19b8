"""What a Ray Tune worker runs for one trial. Kept free of Optuna: the driver owns the study.

Failures are reported as data (a final result with `autoprune_failed`), so the driver can store
the reason; only a dead worker reaches Ray's own error path.
"""

from __future__ import annotations

import dataclasses
import traceback
from pathlib import Path
from typing import Any

import torch

from ..config import PruneConfig
from ..data import SyntheticOptions, load_datasets, model_data_config
from ..teacher import TeacherSpec
from ..train import TrainConfig, TrainingFailed
from ..trial import Baseline, ModelSpec, load_baseline, run_trial

FINAL = "autoprune_final"
FAILED = "autoprune_failed"

# A reused worker keeps its data, baseline and teacher: building them is most of a trial's start-up.
_PREPARED: dict[str, tuple[Any, Baseline, Any]] = {}


def _prepare(context: dict[str, Any]):
    key = repr(sorted((k, repr(v)) for k, v in context.items()
                      if k in ("model", "data", "synthetic", "baseline", "device", "teacher")))
    if key not in _PREPARED:
        _PREPARED.clear()
        spec = ModelSpec(**context["model"])
        synthetic = SyntheticOptions(**context["synthetic"])
        baseline = load_baseline(Path(context["baseline"]), spec, device=context["device"])
        datasets = load_datasets(context["data"], model_data_config(baseline.model), synthetic=synthetic)
        teacher = context.get("teacher")
        teacher = None if teacher is None else TeacherSpec(**teacher).load().to(context["device"])
        _PREPARED[key] = (datasets, baseline, teacher)
    return _PREPARED[key]


def run_search_trial(config: dict[str, Any], context: dict[str, Any]) -> None:
    """Ray Tune function trainable: fine-tune and measure one candidate, reporting per epoch.
    `config` is the trial's (from the searcher); `context` the run's (model, data, baseline...)."""
    from ray import tune

    if context.get("threads"):
        torch.set_num_threads(context["threads"])
    try:
        datasets, baseline, teacher = _prepare(context)
        prune = PruneConfig.from_dict(config["prune_config"])
        recipe = TrainConfig.from_dict(config["train_config"])

        def on_epoch(record):
            tune.report({"accuracy": record.metrics.get("top1", float("nan")), "epoch": record.epoch,
                         "progress": record.progress, "train_loss": record.train_loss})

        checkpoint = Path(context["checkpoints"]) / f"trial_{config['trial_number']}.pt"
        result = run_trial(baseline, datasets, prune, recipe, teacher=teacher, on_epoch=on_epoch,
                           save_to=checkpoint, throughput_rounds=context.get("throughput_rounds", 5))
    except TrainingFailed as error:
        tune.report({FAILED: str(error)})
        return
    except Exception as error:  # anything else is a trial failure too, with its reason kept
        detail = str(error).splitlines()[0] if str(error) else ""
        tune.report({FAILED: f"{type(error).__name__}: {detail}",
                     "traceback": traceback.format_exc(limit=8)})
        return
    import ray

    tune.report({**dataclasses.asdict(result), "epoch": len(result.history), "checkpoint_path": str(checkpoint),
                 "node_id": ray.get_runtime_context().get_node_id(), FINAL: True})
