"""Tenant budget callbacks: signed both ways, strict timeout, cached, with a fallback."""

import json
import time

import pytest
from asgiref.sync import sync_to_async

from core.crypto import encrypt
from routing.models import UsageEvent
from tenants.enums import BudgetPeriod, BudgetScope
from tenants.models import BudgetCounter
from tenants.services import budget_create
from tests.engine.test_agent import HARD
from tests.routing.test_gateway import error_of, post
from tests.support.fake_callback import FakeCallback

pytestmark = pytest.mark.django_db(transaction=True)
SECRET = "whsec_test_callback_secret"


@pytest.fixture
def callback(tenant):
    server = FakeCallback(secret=SECRET).start()
    tenant.budget_callback_url = server.url
    tenant.budget_callback_secret = encrypt(SECRET)
    tenant.budget_callback_timeout_ms = 300
    tenant.budget_callback_cache_seconds = 0
    tenant.save()
    budget_create(
        tenant=tenant, scope=BudgetScope.TENANT, period=BudgetPeriod.MONTH, limit_nanos=10**9
    )
    yield server
    server.stop()


def chat(content="What is 2 + 2?", model="demo/small"):
    return json.dumps(
        {"model": model, "messages": [{"role": "user", "content": content}], "user": "dana"}
    )


async def test_callback_receives_signed_budget_context(api_token, callback):
    response = await post(api_token.raw, chat())

    assert response.status_code == 200
    assert response["x-cascade-budget-callback"] == "callback"
    [context] = callback.received
    assert callback.bad_request_signatures == 0
    assert context["end_user"] == "dana"
    assert context["decision"] == "allow"
    [budget] = context["budgets"]
    assert budget["scope"] == "tenant" and budget["limit_usd"] == "1"
    assert budget["resets_at"]


async def test_callback_block_is_a_402_with_its_message_and_frees_the_reservation(
    api_token, callback, tenant
):
    callback.decision, callback.message = "block", "Dana's plan is paused."

    response = await post(api_token.raw, chat())

    assert response.status_code == 402
    assert error_of(response)["message"] == "Dana's plan is paused."
    counter = await BudgetCounter.objects.aget(budget__tenant=tenant)
    assert (counter.spent_nanos, counter.reserved_nanos) == (0, 0)
    event = await UsageEvent.objects.aget(request_id=response["x-request-id"])
    assert event.status == "blocked"


async def test_callback_degrade_cuts_the_chain(api_token, callback):
    callback.decision = "degrade"

    response = await post(api_token.raw, chat(HARD[0]["content"], "cascade/quality_first"))

    assert response["x-cascade-budget"] == "degrade"
    assert response["x-cascade-model"] == "demo/small"


async def test_slow_callback_falls_back_within_the_timeout(api_token, callback, tenant):
    callback.delay_s, callback.decision = 2.0, "block"
    tenant.budget_callback_fallback = "degrade"
    await tenant.asave(update_fields=["budget_callback_fallback"])

    started = time.perf_counter()
    response = await post(api_token.raw, chat())
    elapsed = time.perf_counter() - started

    assert elapsed < 1.5  # never waits for the tenant's server
    assert response["x-cascade-budget-callback"] == "fallback"
    assert response["x-cascade-budget"] == "degrade"


async def test_forged_answer_is_rejected(api_token, callback):
    callback.decision = "allow"
    callback.answer_secret = "not-the-secret"
    tenant_fallback = "block"
    from tenants.models import Tenant

    await Tenant.objects.filter(slug="acme").aupdate(budget_callback_fallback=tenant_fallback)

    response = await post(api_token.raw, chat())

    assert response.status_code == 402  # the forged "allow" was ignored; the fallback blocked
    assert response["x-cascade-budget-callback"] == "fallback"


async def test_decisions_are_cached(api_token, callback, tenant):
    tenant.budget_callback_cache_seconds = 60
    await tenant.asave(update_fields=["budget_callback_cache_seconds"])

    first = await post(api_token.raw, chat())
    second = await post(api_token.raw, chat())

    assert first["x-cascade-budget-callback"] == "callback"
    assert second["x-cascade-budget-callback"] == "cache"
    assert len(callback.received) == 1


async def test_callback_cannot_loosen_an_exhausted_budget(api_token, callback, tenant):
    callback.decision = "allow"
    from django.utils import timezone

    from tenants.budgets import period_bounds

    @sync_to_async
    def exhaust():
        budget = tenant.budgets.get()
        start, end = period_bounds(budget.period, timezone.now(), tenant.time_zone)
        BudgetCounter.objects.create(
            tenant=tenant, budget=budget, period_start=start, period_end=end, spent_nanos=10**9
        )

    await exhaust()

    response = await post(api_token.raw, chat())

    assert response.status_code == 402
    assert error_of(response)["code"] == "budget_exceeded"
    assert callback.received == []  # blocked before asking


async def test_plain_http_callbacks_are_refused_in_production(api_token, callback, settings):
    settings.CASCADEFLOW_ALLOW_HTTP_CALLBACKS = False

    response = await post(api_token.raw, chat())

    assert response["x-cascade-budget-callback"] == "fallback"
    assert callback.received == []


@pytest.mark.parametrize(
    "answer",
    [
        b"not json",
        b"[" * 100_000 + b"]" * 100_000,
        b'{"decision": ' + b"[" * 100_000 + b"]" * 100_000 + b"}",
        b'{"decision": "allow", "n": ' + b"1" * 5000 + b"}",
        b'["allow"]',
        b'"allow"',
        b'{"decision": ["allow"]}',
        b'{"decision": "approve"}',
        b'{"message": "no decision"}',
        b"\xff\xfe",
    ],
    ids=[
        "not JSON",
        "nested 100,000 deep",
        "decision nested 100,000 deep",
        "a 5,000-digit number",
        "a list",
        "a string",
        "decision not a string",
        "unknown decision",
        "no decision",
        "not UTF-8",
    ],
)
async def test_a_signed_answer_that_is_not_a_decision_falls_back(
    api_token, callback, tenant, answer
):
    # The tenant's server signed it, so it is theirs; still, the request gets the fallback,
    # never a 500.
    callback.raw_answer = answer
    tenant.budget_callback_fallback = "degrade"
    await tenant.asave(update_fields=["budget_callback_fallback"])

    response = await post(api_token.raw, chat())

    assert response.status_code == 200
    assert response["x-cascade-budget-callback"] == "fallback"
    assert response["x-cascade-budget"] == "degrade"
    counter = await BudgetCounter.objects.aget(budget__tenant=tenant)
    assert counter.reserved_nanos == 0 and counter.spent_nanos > 0
