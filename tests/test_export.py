"""Reading a finished study back: studies, show, export and load."""

import json

import optuna
import pytest

import autoprune
from autoprune.cli import main
from autoprune.data import load_datasets, model_data_config
from autoprune.export import pick_trial
from autoprune.train import evaluate
from test_search import SYNTHETIC, search, tiny_settings


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    import os
    workdir = tmp_path_factory.mktemp("finished")
    previous = os.getcwd()
    os.chdir(workdir)
    storage = f"sqlite:///{workdir / 'studies.db'}"
    try:
        search(tiny_settings(), trials=4, study_name="done", storage=storage, log=lambda line: None)
        yield workdir, storage
    finally:
        os.chdir(previous)


def test_export_then_load_gives_the_trial_model(finished, tmp_path, capsys):
    workdir, storage = finished
    assert main(["export", "--study", "done", "--storage", storage, "--pick", "accuracy", "--out", str(tmp_path / "m")]) == 0
    assert "exported trial" in capsys.readouterr().out
    manifest = json.loads((tmp_path / "m" / "autoprune.json").read_text())
    study = optuna.load_study(study_name="done", storage=storage)
    trial = study.trials[manifest["trial"]]
    model = autoprune.load(tmp_path / "m")
    assert model.prune_config.to_dict() == trial.user_attrs["prune_config"]
    datasets = load_datasets("synthetic", model_data_config(model), synthetic=SYNTHETIC)
    assert evaluate(model, datasets.val, batch_size=16)["top1"] == trial.user_attrs["accuracy"]
    assert manifest["metrics"]["accuracy"] == trial.values[0]


def test_export_refuses_what_it_cannot_do(finished, tmp_path, capsys):
    workdir, storage = finished
    out = tmp_path / "taken"
    out.mkdir()
    assert main(["export", "--study", "done", "--storage", storage, "--out", str(out)]) == 2
    assert "exists; choose another folder or pass --force" in capsys.readouterr().err
    assert main(["export", "--study", "done", "--storage", storage, "--out", str(out), "--force"]) == 0
    assert main(["export", "--study", "done", "--storage", storage, "--out", str(out), "--force"]) == 0  # replaces it
    assert sorted(p.name for p in tmp_path.iterdir()) == ["taken"]  # nothing staged is left behind
    # --force never deletes a folder that is not an earlier export, such as the study's own
    database = workdir / "studies.db"
    assert main(["export", "--study", "done", "--storage", storage, "--out", str(workdir), "--force"]) == 2
    assert "holds other files than an earlier export" in capsys.readouterr().err and database.is_file()
    assert main(["export", "--study", "done", "--storage", storage, "--out", str(database), "--force"]) == 2
    assert "is not a folder" in capsys.readouterr().err and database.is_file()
    study = optuna.load_study(study_name="done", storage=storage)
    study.enqueue_trial({"reducer": "tome"})  # queued, never run
    unfinished = study.trials[-1]
    assert main(["export", "--study", "done", "--storage", storage, "--trial", str(unfinished.number),
                 "--out", str(tmp_path / "x")]) == 2
    assert f"trial {unfinished.number} did not finish" in capsys.readouterr().err
    assert main(["export", "--study", "missing", "--storage", storage, "--out", str(tmp_path / "y")]) == 2
    err = capsys.readouterr().err
    assert "no study 'missing'" in err and "(studies there: done)" in err


def test_studies_and_show(finished, capsys):
    workdir, storage = finished
    assert main(["studies", "--storage", storage]) == 0
    out = capsys.readouterr().out
    assert "done" in out and "vit_tiny_patch16_224" in out and "75%" in out
    assert main(["show", "--study", "done", "--storage", storage]) == 0
    assert "Pareto front" in capsys.readouterr().out


def test_picks_on_the_front():
    front = [_Point(0, 90.0, 100.0), _Point(1, 89.2, 300.0), _Point(2, 88.0, 390.0), _Point(3, 60.0, 400.0)]
    assert pick_trial(front, "accuracy").number == 0
    assert pick_trial(front, "speed").number == 1     # fastest within 1 point of the best
    # the knee: scaled to the front's ranges, point 2 is farthest from the line joining 0 and 3
    # (|0.933 - 0.033| = 0.90 against 0.64 for point 1)
    assert pick_trial(front, "balanced").number == 2


class _Point:
    """A front trial's number and objectives, all pick_trial reads."""

    def __init__(self, number, accuracy, throughput):
        self.number, self.values = number, [accuracy, throughput]


def _onnx_packages():
    for package in ("onnx", "onnxruntime", "onnxscript"):
        pytest.importorskip(package, reason=f"{package} is not installed: pip install -e '.[onnx]' runs these tests")


def _complete_trial(storage):
    """A complete trial (every reducer exports)."""
    study = optuna.load_study(study_name="done", storage=storage)
    return next(t for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE)


def test_export_onnx_writes_the_trial_model_as_one_checked_file(finished, tmp_path, capsys):
    _onnx_packages()
    import torch

    from autoprune.export import ExportError
    from autoprune.onnx_export import INPUT, onnxruntime_session

    workdir, storage = finished
    trial = _complete_trial(storage)
    common = ["export", "--study", "done", "--storage", storage, "--trial", str(trial.number)]
    assert main([*common, "--format", "onnx", "--out", str(tmp_path / "onnx")]) == 0
    assert "model.onnx with onnxruntime" in capsys.readouterr().out
    assert sorted(p.name for p in (tmp_path / "onnx").iterdir()) == ["autoprune.json", "model.onnx"]
    manifest = json.loads((tmp_path / "onnx" / "autoprune.json").read_text())
    assert manifest["format"] == "onnx" and manifest["trial"] == trial.number
    assert manifest["model"] == "vit_tiny_patch16_224" and manifest["model_kwargs"]["img_size"] == 32
    assert manifest["prune_config"] == trial.user_attrs["prune_config"]
    assert manifest["metrics"]["accuracy"] == trial.values[0]
    assert manifest["preprocessing"]["input_size"] == [3, 32, 32]
    with pytest.raises(ExportError, match="holds an ONNX export"):
        autoprune.load(tmp_path / "onnx")

    # the file computes what the PyTorch export of the same trial computes
    assert main([*common, "--out", str(tmp_path / "pt")]) == 0
    model = autoprune.load(tmp_path / "pt")
    images = torch.randn(3, 3, 32, 32)
    session = onnxruntime_session(tmp_path / "onnx" / "model.onnx")
    with torch.no_grad():
        torch.testing.assert_close(torch.from_numpy(session.run(None, {INPUT: images.numpy()})[0]), model(images),
                                   atol=1e-4, rtol=0)
    # a model from autoprune.load exports through the API as well
    assert (autoprune.export_onnx(model, tmp_path / "api") / "model.onnx").is_file()
    # --force replaces an earlier ONNX export
    assert main([*common, "--format", "onnx", "--out", str(tmp_path / "onnx"), "--force"]) == 0


def test_export_onnx_that_cannot_be_faithful_exits_2_in_one_line(finished, tmp_path, capsys, monkeypatch):
    _onnx_packages()
    import torch

    from autoprune.patch import TokenReducer

    real_forward = TokenReducer.forward

    def unlike_its_export(self, tokens, *args):
        out = real_forward(self, tokens, *args)
        return out.replace(x=out.x * 1.01) if torch.compiler.is_exporting() else out

    monkeypatch.setattr(TokenReducer, "forward", unlike_its_export)
    workdir, storage = finished
    trial = _complete_trial(storage)
    assert main(["export", "--study", "done", "--storage", storage, "--trial", str(trial.number),
                 "--format", "onnx", "--out", str(tmp_path / "m")]) == 2
    error = capsys.readouterr().err.strip().splitlines()[-1]
    reducer = trial.user_attrs["prune_config"]["reducer"]
    assert error.startswith(f"autoprune: --format onnx: reducer {reducer}: the ONNX graph computes something else")
    assert list(tmp_path.iterdir()) == []  # nothing written, nothing staged left behind
