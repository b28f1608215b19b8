"""`autoprune search --address` on a Ray cluster started as users start one (fixtures_ray.py):
trials run on both nodes, and the test stops exactly the processes it started."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import optuna
import pytest
from PIL import Image

from autoprune.storage import open_storage
from autoprune.study_attrs import OUTCOME
from fixtures_processes import session_members, tail
from fixtures_ray import RayCluster
from test_search import TINY

pytestmark = pytest.mark.slow

TINY_KWARGS = ",".join(f"{key}={value}" for key, value in TINY.kwargs.items())
EPOCHS = 40  # per trial: one step each on these 64 images, a few seconds in all on an idle machine


@pytest.fixture
def cluster(tmp_path):
    cluster = RayCluster(tmp_path)
    try:
        cluster.start()
        yield cluster
    finally:
        cluster.stop()
    assert not [pid for session in cluster.sessions for pid in session_members(session)]


def image_folder(root: Path, classes: int = 4, train: int = 16, val: int = 8) -> Path:
    """train/ and val/ class folders of 32x32 images: each class a colour, with noise."""
    rng = np.random.default_rng(0)
    for split, count in (("train", train), ("val", val)):
        for label in range(classes):
            folder = root / split / f"class{label}"
            folder.mkdir(parents=True)
            for index in range(count):
                pixels = rng.normal(60 * label, 40, size=(32, 32, 3)).clip(0, 255).astype(np.uint8)
                Image.fromarray(pixels).save(folder / f"{index}.png")
    return root


def test_search_on_a_started_cluster_runs_trials_on_both_nodes(cluster, tmp_path):
    image_folder(tmp_path / "images")
    storage = f"sqlite:///{tmp_path / 'studies.db'}"
    log = tmp_path / "search.log"
    # two trials at once, one CPU each, on nodes of one CPU each: one trial per node, provided the
    # first trial still runs when the second node's worker is up (else Ray Tune reuses the first
    # trial's actor for the second trial): long trials. The data path is relative to the search's
    # folder (tmp_path), as a user types it; trials run in folders of their own
    search = cluster.run([sys.executable, "-m", "autoprune.cli", "search", "--address", cluster.address,
                          "--preset", "quickstart", "--model-kwargs", TINY_KWARGS, "--data", "imagefolder:images",
                          "--epochs", str(EPOCHS), "--budget", "75%", "--trials", "2", "--concurrency", "2",
                          "--cpus-per-trial", "1", "--study", "cluster", "--storage", storage,
                          "--min-baseline-accuracy", "0"], log, timeout=900)
    assert search.returncode == 0, tail(log)
    nodes = cluster.nodes()
    [node_b] = [node for node, resources in nodes.items() if "node_b" in resources]
    [head] = [node for node in nodes if node != node_b]
    study = optuna.load_study(study_name="cluster", storage=open_storage(storage))
    complete = [t for t in study.trials if t.user_attrs.get(OUTCOME) == "complete"]
    seen = (f"head {head[:8]}, node_b {node_b[:8]}; trials (node, proposed, finished): "
            + ", ".join(f"{t.user_attrs['node_id'][:8]} {t.datetime_start:%H:%M:%S} {t.datetime_complete:%H:%M:%S}"
                        for t in complete))
    assert sorted(t.user_attrs["node_id"] for t in complete) == sorted([head, node_b]), seen
