"""Study storage: open the user's `--storage` safely, compare stored settings, and lease a study.

Optuna's `RDBStorage` creates its tables in whatever database it is given, so a mistyped path can
write Optuna tables into an unrelated SQLite file. `open_storage` inspects an existing file read-only
first and refuses anything that is not an Optuna study database, leaving its bytes untouched.

Ray's Optuna searcher gives no protection against two searches driving one study at once (each would
re-enqueue and fail the other's trials on resume), so `StudyLease` records the driving process in the
study's system attrs, keeps it alive with a heartbeat, and refuses a second driver.
"""

from __future__ import annotations

import importlib.util
import logging
import math
import os
import socket
import sqlite3
import threading
import time
import uuid
from datetime import datetime
from pathlib import Path
from types import TracebackType
from typing import Any, Mapping
from urllib.parse import quote

import optuna
import sqlalchemy
from sqlalchemy.engine import URL, make_url

from .study_attrs import LEASE_KEY

logger = logging.getLogger(__name__)

DEFAULT_FOLDER = Path("studies")  # the only missing parent folder open_storage creates
ACCEPTED_URL = "an SQLAlchemy URL such as sqlite:///studies/autoprune.db or postgresql://user@host/db"
ACCEPTED_FILE = "a new file or an existing Optuna study database"
SQLITE_TIMEOUT = 30  # seconds a connection waits on a locked SQLite file instead of failing
OPTUNA_TABLES = frozenset({"studies", "trials", "version_info"})  # present in every Optuna schema
SQLITE_MAGIC = b"SQLite format 3\x00"


class StorageError(ValueError):
    """A `--storage` that cannot be used; the message names it and what is accepted."""


class LeaseHeld(StorageError):
    """Another search drives the study: a second search on the same study is refused."""


# -- opening --------------------------------------------------------------------------------------

def _first_line(error: BaseException) -> str:
    text = str(error).strip() or type(error).__name__
    return text.splitlines()[0].strip()


def _cannot_open(shown: str, why: str) -> StorageError:
    return StorageError(f"--storage: {shown!r} cannot be opened: {why}; accepted: {ACCEPTED_URL}")


def _sqlite_path(url: URL) -> Path | None:
    """The file an SQLite URL names, or None for an in-memory database."""
    database = url.database or ""
    if database in ("", ":memory:"):
        return None
    if database.startswith("file:"):  # sqlite URI form (?uri=true); SQLAlchemy keeps the query in url.query
        database = database[len("file:"):]
        if database in ("", ":memory:") or url.query.get("mode") == "memory":
            return None
    return Path(database)


def _check_sqlite_file(path: Path, shown: str) -> None:
    """Refuse, without writing anything, a file that is not an Optuna study database."""
    not_study = f"--storage: {shown!r} is not an autoprune/Optuna study database"
    if path.is_dir():
        raise StorageError(f"{not_study} (it is a folder); accepted: {ACCEPTED_FILE}")
    try:
        with path.open("rb") as handle:
            header = handle.read(len(SQLITE_MAGIC))
    except OSError as error:
        raise StorageError(f"{not_study} (cannot read it: {_first_line(error)}); accepted: {ACCEPTED_FILE}") from None
    if not header:
        return  # an empty file is an empty SQLite database: nothing in it can be damaged
    if header != SQLITE_MAGIC:
        raise StorageError(f"{not_study} (it is not an SQLite file); accepted: {ACCEPTED_FILE}")

    if Path(f"{path}-journal").exists():
        # a writer killed mid-transaction (a search killed with -9) left a hot journal, which a
        # read-only connection cannot roll back; an ordinary one rolls it back on its first read,
        # restoring the last committed state, as every SQLite client does
        recovery = sqlite3.connect(str(path), timeout=SQLITE_TIMEOUT)
        try:
            recovery.execute("SELECT count(*) FROM sqlite_master").fetchall()
        except sqlite3.DatabaseError as error:
            raise StorageError(f"{not_study} (SQLite cannot read it: {_first_line(error)}); "
                               f"accepted: {ACCEPTED_FILE}") from None
        finally:
            recovery.close()
    # read-only connection: inspecting must not create journals, tables or anything else
    uri = f"file:{quote(str(path.resolve()))}?mode=ro"
    engine = sqlalchemy.create_engine(
        "sqlite://", creator=lambda: sqlite3.connect(uri, uri=True, timeout=SQLITE_TIMEOUT)
    )
    try:
        tables = set(sqlalchemy.inspect(engine).get_table_names())
    except sqlalchemy.exc.SQLAlchemyError as error:
        cause = _first_line(getattr(error, "orig", None) or error)
        raise StorageError(f"{not_study} (SQLite cannot read it: {cause}); accepted: {ACCEPTED_FILE}") from None
    finally:
        engine.dispose()
    if tables and not OPTUNA_TABLES <= tables:
        listed = ", ".join(sorted(tables)[:5]) + (", ..." if len(tables) > 5 else "")
        raise StorageError(f"{not_study} (it has other tables: {listed}); accepted: {ACCEPTED_FILE}")


def shown_url(url: str) -> str:
    """The URL as it may be printed: its password masked."""
    try:
        return make_url(url).render_as_string(hide_password=True)
    except Exception:  # not a URL at all: nothing in it to hide
        return str(url)


def _installed_driver(url: URL) -> URL:
    """A plain `postgresql://` URL means psycopg2 to SQLAlchemy; the `postgres` extra installs
    psycopg (version 3), so such a URL uses it when psycopg2 is absent."""
    if (url.drivername == "postgresql" and importlib.util.find_spec("psycopg2") is None
            and importlib.util.find_spec("psycopg") is not None):
        return url.set(drivername="postgresql+psycopg")
    return url


def open_storage(url: str) -> optuna.storages.RDBStorage:
    """Open (or create) the study storage at `url`, refusing files that are not study databases."""
    try:
        parsed = _installed_driver(make_url(url))
    except Exception as error:  # sqlalchemy raises ArgumentError, but a non-str raises others
        raise _cannot_open(str(url), _first_line(error)) from None
    shown = shown_url(url)
    try:
        parsed.get_dialect()
    except Exception as error:  # NoSuchModuleError for an unknown dialect or driver name
        raise _cannot_open(shown, f"unknown database dialect {parsed.drivername!r} ({_first_line(error)})") from None

    engine_kwargs: dict[str, Any]
    if parsed.get_backend_name() == "sqlite":
        path = _sqlite_path(parsed)
        if path is not None:
            parent = path.parent
            if not parent.exists():
                if os.path.normpath(parent) == os.path.normpath(DEFAULT_FOLDER):
                    parent.mkdir(parents=True, exist_ok=True)
                else:
                    raise StorageError(
                        f"--storage: {shown!r} is in folder '{parent}', which does not exist; "
                        f"accepted: a file in an existing folder (only '{DEFAULT_FOLDER}/' is created automatically)"
                    )
            elif not parent.is_dir():
                raise StorageError(f"--storage: {shown!r} is under '{parent}', which is not a folder; accepted: {ACCEPTED_FILE}")
            if path.exists():
                _check_sqlite_file(path, shown)
        engine_kwargs = {"connect_args": {"timeout": SQLITE_TIMEOUT}}
    else:
        engine_kwargs = {"pool_pre_ping": True}

    try:
        return optuna.storages.RDBStorage(parsed.render_as_string(hide_password=False), engine_kwargs=engine_kwargs)
    except ImportError as error:
        cause = _first_line(error.__cause__ or error)
        raise _cannot_open(shown, f"its database driver is not installed ({cause})") from None
    except (sqlalchemy.exc.SQLAlchemyError, RuntimeError, OSError, ValueError) as error:
        # OperationalError for an unreachable server; RuntimeError for an incompatible Optuna schema
        cause = _first_line(getattr(error, "orig", None) or error)
        raise _cannot_open(shown, cause) from None


# -- settings -------------------------------------------------------------------------------------

_MISSING = object()


def _normalise(value: Any) -> Any:
    """Make Python-side values compare like their JSON round trip (tuples are lists after storage)."""
    if isinstance(value, tuple):
        return [_normalise(item) for item in value]
    if isinstance(value, list):
        return [_normalise(item) for item in value]
    return value


def _same(a: Any, b: Any) -> bool:
    """JSON-style equality: 1 == 1.0, but True != 1, and tuples equal the lists they are stored as."""
    a, b = _normalise(a), _normalise(b)
    if isinstance(a, bool) or isinstance(b, bool):
        return type(a) is type(b) and a == b
    if isinstance(a, Mapping) and isinstance(b, Mapping):
        return set(a) == set(b) and all(_same(a[key], b[key]) for key in a)
    if isinstance(a, list) and isinstance(b, list):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    if isinstance(a, (int, float)) and isinstance(b, (int, float)):
        return a == b or (math.isnan(a) and math.isnan(b))
    return type(a) is type(b) and a == b


def settings_diff(stored: Mapping[str, Any], requested: Mapping[str, Any]) -> list[str]:
    """Lines such as `budget: stored '2.6GFLOPs', requested '3G'`; empty when the settings agree.

    A resumed search must run with the settings its study was started with; this tells the user
    exactly which ones differ (nested keys as dotted paths, keys present on one side only included).
    """
    lines: list[str] = []

    def walk(a: Any, b: Any, path: str) -> None:
        if isinstance(a, Mapping) and isinstance(b, Mapping):
            keys = list(a) + [key for key in b if key not in a]
            for key in sorted(keys, key=str):
                walk(a.get(key, _MISSING), b.get(key, _MISSING), f"{path}.{key}" if path else str(key))
            return
        if a is _MISSING:
            lines.append(f"{path}: not stored, requested {_normalise(b)!r}")
        elif b is _MISSING:
            lines.append(f"{path}: stored {_normalise(a)!r}, not requested")
        elif not _same(a, b):
            lines.append(f"{path}: stored {_normalise(a)!r}, requested {_normalise(b)!r}")

    walk(stored, requested, "")
    return lines


# -- lease ----------------------------------------------------------------------------------------

def _pid_running(pid: int) -> bool:
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    except OSError:
        return False
    return True


def _process_start(pid: int) -> str | None:
    """The kernel's start time of `pid` (Linux), which tells a reused pid from the original; None
    where it cannot be read."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
        return stat.rsplit(")", 1)[1].split()[19]  # field 22, counted after the parenthesised name
    except (OSError, IndexError):
        return None


def _when(timestamp: float) -> str:
    return datetime.fromtimestamp(timestamp).isoformat(sep=" ", timespec="seconds")


class StudyLease:
    """Only one search drives a study at a time. The lease lives in the study's system attrs.

    The record {token, host, pid, started, heartbeat} is refreshed by a daemon thread. A lease is
    alive while its heartbeat is younger than `stale_after` seconds and, on this host, its process
    still runs, so a search killed with SIGKILL on this machine can be resumed at once, and one
    killed elsewhere after `stale_after` seconds. Storage has no compare-and-set, so acquiring writes
    the record, waits `settle` seconds and reads it back: a concurrent writer that overwrote it wins.
    """

    def __init__(
        self,
        storage: optuna.storages.BaseStorage,
        study_id: int,
        stale_after: float = 60.0,
        heartbeat_every: float = 10.0,
        settle: float = 0.3,
        name: str | None = None,
    ) -> None:
        for field_name, value in (("stale_after", stale_after), ("heartbeat_every", heartbeat_every), ("settle", settle)):
            if not (isinstance(value, (int, float)) and math.isfinite(value) and value > 0):
                raise ValueError(f"StudyLease.{field_name}: {value!r} is invalid; accepted: a positive number of seconds")
        if heartbeat_every >= stale_after:
            raise ValueError(
                f"StudyLease.heartbeat_every: {heartbeat_every!r} is invalid; accepted: less than stale_after ({stale_after!r})"
            )
        self.storage = storage
        self.study_id = study_id
        self.label = f"study {name!r}" if name is not None else f"study {study_id}"  # for messages
        self.stale_after = float(stale_after)
        self.heartbeat_every = float(heartbeat_every)
        self.settle = float(settle)
        self.host = socket.gethostname()
        self.pid = os.getpid()
        self.pid_start = _process_start(self.pid)
        self.token: str | None = None
        self.lost = False  # set when another search overwrote our lease while we held it
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()

    # storage access, kept in one place
    def read(self) -> dict[str, Any] | None:
        """The current lease record, or None when the study has none."""
        record = self.storage.get_study_system_attrs(self.study_id).get(LEASE_KEY)
        return record if isinstance(record, dict) else None

    def _write(self, record: dict[str, Any] | None) -> None:
        self.storage.set_study_system_attr(self.study_id, LEASE_KEY, record)

    @property
    def held(self) -> bool:
        return self.token is not None and not self.lost

    def alive(self, record: Mapping[str, Any], now: float | None = None) -> bool:
        """Whether `record` still holds the study: a recent heartbeat and, on this host, a running pid."""
        now = time.time() if now is None else now
        try:
            heartbeat = float(record.get("heartbeat", 0))
            pid = int(record.get("pid", 0))
        except (TypeError, ValueError):
            return False
        if not math.isfinite(heartbeat) or now - heartbeat > self.stale_after:
            return False
        if record.get("host") == self.host:
            if not _pid_running(pid):
                return False
            # a restarted container reuses pids: the same pid started at another time is another process
            started = record.get("pid_start")
            if started is not None and _process_start(pid) not in (None, started):
                return False
        return True

    def _refusal(self, record: Mapping[str, Any], detail: str = "") -> LeaseHeld:
        now = time.time()
        try:
            since = _when(float(record.get("started", now)))
            beat = f"{max(0.0, now - float(record.get('heartbeat', now))):.0f} s ago"
        except (TypeError, ValueError):
            since, beat = "an unknown time", "unknown"
        return LeaseHeld(
            f"{self.label} is already driven by pid {record.get('pid')} on host {record.get('host')!r} "
            f"since {since} (last heartbeat {beat}){detail}; a second search on the same study is refused: "
            f"stop that search, or wait {self.stale_after:.0f} s after it dies for its lease to go stale"
        )

    def acquire(self) -> None:
        """Take the lease or raise LeaseHeld; starts the heartbeat thread."""
        if self.token is not None:
            raise StorageError(f"StudyLease.acquire: {self.label} lease is already held by this object; accepted: release() first")
        token = uuid.uuid4().hex
        for _ in range(5):
            started = time.monotonic()
            current = self.read()
            if current is not None and current.get("token") != token and self.alive(current):
                raise self._refusal(current)
            now = time.time()
            self._write({"token": token, "host": self.host, "pid": self.pid, "pid_start": self.pid_start, "started": now, "heartbeat": now})
            # the read-back only detects a rival whose write landed within `settle` of its read; if our
            # own read-to-write took that long, a rival may have been as slow: start over
            if time.monotonic() - started >= self.settle:
                continue
            time.sleep(self.settle)
            current = self.read()
            if current is None or current.get("token") != token:
                if current is not None:
                    raise self._refusal(current, detail=", it won a concurrent start")
                raise LeaseHeld(
                    f"{self.label}: our lease was removed while starting; a second search on the same study is refused"
                )
            break
        else:
            raise StorageError(
                f"StudyLease.acquire: storage writes for {self.label} took longer than settle={self.settle} s "
                f"five times; accepted: a storage that answers faster, or a larger settle"
            )
        self.token = token
        self.lost = False
        self._stop.clear()
        self._thread = threading.Thread(target=self._beat, name=f"autoprune-lease-{self.study_id}", daemon=True)
        self._thread.start()

    def _beat(self) -> None:
        """Refresh our heartbeat until released, and stop if someone else now holds the lease."""
        while not self._stop.wait(self.heartbeat_every):
            with self._lock:
                if self._stop.is_set() or self.token is None:
                    return
                try:
                    current = self.read()
                    if current is None or current.get("token") != self.token:
                        self.lost = True
                        logger.warning("%s: the search lease was taken over by another search", self.label)
                        return
                    self._write({**current, "heartbeat": time.time()})
                except Exception as error:  # a locked or briefly unreachable database: try again next beat
                    logger.warning("%s: lease heartbeat failed: %s", self.label, _first_line(error))

    def release(self) -> None:
        """Stop the heartbeat and clear the lease if it is still ours; safe to call more than once."""
        self._stop.set()
        thread, self._thread = self._thread, None
        if thread is not None and thread is not threading.current_thread():
            thread.join(timeout=self.heartbeat_every + 5)
        with self._lock:
            token, self.token = self.token, None
            if token is None:
                return
            current = self.read()
            if current is not None and current.get("token") == token:
                self._write(None)

    def __enter__(self) -> StudyLease:
        self.acquire()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.release()
