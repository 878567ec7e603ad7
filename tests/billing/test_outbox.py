"""A broker outage delays billing's background work but never loses it.

Stripe events and export jobs are rows first; while the broker refuses their
task the request still succeeds, and the beat sweepers send them again once
they are a grace period old, with bounded attempts, and each is done once.
"""

import csv
import hashlib
import hmac
import json
import threading
import time
from datetime import UTC, datetime, timedelta

import httpx
import pytest
from celery.exceptions import SoftTimeLimitExceeded
from django.db import connection
from django.utils import timezone
from rest_framework.test import APIClient

from billing import exports, services
from billing.models import ExportJob, StripeEvent
from billing.tasks import (
    export_job_run,
    export_jobs_sweep,
    stripe_event_process,
    stripe_events_sweep,
)
from core import outbox
from tenants.enums import MemberRole
from tenants.models import Tier
from tenants.services import tier_ensure_defaults
from tests.billing.test_webhooks import SECRET, deliver, event, product
from tests.factories import UsageEventFactory, member_login
from tests.support.broker import broker_down
from tests.support.live_server import LiveServer, free_port
from tests.support.services import skip_or_fail

pytestmark = [pytest.mark.django_db(transaction=True), pytest.mark.services]


@pytest.fixture(autouse=True)
def stripe_settings(settings, tmp_path):
    settings.STRIPE_WEBHOOK_SECRET = SECRET
    settings.VAR_DIR = tmp_path
    tier_ensure_defaults()


@pytest.fixture
def dispatches(monkeypatch):
    """How many times a Stripe event's effects were applied (each call of the dispatcher)."""
    applied = []
    real = services._dispatch

    def counting(stored, now):
        applied.append(stored.event_id)
        return real(stored, now)

    monkeypatch.setattr(services, "_dispatch", counting)
    return applied


@pytest.fixture
def row_locks():
    """Two workers racing for a row: PostgreSQL's row locks (SQLite's in-memory test
    database refuses concurrent writers instead of queueing them)."""
    if connection.vendor != "postgresql":
        skip_or_fail("this race needs PostgreSQL's row locks")


def grace_passed(model, field):
    """Every row of ``model`` was stored a grace period (and a minute) ago."""
    earlier = timezone.now() - outbox.GRACE - timedelta(minutes=1)
    model.objects.update(**{field: earlier})


# --- Stripe events ----------------------------------------------------------------------


def test_a_webhook_while_the_broker_is_down_is_acknowledged_then_applied_once(client, dispatches):
    with broker_down() as refused:
        response = deliver(client, event("product.created", product(), event_id="evt_outage"))

    assert response.status_code == 200
    assert response.json() == {"received": True, "duplicate": False}
    assert refused == ["billing.tasks.stripe_event_process"]
    stored = StripeEvent.objects.get(event_id="evt_outage")
    assert stored.processed_at is None
    assert not Tier.objects.filter(slug="pro").exists()

    assert stripe_events_sweep() == 0  # younger than the grace period: its task may be queued
    grace_passed(StripeEvent, "received_at")
    assert stripe_events_sweep() == 1
    assert stripe_events_sweep() == 0

    stored.refresh_from_db()
    assert stored.processed_at is not None
    assert stored.outcome == "created tier pro"
    assert stored.attempts == 1
    assert Tier.objects.filter(slug="pro").count() == 1
    assert dispatches == ["evt_outage"]


def test_an_event_sent_twice_is_applied_once(client, dispatches):
    deliver(client, event("product.created", product(), event_id="evt_twice"))
    stored = StripeEvent.objects.get(event_id="evt_twice")

    again = stripe_event_process.delay(stored.pk).get()

    assert again == "created tier pro"
    assert dispatches == ["evt_twice"]


def test_an_event_processed_by_two_workers_at_once_is_applied_once(client, monkeypatch, row_locks):
    with broker_down():
        deliver(client, event("product.created", product(), event_id="evt_race"))
    stored = StripeEvent.objects.get(event_id="evt_race")
    applied = []
    real = services._dispatch

    def slow(event_row, now):
        applied.append(event_row.event_id)
        time.sleep(0.3)  # the other worker arrives while this one holds the row
        return real(event_row, now)

    monkeypatch.setattr(services, "_dispatch", slow)
    outcomes = []

    def worker():
        try:
            outcomes.append(services.event_process(event_pk=stored.pk))
        finally:
            connection.close()

    threads = [threading.Thread(target=worker) for _ in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()

    assert applied == ["evt_race"]
    assert outcomes == ["created tier pro", "created tier pro"]


def test_the_sweeper_skips_an_event_a_worker_holds(client, row_locks):
    with broker_down():
        deliver(client, event("product.created", product(), event_id="evt_held"))
    grace_passed(StripeEvent, "received_at")
    held, release = threading.Event(), threading.Event()

    def worker():
        from django.db import transaction

        try:
            with transaction.atomic():
                StripeEvent.objects.select_for_update().get(event_id="evt_held")
                held.set()
                release.wait(5)
        finally:
            connection.close()

    thread = threading.Thread(target=worker)
    thread.start()
    held.wait(5)
    try:
        assert services.events_due(now=timezone.now()) == []
    finally:
        release.set()
        thread.join()
    assert len(services.events_due(now=timezone.now())) == 1


def test_a_failing_event_keeps_its_error_and_is_sent_again_with_backoff_until_attempts_run_out(
    client, monkeypatch
):
    def broken(event_row, now):
        raise RuntimeError("tier table unavailable\nwith a second line")

    monkeypatch.setattr(services, "_dispatch", broken)

    response = deliver(client, event("product.created", product(), event_id="evt_broken"))

    assert response.status_code == 200  # stored: Stripe must not resend, the sweeper will
    stored = StripeEvent.objects.get(event_id="evt_broken")
    assert (stored.processed_at, stored.attempts) == (None, 0)
    assert stored.last_error == "RuntimeError: tier table unavailable"
    now = stored.received_at + outbox.GRACE + timedelta(seconds=1)
    for attempt in range(1, outbox.MAX_ATTEMPTS + 1):
        assert services.events_due(now=now) == [stored.pk]
        assert services.events_due(now=now) == []  # not due again before its backoff
        stored.refresh_from_db()
        assert (stored.attempts, stored.next_attempt_at) == (attempt, now + outbox.backoff(attempt))
        now = stored.next_attempt_at

    assert services.events_due(now=now + timedelta(days=30)) == []
    assert services.events_given_up() == 1
    assert [outbox.backoff(n) for n in range(1, outbox.MAX_ATTEMPTS + 1)] == [
        timedelta(minutes=m) for m in (2, 4, 8, 16, 32, 60, 60, 60)
    ]


def test_a_failed_event_is_applied_by_the_sweeper_once_it_can_be(client, monkeypatch):
    real, failing = services._dispatch, [True]

    def flaky(event_row, now):
        if failing[0]:
            raise OSError("connection reset")
        return real(event_row, now)

    monkeypatch.setattr(services, "_dispatch", flaky)
    deliver(client, event("product.created", product(), event_id="evt_later"))
    assert StripeEvent.objects.get().last_error == "OSError: connection reset"
    failing[0] = False
    grace_passed(StripeEvent, "received_at")

    assert stripe_events_sweep() == 1

    stored = StripeEvent.objects.get(event_id="evt_later")
    assert stored.processed_at is not None
    assert stored.last_error == ""
    assert Tier.objects.filter(slug="pro").exists()


def test_a_sweep_while_the_broker_is_still_down_loses_nothing(client, dispatches):
    with broker_down():
        deliver(client, event("product.created", product(), event_id="evt_long_outage"))
        grace_passed(StripeEvent, "received_at")
        assert stripe_events_sweep() == 1  # claimed, but its message was refused too

    stored = StripeEvent.objects.get(event_id="evt_long_outage")
    assert stored.processed_at is None
    assert stripe_events_sweep() == 0  # backing off
    StripeEvent.objects.update(next_attempt_at=timezone.now() - timedelta(seconds=1))
    assert stripe_events_sweep() == 1
    stored.refresh_from_db()
    assert stored.processed_at is not None
    assert dispatches == ["evt_long_outage"]


# --- export jobs ------------------------------------------------------------------------


def ledger(tenant, n=3):
    base = datetime(2026, 11, 20, 12, 0, tzinfo=UTC)
    for i in range(n):
        UsageEventFactory(
            tenant=tenant,
            request_id=f"req_outbox_{i}",
            created_at=base + timedelta(minutes=i),
            cost_nanos=1_000 + i,
            baseline_cost_nanos=0,
        )


def api(raw):
    client = APIClient()
    client.credentials(HTTP_AUTHORIZATION=f"Bearer {raw}")
    return client


def job_page(client, tenant, job):
    return client.get(f"/dashboard/t/{tenant.slug}/exports/jobs/{job.pk}/")


@pytest.fixture
def builds(monkeypatch):
    """The jobs whose file was written, in order."""
    built = []
    real = exports._export_write

    def counting(job, path):
        built.append(job.pk)
        return real(job, path)

    monkeypatch.setattr(exports, "_export_write", counting)
    return built


def test_an_export_requested_while_the_broker_is_down_is_queued_then_built_once(
    api_token, tenant, builds
):
    ledger(tenant)

    with broker_down() as refused:
        response = api(api_token.raw).post(
            "/api/v1/usage/exports/", {"start": "2026-11-20", "end": "2026-11-20"}, format="json"
        )

    assert response.status_code == 202
    assert response.json()["status"] == "queued"
    assert refused == ["billing.tasks.export_job_run"]
    job = ExportJob.objects.get(pk=response.json()["id"])
    assert job.status == "queued"

    assert export_jobs_sweep() == 0
    grace_passed(ExportJob, "created_at")
    assert export_jobs_sweep() == 1
    assert export_jobs_sweep() == 0
    assert export_job_run.delay(job.pk).get() == "done"  # a late duplicate message

    job.refresh_from_db()
    assert (job.status, job.rows_written, job.attempts) == ("done", 3, 1)
    assert builds == [job.pk]
    with open(job.file_path, encoding="utf-8") as f:
        assert len(list(csv.reader(f))) == 4


def test_a_background_export_from_the_dashboard_survives_the_outage(client, tenant, builds):
    ledger(tenant)
    member_login(client, tenant, MemberRole.VIEWER)

    with broker_down():
        created = client.post(
            f"/dashboard/t/{tenant.slug}/exports/",
            {"start": "2026-11-01", "end": "2026-11-30", "action": "background"},
        )

    job = ExportJob.objects.get(tenant=tenant)
    assert created.status_code == 302
    assert created["Location"] == f"/dashboard/t/{tenant.slug}/exports/jobs/{job.pk}/"
    assert b'http-equiv="refresh"' in job_page(client, tenant, job).content

    grace_passed(ExportJob, "created_at")
    export_jobs_sweep()

    page = job_page(client, tenant, job)
    assert page.context["job"].status == "done"
    assert b'http-equiv="refresh"' not in page.content
    assert builds == [job.pk]


@pytest.mark.parametrize(
    ("crash", "message"),
    [
        (
            RuntimeError("disk on fire\nTraceback (most recent call last):"),
            "RuntimeError: disk on fire",
        ),
        (OSError(28, "No space left on device"), "OSError: [Errno 28] No space left on device"),
        (
            SoftTimeLimitExceeded(),
            "The export took longer than its time limit; try a shorter range.",
        ),
    ],
)
def test_a_crashing_export_ends_failed_with_its_reason_and_the_page_stops_polling(
    client, tenant, api_token, monkeypatch, tmp_path, crash, message
):
    ledger(tenant)
    member_login(client, tenant, MemberRole.VIEWER)

    def crashing(**kwargs):
        yield "header\r\n"
        raise crash

    monkeypatch.setattr(exports, "rows", crashing)
    job = exports.export_job_queue(
        tenant_id=tenant.pk,
        start=datetime(2026, 11, 20, tzinfo=UTC),
        end=datetime(2026, 11, 21, tzinfo=UTC),
        focus=False,
    )

    job.refresh_from_db()
    assert (job.status, job.error, job.file_path) == ("failed", message, "")
    assert job.finished_at is not None
    assert list((tmp_path / "exports").iterdir()) == []  # no half-written file is left
    page = job_page(client, tenant, job)
    assert b'http-equiv="refresh"' not in page.content
    assert b"Traceback" not in page.content
    assert message.encode() in page.content
    reported = api(api_token.raw).get(f"/api/v1/usage/exports/{job.pk}/").json()
    assert (reported["status"], reported["error"], reported["download_url"]) == (
        "failed",
        message,
        None,
    )
    assert export_jobs_sweep() == 0  # a failed job is final


def test_a_job_no_worker_takes_fails_after_its_last_attempt(client, tenant):
    member_login(client, tenant, MemberRole.VIEWER)
    with broker_down():
        job = exports.export_job_queue(
            tenant_id=tenant.pk,
            start=datetime(2026, 11, 20, tzinfo=UTC),
            end=datetime(2026, 11, 21, tzinfo=UTC),
            focus=False,
        )
        now = job.created_at + outbox.GRACE + timedelta(seconds=1)
        for _ in range(outbox.MAX_ATTEMPTS):
            assert exports.export_jobs_due(now=now) == [job.pk]
            job.refresh_from_db()
            now = job.next_attempt_at
        assert job.status == "queued"

        assert exports.export_jobs_due(now=now) == []

    job.refresh_from_db()
    assert job.status == "failed"
    assert job.error == "The export could not be started (no worker took it); try again later."
    assert b'http-equiv="refresh"' not in job_page(client, tenant, job).content


def test_a_running_job_that_outlived_its_worker_fails(tenant):
    now = timezone.now()
    limit = timedelta(seconds=exports.EXPORT_TIME_LIMIT_S) + outbox.GRACE
    window = {
        "start": datetime(2026, 11, 20, tzinfo=UTC),
        "end": datetime(2026, 11, 21, tzinfo=UTC),
    }
    lost = ExportJob.objects.create(
        tenant=tenant, status="running", started_at=now - limit - timedelta(seconds=1), **window
    )
    busy = ExportJob.objects.create(
        tenant=tenant, status="running", started_at=now - limit + timedelta(minutes=1), **window
    )

    assert exports.export_jobs_due(now=now) == []

    lost.refresh_from_db()
    busy.refresh_from_db()
    assert (lost.status, busy.status) == ("failed", "running")
    assert lost.error == "The export stopped before it finished (its worker was lost); try again."


# --- a real broker that is unreachable ----------------------------------------------------


def test_with_the_real_broker_unreachable_webhooks_and_exports_still_answer():
    closed = f"redis://127.0.0.1:{free_port()}/0"
    server = LiveServer(
        backend="sqlite",
        models={},
        extra_env={"CELERY_BROKER_URL": closed, "STRIPE_WEBHOOK_SECRET": SECRET},
    ).start()
    try:
        body = json.dumps(event("product.created", product(), event_id="evt_live"))
        t = int(time.time())
        signature = hmac.new(SECRET.encode(), f"{t}.{body}".encode(), hashlib.sha256).hexdigest()
        started = time.monotonic()
        webhook = httpx.post(
            f"{server.base_url}/billing/stripe/webhook/",
            content=body,
            headers={
                "Content-Type": "application/json",
                "Stripe-Signature": f"t={t},v1={signature}",
            },
            timeout=30,
        )
        export = httpx.post(
            f"{server.base_url}/api/v1/usage/exports/",
            json={"start": "2026-11-20", "end": "2026-11-20"},
            headers={"Authorization": f"Bearer {server.token}"},
            timeout=30,
        )
        elapsed = time.monotonic() - started

        assert webhook.status_code == 200, server.log()
        assert export.status_code == 202, server.log()
        assert export.json()["status"] == "queued"
        assert elapsed < 20
        assert server.query(
            "SELECT processed_at, attempts FROM billing_stripeevent WHERE event_id = %s",
            ("evt_live",),
        ) == [(None, 0)]
        assert server.query("SELECT status FROM billing_exportjob") == [("queued",)]
        assert "a sweeper will send it again" in server.log()
    finally:
        server.stop()
