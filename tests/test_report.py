"""`autoprune report`: CSV, Markdown and a self-contained HTML page from a study, built here
without running a search (trials are added to an Optuna study directly)."""

import re
from pathlib import Path

import optuna
import pandas as pd
import pytest
import timm
import torch
from optuna.distributions import CategoricalDistribution, FloatDistribution
from optuna.trial import TrialState, create_trial

import autoprune
from autoprune.cli import main
from autoprune.study_attrs import DENSE_ATTR, FRONT_TIMING_ATTR, OUTCOME, SETTINGS_ATTR
from autoprune.report import write_report
from autoprune.report.maps import patch_status
from autoprune.report.plots import hypervolume_2d, hypervolume_history

TINY = {"img_size": 32, "patch_size": 8, "embed_dim": 48, "depth": 4, "num_heads": 3}
SYNTHETIC = {"num_classes": 4, "train_size": 32, "val_size": 16, "test_size": 16, "image_size": 32, "seed": 0}
RECIPE = {"epochs": 1.0, "batch_size": 16, "lr": 2e-4, "weight_decay": 0.05, "warmup": 0.1, "min_lr": 1e-6,
          "clip_grad": 1.0, "label_smoothing": 0.0, "keep_rate_warmup": 0.0, "distill": "logits", "beta": 0.0,
          "distill_temperature": 1.0, "sait_alternate": False, "seed": 0, "workers": 0}
SETTINGS = {"budget": "75%", "model": {"name": "vit_tiny_patch16_224", "kwargs": TINY, "init": "scratch"},
            "data": "synthetic", "synthetic": SYNTHETIC, "space": {"reducers": ["evit", "tome", "tps", "sait", "ppt"]},
            "recipe": RECIPE, "baseline_recipe": {**RECIPE, "epochs": 2.0, "lr": 1e-3}, "seed": 0,
            "early_stopping": False, "device": "cpu"}
DISTRIBUTIONS = {"reducer": CategoricalDistribution(["evit", "tome", "tps", "sait", "ppt"]),
                 "lr": FloatDistribution(1e-5, 1e-3, log=True)}


def new_study(storage: str, name: str) -> optuna.Study:
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.create_study(storage=storage, study_name=name, directions=["maximize", "maximize"])
    study.set_user_attr(SETTINGS_ATTR, SETTINGS)
    return study


def add(study, budget, state=TrialState.COMPLETE, values=None, config=None, flops=None, lr=2e-4, **attrs):
    """Add a finished trial as the search records it (`flops` measured, or predicted if not complete)."""
    user_attrs = {key.replace("__", ":"): value for key, value in attrs.items()}
    if config is not None:
        user_attrs["prune_config"] = config.to_dict()
        user_attrs.setdefault(OUTCOME, "complete")
    constraints = None
    if flops is not None:
        user_attrs.setdefault("predicted_flops", flops * 1.001)
        constraints = {"flops": flops / budget - 1}
        if state == TrialState.COMPLETE:
            user_attrs.update(flops=flops, params=1e5)
    params, distributions = {}, {}
    if state == TrialState.COMPLETE:
        params, distributions = {"reducer": config.reducer, "lr": lr}, DISTRIBUTIONS
        user_attrs.update(train_config={**RECIPE, "lr": lr}, throughput=values[1],
                          speedup=values[1] / 800, accuracy=values[0])
    study.add_trial(create_trial(state=state, values=values, params=params, distributions=distributions,
                                 user_attrs=user_attrs, constraints=constraints))


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """A study with every kind of trial: complete (on and off the front, one measured over budget,
    one whose checkpoint is gone), infeasible, failed, early-stopped."""
    root = tmp_path_factory.mktemp("report")
    torch.manual_seed(0)
    model = timm.create_model("vit_tiny_patch16_224", num_classes=4, **TINY)
    with torch.no_grad():  # sharpen attention a little, as training does, so scores differ
        model.cls_token.normal_(std=0.5)
    checkpoint = root / "trial.pt"
    torch.save(model.state_dict(), checkpoint)
    dense_flops = autoprune.predict_flops(model)
    storage = f"sqlite:///{root / 'studies.db'}"
    study = new_study(storage, "s")
    study.set_user_attr(DENSE_ATTR, {"val": {"top1": 88.0}, "flops": dense_flops, "throughput": 800.0})
    budget = 0.75 * dense_flops
    cfg = autoprune.PruneConfig
    ckpt = str(checkpoint)
    add(study, budget, values=[80.0, 1000.0], config=cfg(reducer="evit", layers=(1, 2), keep_rate=0.6),
        flops=0.6 * dense_flops, checkpoint_path=ckpt, test_accuracy=78.5, autoprune__warm_start="evit 0.6")
    add(study, budget, values=[75.0, 1400.0], config=cfg(reducer="tome", r=2), flops=0.5 * dense_flops,
        checkpoint_path=ckpt, test_accuracy=74.0, lr=5e-4)
    add(study, budget, values=[70.0, 900.0], config=cfg(reducer="tps", layers=(1,), keep_rate=0.5),
        flops=0.7 * dense_flops, checkpoint_path=ckpt, lr=1e-4)
    add(study, budget, values=[85.0, 700.0], config=cfg(reducer="sait", layers=(1,), mass_threshold=0.7),
        flops=0.72 * dense_flops, checkpoint_path=str(root / "gone.pt"), lr=3e-4)
    add(study, budget, values=[90.0, 2000.0], config=cfg(reducer="ppt", layers=(1,), r=4), flops=0.9 * dense_flops,
        checkpoint_path=ckpt, lr=6e-4)  # measured over budget: never on the front
    add(study, budget, state=TrialState.PRUNED, config=cfg(reducer="evit", layers=(0,), keep_rate=0.95),
        flops=1.2 * dense_flops, autoprune__outcome="infeasible")
    add(study, budget, state=TrialState.FAIL, config=cfg(reducer="tps", layers=(1,), keep_rate=0.4),
        autoprune__outcome="failed", autoprune__reason="non-finite loss at step 3", predicted_flops=dense_flops / 2)
    add(study, budget, state=TrialState.PRUNED, config=cfg(reducer="tome", r=1), autoprune__outcome="stopped",
        autoprune__reason="stopped early after epoch 1 (accuracy 40.00%)", predicted_flops=0.7 * dense_flops)
    out = root / "out"
    path = write_report(storage, "s", out_dir=out)
    return root, storage, path


def test_report_writes_tables_markdown_and_a_self_contained_page(built):
    root, storage, path = built
    out = path.parent
    assert path.name == "report.html" and {p.name for p in out.iterdir()} >= {
        "report.html", "report.md", "trials.csv", "pareto.csv"}
    trials, front = pd.read_csv(out / "trials.csv"), pd.read_csv(out / "pareto.csv")
    assert len(trials) == 8
    assert sorted(front["number"]) == [0, 1, 3]  # tps is dominated, ppt measured over budget
    assert set(trials["outcome"]) == {"complete", "infeasible", "failed", "stopped"}
    assert trials.loc[trials["number"] == 6, "reason"].item() == "non-finite loss at step 3"

    page = path.read_text()
    assert not re.search(r"""(src|href|action)\s*=\s*["']?\s*(https?:)?//""", page, re.I)
    assert not re.search(r"""url\(\s*["']?(https?:)?//|@import|<script[^>]+src""", page, re.I)
    assert page.count("data:image/svg+xml;base64,") >= 3  # two trade-off plots, hypervolume, importance
    assert page.count('class="map"') == 3  # one entry per front config
    assert page.count("data:image/png;base64,") == 2  # the third front config lost its checkpoint
    assert "checkpoint missing" in page
    assert "test top-1" in page and "78.50%" in page
    assert "Parameter importance" in page
    assert "Proposals over budget: 1 of 8" in page  # kept visible: 0 with budget-exact proposals

    md = (out / "report.md").read_text()
    assert "evit 0.6" in md and "Best warm start: evit 0.6" in md
    assert "| 3 | sait |" in md and "test top-1" in md
    assert "Proposals over budget: 1 of 8" in md
    # the report read a snapshot: the storage holds the same single study, untouched
    assert [s.study_name for s in optuna.get_all_study_summaries(storage)] == ["s"]
    assert len(optuna.load_study(study_name="s", storage=storage).trials) == 8


def test_the_front_table_reads_the_front_re_timed_against_dense(tmp_path):
    storage = f"sqlite:///{tmp_path / 'studies.db'}"
    study = new_study(storage, "timed")
    model = timm.create_model("vit_tiny_patch16_224", num_classes=4, **TINY)
    dense_flops = autoprune.predict_flops(model)
    study.set_user_attr(DENSE_ATTR, {"val": {"top1": 88.0}, "flops": dense_flops, "throughput": 800.0,
                                     "predicted_throughput": 1000.0, "serve_batch": 32})
    config = autoprune.PruneConfig(reducer="evit", layers=(1, 2), keep_rate=0.6)
    add(study, dense_flops, values=[80.0, 1500.0], config=config, flops=0.6 * dense_flops,
        predicted_throughput=1500.0, throughput_error=-0.3)  # the trial's own timing: 1500 img/s
    study.set_user_attr(FRONT_TIMING_ATTR, {"rounds": 15, "batch_size": 32, "dense": 900.0, "trials": {"0": 1260.0}})
    md = (write_report(storage, "timed", out_dir=tmp_path / "out").parent / "report.md").read_text()
    front = md[md.index("| trial |"):]
    # measured: 1260 / 900 = 1.40x against a predicted 1.50x, an error of -7 %
    assert "| 1500 | 1260 | -7% | 1.40× |" in front
    assert "| 1000 | 900 | – | 1.00× |" in front  # dense: its re-timed img/s; speedup errors are 0 by definition
    assert "median of 15 interleaved rounds at batch 32" in md and "load differs" not in md  # 10 % off: noise
    # re-timed 30 % slower than the table predicts: the machine is not as it was when the table was made
    study.set_user_attr(FRONT_TIMING_ATTR, {"rounds": 15, "batch_size": 32, "dense": 700.0, "trials": {"0": 980.0}})
    md = (write_report(storage, "timed", out_dir=tmp_path / "out").parent / "report.md").read_text()
    assert ("Note: the dense model re-timed at 700 img/s, -30% from the latency table's 1000: the machine's load "
            "differs from when the table was made") in md


def test_patch_status_tells_kept_merged_and_pruned_patches():
    source = torch.tensor([[0, 0, 0, 0, 0],    # class token
                           [1, 0, 0, 0, 0],    # patch 0 as itself
                           [0, 1, 1, 0, 0],    # patches 1 and 2 merged
                           [0, 0, 0, 0, 1.]])  # padding holding patch 4: dropped
    valid = torch.tensor([True, True, True, False])
    assert patch_status(source, valid).tolist() == [0, 1, 1, -1, -1]


def test_hypervolume_of_a_two_objective_front():
    assert hypervolume_2d([(80, 1000), (75, 1400), (70, 900)]) == 80 * 1000 + 75 * 400
    assert hypervolume_2d([]) == 0.0


def test_hypervolume_history_grows_with_feasible_trials(built):
    _, storage, _ = built
    from autoprune.report.rows import trial_rows
    rows = trial_rows(optuna.load_study(study_name="s", storage=storage))
    history = dict(hypervolume_history(rows))
    assert history[0] == 80 * 1000 and history[1] == 80 * 1000 + 75 * 400
    assert history[4] == history[3]  # over budget: does not count


def test_empty_and_all_failed_studies_get_a_report_that_says_so(tmp_path):
    storage = f"sqlite:///{tmp_path / 'studies.db'}"
    new_study(storage, "empty")
    page = write_report(storage, "empty", out_dir=tmp_path / "empty").read_text()
    assert "no trials yet" in page
    assert len(pd.read_csv(tmp_path / "empty" / "trials.csv")) == 0
    assert len(pd.read_csv(tmp_path / "empty" / "pareto.csv")) == 0

    study, budget = new_study(storage, "failed"), 1e6
    add(study, budget, state=TrialState.FAIL, config=autoprune.PruneConfig(reducer="tome", r=2),
        autoprune__outcome="failed", autoprune__reason="CUDA out of memory")
    add(study, budget, state=TrialState.PRUNED, config=autoprune.PruneConfig(reducer="tome", r=1), flops=2e6,
        autoprune__outcome="infeasible")
    path = write_report(storage, "failed", out_dir=tmp_path / "failed")
    page, md = path.read_text(), (tmp_path / "failed" / "report.md").read_text()
    for text in (page, md):
        assert "No trial has completed yet (1 failed, 1 infeasible)" in text
    assert "CUDA out of memory" in page and "data:image/" not in page
    assert len(pd.read_csv(tmp_path / "failed" / "pareto.csv")) == 0


def test_cli_report(built, tmp_path, capsys):
    _, storage, _ = built
    assert main(["report", "--study", "s", "--storage", storage, "--out", str(tmp_path / "r")]) == 0
    assert capsys.readouterr().out.strip() == str(tmp_path / "r" / "report.html")
    assert main(["report", "--study", "nope", "--storage", storage]) == 2
    assert "no study 'nope'" in capsys.readouterr().err
    new_study(storage, "blank")
    assert main(["report", "--study", "blank", "--storage", storage, "--out", str(tmp_path / "b")]) == 2
    err = capsys.readouterr().err
    assert "has no trials yet" in err and len(err.strip().splitlines()) == 1


REPORT_SECTIONS = {"settings", "plots", "front", "warm", "progress", "importance", "maps", "outcomes"}


@pytest.mark.slow
def test_report_renders_in_a_headless_browser_and_loads_nothing(built, chromium, artifacts, tmp_path):
    from PIL import Image, ImageStat

    _, _, path = built
    page = chromium.load(path, screenshot=artifacts / "report.png")
    assert page.url in page.requests  # the monitor saw the page itself being loaded
    assert [url for url in page.requests if url != page.url and not url.startswith("data:")] == []
    assert page.dom["title"] == "autoprune report: s"
    sections = {section["id"]: section for section in page.dom["sections"]}
    assert set(sections) == REPORT_SECTIONS
    assert all(section["heading"] and section["height"] > 0 for section in sections.values())
    images = page.dom["images"]
    # two trade-off plots, hypervolume, importance, and the maps of the two front configs with a checkpoint
    assert len(images) == path.read_text().count("<img") == 6
    assert all(image["complete"] and image["width"] > 0 and image["shown"] > 0 for image in images), images

    shot = Image.open(page.screenshot).convert("RGB")
    assert shot.width == 1400 and shot.height > 2000  # the whole page, not one screen
    for band in (shot.crop((0, 0, 1400, 200)), shot.crop((0, 600, 1400, 1600))):  # header; plots
        assert max(ImageStat.Stat(band).stddev) > 20  # not blank
        assert len(band.getcolors(1 << 20) or range(1000)) > 50

    # the monitor catches a page that does load something (a refused loopback port: nothing leaves)
    leaky = tmp_path / "leaky.html"
    leaky.write_text('<html><body><img src="http://127.0.0.1:9/pixel.png"></body></html>')
    assert "http://127.0.0.1:9/pixel.png" in chromium.load(leaky).requests


def test_cli_search_ends_by_writing_the_report(built, tmp_path, monkeypatch, capsys):
    """`autoprune search` writes the report once `search()` returns (here a stand-in for it)."""
    import autoprune.search
    from autoprune.search import SearchResult

    _, storage, _ = built
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(autoprune.search, "search",
                        lambda settings, **options: SearchResult("s", storage, 5, [], 8, 1))
    assert main(["search", "--preset", "quickstart", "--budget", "75%"]) == 0
    assert (tmp_path / "studies" / "s" / "report.html").is_file()
    out = capsys.readouterr().out
    assert out.strip().endswith("report: " + str(Path("studies") / "s" / "report.html"))
    assert "device cpu (serving batch 1)" in out  # the CPU default, said before anything runs


def test_report_says_what_screening_and_successive_halving_did(tmp_path, capsys):
    storage = f"sqlite:///{tmp_path / 'studies.db'}"
    study = new_study(storage, "staged")
    study.set_user_attr("autoprune:promoted", [0, 1])
    budget, cfg = 1e9, autoprune.PruneConfig
    for number, (screened, tuned) in enumerate(((40.0, 80.0), (50.0, 82.0), (30.0, 79.0))):
        add(study, budget, values=[tuned, 1000.0 + number], config=cfg(reducer="tome", r=number + 1), flops=0.5e9,
            screen_accuracy=screened)
    add(study, budget, state=TrialState.PRUNED, config=cfg(reducer="tome", r=9), autoprune__outcome="stopped",
        autoprune__rung=1, predicted_flops=0.4e9,
        autoprune__reason="stopped by successive halving at the epoch-1 rung (accuracy 40.00%): not in the best 1/3")
    screen = optuna.create_study(storage=storage, study_name="staged:screen", directions=["maximize", "maximize"])
    for outcome in ("complete", "complete", "failed", "infeasible"):
        state = {"complete": TrialState.COMPLETE, "failed": TrialState.FAIL, "infeasible": TrialState.PRUNED}[outcome]
        screen.add_trial(create_trial(state=state, values=[50.0, 900.0] if outcome == "complete" else None,
                                      user_attrs={OUTCOME: outcome}))
    path = write_report(storage, "staged", out_dir=tmp_path / "out")
    md = (path.parent / "report.md").read_text()
    assert "## Screening and successive halving" in md
    assert "Screened 3 configs off the shelf" in md and "(1 failed, 1 proposals over budget); 2 promoted" in md
    assert "Kendall tau 1.000 over 3 fine-tuned trial(s)" in md and "too few to judge the screen" in md
    assert "Successive halving stopped 1 at epoch 1" in md
    assert "Screening and successive halving" in path.read_text()
    trials = pd.read_csv(path.parent / "trials.csv")
    assert list(trials["screen_accuracy"][:3]) == [40.0, 50.0, 30.0] and trials["rung"][3] == 1
    assert main(["studies", "--storage", storage]) == 0
    assert "staged:screen" not in capsys.readouterr().out  # a study's screens are part of it
