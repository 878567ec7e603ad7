"""Budgets: periods, reserve and settle, warn / degrade / block, expiry, alerts, tiers."""

import json
from datetime import UTC, datetime, timedelta

import pytest
from asgiref.sync import sync_to_async
from django.utils import timezone

from routing.models import UsageEvent
from tenants.budgets import (
    BudgetLine,
    budget_admit,
    budget_settle,
    period_bounds,
    reservations_reclaim,
)
from tenants.enums import BudgetPeriod, BudgetScope
from tenants.models import (
    BudgetAlert,
    BudgetCounter,
    BudgetReservation,
    EndUser,
    EndUserTier,
)
from tenants.services import budget_create
from tests.engine.test_agent import HARD
from tests.routing.test_gateway import error_of, post

USD = 10**9


# --- periods ---------------------------------------------------------------------------


def test_month_rolls_over_at_local_midnight_not_utc():
    # 22:30 UTC on 31 March is already 00:30 on 1 April in Paris (CEST, UTC+2).
    start, end = period_bounds(
        BudgetPeriod.MONTH, datetime(2026, 3, 31, 22, 30, tzinfo=UTC), "Europe/Paris"
    )

    assert start == datetime(2026, 3, 31, 22, 0, tzinfo=UTC)
    assert end == datetime(2026, 4, 30, 22, 0, tzinfo=UTC)


def test_day_in_new_york_and_the_dst_change():
    start, end = period_bounds(
        BudgetPeriod.DAY, datetime(2026, 3, 8, 12, 0, tzinfo=UTC), "America/New_York"
    )

    # 8 March 2026 is the spring-forward day: it is 23 hours long.
    assert start == datetime(2026, 3, 8, 5, 0, tzinfo=UTC)
    assert end == datetime(2026, 3, 9, 4, 0, tzinfo=UTC)


def test_week_starts_on_monday_local():
    start, end = period_bounds(
        BudgetPeriod.WEEK, datetime(2026, 11, 28, 12, 0, tzinfo=UTC), "Asia/Tokyo"
    )

    assert start == datetime(2026, 11, 22, 15, 0, tzinfo=UTC)  # Monday 23 Nov 00:00 JST
    assert end - start == timedelta(days=7)


def test_lifetime_never_resets():
    start, end = period_bounds(BudgetPeriod.LIFETIME, timezone.now(), "UTC")

    assert start.year == 1970 and end is None


# --- reserve, settle, reclaim (service level) -------------------------------------------


def line(budget, limit=10 * USD, pct=(80, 90, 100)):
    return BudgetLine(budget.pk, budget.scope, budget.period, limit, 0, *pct, "the tenant")


@pytest.mark.django_db
def test_reservation_holds_the_worst_case_and_settlement_moves_it_to_spent(tenant):
    budget = budget_create(
        tenant=tenant, scope=BudgetScope.TENANT, period=BudgetPeriod.MONTH, limit_nanos=10 * USD
    )
    lines = [line(budget)]
    now = timezone.now()

    admission = budget_admit(
        tenant_id=tenant.pk,
        time_zone="UTC",
        lines=lines,
        request_id="r1",
        worst_case_nanos=3 * USD,
        degraded_worst_case_nanos=USD,
        now=now,
        ttl=timedelta(minutes=5),
    )
    counter = BudgetCounter.objects.get(budget=budget)
    assert admission.decision == "allow"
    assert (counter.spent_nanos, counter.reserved_nanos) == (0, 3 * USD)

    budget_settle(request_id=admission.reservation_key, actual_nanos=1_234_567, lines=lines)

    counter.refresh_from_db()
    assert (counter.spent_nanos, counter.reserved_nanos) == (1_234_567, 0)
    assert BudgetReservation.objects.get(request_id=admission.reservation_key).state == "settled"


@pytest.mark.django_db
def test_full_cost_not_fitting_degrades_and_nothing_fitting_blocks(tenant):
    budget = budget_create(
        tenant=tenant, scope=BudgetScope.TENANT, period=BudgetPeriod.DAY, limit_nanos=10 * USD
    )
    lines = [line(budget)]
    now = timezone.now()
    kwargs = dict(
        tenant_id=tenant.pk, time_zone="UTC", lines=lines, now=now, ttl=timedelta(minutes=5)
    )

    first = budget_admit(
        request_id="a", worst_case_nanos=6 * USD, degraded_worst_case_nanos=USD, **kwargs
    )
    second = budget_admit(
        request_id="b", worst_case_nanos=6 * USD, degraded_worst_case_nanos=USD, **kwargs
    )
    third = budget_admit(
        request_id="c", worst_case_nanos=6 * USD, degraded_worst_case_nanos=4 * USD, **kwargs
    )

    assert first.decision == "allow"
    assert second.decision == "degrade" and second.amount_nanos == USD
    assert third.decision == "block" and third.reservation_key is None
    assert "resets at" in third.message and "the tenant" in third.message
    assert BudgetCounter.objects.get(budget=budget).reserved_nanos == 7 * USD


@pytest.mark.django_db
def test_reservation_of_a_crashed_worker_expires_and_is_reclaimed(tenant):
    budget = budget_create(
        tenant=tenant, scope=BudgetScope.TENANT, period=BudgetPeriod.MONTH, limit_nanos=10 * USD
    )
    lines = [line(budget)]
    now = timezone.now()
    admission = budget_admit(
        tenant_id=tenant.pk,
        time_zone="UTC",
        lines=lines,
        request_id="crash",
        worst_case_nanos=4 * USD,
        degraded_worst_case_nanos=USD,
        now=now,
        ttl=timedelta(minutes=15),
    )

    assert reservations_reclaim(now=now + timedelta(minutes=14)) == 0
    assert reservations_reclaim(now=now + timedelta(minutes=16)) == 1
    counter = BudgetCounter.objects.get(budget=budget)
    assert counter.reserved_nanos == 0
    assert BudgetReservation.objects.get(request_id=admission.reservation_key).state == "expired"

    # The worker was only slow: its late settlement adds the spend and releases nothing twice.
    budget_settle(request_id=admission.reservation_key, actual_nanos=500, lines=lines)
    counter.refresh_from_db()
    assert (counter.spent_nanos, counter.reserved_nanos) == (500, 0)


# --- through the gateway ----------------------------------------------------------------

pytestmark_gateway = pytest.mark.django_db(transaction=True)


def chat(model="demo/small", content="What is 2 + 2?", **extra):
    return json.dumps({"model": model, "messages": [{"role": "user", "content": content}], **extra})


@sync_to_async
def spend(budget, nanos, subject_id=0):
    start, end = period_bounds(budget.period, timezone.now(), budget.tenant.time_zone)
    BudgetCounter.objects.update_or_create(
        budget=budget,
        subject_id=subject_id,
        period_start=start,
        defaults={"tenant": budget.tenant, "period_end": end, "spent_nanos": nanos},
    )


@sync_to_async
def tenant_budget(tenant, limit=USD, **kwargs):
    return budget_create(
        tenant=tenant,
        scope=BudgetScope.TENANT,
        period=BudgetPeriod.MONTH,
        limit_nanos=limit,
        **kwargs,
    )


@pytestmark_gateway
async def test_allow_has_no_budget_header_and_settles_to_the_ledger(api_token, tenant):
    budget = await tenant_budget(tenant)

    response = await post(api_token.raw, chat())

    assert response.status_code == 200
    assert "x-cascade-budget" not in response
    event = await UsageEvent.objects.aget(request_id=response["x-request-id"])
    counter = await BudgetCounter.objects.aget(budget=budget)
    assert counter.spent_nanos == event.cost_nanos > 0
    assert counter.reserved_nanos == 0
    assert event.budget_status == "allow"


@pytestmark_gateway
async def test_warn_sets_the_header_and_sends_one_alert(
    api_token, tenant, mailoutbox, django_user_model
):
    from tenants.models import Member
    from tenants.services import user_get_or_create

    owner = await sync_to_async(user_get_or_create)(email="owner@acme.test", password=None)
    await Member.objects.acreate(tenant=tenant, user=owner, role="owner")
    budget = await tenant_budget(tenant)
    await spend(budget, int(0.85 * USD))

    first = await post(api_token.raw, chat())
    second = await post(api_token.raw, chat())

    assert first["x-cascade-budget"] == "warn"
    assert "85% used" in first["x-cascade-budget-message"]
    assert second["x-cascade-budget"] == "warn"
    alerts = [a async for a in BudgetAlert.objects.filter(budget=budget)]
    assert [a.level for a in alerts] == ["warn"]
    assert len(mailoutbox) == 1
    assert "warning threshold" in mailoutbox[0].body
    assert mailoutbox[0].to == ["owner@acme.test"]


@pytestmark_gateway
async def test_degrade_cuts_the_chain_to_the_cheap_model(api_token, tenant):
    budget = await tenant_budget(tenant)
    await spend(budget, int(0.92 * USD))

    response = await post(api_token.raw, chat("cascade/quality_first", HARD[0]["content"]))

    assert response.status_code == 200
    assert response["x-cascade-budget"] == "degrade"
    assert response["x-cascade-model"] == "demo/small"
    assert response["x-cascade-escalated"] == "false"
    event = await UsageEvent.objects.aget(request_id=response["x-request-id"])
    assert event.models_called == ["demo/small"]
    assert event.budget_status == "degrade"


@pytestmark_gateway
async def test_block_is_a_402_naming_the_budget_and_its_reset(api_token, tenant):
    await sync_to_async(lambda: setattr(tenant, "time_zone", "Europe/Paris") or tenant.save())()
    budget = await tenant_budget(tenant)
    await spend(budget, USD)

    response = await post(api_token.raw, chat())

    assert response.status_code == 402
    error = error_of(response)
    assert error["code"] == "budget_exceeded"
    assert error["type"] == "insufficient_quota"
    assert "monthly budget of the tenant" in error["message"]
    assert "resets at" in error["message"]
    assert any(offset in error["message"] for offset in ("+01:00", "+02:00"))  # Paris time
    event = await UsageEvent.objects.aget(request_id=response["x-request-id"])
    assert (event.status, event.http_status, event.cost_nanos) == ("blocked", 402, 0)


@pytestmark_gateway
async def test_token_budget_names_the_token(api_token, tenant):
    budget = await sync_to_async(budget_create)(
        tenant=tenant,
        scope=BudgetScope.TOKEN,
        period=BudgetPeriod.DAY,
        limit_nanos=USD,
        token=api_token.token,
    )
    await spend(budget, USD)

    response = await post(api_token.raw, chat())

    assert response.status_code == 402
    assert f"API key {api_token.token.mask}" in error_of(response)["message"]
    assert "daily budget" in error_of(response)["message"]


@pytestmark_gateway
async def test_tier_budget_counts_each_end_user_and_their_own_budget_replaces_it(api_token, tenant):
    tier = await EndUserTier.objects.acreate(
        tenant=tenant, slug="free", name="Free", is_default=True
    )
    tier_budget = await sync_to_async(budget_create)(
        tenant=tenant, scope=BudgetScope.TIER, period=BudgetPeriod.MONTH, limit_nanos=USD, tier=tier
    )
    alice = await EndUser.objects.acreate(tenant=tenant, external_id="alice")
    await EndUser.objects.acreate(tenant=tenant, external_id="bob", tier=tier)
    await spend(tier_budget, USD, subject_id=alice.pk)  # alice is on the default tier: exhausted

    assert (await post(api_token.raw, chat(user="alice"))).status_code == 402
    assert (await post(api_token.raw, chat(user="bob"))).status_code == 200

    await sync_to_async(budget_create)(
        tenant=tenant,
        scope=BudgetScope.END_USER,
        period=BudgetPeriod.MONTH,
        limit_nanos=5 * USD,
        end_user=alice,
    )
    assert (await post(api_token.raw, chat(user="alice"))).status_code == 200


@pytestmark_gateway
async def test_tier_restricts_models(api_token, tenant):
    await EndUserTier.objects.acreate(
        tenant=tenant, slug="free", name="Free", is_default=True, allowed_models=["demo/small"]
    )

    assert (await post(api_token.raw, chat("demo/small", user="carol"))).status_code == 200
    response = await post(api_token.raw, chat("demo/large", user="carol"))
    assert response.status_code == 403
    assert "'free' tier" in error_of(response)["message"]


@pytestmark_gateway
async def test_thresholds_are_configurable_per_budget(api_token, tenant):
    budget = await tenant_budget(tenant, warn_pct=10, degrade_pct=20, block_pct=30)
    await spend(budget, int(0.35 * USD))

    assert (await post(api_token.raw, chat())).status_code == 402


@pytestmark_gateway
async def test_alert_goes_to_the_signed_webhook_once(api_token, tenant):
    from cascadeflow_site.crypto import encrypt
    from tests.fake_callback import FakeCallback

    hook = FakeCallback(secret="whsec_alerts").start()
    try:
        tenant.alert_webhook_url = hook.url
        tenant.alert_webhook_secret = encrypt("whsec_alerts")
        await tenant.asave(update_fields=["alert_webhook_url", "alert_webhook_secret"])
        budget = await tenant_budget(tenant)
        await spend(budget, int(0.95 * USD))

        await post(api_token.raw, chat())
        await post(api_token.raw, chat())

        assert [payload["type"] for payload in hook.received] == ["budget.degrade"]
        assert hook.bad_request_signatures == 0
        assert hook.received[0]["limit_usd"] == "1"
    finally:
        hook.stop()
