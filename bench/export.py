"""CSV export at scale: 100 000 and 1 000 000 ledger rows, rows per second and server peak memory.

    python bench/export.py [--sizes 100000,1000000] [--json OUT]

For each size: a throwaway PostgreSQL database is seeded with that many
``UsageEvent`` rows for one tenant (``generate_series``, in SQL), a fresh
uvicorn process serves ``/api/v1/usage/export.csv`` for the whole range, the
client streams and counts the rows, and the server's peak resident memory
(``VmHWM`` from /proc) is read after the export. Targets: 1 000 000 rows in
<= 15 s, and peak memory at 1 M no more than 50 MB above the peak at 100 k.
"""

from __future__ import annotations

import argparse
import json
import os
import secrets
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx
import psycopg
from benchenv import FREE_TIER_UNLIMITED, PG_ADMIN

ROOT = Path(__file__).resolve().parent.parent

SEED = """
INSERT INTO routing_usageevent (tenant_id, token_id, end_user_id, request_id, created_at, requested_model,
    model, models_called, attempts, prompt_tokens, completion_tokens, cost_nanos, baseline_cost_nanos,
    escalated, stream, latency_ms, status, http_status, error_code, profile, domain, complexity,
    quality_score, baseline_method, degraded, budget_status)
SELECT %(tenant)s, NULL, NULL, 'req_bench_' || g, TIMESTAMPTZ '2026-10-01' + (g || ' seconds')::interval,
    'cascade/balanced', CASE WHEN g %% 3 = 0 THEN 'demo/large' ELSE 'demo/small' END,
    '["demo/small"]'::jsonb, '[]'::jsonb, 40 + g %% 50, 20 + g %% 200, 1000 + g %% 100000, 90000 + g %% 7,
    g %% 3 = 0, false, 100, 'ok', 200, '', 'cascade/balanced', 'general', 0.3, 0.8, 'estimated', false, 'allow'
FROM generate_series(1, %(rows)s) AS g
"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def peak_rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def server_env(database_url: str) -> dict:
    """The environment of a production-settings server on ``database_url``."""
    return {
        **os.environ,
        "DATABASE_URL": database_url,
        "DJANGO_DEBUG": "false",
        "DJANGO_SECRET_KEY": secrets.token_urlsafe(50),
        "DJANGO_ALLOWED_HOSTS": "127.0.0.1",
        "DJANGO_SECURE_SSL_REDIRECT": "false",
        "LITELLM_LOCAL_MODEL_COST_MAP": "True",
        "REDIS_URL": "",
        **FREE_TIER_UNLIMITED,
    }


@contextmanager
def served(env: dict) -> Iterator[tuple[str, int]]:
    """A fresh uvicorn process serving CascadeFlow with ``env``: (base URL, pid)."""
    port = free_port()
    process = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "uvicorn",
            "cascadeflow_site.asgi:application",
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--no-access-log",
            "--log-level",
            "warning",
        ],
        cwd=ROOT,
        env=env,
    )
    try:
        base = f"http://127.0.0.1:{port}"
        for _ in range(300):
            try:
                httpx.get(f"{base}/healthz", timeout=1)
                break
            except httpx.HTTPError:
                time.sleep(0.1)
        yield base, process.pid
    finally:
        process.terminate()
        process.wait(timeout=15)


def stream_export(base: str, token: str, start: str, end: str) -> tuple[int, float]:
    """Stream ``/api/v1/usage/export.csv`` for [start, end] (UTC dates): (rows, seconds)."""
    started = time.perf_counter()
    lines = 0
    with httpx.stream(
        "GET",
        f"{base}/api/v1/usage/export.csv?start={start}&end={end}",
        headers={"Authorization": f"Bearer {token}"},
        timeout=600,
    ) as response:
        response.raise_for_status()
        for chunk in response.iter_bytes():
            lines += chunk.count(b"\n")
    return lines - 1, time.perf_counter() - started


def run_size(rows: int) -> dict:
    name = f"cf_bench_export_{secrets.token_hex(3)}"
    with psycopg.connect(PG_ADMIN, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    url = f"postgres://postgres@127.0.0.1:5432/{name}"
    env = server_env(url)
    try:
        subprocess.run(
            [sys.executable, "manage.py", "migrate", "-v0"], cwd=ROOT, env=env, check=True
        )
        out = subprocess.run(
            [sys.executable, "manage.py", "create_tenant", "exporter"],
            cwd=ROOT,
            env=env,
            check=True,
            capture_output=True,
            text=True,
        ).stdout
        token = out.strip().splitlines()[-1]
        seeded = time.perf_counter()
        with psycopg.connect(url, autocommit=True) as conn:
            tenant = conn.execute(
                "SELECT id FROM tenants_tenant WHERE slug = 'exporter'"
            ).fetchone()[0]
            conn.execute(SEED, {"tenant": tenant, "rows": rows})
            conn.execute("ANALYZE routing_usageevent")
        seed_s = time.perf_counter() - seeded
        with served(env) as (base, pid):
            idle_mb = peak_rss_mb(pid)
            exported, elapsed = stream_export(base, token, "2026-10-01", "2026-12-31")
            peak_mb = peak_rss_mb(pid)
        return {
            "rows": rows,
            "exported_rows": exported,
            "seconds": elapsed,
            "rows_per_second": exported / elapsed,
            "server_peak_rss_mb": peak_mb,
            "server_idle_rss_mb": idle_mb,
            "seed_seconds": seed_s,
        }
    finally:
        with psycopg.connect(PG_ADMIN, autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--sizes", default="100000,1000000")
    parser.add_argument("--json", dest="json_out")
    args = parser.parse_args()
    results = [run_size(int(size)) for size in args.sizes.split(",")]
    print(f"\n{'rows':>10}{'exported':>10}{'seconds':>9}{'rows/s':>10}{'peak MB':>9}{'idle MB':>9}")
    for r in results:
        print(
            f"{r['rows']:>10}{r['exported_rows']:>10}{r['seconds']:>9.2f}{r['rows_per_second']:>10.0f}"
            f"{r['server_peak_rss_mb']:>9.1f}{r['server_idle_rss_mb']:>9.1f}"
        )
    big = next((r for r in results if r["rows"] == 1_000_000), None)
    small = next((r for r in results if r["rows"] == 100_000), None)
    if big and small:
        growth = big["server_peak_rss_mb"] - small["server_peak_rss_mb"]
        print(
            f"\n1M rows in {big['seconds']:.1f} s (target <= 15 s): {'MET' if big['seconds'] <= 15 else 'NOT MET'}"
        )
        print(
            f"peak memory 1M - 100k: {growth:+.1f} MB (target <= 50 MB): {'MET' if growth <= 50 else 'NOT MET'}"
        )
    if args.json_out:
        Path(args.json_out).write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
