"""Faults under load: three server processes, a stalled callback, Redis and PostgreSQL taken away.

    DJANGO_DEBUG=true LITELLM_LOCAL_MODEL_COST_MAP=True .venv/bin/python bench/faults.py \
        [--quick] [--outage refuse|blackhole|both] [--json OUT]

Starts three uvicorn processes of CascadeFlow on a throwaway PostgreSQL
database (created and dropped on 127.0.0.1:5432) and a private Redis database
(127.0.0.1:6379). The servers reach both only through TCP proxies run by this
bench (``bench/fault_proxy.py``, a child process), so an outage is the proxy
cutting every connection and refusing or black-holing new ones: the real
services are never touched. Everything listens on loopback only.

Three tenants are under load the whole time, spread over the three processes:

- **budgeted**: 16-24 requests in flight (``demo/small`` and
  ``cascade/balanced``, streaming or not, several end users). A tenant budget,
  a token budget, daily budgets of their own for two end users and a default
  tier with a daily budget per end user for two others, sized as in
  ``tests/tenants/test_budget_concurrency_several.py`` so that many requests
  are refused with 402. End users are renewed every ``--slot`` seconds, so
  fresh budgets meet their caps in every phase. The token has a generous
  requests-per-minute limit, so the Redis rate limiter is on the path.
- **callback**: a budget and a budget callback served by this bench, properly
  signed; fallback ``degrade``. Three clients, one request every 0.4 s each.
- **steady**: one request at a time; its latency is the isolation measure.

Phases: baseline and callback stall (the callback server answers one byte
every 200 ms), alternating in a few rounds so that anything else slowing the
machine weighs on both alike; then Redis down; database down (each half
refused connections, half silence, unless ``--outage`` says one); recovery.
Afterwards the ledger spool is replayed once (``manage.py
ledger_spool_replay``, what beat does every minute; expired reservations are
*not* reclaimed) and the database is checked.

Targets (exit status 1 when one is missed):

- no 5xx, cut stream or stream error event, except ``503 service_unavailable``
  with ``Retry-After`` for requests that overlapped the database outage;
- no reservation still ``held``; every counter's ``reserved_nanos`` is 0;
- every counter's ``spent_nanos`` equals the sum of the ledger rows it counts
  (tenant, token, end user, tier subject) and stays within its cap;
- every request answered 200 (or refused 402 / 429) has its ledger row, matched
  by ``x-request-id``; no record left in the spool;
- the steady tenant's p99 during the callback stall is within 20 % of baseline.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import math
import os
import random
import secrets
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import textwrap
import time
from collections import Counter, defaultdict
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parent.parent
PG_HOST, PG_PORT = "127.0.0.1", 5432
REDIS_HOST, REDIS_PORT = "127.0.0.1", 6379
PG_ADMIN = f"postgresql://postgres@{PG_HOST}:{PG_PORT}/postgres"
SERVERS = 3
PHASES = ("baseline", "callback stall", "redis down", "database down", "recovery")
DURATIONS = {"full": (30, 30, 25, 10, 25), "quick": (10, 10, 6, 6, 6)}
KINDS = [
    ("demo/small", False),
    ("cascade/balanced", False),
    ("demo/small", True),
    ("cascade/balanced", True),
]
# As in tests/tenants/test_budget_concurrency_several.py: a few worst-case reservations fill
# them. The tenant's and the token's are that test's times 100: a run spends about a fifth
# of them, so the end users' budgets do the refusing and every phase has some.
OWN_DAILY_NANOS = 3_500_000
TIER_DAILY_NANOS = 3_000_000
TOKEN_MONTHLY_NANOS = 1_500_000_000
TENANT_MONTHLY_USD = "2"
CALLBACK_CLIENTS, CALLBACK_INTERVAL_S = 3, 0.4
STEADY_P99_RATIO = 1.2
SLOW_S = 5.0  # a request slower than this is listed (the database connect timeout is 2 s)
# A request that began this soon after the database came back may still have seen it down.
DB_GRACE_S = 1.0

SETUP = textwrap.dedent(
    """
    from core.crypto import encrypt
    from tenants.models import ApiToken, EndUserTier, Tenant
    from tenants.services import budget_create, end_user_get_or_create
    tenant = Tenant.objects.get(slug="budgeted")
    token = ApiToken.objects.get(tenant=tenant)
    ApiToken.objects.filter(pk=token.pk).update(requests_per_minute=100_000)
    tier = EndUserTier.objects.create(tenant=tenant, slug="team", name="Team", is_default=True)
    budget_create(tenant=tenant, scope="token", period="month", limit_nanos={token_limit},
                  token=token)
    budget_create(tenant=tenant, scope="tier", period="day", limit_nanos={tier}, tier=tier)
    for slot in range({slots}):
        for n in (1, 2):
            user = end_user_get_or_create(tenant=tenant, external_id=f"own-{{n}}-{{slot}}")
            budget_create(tenant=tenant, scope="end_user", period="day", limit_nanos={own},
                          end_user=user)
    Tenant.objects.filter(slug="callback").update(
        budget_callback_url="{callback_url}", budget_callback_secret=encrypt("{secret}"),
        budget_callback_timeout_ms=10_000, budget_callback_fallback="degrade",
        budget_callback_cache_seconds=0)
    """
)

COUNTERS_SQL = (
    "SELECT t.slug, b.scope, b.token_id, b.end_user_id, c.subject_id, c.spent_nanos, "
    "c.reserved_nanos, b.limit_nanos * COALESCE(b.block_pct, 100) / 100, c.period_start, "
    "c.period_end, c.tenant_id "
    "FROM tenants_budgetcounter c JOIN tenants_budget b ON b.id = c.budget_id "
    "JOIN tenants_tenant t ON t.id = c.tenant_id ORDER BY c.id"
)


def percentile(values: list[float], p: int) -> float:
    """Interpolated between the two nearest samples (less jumpy than the nearest rank)."""
    if len(values) < 2:
        return values[0] if values else float("nan")
    return statistics.quantiles(values, n=100, method="inclusive")[p - 1]


def utc_now() -> str:
    return datetime.now(UTC).strftime("%H:%M:%S.%f")[:-3]


@dataclass
class Record:
    tenant: str
    phase: str
    server: int
    model: str
    stream: bool
    user: str | None
    started: float  # seconds since the load began
    ended: float = 0.0
    status: int = 0  # 0: no HTTP answer at all
    code: str = ""  # the error code of the JSON body or of the stream's error event
    request_id: str = ""
    retry_after: str = ""
    ended_with: str = ""  # streams: "done", "error" (an error event) or "cut"
    callback: str = ""  # x-cascade-budget-callback
    detail: str = ""
    fault: str = ""  # the outage under way when the request began: "redis refuse", ...
    at: str = ""  # wall-clock time it began (UTC), to find it in the server logs

    @property
    def latency(self) -> float:
        return self.ended - self.started

    @property
    def cause(self) -> str:
        if self.status == 0:
            return "no answer"
        if self.status == 200 and self.ended_with == "cut":
            return "200 stream cut"
        if self.status == 200 and self.ended_with == "error":
            return f"200 stream error {self.code or '-'}"
        if self.status == 200:
            return "200"
        return f"{self.status} {self.code or '-'}"

    @property
    def failed(self) -> bool:
        """A server failure: a 5xx, no answer, or a stream that did not end cleanly."""
        return self.status == 0 or self.status >= 500 or self.ended_with in ("cut", "error")


@dataclass
class Outage:
    target: str
    down_at: float  # seconds since the load began
    up_at: float = math.inf
    down_utc: str = ""
    up_utc: str = ""


@dataclass
class Bench:
    args: argparse.Namespace
    run_id: str = field(default_factory=lambda: secrets.token_hex(4))
    var_dir: Path = field(default_factory=lambda: Path(tempfile.mkdtemp(prefix="cf-faults-")))
    database: str = ""
    redis_db: int = -1
    ports: dict = field(default_factory=dict)
    tokens: dict = field(default_factory=dict)
    secret_key: str = field(default_factory=lambda: secrets.token_urlsafe(50))
    callback_secret: str = field(default_factory=lambda: "whsec_" + secrets.token_hex(16))
    helper: subprocess.Popen | None = None
    servers: list = field(default_factory=list)
    records: list = field(default_factory=list)
    outages: list = field(default_factory=list)
    phase: str = "warm-up"
    fault_mode: str = ""
    t0: float = 0.0
    load_s: float = 0.0
    proxy_stats: dict = field(default_factory=dict)

    # --- environment ---------------------------------------------------------------

    @property
    def spool_dir(self) -> Path:
        return self.var_dir / "spool"

    @property
    def prefix(self) -> str:
        return f"cfbench-{self.run_id}"

    def env(self, *, proxied: bool) -> dict[str, str]:
        base = {
            k: v
            for k, v in os.environ.items()
            if not k.startswith(("CASCADEFLOW_", "DJANGO_", "CELERY_"))
            and k not in ("DATABASE_URL", "REDIS_URL")
        }
        if proxied:
            db_host, redis_host = (
                f"127.0.0.1:{self.ports['db']}",
                f"127.0.0.1:{self.ports['redis']}",
            )
        else:
            db_host, redis_host = f"{PG_HOST}:{PG_PORT}", f"{REDIS_HOST}:{REDIS_PORT}"
        return {
            **base,
            "DJANGO_SETTINGS_MODULE": "cascadeflow_site.settings",
            "DJANGO_DEBUG": "true",
            "DJANGO_SECRET_KEY": self.secret_key,
            "DATABASE_URL": f"postgres://postgres@{db_host}/{self.database}",
            "REDIS_URL": f"redis://{redis_host}/{self.redis_db}",
            "DJANGO_DB_CONNECT_TIMEOUT": "2",
            "CASCADEFLOW_VAR_DIR": str(self.var_dir),
            "CASCADEFLOW_SPOOL_DIR": str(self.spool_dir),
            "CASCADEFLOW_ALLOW_PRIVATE_CALLBACKS": "true",
            "CASCADEFLOW_FREE_TIER_MONTHLY_BUDGET_USD": "",
            "CASCADEFLOW_FREE_TIER_RPM": "",
            "CASCADEFLOW_FREE_TIER_MODELS": "",
            "CASCADEFLOW_DEMO_LATENCY_SCALE": str(self.args.latency_scale),
            "CASCADEFLOW_CALLBACK_MAX_TIMEOUT_MS": "300",
            "CASCADEFLOW_RATELIMIT_PREFIX": f"{self.prefix}:rl",
            "CASCADEFLOW_BREAKER_PREFIX": f"{self.prefix}:cb:",
            "LITELLM_LOCAL_MODEL_COST_MAP": "True",
            "PYTHONUNBUFFERED": "1",
        }

    def manage(self, *args: str, check: bool = True) -> subprocess.CompletedProcess:
        result = subprocess.run(
            [sys.executable, "manage.py", *args],
            cwd=ROOT,
            env=self.env(proxied=False),
            capture_output=True,
            text=True,
            timeout=180,
            check=False,
        )
        if check and result.returncode != 0:
            raise RuntimeError(f"manage.py {args[0]} failed:\n{result.stdout}{result.stderr}")
        return result

    # --- set-up --------------------------------------------------------------------

    def set_up(self) -> None:
        import psycopg
        import redis

        self.database = f"cf_bench_faults_{self.run_id}"
        with psycopg.connect(PG_ADMIN, autocommit=True, connect_timeout=5) as conn:
            conn.execute(f'CREATE DATABASE "{self.database}"')
        empty = []
        for number in range(8, 16):  # a database nobody uses, so the clean-up is ours alone
            with redis.Redis(REDIS_HOST, REDIS_PORT, db=number) as client:
                if client.dbsize() == 0:
                    empty.append(number)
        if not empty:
            raise RuntimeError("no empty Redis database among 8-15 for the bench")
        self.redis_db = random.choice(empty)
        began = time.monotonic()
        self.manage("migrate", "--no-input")
        print(f"  migrated in {time.monotonic() - began:.1f} s", flush=True)
        self.helper = subprocess.Popen(
            [
                sys.executable,
                str(ROOT / "bench" / "fault_proxy.py"),
                "--target",
                f"db={PG_HOST}:{PG_PORT}",
                "--target",
                f"redis={REDIS_HOST}:{REDIS_PORT}",
                "--callback-secret",
                self.callback_secret,
            ],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
            start_new_session=True,
        )
        assert self.helper.stdout is not None
        self.ports = json.loads(self.helper.stdout.readline())
        # The servers boot while the tenants are set up: nothing is cached across requests.
        for index in range(SERVERS):
            self.servers.append(self._spawn(index))
        creating = {
            slug: subprocess.Popen(
                [sys.executable, "manage.py", "create_tenant", slug, "--monthly-budget-usd", usd],
                cwd=ROOT,
                env=self.env(proxied=False),
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
            )
            for slug, usd in (
                ("budgeted", TENANT_MONTHLY_USD),
                ("callback", "10"),
                ("steady", "10"),
            )
        }
        try:
            for slug, process in creating.items():
                out, err = process.communicate(timeout=180)
                if process.returncode != 0:
                    raise RuntimeError(f"create_tenant {slug} failed:\n{out}{err}")
                self.tokens[slug] = out.strip().splitlines()[-1]
        finally:
            for process in creating.values():
                if process.poll() is None:
                    process.kill()
                    process.wait()
        self.manage(
            "shell",
            "-c",
            SETUP.format(
                token_limit=TOKEN_MONTHLY_NANOS,
                tier=TIER_DAILY_NANOS,
                own=OWN_DAILY_NANOS,
                slots=self.slots,
                callback_url=f"http://127.0.0.1:{self.ports['callback']}/budget-decision",
                secret=self.callback_secret,
            ),
        )
        print(f"  tenants ready at {time.monotonic() - began:.1f} s", flush=True)
        for index, (process, port) in enumerate(self.servers):
            self._wait_ready(index, process, port)

    @property
    def slots(self) -> int:
        return int(sum(self.durations) / self.args.slot) + 2

    @property
    def durations(self) -> tuple[float, ...]:
        return tuple(self.args.phase_seconds)

    def _spawn(self, index: int) -> tuple[subprocess.Popen, int]:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        log = open(self.var_dir / f"server-{index}.log", "ab")
        command = [sys.executable, "-m", "uvicorn", "cascadeflow_site.asgi:application"]
        command += ["--host", "127.0.0.1", "--port", str(port), "--no-access-log"]
        process = subprocess.Popen(
            command,
            cwd=ROOT,
            env=self.env(proxied=True),
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        log.close()
        return process, port

    def _wait_ready(self, index: int, process: subprocess.Popen, port: int) -> None:
        deadline = time.monotonic() + 90
        while time.monotonic() < deadline:
            if process.poll() is not None:
                raise RuntimeError(f"server {index} exited:\n{self.log(index)[-3000:]}")
            try:
                if httpx.get(f"http://127.0.0.1:{port}/readyz", timeout=2).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        raise RuntimeError(f"server {index} did not become ready:\n{self.log(index)[-3000:]}")

    def log(self, index: int) -> str:
        path = self.var_dir / f"server-{index}.log"
        return path.read_text(errors="replace") if path.exists() else ""

    def control(self, command: str) -> dict:
        assert self.helper is not None and self.helper.stdin and self.helper.stdout
        self.helper.stdin.write(command + "\n")
        self.helper.stdin.flush()
        answer = json.loads(self.helper.stdout.readline())
        if not answer.get("ok"):
            raise RuntimeError(f"fault proxy refused '{command}': {answer}")
        return answer

    # --- load ----------------------------------------------------------------------

    def url(self, server: int) -> str:
        return f"http://127.0.0.1:{self.servers[server][1]}/v1/chat/completions"

    async def post(
        self,
        client: httpx.AsyncClient,
        tenant: str,
        server: int,
        model: str,
        stream: bool,
        user: str | None,
        *,
        record: bool = True,
    ) -> Record:
        body: dict = {
            "model": model,
            "messages": [
                {
                    "role": "user",
                    "content": f"Explain how a lighthouse works ({secrets.token_hex(3)})",
                }
            ],
            "max_tokens": 80,
            "stream": stream,
        }
        if user:
            body["user"] = user
        started = time.monotonic()
        rec = Record(tenant, self.phase, server, model, stream, user, started - self.t0)
        rec.fault = self.fault_mode
        rec.at = utc_now()
        headers = {"Authorization": f"Bearer {self.tokens[tenant]}"}
        try:
            async with client.stream(
                "POST", self.url(server), json=body, headers=headers
            ) as response:
                rec.status = response.status_code
                rec.request_id = response.headers.get("x-request-id", "")
                rec.retry_after = response.headers.get("retry-after", "")
                rec.callback = response.headers.get("x-cascade-budget-callback", "")
                is_sse = response.headers.get("content-type", "").startswith("text/event-stream")
                if response.status_code == 200 and is_sse:
                    rec.ended_with = "cut"
                    async for line in response.aiter_lines():
                        if line == "data: [DONE]":
                            rec.ended_with = "done"
                        elif line.startswith("data: {") and '"error"' in line:
                            error = json.loads(line[6:]).get("error")
                            if error:
                                rec.ended_with, rec.code = "error", str(error.get("code") or "")
                                rec.detail = str(error.get("message", ""))[:200]
                else:
                    raw = await response.aread()
                    try:
                        payload = json.loads(raw)
                    except ValueError:
                        payload = None
                    if response.status_code != 200:
                        error = (payload or {}).get("error") if isinstance(payload, dict) else None
                        rec.code = str((error or {}).get("code") or "")
                        rec.detail = raw[:200].decode(errors="replace")
                    elif not (isinstance(payload, dict) and payload.get("choices")):
                        rec.ended_with, rec.detail = "cut", raw[:200].decode(errors="replace")
        except httpx.HTTPError as exc:
            if rec.status == 200:
                rec.ended_with = "cut"
            rec.detail = repr(exc)[:200]
        rec.ended = time.monotonic() - self.t0
        if record:
            self.records.append(rec)
        return rec

    async def load(self) -> None:
        # Idle connections expire here before the server's keep-alive timeout (5 s) closes
        # them, so a request is never sent on a connection the server is closing.
        limits = httpx.Limits(
            max_connections=200, max_keepalive_connections=200, keepalive_expiry=2.0
        )
        timeout = httpx.Timeout(60.0, connect=5.0)
        async with httpx.AsyncClient(timeout=timeout, limits=limits) as client:
            self.t0 = time.monotonic()

            async def warm(server: int, tenant: str) -> None:  # not recorded
                for model, stream in KINDS:
                    await self.post(client, tenant, server, model, stream, None, record=False)

            await asyncio.gather(
                *(
                    warm(server, tenant)
                    for server in range(SERVERS)
                    for tenant in ("budgeted", "callback", "steady")
                )
            )
            stop = asyncio.Event()
            self.t0 = time.monotonic()
            tasks = [asyncio.create_task(self.budgeted(client, i, stop)) for i in range(24)]
            tasks += [
                asyncio.create_task(self.callback(client, i, stop)) for i in range(CALLBACK_CLIENTS)
            ]
            tasks.append(asyncio.create_task(self.steady(client, stop)))
            try:
                await self.conduct()
            finally:
                stop.set()
                await asyncio.wait_for(asyncio.gather(*tasks, return_exceptions=True), 90)
            self.load_s = time.monotonic() - self.t0
            self.proxy_stats = await asyncio.to_thread(self.control, "stats")

    async def conduct(self) -> None:
        """Move through the phases, breaking and mending what each one says.

        Baseline and callback stall alternate in ``--rounds`` rounds (as the
        callback isolation test does), so whatever else slows the machine
        meanwhile weighs on both alike; the other phases follow in order.
        """
        base, stall, redis_s, db_s, recovery = self.durations
        for _ in range(self.args.rounds):
            self.enter("baseline")
            await asyncio.sleep(base / self.args.rounds)
            await self.fault("callback drip")
            self.enter("callback stall")
            await asyncio.sleep(stall / self.args.rounds)
            await self.fault("callback answer")
        self.enter("redis down")
        await self.outage("redis", redis_s)
        self.enter("database down")
        await self.outage("db", db_s)
        self.enter("recovery")
        await asyncio.sleep(recovery)

    def enter(self, phase: str) -> None:
        self.phase = phase
        print(f"  {time.monotonic() - self.t0:6.1f} s  {phase}", flush=True)

    async def outage(self, target: str, seconds: float) -> None:
        modes = {"both": ["refuse", "blackhole"]}.get(self.args.outage, [self.args.outage])
        self.outages.append(Outage(target, time.monotonic() - self.t0, down_utc=utc_now()))
        for mode in modes:
            await self.fault(f"{target} {mode}")
            self.fault_mode = f"{target} {mode}"
            await asyncio.sleep(seconds / len(modes))
        await self.fault(f"{target} up")
        self.fault_mode = ""
        self.outages[-1].up_at = time.monotonic() - self.t0
        self.outages[-1].up_utc = utc_now()

    async def fault(self, command: str) -> None:
        await asyncio.to_thread(self.control, command)

    def in_flight_target(self) -> int:
        """16 to 24 requests in flight, rising and falling over 16 seconds."""
        step = int(time.monotonic() - self.t0) % 16
        return 16 + (step if step <= 8 else 16 - step)

    async def budgeted(self, client: httpx.AsyncClient, worker: int, stop: asyncio.Event) -> None:
        rng = random.Random(worker)
        n = worker
        while not stop.is_set():
            if worker >= self.in_flight_target():
                await asyncio.sleep(0.1)
                continue
            slot = int((time.monotonic() - self.t0) / self.args.slot)
            user = rng.choice(
                [f"own-1-{slot}", f"own-2-{slot}", f"tiered-1-{slot}", f"tiered-2-{slot}", None]
            )
            model, stream = KINDS[n % len(KINDS)]
            await self.post(client, "budgeted", n % SERVERS, model, stream, user)
            n += 1

    async def callback(self, client: httpx.AsyncClient, worker: int, stop: asyncio.Event) -> None:
        n = worker
        await asyncio.sleep(worker * CALLBACK_INTERVAL_S / CALLBACK_CLIENTS)
        while not stop.is_set():
            rec = await self.post(client, "callback", n % SERVERS, "demo/small", n % 2 == 1, None)
            n += 1
            await asyncio.sleep(max(0.0, CALLBACK_INTERVAL_S - rec.latency))

    async def steady(self, client: httpx.AsyncClient, stop: asyncio.Event) -> None:
        n = 0
        while not stop.is_set():
            await self.post(client, "steady", n % SERVERS, "demo/small", False, None)
            n += 1

    # --- after the load ------------------------------------------------------------

    def spooled(self) -> int:
        if not self.spool_dir.is_dir():
            return 0
        return sum(
            1
            for path in self.spool_dir.glob("*.jsonl")
            for line in path.read_bytes().split(b"\n")
            if line.strip()
        )

    def drain(self) -> dict:
        deadline = time.monotonic() + 5
        while self.spooled() and time.monotonic() < deadline:
            time.sleep(0.25)
        before = self.spooled()
        replay = self.manage("ledger_spool_replay", check=False)
        return {
            "spooled_before_replay": before,
            "replay_output": (replay.stdout + replay.stderr).strip().splitlines()[-1:],
            "replay_exit": replay.returncode,
            "spooled_after_replay": self.spooled(),
        }

    def check_database(self) -> dict:
        import psycopg

        url = f"postgresql://postgres@{PG_HOST}:{PG_PORT}/{self.database}"
        with psycopg.connect(url) as conn:
            states = dict(
                conn.execute(
                    "SELECT state, count(*) FROM tenants_budgetreservation GROUP BY state"
                ).fetchall()
            )
            held = conn.execute(
                "SELECT request_id, amount_nanos, created_at FROM tenants_budgetreservation "
                "WHERE state = 'held' ORDER BY created_at LIMIT 20"
            ).fetchall()
            counters = []
            for row in conn.execute(COUNTERS_SQL).fetchall():
                slug, scope, token_id, end_user_id, subject_id, spent, reserved, cap = row[:8]
                period_start, period_end, tenant_id = row[8:]
                where = "tenant_id = %s AND created_at >= %s"
                params: list = [tenant_id, period_start]
                if period_end is not None:
                    where, params = where + " AND created_at < %s", [*params, period_end]
                if scope == "token":
                    where, params = where + " AND token_id = %s", [*params, token_id]
                elif scope == "end_user":
                    where, params = where + " AND end_user_id = %s", [*params, end_user_id]
                elif scope == "tier":
                    where, params = where + " AND end_user_id = %s", [*params, subject_id]
                [(ledger,)] = conn.execute(
                    f"SELECT COALESCE(SUM(cost_nanos), 0) FROM routing_usageevent WHERE {where}",
                    params,
                ).fetchall()
                counters.append(
                    {
                        "tenant": slug,
                        "scope": scope,
                        "subject": end_user_id or subject_id or token_id or 0,
                        "spent_nanos": int(spent),
                        "reserved_nanos": int(reserved),
                        "cap_nanos": int(cap),
                        "ledger_nanos": int(ledger),
                    }
                )
            ledger = {
                request_id: (status, http_status)
                for request_id, status, http_status in conn.execute(
                    "SELECT request_id, status, http_status FROM routing_usageevent"
                ).fetchall()
            }
        return {"reservations": states, "held": held, "counters": counters, "ledger": ledger}

    def log_signals(self) -> dict:
        patterns = {
            "ledger rows spooled": "spooling it",
            "admissions refused (database)": "Database unreachable while admitting",
            "Redis unreachable warnings": "Redis unreachable",
            "unhandled errors": "Unhandled error",
            "tracebacks": "Traceback (most recent call last)",
            "spool replay failures": "Ledger spool replay failed",
            "records kept in the log only": "could not be written",
        }
        logs = [self.log(i) for i in range(SERVERS)]
        return {name: sum(log.count(text) for log in logs) for name, text in patterns.items()}

    # --- clean-up ------------------------------------------------------------------

    def tear_down(self, keep_logs: bool) -> Path | None:
        """Stop everything this run started and drop what it created; each step whatever
        became of the others."""
        for step in (self._stop_processes, self._drop_database, self._clear_redis):
            try:
                step()
            except Exception as exc:
                print(f"clean-up: {step.__name__} failed: {exc!r}", file=sys.stderr)
        kept = None
        if keep_logs and self.var_dir.exists():
            kept = Path(tempfile.mkdtemp(prefix=f"cf-faults-{self.run_id}-logs-", dir="/tmp"))
            for path in self.var_dir.glob("server-*.log"):
                shutil.copy2(path, kept / path.name)
            if self.spool_dir.is_dir():
                shutil.copytree(self.spool_dir, kept / "spool")
        shutil.rmtree(self.var_dir, ignore_errors=True)
        return kept

    def _stop_processes(self) -> None:
        for process, _ in self.servers:
            with contextlib.suppress(ProcessLookupError):
                process.terminate()
        for process, _ in self.servers:
            try:
                process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait(timeout=5)
        if self.helper is not None:
            with contextlib.suppress(OSError, ValueError):
                assert self.helper.stdin is not None
                self.helper.stdin.close()
            try:
                self.helper.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self.helper.kill()
                self.helper.wait(timeout=5)

    def _drop_database(self) -> None:
        if self.database:
            import psycopg

            with psycopg.connect(PG_ADMIN, autocommit=True, connect_timeout=5) as conn:
                conn.execute(f'DROP DATABASE IF EXISTS "{self.database}" WITH (FORCE)')

    def _clear_redis(self) -> None:
        """Our keys only: rate limits, breaker, cache and channels, the Celery queue."""
        if self.redis_db < 0:
            return
        import redis

        with redis.Redis(REDIS_HOST, REDIS_PORT, db=self.redis_db) as client:
            for pattern in (f"{self.prefix}:*", "cf:*", "celery", "_kombu.binding*", "unacked*"):
                keys = list(client.scan_iter(match=pattern, count=1000))
                if keys:
                    client.delete(*keys)


# --- report ------------------------------------------------------------------------


def fault_spans(bench: Bench) -> dict[str, float]:
    """Seconds of load spent in each outage mode ("" = none)."""
    modes = {"both": ["refuse", "blackhole"]}.get(bench.args.outage, [bench.args.outage])
    spans: dict[str, float] = defaultdict(float)
    for outage in bench.outages:
        for mode in modes:
            spans[f"{outage.target} {mode}"] += (outage.up_at - outage.down_at) / len(modes)
    spans[""] = bench.load_s - sum(spans.values())
    return spans


def allowed_503(rec: Record, outages: list[Outage]) -> bool:
    return (
        rec.status == 503
        and rec.code == "service_unavailable"
        and rec.retry_after.isdigit()
        and int(rec.retry_after) > 0
        and any(
            o.target == "db" and rec.ended >= o.down_at and rec.started <= o.up_at + DB_GRACE_S
            for o in outages
        )
    )


def report(bench: Bench, after: dict, db: dict) -> tuple[dict, list[tuple[str, bool, str]]]:
    records: list[Record] = bench.records
    phases = list(PHASES)
    causes: dict[str, Counter] = defaultdict(Counter)
    for rec in records:
        causes[rec.cause][rec.phase] += 1
    order = sorted(causes, key=lambda c: (c != "200", c))
    width = max(24, *(len(c) + 2 for c in causes))

    print(
        f"\nbench/faults.py — {SERVERS} processes, {len(records)} requests in {bench.load_s:.0f} s"
    )
    print(
        "phases (s): "
        + ", ".join(f"{p} {s:g}" for p, s in zip(PHASES, bench.durations, strict=True))
        + f"; baseline and stall alternate in {bench.args.rounds} rounds"
        + f"; outages: {bench.args.outage}"
    )
    print(
        "outages (UTC): "
        + ", ".join(f"{o.target} {o.down_utc}-{o.up_utc}" for o in bench.outages)
        + "\n"
    )
    header = f"{'status / cause':<{width}}" + "".join(f"{p:>16}" for p in phases) + f"{'total':>9}"
    print(header)
    print("-" * len(header))
    for cause in order:
        row = causes[cause]
        print(
            f"{cause:<{width}}"
            + "".join(f"{row.get(p, 0):>16}" for p in phases)
            + f"{sum(row.values()):>9}"
        )
    totals = Counter(rec.phase for rec in records)
    print(
        f"{'all requests':<{width}}"
        + "".join(f"{totals.get(p, 0):>16}" for p in phases)
        + f"{len(records):>9}"
    )

    by_tenant: dict[str, Counter] = defaultdict(Counter)
    for rec in records:
        by_tenant[rec.tenant]["served" if rec.cause == "200" else "other"] += 1
    fallbacks = Counter(rec.phase for rec in records if rec.callback == "fallback")
    print(
        "\nper tenant (served / other): "
        + ", ".join(f"{t} {c['served']} / {c['other']}" for t, c in sorted(by_tenant.items()))
    )
    print(
        "callback tenant answered by its fallback: "
        + ", ".join(f"{p} {fallbacks.get(p, 0)}" for p in phases)
    )

    steady = {
        p: [
            r.latency for r in records if r.tenant == "steady" and r.phase == p and r.cause == "200"
        ]
        for p in phases
    }
    print(f"\n{'steady tenant':<16}" + "".join(f"{p:>16}" for p in phases))
    for label, pct in (("p50 ms", 50), ("p99 ms", 99)):
        print(
            f"{label:<16}" + "".join(f"{percentile(steady[p], pct) * 1000:>16.1f}" for p in phases)
        )
    print(f"{'requests':<16}" + "".join(f"{len(steady[p]):>16}" for p in phases))
    modes = ["", *(f"{t} {m}" for t in ("redis", "db") for m in ("refuse", "blackhole"))]
    modes = [m for m in modes if any(r.fault == m for r in records)]
    print(
        "\nlatency p50 / p99 ms while each outage lasts (any status; '-' none):\n"
        + f"{'tenant':<16}"
        + "".join(f"{m or 'no outage':>20}" for m in modes)
    )
    for tenant in ("budgeted", "callback", "steady"):
        cells = []
        for mode in modes:
            during = [r.latency for r in records if r.tenant == tenant and r.fault == mode]
            cells.append(
                f"{percentile(during, 50) * 1000:.0f} / {percentile(during, 99) * 1000:.0f}"
                if during
                else "-"
            )
        print(f"{tenant:<16}" + "".join(f"{c:>20}" for c in cells))
    spans = fault_spans(bench)
    print(
        f"{'requests / s':<16}"
        + "".join(
            f"{sum(1 for r in records if r.fault == m) / spans[m]:>20.1f}"
            if spans[m]
            else f"{'-':>20}"
            for m in modes
        )
    )
    base, stall = percentile(steady[PHASES[0]], 99), percentile(steady[PHASES[1]], 99)
    ratio = stall / base if base else math.inf

    held = db["reservations"].get("held", 0)
    counters = db["counters"]
    diffs = [abs(c["spent_nanos"] - c["ledger_nanos"]) for c in counters]
    max_diff = max(diffs, default=0)
    reserved = [c for c in counters if c["reserved_nanos"] != 0]
    over_cap = [c for c in counters if c["spent_nanos"] > c["cap_nanos"]]
    answered = [r for r in records if r.status in (200, 402, 429) and r.request_id]
    missing = [r for r in answered if r.request_id not in db["ledger"]]
    ours = {r.request_id for r in records if r.request_id}
    print(f"\nreservations: {json.dumps(db['reservations'], sort_keys=True)}; held {held}")
    print(
        f"budget counters: {len(counters)}; ledger vs counters max difference {max_diff} nano-$ "
        f"({sum(1 for d in diffs if d)} differ); reserved left on {len(reserved)}; "
        f"over cap {len(over_cap)}"
    )
    print(
        f"ledger: {len(db['ledger'])} rows; answered requests (200/402/429) {len(answered)}, "
        f"{len(missing)} without a row; rows of requests the client saw fail "
        f"{sum(1 for r in records if r.failed and r.request_id in db['ledger'])}; "
        f"rows not from the recorded load {len(set(db['ledger']) - ours)} (warm-up)"
    )
    print(
        f"spool: {after['spooled_before_replay']} records before the replay, "
        f"{after['spooled_after_replay']} after ({' '.join(after['replay_output'])})"
    )
    proxies, callback = bench.proxy_stats.get("proxies", {}), bench.proxy_stats.get("callback", {})
    print(
        "fault proxy: "
        + ", ".join(
            f"{name} {p['accepted']} connections, {p['cut']} cut" for name, p in proxies.items()
        )
        + f"; callback server: {callback.get('calls', 0)} calls, {callback.get('dripped', 0)} "
        f"dripped, {callback.get('bad_signatures', 0)} badly signed"
    )
    signals = bench.log_signals()
    print("server logs: " + ", ".join(f"{k} {v}" for k, v in signals.items()))

    db_down = [o.down_at for o in bench.outages if o.target == "db"]
    caught = [r for r in records if any(r.started < t < r.ended for t in db_down)]
    caught_ok = [r for r in caught if r.cause == "200"]
    print(
        f"in flight when the database went away: {len(caught)}; answered 200 {len(caught_ok)}, "
        f"{sum(1 for r in caught_ok if r.request_id in db['ledger'])} of them in the ledger"
    )
    slow = sorted((r for r in records if r.latency > SLOW_S), key=lambda r: -r.latency)
    print(f"requests slower than {SLOW_S:g} s: {len(slow)}")
    for r in slow[:5]:
        print(
            f"  {r.latency:5.1f} s  {r.cause:<24} {r.tenant:<9} {r.model} stream={r.stream} "
            f"user={r.user} server {r.server} at {r.at} UTC ({r.fault or r.phase}) {r.request_id}"
        )
    by_id = {r.request_id: r for r in records if r.request_id}
    for request_id, amount, created_at in db["held"][:5]:
        r = by_id.get(request_id)
        seen = f"{r.cause} at {r.at} UTC ({r.fault or r.phase})" if r else "not a recorded request"
        print(
            f"  held: {request_id} {amount} nano-$ since {created_at:%H:%M:%S}; client saw {seen}"
        )
    for r in missing[:5]:
        print(f"  no ledger row: {r.request_id} {r.cause} at {r.at} UTC ({r.fault or r.phase})")
    failures = [r for r in records if r.failed and not allowed_503(r, bench.outages)]
    targets = [
        (
            "no 5xx, cut stream or error event but 503 service_unavailable in the database outage",
            not failures,
            f"{len(failures)} failures"
            + (
                f", e.g. {[(r.cause, r.request_id, r.detail[:80]) for r in failures[:3]]}"
                if failures
                else ""
            ),
        ),
        ("no reservation held", held == 0, f"{held} held"),
        (
            "ledger equal to every budget counter",
            max_diff == 0,
            f"max difference {max_diff} nano-$",
        ),
        ("no counter left reserved", not reserved, f"{len(reserved)} counters"),
        ("no counter over its cap", not over_cap, f"{len(over_cap)} counters"),
        (
            "every answered request (200/402/429) in the ledger",
            not missing,
            f"{len(missing)} of {len(answered)} missing",
        ),
        (
            "spool empty after replay",
            after["spooled_after_replay"] == 0,
            f"{after['spooled_after_replay']} records",
        ),
        (
            "steady p99 in the callback stall within 20 % of baseline",
            ratio <= STEADY_P99_RATIO,
            f"{stall * 1000:.1f} ms / {base * 1000:.1f} ms = {ratio:.2f}"
            + (
                " (under 100 requests a phase: p99 is about the slowest one, a noisy figure)"
                if min(len(steady[PHASES[0]]), len(steady[PHASES[1]])) < 100
                else ""
            ),
        ),
    ]
    print()
    for name, ok, detail in targets:
        print(f"{'PASS' if ok else 'FAIL'}  {name}: {detail}")
    figures = {
        "servers": SERVERS,
        "phases": dict(zip(PHASES, bench.durations, strict=True)),
        "outage_mode": bench.args.outage,
        "outages": [asdict(o) for o in bench.outages],
        "requests": len(records),
        "load_seconds": round(bench.load_s, 1),
        "causes": {c: dict(causes[c]) for c in order},
        "steady_ms": {
            p: {
                "p50": percentile(steady[p], 50) * 1000,
                "p99": percentile(steady[p], 99) * 1000,
                "n": len(steady[p]),
            }
            for p in phases
        },
        "steady_p99_ratio": ratio,
        "steady_latencies_ms": {p: [round(v * 1000, 1) for v in steady[p]] for p in phases},
        "reservations": db["reservations"],
        "held_reservations": [list(map(str, h)) for h in db["held"]],
        "counters": counters,
        "ledger_max_difference_nanos": max_diff,
        "answered": len(answered),
        "answered_without_ledger_row": [r.request_id for r in missing],
        "failures": [asdict(r) for r in failures],
        "slow": [asdict(r) for r in slow],
        "spool": after,
        "server_logs": signals,
        "fault_proxy": bench.proxy_stats,
        "targets": {name: ok for name, ok, _ in targets},
    }
    return figures, targets


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--quick", action="store_true", help="shorter phases (about 60 s in all)")
    parser.add_argument(
        "--phase-seconds",
        type=float,
        nargs=5,
        metavar=("BASE", "STALL", "REDIS", "DB", "RECOVERY"),
        help="the five phases' lengths",
    )
    parser.add_argument(
        "--outage",
        choices=("refuse", "blackhole", "both"),
        default="both",
        help="how Redis and the database go away: refused connections, silence, or half of each",
    )
    parser.add_argument(
        "--rounds", type=int, help="alternations of baseline and callback stall (3; quick 2)"
    )
    parser.add_argument("--slot", type=float, default=6.0, help="seconds before end users renew")
    parser.add_argument("--latency-scale", type=float, default=0.05)
    parser.add_argument("--json", dest="json_out")
    parser.add_argument(
        "--keep-logs", action="store_true", help="copy the server logs to /tmp even on success"
    )
    args = parser.parse_args()
    if args.phase_seconds is None:
        args.phase_seconds = DURATIONS["quick" if args.quick else "full"]
    if args.rounds is None:
        args.rounds = 2 if args.quick else 3

    def interrupted(signum, frame):
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, interrupted)
    bench = Bench(args)
    keep_logs, code = True, 1
    started = time.monotonic()
    try:
        print(f"bench/faults.py: setting up (var dir {bench.var_dir})", flush=True)
        bench.set_up()
        print(
            f"  database {bench.database}, Redis db {bench.redis_db}, proxies {bench.ports}, "
            f"servers {[port for _, port in bench.servers]}",
            flush=True,
        )
        asyncio.run(bench.load())
        after = bench.drain()
        db = bench.check_database()
        figures, targets = report(bench, after, db)
        code = 0 if all(ok for _, ok, _ in targets) else 1
        keep_logs = code != 0 or args.keep_logs
        figures["wall_seconds"] = round(time.monotonic() - started, 1)
        if args.json_out:
            Path(args.json_out).write_text(json.dumps(figures, indent=2, default=str) + "\n")
    except KeyboardInterrupt:
        print("\ninterrupted; cleaning up", file=sys.stderr)
        code = 130
    finally:
        signal.signal(signal.SIGINT, signal.SIG_IGN)  # a second Ctrl-C must not stop the clean-up
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        kept = bench.tear_down(keep_logs)
        if kept:
            print(f"server logs and spool kept in {kept}", file=sys.stderr)
    print(f"wall time {time.monotonic() - started:.0f} s")
    return code


if __name__ == "__main__":
    sys.exit(main())
