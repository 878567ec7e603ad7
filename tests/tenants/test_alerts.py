"""Budget alert delivery is an outbox: a broker outage delays an alert, never drops it.

An alert is a row first; its email (owners and admins) and signed webhook go
out from a task, and a beat sweeper sends again what a lost or failed task
left undelivered, each channel once, with bounded attempts.
"""

import threading
from datetime import timedelta

import pytest
from asgiref.sync import sync_to_async
from django.db import connection
from django.utils import timezone

from core import outbox
from core.crypto import encrypt
from tenants import alerts
from tenants.budgets import period_bounds
from tenants.enums import BudgetPeriod, BudgetScope, MemberRole
from tenants.models import BudgetAlert, Member
from tenants.services import budget_create, user_get_or_create
from tenants.tasks import budget_alerts_deliver, budget_alerts_sweep
from tests.routing.test_gateway import post
from tests.support.broker import broker_down
from tests.support.fake_callback import FakeCallback
from tests.support.live_server import free_port
from tests.tenants.test_budgets import USD, chat, spend, tenant_budget

pytestmark = pytest.mark.django_db(transaction=True)
SECRET = "whsec_alerts"


@pytest.fixture
def hook():
    server = FakeCallback(secret=SECRET).start()
    yield server
    server.stop()


def owned(tenant, webhook_url=""):
    owner = user_get_or_create(email="owner@acme.test", password=None)
    Member.objects.create(tenant=tenant, user=owner, role=MemberRole.OWNER)
    if webhook_url:
        tenant.alert_webhook_url = webhook_url
        tenant.alert_webhook_secret = encrypt(SECRET)
        tenant.save(update_fields=["alert_webhook_url", "alert_webhook_secret"])


def an_alert(tenant, level="warn"):
    budget = budget_create(
        tenant=tenant, scope=BudgetScope.TENANT, period=BudgetPeriod.MONTH, limit_nanos=USD
    )
    start, _ = period_bounds(BudgetPeriod.MONTH, timezone.now(), tenant.time_zone)
    return BudgetAlert.objects.create(
        tenant=tenant,
        budget=budget,
        period_start=start,
        level=level,
        spent_nanos=int(0.85 * USD),
        limit_nanos=USD,
    )


def grace_passed():
    BudgetAlert.objects.update(created_at=timezone.now() - outbox.GRACE - timedelta(minutes=1))


async def test_an_alert_raised_while_the_broker_is_down_is_delivered_by_the_sweeper_once(
    api_token, tenant, hook, mailoutbox
):
    await sync_to_async(owned)(tenant, webhook_url=hook.url)
    budget = await tenant_budget(tenant)
    await spend(budget, int(0.85 * USD))

    with broker_down() as refused:
        response = await post(api_token.raw, chat())

    assert response.status_code == 200
    assert response["x-cascade-budget"] == "warn"
    assert refused == ["tenants.tasks.budget_alerts_deliver"]
    alert = await BudgetAlert.objects.aget(budget=budget)
    assert (alert.delivered_at, alert.emailed_at, alert.webhook_at) == (None, None, None)
    assert (mailoutbox, hook.received) == ([], [])

    assert await sync_to_async(budget_alerts_sweep)() == 0  # its task may still be queued
    await sync_to_async(grace_passed)()
    assert await sync_to_async(budget_alerts_sweep)() == 1
    assert await sync_to_async(budget_alerts_sweep)() == 0
    await sync_to_async(lambda: budget_alerts_deliver.delay([alert.pk]))()  # a late duplicate

    await alert.arefresh_from_db()
    assert alert.delivered_at is not None
    assert alert.attempts == 1
    assert [m.to for m in mailoutbox] == [["owner@acme.test"]]
    assert [payload["alert_id"] for payload in hook.received] == [alert.pk]
    assert hook.bad_request_signatures == 0


def test_a_failing_webhook_does_not_hold_the_email_back_and_is_sent_again_later(
    tenant, hook, mailoutbox
):
    owned(tenant, webhook_url=f"http://127.0.0.1:{free_port()}/down")
    alert = an_alert(tenant)

    with pytest.raises(alerts.DeliveryError):
        alerts.alerts_deliver(alert_ids=[alert.pk])

    alert.refresh_from_db()
    assert len(mailoutbox) == 1
    assert alert.emailed_at is not None
    assert (alert.webhook_at, alert.delivered_at, alert.delivering_until) == (None, None, None)
    assert alert.last_error.startswith("webhook: DeliveryError: webhook unreachable")

    tenant.alert_webhook_url = hook.url  # the receiver is back
    tenant.save(update_fields=["alert_webhook_url"])
    grace_passed()
    assert budget_alerts_sweep() == 1

    alert.refresh_from_db()
    assert alert.delivered_at is not None
    assert alert.last_error == ""
    assert len(mailoutbox) == 1
    assert [payload["type"] for payload in hook.received] == ["budget.warn"]


def test_two_runs_at_once_send_an_alert_once(tenant, hook, mailoutbox):
    owned(tenant, webhook_url=hook.url)
    hook.delay_s = 0.5  # the second run starts while the first is sending
    alert = an_alert(tenant)
    sent = []

    def run():
        try:
            sent.append(alerts.alerts_deliver(alert_ids=[alert.pk]))
        finally:
            connection.close()

    threads = [threading.Thread(target=run) for _ in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()

    assert sorted(sent) == [0, 1]
    assert len(hook.received) == 1
    assert len(mailoutbox) == 1


def test_an_alert_another_run_holds_is_left_to_it_until_its_lease_ends(tenant, mailoutbox):
    owned(tenant)
    alert = an_alert(tenant)
    grace_passed()
    BudgetAlert.objects.update(delivering_until=timezone.now() + timedelta(minutes=1))

    assert alerts.alerts_deliver(alert_ids=[alert.pk]) == 0
    assert alerts.alerts_due(now=timezone.now()) == []
    assert mailoutbox == []

    BudgetAlert.objects.update(delivering_until=timezone.now() - timedelta(seconds=1))
    assert budget_alerts_sweep() == 1
    assert len(mailoutbox) == 1


def test_an_undeliverable_alert_is_sent_a_bounded_number_of_times(tenant):
    owned(tenant, webhook_url=f"http://127.0.0.1:{free_port()}/down")
    alert = an_alert(tenant)
    now = alert.created_at + outbox.GRACE + timedelta(seconds=1)

    for attempt in range(1, outbox.MAX_ATTEMPTS + 1):
        assert alerts.alerts_due(now=now) == [alert.pk]
        assert alerts.alerts_due(now=now) == []
        alert.refresh_from_db()
        assert alert.next_attempt_at == now + outbox.backoff(attempt)
        now = alert.next_attempt_at

    assert alerts.alerts_due(now=now) == []
    assert alerts.alerts_given_up(now=now) == 1


def test_an_alert_older_than_a_day_is_not_sent_late(tenant, mailoutbox):
    owned(tenant)
    an_alert(tenant)
    BudgetAlert.objects.update(created_at=timezone.now() - alerts.MAX_AGE - timedelta(minutes=1))

    assert budget_alerts_sweep() == 0
    assert mailoutbox == []
