"""The usage a provider reports is read as counts of tokens, or not at all.

A tenant's own server (``api_base``) reports whatever usage it likes. The ledger's token
columns hold non-negative 32-bit integers and its costs are never negative (a database
constraint): a negative or absurd count used to become a negative cost or an overflow,
the ledger row then failing to be written. A count that cannot be one (negative, beyond
any call, not an integer) is not used: the gateway counts the tokens itself, as it does
for a stream with no usage. An answer the gateway cannot use (no choices, choices that are
not a completion) is a failed call, and what its usage says was spent is still recorded;
with no usable usage it is charged nothing (what it cost is not known: never invented).
"""

from __future__ import annotations

import asyncio
import threading

import litellm
import pytest

from routing.engine import resilience
from routing.engine.agent import CascadeAgent
from routing.engine.pricing import MAX_TOKENS_PER_CALL
from routing.engine.resilience import Caller
from tests.engine.test_hostile_drafts import LARGE, fake_spec
from tests.support.fake_upstream import Behaviour

CONTENT = "Seven words of answer from the provider."
MESSAGES = [{"role": "user", "content": "Answer in a few words, please."}]
VALID = {"prompt_tokens": 20, "completion_tokens": 7, "total_tokens": 27}

# (the usage reported, whether it is used as it is)
USAGE = {
    "as counted": (VALID, True),
    "negative": ({"prompt_tokens": -50, "completion_tokens": -5, "total_tokens": -55}, False),
    "one negative": ({"prompt_tokens": 20, "completion_tokens": -5}, False),
    "beyond any call": ({"prompt_tokens": 10**12, "completion_tokens": 3 * 10**9}, False),
    "past the ledger's column": ({"prompt_tokens": 20, "completion_tokens": 2**31}, False),
    "numbers as text": ({"prompt_tokens": "20", "completion_tokens": "many"}, False),
    "fractions": ({"prompt_tokens": 20.5, "completion_tokens": 7.25}, False),
    "booleans": ({"prompt_tokens": True, "completion_tokens": True}, False),
    "nulls": ({"prompt_tokens": None, "completion_tokens": None}, False),
    "text": ("lots", False),
    "a list": ([20, 7], False),
}


def _sane(attempt) -> None:
    assert 0 <= attempt.prompt_tokens <= MAX_TOKENS_PER_CALL
    assert 0 <= attempt.completion_tokens <= MAX_TOKENS_PER_CALL
    assert attempt.cost_nanos >= 0


@pytest.mark.parametrize("stream", [False, True], ids=["complete", "stream"])
@pytest.mark.parametrize(("usage", "used"), USAGE.values(), ids=USAGE.keys())
async def test_reported_usage_is_used_only_when_it_is_counts_of_tokens(
    upstream, usage, used, stream
):
    upstream.behaviours["drafter"] = Behaviour(content=CONTENT, usage=usage)
    spec = fake_spec(upstream, "drafter")
    agent = CascadeAgent([spec], caller=Caller(backoff_s=0.0))

    if stream:
        outcome = await agent.stream(MESSAGES, {})
        chunks = [c async for c in outcome.chunks()]
        text = "".join(
            c["choices"][0]["delta"].get("content") or "" for c in chunks if c.get("choices")
        )
        assert outcome.failure is None
        [attempt] = outcome.attempts
    else:
        result = await agent.run(MESSAGES, {})
        text = result.response.choices[0].message.content
        [attempt] = result.attempts

    assert text == CONTENT  # the answer is served whatever its usage says
    assert attempt.status == "ok"
    _sane(attempt)
    if used:
        assert (attempt.prompt_tokens, attempt.completion_tokens) == (20, 7)
    else:  # counted by the gateway, as for a provider that reports none
        assert 10 <= attempt.prompt_tokens <= 30
        assert 5 <= attempt.completion_tokens <= 12
    assert attempt.cost_nanos == spec.price.cost_nanos(
        attempt.prompt_tokens, attempt.completion_tokens
    )
    assert attempt.cost_nanos > 0


# (the answer's body, the tokens the call is charged, how it ends: a failed call, or an
# empty answer as LiteLLM reads it, which the quality check rejects)
UNUSABLE = {
    "no choices": ({"choices": [], "usage": VALID}, (20, 7), "failed"),
    "a choice that is a number": ({"choices": [5], "usage": VALID}, (20, 7), "failed"),
    "content that is a number": (
        {"choices": [{"message": {"role": "assistant", "content": 5}}], "usage": VALID},
        (20, 7),
        "failed",
    ),
    "a choice without a message": ({"choices": [{"index": 0}], "usage": VALID}, (20, 7), "empty"),
    "choices that are text": ({"choices": "none", "usage": VALID}, (20, 7), "empty"),
    "no choices, usage negative": (
        {"choices": [], "usage": {"prompt_tokens": -1, "completion_tokens": 9}},
        (0, 0),
        "failed",
    ),
    "no choices, usage text": ({"choices": [], "usage": "lots"}, (0, 0), "failed"),
    "no choices, no usage": ({"choices": []}, (0, 0), "failed"),
    "a JSON array": ([1, 2, 3], (0, 0), "failed"),
}


@pytest.mark.parametrize(("body", "charged", "ends"), UNUSABLE.values(), ids=UNUSABLE.keys())
async def test_an_unusable_answer_is_a_failed_call_that_keeps_what_it_cost(
    upstream, body, charged, ends
):
    upstream.behaviours["drafter"] = Behaviour(body=body)
    spec = fake_spec(upstream, "drafter")
    agent = CascadeAgent([spec, LARGE], caller=Caller(backoff_s=0.0, retries=0))

    result = await agent.run(MESSAGES, {})

    first, last = result.attempts[0], result.attempts[-1]
    if ends == "failed":
        assert (first.status, first.error_code) == ("error", "upstream_error")
        assert first.error_message.startswith("Malformed response")
    else:
        assert first.status == "ok" and "empty" in first.check.hard_fail
    assert first.model == "drafter"
    assert (last.model, last.status) == ("demo/large", "ok")  # the next model answers
    _sane(first)
    assert (first.prompt_tokens, first.completion_tokens) == charged
    assert first.cost_nanos == spec.price.cost_nanos(*charged)
    assert result.cost_nanos == sum(a.cost_nanos for a in result.attempts)


# --- counting what the provider did not ------------------------------------------------


@pytest.fixture
def counting_threads(monkeypatch) -> list[int]:
    """The threads LiteLLM's token counters run on, recorded as they are called."""
    threads: list[int] = []
    for name in ("token_counter", "encode"):
        real = getattr(litellm, name)

        def recorded(*args, real=real, **kwargs):
            threads.append(threading.get_ident())
            return real(*args, **kwargs)

        monkeypatch.setattr(litellm, name, recorded)
    return threads


@pytest.mark.parametrize("call", ["complete", "stream", "embeddings"])
async def test_tokens_the_provider_did_not_count_are_counted_off_the_event_loop(
    upstream, counting_threads, call
):
    """The tokenizer takes up to a fraction of a second on a large request (0.2 s for a
    4 MB prompt): on the event loop, every other request of the process would wait."""
    upstream.behaviours["drafter"] = Behaviour(content=CONTENT, usage="lots", report_usage=False)
    spec = fake_spec(upstream, "drafter")
    caller = Caller(backoff_s=0.0)
    agent = CascadeAgent([spec], caller=caller)

    if call == "embeddings":
        vectors, attempt = await caller.embed(
            spec, {"input": ["seven words of text to embed here"]}, [], role="model"
        )
        assert len(vectors.vectors) == 1
        assert 5 <= attempt.prompt_tokens <= 12
    else:
        if call == "stream":
            outcome = await agent.stream(MESSAGES, {})
            assert [c async for c in outcome.chunks()]
            [attempt] = outcome.attempts
        else:
            [attempt] = (await agent.run(MESSAGES, {})).attempts
        assert 10 <= attempt.prompt_tokens <= 30 and 5 <= attempt.completion_tokens <= 12

    assert attempt.cost_nanos == spec.price.cost_nanos(
        attempt.prompt_tokens, attempt.completion_tokens
    )
    assert counting_threads  # counted (the provider reported nothing usable)
    assert threading.get_ident() not in counting_threads  # never on the event loop's thread


async def test_a_stream_its_client_leaves_is_counted_off_the_event_loop(upstream, counting_threads):
    """A stream cut short never gets the provider's usage (it comes last): the gateway
    counts what it sent and what came back, in a worker thread like any other count (a
    client that leaves a stream of a 4 MB prompt would otherwise hold up the process)."""
    upstream.behaviours["drafter"] = Behaviour(content=CONTENT)  # usage at the end
    spec = fake_spec(upstream, "drafter")
    agent = CascadeAgent([spec], caller=Caller(backoff_s=0.0))
    outcome = await agent.stream(MESSAGES, {})

    chunks = outcome.chunks()
    await anext(chunks)
    await anext(chunks)
    await chunks.aclose()  # as the gateway does when its client leaves

    [attempt] = outcome.attempts
    assert 10 <= attempt.prompt_tokens <= 30
    assert attempt.cost_nanos == spec.price.cost_nanos(
        attempt.prompt_tokens, attempt.completion_tokens
    )
    assert counting_threads and threading.get_ident() not in counting_threads


async def test_a_stream_cancelled_again_while_its_tokens_are_counted_is_still_charged(
    upstream, monkeypatch
):
    """Cancelled once while its tokens are counted in a worker thread, and again while it
    counts them for the teardown: the attempt is charged all the same (counted at once, on
    the event loop)."""
    upstream.behaviours["drafter"] = Behaviour(content=CONTENT, usage="lots")
    spec = fake_spec(upstream, "drafter")
    agent = CascadeAgent([spec], caller=Caller(backoff_s=0.0))
    started, release = asyncio.Queue(), threading.Event()
    loop = asyncio.get_running_loop()

    def slow_count(*args):
        loop.call_soon_threadsafe(started.put_nowait, True)
        release.wait(10)
        return resilience.counted_tokens(*args)

    async def slow_off_loop(*args):
        return await asyncio.to_thread(slow_count, *args)

    monkeypatch.setattr("routing.engine.agent.counted_off_loop", slow_off_loop)
    outcome = await agent.stream(MESSAGES, {})

    async def relay() -> None:
        async for _ in outcome.chunks():
            pass

    task = asyncio.create_task(relay())
    await asyncio.wait_for(started.get(), 10)  # the stream ended: its tokens are counted
    task.cancel()
    await asyncio.wait_for(started.get(), 10)  # torn down: counted again
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await asyncio.wait_for(task, 5)
    release.set()

    [attempt] = outcome.attempts
    assert 10 <= attempt.prompt_tokens <= 30 and 5 <= attempt.completion_tokens <= 12
    assert (
        attempt.cost_nanos
        == spec.price.cost_nanos(attempt.prompt_tokens, attempt.completion_tokens)
        > 0
    )
