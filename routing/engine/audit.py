"""Labelling a served (or rejected) draft against the reference model's answer.

An audit compares two answers to the same request: the draft and the answer
of the chain's reference model. The verdict (``learning.Verdict``) says
whether the draft is worse, as good, or better.

1. **By extracted answer**, where the task has one: the same multiple-choice
   letter, the same number (to a relative 1e-6), equal JSON documents (JSON
   mode and schemas), the same tool calls (names and arguments, order
   ignored). Agreement is ``AS_GOOD`` and needs nothing more. Answers that
   *differ* do not say which one is right (on recorded grade-school maths the
   strong model is the wrong one in about a quarter of disagreements), so a
   disagreement goes to the judge — or, with no judge configured, counts as
   ``WORSE`` (the conservative reading).
2. **By an LLM judge** otherwise: a pairwise question ("is A at least as good
   as B for this request?"), asked twice with the answers swapped to cancel
   position bias. The two answers combine into one verdict: consistent
   preferences decide; an inconsistent pair (the judge preferred whichever
   came first, or second) is a tie.

No Django here: the audit task and the benchmark share it.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from routing.engine.complexity import QueryProfile, query_text
from routing.engine.learning import Verdict
from routing.engine.signals import Draft, _choice_letter, final_answer, strip_fence
from routing.engine.types import Message

JUDGE_SYSTEM_PROMPT = (
    "You compare two answers to the same request. Judge correctness first, then "
    "completeness and helpfulness; ignore length and style. Reply with exactly one word: "
    "A if answer A is better, B if answer B is better, TIE if they are equally good."
)
_JUDGE_WORD = re.compile(r"\b(A|B|TIE)\b")


@dataclass(frozen=True)
class Extracted:
    """What answers a request, reduced to what can be compared exactly."""

    kind: str  # "choice" | "number" | "json" | "tools" | "" (nothing comparable)
    value: Any = None


def extracted(draft: Draft, query: QueryProfile, params: dict[str, Any]) -> Extracted:
    if draft.tool_calls:
        calls = []
        for call in draft.tool_calls:
            function = call.get("function") or {}
            try:
                arguments = json.loads(function.get("arguments") or "{}")
            except (TypeError, ValueError, RecursionError):
                arguments = function.get("arguments")
            calls.append(json.dumps([function.get("name"), arguments], sort_keys=True))
        return Extracted("tools", tuple(sorted(calls)))
    text = draft.content or ""
    fmt = (params.get("response_format") or {}).get("type")
    if fmt in {"json_object", "json_schema"}:
        try:
            return Extracted("json", json.dumps(json.loads(strip_fence(text)), sort_keys=True))
        except (TypeError, ValueError, RecursionError):
            return Extracted("")
    if query.choices:
        letter = _choice_letter(text, query.choices)
        return Extracted("choice", letter) if letter else Extracted("")
    _, number = final_answer(text)
    if number is not None and (query.numbers or query.expects_integer):
        return Extracted("number", number)
    return Extracted("")


def agree(a: Extracted, b: Extracted) -> bool | None:
    """True / False when both answers carry a comparable value; None when they do not."""
    if not a.kind or a.kind != b.kind:
        return None
    if a.kind == "number":
        return math.isclose(a.value, b.value, rel_tol=1e-6, abs_tol=1e-9)
    equal: bool = a.value == b.value
    return equal


def extraction_verdict(
    draft: Draft, reference: Draft, params: dict[str, Any], query: QueryProfile
) -> tuple[Verdict | None, bool]:
    """(verdict, comparable): ``AS_GOOD`` on agreement; otherwise no verdict, and whether the
    answers were comparable at all (then they disagree)."""
    same = agree(extracted(draft, query, params), extracted(reference, query, params))
    if same is True:
        return Verdict.AS_GOOD, True
    return None, same is False


def judge_messages(messages: list[Message], first: str, second: str) -> list[Message]:
    """The judge's prompt: the request's text and two answers, A and B."""
    request = query_text(messages)
    return [
        {"role": "system", "content": JUDGE_SYSTEM_PROMPT},
        {
            "role": "user",
            "content": f"Request:\n{request}\n\nAnswer A:\n{first}\n\nAnswer B:\n{second}\n\n"
            "Which answer is better: A, B or TIE?",
        },
    ]


def parse_judgement(text: str) -> str | None:
    """'A', 'B' or 'TIE' from the judge's reply; None when it said none of them."""
    found = _JUDGE_WORD.findall((text or "").upper())
    return found[-1] if found else None


def combine(draft_first: str | None, reference_first: str | None) -> Verdict | None:
    """One verdict on the draft from the judge's two answers (draft as A, then as B).

    Each order votes +1 (draft better), -1 (reference better) or 0; the sign
    of the sum decides. A judge that always prefers one position casts
    opposite votes and the pair is a tie. None when the judge answered neither.
    """
    votes = []
    if draft_first is not None:
        votes.append({"A": 1, "B": -1, "TIE": 0}[draft_first])
    if reference_first is not None:
        votes.append({"A": -1, "B": 1, "TIE": 0}[reference_first])
    if not votes:
        return None
    total = sum(votes)
    return Verdict.BETTER if total > 0 else Verdict.WORSE if total < 0 else Verdict.AS_GOOD


def judge_cost_tokens(messages: list[Message], draft: str, reference: str) -> int:
    """Prompt tokens of one judge call, estimated (4 characters a token) for budgeting."""
    words = len(JUDGE_SYSTEM_PROMPT) + len(query_text(messages)) + len(draft) + len(reference)
    return words // 4 + 40


def served_losses(verdicts: Sequence[Verdict | None]) -> list[float]:
    """Losses of served answers (+1 worse, -1 better), unlabelled ones counted as worse."""
    return [1.0 if v is None else float(-v) for v in verdicts]
