"""The circuit breaker's state is shared across processes through Redis."""

import os
import uuid

import pytest

from routing.engine.resilience import CircuitBreaker, RedisBreakerStore
from routing.engine.types import Deployment
from tests.support.services import skip_or_fail

pytestmark = pytest.mark.services


@pytest.fixture
def redis_url():
    url = os.environ.get("REDIS_URL")
    if not url:
        skip_or_fail("REDIS_URL is not set")
    import redis

    try:
        redis.Redis.from_url(url).ping()
    except redis.RedisError:
        skip_or_fail(f"Redis at {url} is not reachable")
    return url


async def test_failures_seen_by_one_process_open_the_circuit_for_another(redis_url):
    prefix = f"cf:test:{uuid.uuid4().hex}:"
    worker_a = CircuitBreaker(
        RedisBreakerStore(redis_url, prefix), failure_threshold=3, cooldown_s=30
    )
    worker_b = CircuitBreaker(
        RedisBreakerStore(redis_url, prefix), failure_threshold=3, cooldown_s=30
    )
    deployment = Deployment("openai/gpt-x", {"api_base": "http://127.0.0.1:1/v1"})

    await worker_a.failed(deployment)
    await worker_b.failed(deployment)
    assert await worker_a.allow(deployment)
    await worker_a.failed(deployment)

    assert not await worker_b.allow(deployment)
    assert not await worker_a.allow(deployment)
    await worker_b.succeeded(deployment)
    assert await worker_a.allow(deployment)


async def test_open_circuit_closes_after_the_cooldown(redis_url):
    import asyncio

    prefix = f"cf:test:{uuid.uuid4().hex}:"
    breaker = CircuitBreaker(
        RedisBreakerStore(redis_url, prefix), failure_threshold=1, cooldown_s=0.2
    )
    deployment = Deployment("openai/gpt-y")

    await breaker.failed(deployment)
    assert not await breaker.allow(deployment)
    await asyncio.sleep(0.35)

    assert await breaker.allow(deployment)


async def test_a_success_clears_the_failures_its_check_saw(redis_url):
    prefix = f"cf:test:{uuid.uuid4().hex}:"
    worker_a = CircuitBreaker(
        RedisBreakerStore(redis_url, prefix), failure_threshold=3, cooldown_s=30
    )
    worker_b = CircuitBreaker(
        RedisBreakerStore(redis_url, prefix), failure_threshold=3, cooldown_s=30
    )
    deployment = Deployment("openai/gpt-z")
    await worker_a.failed(deployment)
    await worker_a.failed(deployment)

    assert await worker_b.allow(deployment)  # sees two failures
    await worker_b.succeeded(deployment)  # clears them

    await worker_a.failed(deployment)
    await worker_a.failed(deployment)
    assert await worker_b.allow(deployment)  # two failures since, not four


def counting(store, monkeypatch) -> dict[str, int]:
    """Count the Redis commands the store sends (deletes are counted, not sent)."""
    counts = {"mget": 0, "delete": 0}
    mget = store._redis.mget

    async def counted_mget(*keys):
        counts["mget"] += 1
        return await mget(*keys)

    async def delete(*keys):
        counts["delete"] += 1

    monkeypatch.setattr(store._redis, "mget", counted_mget)
    monkeypatch.setattr(store._redis, "delete", delete)
    return counts


async def test_a_healthy_deployment_costs_one_check_per_trust_window(redis_url, monkeypatch):
    import asyncio

    store = RedisBreakerStore(redis_url, f"cf:test:{uuid.uuid4().hex}:", clean_for_s=0.2)
    breaker = CircuitBreaker(store, failure_threshold=3, cooldown_s=30)
    deployment = Deployment("openai/gpt-w")
    counts = counting(store, monkeypatch)

    for _ in range(5):
        assert await breaker.allow(deployment)
        await breaker.succeeded(deployment)
    assert counts == {"mget": 1, "delete": 0}

    await asyncio.sleep(0.25)
    assert await breaker.allow(deployment)
    assert counts == {"mget": 2, "delete": 0}


async def test_a_circuit_opened_elsewhere_is_seen_once_the_trust_window_ends(redis_url):
    import asyncio

    prefix = f"cf:test:{uuid.uuid4().hex}:"
    here = CircuitBreaker(
        RedisBreakerStore(redis_url, prefix, clean_for_s=0.2), failure_threshold=3, cooldown_s=30
    )
    elsewhere = CircuitBreaker(
        RedisBreakerStore(redis_url, prefix, clean_for_s=0.2), failure_threshold=3, cooldown_s=30
    )
    deployment = Deployment("openai/gpt-v")
    assert await here.allow(deployment)  # clean: trusted for 0.2 s

    for _ in range(3):
        await elsewhere.failed(deployment)
    assert not await elsewhere.allow(deployment)
    assert await here.allow(deployment)  # at most 0.2 s behind

    await asyncio.sleep(0.25)
    assert not await here.allow(deployment)


async def test_a_failure_here_ends_the_trust_at_once(redis_url, monkeypatch):
    store = RedisBreakerStore(redis_url, f"cf:test:{uuid.uuid4().hex}:", clean_for_s=60)
    breaker = CircuitBreaker(store, failure_threshold=1, cooldown_s=30)
    deployment = Deployment("openai/gpt-u")
    assert await breaker.allow(deployment)

    await breaker.failed(deployment)

    assert not await breaker.allow(deployment)
