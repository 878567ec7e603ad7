"""The offline demo models: deterministic, priced, and worse when small."""

import json
import random
import re
import time

import litellm
import pytest

from routing.providers import demo

EASY = [f"What is {a} + {b}?" for a, b in [(2, 3), (10, 7), (4, 4), (9, 1), (6, 5), (8, 2)]]
HARD = [
    f"Explain step by step why the algorithm is optimal, prove the theorem, analyze its "
    f"complexity and compare the trade-offs of design {i} with the architecture of the "
    f"concurrency model, then derive the probability of failure: {i} * 17 + {i} * 3 - 4 / 2"
    for i in range(40)
]


def answer(model: str, prompt: str, **params) -> demo.DemoAnswer:
    return demo.demo_answer(demo.DEMO_MODELS[model], [{"role": "user", "content": prompt}], params)


def test_answers_are_deterministic():
    assert answer("small", HARD[0]) == answer("small", HARD[0])


def test_arithmetic_is_computed():
    result = answer("large", "What is 12 * (3 + 4)?")

    assert result.correct
    assert result.content == "12 * (3 + 4) = 84. The answer is 84."


def test_every_model_gets_easy_questions_right():
    for model in demo.DEMO_MODELS:
        assert all(answer(model, q).correct for q in EASY), model


def test_small_model_fails_hard_questions_and_large_does_not():
    small = sum(answer("small", q).correct for q in HARD) / len(HARD)
    medium = sum(answer("medium", q).correct for q in HARD) / len(HARD)
    large = sum(answer("large", q).correct for q in HARD) / len(HARD)

    assert small < 0.2
    assert small < medium < large
    assert large > 0.7


def test_small_model_hedges_or_refuses_on_some_hard_questions():
    texts = [answer("small", q).content for q in HARD]
    hedged = [t for t in texts if any(t.startswith(h) for h in demo._HEDGES) or "sorry" in t]

    assert 0 < len(hedged) < len(HARD)  # some hedge; others are confidently wrong


def test_wrong_answers_have_lower_logprobs():
    def mean_logprob(result):
        return sum(t["logprob"] for t in result.logprobs) / len(result.logprobs)

    right = [mean_logprob(answer("large", q)) for q in EASY]
    wrong = [mean_logprob(r) for r in (answer("small", q) for q in HARD) if not r.correct]

    assert max(right) > -0.1
    assert sum(wrong) / len(wrong) < -0.5


def test_wrong_json_drafts_break_the_schema():
    fmt = {
        "type": "json_schema",
        "json_schema": {
            "name": "city",
            "schema": {
                "type": "object",
                "properties": {"name": {"type": "string"}, "population": {"type": "integer"}},
                "required": ["name", "population"],
            },
        },
    }
    good = answer("large", "Name a city", response_format=fmt)
    assert set(json.loads(good.content)) == {"name", "population"}
    bad = next(r for r in (answer("small", q, response_format=fmt) for q in HARD) if not r.correct)
    try:
        parsed = json.loads(bad.content)
    except json.JSONDecodeError:
        parsed = None
    assert parsed is None or set(parsed) != {"name", "population"}


def test_max_tokens_truncates_with_finish_reason_length():
    result = answer("large", "Tell me about the history of bridges", max_tokens=3)

    assert result.finish_reason == "length"
    assert len(result.content.split()) == 3


async def test_through_litellm_usage_comes_from_its_token_counter():
    messages = [{"role": "user", "content": "What is 6 * 7?"}]

    response = await litellm.acompletion(model="demo/small", messages=messages)

    assert response.usage.prompt_tokens == litellm.token_counter(
        model="demo/small", messages=messages
    )
    content = response.choices[0].message.content
    assert response.usage.completion_tokens == litellm.token_counter(
        model="demo/small", text=content
    )


async def test_simulated_latency_scales(monkeypatch):
    import time

    monkeypatch.setattr(demo, "latency_scale", 0.1)
    started = time.perf_counter()
    await litellm.acompletion(model="demo/large", messages=[{"role": "user", "content": "Hi"}])
    elapsed = time.perf_counter() - started

    assert elapsed >= demo.DEMO_MODELS["large"].first_token_ms / 1000 * 0.1


@pytest.mark.parametrize("model", ["demo/small", "demo/medium", "demo/large"])
def test_demo_models_are_priced_in_litellm(model):
    spec = demo.DEMO_MODELS[model.split("/")[1]]

    info = litellm.model_cost[model]

    assert info["input_cost_per_token"] == pytest.approx(spec.input_usd_per_mtok / 1e6)
    assert info["output_cost_per_token"] == pytest.approx(spec.output_usd_per_mtok / 1e6)


def test_the_demo_reads_expressions_and_options_in_linear_time_as_before():
    old_arith = re.compile(
        r"(-?\d+(?:\.\d+)?(?:\s*[-+*/^x\u00d7\u00f7]\s*\(?\s*-?\d+(?:\.\d+)?\s*\)?)+)"
    )
    old_choice = re.compile(r"(?m)^\s*\(?([A-E])[).:]\s+\S")
    rng = random.Random(3)
    pieces = ["1", "23", ".5", "-", " ", "\n", "+", "*", "x", "(", ")", " )", "A)", "(B", "E."]
    for _ in range(30000):
        text = "".join(rng.choice(pieces) for _ in range(rng.randint(0, 14)))
        assert [m.span() for m in demo._ARITH.finditer(text)] == [
            m.span() for m in old_arith.finditer(text)
        ], text
        assert demo._options(text) == set(old_choice.findall(text)), text
    started = time.process_time()
    for run in ("1 + " + " " * 50_000 + "x", "\n" * 50_000 + "A) x", "\n " * 25_000):
        demo._ARITH.search(run)
        demo._options(run)
    assert time.process_time() - started < 0.5
