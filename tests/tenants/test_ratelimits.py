"""Rate limits: per API token, end user (tier) and tenant (plan), with Retry-After."""

import json
import os
import threading
from concurrent.futures import ThreadPoolExecutor

import pytest

from routing.models import UsageEvent
from tenants.models import EndUserTier, Tier
from tenants.ratelimits import Limit, RateLimited, check_and_hit
from tests.routing.test_gateway import error_of, post
from tests.support.services import skip_or_fail
from tests.support.threaded_asgi import free_port

pytestmark = [pytest.mark.django_db(transaction=True), pytest.mark.services]


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


def redis_url() -> str:
    url = os.environ.get("REDIS_URL")
    if not url:
        skip_or_fail("REDIS_URL is not set")
    return url


def test_limits_are_shared_through_redis(settings):
    url = redis_url()
    from tenants import ratelimits

    settings.REDIS_URL = url
    ratelimits.limiter.cache_clear()
    limit = Limit("token", "k-shared", 2, None, "API key cf_…test")
    # Another process's limiter: its own client on the same Redis and prefix.
    other = ratelimits.Limiter(url, settings.CASCADEFLOW_RATELIMIT_PREFIX)
    assert other.acquire([ratelimits.Window("k-shared:rpm", 2, 1)]) == (0, 0)
    check_and_hit([limit], prompt_tokens=0)

    with pytest.raises(RateLimited) as caught:
        check_and_hit([limit], prompt_tokens=0)
    assert 1 <= caught.value.retry_after <= 60
    ratelimits.limiter.cache_clear()


def two_processes(settings):
    """Two processes' limiters on the same Redis and prefix (each its own client)."""
    import uuid

    from tenants import ratelimits

    url, prefix = redis_url(), f"cf:test-rl:{uuid.uuid4().hex}"
    return ratelimits.Limiter(url, prefix), ratelimits.Limiter(url, prefix)


def tpm(name: str, allowance: int, cost: int):
    from tenants.ratelimits import Window

    return Window(f"{name}:tpm", allowance, cost)


def test_completion_tokens_ride_with_the_next_call_and_count_before_its_check(settings):
    from tenants.ratelimits import COUNT, PEEK

    here, elsewhere = two_processes(settings)
    calls = []
    script = here.redis._script
    here.redis._script = lambda **kw: calls.append(kw) or script(**kw)

    assert here.acquire([tpm("k", 10, 1)]) == (0, 0)  # a prompt of 1 token: 1 of 10
    here.count_later([tpm("k", 10, 8)])  # its completion: 8 tokens, not sent yet
    assert len(calls) == 1
    assert elsewhere.acquire([tpm("k", 10, 1)], mode=PEEK) == (0, 0)  # 1 + 1 <= 10

    refused, _ = here.acquire([tpm("k", 10, 2)])  # 1 + 8, counted first, + 2 > 10
    assert refused == 1
    assert len(calls) == 2  # the completion went with the check: no call of its own
    assert elsewhere.acquire([tpm("k", 10, 2)], mode=PEEK)[0] == 1  # now every process sees 9
    assert elsewhere.acquire([tpm("k", 10, 1)], mode=PEEK) == (0, 0)
    assert here.acquire([], mode=COUNT) == (0, 0)  # nothing left waiting: no call
    assert len(calls) == 2


def test_completion_tokens_of_a_process_gone_quiet_are_sent_on_their_own(settings):
    import time

    from tenants.ratelimits import PEEK, PENDING_FLUSH_S

    here, elsewhere = two_processes(settings)
    here.count_later([tpm("q", 10, 9)])
    assert elsewhere.acquire([tpm("q", 10, 2)], mode=PEEK) == (0, 0)

    deadline = time.monotonic() + PENDING_FLUSH_S + 2
    while elsewhere.acquire([tpm("q", 10, 2)], mode=PEEK)[0] == 0:
        assert time.monotonic() < deadline, "the waiting tokens were never sent"
        time.sleep(0.02)


def test_a_busy_process_arms_one_timer_not_one_per_request(settings, monkeypatch):
    import threading
    import time

    from tenants import ratelimits

    here, _ = two_processes(settings)
    started = []
    timer = threading.Timer

    def counted(*args, **kwargs):
        started.append(1)
        return timer(*args, **kwargs)

    monkeypatch.setattr(threading, "Timer", counted)
    began = time.monotonic()
    for _ in range(200):  # request after request: a check, then its completion
        assert here.acquire([tpm("b", 10**9, 1)]) == (0, 0)
        here.count_later([tpm("b", 10**9, 3)])

    # One timer armed at a time: at most one per PENDING_FLUSH_S the loop lasted.
    assert 1 <= len(started) <= 1 + (time.monotonic() - began) / ratelimits.PENDING_FLUSH_S


def test_charges_while_the_timer_is_armed_are_summed_and_sent_by_it(settings):
    import time

    from tenants import ratelimits

    here, elsewhere = two_processes(settings)
    here.count_later([tpm("w", 100, 5)])  # arms the timer
    here.count_later([tpm("w", 100, 7)])  # joins the same window's waiting count
    time.sleep(ratelimits.PENDING_FLUSH_S + 0.3)

    assert here._pending == {}
    assert elsewhere.acquire([tpm("w", 100, 89)], mode=ratelimits.PEEK)[0] == 1  # 12 + 89
    assert elsewhere.acquire([tpm("w", 100, 88)], mode=ratelimits.PEEK) == (0, 0)


def redis_total(prefix: str, name: str) -> int:
    """Every count of window ``name`` in Redis, whatever its minute."""
    import redis

    client = redis.Redis.from_url(redis_url())
    return sum(int(client.get(key)) for key in client.scan_iter(f"{prefix}:{name}:*"))


def test_concurrent_checks_and_charges_count_every_token_once(settings):
    """Eight threads, each a check then its completion's charge, 100 times: every token
    reaches Redis exactly once, however the charges rode (with a check or the timer)."""
    import time

    from tenants import ratelimits

    here, _ = two_processes(settings)
    barrier = threading.Barrier(8)

    def requests(_):
        barrier.wait()
        for _ in range(100):
            assert here.acquire([tpm("c", 10**9, 1)]) == (0, 0)  # the prompt: 1 token
            here.count_later([tpm("c", 10**9, 3)])  # the completion: 3 tokens

    with ThreadPoolExecutor(max_workers=8) as pool:
        list(pool.map(requests, range(8)))
    time.sleep(ratelimits.PENDING_FLUSH_S + 0.3)  # what still waited goes with the timer

    assert redis_total(here.redis._prefix, "c:tpm") == 8 * 100 * (1 + 3)


# Redis gone while completion tokens wait to be sent: they are counted in this process's
# memory instead (as every count is while Redis is away), never lost, never a 500.
REDIS_DOWN = {
    "taken by the next check": "check",
    "sent by the timer": "timer",
    "charged while Redis is paused": "paused",
}


@pytest.mark.parametrize("path", list(REDIS_DOWN.values()), ids=list(REDIS_DOWN))
def test_waiting_tokens_fall_back_to_memory_when_redis_is_down(path, caplog):
    import time

    from tenants import ratelimits

    dead = ratelimits.Limiter(f"redis://127.0.0.1:{free_port()}/0", "cf:test-rl:down")
    if path == "paused":
        assert dead.acquire([tpm("d", 10, 1)]) == (0, 0)  # fails over; Redis paused
    dead.count_later([tpm("d", 10, 8)])
    if path == "timer":
        time.sleep(ratelimits.PENDING_FLUSH_S + 0.5)

    refused, retry_after = dead.acquire([tpm("d", 10, 3)])  # 8 (+1) + 3 > 10, in memory

    assert refused == 1 and retry_after >= 1
    assert dead._pending == {}
    assert "Redis unreachable" in caplog.text


@pytest.mark.parametrize("backend", ["redis", "memory"])
def test_rate_limit_burst_of_150_lets_exactly_20_through(settings, backend):
    """Check and count are one atomic step: 150 concurrent requests, 20 rpm, 20 admitted."""
    from tenants import ratelimits

    settings.REDIS_URL = redis_url() if backend == "redis" else ""
    ratelimits.limiter.cache_clear()
    limits = [
        Limit("tenant", "t-burst", 1000, None, "the tenant"),
        Limit("token", "k-burst", 20, None, "API key cf_…test"),
    ]
    barrier = threading.Barrier(150)

    def one(_):
        barrier.wait()
        try:
            check_and_hit(limits, prompt_tokens=5)
            return True
        except RateLimited:
            return False

    with ThreadPoolExecutor(max_workers=150) as pool:
        admitted = sum(pool.map(one, range(150)))

    assert admitted == 20
    # The 130 refused by the token's limit were not counted against the tenant's.
    tenant_only = [Limit("tenant", "t-burst", 21, None, "the tenant")]
    check_and_hit(tenant_only, prompt_tokens=0)
    with pytest.raises(RateLimited):
        check_and_hit(tenant_only, prompt_tokens=0)
    ratelimits.limiter.cache_clear()


async def test_rate_limit_with_redis_down_fails_open_to_a_per_process_limit(
    api_token, settings, caplog
):
    from routing.gateway import caller
    from tenants import ratelimits

    settings.REDIS_URL = f"redis://127.0.0.1:{free_port()}/0"  # nothing listens there
    ratelimits.limiter.cache_clear()
    caller.cache_clear()  # the circuit breaker's store is on the same Redis
    api_token.token.requests_per_minute = 2
    await api_token.token.asave(update_fields=["requests_per_minute"])

    statuses = [(await post(api_token.raw, chat())).status_code for _ in range(3)]

    assert statuses == [200, 200, 429]  # counted in this process, never a 500
    assert "Redis unreachable" in caplog.text
    assert await UsageEvent.objects.filter(status="ok").acount() == 2
    ratelimits.limiter.cache_clear()
    caller.cache_clear()


def test_rate_limit_burst_of_150_on_two_processes_lets_exactly_20_through(fake_upstream):
    """The same through HTTP: two server processes sharing Redis, 150 requests at once."""
    import asyncio

    import httpx

    from tests.support.fake_upstream import fake_models_config
    from tests.support.live_server import LiveServer, postgres_available

    redis_url()
    if not postgres_available():
        skip_or_fail("PostgreSQL is not reachable for the rate-limit burst test")
    server = LiveServer(backend="postgresql", models=fake_models_config(fake_upstream.api_base))
    server.start()
    try:
        second = server.another_process()
        server.execute("UPDATE tenants_apitoken SET requests_per_minute = 20")

        async def burst():
            limits = httpx.Limits(max_connections=150)
            async with httpx.AsyncClient(timeout=60, limits=limits) as client:
                return await asyncio.gather(
                    *(
                        client.post(
                            f"{(server.base_url, second)[i % 2]}/v1/chat/completions",
                            content=chat(),
                            headers={
                                "Authorization": f"Bearer {server.token}",
                                "Content-Type": "application/json",
                            },
                        )
                        for i in range(150)
                    )
                )

        statuses = [r.status_code for r in asyncio.run(burst())]
    finally:
        server.stop()
    assert statuses.count(200) == 20
    assert statuses.count(429) == 130
