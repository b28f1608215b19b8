"""One search drives a study at a time.

Ray's Optuna searcher gives no protection against two searches driving one study at once (each would
re-enqueue and fail the other's trials on resume), so `StudyLease` records the driving process in the
study's system attrs, keeps it alive with a heartbeat, and refuses a second driver.
"""

from __future__ import annotations

import logging
import math
import os
import socket
import threading
import time
import uuid
from datetime import datetime
from pathlib import Path
from types import TracebackType
from typing import Any, Mapping

import optuna

from .storage import StorageError, first_line
from .study_attrs import LEASE_KEY

logger = logging.getLogger(__name__)


class LeaseHeld(StorageError):
    """Another search drives the study: a second search on the same study is refused."""


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
                    logger.warning("%s: lease heartbeat failed: %s", self.label, first_line(error))

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
