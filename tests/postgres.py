"""A throwaway PostgreSQL server for tests: `initdb` into a temp folder, `pg_ctl start` on a free port.

The server is Debian's PostgreSQL (`scripts/test.sh` installs it when missing), run as the `postgres`
user when the tests run as root (the server refuses root). Without the binaries a test that asks for
`pg_server` skips, saying why, except under CI, where it fails (as `tests.conftest.system_binary`).
Test modules outside tests/state import the fixture: `from tests.postgres import pg_server`.
"""

from __future__ import annotations

import glob
import os
import shutil
import subprocess
import tempfile
import uuid
from pathlib import Path

import pytest

from tests.conftest import free_port

USER = "hetforge"


def _bin_dir() -> str | None:
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/pg_ctl"))
    if found:
        return str(Path(found[-1]).parent)
    pg_ctl = shutil.which("pg_ctl")
    return str(Path(pg_ctl).parent) if pg_ctl else None


class PgServer:
    """One PostgreSQL cluster in a temp folder; `stop`, `start` and `restart` it mid-test."""

    def __init__(self, bin_dir: str):
        self.bin_dir = bin_dir
        self.dir = Path(tempfile.mkdtemp(prefix="hetforge-pg-"))
        self.data = self.dir / "data"
        self.port = free_port()
        self.as_postgres = os.geteuid() == 0
        if self.as_postgres:
            shutil.chown(self.dir, "postgres", "postgres")
        self._run("initdb", "-D", str(self.data), "-A", "trust", "-U", USER, "--no-sync")

    def _run(self, tool: str, *args: str) -> None:
        cmd = [f"{self.bin_dir}/{tool}", *args]
        if self.as_postgres:
            cmd = ["runuser", "-u", "postgres", "--", *cmd]
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
        if done.returncode != 0:
            log = (self.dir / "log").read_text() if (self.dir / "log").exists() else ""
            raise RuntimeError(f"{tool} failed ({done.returncode}): {done.stderr}{done.stdout}\n{log[-2000:]}")

    def start(self) -> None:
        opts = f"-p {self.port} -k {self.dir} -c listen_addresses=127.0.0.1 -c fsync=off"
        self._run("pg_ctl", "-D", str(self.data), "-o", opts, "-l", str(self.dir / "log"), "-w", "-t", "60", "start")

    def stop(self, mode: str = "fast") -> None:
        self._run("pg_ctl", "-D", str(self.data), "-m", mode, "-w", "-t", "60", "stop")

    def url(self, database: str = "postgres") -> str:
        return f"postgresql://{USER}@127.0.0.1:{self.port}/{database}"

    def new_database(self) -> str:
        import psycopg

        name = "t_" + uuid.uuid4().hex[:12]
        with psycopg.connect(self.url(), autocommit=True) as conn:
            conn.execute(f"CREATE DATABASE {name}")
        return self.url(name)

    def remove(self) -> None:
        try:
            self.stop("immediate")
        except RuntimeError:
            pass  # already stopped by the test
        shutil.rmtree(self.dir, ignore_errors=True)


@pytest.fixture(scope="session")
def pg_server():
    bin_dir = _bin_dir()
    if bin_dir is None:
        why = "PostgreSQL binaries (initdb, pg_ctl) not found: apt-get install postgresql (scripts/test.sh does)"
        if os.environ.get("CI"):  # as tests.conftest.system_binary: CI must run what users have
            pytest.fail(why)
        pytest.skip(why)
    pytest.importorskip("psycopg", reason="psycopg 3 is not installed: pip install 'psycopg[binary]' (the dev extra)")
    server = PgServer(bin_dir)
    server.start()
    yield server
    server.remove()
