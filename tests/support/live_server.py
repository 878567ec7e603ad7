"""CascadeFlow running for real: uvicorn in a subprocess, on SQLite or PostgreSQL.

Tests that need the whole stack (the official OpenAI SDK over HTTP, SSE through
a real ASGI server, the ledger in a real database) start one of these. The
server gets its own database, so what it writes is read back with plain SQL.
"""

from __future__ import annotations

import atexit
import json
import os
import secrets
import shutil
import socket
import sqlite3
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

from tests.support import pgbouncer

ROOT = Path(__file__).resolve().parents[2]
PG_ADMIN_URL = os.environ.get(
    "CASCADEFLOW_TEST_PG_URL", "postgresql://postgres@127.0.0.1:5432/postgres"
)


# One migrated database per backend for the session, copied for each server: a
# PostgreSQL template database, a SQLite file. ``manage.py migrate`` runs once per
# backend instead of once per server (each run is a Django start plus every migration).
_templates: dict[str, str] = {}


def _drop_templates() -> None:
    if "postgresql" in _templates:
        import psycopg

        with psycopg.connect(PG_ADMIN_URL, autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{_templates["postgresql"]}" WITH (FORCE)')
    if "sqlite" in _templates:
        shutil.rmtree(Path(_templates["sqlite"]).parent, ignore_errors=True)
    _templates.clear()


atexit.register(_drop_templates)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def postgres_available() -> bool:
    try:
        import psycopg

        with psycopg.connect(PG_ADMIN_URL, connect_timeout=3):
            return True
    except Exception:
        return False


@dataclass
class LiveServer:
    backend: str  # "sqlite" | "postgresql"
    models: dict[str, Any]
    port: int = field(default_factory=free_port)
    token: str = ""
    database_url: str = ""
    _tmp: tempfile.TemporaryDirectory | None = None
    extra_env: dict[str, str] = field(default_factory=dict)
    _process: subprocess.Popen | None = None
    _others: list[subprocess.Popen] = field(default_factory=list)
    _pg_name: str = ""

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def env(self) -> dict[str, str]:
        return {**self._base_env(), **self.extra_env}

    def _base_env(self) -> dict[str, str]:
        assert self._tmp is not None
        return {
            **os.environ,
            "DATABASE_URL": self.database_url,
            "DATABASE_POOLER": "",  # unless routed through PgBouncer (start)
            "CASCADEFLOW_VAR_DIR": self._tmp.name,
            "CASCADEFLOW_MODELS": json.dumps(self.models),
            "CASCADEFLOW_DEMO_LATENCY_SCALE": "0",
            "LITELLM_LOCAL_MODEL_COST_MAP": "True",
            "DJANGO_SETTINGS_MODULE": "cascadeflow_site.settings",
            "PYTHONUNBUFFERED": "1",
        }

    def manage(self, *args: str, env: dict[str, str] | None = None) -> str:
        result = subprocess.run(
            [sys.executable, "manage.py", *args],
            cwd=ROOT,
            env=self.env() if env is None else env,
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
        )
        if result.returncode != 0:
            raise RuntimeError(f"manage.py {' '.join(args)} failed:\n{result.stderr}")
        return result.stdout

    def _template(self) -> str:
        """The session's migrated database for this backend (built on first use)."""
        if self.backend + ":migrated" not in _templates:
            assert self._tmp is not None
            if self.backend == "postgresql":
                import psycopg

                template = f"cf_live_tpl_{secrets.token_hex(4)}"
                with psycopg.connect(PG_ADMIN_URL, autocommit=True) as conn:
                    conn.execute(f'CREATE DATABASE "{template}"')
                url = PG_ADMIN_URL.rsplit("/", 1)[0] + f"/{template}"
            else:
                template = str(Path(tempfile.mkdtemp(prefix="cf-live-tpl-")) / "live.sqlite3")
                url = f"sqlite:///{template}"
            _templates[self.backend] = template  # dropped at exit, migrated or not
            # Without this server's own extra settings: the template serves every server.
            try:
                self.manage("migrate", "--no-input", env={**self._base_env(), "DATABASE_URL": url})
            except BaseException:
                _drop_templates()
                raise
            _templates[self.backend + ":migrated"] = template
        return _templates[self.backend + ":migrated"]

    def start(self) -> LiveServer:
        self._tmp = tempfile.TemporaryDirectory(prefix="cf-live-")
        if self.backend == "postgresql":
            import psycopg

            self._pg_name = f"cf_live_{secrets.token_hex(4)}"
            self.database_url = PG_ADMIN_URL.rsplit("/", 1)[0] + f"/{self._pg_name}"
            pooler = pgbouncer.session_pooler()
            if pooler is not None:  # the whole session goes through PgBouncer
                with psycopg.connect(PG_ADMIN_URL, autocommit=True) as conn:
                    conn.execute(f'CREATE DATABASE "{self._pg_name}"')
                self.database_url = pooler.url(self.database_url)
                self.extra_env.setdefault("DATABASE_POOLER", "transaction")
                # Migrated through PgBouncer itself (a template database cannot be
                # copied while the pooler holds server connections to it).
                self.manage("migrate", "--no-input")
            else:
                template = self._template()
                with psycopg.connect(PG_ADMIN_URL, autocommit=True) as conn:
                    conn.execute(f'CREATE DATABASE "{self._pg_name}" TEMPLATE "{template}"')
        else:
            path = Path(self._tmp.name) / "live.sqlite3"
            source, copy = sqlite3.connect(self._template()), sqlite3.connect(path)
            try:
                source.backup(copy)
            finally:
                source.close()
                copy.close()
            self.database_url = f"sqlite:///{path}"
        # The server starts while its tenant is created: two Django starts side by side.
        self._process = self._spawn(self.port)
        try:
            tenant = self.manage("create_tenant", f"live-{secrets.token_hex(3)}")
            self.token = tenant.strip().splitlines()[-1]
            self._wait(self._process, self.base_url)
        except BaseException:
            self.stop()
            raise
        return self

    def _spawn(self, port: int, env: dict[str, str] | None = None) -> subprocess.Popen:
        assert self._tmp is not None
        log = open(Path(self._tmp.name) / "server.log", "a")
        command = [sys.executable, "-m", "uvicorn", "cascadeflow_site.asgi:application"]
        command += ["--host", "127.0.0.1", "--port", str(port), "--no-access-log"]
        return subprocess.Popen(
            command,
            cwd=ROOT,
            env={**self.env(), **(env or {})},
            stdout=log,
            stderr=subprocess.STDOUT,
        )

    def _wait(self, process: subprocess.Popen, base_url: str) -> None:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            if process.poll() is not None:
                raise RuntimeError(f"server exited:\n{self.log()}")
            try:
                if httpx.get(f"{base_url}/healthz", timeout=1).status_code == 200:
                    return
            except httpx.HTTPError:
                time.sleep(0.1)
        raise RuntimeError(f"server did not start:\n{self.log()}")

    def another_process(self, env: dict[str, str] | None = None) -> str:
        """Start a second server process on the same database; returns its base URL.

        ``env`` overrides the environment of that process alone (a database it
        cannot reach, say)."""
        (base_url,) = self.other_processes(env or {})
        return base_url

    def other_processes(self, *envs: dict[str, str]) -> list[str]:
        """``another_process`` for each of ``envs``, started side by side; their base URLs."""
        started = []
        for env in envs:
            port = free_port()
            process = self._spawn(port, env)
            self._others.append(process)
            started.append((process, f"http://127.0.0.1:{port}"))
        for process, base_url in started:
            self._wait(process, base_url)
        return [base_url for _, base_url in started]

    def log(self) -> str:
        assert self._tmp is not None
        return (Path(self._tmp.name) / "server.log").read_text()

    def openai_client(self):
        """The official SDK pointed at this server with its token (no retries: a test
        sees the first answer)."""
        import openai

        return openai.OpenAI(
            base_url=f"{self.base_url}/v1", api_key=self.token, max_retries=0, timeout=30
        )

    def query(self, sql: str, params: tuple = ()) -> list[tuple]:
        """Read the server's database directly (``%s`` placeholders)."""
        if self.backend == "postgresql":
            import psycopg

            with psycopg.connect(self.database_url) as conn:
                return conn.execute(sql, params).fetchall()
        with sqlite3.connect(self.database_url.removeprefix("sqlite:///")) as conn:
            return conn.execute(sql.replace("%s", "?"), params).fetchall()

    def execute(self, sql: str, params: tuple = ()) -> None:
        """Write to the server's database directly (``%s`` placeholders), committed."""
        if self.backend == "postgresql":
            import psycopg

            with psycopg.connect(self.database_url) as conn:
                conn.execute(sql, params)
            return
        with sqlite3.connect(self.database_url.removeprefix("sqlite:///")) as conn:
            conn.execute(sql.replace("%s", "?"), params)

    def stop(self) -> None:
        for process in [self._process, *self._others]:
            if process is None:
                continue
            process.terminate()
            try:
                process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                process.kill()
        if self._pg_name:
            import psycopg

            with psycopg.connect(PG_ADMIN_URL, autocommit=True) as conn:
                conn.execute(f'DROP DATABASE IF EXISTS "{self._pg_name}" WITH (FORCE)')
        if self._tmp is not None:
            self._tmp.cleanup()
