"""A throwaway PostgreSQL server: initdb into a fresh folder, password (SCRAM) authentication,
listening on 127.0.0.1 on a free port (its Unix socket in that folder), fsync off. PostgreSQL
refuses to run as root, so as root it runs as the system user `autoprune-pg` (created when
missing); run by anyone else, it runs as them. The server is stopped and its folder removed after the
module's tests, whatever their outcome."""

from __future__ import annotations

import importlib.util
import os
import pwd
import secrets
import shutil
import signal
import subprocess
import tempfile
from pathlib import Path

import pytest

from fixtures_processes import free_port, start, stop, tail, wait_until

SERVER_USER = "autoprune-pg"
INSTALL_SERVER = "apt-get install -y postgresql"
INSTALL_DRIVER = "pip install -e '.[postgres]'"


def server_binaries() -> Path | None:
    """The newest PostgreSQL server's bin folder (Debian: /usr/lib/postgresql/VERSION/bin), else
    the one `initdb` on PATH lives in."""
    debian = [folder for folder in Path("/usr/lib/postgresql").glob("*/bin") if folder.parent.name.isdigit()]
    for folder in sorted(debian, key=lambda folder: int(folder.parent.name), reverse=True):
        if (folder / "initdb").is_file() and (folder / "postgres").is_file():
            return folder
    initdb = shutil.which("initdb")
    return Path(initdb).resolve().parent if initdb else None


def driver_installed() -> bool:
    return importlib.util.find_spec("psycopg") is not None or importlib.util.find_spec("psycopg2") is not None


def _run_as() -> list[str]:
    """The command prefix that runs the server as a non-root user (nothing when we are not root)."""
    if os.geteuid() != 0:
        return []
    try:
        pwd.getpwnam(SERVER_USER)
    except KeyError:
        subprocess.run(["useradd", "--system", "--no-create-home", "--home-dir", "/nonexistent",
                        "--shell", "/usr/sbin/nologin", SERVER_USER], check=True, capture_output=True, timeout=60)
    return ["runuser", "-u", SERVER_USER, "--"]


class PostgresServer:
    USER = "autoprune"
    DATABASE = "postgres"

    def __init__(self, binaries: Path) -> None:
        self.binaries = binaries
        # not under pytest's tmp_path: its parents are private to the user running the tests
        self.root = Path(tempfile.mkdtemp(prefix="autoprune-pg-"))
        self.log = self.root / "server.log"
        self.password = "pw-" + secrets.token_hex(8)
        self.port = free_port()
        self.process: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"postgresql://{self.USER}:{self.password}@127.0.0.1:{self.port}/{self.DATABASE}"

    def start(self) -> None:
        run_as = _run_as()
        password_file = self.root / "password"
        password_file.write_text(self.password + "\n")
        if run_as:
            owner = pwd.getpwnam(SERVER_USER)
            for path in (self.root, password_file):
                os.chown(path, owner.pw_uid, owner.pw_gid)
        initdb = subprocess.run(
            [*run_as, str(self.binaries / "initdb"), "-D", str(self.root / "data"), "-U", self.USER,
             f"--pwfile={password_file}", "--auth=scram-sha-256", "--encoding=UTF8", "--no-sync"],
            capture_output=True, text=True, timeout=120, cwd=self.root)
        if initdb.returncode != 0:
            raise RuntimeError(f"initdb failed ({initdb.returncode}): {initdb.stderr.strip()[-2000:]}")
        self.process = start(
            [*run_as, str(self.binaries / "postgres"), "-D", str(self.root / "data"),
             "-c", "listen_addresses=127.0.0.1", "-c", f"port={self.port}",
             "-c", f"unix_socket_directories={self.root}", "-c", "fsync=off", "-c", "synchronous_commit=off",
             "-c", "full_page_writes=off"],
            self.log, cwd=self.root)
        ready = [str(self.binaries / "pg_isready"), "-h", "127.0.0.1", "-p", str(self.port), "-t", "1"]
        try:
            wait_until(lambda: subprocess.run(ready, capture_output=True, timeout=10).returncode == 0, 60,
                       "PostgreSQL server", alive=self.process)
        except (RuntimeError, TimeoutError) as error:
            raise RuntimeError(f"{error}; server log:\n{tail(self.log)}") from None

    def stop(self) -> None:
        try:
            if self.process is not None:
                stop(self.process, grace=15, first=signal.SIGINT)  # SIGINT: PostgreSQL's fast shutdown
        finally:
            shutil.rmtree(self.root, ignore_errors=True)


@pytest.fixture(scope="module")
def postgres_url():
    """The URL (with its password) of a fresh PostgreSQL server, for this test module."""
    binaries = server_binaries()
    if binaries is None:
        pytest.skip(f"needs a PostgreSQL server ({INSTALL_SERVER})")
    if not driver_installed():
        pytest.skip(f"needs a PostgreSQL driver ({INSTALL_DRIVER})")
    server = PostgresServer(binaries)
    try:
        server.start()
        yield server.url
    finally:
        server.stop()
