"""A provider's answer is read up to a bound (CASCADEFLOW_MAX_UPSTREAM_RESPONSE_BYTES).

A tenant's own server (``api_base``) answers what it likes, into the memory of a process
that serves every tenant. Past the bound, the answer is a failed call (502, retried, then
the next deployment or model), read no further; below it, nothing changes.
"""

from __future__ import annotations

import pytest

from routing.engine.agent import CascadeAgent
from routing.engine.resilience import Caller, UpstreamError, classify
from tests.engine.test_hostile_drafts import LARGE, fake_spec
from tests.support.fake_upstream import Behaviour

LIMIT = 200_000


@pytest.fixture(autouse=True, params=["openai-wire", "litellm"])
def transport(request, monkeypatch):
    """Both transports: the OpenAI-wire client, and LiteLLM's (``litellm_bounds``)."""
    monkeypatch.setenv("CASCADEFLOW_MAX_UPSTREAM_RESPONSE_BYTES", str(LIMIT))
    monkeypatch.setenv(
        "CASCADEFLOW_OPENAI_FAST_PATH", "true" if request.param == "openai-wire" else "false"
    )
    return request.param


def words(n_bytes: int) -> str:
    return ("word " * (n_bytes // 5 + 1))[:n_bytes]


# (what the drafter sends, whether it stays under the bound)
CASES = {
    "a body with its length, over": (Behaviour(content=words(LIMIT)), False),
    "a body in pieces without its length, over": (
        Behaviour(content=words(LIMIT), chunked=True),
        False,
    ),
    "a body in pieces, under": (Behaviour(content=words(LIMIT // 2), chunked=True), True),
    "a body with its length, under": (Behaviour(content=words(LIMIT // 2)), True),
}


@pytest.mark.parametrize("stream", [False, True], ids=["complete", "stream"])
@pytest.mark.parametrize(("behaviour", "under"), CASES.values(), ids=CASES.keys())
async def test_an_answer_past_the_bound_is_a_failed_call(upstream, behaviour, under, stream):
    upstream.behaviours["drafter"] = behaviour
    agent = CascadeAgent([fake_spec(upstream, "drafter"), LARGE], caller=Caller(backoff_s=0.0))
    messages = [{"role": "user", "content": "Write at length."}]

    if stream:
        outcome = await agent.stream(messages, {})
        async for _ in outcome.chunks():
            pass
        attempts = outcome.attempts
    else:
        attempts = (await agent.run(messages, {})).attempts

    first = attempts[0]
    if under:
        assert (first.model, first.status) == ("drafter", "ok")
    else:
        assert (first.model, first.status) == ("drafter", "error")
        assert first.error_message == f"The provider's answer is larger than {LIMIT:,} bytes."
        assert attempts[-1].model == "demo/large" and attempts[-1].status == "ok"


@pytest.mark.parametrize(("size", "under"), [(LIMIT // 20, False), (20, True)])
async def test_a_stream_past_the_bound_ends_as_a_failed_call(
    upstream, monkeypatch, transport, size, under
):
    # One model, streamed through: every event counts, and the stream ends as a failure
    # when the bound is reached: mid-stream, the client having some of the answer, or
    # (LiteLLM reads ahead) before its first chunk, every attempt then failed.
    monkeypatch.setenv("CASCADEFLOW_MAX_UPSTREAM_RESPONSE_BYTES", str(LIMIT // 100))
    upstream.behaviours["drafter"] = Behaviour(content=words(size))
    agent = CascadeAgent([fake_spec(upstream, "drafter")], caller=Caller(backoff_s=0.0))
    messages = [{"role": "user", "content": "Write at length."}]

    if transport == "litellm" and not under:
        try:
            outcome = await agent.stream(messages, {})
            [chunk async for chunk in outcome.chunks()]
            assert outcome.failure is not None  # mid-stream
            failure = classify(outcome.failure)
        except UpstreamError as exc:  # before the first chunk
            failure = exc.failure
        assert failure.message == "The provider's answer is larger than 2,000 bytes."
        return
    outcome = await agent.stream(messages, {})
    received = [chunk async for chunk in outcome.chunks()]

    [attempt] = outcome.attempts
    assert received
    if under:
        assert attempt.status == "ok" and outcome.failure is None
    else:
        assert attempt.status == "error"
        assert "larger than 2,000 bytes" in str(outcome.failure)
