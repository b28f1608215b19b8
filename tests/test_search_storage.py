"""Budgets, study storage opening, settings diffs and the one-search-per-study lease (all offline)."""

from __future__ import annotations

import importlib.util
import math
import os
import socket
import sqlite3
import subprocess
import sys
import threading
import time
from pathlib import Path

import optuna
import pytest
from sqlalchemy.engine import make_url

from autoprune.search.budget import ACCEPTED, Budget, BudgetError, format_flops, parse_budget
from autoprune.lease import LeaseHeld, StudyLease
from autoprune.storage import StorageError, open_storage, settings_diff, shown_url
from autoprune.study_attrs import DEFAULT_STORAGE, LEASE_KEY
from fixtures_postgres import INSTALL_DRIVER, driver_installed

optuna.logging.set_verbosity(optuna.logging.WARNING)


# -- budget ---------------------------------------------------------------------------------------

@pytest.mark.parametrize(
    "text, flops",
    [
        ("2.6GFLOPs", 2.6e9),
        ("2.6GFLOP", 2.6e9),
        ("2.6G", 2.6e9),
        ("2.6 gflops", 2.6e9),
        ("2.6 GFLOPS", 2.6e9),
        ("  2.6 G ", 2.6e9),
        ("2600MFLOPs", 2.6e9),
        ("2600M", 2.6e9),
        ("2600 mflop", 2.6e9),
        ("850KFLOPs", 8.5e5),
        ("850k", 8.5e5),
        ("2.6e9", 2.6e9),
        ("2.6E9", 2.6e9),
        ("2600000000", 2.6e9),
        ("1e6", 1e6),
        ("2600000000FLOPs", 2.6e9),
        (".5G", 5e8),
    ],
)
def test_parse_budget_absolute(text: str, flops: float) -> None:
    budget = parse_budget(text)
    assert budget.text == text
    assert budget.fraction is None
    assert budget.flops == pytest.approx(flops)
    assert budget.resolve(17.6e9) == pytest.approx(flops)


@pytest.mark.parametrize("text, fraction", [("56%", 0.56), ("56 %", 0.56), ("100%", 1.0), ("0.5%", 0.005), ("12.5%", 0.125)])
def test_parse_budget_relative(text: str, fraction: float) -> None:
    budget = parse_budget(text)
    assert budget.flops is None
    assert budget.fraction == pytest.approx(fraction)
    assert budget.resolve(4.6e9) == pytest.approx(fraction * 4.6e9)


@pytest.mark.parametrize(
    "text",
    ["2.6 parsecs", "", "   ", "G", "2.6", "999999", "2.6 FLOPs", "0", "0G", "-2.6G", "-56%", "0%", "100.5%",
     "150%", "nan", "inf", "NaNG", "1e999", "1e999G", "2.6GB", "2.6 TFLOPs", "2.6GG", "56%%", "2,6G", "2.6 G FLOPs x"],
)
def test_parse_budget_refusals(text: str) -> None:
    with pytest.raises(BudgetError) as caught:
        parse_budget(text)
    message = str(caught.value)
    assert "\n" not in message
    assert message.startswith(f"--budget: {text!r} ")
    assert f"accepted: {ACCEPTED}" in message and "2x" in ACCEPTED and "1500img/s" in ACCEPTED


def test_parse_budget_refusal_message_example() -> None:
    with pytest.raises(BudgetError, match=r"^--budget: '2\.6 parsecs' is not a FLOPs or speed budget; accepted: "):
        parse_budget("2.6 parsecs")
    with pytest.raises(BudgetError, match="unit"):
        parse_budget("2.6")
    with pytest.raises(BudgetError, match=r"\(0, 100\]"):
        parse_budget("150%")


def test_budget_str_and_resolve() -> None:
    assert str(parse_budget("2.6G")) == "2.6 GFLOPs"
    assert str(parse_budget("2608MFLOPs")) == "2.608 GFLOPs"
    assert str(parse_budget("56%")) == "56% of dense"
    assert str(parse_budget("12.5%")) == "12.5% of dense"
    relative = parse_budget("50%")
    for bad in (0, -1.0, math.nan, math.inf):
        with pytest.raises(BudgetError, match="dense_flops"):
            relative.resolve(bad)
    with pytest.raises(BudgetError):
        Budget(text="x", flops=1e9, fraction=0.5)
    with pytest.raises(BudgetError):
        Budget(text="x", flops=None, fraction=None)
    with pytest.raises(BudgetError):
        Budget(text="x", flops=-1.0, fraction=None)


def test_format_flops() -> None:
    assert format_flops(2.608e9) == "2.608 GFLOPs"
    assert format_flops(2.6084e9) == "2.608 GFLOPs"
    assert format_flops(2.6e9) == "2.6 GFLOPs"
    assert format_flops(1e9) == "1 GFLOPs"
    assert format_flops(17.58e9) == "17.58 GFLOPs"
    assert format_flops(1234.6e9) == "1235 GFLOPs"
    assert format_flops(85.3e6) == "85.3 MFLOPs"
    assert format_flops(999.96e6) == "1 GFLOPs"  # rounding carries into the next unit
    assert format_flops(850e3) == "850 KFLOPs"
    assert format_flops(512) == "512 FLOPs"
    assert format_flops(0) == "0 FLOPs"


# -- open_storage ---------------------------------------------------------------------------------

def sqlite_url(path: Path) -> str:
    return f"sqlite:///{path}"


def test_open_storage_new_file(tmp_path: Path) -> None:
    path = tmp_path / "new.db"
    storage = open_storage(sqlite_url(path))
    assert isinstance(storage, optuna.storages.RDBStorage)
    assert path.exists()
    assert storage.engine.dialect.name == "sqlite"
    study = optuna.create_study(storage=storage, study_name="s")
    study.optimize(lambda trial: trial.suggest_float("x", 0, 1), n_trials=2)


def test_open_storage_existing_optuna_db(tmp_path: Path) -> None:
    url = sqlite_url(tmp_path / "study.db")
    study = optuna.create_study(storage=url, study_name="mine", directions=["maximize", "minimize"])
    study.optimize(lambda trial: (trial.suggest_float("x", 0, 1), 1.0), n_trials=3)
    storage = open_storage(url)
    reopened = optuna.load_study(study_name="mine", storage=storage)
    assert len(reopened.trials) == 3


def test_open_storage_recovers_a_study_database_a_killed_writer_left_mid_transaction(tmp_path: Path) -> None:
    """kill -9 during a write leaves a hot journal, which a read-only check cannot roll back: the
    database opens at its last committed state."""
    path = tmp_path / "killed.db"
    optuna.create_study(storage=sqlite_url(path), study_name="s").optimize(
        lambda trial: trial.suggest_float("x", 0, 1), n_trials=3)
    writer = ("import os, sqlite3, sys\n"
              "connection = sqlite3.connect(sys.argv[1], isolation_level=None)\n"
              "connection.execute('PRAGMA cache_size=1')  # changed pages reach the file before the commit\n"
              "connection.execute('BEGIN IMMEDIATE')\n"
              "connection.execute('DELETE FROM trials')\n"
              "os._exit(0)  # dies mid-transaction\n")
    subprocess.run([sys.executable, "-c", writer, str(path)], check=True)
    assert (tmp_path / "killed.db-journal").stat().st_size > 0
    storage = open_storage(sqlite_url(path))
    assert len(optuna.load_study(study_name="s", storage=storage).trials) == 3


def test_open_storage_empty_file_is_accepted(tmp_path: Path) -> None:
    path = tmp_path / "touched.db"
    path.touch()
    optuna.create_study(storage=open_storage(sqlite_url(path)), study_name="s")


def test_open_storage_refuses_text_file_unchanged(tmp_path: Path) -> None:
    path = tmp_path / "notes.db"
    path.write_bytes(b"my thesis notes\nnot a database\n")
    before = path.read_bytes()
    with pytest.raises(StorageError, match="is not an autoprune/Optuna study database") as caught:
        open_storage(sqlite_url(path))
    assert "\n" not in str(caught.value) and "notes.db" in str(caught.value) and "accepted:" in str(caught.value)
    assert path.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["notes.db"]


def test_open_storage_refuses_corrupt_sqlite_unchanged(tmp_path: Path) -> None:
    path = tmp_path / "broken.db"
    path.write_bytes(b"SQLite format 3\x00" + b"\xff" * 200)
    before = path.read_bytes()
    with pytest.raises(StorageError, match="is not an autoprune/Optuna study database"):
        open_storage(sqlite_url(path))
    assert path.read_bytes() == before


def test_open_storage_refuses_foreign_sqlite_unchanged(tmp_path: Path) -> None:
    path = tmp_path / "inventory.db"
    connection = sqlite3.connect(path)
    connection.execute("CREATE TABLE parts (id INTEGER PRIMARY KEY, name TEXT)")
    connection.execute("INSERT INTO parts (name) VALUES ('bolt')")
    connection.commit()
    connection.close()
    before = path.read_bytes()
    with pytest.raises(StorageError, match=r"is not an autoprune/Optuna study database \(it has other tables: parts\)"):
        open_storage(sqlite_url(path))
    assert path.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["inventory.db"]
    tables = sqlite3.connect(path).execute("SELECT name FROM sqlite_master WHERE type='table'").fetchall()
    assert tables == [("parts",)]


def test_open_storage_refuses_folder(tmp_path: Path) -> None:
    (tmp_path / "dir.db").mkdir()
    with pytest.raises(StorageError, match="it is a folder"):
        open_storage(sqlite_url(tmp_path / "dir.db"))


def test_open_storage_missing_parent(tmp_path: Path) -> None:
    missing = tmp_path / "no" / "such"
    with pytest.raises(StorageError, match="does not exist") as caught:
        open_storage(sqlite_url(missing / "x.db"))
    assert str(missing) in str(caught.value)
    assert not (tmp_path / "no").exists()


def test_open_storage_creates_default_folder(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    storage = open_storage(DEFAULT_STORAGE)
    assert (tmp_path / "studies" / "autoprune.db").is_file()
    storage.engine.dispose()


@pytest.mark.parametrize("url", ["foo://x", "not a url", "", "sqlite:/x"])
def test_open_storage_bad_url(url: str) -> None:
    with pytest.raises(StorageError) as caught:
        open_storage(url)
    message = str(caught.value)
    assert message.startswith(f"--storage: {url!r} cannot be opened: ")
    assert message.endswith("accepted: an SQLAlchemy URL such as sqlite:///studies/autoprune.db or postgresql://user@host/db")
    assert "\n" not in message


def unused_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.mark.skipif(not driver_installed(), reason=f"needs a PostgreSQL driver ({INSTALL_DRIVER})")
def test_open_storage_postgres_unreachable_is_refused_quickly() -> None:
    url = f"postgresql://someone:secret@127.0.0.1:{unused_port()}/db?connect_timeout=2"
    start = time.monotonic()
    with pytest.raises(StorageError, match="cannot be opened") as caught:
        open_storage(url)
    assert time.monotonic() - start < 5
    assert "\n" not in str(caught.value)
    assert "secret" not in str(caught.value)  # the password is masked


def test_open_storage_postgres_without_driver_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    for driver in ("psycopg2", "psycopg"):  # as if neither were installed
        monkeypatch.setitem(sys.modules, driver, None)
    url = f"postgresql://someone:secret@127.0.0.1:{unused_port()}/db"
    with pytest.raises(StorageError, match="driver is not installed") as caught:
        open_storage(url)
    assert "secret" not in str(caught.value)


def test_a_plain_postgresql_url_uses_psycopg_when_psycopg2_is_absent(monkeypatch: pytest.MonkeyPatch) -> None:
    from autoprune.storage import _installed_driver

    installed = {"psycopg"}
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: object() if name in installed else None)
    assert _installed_driver(make_url("postgresql://u:pw@h/db")).drivername == "postgresql+psycopg"
    assert _installed_driver(make_url("postgresql+psycopg2://u@h/db")).drivername == "postgresql+psycopg2"
    assert _installed_driver(make_url("sqlite:///a.db")).drivername == "sqlite"
    installed.add("psycopg2")  # SQLAlchemy's own default
    assert _installed_driver(make_url("postgresql://u:pw@h/db")).drivername == "postgresql"


# -- settings_diff --------------------------------------------------------------------------------

def test_settings_diff() -> None:
    stored = {"budget": "2.6GFLOPs", "trials": 40, "space": {"reducers": ["tome", "evit"], "lr": 1e-4}, "seed": 0}
    assert settings_diff(stored, dict(stored)) == []
    assert settings_diff(stored, {**stored, "space": {"reducers": ("tome", "evit"), "lr": 0.0001}}) == []
    assert settings_diff({"a": 1}, {"a": 1.0}) == []
    requested = {"budget": "3G", "trials": 40, "space": {"reducers": ["tome"], "lr": 1e-4, "depth": 2}, "model": "deit"}
    assert settings_diff(stored, requested) == [
        "budget: stored '2.6GFLOPs', requested '3G'",
        "model: not stored, requested 'deit'",
        "seed: stored 0, not requested",
        "space.depth: not stored, requested 2",
        "space.reducers: stored ['tome', 'evit'], requested ['tome']",
    ]
    assert settings_diff({"flag": True}, {"flag": 1}) == ["flag: stored True, requested 1"]
    assert settings_diff({"a": {"b": 1}}, {"a": 1}) == ["a: stored {'b': 1}, requested 1"]


# -- lease ----------------------------------------------------------------------------------------

@pytest.fixture
def study(tmp_path: Path) -> tuple[str, int]:
    url = sqlite_url(tmp_path / "lease.db")
    storage = open_storage(url)
    study_id = storage.create_new_study([optuna.study.StudyDirection.MAXIMIZE], "leased")
    return url, study_id


def fast_lease(storage: optuna.storages.BaseStorage, study_id: int, **kwargs) -> StudyLease:
    kwargs = {"stale_after": 5.0, "heartbeat_every": 1.0, "settle": 0.05, **kwargs}
    return StudyLease(storage, study_id, **kwargs)


def test_lease_acquire_release(study: tuple[str, int]) -> None:
    url, study_id = study
    storage = open_storage(url)
    lease = fast_lease(storage, study_id)
    lease.acquire()
    record = storage.get_study_system_attrs(study_id)[LEASE_KEY]
    assert record["token"] == lease.token and record["pid"] == os.getpid() and record["host"] == socket.gethostname()
    assert lease.held
    lease.release()
    lease.release()  # idempotent
    assert not lease.held
    assert storage.get_study_system_attrs(study_id).get(LEASE_KEY) is None
    with fast_lease(storage, study_id) as again:  # free again after release
        assert again.held
    assert storage.get_study_system_attrs(study_id).get(LEASE_KEY) is None


def test_lease_works_through_optuna_study_storage(study: tuple[str, int]) -> None:
    url, _ = study
    loaded = optuna.load_study(study_name="leased", storage=open_storage(url))
    with fast_lease(loaded._storage, loaded._study_id) as lease:
        assert loaded._storage.get_study_system_attrs(loaded._study_id)[LEASE_KEY]["token"] == lease.token


def test_second_lease_refused_while_held(study: tuple[str, int]) -> None:
    url, study_id = study
    first = fast_lease(open_storage(url), study_id)
    first.acquire()
    try:
        second = fast_lease(open_storage(url), study_id)
        with pytest.raises(LeaseHeld) as caught:
            second.acquire()
        message = str(caught.value)
        assert "\n" not in message
        assert f"pid {os.getpid()}" in message and repr(socket.gethostname()) in message
        assert "since " in message and "second search on the same study is refused" in message
        assert not second.held
        second.release()  # releasing a lease never held does not clear the holder's
        assert open_storage(url).get_study_system_attrs(study_id)[LEASE_KEY]["token"] == first.token
    finally:
        first.release()


def test_release_does_not_clear_a_lease_taken_over(study: tuple[str, int]) -> None:
    url, study_id = study
    storage = open_storage(url)
    lease = fast_lease(storage, study_id)
    lease.acquire()
    foreign = {"token": "other", "host": "elsewhere", "pid": 1, "started": time.time(), "heartbeat": time.time()}
    storage.set_study_system_attr(study_id, LEASE_KEY, foreign)
    lease.release()
    assert storage.get_study_system_attrs(study_id)[LEASE_KEY] == foreign


def test_lease_with_dead_pid_is_taken_over_at_once(study: tuple[str, int]) -> None:
    url, study_id = study
    storage = open_storage(url)
    finished = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True, check=True)
    dead_pid = int(finished.stdout)
    now = time.time()
    record = {"token": "killed", "host": socket.gethostname(), "pid": dead_pid, "started": now - 100, "heartbeat": now}
    storage.set_study_system_attr(study_id, LEASE_KEY, record)
    lease = fast_lease(storage, study_id, stale_after=3600.0)  # heartbeat is fresh: only the dead pid frees it
    start = time.monotonic()
    with lease:
        assert time.monotonic() - start < 2
        assert storage.get_study_system_attrs(study_id)[LEASE_KEY]["token"] == lease.token


def test_lease_of_a_reused_pid_is_taken_over_at_once(study: tuple[str, int]) -> None:
    """A restarted container gives a new search the dead one's pid: the process start time tells them apart."""
    url, study_id = study
    storage = open_storage(url)
    now = time.time()
    record = {"token": "before-restart", "host": socket.gethostname(), "pid": os.getpid(), "pid_start": "1",
              "started": now - 100, "heartbeat": now}
    storage.set_study_system_attr(study_id, LEASE_KEY, record)
    with fast_lease(storage, study_id, stale_after=3600.0) as lease:
        assert storage.get_study_system_attrs(study_id)[LEASE_KEY]["token"] == lease.token
    # the same pid with its own start time is this very process: alive
    assert fast_lease(storage, study_id).alive({**record, "pid_start": lease.pid_start, "heartbeat": time.time()})


def test_live_foreign_lease_refused_and_stale_one_taken_over(study: tuple[str, int]) -> None:
    url, study_id = study
    storage = open_storage(url)
    now = time.time()
    live = {"token": "remote", "host": "node-7.cluster", "pid": 4242, "started": now - 50, "heartbeat": now - 1}
    storage.set_study_system_attr(study_id, LEASE_KEY, live)
    with pytest.raises(LeaseHeld, match=r"pid 4242 on host 'node-7\.cluster'"):
        fast_lease(storage, study_id, stale_after=2.0, heartbeat_every=0.5).acquire()

    stale = {**live, "heartbeat": now - 10}  # the remote search stopped beating 10 s ago
    storage.set_study_system_attr(study_id, LEASE_KEY, stale)
    with fast_lease(storage, study_id, stale_after=2.0, heartbeat_every=0.5) as lease:
        assert storage.get_study_system_attrs(study_id)[LEASE_KEY]["token"] == lease.token


def test_heartbeat_advances_while_held_and_stops_on_release(study: tuple[str, int]) -> None:
    url, study_id = study
    storage = open_storage(url)
    lease = fast_lease(storage, study_id, stale_after=1.0, heartbeat_every=0.05)
    lease.acquire()
    first = storage.get_study_system_attrs(study_id)[LEASE_KEY]
    time.sleep(0.4)
    later = storage.get_study_system_attrs(study_id)[LEASE_KEY]
    assert later["heartbeat"] > first["heartbeat"]
    assert later["token"] == first["token"] and later["started"] == first["started"]
    thread = lease._thread
    start = time.monotonic()
    lease.release()
    assert time.monotonic() - start < 1
    assert thread is not None and not thread.is_alive()


def test_heartbeat_keeps_lease_alive_past_stale_after(study: tuple[str, int]) -> None:
    url, study_id = study
    storage = open_storage(url)
    with fast_lease(storage, study_id, stale_after=0.5, heartbeat_every=0.1):
        time.sleep(1.0)
        with pytest.raises(LeaseHeld):
            fast_lease(open_storage(url), study_id, stale_after=0.5, heartbeat_every=0.1).acquire()


def test_heartbeat_notices_takeover(study: tuple[str, int]) -> None:
    url, study_id = study
    storage = open_storage(url)
    lease = fast_lease(storage, study_id, heartbeat_every=0.05)
    lease.acquire()
    foreign = {"token": "other", "host": "elsewhere", "pid": 1, "started": time.time(), "heartbeat": time.time()}
    storage.set_study_system_attr(study_id, LEASE_KEY, foreign)
    deadline = time.monotonic() + 2
    while not lease.lost and time.monotonic() < deadline:
        time.sleep(0.02)
    assert lease.lost and not lease.held
    assert storage.get_study_system_attrs(study_id)[LEASE_KEY] == foreign  # the heartbeat did not overwrite it
    lease.release()


class RacingStorage:
    """Storage proxy where a rival's write lands right after our first lease write (a lost race)."""

    def __init__(self, storage: optuna.storages.BaseStorage) -> None:
        self.storage = storage
        self.raced = False

    def get_study_system_attrs(self, study_id: int) -> dict:
        return self.storage.get_study_system_attrs(study_id)

    def set_study_system_attr(self, study_id: int, key: str, value) -> None:
        self.storage.set_study_system_attr(study_id, key, value)
        if not self.raced:
            self.raced = True
            now = time.time()
            rival = {"token": "rival", "host": "node-2", "pid": 77, "started": now, "heartbeat": now}
            self.storage.set_study_system_attr(study_id, key, rival)


def test_lost_race_is_refused(study: tuple[str, int]) -> None:
    url, study_id = study
    # a settle long enough that a loaded machine's slow read-to-write does not make it start over
    # (which would meet the rival on the first read instead, and refuse without racing)
    lease = fast_lease(RacingStorage(open_storage(url)), study_id, settle=2.0)  # type: ignore[arg-type]
    with pytest.raises(LeaseHeld, match="pid 77 on host 'node-2'.*won a concurrent start"):
        lease.acquire()
    assert not lease.held


def test_concurrent_acquirers_exactly_one_wins(study: tuple[str, int]) -> None:
    url, study_id = study
    for _ in range(5):
        leases = [fast_lease(open_storage(url), study_id, settle=0.3) for _ in range(4)]
        barrier = threading.Barrier(len(leases))
        outcomes: list[str] = [""] * len(leases)

        def run(index: int) -> None:
            barrier.wait()
            try:
                leases[index].acquire()
                outcomes[index] = "won"
            except LeaseHeld:
                outcomes[index] = "refused"

        threads = [threading.Thread(target=run, args=(i,)) for i in range(len(leases))]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(timeout=30)
        assert sorted(outcomes) == ["refused"] * (len(leases) - 1) + ["won"], outcomes
        winner = leases[outcomes.index("won")]
        assert open_storage(url).get_study_system_attrs(study_id)[LEASE_KEY]["token"] == winner.token
        winner.release()


def test_lease_rejects_bad_timings(study: tuple[str, int]) -> None:
    url, study_id = study
    storage = open_storage(url)
    with pytest.raises(ValueError, match="heartbeat_every"):
        StudyLease(storage, study_id, stale_after=5, heartbeat_every=10)
    with pytest.raises(ValueError, match="stale_after"):
        StudyLease(storage, study_id, stale_after=-1)


def test_printed_urls_never_show_a_password() -> None:
    assert shown_url("postgresql://user:secret@db.example/studies") == "postgresql://user:***@db.example/studies"
    assert shown_url("sqlite:///studies/autoprune.db") == "sqlite:///studies/autoprune.db"
    assert shown_url("not a url") == "not a url"


@pytest.mark.parametrize("url, path", [
    ("sqlite:///studies/a.db", Path("studies/a.db")),
    ("sqlite://", None),
    ("sqlite:///:memory:", None),
    ("sqlite:///file:studies/a.db?uri=true", Path("studies/a.db")),
    ("sqlite:///file:shared?mode=memory&cache=shared&uri=true", None),
])
def test_sqlite_urls_name_their_file(url: str, path: Path | None) -> None:
    from autoprune.storage import _sqlite_path
    assert _sqlite_path(make_url(url)) == path
