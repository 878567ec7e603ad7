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
import symtable
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from itertools import repeat
from numbers import Number
from typing import Any

import jsonschema
from jsonschema.exceptions import best_match

from routing.engine.complexity import QueryProfile, numbers
from routing.engine.types import lp_note

_CALC = re.compile(r"<<([^=<>]+)=([^<>]+)>>")
# After "=": spaces, at most one "$" and spaces after it, the number. Written "\s*\$?\s*",
# the two runs of spaces could split a long run of spaces in as many ways as it is long,
# each tried in turn when no number follows: quadratic in the run.
_EQUATION = re.compile(
    r"((?:[\d.,$\s()]|[-+*/x\u00d7\u00f7^%]|\\\*)+?)\s*=\s*(?:\$\s*)?(-?[\d,]*\.?\d+)"
)
_HAS_OP = re.compile(r"\d\s*(?:[-+*/x\u00d7\u00f7^]|\\\*)\s*\(?\s*\$?\d")
_BOXED = re.compile(r"(?i)\\boxed\{([^}]*)\}")
_FINAL_MARKERS = (
    re.compile(r"####\s*([^\n]*)"),
    _BOXED,
    re.compile(r"(?i)\b(?:final answer|the answer is|answer:)\s*[:\-]?\s*([^\n]*)"),
)
_CHOICE_IN_DRAFT = re.compile(  # "\s*(?:(?:is|:)\s*)?", not "\s*(?:is|:)?\s*": see _EQUATION
    r"(?i)(?:answer|option|choice)\s*(?:(?:is|:)\s*)?\(?([A-J])\)?\b|^\s*\(?([A-J])\)?\s*$|^\(?([A-J])[).:]"
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
_FENCE_OPEN = re.compile(r"```(\w*)\n")  # ``_CODE_BLOCK`` up to its body
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
    would reach them. A literal shared by several phrases ("clear" of "not clear" and
    "unclear") is searched once for all of them: each search scans the whole draft.
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
        ("clear", 13),  # not clear / not entirely clear / unclear
        ("hard to ", 5),  # it's hard to say / its hard to say / hard to determine
        ("bly", 5),  # possibly / probably
        ("perhaps", 0),
        ("m unsure", 2),  # i'm unsure / im unsure
        ("may not be ", 0),
        ("approximately", 0),
        ("roughly", 0),
        ("as far as i know", 0),
        ("i cannot be certain", 0),
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
        ("calculat", 3),  # recalculat / re-calculat
        ("on second thought", 0),
        ("make sense", 13),  # that doesn't make sense / that doesnt make sense
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


def _run_of(chars: frozenset[str]) -> re.Pattern[str]:
    """A pattern matching a run of ``chars`` and of non-ASCII characters (none is ASCII)."""
    return re.compile(
        "[" + "".join(f"\\x{ord(c):02x}" for c in sorted(chars)) + "\\x80-\\U0010ffff]*"
    )


_LHS_RUN = _run_of(_LHS_CHARS)  # matched on the reversed text: the run before an "="
# ``_EQUATION`` after its "=" (what follows the last "=" of its pattern, as written there).
_EQUATION_RIGHT = re.compile(_EQUATION.pattern.rsplit("=", 1)[1])
_RHS_RUN = _run_of(_RHS_CHARS)


def _equations(text: str) -> list[re.Match[str]]:
    """``list(_EQUATION.finditer(text))``, searched around each "=" only.

    A match holds exactly one "=", its left side runs back from it over ``_LHS_CHARS``
    only and its right side forward over ``_RHS_CHARS`` only, and the pattern has no
    anchor or look-around: searching that window (bounded by the end of the previous
    match) finds what the pattern finds there, and no match starts anywhere else. The
    runs are matched by ``_LHS_RUN`` (on the text reversed) and ``_RHS_RUN``. A window
    whose right side has no number (``_EQUATION_RIGHT``, the part of the pattern after
    "=", fails there) holds no match: it is not searched (the search would try every
    start of the left side in vain, each at the cost of the lazy left side's steps).
    """
    found: list[re.Match[str]] = []
    at = text.find("=")
    if at == -1:
        return found
    end = 0
    size = len(text)
    backwards = text[::-1]  # text[i] is backwards[size - 1 - i]
    lhs_run, rhs_run, search = _LHS_RUN.match, _RHS_RUN.match, _EQUATION.search
    right = _EQUATION_RIGHT.match
    while at != -1:
        stop = rhs_run(text, at + 1).end()  # type: ignore[union-attr]
        if right(text, at + 1, stop) is not None:
            # The run of left-side characters that ends at "=", no further back than
            # ``end`` (a run pattern always matches, if only the empty string).
            start = size - lhs_run(backwards, size - at, size - end).end()  # type: ignore[union-attr]
            if start < at:
                m = search(text, start, stop)
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
    token_logprobs: Sequence[float] | None = None  # a list, or the client's array of floats
    completion_tokens: int = 0


_TIMES_X = re.compile(r"(?<=[\d)])\s*x\s*(?=[\d(])")
_PERCENT = re.compile(r"(\d+(?:\.\d+)?)\s*%")


def safe_eval(expr: str) -> float | None:
    """Evaluate plain arithmetic (no names, no calls); None when it is not that."""
    value = arithmetic(python_arithmetic(expr))
    try:
        return None if value is None else float(value)
    except OverflowError:  # an integer beyond any float
        return None


def python_arithmetic(expr: str) -> str:
    """A stated equation's side in Python's syntax: the draft's multiplication and division
    signs, ``^``, ``x`` and ``%`` as Python's operators, thousands separators and dollar
    signs dropped."""
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
    return cleaned


# The biggest integer arithmetic computes, in bits: a product or a power past it is not
# computed (the expression has no value), so that no draft can make the check compute a
# number of millions of digits ("((9^12)^12)^12..." grows twelvefold at each power). Far
# beyond any number a draft means (a float ends at 2^1024; a literal at 4,300 digits,
# 14,284 bits); a product or power of this size takes microseconds.
_BIGGEST_BITS = 1 << 16


def _mul(left: Any, right: Any) -> Any:
    if (
        type(left) is int
        and type(right) is int
        and left.bit_length() + right.bit_length() > _BIGGEST_BITS
    ):
        raise ValueError
    return left * right


def _pow(left: Any, right: Any) -> Any:
    if abs(right) > 12:
        raise ValueError
    if type(left) is int and type(right) is int and right > 1:
        if left.bit_length() * right > _BIGGEST_BITS:
            raise ValueError
    return left**right


_BINARY_OPS: dict[type[ast.operator], Callable[[Any, Any], Any]] = {
    ast.Add: operator.add,
    ast.Sub: operator.sub,
    ast.Mult: _mul,
    ast.Div: operator.truediv,
    ast.Pow: _pow,
}
_ARITH_ERRORS = (ValueError, ZeroDivisionError, OverflowError, TypeError)


def arithmetic(expr: str) -> int | float | None:
    """The value of plain arithmetic in Python's syntax (numbers, ``+ - * / **``, signs,
    exponents of at most 12); None when ``expr`` is anything else or has no real value.
    Integers stay exact (up to ``_BIGGEST_BITS``: past it, no value)."""
    expr = expr.strip()
    value = _arithmetic_fast(expr)
    if value is _NOT_FAST:
        value = _arithmetic_ast(expr)
    return value if isinstance(value, int | float) else None  # not a complex root


def _arithmetic_ast(expr: str) -> Any:
    """``arithmetic`` through Python's own parser: the definition of what ``expr`` means."""

    def ev(node: ast.AST) -> Any:
        if isinstance(node, ast.Constant) and isinstance(node.value, int | float):
            return node.value
        if isinstance(node, ast.BinOp) and type(node.op) in _BINARY_OPS:
            left, right = ev(node.left), ev(node.right)
            return _BINARY_OPS[type(node.op)](left, right)
        if isinstance(node, ast.UnaryOp) and type(node.op) in _UNARY_OPS:
            return _UNARY_OPS[type(node.op)](ev(node.operand))
        raise ValueError

    try:
        return ev(ast.parse(expr, mode="eval").body)
    except (SyntaxError, RecursionError, *_ARITH_ERRORS):
        return None
    except MemoryError:  # the parser's own stack limit ("too complex to parse")
        return None


# --- the same, without ast.parse ------------------------------------------------------
#
# ``ast.parse`` and the walk of its tree cost ~8 us an equation, and a long math draft
# states dozens. Most equations are a few numbers and operators: those are evaluated
# here, by the grammar Python's parser applies to them (``+ -`` < ``* /`` < unary
# ``+ -`` < ``**``, whose right operand may carry a sign and which groups to the right);
# anything else (a letter, a non-ASCII or other character, a line break, more than
# ``_FAST_TOKENS`` tokens) goes to ``_arithmetic_ast``. Every operation is the one
# ``_arithmetic_ast`` applies, on the same tree, so the value is the same;
# ``tests/engine/test_arithmetic.py`` compares both on random and hostile expressions.

_NOT_FAST = object()
_FAST_TOKENS = 64  # few enough that Python's parser and the tree walk never hit a depth limit
_ARITH_TOKEN = re.compile(
    r"[ \t]*(?:([0-9]+(?:\.[0-9]*)?|\.[0-9]+)|(\*\*|//|[-+*/()])|(.))", re.DOTALL
)
# Binding strength of each binary operator; a unary sign binds at 3.
_PRECEDENCE = {"+": 1, "-": 1, "*": 2, "/": 2, "**": 4}
_APPLY: dict[str, Callable[[Any, Any], Any]] = {
    "+": operator.add,
    "-": operator.sub,
    "*": _mul,
    "/": operator.truediv,
    "**": _pow,
}


# Nine equations in ten: two numbers and an operator.
_TWO_NUMBERS = re.compile(
    r"([0-9]+(?:\.[0-9]*)?|\.[0-9]+)[ \t]*(\*\*|[-+*/])[ \t]*([0-9]+(?:\.[0-9]*)?|\.[0-9]+)"
)


def _arithmetic_fast(expr: str) -> Any:
    """``_arithmetic_ast(expr)`` for ``expr`` (stripped) made of ASCII digits, ``.``,
    ``+ - * / ( )``, spaces and tabs only, in at most ``_FAST_TOKENS`` tokens (an
    operator-precedence parse that computes as it goes); ``_NOT_FAST`` for any other."""
    two = _TWO_NUMBERS.fullmatch(expr)
    if two is not None:
        left, op, right = two.groups()
        if (left[0] != "0" or "." in left or not left.strip("0")) and (
            right[0] != "0" or "." in right or not right.strip("0")
        ):
            try:
                return _APPLY[op](
                    float(left) if "." in left else int(left),
                    float(right) if "." in right else int(right),
                )
            except _ARITH_ERRORS:
                return None
    tokens = _ARITH_TOKEN.findall(expr)
    if len(tokens) > _FAST_TOKENS:
        return _NOT_FAST
    values: list[Any] = []
    ops: list[str] = []  # binary operators, "(", and the signs "u-" / "u+"
    operand = True  # an operand (a number, "(" or a sign) comes next
    try:
        for number, op, other in tokens:
            if other:
                return _NOT_FAST
            if operand:
                if number:
                    if "." in number:
                        values.append(float(number))
                    elif number[0] == "0" and number.strip("0"):
                        return None  # "012": leading zeros, a syntax error in Python
                    else:
                        values.append(int(number))  # ValueError past the 4,300 digits
                    operand = False
                elif op == "(":
                    ops.append("(")
                elif op == "-":
                    ops.append("u-")
                elif op == "+":
                    ops.append("u+")
                else:
                    return None  # "* 2", ")": a syntax error
            elif number or op == "(" or op == "//":
                return None  # "2 3", "2 (3)" (a call), "6 // 2" (a floor division)
            elif op == ")":
                while ops and ops[-1] != "(":
                    _reduce(values, ops)
                if not ops:
                    return None  # ")" without "("
                ops.pop()
            else:
                precedence = _PRECEDENCE[op]
                while ops:
                    top = ops[-1]
                    if top == "(":
                        break
                    above = 3 if top[0] == "u" else _PRECEDENCE[top]
                    # Left to right, but "**" groups to the right.
                    if above > precedence or (above == precedence and op != "**"):
                        _reduce(values, ops)
                    else:
                        break
                ops.append(op)
                operand = True
        if operand:
            return None  # empty, or ends with an operator or "("
        while ops:
            if ops[-1] == "(":
                return None  # "(" never closed
            _reduce(values, ops)
    except _ARITH_ERRORS:
        return None
    return values[0]


def _reduce(values: list[Any], ops: list[str]) -> None:
    op = ops.pop()
    if op == "u-":
        values[-1] = -values[-1]
    elif op == "u+":
        values[-1] = +values[-1]
    else:
        right = values.pop()
        values[-1] = _APPLY[op](values[-1], right)


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
        elif pattern is _BOXED:
            # A match ends at the first "}" after its start: none starts after the last
            # one, and each start there would scan to the end of the draft in vain.
            found = pattern.findall(text, 0, text.rfind("}") + 1)
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


def _mean(values: Sequence[float]) -> float:
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
                arguments = _read_json(function.get("arguments") or "{}")
            except _Unreadable as exc:
                return False, f"tool '{name}' arguments are {exc}"
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
            payload = _read_json(strip_fence(draft.content))
        except _Unreadable as exc:
            return False, f"the draft is {exc}"
        if kind == "json_object" and not isinstance(payload, dict):
            return False, "the draft is JSON but not an object"
        schema = (response_format.get("json_schema") or {}).get("schema")
        if schema:
            error = _schema_error(payload, schema)
            if error:
                return False, f"the JSON does not match the schema: {error}"
        return True, None
    blocks = _code_blocks(draft.content)
    python_blocks = [code for lang, code in blocks if lang.lower() in {"python", "py"}]
    if python_blocks:
        for code in python_blocks:
            error = _python_error(code)
            if error is not None:
                return False, error
        return True, None
    return None, None


class _Unreadable(ValueError):
    """A draft's JSON that cannot be read; the message completes "the draft is ..."."""


def _read_json(text: str) -> Any:
    """``json.loads(text)``; :class:`_Unreadable` for any text it cannot read.

    Besides invalid JSON, ``json.loads`` fails on a document nested deeper than Python's
    recursion limit (``RecursionError``) and on an integer of more than 4,300 digits (a
    plain ``ValueError``). A draft is the model's text, which the request's sender can
    steer: each is a verdict on the draft, never an error of the check.
    """
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        raise _Unreadable("not valid JSON") from None
    except RecursionError:
        raise _Unreadable("JSON nested too deeply to read") from None
    except ValueError:
        raise _Unreadable("JSON with a number too long to read") from None


def _python_error(code: str) -> str | None:
    """Why ``code`` is not Python that this interpreter can compile; None when it parses.

    ``symtable.symtable`` runs the parser ``ast.parse`` runs but turns no syntax tree into
    Python objects: about three quarters of the cost. It also refuses a few programs that
    parse (a duplicate argument, ``nonlocal`` at module level), so whatever it refuses is
    decided again by ``ast.parse``: the verdict and the message are ``ast.parse``'s.
    Expressions nested too deeply (a sum of 3,000 terms, 3,000 signs) make the parser
    raise ``RecursionError`` or ``MemoryError``: the interpreter could not compile that
    code either.
    """
    try:
        symtable.symtable(code, "<draft>", "exec")
        return None
    except Exception:  # noqa: S110 - decided again below, by ast.parse
        pass
    try:
        ast.parse(code)
    except SyntaxError as exc:
        return f"Python code does not parse (line {exc.lineno}: {exc.msg})"
    except (RecursionError, MemoryError):
        return "Python code is nested too deeply to parse"
    return None


def _code_blocks(text: str) -> list[tuple[str, str]]:
    """``_CODE_BLOCK.findall(text)``, each body found with ``str.find``.

    The pattern's lazy body steps through the draft a character at a time up to the next
    fence; the first "```" at or after the body's start is where it stops. A match can only
    start at a "```" whose word characters run to a line break (``_FENCE_OPEN``); when one
    does not, the next "```" is tried from the character after it, as the pattern would (a
    fence of four backticks opens at its second). An opening with no closing fence after
    it ends the search: a later start would need a "```" after it too.
    """
    found: list[tuple[str, str]] = []
    opening = _FENCE_OPEN.match
    at = text.find("```")
    while at != -1:
        m = opening(text, at)
        if m is None:
            at = text.find("```", at + 1)
            continue
        end = text.find("```", m.end())
        if end == -1:
            break
        found.append((m.group(1), text[m.end() : end]))
        at = text.find("```", end + 3)
    return found


def strip_fence(text: str) -> str:
    r"""The JSON of a draft, out of its code fence: what
    ``re.fullmatch(r"```(?:json)?\s*(.*?)\s*```", text.strip(), re.DOTALL)`` captures when it
    matches (the text between the fences, without a leading "json", stripped), else the
    text stripped.

    In linear time: that pattern tries every split of a run of spaces between its lazy body
    and the spaces after it, for every length of the body (a minute for "```json" followed
    by 4,000 spaces and tabs, the run of whitespace a model in JSON mode can produce).
    """
    stripped = text.strip()
    if len(stripped) < 6 or not (stripped.startswith("```") and stripped.endswith("```")):
        return stripped
    inner = stripped[3:-3]
    return (inner[4:] if inner.startswith("json") else inner).strip()


def _schema_error(payload: Any, schema: dict[str, Any]) -> str | None:
    """What ``jsonschema.validate(payload, schema)`` says is wrong (its message, cut), or None.

    The schema's validator is made and the schema checked once per distinct schema
    (``_validator``), not on every draft; the error is the one ``validate`` raises. A
    document that the schema's fast check (``_fast_check``) finds valid has no error; any
    other is validated by ``jsonschema``.
    """
    try:
        key = json.dumps(schema)  # key order kept: it orders the errors
    except (TypeError, ValueError):
        key = None
    validator, valid = _validator(key, schema) if key is not None else _build_validator(schema)
    if validator is None:
        return None  # the client's schema is broken; do not blame the draft
    try:
        if valid is not None and valid(payload):
            return None
        error = best_match(validator.iter_errors(payload))
        if error is None:
            return None
        message: str = error.message  # holds the repr of the part at fault
    except RecursionError:  # a document deeper than a recursive schema can be followed
        return "nested too deeply to validate"
    return message[:200]


_VALIDATORS: dict[str, tuple[Any, Callable[[Any], bool] | None]] = {}
_VALIDATORS_MAX = 256


def _validator(key: str, schema: dict[str, Any]) -> tuple[Any, Callable[[Any], bool] | None]:
    """The validator of the schema whose JSON is ``key`` (None: the schema is broken), and
    its fast check (``_fast_check``)."""
    try:
        return _VALIDATORS[key]
    except KeyError:
        pass
    built = _build_validator(json.loads(key))
    if len(_VALIDATORS) >= _VALIDATORS_MAX:
        _VALIDATORS.clear()
    _VALIDATORS[key] = built
    return built


def _build_validator(schema: Any) -> tuple[Any, Callable[[Any], bool] | None]:
    """What ``jsonschema.validate`` builds before validating: the schema's validator class
    (from its ``$schema``), the schema checked against it (None when it is broken); and
    the schema's fast check."""
    cls = jsonschema.validators.validator_for(schema)
    try:
        cls.check_schema(schema)
    except jsonschema.SchemaError:
        return None, None
    validator = cls(schema)
    return validator, _fast_check(validator)


# --- JSON documents a schema finds no error in, without jsonschema -------------------------
#
# ``jsonschema`` walks a document through a new validator object per value (~0.3 ms for a
# document of 2,000 tokens, most of a JSON check). A schema made of the keywords below is
# turned once into a Python function that says whether a document is valid: True only when
# ``validator.iter_errors`` finds nothing. Each keyword is the same test as ``jsonschema``'s
# own function for it, and is used only when the validator class runs exactly that
# function (checked by identity: another ``jsonschema`` version, a draft that reads the
# keyword another way, or any other keyword the validator applies, and the schema has no
# fast check). A document the function says is invalid goes to ``jsonschema``, which
# words the error. ``tests/engine/test_signal_finders.py`` compares both.

try:
    from jsonschema import _keywords, _legacy_keywords, _types

    _MIRRORED: dict[str, tuple[Any, ...]] = {
        "type": (_keywords.type,),
        "properties": (_keywords.properties,),
        "required": (_keywords.required,),
        "additionalProperties": (_keywords.additionalProperties,),
        "items": (
            _keywords.items,
            _legacy_keywords.items_draft6_draft7_draft201909,
            _legacy_keywords.items_draft3_draft4,
        ),
        "enum": (_keywords.enum,),
        "const": (_keywords.const,),
        "anyOf": (_keywords.anyOf,),
        "minItems": (_keywords.minItems,),
        "maxItems": (_keywords.maxItems,),
        "minLength": (_keywords.minLength,),
        "maxLength": (_keywords.maxLength,),
        "format": (_keywords.format,),  # without a format checker (the default): no test
    }
    _TYPE_CHECKERS = {
        id(_types.draft4_type_checker): False,  # a float is never an "integer"
        id(_types.draft6_type_checker): True,  # 1.0 is an "integer" (drafts 6 to 2020-12)
    }
except ImportError:  # pragma: no cover - another jsonschema: validate with it alone
    _MIRRORED, _TYPE_CHECKERS = {}, {}


class _NoFastCheck(Exception):
    pass


def _anything(instance: Any) -> bool:
    return True


def _nothing(instance: Any) -> bool:
    return False


def _is_integer(instance: Any) -> bool:  # jsonschema's draft 3 and 4 "integer"
    return isinstance(instance, int) and not isinstance(instance, bool)


def _is_integral(instance: Any) -> bool:  # drafts 6 to 2020-12
    return _is_integer(instance) or (isinstance(instance, float) and instance.is_integer())


def _is_number(instance: Any) -> bool:
    return isinstance(instance, Number) and not isinstance(instance, bool)


_TYPE_TESTS: dict[str, Callable[[Any], bool]] = {
    "array": lambda instance: isinstance(instance, list),
    "boolean": lambda instance: isinstance(instance, bool),
    "null": lambda instance: instance is None,
    "number": _is_number,
    "object": lambda instance: isinstance(instance, dict),
    "string": lambda instance: isinstance(instance, str),
}


def _fast_check(validator: Any) -> Callable[[Any], bool] | None:
    """A function of a document, True only when ``validator.iter_errors`` finds no error in
    it; None when the schema uses what it does not mirror."""
    cls = type(validator)
    integral_floats = _TYPE_CHECKERS.get(id(cls.TYPE_CHECKER))
    if integral_floats is None or getattr(validator, "format_checker", None) is not None:
        return None
    try:
        return _compile_schema(validator.schema, cls.VALIDATORS, integral_floats, True)
    except _NoFastCheck:
        return None


def _compile_schema(
    schema: Any, keywords: dict[str, Any], integral_floats: bool, root: bool = False
) -> Callable[[Any], bool]:
    if schema is True:
        return _anything
    if schema is False:
        return _nothing
    if type(schema) is not dict:
        raise _NoFastCheck

    def sub(subschema: Any) -> Callable[[Any], bool]:
        return _compile_schema(subschema, keywords, integral_floats)

    checks: list[Callable[[Any], bool]] = []
    for key, value in schema.items():
        if key == "$schema":
            if root:  # it chose the validator class; below, it would switch the class
                continue
            raise _NoFastCheck
        function = keywords.get(key)
        if function is None:
            continue  # a keyword the validator does not apply (title, description...)
        if function not in _MIRRORED.get(key, ()):
            raise _NoFastCheck
        if key == "format":
            continue
        checks.append(_keyword_check(key, value, schema, sub, integral_floats))
    if not checks:
        return _anything
    if len(checks) == 1:
        return checks[0]
    all_checks = tuple(checks)

    def check(instance: Any) -> bool:
        for each in all_checks:
            if not each(instance):
                return False
        return True

    return check


def _keyword_check(
    key: str,
    value: Any,
    schema: dict[str, Any],
    sub: Callable[[Any], Callable[[Any], bool]],
    integral_floats: bool,
) -> Callable[[Any], bool]:
    """The test of one keyword (``jsonschema._keywords``' function for it, as a predicate)."""
    if key == "type":
        names = [value] if isinstance(value, str) else list(value)
        if not all(name in _TYPE_TESTS or name == "integer" for name in names):
            raise _NoFastCheck
        tests = [
            (_is_integral if integral_floats else _is_integer)
            if name == "integer"
            else _TYPE_TESTS[name]
            for name in names
        ]
        if len(tests) == 1:
            return tests[0]
        return lambda instance: any(test(instance) for test in tests)
    if key == "properties":
        if type(value) is not dict:
            raise _NoFastCheck
        properties = tuple((name, sub(subschema)) for name, subschema in value.items())

        def check_properties(instance: Any) -> bool:
            if isinstance(instance, dict):
                for name, valid in properties:
                    if name in instance and not valid(instance[name]):
                        return False
            return True

        return check_properties
    if key == "required":
        required = tuple(value)
        return lambda instance: (
            not isinstance(instance, dict) or all(name in instance for name in required)
        )
    if key == "additionalProperties":
        known = schema.get("properties", {})
        if "patternProperties" in schema or type(known) is not dict:
            raise _NoFastCheck
        if isinstance(value, dict):
            valid_extra = sub(value)

            def check_extras(instance: Any) -> bool:
                if isinstance(instance, dict):
                    for name, item in instance.items():
                        if name not in known and not valid_extra(item):
                            return False
                return True

            return check_extras
        if value:
            return _anything
        return lambda instance: (
            not isinstance(instance, dict) or all(name in known for name in instance)
        )
    if key == "items":
        if "prefixItems" in schema or not (
            isinstance(value, dict) or ((value is True or value is False) and integral_floats)
        ):
            raise _NoFastCheck  # an array of schemas; a boolean is no draft 4 schema
        valid_item = sub(value)
        return lambda instance: not isinstance(instance, list) or all(map(valid_item, instance))
    if key in {"enum", "const"}:
        choices = value if key == "enum" else [value]
        if type(choices) is not list or not all(type(c) is str for c in choices):
            raise _NoFastCheck  # jsonschema's equality of anything but strings
        allowed = frozenset(choices)
        return lambda instance: type(instance) is str and instance in allowed
    if key == "anyOf":
        alternatives = tuple(sub(subschema) for subschema in value)
        return lambda instance: any(valid(instance) for valid in alternatives)
    if key in {"minItems", "maxItems", "minLength", "maxLength"}:
        kind = list if key.endswith("Items") else str
        bound = value
        if key.startswith("min"):
            return lambda instance: not isinstance(instance, kind) or not len(instance) < bound
        return lambda instance: not isinstance(instance, kind) or not len(instance) > bound
    raise _NoFastCheck  # pragma: no cover - every key of _MIRRORED is handled above


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
        lp_mean = _mean(draft.token_logprobs)
        # A log-probability is at most 0. A NaN, or values whose mean is above 0 (up to
        # rounding), make the upstream's numbers meaningless: the draft is judged without.
        if -math.inf <= lp_mean <= 1e-6:
            f["has_logprobs"] = 1.0
            f["lp_mean"] = max(lp_mean, -10.0)
            f["lp_min"] = max(min(draft.token_logprobs), -20.0)
            # Worded from the value the check keeps (4 decimals): the ledger words it again.
            notes.append(lp_note({"lp_mean": round(f["lp_mean"], 4)}) or "")
        else:
            notes.append("log-probabilities out of range, ignored")

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
            if _in_work(answer_value, _numbers_before_final(text, text_numbers)):
                f["answer_in_work"] = 1.0
        if answer_text and re.search(r"[A-Za-z]{3,}", answer_text):
            f["answer_wordy"] = 1.0
        if query.numbers:
            # Each distinct value rounded once (a long working repeats its numbers):
            # rounding to 6 places costs ~0.4 µs a call.
            used = set(map(round, set(text_numbers), repeat(6)))
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


def _in_work(answer: float, work: list[float]) -> bool:
    """``any(_close(v, answer, 1e-6) for v in work)``: at once when the answer itself is in
    the working (a finite number is close to itself; infinity is not: inf - inf is nan)."""
    if math.isfinite(answer) and answer in work:
        return True
    return any(abs(v - answer) <= max(0.011, abs(v) * 1e-6) for v in work)


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
