"""A real PostgreSQL server on loopback for tests (Debian's PostgreSQL), in a throw-away data directory.

PostgreSQL refuses to run as root: as root the server runs as the ``postgres`` system user (the Debian package
creates it) through ``runuser``. The server is started in a session of its own and stopped by signalling that
process group, so the test stops exactly what it started.
"""

from __future__ import annotations

import os
import secrets
import shutil
import signal
import subprocess
import tempfile
import time
from pathlib import Path

from s3_endpoint import free_port

BIN_DIRS = sorted(Path("/usr/lib/postgresql").glob("*/bin"), reverse=True)  # newest major version first


def find_binary(name: str) -> str | None:
    """A PostgreSQL server binary (initdb, postgres): Debian keeps them off PATH, under /usr/lib/postgresql."""
    for d in BIN_DIRS:
        if (d / name).is_file():
            return str(d / name)
    return shutil.which(name)


def available() -> bool:
    return find_binary("initdb") is not None and find_binary("postgres") is not None


class PostgresServer:
    """`start()` initialises a cluster with a password-protected superuser and starts it on 127.0.0.1;
    `create_database(name)` adds a database; `url(name)` is its SQLAlchemy URL; `stop()` ends the server and
    removes the data directory."""

    def __init__(self, user: str = "sketchgan"):
        self.user, self.password = user, secrets.token_hex(12)
        self.port = free_port()
        self.dir = Path(tempfile.mkdtemp(prefix="sketchgan-pg-"))
        self.data, self.log = self.dir / "data", self.dir / "server.log"
        self._proc: subprocess.Popen | None = None
        self._as_root = os.geteuid() == 0

    def _cmd(self, *args: str) -> list[str]:
        return ["runuser", "-u", "postgres", "--", *args] if self._as_root else list(args)

    def url(self, database: str) -> str:
        return f"postgresql://{self.user}:{self.password}@127.0.0.1:{self.port}/{database}"

    def start(self, timeout: float = 60.0) -> PostgresServer:
        if not available():
            raise RuntimeError("PostgreSQL's server binaries are not installed (Debian: apt-get install postgresql)")
        pwfile = self.dir / "pw"
        pwfile.write_text(self.password + "\n")
        if self._as_root:
            shutil.chown(self.dir, "postgres", "postgres")
            shutil.chown(pwfile, "postgres", "postgres")
        subprocess.run(self._cmd(find_binary("initdb"), "-D", str(self.data), "-U", self.user, "--pwfile", str(pwfile),
                                 "--auth=scram-sha-256", "-E", "UTF8", "--no-instructions"),
                       check=True, capture_output=True, timeout=120)
        pwfile.unlink()
        with open(self.log, "ab") as log:
            self._proc = subprocess.Popen(
                self._cmd(find_binary("postgres"), "-D", str(self.data), "-p", str(self.port),
                          "-c", "listen_addresses=127.0.0.1", "-c", f"unix_socket_directories={self.dir}"),
                stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self._proc.poll() is not None:
                raise RuntimeError(f"postgres exited with {self._proc.returncode}:\n{self.log.read_text()[-3000:]}")
            if self._psql("postgres", "SELECT 1", check=False).returncode == 0:
                return self
            time.sleep(0.3)
        self.stop()
        raise RuntimeError(f"postgres did not accept connections in {timeout}s")

    def _psql(self, database: str, sql: str, check: bool = True) -> subprocess.CompletedProcess:
        env = {**os.environ, "PGPASSWORD": self.password}
        return subprocess.run(["psql", "-h", "127.0.0.1", "-p", str(self.port), "-U", self.user, "-d", database,
                               "-v", "ON_ERROR_STOP=1", "-qAtc", sql],
                              env=env, capture_output=True, text=True, check=check, timeout=60)

    def create_database(self, name: str) -> str:
        self._psql("postgres", f'CREATE DATABASE "{name}"')
        return self.url(name)

    def query(self, database: str, sql: str) -> str:
        return self._psql(database, sql).stdout

    def stop(self) -> None:
        proc, self._proc = self._proc, None
        if proc is not None and proc.poll() is None:
            try:
                os.killpg(proc.pid, signal.SIGINT)  # PostgreSQL's "fast" shutdown
                proc.wait(timeout=30)
            except ProcessLookupError:
                pass
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(timeout=5)
        shutil.rmtree(self.dir, ignore_errors=True)
