"""Helpers for tests that start real servers: free loopback ports, bounded waits, and stopping
exactly the processes a test started (by the session it put them in), never by name."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import time
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

T = TypeVar("T")


def free_port() -> int:
    """A TCP port free on 127.0.0.1 right now (the kernel's pick)."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def wait_until(condition: Callable[[], T], timeout: float, what: str, every: float = 0.2,
               alive: subprocess.Popen | None = None) -> T:
    """Poll `condition` until it returns something truthy; fail after `timeout` seconds, or at
    once when the process `alive` (the server being waited for) has exited."""
    deadline = time.monotonic() + timeout
    while True:
        result = condition()
        if result:
            return result
        if alive is not None and alive.poll() is not None:
            raise RuntimeError(f"{what}: the process exited with code {alive.returncode} before it was ready")
        if time.monotonic() > deadline:
            raise TimeoutError(f"{what}: not ready after {timeout:.0f} s")
        time.sleep(every)


def session_members(session: int) -> list[int]:
    """Live (not zombie) processes of a session, read from /proc. A process started with
    `start_new_session=True` leads its own session, and everything it spawns stays in it unless it
    calls setsid itself, even after the leader exits: the session names exactly what a test started."""
    members = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        fields = stat.rsplit(")", 1)[1].split()  # after the parenthesised name: state, ppid, pgrp, session
        if fields[0] != "Z" and int(fields[3]) == session:
            members.append(int(entry.name))
    return members


def stop_session(session: int, grace: float = 10.0, first: signal.Signals = signal.SIGTERM) -> None:
    """Signal every process of the session (`first`, SIGTERM by default), then SIGKILL what is left
    after `grace` seconds."""
    for sig, wait in ((first, grace), (signal.SIGKILL, 10.0)):
        for pid in session_members(session):
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                pass
        deadline = time.monotonic() + wait
        while session_members(session) and time.monotonic() < deadline:
            time.sleep(0.1)
        if not session_members(session):
            return
    raise RuntimeError(f"processes {session_members(session)} of session {session} survived SIGKILL")


def start(command: list[str], log: Path, env: dict[str, str] | None = None, cwd: Path | None = None,
          **kwargs) -> subprocess.Popen:
    """Start `command` in a new session, its output appended to `log`."""
    with open(log, "ab") as out:
        return subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                start_new_session=True, env=env, cwd=cwd, **kwargs)


def stop(process: subprocess.Popen, grace: float = 10.0, first: signal.Signals = signal.SIGTERM) -> None:
    """Stop a process started with `start` and everything in its session; reap it."""
    stop_session(process.pid, grace, first)
    try:
        process.wait(timeout=10)
    except subprocess.TimeoutExpired:  # only possible if it left the session: stop it alone
        process.kill()
        process.wait(timeout=10)


def tail(path: Path, lines: int = 30) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"
