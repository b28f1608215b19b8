"""Does a dashboard hold up a search writing its SQLite study? Three ways to serve optuna-dashboard:

- `snapshot`: what `autoprune dashboard` does: an in-memory copy, remade when a data request
  finds it older than 2 s;
- `readonly`: optuna-dashboard on the database file opened read-only (`mode=ro`);
- `direct`: optuna-dashboard on the database as it is (what `optuna-dashboard sqlite:///...` does).

A writer does to the study what a search does, as fast as it can (per trial: create it, set six
user attributes, record its values and state; a lease heartbeat every second), through
autoprune's `open_storage` (30 s busy timeout), while reader threads in another process poll the
study's dashboard API without pause (open pages, but harder). Printed per mode: writer
operations/s, their latency (median, 99th percentile, max), 'database is locked' errors, and
reader answers/s and errors.

    python benchmarks/dashboard_storage.py --seconds 30 --readers 4 --trials 200

Timings only mean something on an otherwise idle machine; the error counts mean something anywhere.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
import warnings
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import optuna  # noqa: E402

from autoprune.storage import open_storage  # noqa: E402

MODES = ("snapshot", "readonly", "direct")
ATTRS = {"prune_config": {"reducer": "tome", "r": 4, "layers": None}, "flops": 1.2e9, "params": 5.7e6,
         "throughput": 812.5, "speedup": 1.31, "autoprune:outcome": "complete"}


def one_trial(study: optuna.Study) -> None:
    trial = study.ask({"keep_rate": optuna.distributions.FloatDistribution(0.3, 1.0)})
    for key, value in ATTRS.items():
        trial.set_user_attr(key, value)
    study.tell(trial, [90.0, 800.0])


def prepare(path: Path, trials: int) -> None:
    """The study every mode starts from (copied, so each starts alike)."""
    study = optuna.create_study(storage=open_storage(f"sqlite:///{path}"), study_name="s",
                                directions=["maximize", "maximize"])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        study.set_metric_names(["accuracy", "throughput"])
    for _ in range(trials):
        one_trial(study)


def serve(mode: str, url: str) -> None:
    """Run in a child process: serve the dashboard on a free loopback port and print the port."""
    from wsgiref.simple_server import make_server

    if mode == "snapshot":
        from autoprune.dashboard import make_dashboard_server
        server = make_dashboard_server(url, port=0)
    else:
        from optuna_dashboard import wsgi

        from autoprune.dashboard import _QuietHandler, _ThreadingServer
        path = url.removeprefix("sqlite:///")
        source = url if mode == "direct" else f"sqlite:///file:{path}?mode=ro&uri=true"
        storage = optuna.storages.RDBStorage(source, skip_table_creation=mode == "readonly")
        server = make_server("127.0.0.1", 0, wsgi(storage), server_class=_ThreadingServer, handler_class=_QuietHandler)
    print(server.server_port, flush=True)
    server.serve_forever()


def read(port: int, seconds: float, threads: int) -> None:
    """Run in a child process: poll the study's API from `threads` threads; print counts as JSON."""
    counts = {"answers": 0, "errors": 0, "first_error": None}
    lock = threading.Lock()
    deadline = time.monotonic() + seconds

    with urllib.request.urlopen(f"http://127.0.0.1:{port}/api/studies", timeout=60) as answer:
        [study] = json.load(answer)["study_summaries"]  # ids differ: in memory from 0, in SQLite from 1

    def poll() -> None:
        while time.monotonic() < deadline:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/api/studies/{study['study_id']}",
                                            timeout=60) as answer:
                    json.load(answer)
                with lock:
                    counts["answers"] += 1
            except Exception as error:
                with lock:
                    counts["errors"] += 1
                    counts["first_error"] = counts["first_error"] or repr(error)[:200]

    workers = [threading.Thread(target=poll) for _ in range(threads)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join()
    print(json.dumps(counts), flush=True)


def write(url: str, seconds: float) -> dict:
    study = optuna.load_study(study_name="s", storage=open_storage(url))
    latencies, errors, first_error = [], 0, None
    deadline, beat = time.monotonic() + seconds, time.monotonic()
    while time.monotonic() < deadline:
        start = time.perf_counter()
        try:
            one_trial(study)
            if time.monotonic() - beat >= 1:
                study._storage.set_study_system_attr(study._study_id, "autoprune:lease", {"heartbeat": time.time()})
                beat = time.monotonic()
        except Exception as error:
            errors += 1
            first_error = first_error or repr(error)[:200]
        latencies.append(time.perf_counter() - start)
    latencies.sort()
    return {"trials/s": len(latencies) / seconds, "p50 ms": 1e3 * statistics.median(latencies),
            "p99 ms": 1e3 * latencies[int(0.99 * (len(latencies) - 1))], "max ms": 1e3 * latencies[-1],
            "errors": errors, "locked": first_error if first_error and "locked" in first_error else None}


def measure(mode: str | None, prepared: Path, seconds: float, readers: int) -> dict:
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "studies.db"
        shutil.copy(prepared, path)
        url = f"sqlite:///{path}"
        if mode is None:
            return {"mode": "no dashboard", **write(url, seconds)}
        server = subprocess.Popen([sys.executable, __file__, "--serve", mode, url], stdout=subprocess.PIPE, text=True)
        try:
            port = int(server.stdout.readline())
            reader = subprocess.Popen([sys.executable, __file__, "--read", str(port), str(seconds), str(readers)],
                                      stdout=subprocess.PIPE, text=True)
            writer = write(url, seconds)
            counts = json.loads(reader.communicate(timeout=seconds + 120)[0])
        finally:
            server.terminate()
            server.wait(timeout=30)
        return {"mode": mode, **writer, "reads/s": counts["answers"] / seconds, "read errors": counts["errors"],
                "first read error": counts["first_error"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seconds", type=float, default=30)
    parser.add_argument("--readers", type=int, default=4, help="polling threads (open pages)")
    parser.add_argument("--trials", type=int, default=200, help="trials in the study before the run")
    parser.add_argument("--serve", nargs=2, metavar=("MODE", "URL"), help=argparse.SUPPRESS)
    parser.add_argument("--read", nargs=3, metavar=("PORT", "SECONDS", "THREADS"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve:
        return serve(*args.serve)
    if args.read:
        return read(int(args.read[0]), float(args.read[1]), int(args.read[2]))
    print(f"{args.seconds:g} s per mode, {args.readers} polling readers, {args.trials} trials to start with, "
          f"{os.cpu_count()} CPUs")
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    with tempfile.TemporaryDirectory() as folder:
        prepared = Path(folder) / "prepared.db"
        prepare(prepared, args.trials)
        for mode in (None, *MODES):
            print(json.dumps(measure(mode, prepared, args.seconds, args.readers)), flush=True)


if __name__ == "__main__":
    main()
