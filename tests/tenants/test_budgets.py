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
    Budget,
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


def admit_message(
    tenant, *, limit, spent, reserved=0, full, cheap, period=BudgetPeriod.MONTH, request_id="msg"
):
    """The message of one admission against a budget with ``spent`` and ``reserved`` held."""
    budget = budget_create(
        tenant=tenant, scope=BudgetScope.TENANT, period=period, limit_nanos=limit
    )
    now = timezone.now()
    start, end = period_bounds(period, now, "UTC")
    BudgetCounter.objects.create(
        tenant=tenant,
        budget=budget,
        period_start=start,
        period_end=end,
        spent_nanos=spent,
        reserved_nanos=reserved,
    )
    admission = budget_admit(
        tenant_id=tenant.pk,
        time_zone="UTC",
        lines=[line(budget, limit=limit)],
        request_id=request_id,
        worst_case_nanos=full,
        degraded_worst_case_nanos=cheap,
        now=now,
        ttl=timedelta(minutes=5),
    )
    return admission.decision, admission.message


@pytest.mark.django_db
def test_the_message_states_what_is_spent_and_what_requests_in_progress_hold(tenant):
    decision, message = admit_message(
        tenant, limit=2_100_000_000, spent=1_760_000_000, reserved=88_000_000, full=1, cheap=1
    )

    # 88% counts both, and both are stated: 1.76 + 0.088 = 1.848 of 2.10.
    assert decision == "warn"
    assert message.startswith(
        "The monthly budget of the tenant is 88% used: $1.76 spent + $0.09 held by requests "
        "in progress, of $2.10. It resets at "
    )


@pytest.mark.django_db
def test_money_in_a_block_message_is_shown_at_the_precision_that_keeps_it_true(tenant):
    decision, message = admit_message(
        tenant, limit=20_000, spent=0, full=2_500_000, cheap=2_500_000, period=BudgetPeriod.DAY
    )

    assert decision == "block"
    assert message.startswith(
        "Budget exceeded: the daily budget of the tenant is 0% used: $0.00 spent, of $0.00002; "
        "the $0.00002 left is less than this request may cost on its cheapest model ($0.0025)."
    )
    assert "$0.00)" not in message and "$0.00 " not in message.replace("$0.00 spent", "")


@pytest.mark.django_db
def test_a_degrade_says_whether_a_threshold_or_the_worst_case_decided(tenant):
    _, worst_case = admit_message(tenant, limit=10 * USD, spent=5 * USD, full=6 * USD, cheap=USD)
    BudgetCounter.objects.all().delete()
    _, threshold = admit_message(
        tenant,
        limit=10 * USD,
        spent=int(9.2 * USD),
        full=USD // 10,
        cheap=USD // 100,
        request_id="msg-2",
    )

    assert "50% used" in worst_case and "may cost up to $6.00 on its whole chain" in worst_case
    assert "more than the $5.00 left, so only its cheapest model answers" in worst_case
    assert "past its degrade threshold" not in worst_case
    assert "92% used" in threshold and "past its degrade threshold (90%)" in threshold


@pytest.mark.parametrize(
    ("nanos", "exact", "text"),
    [
        (0, False, "$0.00"),
        (20_000, False, "$0.00002"),
        (2_640_000, False, "$0.00264"),
        (9_999_999, False, "$0.01"),
        (1_763_412_345, False, "$1.76"),
        (2_105_000_000, False, "$2.11"),
        (2_105_000_000, True, "$2.105"),
        (2_100_000_000, True, "$2.10"),
        (1_234_567_000_000, False, "$1,234.57"),
        (1, True, "$0.000000001"),
    ],
)
def test_message_money_is_true_at_every_scale(nanos, exact, text):
    from tenants.budgets import usd_text

    assert usd_text(nanos, exact=exact) == text


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
async def test_the_budget_header_counts_and_states_what_requests_in_progress_hold(
    api_token, tenant
):
    budget = await tenant_budget(tenant)
    await spend(budget, int(0.80 * USD))
    await BudgetCounter.objects.filter(budget=budget).aupdate(reserved_nanos=int(0.05 * USD))

    response = await post(api_token.raw, chat())

    assert response["x-cascade-budget"] == "warn"
    assert response["x-cascade-budget-message"].startswith(
        "The monthly budget of the tenant is 85% used: $0.80 spent + $0.05 held by requests "
        "in progress, of $1.00. It resets at "
    )


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
    from core.crypto import encrypt
    from tests.support.fake_callback import FakeCallback

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


@pytest.mark.django_db
@pytest.mark.parametrize(
    ("spent_pct", "decision", "alert"),
    [
        (70, "degrade", None),  # a worst case that does not fit: no threshold was reached
        (84, "degrade", "warn"),  # the warn threshold was reached; the degrade one was not
        (92, "degrade", "degrade"),  # past the degrade threshold
        (85, "warn", "warn"),  # a plain warn (everything fits)
    ],
)
def test_the_alert_names_the_threshold_reached_not_the_decision(tenant, spent_pct, decision, alert):
    from routing.enforcement import Enforcement, Settlement

    limit = 10 * USD
    budget = Budget.objects.create(
        tenant=tenant, scope=BudgetScope.TENANT, period=BudgetPeriod.MONTH, limit_nanos=limit
    )
    now = timezone.now()
    start, end = period_bounds(BudgetPeriod.MONTH, now, "UTC")
    spent = limit * spent_pct // 100
    BudgetCounter.objects.create(
        tenant=tenant, budget=budget, period_start=start, period_end=end, spent_nanos=spent
    )
    full = 5 * USD if decision == "degrade" else USD // 100
    lines = [line(budget, limit=limit)]
    admission = budget_admit(
        tenant_id=tenant.pk,
        time_zone="UTC",
        lines=lines,
        request_id=f"r{spent_pct}",
        worst_case_nanos=full,
        degraded_worst_case_nanos=USD // 100,
        now=now,
        ttl=timedelta(minutes=5),
    )
    assert admission.decision == decision
    settlement = Settlement.of(
        tenant_id=tenant.pk, enforcement=Enforcement(lines=lines, admission=admission)
    )
    assert (settlement.tripped.level if settlement.tripped else None) == alert
