"""Gateway overhead: CascadeFlow vs LiteLLM's proxy vs the upstream alone, and what
observability (Prometheus metrics, OpenTelemetry traces) adds to CascadeFlow's.

Run from the repository root with the project's virtualenv::

    .venv/bin/python bench/overhead.py --json bench/results/overhead.json

``--ref HEAD`` (or any commit) benchmarks CascadeFlow as committed, exported
with ``git archive`` to a temporary directory, instead of the working tree;
useful when the working tree is being edited. ``--help`` lists the options
(rounds, seconds or requests per segment, warm-up, workers, database).

What it does, in one run on one machine:

1. Starts the fake OpenAI upstream (``tests/support/fake_upstream.py``, instant answers).
2. Starts CascadeFlow (uvicorn, ``--loop uvloop --http httptools``, DEBUG off,
   ``--workers`` processes, default 1) on a throwaway database: PostgreSQL
   ``cascadeflow_bench`` on 127.0.0.1 (dropped and recreated, dropped again at
   exit) or, if PostgreSQL is unreachable, SQLite in a temporary directory;
   ``--database-url`` uses an existing database instead. The model
   ``bench-model`` points at the fake upstream; a fresh tenant's token is used,
   so every request goes through token auth and writes its ledger row.
3. Starts LiteLLM's proxy (``litellm[proxy]==1.106.12``, installed into
   ``bench/.litellm-proxy-venv`` if missing) with one worker, uvloop (its CLI's
   default) and httptools, no database, a master key, the same model pointing
   at the same fake upstream, ``LITELLM_LOCAL_MODEL_COST_MAP=True`` and no
   network access beyond 127.0.0.1.
4. Sends the same non-streaming chat completion to the three targets with one
   load generator (a separate process: raw asyncio streams, HTTP/1.1
   keep-alive, one connection per concurrent worker, closed loop) at
   concurrency 1 and 16. After a warm-up, targets are measured in short
   alternating segments (the order rotates every round) so machine noise hits
   all of them alike. Latency is client-side, request written to last byte read.
5. Checks that CascadeFlow wrote exactly one ledger row (``routing_usageevent``)
   per successful request (exit status 1 if not), then prints p50/p99/throughput per target, the
   latency CascadeFlow and LiteLLM add over the upstream alone, and
   CascadeFlow/LiteLLM ratios against the targets (added p50 @16 <= 0.5x,
   throughput @16 >= 2x). It also reports each server's CPU time per request
   (from /proc; CascadeFlow's PostgreSQL backends separately) and the load
   generator's own CPU per request. ``--json OUT`` writes every figure.

The cost of observability (on by default; ``--no-observability`` skips it):
two more CascadeFlow servers, same code and database, each with its own
tenant, join the alternating segments as targets of their own:

- "observability off": ``CASCADEFLOW_METRICS=false``, no ``OTEL_*`` variable;
- "observability on": Prometheus metrics (a fresh ``PROMETHEUS_MULTIPROC_DIR``)
  and OpenTelemetry tracing, every span sampled (``OTEL_TRACES_SAMPLER=always_on``)
  and exported over OTLP/HTTP (protobuf) by the SDK's BatchSpanProcessor, with
  its default settings, to a sink the script starts (``overhead.py _sink``: a
  small HTTP server that answers 200 to ``POST /v1/traces`` and decodes and
  counts the spans).

The main "CascadeFlow" target (metrics on, tracing off, as deployed by default)
is the middle point, "metrics only". The report gives added p50/p99 over the
upstream at concurrency 1 and 16, throughput and CPU per request for the three,
the ratio ``added p50 @16 (on) / added p50 @16 (off)`` against its target
(<= 1.15: within 15 %), per round too, and the spans the sink received: one
server span per request answered by "observability on", else exit status 1.
No ``OTEL_*`` or ``PROMETHEUS_MULTIPROC_DIR`` variable of the caller reaches
any CascadeFlow server.

``--profile production`` measures a production tenant instead, one feature at a
time: six CascadeFlow servers side by side (same code and database, a tenant
each), from the light configuration (1 worker, no Redis, metrics off) through
+ Redis, + rate limits and tiers (plan tier, token and end-user tier rpm/tpm),
+ three budgets (tenant, token, end user), + metrics and tracing, to + a second
worker: everything on, the target compared with LiteLLM. Every request names an
end user. It reports each step's added latency, throughput and CPU against
LiteLLM's and what it adds to the step before, and the production targets
(everything on: added p50 @16 <= 0.3x LiteLLM's, throughput @16 >= 3x; a second
worker >= 1.6x one worker's throughput @16). It needs Redis (``--redis-url`` or
``REDIS_URL``).

Every process the script starts runs in its own process group and is stopped
on exit, on errors and on Ctrl-C. Only 127.0.0.1 is contacted (plus PyPI, once,
if the LiteLLM proxy venv has to be installed).

The default run (5 rounds x 2 concurrencies x 5 targets x 4 s) takes about
5 minutes on an idle machine (3 minutes with ``--no-observability``), plus
~35 s the first time to install the LiteLLM proxy venv.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import datetime as dt
import io
import json
import math
import os
import platform
import secrets
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from benchenv import FREE_TIER_UNLIMITED

REPO = Path(__file__).resolve().parent.parent
PROJECT_PYTHON = REPO / ".venv" / "bin" / "python"
PROXY_VENV = REPO / "bench" / ".litellm-proxy-venv"
LITELLM_VERSION = "1.106.12"
HOST = "127.0.0.1"
MODEL = "bench-model"
UPSTREAM_KEY = "sk-bench-upstream"
LITELLM_MASTER_KEY = "sk-bench-master"
PG_ADMIN_DSN = "host=127.0.0.1 port=5432 user=postgres dbname=postgres connect_timeout=3"
PG_BENCH_DB = "cascadeflow_bench"
PG_BENCH_URL = f"postgres://postgres@127.0.0.1:5432/{PG_BENCH_DB}"
EXPECTED_CONTENT = "Hello from the fake upstream."
CHAT_BODY = json.dumps(
    {
        "model": MODEL,
        "messages": [
            {"role": "system", "content": "You are a terse assistant."},
            {"role": "user", "content": "Say hello."},
        ],
        "max_tokens": 16,
    },
    separators=(",", ":"),
).encode()
CONCURRENCIES = (1, 16)
TARGET_ADDED_P50_RATIO = 0.5  # CascadeFlow's added p50 @16 at most half LiteLLM's
TARGET_THROUGHPUT_RATIO = 2.0  # CascadeFlow's throughput @16 at least twice LiteLLM's
# Observability (metrics + every span exported) may add at most 15 % to the added p50 @16.
TARGET_OBSERVABILITY_RATIO = 1.15
OBS_TARGET_KEY = "observability_added_p50_c16_ratio_le_1.15"
OBSERVABILITY_TARGETS = ("cf_obs_off", "cf_obs_on")
OBSERVABILITY_LABELS = {
    "cf_obs_off": "CascadeFlow, observability off",
    "cf_obs_on": "CascadeFlow, observability on",
}

# --profile production: the added cost of each feature a production tenant has, one
# CascadeFlow server per step, each step adding one feature to the one before (its own
# tenant each). "cascadeflow" (the target compared with LiteLLM) is the last step: all on.
PRODUCTION_USER = "bench-end-user"
PRODUCTION_BODY = json.dumps(
    {**json.loads(CHAT_BODY), "user": PRODUCTION_USER}, separators=(",", ":")
).encode()
TARGET_PRODUCTION_ADDED_P50_RATIO = 0.3  # everything on: added p50 @16 <= 0.3x LiteLLM's
TARGET_PRODUCTION_THROUGHPUT_RATIO = 3.0  # everything on: throughput @16 >= 3x LiteLLM's
TARGET_SECOND_WORKER_RATIO = 1.6  # two workers on two cores: >= 1.6x one worker's throughput
# Limits high enough never to refuse a benchmark request: they are counted, not hit.
PRODUCTION_RPM = 100_000_000
PRODUCTION_TPM = 1_000_000_000
PRODUCTION_BUDGET_NANOS = 10**18  # a billion dollars a month: reserved and settled, never hit


@dataclass(frozen=True)
class Step:
    """One CascadeFlow server of the production profile."""

    label: str
    added: str  # what this step adds to the previous one
    workers: int = 1
    redis: bool = False
    limits: bool = False  # plan tier rpm/tpm, token rpm/tpm, end-user tier rpm/tpm
    budgets: bool = False  # tenant, token and end-user monthly budgets
    observability: bool = False  # metrics + every span exported over OTLP/HTTP


PRODUCTION_STEPS: dict[str, Step] = {
    "p_light": Step("light (1 worker, no Redis, metrics off)", "baseline"),
    "p_redis": Step("+ Redis", "REDIS_URL (channel layer, live publishing, cache)", redis=True),
    "p_limits": Step(
        "+ rate limits and tiers",
        "plan tier, token and end-user tier rpm/tpm",
        redis=True,
        limits=True,
    ),
    "p_budgets": Step(
        "+ 3 budgets",
        "tenant, token and end-user monthly budgets",
        redis=True,
        limits=True,
        budgets=True,
    ),
    "p_obs": Step(
        "+ metrics and tracing (1 worker)",
        "Prometheus metrics, OTLP export of every span",
        redis=True,
        limits=True,
        budgets=True,
        observability=True,
    ),
    "cascadeflow": Step(
        "+ second worker (everything on)",
        "a second uvicorn worker",
        workers=2,
        redis=True,
        limits=True,
        budgets=True,
        observability=True,
    ),
}

# ``--baseline REF``: the step it is run as, at REF, beside the code under test.
BASELINE, BASELINE_STEP = "p_baseline", "p_obs"

# Run with ``manage.py shell -c`` against the bench database: gives one tenant (and its
# token, and the end user PRODUCTION_USER) the features of a step. argv-free: formatted in.
PRODUCTION_SETUP = """
from tenants.enums import BudgetPeriod, BudgetScope
from tenants.models import ApiToken, EndUserTier, Tenant, Tier
from tenants.services import budget_create, end_user_get_or_create, token_hash
tenant = Tenant.objects.get(slug={slug!r})
token = ApiToken.objects.get(token_hash=token_hash({token!r}))
if {limits!r}:
    tier, _ = Tier.objects.get_or_create(
        slug="bench-production",
        defaults=dict(name="Bench production", requests_per_minute={rpm}, tokens_per_minute={tpm}),
    )
    Tenant.objects.filter(pk=tenant.pk).update(tier=tier)
    ApiToken.objects.filter(pk=token.pk).update(requests_per_minute={rpm}, tokens_per_minute={tpm})
    EndUserTier.objects.create(
        tenant=tenant, slug="standard", name="Standard", requests_per_minute={rpm},
        tokens_per_minute={tpm}, is_default=True,
    )
user = end_user_get_or_create(tenant=tenant, external_id={user!r})
if {budgets!r}:
    for scope, extra in (
        (BudgetScope.TENANT, {{}}), (BudgetScope.TOKEN, {{"token": token}}),
        (BudgetScope.END_USER, {{"end_user": user}}),
    ):
        budget_create(
            tenant=tenant, scope=scope, period=BudgetPeriod.MONTH, limit_nanos={limit}, **extra
        )
print("ok")
"""


LITELLM_CONFIG = """\
# Generated by bench/overhead.py: LiteLLM proxy in front of the fake upstream.
model_list:
  - model_name: {model}
    litellm_params:
      model: openai/{model}
      api_base: http://127.0.0.1:{upstream_port}/v1
      api_key: {upstream_key}
      input_cost_per_token: 0.000001
      output_cost_per_token: 0.000002
litellm_settings:
  num_retries: 0
  request_timeout: 120
general_settings:
  master_key: {master_key}
"""


# =====================================================================================
# Load generator (runs in its own process: ``overhead.py _loadgen SPEC``)
# =====================================================================================


def first_token_in(body: bytes) -> bool:
    """Whether a server-sent event stream (as far as it has come) holds a chunk whose
    choices carry content: the first token."""
    for event in body.split(b"\n\n")[:-1]:  # complete events only
        for line in event.split(b"\n"):
            if not line.startswith(b"data:") or line[5:].strip() == b"[DONE]":
                continue
            with contextlib.suppress(ValueError):
                data = json.loads(line[5:])
                if any((c.get("delta") or {}).get("content") for c in data.get("choices") or []):
                    return True
    return False


async def _read_response(
    reader: asyncio.StreamReader, first_token_at: list[int] | None = None
) -> tuple[int, bytes, bool]:
    """Read one HTTP/1.1 response; return (status, body, server_closes).

    With ``first_token_at``, the time (``perf_counter_ns``) when the (chunked) body read so
    far first holds the first token of a stream (``first_token_in``) is appended to it."""
    head = await reader.readuntil(b"\r\n\r\n")
    status = int(head[9:12])
    length: int | None = None
    chunked = False
    closes = False
    for line in head.split(b"\r\n")[1:]:
        name, _, value = line.partition(b":")
        name = name.strip().lower()
        if name == b"content-length":
            length = int(value)
        elif name == b"transfer-encoding":
            chunked = b"chunked" in value.lower()
        elif name == b"connection":
            closes = b"close" in value.lower()
    if chunked:
        body = bytearray()
        while True:
            size = int((await reader.readuntil(b"\r\n")).split(b";")[0], 16)
            if size == 0:
                while await reader.readuntil(b"\r\n") != b"\r\n":
                    pass  # trailers
                break
            body += (await reader.readexactly(size + 2))[:-2]
            if first_token_at is not None and not first_token_at and first_token_in(body):
                first_token_at.append(time.perf_counter_ns())
        return status, bytes(body), closes
    if length is not None:
        return status, await reader.readexactly(length), closes
    return status, await reader.read(), True


async def _loadgen(spec: dict[str, Any]) -> dict[str, Any]:
    port: int = spec["port"]
    request: bytes = spec["request"].encode("latin-1")
    concurrency: int = spec["concurrency"]
    duration: float | None = spec.get("duration")
    remaining = [spec.get("requests") or 0]
    latencies: list[int] = []
    ttfts: list[int] = []  # time to the first token, with spec["ttft"] (streams)
    counts = {"ok": 0, "errors": 0}
    error_samples: list[str] = []
    start = asyncio.Event()
    deadline = [0.0]

    def more() -> bool:
        if duration is not None:
            return time.perf_counter() < deadline[0]
        if remaining[0] <= 0:
            return False
        remaining[0] -= 1
        return True

    async def connect() -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        reader, writer = await asyncio.open_connection(HOST, port)
        sock = writer.get_extra_info("socket")
        if sock is not None:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        return reader, writer

    async def worker(
        conn: tuple[asyncio.StreamReader, asyncio.StreamWriter],
    ) -> None:
        reader, writer = conn
        await start.wait()
        while more():
            t0 = time.perf_counter_ns()
            first: list[int] | None = [] if spec.get("ttft") else None
            try:
                writer.write(request)
                status, body, closes = await _read_response(reader, first)
            except (OSError, asyncio.IncompleteReadError, ValueError) as exc:
                counts["errors"] += 1
                if len(error_samples) < 3:
                    error_samples.append(f"{type(exc).__name__}: {exc}")
                writer.close()
                reader, writer = await connect()
                continue
            latencies.append((time.perf_counter_ns() - t0) // 1000)
            if first is not None:
                if first:
                    ttfts.append((first[0] - t0) // 1000)
                elif status == 200:
                    status = -1  # a stream with no token: counted as an error
                    body = b"no token in the stream: " + body[:200]
            if status == 200:
                counts["ok"] += 1
            else:
                counts["errors"] += 1
                if len(error_samples) < 3:
                    error_samples.append(f"HTTP {status}: {body[:300]!r}")
            if closes:
                writer.close()
                reader, writer = await connect()
        writer.close()

    conns = [await connect() for _ in range(concurrency)]
    tasks = [asyncio.create_task(worker(c)) for c in conns]
    await asyncio.sleep(0)
    cpu_start = time.process_time()
    t_start = time.perf_counter()
    deadline[0] = t_start + (duration or 0)
    start.set()
    await asyncio.gather(*tasks)
    elapsed = time.perf_counter() - t_start
    cpu = time.process_time() - cpu_start
    return {
        "latencies_us": latencies,
        "ttft_us": ttfts,
        "ok": counts["ok"],
        "errors": counts["errors"],
        "error_samples": error_samples,
        "elapsed_s": elapsed,
        "client_cpu_s": cpu,
    }


def loadgen_main(raw_spec: str) -> None:
    spec = json.loads(raw_spec)
    try:
        import uvloop  # cheaper event loop when available (the project venv has it)

        runner: Callable[[Any], Any] = uvloop.run
    except ImportError:
        runner = asyncio.run
    result = runner(_loadgen(spec))
    # A file, not stdout: the result can be megabytes and must arrive whole.
    Path(spec["out"]).write_text(json.dumps(result))


# =====================================================================================
# OTLP sink (runs in its own process: ``overhead.py _sink SPEC``)
# =====================================================================================


def sink_main(raw_spec: str) -> None:
    """A stand-in for an OpenTelemetry collector: answers 200 to ``POST /v1/traces``
    (OTLP over HTTP, protobuf, gzip or not) and counts the spans received, by kind;
    ``GET /counts`` returns the tallies as JSON."""
    import gzip
    import threading
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
        ExportTraceServiceRequest,
        ExportTraceServiceResponse,
    )

    spec = json.loads(raw_spec)
    lock = threading.Lock()
    counts: dict[str, Any] = {"posts": 0, "spans": 0, "bytes": 0, "bad": 0, "by_kind": {}}
    ack = ExportTraceServiceResponse().SerializeToString()
    kinds = {
        0: "unspecified",
        1: "internal",
        2: "server",
        3: "client",
        4: "producer",
        5: "consumer",
    }

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"  # keep-alive, like a collector

        def log_message(self, *args: Any) -> None:
            pass

        def _answer(self, status: int, body: bytes, content_type: str) -> None:
            self.send_response(status)
            self.send_header("Content-Type", content_type)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def do_POST(self) -> None:
            body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
            if self.path != "/v1/traces":
                self._answer(404, b"", "text/plain")
                return
            try:
                if self.headers.get("Content-Encoding", "").lower() == "gzip":
                    body = gzip.decompress(body)
                message = ExportTraceServiceRequest.FromString(body)
            except Exception:
                with lock:
                    counts["bad"] += 1
                self._answer(400, b"", "text/plain")
                return
            tally: dict[str, int] = {}
            for resource_spans in message.resource_spans:
                for scope_spans in resource_spans.scope_spans:
                    for span in scope_spans.spans:
                        kind = kinds.get(span.kind, str(span.kind))
                        tally[kind] = tally.get(kind, 0) + 1
            with lock:
                counts["posts"] += 1
                counts["bytes"] += len(body)
                for kind, n in tally.items():
                    counts["spans"] += n
                    counts["by_kind"][kind] = counts["by_kind"].get(kind, 0) + n
            self._answer(200, ack, "application/x-protobuf")

        def do_GET(self) -> None:
            if self.path != "/counts":
                self._answer(404, b"", "text/plain")
                return
            with lock:
                body = json.dumps({**counts, "cpu_s": time.process_time() - cpu_at_start}).encode()
            self._answer(200, body, "application/json")

    cpu_at_start = time.process_time()  # imports are not the cost of receiving spans
    server = ThreadingHTTPServer((HOST, spec["port"]), Handler)
    server.daemon_threads = True
    server.serve_forever()


def sink_counts(port: int) -> dict[str, Any]:
    status, body = http_request(port, "GET", "/counts")
    if status != 200:
        raise RuntimeError(f"OTLP sink answered {status}")
    return json.loads(body)


# =====================================================================================
# Processes
# =====================================================================================


class Processes:
    """Every process the benchmark starts, each in its own process group."""

    def __init__(self, log_dir: Path):
        self.log_dir = log_dir
        self.procs: list[tuple[str, subprocess.Popen[bytes]]] = []

    def start(
        self, name: str, cmd: list[str], *, env: dict[str, str], cwd: Path
    ) -> subprocess.Popen[bytes]:
        log = (self.log_dir / f"{name}.log").open("wb")
        proc = subprocess.Popen(
            cmd,
            env=env,
            cwd=cwd,
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # own process group: Ctrl-C goes to us, we stop it
        )
        log.close()
        self.procs.append((name, proc))
        return proc

    def run(
        self, name: str, cmd: list[str], *, env: dict[str, str], cwd: Path, timeout: float
    ) -> tuple[int, str, str]:
        """Run to completion (tracked, so Ctrl-C still stops it); return rc, stdout, stderr."""
        proc = subprocess.Popen(
            cmd,
            env=env,
            cwd=cwd,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            start_new_session=True,
        )
        self.procs.append((name, proc))
        try:
            out, err = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            self._stop(proc)
            raise RuntimeError(f"{name} did not finish within {timeout:.0f} s") from None
        except BaseException:  # Ctrl-C, SIGTERM: stop it before forgetting it
            self._stop(proc)
            raise
        finally:
            self.procs.remove((name, proc))
        return proc.returncode, out.decode(errors="replace"), err.decode(errors="replace")

    def log_tail(self, name: str, lines: int = 30) -> str:
        path = self.log_dir / f"{name}.log"
        if not path.exists():
            return ""
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])

    @staticmethod
    def _signal_group(proc: subprocess.Popen[bytes], sig: int) -> None:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(proc.pid, sig)

    def _stop(self, proc: subprocess.Popen[bytes], grace: float = 10.0) -> None:
        self._signal_group(proc, signal.SIGTERM)
        try:
            proc.wait(timeout=grace)
        except subprocess.TimeoutExpired:
            pass
        # Workers of a multi-process server may outlive their supervisor.
        self._signal_group(proc, signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(timeout=5)

    def stop_all(self) -> None:
        while self.procs:
            _, proc = self.procs.pop()
            self._stop(proc)


def _raise_system_exit(signum: int, _frame: Any) -> None:
    raise SystemExit(128 + signum)


def free_port() -> int:
    with socket.socket() as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]


def cpu_snapshot(pgid: int, db_name: str | None) -> tuple[float, float]:
    """CPU seconds (user+system, all threads) used so far by the live processes of a
    process group, and by the PostgreSQL backends connected to ``db_name``."""
    group = backends = 0
    marker = f" {db_name} ".encode() if db_name else None
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            with open(f"/proc/{entry.name}/stat", "rb") as f:
                stat = f.read()
            fields = stat[stat.rindex(b")") + 2 :].split()
            ticks = int(fields[11]) + int(fields[12])
            if int(fields[2]) == pgid:
                group += ticks
            elif marker is not None and stat[stat.index(b"(") + 1 :].startswith(b"postgres"):
                with open(f"/proc/{entry.name}/cmdline", "rb") as f:
                    if marker in f.read():
                        backends += ticks
        except (OSError, ValueError):
            continue
    hz = os.sysconf("SC_CLK_TCK")
    return group / hz, backends / hz


# =====================================================================================
# HTTP helpers (setup and sanity checks only; measurements use the load generator)
# =====================================================================================


def http_request(
    port: int,
    method: str,
    path: str,
    *,
    body: bytes | None = None,
    auth: str | None = None,
    timeout: float = 10.0,
) -> tuple[int, bytes]:
    import http.client

    conn = http.client.HTTPConnection(HOST, port, timeout=timeout)
    headers = {"Content-Type": "application/json"} if body is not None else {}
    if auth:
        headers["Authorization"] = f"Bearer {auth}"
    try:
        conn.request(method, path, body=body, headers=headers)
        response = conn.getresponse()
        return response.status, response.read()
    finally:
        conn.close()


def wait_until_ready(
    procs: Processes,
    name: str,
    proc: subprocess.Popen[bytes],
    port: int,
    path: str,
    *,
    timeout: float = 180.0,
) -> float:
    started = time.monotonic()
    while True:
        if proc.poll() is not None:
            raise RuntimeError(
                f"{name} exited with code {proc.returncode}:\n{procs.log_tail(name)}"
            )
        with contextlib.suppress(OSError):
            status, _ = http_request(port, "GET", path, timeout=5)
            if status == 200:
                return time.monotonic() - started
        if time.monotonic() - started > timeout:
            raise RuntimeError(f"{name} not ready after {timeout:.0f} s:\n{procs.log_tail(name)}")
        time.sleep(0.25)


# =====================================================================================
# Setup
# =====================================================================================


@dataclass
class Target:
    key: str
    label: str
    port: int
    auth: str
    pgid: int
    path: str = "/v1/chat/completions"
    body: bytes = CHAT_BODY

    def raw_request(self) -> bytes:
        head = (
            f"POST {self.path} HTTP/1.1\r\n"
            f"Host: {HOST}:{self.port}\r\n"
            f"Authorization: Bearer {self.auth}\r\n"
            "Content-Type: application/json\r\n"
            "Accept: application/json\r\n"
            f"Content-Length: {len(self.body)}\r\n\r\n"
        )
        return head.encode() + self.body


@dataclass
class Database:
    url: str
    description: str
    cleanup: Callable[[], None] | None = None
    pg_name: str | None = None  # to attribute PostgreSQL backends' CPU to CascadeFlow


def prepare_database(
    database_url: str | None, tmp: Path, keep: bool, name: str = PG_BENCH_DB
) -> Database:
    if database_url:
        scheme = database_url.split(":", 1)[0]
        pg_name = (
            database_url.rsplit("/", 1)[-1].split("?")[0] if scheme.startswith("postgres") else None
        )
        return Database(database_url, f"given by --database-url ({scheme})", pg_name=pg_name)
    try:
        import psycopg

        with psycopg.connect(PG_ADMIN_DSN, autocommit=True) as conn:
            version = conn.execute("SHOW server_version").fetchone()[0]
            conn.execute(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")
            conn.execute(f"CREATE DATABASE {name}")
    except Exception as exc:  # ImportError, connection refused, auth...
        path = tmp / "bench.sqlite3"
        print(f"PostgreSQL unavailable ({type(exc).__name__}: {exc}); falling back to SQLite.")
        return Database(f"sqlite:///{path}", f"SQLite (fallback, {path})")

    def drop() -> None:
        with psycopg.connect(PG_ADMIN_DSN, autocommit=True) as conn:
            conn.execute(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")

    return Database(
        PG_BENCH_URL.rsplit("/", 1)[0] + f"/{name}",
        f"PostgreSQL {version} on 127.0.0.1, throwaway database '{name}'",
        None if keep else drop,
        name,
    )


def ensure_litellm_proxy_venv(procs: Processes) -> str:
    """Create bench/.litellm-proxy-venv with litellm[proxy]==LITELLM_VERSION if missing."""
    python = PROXY_VENV / "bin" / "python"
    check = [
        str(python),
        "-c",
        "import importlib.metadata as m; print(m.version('litellm'));"
        "import litellm.proxy.proxy_server, uvloop, httptools",
    ]
    env = {**os.environ, "LITELLM_LOCAL_MODEL_COST_MAP": "True"}
    if python.exists():
        rc, out, _ = procs.run("litellm-check", check, env=env, cwd=REPO, timeout=120)
        if rc == 0 and out.strip().splitlines()[0] == LITELLM_VERSION:
            return LITELLM_VERSION
    print(f"Installing litellm[proxy]=={LITELLM_VERSION} into {PROXY_VENV} ...", flush=True)
    if not python.exists():
        rc, out, err = procs.run(
            "venv", [sys.executable, "-m", "venv", str(PROXY_VENV)], env=env, cwd=REPO, timeout=300
        )
        if rc != 0:
            raise RuntimeError(f"could not create {PROXY_VENV}:\n{out}\n{err}")
    install = [
        str(python),
        "-m",
        "pip",
        "install",
        "--quiet",
        "--disable-pip-version-check",
        f"litellm[proxy]=={LITELLM_VERSION}",
        "uvloop",
        "httptools",
    ]
    rc, out, err = procs.run("pip", install, env=env, cwd=REPO, timeout=900)
    if rc != 0:
        raise RuntimeError(f"pip install failed:\n{out[-3000:]}\n{err[-3000:]}")
    rc, out, err = procs.run("litellm-check", check, env=env, cwd=REPO, timeout=120)
    if rc != 0 or out.strip().splitlines()[0] != LITELLM_VERSION:
        raise RuntimeError(f"LiteLLM proxy venv check failed:\n{out}\n{err}")
    return LITELLM_VERSION


def cascadeflow_env(
    db: Database, tmp: Path, upstream_port: int, redis_url: str | None
) -> dict[str, str]:
    # Only the settings below: nothing inherited from the caller's environment.
    dropped = (
        "CASCADEFLOW_",
        "DJANGO_",
        "DATABASE_URL",
        "REDIS_URL",
        "CELERY_",
        "OTEL_",  # tracing only where the benchmark turns it on
        "PROMETHEUS_MULTIPROC_DIR",  # each server gets a fresh one
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith(dropped)}
    models = {
        MODEL: {
            "model": f"openai/{MODEL}",
            "api_base": f"http://127.0.0.1:{upstream_port}/v1",
            "api_key": UPSTREAM_KEY,
            "input_usd_per_mtok": 1.0,
            "output_usd_per_mtok": 2.0,
        }
    }
    env.update(
        {
            "DATABASE_URL": db.url,
            "DJANGO_DEBUG": "false",
            "DJANGO_SECRET_KEY": secrets.token_urlsafe(50),
            "DJANGO_ALLOWED_HOSTS": "127.0.0.1,localhost",
            "DJANGO_SECURE_SSL_REDIRECT": "false",
            "DJANGO_LOG_LEVEL": "WARNING",
            "CASCADEFLOW_MODELS": json.dumps(models),
            "CASCADEFLOW_VAR_DIR": str(tmp / "cascadeflow-var"),
            "LITELLM_LOCAL_MODEL_COST_MAP": "True",
            "PYTHONUNBUFFERED": "1",
            **FREE_TIER_UNLIMITED,
        }
    )
    if redis_url:
        env["REDIS_URL"] = redis_url
    return env


def start_upstream(procs: Processes, port: int, app_dir: Path) -> subprocess.Popen[bytes]:
    """The fake OpenAI upstream (``tests/support/fake_upstream.py``) on ``port``."""
    return procs.start(
        "upstream",
        [
            str(PROJECT_PYTHON),
            "-m",
            "tests.support.fake_upstream",
            "--host",
            HOST,
            "--port",
            str(port),
        ],
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
        cwd=app_dir,
    )


def migrate(procs: Processes, env: dict[str, str], app_dir: Path) -> None:
    rc, out, err = procs.run(
        "migrate",
        [str(PROJECT_PYTHON), "manage.py", "migrate", "--noinput"],
        env=env,
        cwd=app_dir,
        timeout=300,
    )
    if rc != 0:
        raise RuntimeError(f"migrate failed:\n{out[-2000:]}\n{err[-3000:]}")


def create_tenant(procs: Processes, env: dict[str, str], app_dir: Path) -> tuple[str, str]:
    """A fresh tenant (on the free plan, lifted by FREE_TIER_UNLIMITED): its slug and an API
    token."""
    tenant_slug = f"bench-{secrets.token_hex(4)}"
    rc, out, err = procs.run(
        "create_tenant",
        [str(PROJECT_PYTHON), "manage.py", "create_tenant", tenant_slug],
        env=env,
        cwd=app_dir,
        timeout=120,
    )
    if rc != 0 or not out.strip():
        raise RuntimeError(f"create_tenant failed:\n{out}\n{err[-3000:]}")
    return tenant_slug, out.strip().splitlines()[-1].strip()


def production_setup(
    procs: Processes, env: dict[str, str], app_dir: Path, slug: str, token: str, step: Step
) -> None:
    """Give ``slug``'s tenant the limits, tiers and budgets of ``step``."""
    code = PRODUCTION_SETUP.format(
        slug=slug,
        token=token,
        limits=step.limits,
        budgets=step.budgets,
        rpm=PRODUCTION_RPM,
        tpm=PRODUCTION_TPM,
        limit=PRODUCTION_BUDGET_NANOS,
        user=PRODUCTION_USER,
    )
    rc, out, err = procs.run(
        "production-setup",
        [str(PROJECT_PYTHON), "manage.py", "shell", "-c", code],
        env=env,
        cwd=app_dir,
        timeout=120,
    )
    if rc != 0 or not out.strip().endswith("ok"):
        raise RuntimeError(f"production setup of {slug} failed:\n{out}\n{err[-3000:]}")


def observability_envs(sink_port: int) -> dict[str, dict[str, str]]:
    """The two configurations compared: everything off, and everything on (Prometheus
    metrics, and OpenTelemetry tracing exporting every span over OTLP/HTTP to the sink,
    batched by the SDK's BatchSpanProcessor with its default settings)."""
    return {
        "cf_obs_off": {"CASCADEFLOW_METRICS": "false"},
        "cf_obs_on": {
            "CASCADEFLOW_METRICS": "true",
            "OTEL_EXPORTER_OTLP_ENDPOINT": f"http://{HOST}:{sink_port}",
            "OTEL_EXPORTER_OTLP_PROTOCOL": "http/protobuf",
            "OTEL_TRACES_SAMPLER": "always_on",
            "OTEL_SERVICE_NAME": "cascadeflow-bench",
        },
    }


def cascadeflow_cmd(port: int, workers: int) -> list[str]:
    return [
        str(PROJECT_PYTHON),
        "-m",
        "uvicorn",
        "cascadeflow_site.asgi:application",
        "--host",
        HOST,
        "--port",
        str(port),
        "--workers",
        str(workers),
        "--loop",
        "uvloop",
        "--http",
        "httptools",
        "--no-access-log",
        "--lifespan",
        "off",
        "--log-level",
        "warning",
    ]


def litellm_env(tmp: Path) -> dict[str, str]:
    dropped = ("DATABASE_URL", "DIRECT_URL", "REDIS_", "LITELLM_", "STORE_MODEL_IN_DB")
    env = {k: v for k, v in os.environ.items() if not k.startswith(dropped)}
    env.update(
        {
            "LITELLM_LOCAL_MODEL_COST_MAP": "True",  # no cost-map download
            "LITELLM_LOG": "ERROR",  # quiet; also turns uvicorn's access log off
            "LITELLM_MODE": "PRODUCTION",  # no .env loading
            "DISABLE_ADMIN_UI": "True",
            "PYTHONUNBUFFERED": "1",
            "HOME": str(tmp / "litellm-home"),
        }
    )
    return env


# =====================================================================================
# Measurement
# =====================================================================================


@dataclass
class Segment:
    target: str
    concurrency: int
    round: int
    ok: int
    errors: int
    elapsed_s: float
    server_cpu_s: float
    db_cpu_s: float
    client_cpu_s: float
    latencies_us: list[int] = field(repr=False)
    error_samples: list[str] = field(default_factory=list)
    ttft_us: list[int] = field(default_factory=list, repr=False)  # streams, with ttft=True

    @property
    def rps(self) -> float:
        return self.ok / self.elapsed_s if self.elapsed_s else 0.0


def run_segment(
    procs: Processes,
    target: Target,
    concurrency: int,
    *,
    duration: float | None,
    requests: int | None,
    round_no: int,
    db_name: str | None = None,
    ttft: bool = False,
) -> Segment:
    out_path = procs.log_dir / "loadgen-result.json"
    out_path.unlink(missing_ok=True)
    spec: dict[str, Any] = {
        "out": str(out_path),
        "port": target.port,
        "request": target.raw_request().decode("latin-1"),
        "concurrency": concurrency,
        "ttft": ttft,
    }
    if requests:
        spec["requests"] = requests
    else:
        spec["duration"] = duration
    cpu_before = cpu_snapshot(target.pgid, db_name)
    rc, out, err = procs.run(
        "loadgen",
        [sys.executable, str(Path(__file__).resolve()), "_loadgen", json.dumps(spec)],
        env={**os.environ, "PYTHONHASHSEED": "0"},
        cwd=REPO,
        timeout=(duration or 0) + (requests or 0) * 0.5 + 120,
    )
    cpu_after = cpu_snapshot(target.pgid, db_name)
    if rc != 0:
        raise RuntimeError(f"load generator failed (rc={rc}):\n{out[-1000:]}\n{err[-3000:]}")
    result = json.loads(out_path.read_text())
    return Segment(
        target=target.key,
        concurrency=concurrency,
        round=round_no,
        ok=result["ok"],
        errors=result["errors"],
        elapsed_s=result["elapsed_s"],
        server_cpu_s=max(0.0, cpu_after[0] - cpu_before[0]),
        db_cpu_s=max(0.0, cpu_after[1] - cpu_before[1]),
        client_cpu_s=result["client_cpu_s"],
        latencies_us=result["latencies_us"],
        error_samples=result["error_samples"],
        ttft_us=result["ttft_us"],
    )


def percentile(sorted_values: list[int], q: float) -> float:
    """Nearest-rank percentile of sorted microsecond values, in milliseconds."""
    if not sorted_values:
        return float("nan")
    rank = max(1, math.ceil(q / 100 * len(sorted_values)))
    return sorted_values[rank - 1] / 1000


def summarize(segments: list[Segment]) -> dict[str, Any]:
    latencies = sorted(v for s in segments for v in s.latencies_us)
    ok = sum(s.ok for s in segments)
    elapsed = sum(s.elapsed_s for s in segments)
    cpu = sum(s.server_cpu_s for s in segments)
    db_cpu = sum(s.db_cpu_s for s in segments)
    client_cpu = sum(s.client_cpu_s for s in segments)
    return {
        "requests_ok": ok,
        "errors": sum(s.errors for s in segments),
        "error_samples": [e for s in segments for e in s.error_samples][:5],
        "measured_s": round(elapsed, 3),
        "p50_ms": percentile(latencies, 50),
        "p90_ms": percentile(latencies, 90),
        "p99_ms": percentile(latencies, 99),
        "mean_ms": (sum(latencies) / len(latencies) / 1000) if latencies else float("nan"),
        "throughput_rps": ok / elapsed if elapsed else 0.0,
        "per_round_rps": [round(s.rps, 1) for s in segments],
        "per_round_p50_ms": [percentile(sorted(s.latencies_us), 50) for s in segments],
        "per_round_p99_ms": [percentile(sorted(s.latencies_us), 99) for s in segments],
        "server_cpu_ms_per_request": (cpu * 1000 / ok) if ok else float("nan"),
        "db_backend_cpu_ms_per_request": (db_cpu * 1000 / ok) if ok else float("nan"),
        "client_cpu_ms_per_request": (client_cpu * 1000 / ok) if ok else float("nan"),
    }


def ledger_counts(
    env: dict[str, str], procs: Processes, tenant_slug: str, app_dir: Path
) -> tuple[int, int]:
    code = (
        "from routing.enums import UsageStatus; from routing.models import UsageEvent;"
        f"qs = UsageEvent.objects.filter(tenant__slug={tenant_slug!r});"
        "print(qs.count(), qs.filter(http_status=200, status=UsageStatus.OK).count())"
    )
    rc, out, err = procs.run(
        "ledger-count",
        [str(PROJECT_PYTHON), "manage.py", "shell", "-c", code],
        env=env,
        cwd=app_dir,
        timeout=120,
    )
    if rc != 0:
        raise RuntimeError(f"ledger count failed:\n{err[-3000:]}")
    total, ok = out.strip().splitlines()[-1].split()
    return int(total), int(ok)


def wait_for_spans(sink_port: int, traces: int, timeout: float = 20.0) -> dict[str, Any]:
    """The sink's tallies once it holds one server span per request answered by
    "observability on" (the SDK exports a partial batch every 5 s), or after ``timeout``."""
    deadline = time.monotonic() + timeout
    while True:
        counts = sink_counts(sink_port)
        if counts["by_kind"].get("server", 0) >= traces or time.monotonic() > deadline:
            return counts
        time.sleep(0.5)


def compare_observability(
    results: dict[str, dict[str, Any]],
    segments: list[Segment],
    spans: dict[str, Any],
    served: dict[str, int],
    ledgers: dict[str, dict[str, Any]],
) -> dict[str, Any]:
    """Observability off vs on (and metrics alone: the main CascadeFlow target)."""
    direct = results["direct"]
    configs = {"off": "cf_obs_off", "metrics_only": "cascadeflow", "on": "cf_obs_on"}
    out: dict[str, Any] = {}
    for c in CONCURRENCIES:
        d = direct[f"c{c}"]
        for q in ("p50", "p99"):
            row = {
                name: results[key][f"c{c}"][f"{q}_ms"] - d[f"{q}_ms"]
                for name, key in configs.items()
            }
            row["ratio_on_over_off"] = ratio(row["on"], row["off"])
            out[f"added_{q}_c{c}_ms"] = row
        row = {name: results[key][f"c{c}"]["throughput_rps"] for name, key in configs.items()}
        row["ratio_on_over_off"] = ratio(row["on"], row["off"])
        out[f"throughput_c{c}_rps"] = row
        for metric in ("server_cpu_ms_per_request", "db_backend_cpu_ms_per_request"):
            row = {name: results[key][f"c{c}"][metric] for name, key in configs.items()}
            row["ratio_on_over_off"] = ratio(row["on"], row["off"])
            out[f"{metric}_c{c}"] = row
    # Per round: each round's on and off segments ran minutes apart at most.
    per_round = []
    by = {(s.target, s.concurrency, s.round): s for s in segments}
    rounds = sorted({s.round for s in segments})
    for r in rounds:
        p50 = {
            k: percentile(sorted(by[(k, 16, r)].latencies_us), 50)
            for k in ("direct", "cf_obs_off", "cf_obs_on")
        }
        per_round.append(
            round(ratio(p50["cf_obs_on"] - p50["direct"], p50["cf_obs_off"] - p50["direct"]), 3)
        )
    traces = served["cf_obs_on"]
    server_spans = spans["by_kind"].get("server", 0)
    ratio_c16 = out["added_p50_c16_ms"]["ratio_on_over_off"]
    return {
        **out,
        "added_p50_c16_ratio_per_round": per_round,
        "added_p50_c16_ratio_median_of_rounds": statistics.median(per_round),
        "ratio_added_p50_c16_on_over_off": ratio_c16,
        "ratio_target": TARGET_OBSERVABILITY_RATIO,
        "ratio_met": bool(ratio_c16 <= TARGET_OBSERVABILITY_RATIO),
        "spans": {
            "requests_answered_by_observability_on": traces,
            "spans_received": spans["spans"],
            "server_spans_received": server_spans,
            "spans_by_kind": spans["by_kind"],
            "spans_per_request": ratio(spans["spans"], traces),
            "otlp_posts": spans["posts"],
            "otlp_bytes": spans["bytes"],
            "undecodable_posts": spans["bad"],
            "sink_cpu_ms_per_span": ratio(spans["cpu_s"] * 1000, spans["spans"]),
            "every_request_traced": server_spans == traces and spans["bad"] == 0,
        },
        "ledgers_match": all(ledgers[k]["matches"] for k in OBSERVABILITY_TARGETS),
    }


def git(*args: str) -> str:
    return subprocess.run(
        ["git", "-C", str(REPO), *args], capture_output=True, text=True, check=True
    ).stdout.rstrip()


def code_under_test(ref: str | None, tmp: Path) -> tuple[Path, dict[str, Any]]:
    """The CascadeFlow source to run: the working tree, or ``git archive`` of ``ref``."""
    if ref is None:
        dirty = [
            line[3:]
            for line in git("status", "--porcelain").splitlines()
            if not line[3:].startswith(("bench/", "docs/"))
        ]
        commit = git("rev-parse", "HEAD")
        return REPO, {"source": "working tree", "commit": commit, "modified_files": dirty}
    commit = git("rev-parse", "--verify", f"{ref}^{{commit}}")
    dest = tmp / "src"
    dest.mkdir()
    archive = subprocess.run(
        ["git", "-C", str(REPO), "archive", "--format=tar", commit],
        capture_output=True,
        check=True,
    ).stdout
    with tarfile.open(fileobj=io.BytesIO(archive)) as tar:
        tar.extractall(dest, filter="data")
    return dest, {"source": f"git archive of {ref}", "commit": commit, "modified_files": []}


def machine_info() -> dict[str, Any]:
    cpu_model = ""
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu_model = line.split(":", 1)[1].strip()
                break
    load = os.getloadavg() if hasattr(os, "getloadavg") else (0.0, 0.0, 0.0)
    return {
        "cpus": os.cpu_count(),
        "cpu_model": cpu_model,
        "kernel": platform.release(),
        "python": platform.python_version(),
        "loadavg_at_start": [round(x, 2) for x in load],
    }


@contextlib.contextmanager
def managed_run(keep_tmp: bool) -> Iterator[tuple[Processes, Path]]:
    tmp = Path(tempfile.mkdtemp(prefix="cf-overhead-"))
    procs = Processes(tmp)
    previous = {s: signal.signal(s, _raise_system_exit) for s in (signal.SIGTERM, signal.SIGHUP)}
    try:
        yield procs, tmp
    finally:
        procs.stop_all()
        for s, handler in previous.items():
            signal.signal(s, handler)
        if keep_tmp:
            print(f"Logs and temporary files kept in {tmp}")
        else:
            shutil.rmtree(tmp, ignore_errors=True)


def fmt(value: float, digits: int = 1) -> str:
    return "n/a" if value is None or math.isnan(value) else f"{value:.{digits}f}"


def ratio(a: float, b: float) -> float:
    return a / b if b else float("nan")


def benchmark(args: argparse.Namespace) -> dict[str, Any]:
    date = dt.datetime.now(dt.UTC)
    with managed_run(args.keep_tmp) as (procs, tmp):
        litellm_version = ensure_litellm_proxy_venv(procs)
        app_dir, code = code_under_test(args.ref, tmp)
        baseline = None
        if args.baseline:
            (tmp / "baseline").mkdir()
            baseline = code_under_test(args.baseline, tmp / "baseline")
        db = prepare_database(args.database_url, tmp, args.keep_db, args.pg_database)
        try:
            return _benchmark(args, procs, tmp, db, litellm_version, date, app_dir, code, baseline)
        except Exception:
            for name, _ in procs.procs:
                servers = {"upstream", "cascadeflow", "litellm-proxy", "otlp-sink"}
                if name in servers | set(OBSERVABILITY_TARGETS) | set(PRODUCTION_STEPS) | {
                    BASELINE
                }:
                    print(
                        f"--- last lines of {name} log ---\n{procs.log_tail(name)}", file=sys.stderr
                    )
            raise
        finally:
            procs.stop_all()
            if db.cleanup is not None:
                with contextlib.suppress(Exception):
                    db.cleanup()


def _benchmark(
    args: argparse.Namespace,
    procs: Processes,
    tmp: Path,
    db: Database,
    litellm_version: str,
    date: dt.datetime,
    app_dir: Path,
    code: dict[str, Any],
    baseline: tuple[Path, dict[str, Any]] | None = None,
) -> dict[str, Any]:
    print(f"CascadeFlow code: {code['source']} at {code['commit'][:12]}", flush=True)
    if baseline:
        print(f"Baseline: {baseline[1]['source']} at {baseline[1]['commit'][:12]}", flush=True)
    if code["modified_files"]:
        print(f"  modified files: {', '.join(code['modified_files'])}", flush=True)
    print(f"Database: {db.description}", flush=True)
    upstream_port, cf_port, ll_port = free_port(), free_port(), free_port()

    # --- fake upstream ------------------------------------------------------------
    upstream = start_upstream(procs, upstream_port, app_dir)

    # --- CascadeFlow: migrate, tenants + tokens, servers ---------------------------
    production = args.profile == "production"
    cf_env = cascadeflow_env(db, tmp, upstream_port, None if production else args.redis_url)
    migrate(procs, cf_env, app_dir)
    # One CascadeFlow server per configuration, each with its own tenant (so each ledger is
    # checked on its own) and its own fresh Prometheus multi-process directory.
    sink_port = free_port() if args.observability or production else None
    cf_configs: dict[str, dict[str, str]] = {"cascadeflow": {}}
    cf_workers = dict.fromkeys(cf_configs, args.workers)
    if production:
        assert sink_port is not None
        obs = observability_envs(sink_port)
        cf_configs = {
            key: {
                **obs["cf_obs_on" if step.observability else "cf_obs_off"],
                **({"REDIS_URL": args.redis_url} if step.redis else {}),
            }
            for key, step in PRODUCTION_STEPS.items()
        }
        cf_workers = {key: step.workers for key, step in PRODUCTION_STEPS.items()}
        if baseline:
            cf_configs[BASELINE] = cf_configs[BASELINE_STEP]
            cf_workers[BASELINE] = cf_workers[BASELINE_STEP]
    elif args.observability:
        assert sink_port is not None
        cf_configs.update(observability_envs(sink_port))
        cf_workers.update(dict.fromkeys(OBSERVABILITY_TARGETS, args.workers))
    cf_servers: dict[str, tuple[subprocess.Popen[bytes], int, str, str]] = {}
    for key, extra in cf_configs.items():
        tenant_slug, token = create_tenant(procs, cf_env, app_dir)
        if production:
            step = PRODUCTION_STEPS[BASELINE_STEP if key == BASELINE else key]
            production_setup(procs, cf_env, app_dir, tenant_slug, token, step)
        prom_dir = tmp / f"prometheus-{key}"
        prom_dir.mkdir()
        port = cf_port if key == "cascadeflow" else free_port()
        env = {**cf_env, "PROMETHEUS_MULTIPROC_DIR": str(prom_dir), **extra}
        cwd = baseline[0] if key == BASELINE and baseline else app_dir
        proc = procs.start(key, cascadeflow_cmd(port, cf_workers[key]), env=env, cwd=cwd)
        cf_servers[key] = (proc, port, token, tenant_slug)
    tenant_slug = cf_servers["cascadeflow"][3]

    # --- OTLP sink: receives the spans of "observability on" ----------------------
    sink = None
    if sink_port is not None:
        sink = procs.start(
            "otlp-sink",
            [
                str(PROJECT_PYTHON),
                str(Path(__file__).resolve()),
                "_sink",
                json.dumps({"port": sink_port}),
            ],
            env={**os.environ, "PYTHONUNBUFFERED": "1"},
            cwd=REPO,
        )

    # --- LiteLLM proxy ------------------------------------------------------------
    ll_dir = tmp / "litellm"
    (ll_dir / "home").mkdir(parents=True)
    config_path = ll_dir / "config.yaml"
    config_path.write_text(
        LITELLM_CONFIG.format(
            model=MODEL,
            upstream_port=upstream_port,
            upstream_key=UPSTREAM_KEY,
            master_key=LITELLM_MASTER_KEY,
        )
    )
    ll_cmd = [
        str(PROXY_VENV / "bin" / "litellm"),
        "--config",
        str(config_path),
        "--host",
        HOST,
        "--port",
        str(ll_port),
        "--num_workers",
        "1",
    ]
    ll_env = litellm_env(ll_dir)
    litellm_proxy = procs.start("litellm-proxy", ll_cmd, env=ll_env, cwd=ll_dir)

    ready = {"upstream": wait_until_ready(procs, "upstream", upstream, upstream_port, "/v1/models")}
    if sink is not None and sink_port is not None:
        ready["otlp-sink"] = wait_until_ready(procs, "otlp-sink", sink, sink_port, "/counts")
    for key, (proc, port, _, _) in cf_servers.items():
        ready[key] = wait_until_ready(procs, key, proc, port, "/healthz")
    ready["litellm-proxy"] = wait_until_ready(
        procs, "litellm-proxy", litellm_proxy, ll_port, "/health/liveliness"
    )
    print("Servers ready: " + ", ".join(f"{k} {v:.1f}s" for k, v in ready.items()), flush=True)

    cf_proc, _, cf_token, _ = cf_servers["cascadeflow"]
    body = PRODUCTION_BODY if production else CHAT_BODY  # the same body for every target
    cf_label = "CascadeFlow, everything on" if production else "CascadeFlow"
    targets = [
        Target("direct", "fake upstream (direct)", upstream_port, UPSTREAM_KEY, upstream.pid),
        Target("cascadeflow", cf_label, cf_port, cf_token, cf_proc.pid, body=body),
        Target("litellm", "LiteLLM proxy", ll_port, LITELLM_MASTER_KEY, litellm_proxy.pid),
    ]
    targets[0].body = targets[2].body = body
    labels = {key: f"CascadeFlow {step.label}" for key, step in PRODUCTION_STEPS.items()}
    labels[BASELINE] = f"CascadeFlow {PRODUCTION_STEPS[BASELINE_STEP].label} at {args.baseline}"
    for key in cf_servers:
        if key != "cascadeflow":
            proc, port, token, _ = cf_servers[key]
            label = labels[key] if production else OBSERVABILITY_LABELS[key]
            targets.append(Target(key, label, port, token, proc.pid, body=body))
    cf_keys = [t.key for t in targets if t.key in cf_servers]
    successes = dict.fromkeys(cf_keys, 0)  # per CascadeFlow server: for its ledger check
    served = dict.fromkeys(cf_keys, 0)  # every answered request (ok or not): one trace each

    # --- sanity: identical answers from all targets ------------------------------------
    for t in targets:
        status, answer = http_request(t.port, "POST", t.path, body=t.body, auth=t.auth, timeout=60)
        if status != 200:
            raise RuntimeError(f"{t.label} answered {status}: {answer[:500]!r}")
        content = json.loads(answer)["choices"][0]["message"]["content"]
        if content != EXPECTED_CONTENT:
            raise RuntimeError(f"{t.label} returned unexpected content {content!r}")
        if t.key in successes:
            successes[t.key] += 1
            served[t.key] += 1

    # --- warm-up -----------------------------------------------------------------------
    print(f"Warm-up: {args.warmup:.0f}s per target ...", flush=True)
    for t in targets:
        for concurrency, share in ((16, 0.75), (1, 0.25)):
            seg = run_segment(
                procs,
                t,
                concurrency,
                duration=args.warmup * share,
                requests=None,
                round_no=-1,
                db_name=db.pg_name if t.key in successes else None,
            )
            if t.key in successes:
                successes[t.key] += seg.ok
                served[t.key] += len(seg.latencies_us)
            if seg.errors:
                raise RuntimeError(f"{t.label} warm-up errors: {seg.error_samples}")

    # --- measurement: alternating segments, rotating order -----------------------------
    segments: list[Segment] = []
    per_segment = f"{args.requests} requests" if args.requests else f"{args.duration:g}s"
    print(
        f"Measuring: {args.rounds} rounds x concurrency {CONCURRENCIES} x {len(targets)} targets, "
        f"{per_segment} per segment",
        flush=True,
    )
    for round_no in range(args.rounds):
        for concurrency in CONCURRENCIES:
            shift = round_no % len(targets)
            for t in targets[shift:] + targets[:shift]:
                seg = run_segment(
                    procs,
                    t,
                    concurrency,
                    duration=args.duration,
                    requests=args.requests,
                    round_no=round_no,
                    db_name=db.pg_name if t.key in successes else None,
                )
                segments.append(seg)
                if t.key in successes:
                    successes[t.key] += seg.ok
                    served[t.key] += len(seg.latencies_us)
                p50 = percentile(sorted(seg.latencies_us), 50)
                print(
                    f"  round {round_no + 1}/{args.rounds} c={concurrency:<2} {t.label:<34} "
                    f"{seg.rps:8.1f} req/s  p50 {p50:7.2f} ms  errors {seg.errors}",
                    flush=True,
                )

    # --- ledger check, per CascadeFlow server -------------------------------------------
    ledgers: dict[str, dict[str, Any]] = {}
    for key in cf_keys:
        total, ok = ledger_counts(cf_env, procs, cf_servers[key][3], app_dir)
        errors = sum(s.errors for s in segments if s.target == key)
        ledgers[key] = {
            "tenant": cf_servers[key][3],
            "cascadeflow_successful_requests": successes[key],
            "cascadeflow_failed_requests": errors,
            "usage_event_rows": total,
            "usage_event_rows_ok": ok,
            "matches": ok == successes[key] and (errors > 0 or total == successes[key]),
        }
    cf_successes = successes["cascadeflow"]
    cf_errors = ledgers["cascadeflow"]["cascadeflow_failed_requests"]

    # --- figures ----------------------------------------------------------------------------
    results: dict[str, dict[str, Any]] = {}
    for t in targets:
        results[t.key] = {"label": t.label}
        for c in CONCURRENCIES:
            results[t.key][f"c{c}"] = summarize(
                [s for s in segments if s.target == t.key and s.concurrency == c]
            )
    comparisons: dict[str, Any] = {}
    for c in CONCURRENCIES:
        direct, cf, ll = (results[k][f"c{c}"] for k in ("direct", "cascadeflow", "litellm"))
        for q in ("p50", "p99"):
            cf_added = cf[f"{q}_ms"] - direct[f"{q}_ms"]
            ll_added = ll[f"{q}_ms"] - direct[f"{q}_ms"]
            comparisons[f"added_{q}_c{c}"] = {
                "cascadeflow_ms": cf_added,
                "litellm_ms": ll_added,
                "ratio_cf_over_litellm": ratio(cf_added, ll_added),
            }
        comparisons[f"throughput_c{c}"] = {
            "cascadeflow_rps": cf["throughput_rps"],
            "litellm_rps": ll["throughput_rps"],
            "ratio_cf_over_litellm": ratio(cf["throughput_rps"], ll["throughput_rps"]),
        }
        cf_rounds = {
            s.round: s for s in segments if s.target == "cascadeflow" and s.concurrency == c
        }
        ll_rounds = {s.round: s for s in segments if s.target == "litellm" and s.concurrency == c}
        comparisons[f"throughput_c{c}"]["per_round_ratios"] = [
            round(ratio(cf_rounds[r].rps, ll_rounds[r].rps), 3) for r in sorted(cf_rounds)
        ]
        comparisons[f"cpu_per_request_c{c}"] = {
            "cascadeflow_ms": cf["server_cpu_ms_per_request"],
            "litellm_ms": ll["server_cpu_ms_per_request"],
            "ratio_cf_over_litellm": ratio(
                cf["server_cpu_ms_per_request"], ll["server_cpu_ms_per_request"]
            ),
        }
    added_ratio = comparisons["added_p50_c16"]["ratio_cf_over_litellm"]
    thr_ratio = comparisons["throughput_c16"]["ratio_cf_over_litellm"]
    targets_met = {
        "added_p50_c16_ratio_le_0.5": bool(added_ratio <= TARGET_ADDED_P50_RATIO),
        "throughput_c16_ratio_ge_2": bool(thr_ratio >= TARGET_THROUGHPUT_RATIO),
    }
    observability = None
    production_figures = None
    if production:
        assert sink_port is not None
        spans = sink_counts(sink_port)
        production_figures = compare_production(results, comparisons, spans)
        if BASELINE in results:
            production_figures["baseline"] = compare_baseline(results, segments, args.baseline)
        targets_met.update(production_figures["targets_met"])
    elif args.observability and sink_port is not None:
        spans = wait_for_spans(sink_port, served["cf_obs_on"])
        observability = compare_observability(results, segments, spans, served, ledgers)
        targets_met[OBS_TARGET_KEY] = observability["ratio_met"]
    return {
        "date_utc": date.isoformat(timespec="seconds"),
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "machine": machine_info(),
        "database": db.description,
        "code": code,
        "baseline_code": baseline[1] if baseline else None,
        "config": {
            "rounds": args.rounds,
            "segment_duration_s": None if args.requests else args.duration,
            "segment_requests": args.requests,
            "warmup_s_per_target": args.warmup,
            "profile": args.profile,
            "cascadeflow_workers": 2 if production else args.workers,
            "cascadeflow_redis_url": args.redis_url,
            "production_steps": {k: dataclasses.asdict(v) for k, v in PRODUCTION_STEPS.items()}
            if production
            else None,
            "litellm_proxy_workers": 1,
            "litellm_version": litellm_version,
            "server_flags": "uvloop + httptools for both; access logs off for both",
            "request_body": CHAT_BODY.decode(),
            "observability": {
                key: {k: v for k, v in extra.items() if k != "PROMETHEUS_MULTIPROC_DIR"}
                for key, extra in cf_configs.items()
            }
            if args.observability
            else None,
        },
        "results": results,
        "comparisons": comparisons,
        "targets_met": targets_met,
        "ledger": {
            "tenant": tenant_slug,
            "cascadeflow_successful_requests": cf_successes,
            "cascadeflow_failed_requests": cf_errors,
            "usage_event_rows": ledgers["cascadeflow"]["usage_event_rows"],
            "usage_event_rows_ok": ledgers["cascadeflow"]["usage_event_rows_ok"],
            "matches": all(entry["matches"] for entry in ledgers.values()),
            "per_server": ledgers,
        },
        "observability": observability,
        "production": production_figures,
    }


def compare_baseline(
    results: dict[str, dict[str, Any]], segments: list[Segment], ref: str
) -> dict[str, Any]:
    """The code under test against ``ref``, both everything on with one worker, same segments."""
    now, before = results[BASELINE_STEP], results[BASELINE]
    figures: dict[str, Any] = {"ref": ref, "step": BASELINE_STEP}
    for c in CONCURRENCIES:
        n, b = now[f"c{c}"], before[f"c{c}"]
        rounds = {
            key: {s.round: s.rps for s in segments if s.target == key and s.concurrency == c}
            for key in (BASELINE_STEP, BASELINE)
        }
        figures[f"c{c}"] = {
            "p50_ms": (n["p50_ms"], b["p50_ms"]),
            "throughput_rps": (n["throughput_rps"], b["throughput_rps"]),
            "server_cpu_ms_per_request": (
                n["server_cpu_ms_per_request"],
                b["server_cpu_ms_per_request"],
            ),
            "db_backend_cpu_ms_per_request": (
                n["db_backend_cpu_ms_per_request"],
                b["db_backend_cpu_ms_per_request"],
            ),
            "throughput_ratio_per_round": [
                round(ratio(rounds[BASELINE_STEP][r], rounds[BASELINE][r]), 3)
                for r in sorted(rounds[BASELINE])
            ],
        }
    return figures


def compare_production(
    results: dict[str, dict[str, Any]], comparisons: dict[str, Any], spans: dict[str, Any]
) -> dict[str, Any]:
    """Each production step's figures, what it adds to the step before, and the targets."""
    direct, litellm = results["direct"], results["litellm"]
    steps: list[dict[str, Any]] = []
    previous: dict[str, Any] | None = None
    for key, step in PRODUCTION_STEPS.items():
        row: dict[str, Any] = {"key": key, "label": step.label, "adds": step.added}
        for c in CONCURRENCIES:
            r, d, ll = results[key][f"c{c}"], direct[f"c{c}"], litellm[f"c{c}"]
            for q in ("p50", "p99"):
                row[f"added_{q}_c{c}_ms"] = r[f"{q}_ms"] - d[f"{q}_ms"]
                row[f"added_{q}_c{c}_ratio_to_litellm"] = ratio(
                    row[f"added_{q}_c{c}_ms"], ll[f"{q}_ms"] - d[f"{q}_ms"]
                )
            row[f"throughput_c{c}_rps"] = r["throughput_rps"]
            row[f"throughput_c{c}_ratio_to_litellm"] = ratio(
                r["throughput_rps"], ll["throughput_rps"]
            )
            row[f"server_cpu_ms_per_request_c{c}"] = r["server_cpu_ms_per_request"]
            row[f"db_backend_cpu_ms_per_request_c{c}"] = r["db_backend_cpu_ms_per_request"]
            if previous is not None:
                row[f"step_added_p50_c{c}_ms"] = (
                    row[f"added_p50_c{c}_ms"] - previous[f"added_p50_c{c}_ms"]
                )
                row[f"step_throughput_c{c}_ratio"] = ratio(
                    r["throughput_rps"], previous[f"throughput_c{c}_rps"]
                )
                row[f"step_server_cpu_ms_per_request_c{c}"] = (
                    r["server_cpu_ms_per_request"] - previous[f"server_cpu_ms_per_request_c{c}"]
                )
        steps.append(row)
        previous = row
    added_ratio = comparisons["added_p50_c16"]["ratio_cf_over_litellm"]
    thr_ratio = comparisons["throughput_c16"]["ratio_cf_over_litellm"]
    second_worker = ratio(
        results["cascadeflow"]["c16"]["throughput_rps"], results["p_obs"]["c16"]["throughput_rps"]
    )
    return {
        "steps": steps,
        "added_p50_c16_ratio_to_litellm": added_ratio,
        "throughput_c16_ratio_to_litellm": thr_ratio,
        "second_worker_throughput_c16_ratio": second_worker,
        "spans": {"received": spans["spans"], "by_kind": spans["by_kind"], "bad": spans["bad"]},
        "targets_met": {
            "production_added_p50_c16_ratio_le_0.3": bool(
                added_ratio <= TARGET_PRODUCTION_ADDED_P50_RATIO
            ),
            "production_throughput_c16_ratio_ge_3": bool(
                thr_ratio >= TARGET_PRODUCTION_THROUGHPUT_RATIO
            ),
            "second_worker_throughput_c16_ratio_ge_1.6": bool(
                second_worker >= TARGET_SECOND_WORKER_RATIO
            ),
        },
    }


def report_production(prod: dict[str, Any]) -> list[str]:
    lines = [
        "Production profile: each step adds one feature to the step before (own server, own "
        "tenant); ratios are to LiteLLM's proxy (added latency over the upstream alone)",
        "",
        "| step | added p50 @1 ms | added p50 @16 ms (x LiteLLM) | added p99 @16 ms "
        "| req/s @16 (x LiteLLM) | step: +p50 @16 ms | step: req/s x | server CPU ms/req @16 "
        "| PG CPU ms/req @16 |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for row in prod["steps"]:
        lines.append(
            f"| {row['label']} | {fmt(row['added_p50_c1_ms'], 2)} "
            f"| {fmt(row['added_p50_c16_ms'], 2)} ({fmt(row['added_p50_c16_ratio_to_litellm'], 2)}x) "
            f"| {fmt(row['added_p99_c16_ms'], 2)} "
            f"| {fmt(row['throughput_c16_rps'])} ({fmt(row['throughput_c16_ratio_to_litellm'], 2)}x) "
            f"| {fmt(row.get('step_added_p50_c16_ms', float('nan')), 2)} "
            f"| {fmt(row.get('step_throughput_c16_ratio', float('nan')), 2)} "
            f"| {fmt(row['server_cpu_ms_per_request_c16'], 2)} "
            f"| {fmt(row['db_backend_cpu_ms_per_request_c16'], 2)} |"
        )
    met = prod["targets_met"]
    lines += [
        "",
        f"- spans received from the two traced steps: {prod['spans']['received']} "
        f"(by kind {prod['spans']['by_kind']}, undecodable posts {prod['spans']['bad']})",
        "",
        f"Target everything on, added p50 @16 <= {TARGET_PRODUCTION_ADDED_P50_RATIO}x LiteLLM: "
        f"{fmt(prod['added_p50_c16_ratio_to_litellm'], 3)}x -> "
        + ("MET" if met["production_added_p50_c16_ratio_le_0.3"] else "NOT MET"),
        f"Target everything on, throughput @16 >= {TARGET_PRODUCTION_THROUGHPUT_RATIO}x LiteLLM: "
        f"{fmt(prod['throughput_c16_ratio_to_litellm'], 2)}x -> "
        + ("MET" if met["production_throughput_c16_ratio_ge_3"] else "NOT MET"),
        f"Target second worker, throughput @16 >= {TARGET_SECOND_WORKER_RATIO}x one worker's: "
        f"{fmt(prod['second_worker_throughput_c16_ratio'], 2)}x -> "
        + ("MET" if met["second_worker_throughput_c16_ratio_ge_1.6"] else "NOT MET"),
    ]
    if base := prod.get("baseline"):
        lines += [
            "",
            f"Code under test against {base['ref']}, both everything on with one worker, "
            "in the same segments (now / before):",
            "",
            "| concurrency | p50 ms | req/s | req/s ratio per round | server CPU ms/req "
            "| PG CPU ms/req |",
            "|---|---:|---:|---|---:|---:|",
        ]
        for c in CONCURRENCIES:
            f = base[f"c{c}"]

            def pair(key: str, digits: int = 2, f: dict[str, Any] = f) -> str:
                now, before = f[key]
                return f"{fmt(now, digits)} / {fmt(before, digits)} ({ratio(now, before):.2f}x)"

            lines.append(
                f"| {c} | {pair('p50_ms')} | {pair('throughput_rps', 1)} "
                f"| {', '.join(f'{r:.2f}' for r in f['throughput_ratio_per_round'])} "
                f"| {pair('server_cpu_ms_per_request')} | {pair('db_backend_cpu_ms_per_request')} |"
            )
    return lines


def report(data: dict[str, Any]) -> str:
    res, cmp_ = data["results"], data["comparisons"]
    lines = [
        f"Date (UTC): {data['date_utc']}   Machine: {data['machine']['cpus']} CPUs "
        f"({data['machine']['cpu_model']}), load at start {data['machine']['loadavg_at_start']}",
        f"Database: {data['database']}",
        f"CascadeFlow code: {data['code']['source']} at commit {data['code']['commit'][:12]}"
        + (
            f" (+ uncommitted changes in {len(data['code']['modified_files'])} files)"
            if data["code"]["modified_files"]
            else ""
        ),
        f"CascadeFlow workers: {data['config']['cascadeflow_workers']}, REDIS_URL "
        f"{data['config']['cascadeflow_redis_url'] or 'unset'}; LiteLLM proxy "
        f"{data['config']['litellm_version']}, 1 worker",
        "",
        "| target | p50 ms @1 | p99 ms @1 | req/s @1 | p50 ms @16 | p99 ms @16 | req/s @16 "
        "| server CPU ms/req @16 | errors |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for key in dict.fromkeys(
        ("direct", "cascadeflow", "litellm", *OBSERVABILITY_TARGETS, *PRODUCTION_STEPS)
    ):
        if key not in res:
            continue
        r1, r16 = res[key]["c1"], res[key]["c16"]
        lines.append(
            f"| {res[key]['label']} | {fmt(r1['p50_ms'], 2)} | {fmt(r1['p99_ms'], 2)} "
            f"| {fmt(r1['throughput_rps'])} | {fmt(r16['p50_ms'], 2)} | {fmt(r16['p99_ms'], 2)} "
            f"| {fmt(r16['throughput_rps'])} | {fmt(r16['server_cpu_ms_per_request'], 2)} "
            f"| {r1['errors'] + r16['errors']} |"
        )
    lines.append("")
    for c in CONCURRENCIES:
        for q in ("p50", "p99"):
            a = cmp_[f"added_{q}_c{c}"]
            lines.append(
                f"- added {q} @{c}: CascadeFlow {fmt(a['cascadeflow_ms'], 2)} ms vs LiteLLM "
                f"{fmt(a['litellm_ms'], 2)} ms, ratio CF/LiteLLM {fmt(a['ratio_cf_over_litellm'], 2)}"
            )
    for c in CONCURRENCIES:
        t = cmp_[f"throughput_c{c}"]
        lines.append(
            f"- throughput @{c}: CascadeFlow {fmt(t['cascadeflow_rps'])} req/s vs LiteLLM "
            f"{fmt(t['litellm_rps'])} req/s, ratio CF/LiteLLM {fmt(t['ratio_cf_over_litellm'], 2)}"
        )
    per_round = cmp_["throughput_c16"]["per_round_ratios"]
    lines.append(
        f"- throughput @16 ratio per round: min {fmt(min(per_round), 2)}, "
        f"max {fmt(max(per_round), 2)} ({len(per_round)} rounds)"
    )
    cpu = cmp_["cpu_per_request_c16"]
    cf16 = res["cascadeflow"]["c16"]
    lines.append(
        f"- server process CPU per request @16: CascadeFlow {fmt(cpu['cascadeflow_ms'], 2)} ms "
        f"(+ {fmt(cf16['db_backend_cpu_ms_per_request'], 2)} ms in PostgreSQL backends) vs LiteLLM "
        f"{fmt(cpu['litellm_ms'], 2)} ms, ratio {fmt(cpu['ratio_cf_over_litellm'], 2)}; "
        f"load generator {fmt(res['litellm']['c16']['client_cpu_ms_per_request'], 3)} ms/request"
    )
    met = data["targets_met"]
    lines += [
        "",
        f"Target added p50 @16 ratio <= {TARGET_ADDED_P50_RATIO}: "
        + ("MET" if met["added_p50_c16_ratio_le_0.5"] else "NOT MET"),
        f"Target throughput @16 ratio >= {TARGET_THROUGHPUT_RATIO}: "
        + ("MET" if met["throughput_c16_ratio_ge_2"] else "NOT MET"),
    ]
    ledger = data["ledger"]
    for key, entry in ledger.get("per_server", {"cascadeflow": ledger}).items():
        label = res[key]["label"]
        lines.append(
            f"Ledger check ({label}): {entry['usage_event_rows']} routing_usageevent rows "
            f"({entry['usage_event_rows_ok']} ok) for {entry['cascadeflow_successful_requests']} "
            f"successful requests -> " + ("OK" if entry["matches"] else "MISMATCH")
        )
    if data.get("observability"):
        lines += ["", *report_observability(data["observability"])]
    if data.get("production"):
        lines += ["", *report_production(data["production"])]
    return "\n".join(lines)


def report_observability(obs: dict[str, Any]) -> list[str]:
    lines = [
        "Observability: off = CASCADEFLOW_METRICS=false, no OTEL_*; metrics only = the "
        "CascadeFlow target above; on = metrics + every span exported over OTLP/HTTP",
        "",
        "| | off | metrics only | on | ratio on/off |",
        "|---|---:|---:|---:|---:|",
    ]
    rows = [
        ("added p50 @1 (ms)", "added_p50_c1_ms", 2),
        ("added p99 @1 (ms)", "added_p99_c1_ms", 2),
        ("added p50 @16 (ms)", "added_p50_c16_ms", 2),
        ("added p99 @16 (ms)", "added_p99_c16_ms", 2),
        ("throughput @1 (req/s)", "throughput_c1_rps", 1),
        ("throughput @16 (req/s)", "throughput_c16_rps", 1),
        ("server CPU ms/req @1", "server_cpu_ms_per_request_c1", 3),
        ("server CPU ms/req @16", "server_cpu_ms_per_request_c16", 3),
        ("PostgreSQL CPU ms/req @16", "db_backend_cpu_ms_per_request_c16", 3),
    ]
    for label, key, digits in rows:
        row = obs[key]
        lines.append(
            f"| {label} | {fmt(row['off'], digits)} | {fmt(row['metrics_only'], digits)} "
            f"| {fmt(row['on'], digits)} | {fmt(row['ratio_on_over_off'], 3)} |"
        )
    per_round = obs["added_p50_c16_ratio_per_round"]
    spans = obs["spans"]
    lines += [
        "",
        "- added p50 @16 ratio on/off per round: "
        + ", ".join(fmt(r, 2) for r in per_round)
        + f" (median {fmt(obs['added_p50_c16_ratio_median_of_rounds'], 3)})",
        f"- spans received by the OTLP sink: {spans['spans_received']} in "
        f"{spans['otlp_posts']} POSTs ({spans['otlp_bytes']} bytes; by kind "
        f"{spans['spans_by_kind']}), {fmt(spans['spans_per_request'], 2)} per request; "
        f"server spans {spans['server_spans_received']} for "
        f"{spans['requests_answered_by_observability_on']} requests answered -> "
        + ("OK" if spans["every_request_traced"] else "MISMATCH")
        + f"; sink CPU {fmt(spans['sink_cpu_ms_per_span'], 3)} ms/span",
        "",
        f"Target added p50 @16 on/off <= {TARGET_OBSERVABILITY_RATIO} (within 15 %): "
        f"{fmt(obs['ratio_added_p50_c16_on_over_off'], 3)} -> "
        + ("MET" if obs["ratio_met"] else "MISSED"),
    ]
    return lines


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="Latency/throughput overhead of CascadeFlow vs LiteLLM proxy vs direct upstream."
    )
    parser.add_argument("--json", metavar="OUT", type=Path, help="write all figures to this file")
    parser.add_argument("--rounds", type=int, default=5, help="alternating rounds (default 5)")
    parser.add_argument(
        "--duration", type=float, default=4.0, help="seconds per measured segment (default 4)"
    )
    parser.add_argument(
        "--requests",
        type=int,
        default=None,
        help="fixed number of requests per segment instead of --duration",
    )
    parser.add_argument(
        "--warmup", type=float, default=4.0, help="warm-up seconds per target (default 4)"
    )
    parser.add_argument(
        "--database-url",
        default=None,
        help=f"CascadeFlow database (default: throwaway PostgreSQL '{PG_BENCH_DB}' on 127.0.0.1, "
        "else SQLite in a temp dir)",
    )
    parser.add_argument(
        "--pg-database",
        default=PG_BENCH_DB,
        help=f"name of the throwaway PostgreSQL database (default '{PG_BENCH_DB}'): dropped "
        "and recreated, dropped again at exit",
    )
    parser.add_argument(
        "--workers",
        type=int,
        default=1,
        help="CascadeFlow uvicorn workers (default 1, like LiteLLM)",
    )
    parser.add_argument(
        "--redis-url",
        default=None,
        help="REDIS_URL for CascadeFlow (cache, channel layer, shared circuit breaker); "
        "default: none, i.e. the in-process defaults",
    )
    parser.add_argument(
        "--ref",
        default=None,
        help="benchmark CascadeFlow as of this git ref (exported with git archive to a temp "
        "dir) instead of the working tree",
    )
    parser.add_argument(
        "--keep-db", action="store_true", help="do not drop the throwaway PG database"
    )
    parser.add_argument("--keep-tmp", action="store_true", help="keep logs and the temp directory")
    parser.add_argument(
        "--baseline",
        metavar="REF",
        help="--profile production: one more server, everything on with one worker (as the "
        "'+ metrics and tracing' step) running the code of git ref REF, measured in the same "
        "segments: the before/after of a change in one run",
    )
    parser.add_argument(
        "--observability",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="also measure two more CascadeFlow servers side by side: observability off "
        "(CASCADEFLOW_METRICS=false, no OTEL_*) and on (metrics, and every span exported over "
        "OTLP/HTTP to a local sink); on by default, --no-observability skips them",
    )
    parser.add_argument(
        "--profile",
        choices=("light", "production"),
        default="light",
        help="light (default): one CascadeFlow configuration (plus observability off/on); "
        "production: six CascadeFlow servers side by side, from the light configuration to "
        "everything on (Redis, rate limits and tiers, three budgets, metrics and tracing, two "
        "workers), one feature added per step; needs Redis (--redis-url, else $REDIS_URL)",
    )
    args = parser.parse_args(argv)
    if not args.pg_database.isidentifier() or not args.pg_database.islower():
        parser.error("--pg-database must be a lower-case identifier")
    if args.profile == "production":
        args.redis_url = args.redis_url or os.environ.get("REDIS_URL")
        if not args.redis_url:
            parser.error("--profile production needs --redis-url (or REDIS_URL)")
        args.observability = False  # the production steps measure it themselves
    if args.rounds < 1 or args.workers < 1 or (args.requests is not None and args.requests < 1):
        parser.error("--rounds, --workers and --requests must be positive")
    return args


def run_and_report(
    benchmark: Callable[[argparse.Namespace], dict[str, Any]],
    report: Callable[[dict[str, Any]], str],
    args: argparse.Namespace,
) -> dict[str, Any] | None:
    """Run ``benchmark``, print its report and wall time, and write ``args.json`` when given;
    None when interrupted (every process the benchmark started is stopped by then)."""
    started = time.monotonic()
    try:
        data = benchmark(args)
    except KeyboardInterrupt:
        print("\nInterrupted; every process started by the benchmark was stopped.", file=sys.stderr)
        return None
    data["wall_time_s"] = round(time.monotonic() - started, 1)
    print()
    print(report(data))
    print(f"\nWall time: {data['wall_time_s']} s")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(data, indent=2, allow_nan=True) + "\n")
        print(f"Figures written to {args.json}")
    return data


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["_loadgen"]:
        loadgen_main(argv[1])
        return 0
    if argv[:1] == ["_sink"]:
        sink_main(argv[1])
        return 0
    args = parse_args(argv)
    if not PROJECT_PYTHON.exists():
        print(f"Project virtualenv not found at {PROJECT_PYTHON}", file=sys.stderr)
        return 2
    data = run_and_report(benchmark, report, args)
    if data is None:
        return 130
    obs = data.get("observability")
    spans_ok = obs is None or obs["spans"]["every_request_traced"]
    return 0 if data["ledger"]["matches"] and spans_ok else 1


if __name__ == "__main__":
    sys.exit(main())
