"""Drafts the request's sender can steer are a verdict, never an error of the check.

A draft is the model's text, and whoever sends the request can ask the model for almost
anything: JSON nested thousands deep, an integer of 5,000 digits, a Python block holding a
sum of 3,000 terms. Python's own readers raise ``RecursionError``, ``MemoryError`` or a
bare ``ValueError`` on those, which the quality check used to let through: the request
ended in a 500 after the draft had been paid for. Each case below is judged (a hard
failure, so the cascade escalates), through the whole cascade too, and quickly.
"""

from __future__ import annotations

import ast
import math
import time

import pytest

from routing.engine import audit, signals
from routing.engine.agent import CascadeAgent
from routing.engine.complexity import profile_query
from routing.engine.resilience import Caller
from routing.engine.types import Deployment, ModelSpec
from routing.providers.catalog import demo_catalog_models
from tests.support.fake_upstream import Behaviour

_, _, LARGE = demo_catalog_models()

DEEP = 100_000  # far past Python's recursion limit (1,000)
SCHEMA = {
    "type": "json_schema",
    "json_schema": {
        "name": "answer",
        "schema": {"type": "object", "properties": {"answer": {"type": "string"}}},
    },
}
RECURSIVE_SCHEMA = {
    "type": "json_schema",
    "json_schema": {
        "name": "tree",
        "schema": {
            "$ref": "#/$defs/node",
            "$defs": {"node": {"type": "array", "items": {"$ref": "#/$defs/node"}}},
        },
    },
}
TOOLS = [
    {
        "type": "function",
        "function": {
            "name": "store",
            "parameters": {"type": "object", "properties": {"value": {"type": "array"}}},
        },
    }
]


def python_block(code: str) -> str:
    return f"Here is the code:\n\n```python\n{code}\n```\n"


def tool_call(arguments: str) -> list[dict]:
    return [
        {"id": "call_1", "type": "function", "function": {"name": "store", "arguments": arguments}}
    ]


# (case, draft content or tool calls, request params, what the hard failure says)
CASES = [
    (
        "JSON nested 100,000 deep",
        "[" * DEEP + "]" * DEEP,
        {"response_format": SCHEMA},
        "nested too deeply to read",
    ),
    (
        "JSON object nested 100,000 deep",
        '{"a":' * DEEP + "1" + "}" * DEEP,
        {"response_format": {"type": "json_object"}},
        "nested too deeply to read",
    ),
    (
        "JSON with a 5,000-digit integer",
        '{"answer": ' + "7" * 5000 + "}",
        {"response_format": SCHEMA},
        "number too long to read",
    ),
    (
        "JSON 900 deep against a recursive schema",
        "[" * 900 + "1" + "]" * 900,
        {"response_format": RECURSIVE_SCHEMA},
        "does not match the schema",
    ),
    (
        "JSON 900 deep, the wrong type",
        "[" * 900 + "]" * 900,
        {"response_format": SCHEMA},
        "does not match the schema",
    ),
    (
        "tool arguments nested 100,000 deep",
        tool_call('{"value": ' + "[" * DEEP + "]" * DEEP + "}"),
        {"tools": TOOLS},
        "tool 'store' arguments are JSON nested too deeply to read",
    ),
    (
        "tool arguments with a 5,000-digit integer",
        tool_call('{"value": [' + "1" * 5000 + "]}"),
        {"tools": TOOLS},
        "tool 'store' arguments are JSON with a number too long to read",
    ),
    (
        "a Python sum of 3,000 terms",
        python_block("x = " + " + ".join(["1"] * 3000)),
        {},
        "Python code is nested too deeply to parse",
    ),
    (
        "a Python attribute chain of 100,000",
        python_block("a" + ".b" * DEEP),
        {},
        "Python code is nested too deeply to parse",
    ),
    (
        "6,000 Python signs",
        python_block("x = " + "-" * 6000 + "1"),
        {},
        "Python code is nested too deeply to parse",
    ),
    ("Python with a NUL byte", python_block("x = 1\x00"), {}, "Python code does not parse"),
    (
        "300 nested Python parentheses",
        python_block("x = " + "(" * 300 + "1" + ")" * 300),
        {},
        "Python code does not parse",
    ),
]


def draft_of(content) -> signals.Draft:
    if isinstance(content, list):
        return signals.Draft(content="", tool_calls=content)
    return signals.Draft(content=content)


@pytest.mark.parametrize(
    ("content", "params", "verdict"), [c[1:] for c in CASES], ids=[c[0] for c in CASES]
)
def test_a_hostile_draft_is_a_hard_failure_not_an_exception(content, params, verdict):
    query = profile_query("Answer in the format asked.")
    started = time.process_time()

    report = signals.extract(draft_of(content), query, params)

    assert verdict in (report.hard_fail or ""), report.hard_fail
    assert report.features["format_ok"] == -1.0
    assert time.process_time() - started < 2.0
    # The audit labeller reads the same drafts, without an exception; JSON it cannot read
    # gives it nothing to compare.
    extracted = audit.extracted(draft_of(content), query, params)
    if "to read" in verdict:
        assert extracted.kind in {"", "tools"}


def fake_spec(upstream, model: str, *, logprobs: bool = False) -> ModelSpec:
    base = ModelSpec.simple(model, input_usd_per_mtok=0.1, output_usd_per_mtok=0.2)
    deployment = Deployment(f"openai/{model}", {"api_base": upstream.api_base, "api_key": "k"})
    return ModelSpec(
        name=model, deployments=(deployment,), price=base.price, supports_logprobs=logprobs
    )


@pytest.mark.parametrize(
    ("content", "params", "verdict"), [c[1:] for c in CASES], ids=[c[0] for c in CASES]
)
async def test_the_cascade_escalates_past_a_hostile_draft(upstream, content, params, verdict):
    if isinstance(content, list):
        upstream.behaviours["drafter"] = Behaviour(content="", tool_calls=content)
    else:
        upstream.behaviours["drafter"] = Behaviour(content=content, completion_tokens=100)
    agent = CascadeAgent([fake_spec(upstream, "drafter"), LARGE], caller=Caller(backoff_s=0.0))

    result = await agent.run([{"role": "user", "content": "Answer."}], dict(params))

    assert [a.model for a in result.attempts] == ["drafter", "demo/large"]
    assert verdict in (result.attempts[0].check.hard_fail or "")
    assert result.model.name == "demo/large"


# --- the Python verdict is ast.parse's ---------------------------------------------------

PROGRAMS = [
    "print('hello')",
    "def f(a, b=1, *args, c, **kw):\n    return a + b\n",
    "class A:\n    x: int = 1\n    def m(self):\n        return [i for i in range(3)]\n",
    "async def f():\n    async with a as b:\n        await b\n",
    "match x:\n    case [1, *rest]:\n        pass\n    case _:\n        pass\n",
    # Refused by the symbol table, accepted by the parser: ast.parse decides.
    "nonlocal x",
    "def f(a, a):\n    pass\n",
    "x = 1\nglobal x",
    "def f():\n    from os import *\n",
    "def f(x):\n    global x\n",
    "class A:\n    [y := 1 for i in range(3)]\n",
    "def f():\n    x = 1\n    nonlocal x\n",
    # Compiler errors the parser never sees: the code parses.
    "return 1",
    "yield 1",
    "break",
    "await x",
    # Syntax errors.
    "print 'hello'",
    "def f(:\n    pass",
    "x = = 1",
    "if True:\npass",
    "  x = 1",
    "f(**a, *b)",
    "x = '\\N{NOT A NAME}'",
    "x = 1\x00",
    "é = 1\nλ = lambda: é",
    "x = '\\d'",  # an invalid escape: a DeprecationWarning, still parses
    "",
    "# only a comment",
    "x = (" * 199 + "1" + ")" * 199,
    "x = (" * 201 + "1" + ")" * 201,
    "x = " + " + ".join(["1"] * 500),
    "x = " + " + ".join(["1"] * 4000),
    "a" + ".b" * 5000,
    "x = " + "-" * 6000 + "1",
]


@pytest.mark.parametrize("code", PROGRAMS, ids=range(len(PROGRAMS)))
def test_the_python_verdict_and_its_message_are_those_of_ast_parse(code):
    verdict = signals._python_error(code)
    try:
        ast.parse(code)
    except SyntaxError as exc:
        assert verdict == f"Python code does not parse (line {exc.lineno}: {exc.msg})"
    except (RecursionError, MemoryError):
        assert verdict == "Python code is nested too deeply to parse"
    else:
        assert verdict is None


def test_a_draft_of_many_hostile_blocks_is_checked_quickly():
    # Forty blocks just inside what the parser takes, then one past it: every block is read.
    near = python_block("x = " + " + ".join(["1"] * 1500))
    draft = signals.Draft(content="\n".join([near] * 40 + [python_block("a" + ".b" * 5000)]))
    started = time.process_time()

    ok, error = signals.validate_format(draft, {})

    assert (ok, error) == (False, "Python code is nested too deeply to parse")
    assert time.process_time() - started < 1.0


# --- tool calls an upstream should not send -----------------------------------------------


def call(function: object = ..., **fields: object) -> dict:
    made: dict = {"id": "c", "type": "function", **fields}
    if function is not ...:
        made["function"] = function
    return made


# (the calls, what becomes of the draft: accepted, escalated by the check, or refused as a
# malformed response by the client, retried, and answered by the next model)
ODD_CALLS = {
    "arguments an object": ([call({"name": "store", "arguments": {"value": []}})], "accepted"),
    "arguments null": ([call({"name": "store", "arguments": None})], "accepted"),
    "arguments a number": ([call({"name": "store", "arguments": 12})], "malformed"),
    "arguments a JSON list": ([call({"name": "store", "arguments": "[1, 2]"})], "escalated"),
    "function null": ([call(None)], "escalated"),
    "no function": ([call()], "malformed"),
    "name null": ([call({"name": None, "arguments": "{}"})], "escalated"),
    "name a list": ([call({"name": ["store"], "arguments": "{}"})], "malformed"),
    "a call that is a string": (["store"], "malformed"),
}


@pytest.mark.parametrize(("calls", "outcome"), ODD_CALLS.values(), ids=ODD_CALLS.keys())
async def test_odd_tool_calls_from_the_draft_model_end_in_an_answer(upstream, calls, outcome):
    upstream.behaviours["drafter"] = Behaviour(content="", tool_calls=calls)
    agent = CascadeAgent([fake_spec(upstream, "drafter"), LARGE], caller=Caller(backoff_s=0.0))

    result = await agent.run([{"role": "user", "content": "Store it."}], {"tools": TOOLS})

    first = result.attempts[0]
    if outcome == "malformed":
        assert (first.status, first.check) == ("error", None)
    else:
        assert first.decision == outcome
        assert (first.check.hard_fail is not None) == (outcome == "escalated")
    assert result.attempts[-1].status == "ok" and result.response.choices


ODD_LOGPROBS = {
    "null": None,
    "a word": "high",
    "NaN": float("nan"),
    "minus infinity": float("-inf"),
    "huge": 1e308,
}


@pytest.mark.parametrize("logprob", ODD_LOGPROBS.values(), ids=ODD_LOGPROBS.keys())
async def test_odd_log_probabilities_are_not_taken_as_confidence(upstream, logprob):
    upstream.behaviours["drafter"] = Behaviour(content="The answer is 42.", logprob=logprob)
    drafter = fake_spec(upstream, "drafter", logprobs=True)
    agent = CascadeAgent([drafter, LARGE], caller=Caller(backoff_s=0.0))

    result = await agent.run([{"role": "user", "content": "What is 6 * 7?"}], {})

    draft = result.attempts[0]
    if logprob is None or isinstance(logprob, str):
        # Not a number: the response fails validation, as a malformed answer; the next
        # model answers.
        assert (draft.status, draft.check) == ("error", None)
    else:
        assert all(math.isfinite(v) for v in draft.check.features.values()), draft.check.features
        assert math.isfinite(draft.check.probability)
        assert draft.check.features.get("has_logprobs") == (1.0 if logprob < 0 else None)
    assert result.attempts[-1].status == "ok"
    assert result.response.choices
    assert upstream.calls_for("drafter")[0].get("logprobs") is True
