"""Which failures count against a deployment's circuit breaker: only the deployment's own.

The breaker is shared by every tenant; a request that is at fault itself (text
that cannot be encoded, an answer of 400, 413 or 422) must never switch a model
off for everyone.
"""

import pytest

from routing.engine.resilience import (
    Caller,
    CircuitBreaker,
    MemoryBreakerStore,
    UpstreamError,
    classify,
)
from routing.engine.types import Deployment, ModelSpec
from routing.providers.catalog import demo_catalog_models
from tests.support.fake_upstream import Behaviour

SMALL = demo_catalog_models()[0]
SURROGATE = [{"role": "user", "content": "\ud800"}]


def fake_spec(upstream, *models):
    deployments = tuple(
        Deployment(f"openai/{m}", {"api_base": upstream.api_base, "api_key": "sk-fake"})
        for m in models
    )
    base = ModelSpec.simple("fake/m", input_usd_per_mtok=1.0, output_usd_per_mtok=2.0)
    return ModelSpec(name="fake/m", deployments=deployments, price=base.price)


def trip_wire() -> tuple[Caller, MemoryBreakerStore]:
    """A breaker that opens on the first failure counted against a deployment."""
    store = MemoryBreakerStore()
    breaker = CircuitBreaker(store, failure_threshold=1, window_s=60, cooldown_s=60)
    return Caller(breaker=breaker, backoff_s=0.0), store


async def call(caller, spec, messages, *, stream):
    attempts = []
    if stream:
        await caller.open_stream(spec, {"messages": messages}, attempts, role="final")
    else:
        await caller.complete(spec, {"messages": messages}, attempts, role="final")
    return attempts


@pytest.mark.parametrize("stream", [False, True])
async def test_text_that_cannot_be_encoded_is_the_requests_fault(stream):
    caller, store = trip_wire()

    for _ in range(3):
        with pytest.raises(UpstreamError) as raised:
            await call(caller, SMALL, SURROGATE, stream=stream)

        failure = raised.value.failure
        assert (failure.retryable, failure.status, failure.code) == (False, 400, "invalid_request")
        assert "Traceback" not in failure.message and "/" not in failure.message
    assert store._failures == {} and store._open_until == {}
    assert all([await caller.breaker.allow(d) for d in SMALL.deployments])


@pytest.mark.parametrize("stream", [False, True])
@pytest.mark.parametrize(("status", "answered"), [(400, 400), (413, 413), (422, 400)])
async def test_a_providers_client_error_is_not_retried_and_not_counted(
    upstream, stream, status, answered
):
    upstream.behaviours["primary"] = Behaviour(fail_status=status)
    spec = fake_spec(upstream, "primary", "secondary")
    caller, store = trip_wire()

    with pytest.raises(UpstreamError) as raised:
        await call(caller, spec, [{"role": "user", "content": "hi"}], stream=stream)

    assert raised.value.failure.retryable is False
    assert raised.value.failure.status == answered
    assert [r["model"] for r in upstream.requests] == ["primary"]  # no retry, no fallback
    assert store._failures == {} and store._open_until == {}


@pytest.mark.parametrize("stream", [False, True])
async def test_a_deployments_own_failure_still_opens_its_circuit(upstream, stream):
    upstream.behaviours["primary"] = Behaviour(fail_status=500)
    spec = fake_spec(upstream, "primary", "secondary")
    caller, _ = trip_wire()

    attempts = await call(caller, spec, [{"role": "user", "content": "hi"}], stream=stream)

    assert [a.status for a in attempts] == ["error", "error", "ok"]  # retried, then fell back
    primary, secondary = spec.deployments
    assert not await caller.breaker.allow(primary)
    assert await caller.breaker.allow(secondary)


def test_failure_messages_carry_no_traceback_or_server_path():
    exc = RuntimeError(
        "litellm.APIConnectionError: boom\nTraceback (most recent call last):\n"
        '  File "/srv/app/.venv/lib/python3.11/site-packages/litellm/main.py", line 1\n'
    )

    assert classify(exc).message == "boom"


def test_an_encoding_error_wrapped_by_an_sdk_is_still_the_requests_fault():
    try:
        try:
            "\ud800".encode()
        except UnicodeEncodeError as inner:
            raise RuntimeError("connection error") from inner
    except RuntimeError as wrapped:
        failure = classify(wrapped)

    assert (failure.retryable, failure.status) == (False, 400)
    assert not failure.counts_against_deployment


class SilentStore:
    """A shared breaker store that stops answering (a Redis gone silent)."""

    def __init__(self):
        self.calls = 0

    async def _hang(self, *args, **kwargs):
        self.calls += 1
        raise TimeoutError("Timeout reading from socket")

    is_open = record_failure = record_success = _hang


async def test_a_silent_breaker_store_costs_one_timeout_per_pause_and_the_breaker_still_works():
    silent = SilentStore()
    breaker = CircuitBreaker(silent, failure_threshold=2, window_s=60, cooldown_s=60)
    deployment = SMALL.deployments[0]

    assert await breaker.allow(deployment)  # fails open
    for _ in range(2):
        await breaker.failed(deployment)
    allowed = await breaker.allow(deployment)

    assert silent.calls == 1  # the store is left alone for the pause
    assert allowed is False  # this process's own breaker opened meanwhile
    breaker._paused_until = 0.0  # the pause is over: the shared store is tried again
    assert await breaker.allow(deployment) is False  # still silent: the local breaker answers
    assert silent.calls == 2
