"""A draft's token log-probabilities, kept as one array of floats by the OpenAI-wire client.

``openai_wire.parse_completion`` builds LiteLLM's ``ModelResponse`` as before and keeps
the first choice's log-probabilities beside it; the check (``agent._draft_of``) reads
that array instead of LiteLLM's objects. Both must give the same floats, the response
must serialise as before, and anything else than plain JSON numbers takes the old path.
"""

from __future__ import annotations

import copy
import json
import math
import random
from typing import Any

import litellm
import pytest

from routing.engine.agent import _draft_of
from routing.engine.openai_wire import FLAT_LOGPROBS, parse_completion


def completion(logprobs: Any, content: str = "Paris is the capital.") -> dict[str, Any]:
    choice: dict[str, Any] = {
        "index": 0,
        "message": {"role": "assistant", "content": content},
        "finish_reason": "stop",
    }
    if logprobs is not None:
        choice["logprobs"] = logprobs
    return {
        "id": "chatcmpl-test",
        "object": "chat.completion",
        "created": 1767225600,
        "model": "gpt-test",
        "choices": [choice],
        "usage": {"prompt_tokens": 5, "completion_tokens": 4, "total_tokens": 9},
    }


def entries(values: list[Any]) -> dict[str, Any]:
    return {
        "content": [
            {"token": f"t{i}", "logprob": v, "bytes": [116], "top_logprobs": []}
            for i, v in enumerate(values)
        ]
    }


def objects_read(response: Any) -> list[float] | None:
    """The log-probabilities as the check read them from LiteLLM's objects."""
    hidden = response._hidden_params
    hidden.pop(FLAT_LOGPROBS, None)
    values = _draft_of(response).token_logprobs
    return None if values is None else list(values)


def same_floats(a: list[float] | None, b: list[float] | None) -> bool:
    if a is None or b is None:
        return a is b
    return len(a) == len(b) and all(x.hex() == y.hex() for x, y in zip(a, b, strict=True))


def values_cases() -> list[list[Any]]:
    rng = random.Random(7)
    cases: list[list[Any]] = [
        [-0.05, -1.5, 0.0],
        [0, -1, -2],  # integers, as some servers write a certain token
        [-0.0, 0.0, -0.0],
        [float("-inf"), -1.0],
        [-1e-300, -5e-324, -1.7976931348623157e308],
        [-(2**53), 2**53, -3],
    ]
    for _ in range(50):
        n = rng.randint(1, 300)
        cases.append(
            [
                -rng.expovariate(1 / rng.choice([0.02, 1.5, 30.0]))
                if rng.random() < 0.9
                else -rng.randint(0, 40)
                for _ in range(n)
            ]
        )
    return cases


@pytest.mark.parametrize("values", values_cases())
def test_the_array_holds_what_litellm_objects_hold(values):
    data = completion(entries(values))
    raw = json.dumps(data)
    response = parse_completion(json.loads(raw))
    assert FLAT_LOGPROBS in response._hidden_params
    fast = list(_draft_of(response).token_logprobs or [])
    # The same response as the client built it before: LiteLLM's ModelResponse alone.
    before = litellm.ModelResponse(**json.loads(raw))
    assert same_floats(fast, objects_read(before))
    assert same_floats(fast, [float(v) for v in values])
    # What the gateway returns to the client is what it returned before.
    assert response.model_dump() == before.model_dump()
    assert response.model_dump_json() == before.model_dump_json()
    assert response.json() == before.json()


def test_nan_reads_the_same():
    response = parse_completion(completion(entries([-0.5, float("nan"), -1.0])))
    assert FLAT_LOGPROBS in response._hidden_params
    fast = list(_draft_of(response).token_logprobs or [])
    assert math.isnan(fast[1]) and fast[0] == -0.5 and fast[2] == -1.0


@pytest.mark.parametrize(
    "logprobs",
    [
        None,
        {"content": None},
        {"content": []},
        entries([-0.1, True]),  # a boolean: LiteLLM's conversion decides
        entries([-0.1, "-0.2"]),  # a string
        entries([-0.1, 2**53 + 1]),  # an integer a float does not hold exactly
        entries([-0.1, 10**400]),
        {"content": [{"token": "a", "bytes": [97], "top_logprobs": []}]},  # no logprob
        {"content": ["a"]},
        {"content": "abc"},
        "abc",
    ],
    ids=repr,
)
def test_anything_but_json_numbers_takes_the_old_path(logprobs):
    data = completion(logprobs)
    try:
        before = litellm.ModelResponse(**copy.deepcopy(data))
    except Exception as exc:  # LiteLLM rejects it: the client raises as before
        with pytest.raises(type(exc)):
            parse_completion(copy.deepcopy(data))
        return
    response = parse_completion(copy.deepcopy(data))
    assert FLAT_LOGPROBS not in response._hidden_params
    assert response.model_dump() == before.model_dump()
    assert same_floats(
        None if (lp := _draft_of(response).token_logprobs) is None else [float(v) for v in lp],
        objects_read(before),
    )


def test_the_array_is_read_only_for_the_entries_it_was_made_from():
    response = parse_completion(completion(entries([-0.25, -0.5])))
    choice = response.choices[0]
    assert list(_draft_of(response).token_logprobs or []) == [-0.25, -0.5]
    # Entries replaced after parsing: read from the objects.
    choice.logprobs = litellm.types.utils.ChoiceLogprobs(
        content=[{"token": "x", "logprob": -3.0, "bytes": [120], "top_logprobs": []}]
    )
    assert list(_draft_of(response).token_logprobs or []) == [-3.0]
    # Stripped (the client did not ask for them): none.
    choice.logprobs = None
    assert _draft_of(response).token_logprobs is None


def test_an_entry_added_after_parsing_is_read():
    response = parse_completion(completion(entries([-0.25, -0.5])))
    content = response.choices[0].logprobs.content
    content.append(copy.deepcopy(content[0]))
    content[-1].logprob = -7.0
    assert list(_draft_of(response).token_logprobs or []) == [-0.25, -0.5, -7.0]
