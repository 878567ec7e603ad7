"""The audit labeller: agreement of extracted answers, and a judge asked in both orders."""

import json

import pytest

from routing.engine.audit import (
    combine,
    extraction_verdict,
    judge_messages,
    parse_judgement,
)
from routing.engine.complexity import profile_query
from routing.engine.learning import Verdict
from routing.engine.signals import Draft

MATH = "Tom has 3 boxes of 12 eggs and breaks 5. How many eggs are left?"
CHOICE = "Which is a prime?\nA) 4\nB) 6\nC) 7\nD) 9"


def tool(name, **arguments):
    return {"type": "function", "function": {"name": name, "arguments": json.dumps(arguments)}}


CASES = [
    # (query, params, draft, reference, verdict, comparable)
    (
        MATH,
        {},
        Draft("3 * 12 - 5 = 31. The answer is 31."),
        Draft("#### 31"),
        Verdict.AS_GOOD,
        True,
    ),
    (
        MATH,
        {},
        Draft("The answer is 31.0"),
        Draft("There are 31 eggs left."),
        Verdict.AS_GOOD,
        True,
    ),
    (MATH, {}, Draft("The answer is 36."), Draft("The answer is 31."), None, True),
    (CHOICE, {}, Draft("The answer is (C)."), Draft("C) 7 is prime."), Verdict.AS_GOOD, True),
    (CHOICE, {}, Draft("The answer is (A)."), Draft("The answer is (C)."), None, True),
    (
        "Return the user as JSON",
        {"response_format": {"type": "json_object"}},
        Draft('{"b": 2, "a": 1}'),
        Draft('```json\n{"a": 1, "b": 2}\n```'),
        Verdict.AS_GOOD,
        True,
    ),
    (
        "Return the user as JSON",
        {"response_format": {"type": "json_object"}},
        Draft('{"a": 1}'),
        Draft('{"a": 2}'),
        None,
        True,
    ),
    (
        "Weather in Paris and Rome?",
        {},
        Draft("", tool_calls=[tool("weather", city="Rome"), tool("weather", city="Paris")]),
        Draft("", tool_calls=[tool("weather", city="Paris"), tool("weather", city="Rome")]),
        Verdict.AS_GOOD,
        True,
    ),
    (
        "Weather in Paris?",
        {},
        Draft("", tool_calls=[tool("weather", city="Paris", unit="F")]),
        Draft("", tool_calls=[tool("weather", city="Paris", unit="C")]),
        None,
        True,
    ),
    # Nothing to compare: free text goes to the judge.
    (
        "Write a haiku about rain",
        {},
        Draft("Rain taps the window"),
        Draft("Soft rain"),
        None,
        False,
    ),
    # One answer has a number, the other a refusal: not comparable.
    (MATH, {}, Draft("I cannot help with that."), Draft("The answer is 31."), None, False),
]


@pytest.mark.parametrize(("query", "params", "draft", "reference", "verdict", "comparable"), CASES)
def test_extraction_decides_only_agreement(query, params, draft, reference, verdict, comparable):
    assert extraction_verdict(draft, reference, params, profile_query(query)) == (
        verdict,
        comparable,
    )


@pytest.mark.parametrize(
    ("draft_first", "reference_first", "verdict"),
    [
        ("B", "A", Verdict.WORSE),  # the reference won in both orders
        ("A", "B", Verdict.BETTER),  # the draft won in both orders
        ("A", "A", Verdict.AS_GOOD),  # the judge always prefers the first answer: a tie
        ("B", "B", Verdict.AS_GOOD),  # ... or the second one
        ("TIE", "TIE", Verdict.AS_GOOD),
        ("TIE", "A", Verdict.WORSE),
        ("B", None, Verdict.WORSE),  # one order unanswered: the other decides
        (None, None, None),
    ],
)
def test_the_judge_is_asked_in_both_orders_to_cancel_position_bias(
    draft_first, reference_first, verdict
):
    assert combine(draft_first, reference_first) == verdict


@pytest.mark.parametrize(
    ("reply", "parsed"),
    [("A", "A"), ("b", "B"), ("Tie.", "TIE"), ("Answer B is better: B", "B"), ("no idea", None)],
)
def test_judge_replies_are_parsed_strictly(reply, parsed):
    assert parse_judgement(reply) == parsed


def test_the_judge_sees_the_request_and_both_answers():
    messages = judge_messages([{"role": "user", "content": MATH}], "first answer", "second")
    assert messages[0]["role"] == "system"
    assert MATH in messages[1]["content"]
    assert "Answer A:\nfirst answer" in messages[1]["content"]
    assert "Answer B:\nsecond" in messages[1]["content"]
