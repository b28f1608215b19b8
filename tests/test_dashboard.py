"""`autoprune dashboard`: optuna-dashboard over a read-only copy of the studies, served on a free
loopback port while a search writes the same SQLite study."""

from __future__ import annotations

import json
import socket
import sys
import textwrap
import threading
import urllib.error
import urllib.request
from pathlib import Path

import optuna
import pytest

from autoprune.cli import main
from autoprune.storage import open_storage
from autoprune.study_attrs import OUTCOME
from fixtures_processes import free_port, start, stop, tail, wait_until
from test_search import ROOT

pytest.importorskip("optuna_dashboard", reason="needs optuna-dashboard (pip install -e '.[dashboard]')")


def get(port: int, path: str):
    with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=30) as answer:
        return json.load(answer)


def study_detail(port: int, name: str) -> dict:
    [summary] = [s for s in get(port, "/api/studies")["study_summaries"] if s["study_name"] == name]
    return get(port, f"/api/studies/{summary['study_id']}")


SEARCH = textwrap.dedent("""
    import sys
    sys.path.insert(0, {tests!r})
    from test_search import search, tiny_settings
    search(tiny_settings(), trials=3, study_name="watched", storage={storage!r})
""")


@pytest.mark.slow
def test_dashboard_shows_a_study_while_a_search_writes_it(tmp_path):
    """The dashboard serves the study (created empty, as a search adopts it) before the search
    starts and is read the whole time the search runs, as an open page reads it."""
    storage = f"sqlite:///{tmp_path / 'studies.db'}"
    optuna.create_study(storage=open_storage(storage), study_name="watched", directions=["maximize", "maximize"])
    search_log, dashboard_log = tmp_path / "search.log", tmp_path / "dashboard.log"
    port = free_port()
    dashboard = start([sys.executable, "-m", "autoprune.cli", "dashboard", "--study", "watched",
                       "--storage", storage, "--port", str(port)], dashboard_log, cwd=tmp_path)
    search = None
    reads: dict = {"during_search": 0, "errors": []}
    done = threading.Event()

    def keep_reading() -> None:
        while not done.wait(0.25):
            try:
                study_detail(port, "watched")
                reads["during_search"] += search.poll() is None
            except (OSError, ValueError) as error:
                reads["errors"].append(repr(error))

    try:
        wait_until(lambda: "http://127.0.0.1" in dashboard_log.read_text(), 120, "autoprune dashboard", alive=dashboard)
        assert study_detail(port, "watched")["trials"] == []
        search = start([sys.executable, "-c", SEARCH.format(tests=str(ROOT / "tests"), storage=storage)],
                       search_log, cwd=tmp_path)
        reader = threading.Thread(target=keep_reading, daemon=True)
        reader.start()
        try:
            search.wait(timeout=900)
        finally:
            done.set()
            reader.join(timeout=60)
        out = search_log.read_text()
        assert search.returncode == 0, tail(search_log)
        assert "Pareto front" in out and "locked" not in out, out
        assert reads["during_search"] > 0 and not reads["errors"], reads["errors"][:3]

        # within a refresh the copy shows the finished study as the storage holds it
        stored = optuna.load_study(study_name="watched", storage=open_storage(storage)).trials
        expected = [(t.number, t.state.name.capitalize()) for t in stored]
        detail = wait_until(lambda: (d := study_detail(port, "watched"))
                            and [(t["number"], t["state"]) for t in d["trials"]] == expected and d,
                            30, "the finished study in the dashboard", every=0.5)
        assert detail["objective_names"] == ["accuracy", "throughput"]
        trial = next(t for t in detail["trials"] if t["state"] == "Complete")
        attrs = {attr["key"]: attr["value"] for attr in trial["user_attrs"]}
        assert attrs[OUTCOME] == "complete" and float(attrs["accuracy"]) == trial["values"][0]
        assert {"prune_config", "train_config", "flops", "throughput", "speedup", "node_id"} <= set(attrs)
        assert json.loads(attrs["prune_config"])["reducer"]
        assert len(trial["constraints"]) == 1 and trial["constraints"][0] <= 0  # within budget

        # nothing the dashboard offers can change the study
        request = urllib.request.Request(f"http://127.0.0.1:{port}/api/studies/{trial['study_id']}/note",
                                         data=b'{"version": 1, "body": "x"}', method="PUT")
        with pytest.raises(urllib.error.HTTPError) as refused:
            urllib.request.urlopen(request, timeout=30)
        assert refused.value.code == 405
    finally:
        stop(dashboard)
        if search is not None:
            stop(search)


@pytest.fixture
def one_study(tmp_path) -> str:
    storage = f"sqlite:///{tmp_path / 'studies.db'}"
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    optuna.create_study(storage=storage, study_name="there").optimize(lambda t: t.suggest_float("x", 0, 1), n_trials=1)
    return storage


def exit_code_and_error(capsys, argv: list[str]) -> tuple[int, str]:
    with pytest.raises(SystemExit) as exited:
        main(argv)
    return exited.value.code, capsys.readouterr().err


def test_dashboard_bad_input_exits_2_with_one_line(one_study, tmp_path, capsys):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        busy = taken.getsockname()[1]
        cases = [
            (["--study", "nope", "--storage", one_study], "no study 'nope'", "studies there: there"),
            (["--storage", one_study, "--port", "70000"], "--port: 70000 is invalid", "0 to 65535"),
            (["--storage", one_study, "--port", "eighty"], "--port: 'eighty' is invalid", "0 to 65535"),
            (["--storage", one_study, "--port", str(busy)], f"--port: {busy} cannot be used", "a free port"),
            (["--storage", f"sqlite:///{tmp_path / 'missing.db'}"], "missing.db' does not exist", "existing"),
        ]
        for argv, message, accepted in cases:
            code, err = exit_code_and_error(capsys, ["dashboard", *argv])
            assert code == 2 and message in err and accepted in err and err.count("\n") == 1, (argv, err)
    assert not (tmp_path / "missing.db").exists()


def test_the_copy_is_refreshed_only_when_stale(one_study):
    from autoprune.dashboard import StudySnapshot

    snapshot = StudySnapshot(one_study, refresh=3600)
    first = snapshot.current()
    optuna.load_study(study_name="there", storage=one_study).optimize(lambda t: t.suggest_float("x", 0, 1), n_trials=1)
    assert snapshot.current() is first and len(first.get_all_trials(0)) == 1
    snapshot.refresh = 0
    assert len(snapshot.current().get_all_trials(0)) == 2


def test_serve_dashboard_prints_where_and_serves_until_stopped(one_study, tmp_path):
    log = tmp_path / "dashboard.log"
    server = start([sys.executable, "-c", "from autoprune.dashboard import serve_dashboard; "
                    f"serve_dashboard({one_study!r}, port=0)"], log, cwd=Path(__file__).parents[1])
    try:
        banner = wait_until(lambda: [line for line in log.read_text().splitlines() if "http://127.0.0.1:" in line],
                            120, "serve_dashboard", alive=server)[0]
        port = int(banner.split("http://127.0.0.1:")[1].split("/")[0])
        assert [s["study_name"] for s in get(port, "/api/studies")["study_summaries"]] == ["there"]
        assert "read-only copy" in banner
    finally:
        stop(server)
    assert server.returncode is not None
    with pytest.raises(OSError):
        get(port, "/api/studies")


def test_the_dashboard_listens_on_loopback_only(one_study):
    from autoprune.dashboard import make_dashboard_server

    server = make_dashboard_server(one_study, port=0)
    try:
        assert server.server_address[0] == "127.0.0.1"
    finally:
        server.server_close()
