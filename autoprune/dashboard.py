"""`autoprune dashboard`: a storage's studies in optuna-dashboard, read-only, on 127.0.0.1.

    from autoprune.dashboard import serve_dashboard
    serve_dashboard("sqlite:///studies/autoprune.db", study="quickstart", port=8080)   # until Ctrl-C

optuna-dashboard reads a storage directly and writes to it too (notes, renames, deletions). Here it
reads an in-memory copy of the studies instead, taken when a page asks for data and the copy is
more than `REFRESH_SECONDS` old: whatever the number of open pages, the storage is read at most
that often, in a few short reads, and nothing the dashboard does can reach the study a search is
driving (requests that would change a study are refused).
A copy serves every storage alike (SQLite, PostgreSQL, ...), which opening a database read-only
would not. `benchmarks/dashboard_storage.py` measures both against a writing search.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import json
import sys
import threading
import time
from collections.abc import Callable, Iterable
from socketserver import ThreadingMixIn
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

from .study_attrs import DEFAULT_STORAGE

REFRESH_SECONDS = 2.0
DEFAULT_PORT = 8080
READ_ONLY = "autoprune dashboard is read-only: it shows a copy of the studies; change them with autoprune or Optuna"
INSTALL = "pip install 'autoprune[dashboard]'"


class DashboardError(ValueError):
    """Bad input to the dashboard (storage, study, port); the CLI exits 2 with its message."""


class StudySnapshot:
    """In-memory copies of a storage's studies (or of one), remade on demand when older than `refresh` s."""

    def __init__(self, storage_url: str, study: str | None = None, refresh: float = REFRESH_SECONDS) -> None:
        from sqlalchemy.engine import make_url

        from .study import StudyNotFound, load_study
        from .storage import StorageError, _sqlite_path, open_storage, shown_url

        try:
            database = _sqlite_path(make_url(storage_url)) if storage_url.startswith("sqlite") else None
        except Exception:  # not a URL: open_storage says so
            database = None
        if database is not None and not database.exists():  # showing studies must not create a database
            raise DashboardError(f"--storage: {shown_url(storage_url)!r} does not exist; accepted: the URL of "
                                 "an existing study storage")
        try:
            self.source = open_storage(storage_url)
            if study is not None:
                load_study(storage_url, study)  # refuses an unknown name, listing the studies there
        except (StorageError, StudyNotFound) as error:
            raise DashboardError(str(error)) from None
        self.study = study
        self.refresh = refresh
        self._lock = threading.Lock()
        self.storage = self._copy()
        self.taken = time.monotonic()  # when the current copy was made

    def current(self):
        """The copy, remade first if it is stale. A failed remake keeps the last copy (and says why)."""
        with self._lock:
            if time.monotonic() - self.taken >= self.refresh:
                try:
                    self.storage = self._copy()
                except Exception as error:  # a storage briefly unreachable: show the last copy
                    print(f"autoprune dashboard: showing the copy of {time.monotonic() - self.taken:.0f} s ago; "
                          f"reading the storage failed: {str(error).splitlines()[0] if str(error) else type(error).__name__}",
                          file=sys.stderr, flush=True)
                self.taken = time.monotonic()
            return self.storage

    def _copy(self):
        import optuna

        memory = optuna.storages.InMemoryStorage()
        verbosity = optuna.logging.get_verbosity()
        optuna.logging.set_verbosity(optuna.logging.WARNING)  # no "new study created" line per copy
        try:
            # in the storage's order, so a study keeps its dashboard id from one copy to the next
            for study in sorted(self.source.get_all_studies(), key=lambda study: study._study_id):
                if self.study in (None, study.study_name):
                    _copy_study(self.source, study, memory)
        finally:
            optuna.logging.set_verbosity(verbosity)
        return memory


def _copy_study(source, study, memory) -> None:
    """`optuna.copy_study`, plus each trial's named constraints (Optuna 5 keeps one system attr per
    name) also in the single list optuna-dashboard reads, so the dashboard shows them."""
    study_id = memory.create_new_study(study.directions, study.study_name)
    for key, value in study.system_attrs.items():
        memory.set_study_system_attr(study_id, key, value)
    for key, value in study.user_attrs.items():
        memory.set_study_user_attr(study_id, key, value)
    for trial in source.get_all_trials(study._study_id, deepcopy=False):
        constraints = trial.constraints
        if constraints and "constraints" not in trial.system_attrs:
            trial = copy.copy(trial)  # the source's trial is not ours to change
            trial.system_attrs = {**trial.system_attrs, "constraints": [constraints[name] for name in sorted(constraints)]}
        memory.create_new_trial(study_id, template_trial=trial)


class DashboardApp:
    """The WSGI application: optuna-dashboard over the snapshot, rebuilt with each new copy."""

    def __init__(self, snapshot: StudySnapshot) -> None:
        self.snapshot = snapshot
        self._storage = None
        self._app = None

    def __call__(self, environ: dict, start_response: Callable) -> Iterable[bytes]:
        if environ["REQUEST_METHOD"] not in ("GET", "HEAD"):
            start_response("405 Method Not Allowed", [("Content-Type", "application/json"), ("Allow", "GET, HEAD")])
            return [json.dumps({"reason": READ_ONLY}).encode()]
        return self._current(fresh=environ.get("PATH_INFO", "").startswith("/api/"))(environ, start_response)

    def _current(self, fresh: bool):
        """optuna-dashboard over the current copy; only data requests (/api/) ask for a fresh one."""
        from optuna_dashboard import wsgi

        storage = self.snapshot.current() if fresh else self.snapshot.storage
        if storage is not self._storage:
            self._app, self._storage = wsgi(storage), storage
        return self._app


class _ThreadingServer(ThreadingMixIn, WSGIServer):
    daemon_threads = True  # a page left open never keeps the server from stopping


class _QuietHandler(WSGIRequestHandler):
    def log_message(self, format: str, *args) -> None:  # one line per request would bury what matters
        pass


def make_dashboard_server(storage_url: str = DEFAULT_STORAGE, study: str | None = None, port: int = DEFAULT_PORT,
                          host: str = "127.0.0.1") -> WSGIServer:
    """A bound, not yet serving, dashboard server (port 0: a free one, see `server.server_port`)."""
    if isinstance(port, bool) or not isinstance(port, int) or not 0 <= port <= 65535:
        raise DashboardError(f"--port: {port!r} is invalid; accepted: a port number from 0 to 65535 (0: any free port)")
    try:
        import optuna_dashboard  # noqa: F401
    except ImportError:
        raise DashboardError(f"optuna-dashboard is not installed; accepted: install it with {INSTALL}") from None
    app = DashboardApp(StudySnapshot(storage_url, study))
    try:
        return make_server(host, port, app, server_class=_ThreadingServer, handler_class=_QuietHandler)
    except OSError as error:
        raise DashboardError(f"--port: {port} cannot be used on {host} ({error.strerror or error}); "
                             "accepted: a free port (0: any free port)") from None


def serve_dashboard(storage_url: str = DEFAULT_STORAGE, study: str | None = None, port: int = DEFAULT_PORT,
                    host: str = "127.0.0.1") -> None:
    """Serve the studies (or one) in optuna-dashboard until interrupted."""
    from .storage import shown_url

    server = make_dashboard_server(storage_url, study, port, host)
    what = f"study {study!r}" if study is not None else "the studies"
    print(f"autoprune dashboard: {what} of {shown_url(storage_url)} at http://{host}:{server.server_port}/ "
          f"(read-only copy, refreshed at most every {REFRESH_SECONDS:g} s while viewed; Ctrl-C to stop)", flush=True)
    with contextlib.suppress(KeyboardInterrupt), server:
        server.serve_forever()


def _run(args: argparse.Namespace) -> None:
    try:
        serve_dashboard(args.storage, study=args.study, port=args.port)
    except DashboardError as error:
        print(f"autoprune: {error}", file=sys.stderr)
        raise SystemExit(2) from None


def _port(text: str) -> int | str:
    """The port as a number where it is one; anything else is refused later, in one line."""
    try:
        return int(text)
    except ValueError:
        return text


def register(commands: argparse._SubParsersAction) -> None:
    """Add `autoprune dashboard` to the command line."""
    dashboard = commands.add_parser(
        "dashboard", help="show studies in optuna-dashboard (read-only, on 127.0.0.1)",
        description="Serve a storage's studies (or one) in optuna-dashboard on 127.0.0.1, read-only, from a copy "
                    f"refreshed at most every {REFRESH_SECONDS:g} s, so a running search is not disturbed. "
                    f"Needs the dashboard extra ({INSTALL}).")
    dashboard.add_argument("--study", help="show only this study (default: every study in the storage)")
    dashboard.add_argument("--storage", default=DEFAULT_STORAGE, help="Optuna storage URL (default: %(default)s)")
    dashboard.add_argument("--port", type=_port, default=DEFAULT_PORT,
                           help="port on 127.0.0.1 (default: %(default)s; 0: any free port)")
    dashboard.set_defaults(run=_run)
