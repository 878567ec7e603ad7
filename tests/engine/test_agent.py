"""The cascade engine alone (no Django): on the demo models and the fake upstream."""

import json

import pytest

from routing.engine.agent import CascadeAgent, parse_probability
from routing.engine.calibration import Scorer
from routing.engine.policy import Calibration, StepCalibration
from routing.engine.resilience import (
    Caller,
    CircuitBreaker,
    MemoryBreakerStore,
    UpstreamError,
)
from routing.engine.types import Deployment, ModelSpec
from routing.providers.catalog import demo_catalog_models
from tests.support.fake_upstream import Behaviour

SMALL, MEDIUM, LARGE = demo_catalog_models()
EASY = [{"role": "user", "content": "What is 12 + 30?"}]
HARD = [
    {
        "role": "user",
        "content": "Explain step by step why the algorithm is optimal, prove the theorem, analyze "
        "its complexity and compare the trade-offs of the design with the architecture of the "
        "concurrency model, then derive the probability of failure: 3 * 17 + 5 * 3 - 4 / 2",
    }
]


def caller(**kwargs):
    return Caller(backoff_s=0.0, **kwargs)


def fake_spec(name, upstream, *models, price=(1.0, 2.0), logprobs=True):
    deployments = tuple(
        Deployment(f"openai/{m}", {"api_base": upstream.api_base, "api_key": "sk-fake"})
        for m in models
    )
    base = ModelSpec.simple(name, input_usd_per_mtok=price[0], output_usd_per_mtok=price[1])
    return ModelSpec(
        name=name, deployments=deployments, price=base.price, supports_logprobs=logprobs
    )


async def test_easy_question_is_answered_by_the_cheap_model():
    agent = CascadeAgent([SMALL, LARGE], caller=caller())

    result = await agent.run(EASY, {})

    assert result.model.name == "demo/small"
    assert not result.escalated
    assert [a.decision for a in result.attempts] == ["accepted"]
    check = result.attempts[0].check
    assert check.accepted and check.probability >= check.threshold
    assert check.features["has_logprobs"] == 1.0  # requested although the client did not ask
    assert result.response.choices[0].logprobs is None  # ... and not returned to it
    assert result.baseline_method == "estimated"
    assert result.baseline_cost_nanos == LARGE.price.cost_nanos(
        result.attempts[0].prompt_tokens, result.attempts[0].completion_tokens
    )
    assert result.savings_nanos == result.baseline_cost_nanos - result.cost_nanos > 0


async def test_hard_question_escalates_and_explains_why():
    agent = CascadeAgent([SMALL, LARGE], caller=caller())

    result = await agent.run(HARD, {})

    assert result.model.name == "demo/large"
    assert result.escalated
    draft, final = result.attempts
    assert (draft.decision, final.decision) == ("escalated", "returned")
    assert not draft.check.accepted
    assert any("p(acceptable)" in r for r in draft.check.reasons)
    assert draft.check.contributions  # each signal's weight x value is kept
    assert result.baseline_method == "actual"
    assert result.baseline_cost_nanos == final.cost_nanos
    assert result.savings_nanos == -draft.cost_nanos  # the wasted draft is counted


async def test_chains_of_any_length_escalate_step_by_step():
    agent = CascadeAgent([SMALL, MEDIUM, LARGE], policy="quality_first", caller=caller())

    result = await agent.run(HARD, {})

    assert result.attempts[0].model == "demo/small"
    assert result.attempts[-1].decision in {"accepted", "returned"}
    assert len(result.attempts) in {2, 3}
    assert result.cost_nanos == sum(a.cost_nanos for a in result.attempts)


async def test_fast_preset_skips_middle_models_and_sends_hard_queries_direct():
    agent = CascadeAgent([SMALL, MEDIUM, LARGE], policy="fast", caller=caller())

    hard = await agent.run(HARD, {})
    easy = await agent.run(EASY, {})

    assert [a.model for a in hard.attempts] == ["demo/large"]
    assert [a.model for a in easy.attempts] == ["demo/small"]


async def test_invalid_json_draft_is_rejected_whatever_its_score():
    fmt = {
        "type": "json_schema",
        "json_schema": {
            "name": "x",
            "schema": {
                "type": "object",
                "properties": {"answer": {"type": "string"}},
                "required": ["answer", "confidence"],
            },
        },
    }
    agent = CascadeAgent([SMALL, LARGE], policy="cost_optimized", caller=caller())

    result = await agent.run(HARD, {"response_format": fmt})

    draft = result.attempts[0]
    assert draft.check.hard_fail is not None
    assert "JSON" in draft.check.hard_fail or "schema" in draft.check.hard_fail
    assert result.model.name == "demo/large"


async def test_tool_call_drafts_are_validated_against_the_tool_schema():
    tools = [
        {
            "type": "function",
            "function": {
                "name": "get_weather",
                "description": "weather for a city and a step by step proof",
                "parameters": {
                    "type": "object",
                    "properties": {"city": {"type": "string"}, "days": {"type": "integer"}},
                    "required": ["city", "days"],
                },
            },
        }
    ]
    agent = CascadeAgent([SMALL, LARGE], caller=caller())

    result = await agent.run(HARD, {"tools": tools, "tool_choice": "required"})

    draft = result.attempts[0]
    assert "tool 'get_weather' arguments" in (draft.check.hard_fail or "")
    call = result.response.choices[0].message.tool_calls[0]
    assert set(json.loads(call.function.arguments)) == {"city", "days"}


async def test_truncated_draft_is_rejected():
    agent = CascadeAgent([SMALL, LARGE], caller=caller())

    result = await agent.run(
        [{"role": "user", "content": "Tell me about the history of bridges"}], {"max_tokens": 3}
    )

    assert result.attempts[0].check.hard_fail == "the draft was cut off by the token limit"


async def test_calibration_drives_the_decision():
    always = Calibration(
        steps=[StepCalibration(scorer=Scorer(weights={}, bias=5.0), threshold=0.5)]
    )
    never = Calibration(
        steps=[StepCalibration(scorer=Scorer(weights={}, bias=-5.0), threshold=0.5)]
    )

    accepted = await CascadeAgent([SMALL, LARGE], calibration=always, caller=caller()).run(HARD, {})
    rejected = await CascadeAgent([SMALL, LARGE], calibration=never, caller=caller()).run(EASY, {})

    assert accepted.model.name == "demo/small"
    assert rejected.model.name == "demo/large"


async def test_agreement_check_is_paid_for_and_counted():
    calibration = Calibration(
        steps=[
            StepCalibration(
                paid_mode="always", paid_kinds=("agreement",), paid_scorer=Scorer(), threshold=0.5
            )
        ]
    )
    agent = CascadeAgent([SMALL, LARGE], calibration=calibration, caller=caller())

    result = await agent.run(HARD, {})

    [paid] = result.attempts[0].check.paid
    assert paid.kind == "agreement"
    assert paid.cost_nanos > 0
    assert 0.0 <= paid.value <= 1.0
    assert result.cost_nanos == sum(a.cost_nanos for a in result.attempts) + paid.cost_nanos


@pytest.mark.parametrize(
    ("text", "value"), [("0.83", 0.83), ("85%", 0.85), ("Probability: .4", 0.4), ("yes", None)]
)
def test_parse_probability(text, value):
    assert parse_probability(text) == value


# --- resilience ------------------------------------------------------------------


async def test_failing_draft_model_falls_back_to_the_next_model(upstream):
    upstream.behaviours["broken"] = Behaviour(fail_status=503)
    broken = fake_spec("broken", upstream, "broken")
    agent = CascadeAgent([broken, LARGE], caller=caller())

    result = await agent.run(EASY, {})

    assert result.model.name == "demo/large"
    assert [(a.model, a.status) for a in result.attempts] == [
        ("broken", "error"),
        ("broken", "error"),
        ("demo/large", "ok"),
    ]


async def test_strongest_failing_returns_the_rejected_draft_instead_of_an_error(upstream):
    upstream.behaviours["down"] = Behaviour(fail_status=500)
    never = Calibration(
        steps=[StepCalibration(scorer=Scorer(weights={}, bias=-5.0), threshold=0.5)]
    )
    agent = CascadeAgent(
        [SMALL, fake_spec("down", upstream, "down")], calibration=never, caller=caller()
    )

    result = await agent.run(EASY, {})

    assert result.degraded
    assert result.model.name == "demo/small"
    assert result.attempts[0].decision == "fallback"


async def test_request_fails_only_when_no_model_answers(upstream):
    upstream.behaviours["x"] = Behaviour(fail_status=500)
    upstream.behaviours["y"] = Behaviour(fail_status=429)
    agent = CascadeAgent(
        [fake_spec("x", upstream, "x"), fake_spec("y", upstream, "y")], caller=caller(retries=0)
    )

    with pytest.raises(UpstreamError) as caught:
        await agent.run(EASY, {})

    assert caught.value.failure.code == "upstream_rate_limited"
    assert [a.status for a in caught.value.attempts] == ["error", "error"]


async def test_transient_errors_are_retried_on_the_same_deployment(upstream):
    upstream.behaviours["flaky"] = Behaviour(
        fail_status=502, fail_times=1, content="second time lucky"
    )

    result = await CascadeAgent(
        [fake_spec("flaky", upstream, "flaky")], caller=caller(retries=1)
    ).run(EASY, {})

    assert result.response.choices[0].message.content == "second time lucky"
    assert [a.status for a in result.attempts] == ["error", "ok"]


async def test_client_errors_are_not_retried(upstream):
    upstream.behaviours["strict"] = Behaviour(fail_status=400)

    with pytest.raises(UpstreamError) as caught:
        await CascadeAgent([fake_spec("strict", upstream, "strict"), LARGE], caller=caller()).run(
            EASY, {}
        )

    assert caught.value.failure.status == 400
    assert len(upstream.calls_for("strict")) == 1


async def test_circuit_breaker_opens_and_skips_the_failing_deployment(upstream):
    upstream.behaviours["sick"] = Behaviour(fail_status=500)
    upstream.behaviours["healthy"] = Behaviour(content="healthy")
    spec = fake_spec("two-deployments", upstream, "sick", "healthy")
    breaker = CircuitBreaker(MemoryBreakerStore(), failure_threshold=2, window_s=60, cooldown_s=60)
    agent = CascadeAgent([spec], caller=caller(breaker=breaker, retries=0))

    for _ in range(3):
        result = await agent.run(EASY, {})
        assert result.response.choices[0].message.content == "healthy"

    # two failures opened the circuit; the third request went straight to the healthy one
    assert len(upstream.calls_for("sick")) == 2
    assert len(upstream.calls_for("healthy")) == 3


async def test_open_circuits_everywhere_still_try_rather_than_fail(upstream):
    upstream.behaviours["only"] = Behaviour(fail_status=500, fail_times=2)
    spec = fake_spec("only", upstream, "only")
    breaker = CircuitBreaker(MemoryBreakerStore(), failure_threshold=1, window_s=60, cooldown_s=60)
    agent = CascadeAgent([spec], caller=caller(breaker=breaker, retries=0))

    with pytest.raises(UpstreamError):
        await agent.run(EASY, {})
    with pytest.raises(UpstreamError):
        await agent.run(EASY, {})
    result = await agent.run(EASY, {})

    assert result.response.choices[0].message.content == "Hello from the fake upstream."


# --- streaming -----------------------------------------------------------------------


async def collect(stream):
    return [c async for c in stream.chunks()]


async def test_accepted_draft_is_buffered_then_streamed():
    agent = CascadeAgent([SMALL, LARGE], caller=caller())

    stream = await agent.stream(EASY, {})
    chunks = await collect(stream)

    assert stream.model.name == "demo/small"
    text = "".join(c["choices"][0]["delta"].get("content", "") for c in chunks if c["choices"])
    assert text == stream.result.response.choices[0].message.content
    assert all(c["choices"] and "usage" not in c for c in chunks)
    assert len({(c["id"], c["created"]) for c in chunks}) == 1
    last = stream.usage_chunk()
    assert last["choices"] == []
    assert last["usage"]["completion_tokens"] == stream.result.attempts[0].completion_tokens
    assert not stream.result.escalated


async def test_escalation_streams_the_stronger_model_directly():
    agent = CascadeAgent([SMALL, LARGE], caller=caller())

    stream = await agent.stream(HARD, {})
    chunks = await collect(stream)

    assert stream.model.name == "demo/large"
    assert stream.escalated
    assert all(c["model"] == "demo/large" for c in chunks)
    result = stream.result
    assert [a.decision for a in result.attempts] == ["escalated", "returned"]
    assert result.attempts[1].completion_tokens > 0
    assert result.attempts[1].cost_nanos == LARGE.price.cost_nanos(
        result.attempts[1].prompt_tokens, result.attempts[1].completion_tokens
    )
