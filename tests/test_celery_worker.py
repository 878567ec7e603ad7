"""A real Celery worker process, on the broker ``make demo`` uses (no server needed)."""

import os
import subprocess
import sys
import time
from datetime import UTC, datetime, timedelta

import pytest
from celery import Celery

from tests.support.live_server import ROOT, LiveServer
from tests.support.services import skip_or_fail

pytestmark = [pytest.mark.services, pytest.mark.slow]


@pytest.fixture(scope="module", params=["filesystem", "redis"])
def worker(request, fake_upstream):
    """A worker on the broker ``make demo`` uses (filesystem), and on Redis as deployed."""
    if request.param == "redis":
        if not os.environ.get("REDIS_URL"):
            skip_or_fail("REDIS_URL is not set for the Redis-broker worker test")
        broker = os.environ["REDIS_URL"]
        extra = {"CELERY_BROKER_URL": broker}
    else:
        broker = "filesystem://"
        extra = {"CELERY_BROKER_URL": broker, "REDIS_URL": ""}
    server = LiveServer(backend="sqlite", models={}, extra_env=extra)
    server.start()  # a migrated database of its own, and its environment
    env = server.env()
    process = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "celery",
            "-A",
            "cascadeflow_site",
            "worker",
            "--concurrency",
            "1",
            "--loglevel",
            "INFO",
            "--without-gossip",
            "--without-mingle",
        ],
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    yield server, env, broker
    process.terminate()
    try:
        process.wait(timeout=15)
    except subprocess.TimeoutExpired:
        process.kill()
    server.stop()


def test_worker_reclaims_an_expired_reservation(worker):
    server, env, broker = worker
    var = env["CASCADEFLOW_VAR_DIR"]
    [(tenant_id,)] = server.query("SELECT id FROM tenants_tenant LIMIT 1")
    server.query(
        "INSERT INTO tenants_budget (tenant_id, scope, period, limit_nanos, from_plan, created_at) "
        "VALUES (%s, 'tenant', 'lifetime', 1000, FALSE, %s)",
        (tenant_id, "2026-01-01 00:00:00"),
    )
    [(budget_id,)] = server.query("SELECT id FROM tenants_budget")
    server.query(
        "INSERT INTO tenants_budgetcounter (tenant_id, budget_id, subject_id, period_start, "
        "spent_nanos, reserved_nanos) VALUES (%s, %s, 0, '1970-01-01 00:00:00', 0, 700)",
        (tenant_id, budget_id),
    )
    [(counter_id,)] = server.query("SELECT id FROM tenants_budgetcounter")
    past = (datetime.now(UTC) - timedelta(hours=1)).strftime("%Y-%m-%d %H:%M:%S")
    server.query(
        "INSERT INTO tenants_budgetreservation (tenant_id, request_id, amount_nanos, counter_ids, "
        "state, created_at, expires_at) VALUES (%s, 'req_crashed', 700, %s, 'held', %s, %s)",
        (tenant_id, f"[{counter_id}]", past, past),
    )
    options = {}
    if broker.startswith("filesystem"):
        options = {
            "data_folder_in": f"{var}/celery/queue",
            "data_folder_out": f"{var}/celery/queue",
            "control_folder": f"{var}/celery/control",
        }
    client = Celery(broker=broker, broker_transport_options=options)

    client.send_task("tenants.tasks.reservations_reclaim")

    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        [(state,)] = server.query("SELECT state FROM tenants_budgetreservation")
        if state == "expired":
            break
        time.sleep(0.2)
    assert state == "expired"
    assert server.query("SELECT reserved_nanos FROM tenants_budgetcounter") == [(0,)]
