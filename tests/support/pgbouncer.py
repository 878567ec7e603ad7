"""PgBouncer in transaction mode in front of the test PostgreSQL, for one test session.

The production topology puts PgBouncer (``pool_mode = transaction``) between the
ASGI workers and PostgreSQL (docs/deployment.md): each transaction may run on a
different server connection, so nothing may outlive one. Tests start Debian's
``pgbouncer`` with a config of their own (a free port on 127.0.0.1, every
database name passed through to the PostgreSQL it fronts, so pytest-django's
``test_<name>`` databases and the live servers' ``cf_live_*`` ones are reachable)
and point their connections at it.
"""

from __future__ import annotations

import os
import pwd
import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

BINARY_DIRS = ("/usr/sbin", "/usr/bin", "/usr/local/sbin", "/usr/local/bin")


def pgbouncer_binary() -> str | None:
    """Debian installs it in /usr/sbin, which a non-root PATH may lack."""
    path = os.pathsep.join([os.environ.get("PATH", ""), *BINARY_DIRS])
    return shutil.which("pgbouncer", path=path)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class PgBouncer:
    """One pgbouncer process; ``url(db_url)`` is ``db_url`` reached through it."""

    server_host: str = "127.0.0.1"
    server_port: int = 5432
    users: tuple[str, ...] = ("postgres",)
    pool_size: int = 8
    port: int = field(default_factory=_free_port)
    _tmp: tempfile.TemporaryDirectory | None = None
    _process: subprocess.Popen | None = None

    def config(self, directory: Path) -> str:
        return "\n".join(
            [
                "[databases]",
                # Any database name goes to the same server: test_<db>, cf_live_*, postgres.
                f"* = host={self.server_host} port={self.server_port}",
                "",
                "[pgbouncer]",
                "listen_addr = 127.0.0.1",
                f"listen_port = {self.port}",
                "unix_socket_dir =",
                "auth_type = trust",
                f"auth_file = {directory / 'userlist.txt'}",
                f"admin_users = {self.users[0]}",
                "pool_mode = transaction",
                f"default_pool_size = {self.pool_size}",
                "max_client_conn = 500",
                # Clients wait for a server rather than fail while the burst tests run.
                "query_wait_timeout = 60",
                "ignore_startup_parameters = extra_float_digits,options",
                f"logfile = {directory / 'pgbouncer.log'}",
                "",
            ]
        )

    def start(self) -> PgBouncer:
        binary = pgbouncer_binary()
        if binary is None:
            raise FileNotFoundError("pgbouncer is not installed (apt-get install pgbouncer)")
        self._tmp = tempfile.TemporaryDirectory(prefix="cf-pgbouncer-")
        directory = Path(self._tmp.name)
        (directory / "userlist.txt").write_text("".join(f'"{u}" ""\n' for u in self.users))
        config = self.config(directory)
        if os.geteuid() == 0:
            # PgBouncer refuses to run as root; it drops to this user after reading its files.
            unprivileged = "postgres"
            config = config.replace("[pgbouncer]\n", f"[pgbouncer]\nuser = {unprivileged}\n")
            owner = pwd.getpwnam(unprivileged)
            os.chown(directory, owner.pw_uid, owner.pw_gid)
            for path in directory.iterdir():
                os.chown(path, owner.pw_uid, owner.pw_gid)
        (directory / "pgbouncer.ini").write_text(config)
        self._process = subprocess.Popen(
            [binary, str(directory / "pgbouncer.ini")],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.STDOUT,
        )
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline:
            if self._process.poll() is not None:
                raise RuntimeError(f"pgbouncer exited at start:\n{self.log()}")
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.5):
                    return self
            except OSError:
                time.sleep(0.05)
        self.stop()
        raise RuntimeError(f"pgbouncer did not listen on port {self.port}:\n{self.log()}")

    def url(self, database_url: str) -> str:
        """``database_url`` (postgres://user@host:port/db) through this pooler."""
        parts = urlsplit(database_url)
        userinfo = parts.netloc.rpartition("@")[0]
        netloc = f"{userinfo}@127.0.0.1:{self.port}" if userinfo else f"127.0.0.1:{self.port}"
        return urlunsplit(parts._replace(netloc=netloc))

    def log(self) -> str:
        if self._tmp is None:
            return ""
        path = Path(self._tmp.name) / "pgbouncer.log"
        return path.read_text() if path.exists() else ""

    def stop(self) -> None:
        if self._process is not None and self._process.poll() is None:
            self._process.terminate()
            try:
                self._process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self._process.kill()
                self._process.wait()
        self._process = None
        if self._tmp is not None:
            self._tmp.cleanup()
            self._tmp = None


# --- the suite through PgBouncer ---------------------------------------------------------
# CASCADEFLOW_TEST_PGBOUNCER=1 runs a whole pytest session through one PgBouncer: the
# suite's own connections (tests/conftest.py) and the live servers it starts
# (tests/support/live_server.py). .ci/run does so for the budget-concurrency and export
# tests; tests/settings.py sets DATABASE_POOLER=transaction for such a session.
ENV = "CASCADEFLOW_TEST_PGBOUNCER"
_session_pooler: PgBouncer | None = None


def session_requested() -> bool:
    return os.environ.get(ENV) == "1"


def session_pooler() -> PgBouncer | None:
    """The PgBouncer this whole session goes through, once started; None otherwise."""
    return _session_pooler


def set_session_pooler(bouncer: PgBouncer | None) -> None:
    global _session_pooler
    _session_pooler = bouncer


@contextmanager
def django_through(bouncer: PgBouncer) -> Iterator[None]:
    """Django's default database reached through ``bouncer``, with the pooled settings.

    Every thread's connection shares the settings dict changed here, so connections
    opened from now on (in any thread) go through the pooler; the current thread's
    are closed on the way in and out.
    """
    from django.conf import settings
    from django.db import connections

    from cascadeflow_site.settings import database_behind_pooler

    database = settings.DATABASES["default"]
    saved = {k: database.get(k) for k in ("HOST", "PORT", "DISABLE_SERVER_SIDE_CURSORS")}
    saved_options = dict(database.get("OPTIONS", {}))
    connections.close_all()
    database.update(HOST="127.0.0.1", PORT=str(bouncer.port))
    database_behind_pooler(database)
    try:
        yield
    finally:
        connections.close_all()
        database.update(saved)
        database["OPTIONS"] = saved_options
