"""Rate limits: per API token, end user (tier) and tenant (plan), with Retry-After."""

import json
import os

import pytest

from routing.models import UsageEvent
from tenants.models import EndUserTier, Tier
from tenants.ratelimits import Limit, RateLimited, check_and_hit
from tests.conftest import skip_or_fail
from tests.routing.test_gateway import error_of, post

pytestmark = pytest.mark.django_db(transaction=True)


def chat(user=None):
    body = {"model": "demo/small", "messages": [{"role": "user", "content": "What is 2 + 2?"}]}
    if user:
        body["user"] = user
    return json.dumps(body)


async def test_token_rpm_refuses_with_retry_after_and_records_it(api_token):
    api_token.token.requests_per_minute = 2
    await api_token.token.asave(update_fields=["requests_per_minute"])

    first = await post(api_token.raw, chat())
    second = await post(api_token.raw, chat())
    third = await post(api_token.raw, chat())

    assert (first.status_code, second.status_code, third.status_code) == (200, 200, 429)
    error = error_of(third)
    assert error["code"] == "rate_limit_exceeded"
    assert error["type"] == "rate_limit_error"
    assert f"API key {api_token.token.mask}" in error["message"]
    assert 1 <= int(third["Retry-After"]) <= 60
    event = await UsageEvent.objects.aget(request_id=third["x-request-id"])
    assert (event.status, event.http_status) == ("rate_limited", 429)


async def test_end_user_tier_limit_applies_per_end_user(api_token, tenant):
    await EndUserTier.objects.acreate(
        tenant=tenant, slug="free", name="Free", is_default=True, requests_per_minute=1
    )

    assert (await post(api_token.raw, chat("alice"))).status_code == 200
    refused = await post(api_token.raw, chat("alice"))
    assert refused.status_code == 429
    assert "end user 'alice' (tier 'free')" in error_of(refused)["message"]
    assert (await post(api_token.raw, chat("bob"))).status_code == 200


async def test_a_refused_request_does_not_use_up_other_limits(api_token, tenant):
    plan = await Tier.objects.acreate(slug="small-plan", name="Small", requests_per_minute=3)
    tenant.tier = plan
    await tenant.asave(update_fields=["tier"])
    await EndUserTier.objects.acreate(
        tenant=tenant, slug="free", name="Free", is_default=True, requests_per_minute=1
    )

    statuses = [
        (await post(api_token.raw, chat(user))).status_code for user in ["a", "a", "a", "b", "c"]
    ]

    # a's 2nd and 3rd are refused by a's own limit and do not count against the tenant's 3.
    assert statuses == [200, 429, 429, 200, 200]
    refused = await post(api_token.raw, chat("d"))
    assert refused.status_code == 429
    assert "the tenant" in error_of(refused)["message"]


async def test_tenant_tokens_per_minute(api_token, tenant):
    plan = await Tier.objects.acreate(slug="tiny-plan", name="Tiny", tokens_per_minute=40)
    tenant.tier = plan
    await tenant.asave(update_fields=["tier"])

    statuses = [(await post(api_token.raw, chat())).status_code for _ in range(5)]

    assert statuses[0] == 200
    assert 429 in statuses
    assert "tokens per minute" in error_of(await post(api_token.raw, chat()))["message"]


def test_limits_are_shared_through_redis(settings):
    url = os.environ.get("REDIS_URL")
    if not url:
        skip_or_fail("REDIS_URL is not set")
    from limits.storage import storage_from_string
    from limits.strategies import SlidingWindowCounterRateLimiter

    from tenants import ratelimits

    settings.REDIS_URL = url
    ratelimits.limiter.cache_clear()
    limit = Limit("token", "k-shared", 2, None, "API key cf_…test")
    # Another process's limiter: its own client on the same Redis and prefix.
    other = SlidingWindowCounterRateLimiter(
        storage_from_string(url, key_prefix=settings.CASCADEFLOW_RATELIMIT_PREFIX)
    )
    from limits import RateLimitItemPerMinute

    other.hit(RateLimitItemPerMinute(2), "k-shared", "rpm")
    check_and_hit([limit], prompt_tokens=0)

    with pytest.raises(RateLimited) as caught:
        check_and_hit([limit], prompt_tokens=0)
    assert caught.value.retry_after >= 1
    ratelimits.limiter.cache_clear()
