"""Ray: one session for a search's screening and fine-tuning, the screen actors, and the Tuner that
fine-tunes what the searcher proposes. Every study write stays in the driver (the searcher, the
screening loop); workers only compute."""

from __future__ import annotations

import contextlib
import dataclasses
import os
from pathlib import Path
from typing import Any, Iterator

from ..data import DataSpec, parse_data_spec
from .searcher import StudySearcher
from .trainable import ScreenWorker, run_search_trial


@contextlib.contextmanager
def ray_session(address: str | None) -> Iterator[None]:
    """Ray for the duration of a search: joins `address` (or starts a local Ray) unless the caller
    already runs one, and then leaves it as it was."""
    import ray

    started_here = not ray.is_initialized()
    os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")  # the classic reporter honours verbose=0
    # a failure report has no accuracy: Ray's strict metric check would abort the run over it
    os.environ["TUNE_DISABLE_STRICT_METRIC_CHECKING"] = "1"
    if started_here:
        ray.init(address=address, include_dashboard=False, log_to_driver=False, logging_level="ERROR",
                 configure_logging=True)
    try:
        yield
    finally:
        if started_here:
            ray.shutdown()


def worker_resources(cpus_per_trial: int | None, gpus_per_trial: float, concurrency: int) -> dict[str, float]:
    """What one fine-tune or one screen actor holds (inside a Ray session): by default the
    cluster's CPUs shared by `concurrency` workers."""
    import ray

    cpus = cpus_per_trial or max(1, int(ray.available_resources().get("CPU", os.cpu_count() or 1)) // concurrency)
    return {"cpu": cpus, "gpu": gpus_per_trial}


def worker_context(settings, baseline, checkpoints: Path, resources: dict[str, float]) -> dict[str, Any]:
    """What every worker needs to rebuild the run's data and baseline, and where trials save."""
    data = parse_data_spec(settings.data)
    if data.path is not None:  # Ray Tune runs each trial in its own folder: relative paths break there
        data = DataSpec(data.kind, str(Path(data.path).resolve()))
    return {
        "model": dataclasses.asdict(settings.model), "data": str(data),
        "synthetic": dataclasses.asdict(settings.synthetic), "baseline": str(baseline.path.resolve()),
        "device": settings.device, "threads": int(resources["cpu"]), "checkpoints": str(checkpoints),
        "teacher": None if settings.teacher is None else dataclasses.asdict(settings.teacher),
        "screen_images": settings.screen_images if settings.screen else 0, "screen_seed": settings.seed,
        "batch_size": settings.recipe.batch_size, "serve_batch": settings.serve_batch,
    }


@contextlib.contextmanager
def screen_pool(context: dict[str, Any], resources: dict[str, float], actors: int):
    """`actors` screen workers as a `ray.util.ActorPool`, given back to Ray when screening ends so
    that fine-tuning gets their resources."""
    import ray
    from ray.util import ActorPool

    remote = ray.remote(ScreenWorker).options(num_cpus=resources["cpu"], num_gpus=resources["gpu"])
    handles = [remote.remote(context) for _ in range(actors)]
    try:
        yield ActorPool(handles)
    finally:
        for handle in handles:
            ray.kill(handle)


def run_trials(searcher: StudySearcher, context: dict[str, Any], resources: dict[str, float], concurrency: int,
               retries: int, scheduler, home: Path) -> None:
    """Fine-tune what `searcher` proposes on Ray Tune until it says it is finished."""
    from ray import tune

    trainable = tune.with_resources(tune.with_parameters(run_search_trial, context=context), resources)
    tuner = tune.Tuner(
        trainable,
        tune_config=tune.TuneConfig(search_alg=searcher, scheduler=scheduler, num_samples=-1,
                                    max_concurrent_trials=concurrency, reuse_actors=True),
        run_config=tune.RunConfig(name=f"run-{os.getpid()}", storage_path=str(home / "ray"), verbose=0,
                                  failure_config=tune.FailureConfig(max_failures=retries)),
    )
    tuner.fit()
