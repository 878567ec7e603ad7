"""Free quality signals of a draft: computed from the draft itself, at no cost.

Each signal is a named number (a *feature*) plus, when it says something, a
human-readable note. ``hard_fail`` marks drafts no score can save: cut off by
the token limit, a refusal, JSON that does not parse or match the requested
schema, tool calls with invalid arguments, code that does not parse.

Features (all floats; absent signals are 0 with their ``has_*`` flag at 0):

- ``has_logprobs``, ``lp_mean``, ``lp_min``: answer-token log-probabilities.
- ``hedge``, ``self_correction``, ``refusal``: hedging phrases, second-guessing
  ("however", "actually", "assuming"…) (counts, capped) and refusals.
- ``truncated``: ``finish_reason == "length"``.
- ``format_ok``: the requested format (JSON, schema, tools, code) validated.
- ``arith_checked``, ``arith_bad``: equations the draft states, re-computed.
- ``answer_found``, ``answer_nonint``, ``answer_is_last``, ``answer_in_work``,
  ``answer_wordy``: the final answer extracted for math, whether it is the last
  computed value, whether the working reaches it before stating it, and
  whether the answer line is prose rather than a value.
- ``choice_missing``: a multiple-choice query whose draft names no option.
- ``q_coverage``: share of the query's numbers the draft uses.
- ``log_len``, ``len_gap``: draft length, and its gap to what the query needs.
- ``complexity``, ``q_len``, ``q_numbers``: how hard the query is.
"""

from __future__ import annotations

import ast
import json
import math
import operator
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from itertools import repeat
from typing import Any

import jsonschema
from jsonschema.exceptions import best_match

from routing.engine.complexity import QueryProfile, numbers
from routing.engine.types import lp_note

_CALC = re.compile(r"<<([^=<>]+)=([^<>]+)>>")
_EQUATION = re.compile(
    r"((?:[\d.,$\s()]|[-+*/x\u00d7\u00f7^%]|\\\*)+?)\s*=\s*\$?\s*(-?[\d,]*\.?\d+)"
)
_HAS_OP = re.compile(r"\d\s*(?:[-+*/x\u00d7\u00f7^]|\\\*)\s*\(?\s*\$?\d")
_FINAL_MARKERS = (
    re.compile(r"####\s*([^\n]*)"),
    re.compile(r"(?i)\\boxed\{([^}]*)\}"),
    re.compile(r"(?i)\b(?:final answer|the answer is|answer:)\s*[:\-]?\s*([^\n]*)"),
)
_CHOICE_IN_QUERY = re.compile(r"(?m)^\s*\(?([A-J])[).:]\s+\S")
_CHOICE_IN_DRAFT = re.compile(
    r"(?i)(?:answer|option|choice)\s*(?:is|:)?\s*\(?([A-J])\)?\b|^\s*\(?([A-J])\)?\s*$|^\(?([A-J])[).:]"
)
_HEDGES = re.compile(
    r"(?i)\b(i'?m not (?:entirely |completely |totally )?(?:sure|certain)|"
    r"i (?:think|believe|guess)|"
    r"might be wrong|not (?:entirely )?clear|it'?s hard to say|possibly|perhaps|probably|"
    r"i'?m unsure|may not be (?:accurate|correct)|approximately|roughly|as far as i know|"
    r"i cannot be certain|hard to determine|unclear)\b"
)
_SELF_CORRECTION = re.compile(
    r"(?i)\b(however|actually|wait|assum\w*|round(?:ed|ing)? (?:up|down|to)|let me re\w*|"
    r"mistake|correction|re-?calculat\w*|on second thought|that doesn'?t make sense)\b"
)
_REFUSALS = re.compile(
    r"(?i)^\s*(?:i'?m sorry,? but |sorry,? )?(?:i (?:can(?:no|')t|am unable to|won'?t|"
    r"am not able to) (?:help|assist|provide|answer|do that|comply))"
)
_CODE_BLOCK = re.compile(r"```(\w*)\n(.*?)```", re.DOTALL)
_BINARY_OPS: dict[type[ast.operator], Callable[[float, float], float]] = {
    ast.Add: operator.add,
    ast.Sub: operator.sub,
    ast.Mult: operator.mul,
    ast.Div: operator.truediv,
    ast.Pow: operator.pow,
}
_UNARY_OPS: dict[type[ast.unaryop], Callable[[float], float]] = {
    ast.USub: operator.neg,
    ast.UAdd: operator.pos,
}


# --- the patterns above, found where they can match -------------------------------------
#
# The patterns are the definition of every signal. Scanning a long draft with a
# case-insensitive alternation led by ``\b`` costs the ``re`` engine a full attempt at
# every character (about 1 ms for each pattern on a 2,000-token draft). The finders below
# return exactly what ``pattern.finditer`` returns, but try the pattern only where a match
# can start: near an occurrence of a literal that every match contains
# (``tests/engine/test_signal_finders.py`` checks them against the patterns themselves).

# Characters that a case-insensitive pattern matches with an ASCII letter but that
# ``str.lower()`` does not turn into that letter (dotless i, long s). The only other one,
# U+0130 (dotted capital I), lower-cases to two characters, which ``_folded`` detects.
_UNFOLDED = ("\u0131", "\u017f")


def _folded(text: str) -> str | None:
    """``text`` lower-cased character for character, so that every character that matches an
    ASCII letter case-insensitively is that letter in lower case; None when it cannot be."""
    folded = text.lower()
    if len(folded) != len(text) or (not text.isascii() and any(c in text for c in _UNFOLDED)):
        return None
    return folded


@dataclass(frozen=True)
class _Phrases:
    """A case-insensitive pattern of phrases, and where its matches can start.

    Every match of ``pattern`` contains one of the lower-case literals of ``anchors`` at
    most ``back`` characters after its start, so a match can only start there; the
    pattern (never empty) is tried at those positions only, in order, as ``finditer``
    would reach them.
    """

    pattern: re.Pattern[str]
    anchors: tuple[tuple[str, int], ...]

    def finditer(self, text: str, folded: str | None) -> list[re.Match[str]]:
        if folded is None:
            return list(self.pattern.finditer(text))
        starts: set[int] = set()
        for literal, back in self.anchors:
            at = folded.find(literal)
            while at != -1:
                starts.update(range(max(0, at - back), at + 1))
                at = folded.find(literal, at + 1)
        found: list[re.Match[str]] = []
        end = 0
        match = self.pattern.match
        for start in sorted(starts):
            if start >= end:
                m = match(text, start)
                if m is not None:
                    found.append(m)
                    end = m.end()
        return found

    def findall(self, text: str, folded: str | None) -> list[str]:
        """``pattern.findall(text)`` of a pattern with one group."""
        return [m.group(1) for m in self.finditer(text, folded)]


_HEDGE_PHRASES = _Phrases(
    _HEDGES,
    (
        ("m not ", 2),  # i'm not / im not (entirely / completely / totally) sure / certain
        ("i think", 0),
        ("i believe", 0),
        ("i guess", 0),
        ("might be wrong", 0),
        ("not clear", 0),
        ("not entirely clear", 0),
        ("it's hard to say", 0),
        ("its hard to say", 0),
        ("possibly", 0),
        ("perhaps", 0),
        ("probably", 0),
        ("m unsure", 2),  # i'm unsure / im unsure
        ("may not be ", 0),
        ("approximately", 0),
        ("roughly", 0),
        ("as far as i know", 0),
        ("i cannot be certain", 0),
        ("hard to determine", 0),
        ("unclear", 0),
    ),
)
_SELF_CORRECTION_PHRASES = _Phrases(
    _SELF_CORRECTION,
    (
        ("however", 0),
        ("actually", 0),
        ("wait", 0),
        ("assum", 0),
        ("round", 0),
        ("let me re", 0),
        ("mistake", 0),
        ("correction", 0),
        ("recalculat", 0),
        ("re-calculat", 0),
        ("on second thought", 0),
        ("that doesn't make sense", 0),
        ("that doesnt make sense", 0),
    ),
)
_FINAL_PHRASES = _Phrases(
    _FINAL_MARKERS[2], (("final answer", 0), ("the answer is", 0), ("answer:", 0))
)

# The ASCII characters an equation's left side (``_EQUATION``'s first group and the spaces
# before "=") and its right side can hold: ``\d`` and ``\s`` are ``str.isdecimal`` and
# ``str.isspace``. Any other ASCII character ends a side; every non-ASCII character is
# taken as a possible part (Unicode digits and spaces, the x and / signs).
_ASCII_DIGITS_AND_SPACES = frozenset(
    c for c in map(chr, range(128)) if c.isdecimal() or c.isspace()
)
_LHS_CHARS = _ASCII_DIGITS_AND_SPACES | frozenset(".,$()-+*/x^%\\")
_RHS_CHARS = _ASCII_DIGITS_AND_SPACES | frozenset(",.$-")


def _equations(text: str) -> list[re.Match[str]]:
    """``list(_EQUATION.finditer(text))``, searched around each "=" only.

    A match holds exactly one "=", its left side runs back from it over ``_LHS_CHARS``
    only and its right side forward over ``_RHS_CHARS`` only, and the pattern has no
    anchor or look-around: searching that window (bounded by the end of the previous
    match) finds what the pattern finds there, and no match starts anywhere else.
    """
    found: list[re.Match[str]] = []
    end = 0
    size = len(text)
    at = text.find("=")
    while at != -1:
        start = at
        while start > end and (text[start - 1] in _LHS_CHARS or text[start - 1] > "\x7f"):
            start -= 1
        if start < at:
            stop = at + 1
            while stop < size and (text[stop] in _RHS_CHARS or text[stop] > "\x7f"):
                stop += 1
            m = _EQUATION.search(text, start, stop)
            if m is not None:
                found.append(m)
                end = m.end()
        at = text.find("=", at + 1)
    return found


FEATURES: tuple[str, ...] = (
    "has_logprobs",
    "lp_mean",
    "lp_min",
    "hedge",
    "self_correction",
    "refusal",
    "truncated",
    "format_ok",
    "arith_checked",
    "arith_bad",
    "answer_found",
    "answer_nonint",
    "answer_is_last",
    "answer_in_work",
    "answer_wordy",
    "choice_missing",
    "q_coverage",
    "log_len",
    "len_gap",
    "complexity",
    "q_len",
    "q_numbers",
)


@dataclass
class SignalReport:
    features: dict[str, float]
    notes: list[str] = field(default_factory=list)
    hard_fail: str | None = None
    answer: str | None = None  # the extracted final answer, for agreement checks


@dataclass(frozen=True)
class Draft:
    """What the engine knows about a candidate answer."""

    content: str
    finish_reason: str | None = None
    tool_calls: list[dict[str, Any]] = field(default_factory=list)
    token_logprobs: list[float] | None = None
    completion_tokens: int = 0


_TIMES_X = re.compile(r"(?<=[\d)])\s*x\s*(?=[\d(])")
_PERCENT = re.compile(r"(\d+(?:\.\d+)?)\s*%")


def safe_eval(expr: str) -> float | None:
    """Evaluate plain arithmetic (no names, no calls); None when it is not that."""
    cleaned = (
        expr.replace("\\*", "*")
        .replace("\u00d7", "*")
        .replace("\u00f7", "/")
        .replace("^", "**")
        .replace(",", "")
        .replace("$", "")
    )
    if "x" in cleaned:
        cleaned = _TIMES_X.sub("*", cleaned)
    if "%" in cleaned:
        cleaned = _PERCENT.sub(r"(\1/100)", cleaned)

    value = arithmetic(cleaned)
    try:
        return None if value is None else float(value)
    except OverflowError:  # an integer beyond any float
        return None


def arithmetic(expr: str) -> int | float | None:
    """The value of plain arithmetic in Python's syntax (numbers, ``+ - * / **``, signs,
    exponents of at most 12); None when ``expr`` is anything else or has no real value.
    Integers stay exact."""

    def ev(node: ast.AST) -> Any:
        if isinstance(node, ast.Constant) and isinstance(node.value, int | float):
            return node.value
        if isinstance(node, ast.BinOp) and type(node.op) in _BINARY_OPS:
            left, right = ev(node.left), ev(node.right)
            if isinstance(node.op, ast.Pow) and abs(right) > 12:
                raise ValueError
            return _BINARY_OPS[type(node.op)](left, right)
        if isinstance(node, ast.UnaryOp) and type(node.op) in _UNARY_OPS:
            return _UNARY_OPS[type(node.op)](ev(node.operand))
        raise ValueError

    try:
        value = ev(ast.parse(expr.strip(), mode="eval").body)
    except (SyntaxError, ValueError, ZeroDivisionError, OverflowError, RecursionError, TypeError):
        return None
    return value if isinstance(value, int | float) else None  # not a complex root


def _close(a: float, b: float, rel: float) -> bool:
    return abs(a - b) <= max(0.011, abs(a) * rel)


def check_arithmetic(text: str) -> tuple[int, int, list[str], list[float]]:
    """Re-compute the equations a draft states: (checked, wrong, notes, results).

    Calculator annotations (``<<a*b=c>>``) are exact; plain ``a * b = c``
    statements may round intermediate results ("= 2.67"), so they get a looser
    tolerance.
    """
    plain = _CALC.sub("", text)
    stated_equations = [(m.group(1), m.group(2), 1e-3) for m in _CALC.finditer(text)] + [
        (m.group(1), m.group(2), 6e-3)
        for m in _equations(plain)
        if _HAS_OP.search(m.group(1).strip())
    ]
    checked = wrong = 0
    notes: list[str] = []
    results: list[float] = []
    for lhs, rhs, tolerance in stated_equations:
        value = safe_eval(lhs)
        try:
            stated = float(rhs.replace(",", "").replace("$", ""))
        except ValueError:
            continue
        results.append(stated)
        if value is None:
            continue
        checked += 1
        if not _close(value, stated, tolerance):
            wrong += 1
            notes.append(f"{lhs.strip()} is {value:g}, not {stated:g}")
    return checked, wrong, notes, results


def final_answer(text: str) -> tuple[str | None, float | None]:
    """The draft's final answer (text and number), from explicit markers, else the last number."""
    return _final_answer(text, _folded(text), None)


def _final_answer(
    text: str, folded: str | None, text_numbers: list[float] | None
) -> tuple[str | None, float | None]:
    """``final_answer``, given ``_folded(text)`` and, when known, ``numbers(text)``."""
    for pattern in _FINAL_MARKERS:
        if pattern is _FINAL_PHRASES.pattern:
            found = _FINAL_PHRASES.findall(text, folded)
        else:
            found = pattern.findall(text)
        if found:
            answer = found[-1].strip()
            nums = numbers(answer)
            return answer, (nums[0] if nums else None)
    nums = numbers(text) if text_numbers is None else text_numbers
    if nums:
        return None, nums[-1]
    return None, None


def _mean(values: list[float]) -> float:
    return sum(values) / len(values) if values else 0.0


def validate_format(draft: Draft, params: dict[str, Any]) -> tuple[bool | None, str | None]:
    """(format_ok, failure reason). None when the request asked for no particular format."""
    tools = params.get("tools") or []
    if draft.tool_calls:
        by_name = {
            t.get("function", {}).get("name"): t.get("function", {})
            for t in tools
            if isinstance(t, dict)
        }
        for call in draft.tool_calls:
            function = call.get("function") or {}
            name = function.get("name")
            if name not in by_name:
                return False, f"tool call to unknown tool '{name}'"
            try:
                arguments = json.loads(function.get("arguments") or "{}")
            except json.JSONDecodeError:
                return False, f"tool '{name}' arguments are not valid JSON"
            schema = by_name[name].get("parameters")
            if schema:
                error = _schema_error(arguments, schema)
                if error:
                    return False, f"tool '{name}' arguments: {error}"
        return True, None
    if tools and params.get("tool_choice") == "required":
        return False, "a tool call was required but the draft made none"
    response_format = params.get("response_format") or {}
    kind = response_format.get("type")
    if kind in {"json_object", "json_schema"}:
        try:
            payload = json.loads(_strip_fence(draft.content))
        except json.JSONDecodeError:
            return False, "the draft is not valid JSON"
        if kind == "json_object" and not isinstance(payload, dict):
            return False, "the draft is JSON but not an object"
        schema = (response_format.get("json_schema") or {}).get("schema")
        if schema:
            error = _schema_error(payload, schema)
            if error:
                return False, f"the JSON does not match the schema: {error}"
        return True, None
    blocks = _CODE_BLOCK.findall(draft.content)
    python_blocks = [code for lang, code in blocks if lang.lower() in {"python", "py"}]
    if python_blocks:
        for code in python_blocks:
            try:
                ast.parse(code)
            except SyntaxError as exc:
                return False, f"Python code does not parse (line {exc.lineno}: {exc.msg})"
        return True, None
    return None, None


def _strip_fence(text: str) -> str:
    stripped = text.strip()
    match = re.fullmatch(r"```(?:json)?\s*(.*?)\s*```", stripped, re.DOTALL)
    return match.group(1) if match else stripped


def _schema_error(payload: Any, schema: dict[str, Any]) -> str | None:
    """What ``jsonschema.validate(payload, schema)`` says is wrong (its message, cut), or None.

    The schema's validator is made and the schema checked once per distinct schema
    (``_validator``), not on every draft; the error is the one ``validate`` raises.
    """
    try:
        key = json.dumps(schema)  # key order kept: it orders the errors
    except (TypeError, ValueError):
        key = None
    validator = _validator(key, schema) if key is not None else _build_validator(schema)
    if validator is None:
        return None  # the client's schema is broken; do not blame the draft
    error = best_match(validator.iter_errors(payload))
    if error is None:
        return None
    message: str = error.message
    return message[:200]


_VALIDATORS: dict[str, Any] = {}
_VALIDATORS_MAX = 256


def _validator(key: str, schema: dict[str, Any]) -> Any:
    """The validator of the schema whose JSON is ``key`` (None: the schema is broken)."""
    try:
        return _VALIDATORS[key]
    except KeyError:
        pass
    validator = _build_validator(json.loads(key))
    if len(_VALIDATORS) >= _VALIDATORS_MAX:
        _VALIDATORS.clear()
    _VALIDATORS[key] = validator
    return validator


def _build_validator(schema: Any) -> Any:
    """What ``jsonschema.validate`` builds before validating: the schema's validator class
    (from its ``$schema``), the schema checked against it; None when it is broken."""
    cls = jsonschema.validators.validator_for(schema)
    try:
        cls.check_schema(schema)
    except jsonschema.SchemaError:
        return None
    return cls(schema)


def extract(draft: Draft, query: QueryProfile, params: dict[str, Any]) -> SignalReport:
    """Compute every free signal of ``draft`` for ``query``."""
    text = draft.content or ""
    f: dict[str, float] = dict.fromkeys(FEATURES, 0.0)
    notes: list[str] = []
    hard_fail: str | None = None
    f["complexity"] = query.complexity
    f["q_len"] = query.log_words
    f["q_numbers"] = min(len(query.numbers), 10) / 10

    if draft.token_logprobs:
        f["has_logprobs"] = 1.0
        f["lp_mean"] = max(_mean(draft.token_logprobs), -10.0)
        f["lp_min"] = max(min(draft.token_logprobs), -20.0)
        # Worded from the value the check keeps (4 decimals): the ledger words it again.
        notes.append(lp_note({"lp_mean": round(f["lp_mean"], 4)}) or "")

    if draft.finish_reason == "length":
        f["truncated"] = 1.0
        hard_fail = "the draft was cut off by the token limit"

    folded = _folded(text)
    hedges = _HEDGE_PHRASES.findall(text, folded)
    if hedges:
        f["hedge"] = min(len(hedges), 3) / 3
        notes.append(f"hedging: {', '.join(sorted({h.lower() for h in hedges})[:3])}")
    corrections = _SELF_CORRECTION_PHRASES.findall(text, folded)
    if corrections:
        f["self_correction"] = min(len(corrections), 3) / 3
        notes.append(f"second-guessing: {', '.join(sorted({c.lower() for c in corrections})[:3])}")
    if _REFUSALS.search(text):
        f["refusal"] = 1.0
        hard_fail = hard_fail or "the draft refuses to answer"

    format_ok, format_error = validate_format(draft, params)
    if format_ok is not None:
        f["format_ok"] = 1.0 if format_ok else -1.0
    if format_error:
        hard_fail = hard_fail or format_error

    text_numbers = numbers(text)
    answer_text, answer_value = _final_answer(text, folded, text_numbers)
    if query.domain == "math" or query.numbers:
        checked, wrong, arith_notes, results = check_arithmetic(text)
        f["arith_checked"] = min(checked, 10) / 10
        f["arith_bad"] = min(wrong, 3) / 3
        notes.extend(f"arithmetic error: {n}" for n in arith_notes[:3])
        f["answer_found"] = 1.0 if answer_text is not None else 0.0
        if answer_value is not None:
            if query.expects_integer and not float(answer_value).is_integer():
                f["answer_nonint"] = 1.0
                notes.append(f"non-integer answer {answer_value:g} to a counting question")
            if results and _close(results[-1], answer_value, 1e-6):
                f["answer_is_last"] = 1.0
            work = _numbers_before_final(text, text_numbers)
            if any(_close(v, answer_value, 1e-6) for v in work):
                f["answer_in_work"] = 1.0
        if answer_text and re.search(r"[A-Za-z]{3,}", answer_text):
            f["answer_wordy"] = 1.0
        if query.numbers:
            used = set(map(round, text_numbers, repeat(6)))
            f["q_coverage"] = len(used & query.numbers) / len(query.numbers)

    if query.choices:
        letter = _choice_letter(text, query.choices)
        if letter is None:
            f["choice_missing"] = 1.0
            notes.append("no option named in a multiple-choice answer")
        answer_text = letter or answer_text

    tokens = draft.completion_tokens or max(1, len(text) // 4)
    f["log_len"] = math.log1p(tokens)
    f["len_gap"] = f["log_len"] - query.expected_log_tokens
    if not text.strip() and not draft.tool_calls:
        hard_fail = hard_fail or "the draft is empty"

    if draft.tool_calls:
        answer_text = json.dumps([c.get("function") for c in draft.tool_calls], sort_keys=True)
    elif answer_text is None:
        answer_text = (
            f"{answer_value:g}"
            if answer_value is not None
            else " ".join(text.lower().split())[:200]
        )
    return SignalReport(features=f, notes=notes, hard_fail=hard_fail, answer=answer_text)


def _before_final(text: str) -> str:
    """The working: the draft without its final-answer line."""
    lines = text.rstrip().splitlines()
    return "\n".join(lines[:-1]) if len(lines) > 1 else ""


# Where ``str.splitlines`` splits (``\r\n`` ends with ``\n``).
_LINE_BREAKS = ("\n", "\r", "\x0b", "\x0c", "\x1c", "\x1d", "\x1e", "\x85", "\u2028", "\u2029")


def _numbers_before_final(text: str, text_numbers: list[float]) -> list[float]:
    """``numbers(_before_final(text))``, given ``numbers(text)``: all but those of the last
    line of ``text.rstrip()`` (no number spans a line break, or starts right after one's
    word character; none is in the spaces ``rstrip`` drops), or none at all when the text
    has one line."""
    stripped = text.rstrip()
    start = max(stripped.rfind(c) for c in _LINE_BREAKS) + 1
    if start == 0:
        return []
    return text_numbers[: len(text_numbers) - len(numbers(stripped[start:]))]


def _choice_letter(text: str, choices: tuple[str, ...]) -> str | None:
    for match in _CHOICE_IN_DRAFT.finditer(text.strip()):
        letter = next(g for g in match.groups() if g)
        if letter.upper() in choices:
            return letter.upper()
    stripped = text.strip().rstrip(".").upper()
    return stripped if stripped in choices else None


def normalise_answer(answer: str | None) -> str:
    if answer is None:
        return ""
    nums = numbers(answer)
    if nums:
        return f"{nums[0]:g}"
    return " ".join(answer.lower().split()).strip(".")
