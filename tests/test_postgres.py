"""A study in a real PostgreSQL server (a throwaway one: fixtures_postgres.py): a search killed
with SIGKILL mid-trial resumes with nothing lost, a second search on the study is refused by the
lease, the report and the export read from it, and its password never shows in what is printed."""

from __future__ import annotations

import optuna
import pytest
import torch
from sqlalchemy.engine import make_url

import autoprune
from autoprune.cli import main
from autoprune.dashboard import StudySnapshot
from autoprune.storage import open_storage
from test_search import SLOW, TINY, assert_resumed_with_nothing_lost, kill_mid_trial, search, tiny_settings

pytestmark = pytest.mark.slow

TINY_KWARGS = ",".join(f"{key}={value}" for key, value in TINY.kwargs.items())


@pytest.fixture
def workdir(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # baselines and Ray results go under ./studies
    return tmp_path


def test_a_plain_postgresql_url_opens_a_study_storage(postgres_url):
    storage = open_storage(postgres_url)
    assert storage.engine.dialect.name == "postgresql"
    study = optuna.create_study(storage=storage, study_name="plain", directions=["maximize", "maximize"])
    study.optimize(lambda trial: (trial.suggest_float("x", 0, 1), 1.0), n_trials=2)
    assert len(optuna.load_study(study_name="plain", storage=open_storage(postgres_url)).trials) == 2
    storage.engine.dispose()


def test_search_on_postgres_killed_mid_trial_resumes_and_its_results_read_back(postgres_url, workdir, capsys):
    password = make_url(postgres_url).password
    masked = postgres_url.replace(password, "***")
    printed: list[str] = []

    def second_search() -> None:
        code = main(["search", "--preset", "quickstart", "--model-kwargs", TINY_KWARGS, "--budget", "75%",
                     "--study", "killed", "--storage", postgres_url])
        out = capsys.readouterr()
        printed.extend([out.out, out.err])
        assert code == 2 and "study 'killed' is already driven by pid" in out.err, out.err
        assert f"study 'killed' in {masked}" in out.out  # it says where it looked, password masked

    complete_before = kill_mid_trial(workdir, postgres_url, while_training=second_search)
    assert printed, "the second search never ran"
    lines: list[str] = []
    result = search(tiny_settings(recipe=SLOW), trials=3, study_name="killed", storage=postgres_url, log=lines.append)
    storage = open_storage(postgres_url)
    assert_resumed_with_nothing_lost(result, optuna.load_study(study_name="killed", storage=storage), complete_before)
    storage.engine.dispose()
    assert f"study 'killed' lives in {masked}" in lines
    printed.extend(lines)

    # the report, the listings and the export read the study from the server
    assert main(["report", "--study", "killed", "--storage", postgres_url, "--out", str(workdir / "report")]) == 0
    page = (workdir / "report" / "report.html").read_text()
    assert f"Snapshot of {masked}" in page
    assert main(["studies", "--storage", postgres_url]) == 0
    assert main(["show", "--study", "killed", "--storage", postgres_url]) == 0
    assert main(["export", "--study", "killed", "--storage", postgres_url, "--out", str(workdir / "model")]) == 0
    model = autoprune.load(workdir / "model")
    assert model(torch.randn(2, 3, 32, 32)).shape == (2, 4)
    assert main(["report", "--study", "nope", "--storage", postgres_url]) == 2
    out = capsys.readouterr()
    assert f"no study 'nope' in {masked}" in out.err
    listing = out.out
    assert "killed" in listing and "Pareto front" in listing
    printed.extend([out.out, out.err, page, (workdir / "report" / "report.md").read_text()])

    # the dashboard reads it too
    snapshot = StudySnapshot(postgres_url, "killed")
    assert len(snapshot.current().get_all_trials(0)) == result.trials_in_study
    with pytest.raises(SystemExit) as exited:
        main(["dashboard", "--study", "nope", "--storage", postgres_url])
    err = capsys.readouterr().err
    assert exited.value.code == 2 and f"no study 'nope' in {masked}" in err
    printed.append(err)
    assert not [text for text in printed if password in text]
