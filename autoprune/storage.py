"""Study storage: open the user's `--storage` safely and compare stored settings.

Optuna's `RDBStorage` creates its tables in whatever database it is given, so a mistyped path can
write Optuna tables into an unrelated SQLite file. `open_storage` inspects an existing file read-only
first and refuses anything that is not an Optuna study database, leaving its bytes untouched.
The lease that keeps a second search off a study is in `lease.py`.
"""

from __future__ import annotations

import importlib.util
import logging
import math
import os
import sqlite3
from pathlib import Path
from typing import Any, Mapping
from urllib.parse import quote

import optuna
import sqlalchemy
from sqlalchemy.engine import URL, make_url

logger = logging.getLogger(__name__)

DEFAULT_FOLDER = Path("studies")  # the only missing parent folder open_storage creates
ACCEPTED_URL = "an SQLAlchemy URL such as sqlite:///studies/autoprune.db or postgresql://user@host/db"
ACCEPTED_FILE = "a new file or an existing Optuna study database"
SQLITE_TIMEOUT = 30  # seconds a connection waits on a locked SQLite file instead of failing
OPTUNA_TABLES = frozenset({"studies", "trials", "version_info"})  # present in every Optuna schema
SQLITE_MAGIC = b"SQLite format 3\x00"


class StorageError(ValueError):
    """A `--storage` that cannot be used; the message names it and what is accepted."""


def first_line(error: BaseException) -> str:
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
        raise StorageError(f"{not_study} (cannot read it: {first_line(error)}); accepted: {ACCEPTED_FILE}") from None
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
            raise StorageError(f"{not_study} (SQLite cannot read it: {first_line(error)}); "
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
        cause = first_line(getattr(error, "orig", None) or error)
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
        raise _cannot_open(str(url), first_line(error)) from None
    shown = shown_url(url)
    try:
        parsed.get_dialect()
    except Exception as error:  # NoSuchModuleError for an unknown dialect or driver name
        raise _cannot_open(shown, f"unknown database dialect {parsed.drivername!r} ({first_line(error)})") from None

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
        cause = first_line(error.__cause__ or error)
        raise _cannot_open(shown, f"its database driver is not installed ({cause})") from None
    except (sqlalchemy.exc.SQLAlchemyError, RuntimeError, OSError, ValueError) as error:
        # OperationalError for an unreachable server; RuntimeError for an incompatible Optuna schema
        cause = first_line(getattr(error, "orig", None) or error)
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
