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
from typing import Any

import jsonschema

from routing.engine.complexity import QueryProfile, numbers

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
    cleaned = re.sub(r"(?<=[\d)])\s*x\s*(?=[\d(])", "*", cleaned)
    cleaned = re.sub(r"(\d+(?:\.\d+)?)\s*%", r"(\1/100)", cleaned)

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
        for m in _EQUATION.finditer(plain)
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
    for pattern in _FINAL_MARKERS:
        found = pattern.findall(text)
        if found:
            answer = found[-1].strip()
            nums = numbers(answer)
            return answer, (nums[0] if nums else None)
    nums = numbers(text)
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
    try:
        jsonschema.validate(payload, schema)
    except jsonschema.ValidationError as exc:
        message: str = exc.message
        return message[:200]
    except jsonschema.SchemaError:
        return None  # the client's schema is broken; do not blame the draft
    return None


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
        notes.append(f"mean token log-probability {f['lp_mean']:.3f}")

    if draft.finish_reason == "length":
        f["truncated"] = 1.0
        hard_fail = "the draft was cut off by the token limit"

    hedges = _HEDGES.findall(text)
    if hedges:
        f["hedge"] = min(len(hedges), 3) / 3
        notes.append(f"hedging: {', '.join(sorted({h.lower() for h in hedges})[:3])}")
    corrections = _SELF_CORRECTION.findall(text)
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

    answer_text, answer_value = final_answer(text)
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
            work = numbers(_before_final(text))
            if any(_close(v, answer_value, 1e-6) for v in work):
                f["answer_in_work"] = 1.0
        if answer_text and re.search(r"[A-Za-z]{3,}", answer_text):
            f["answer_wordy"] = 1.0
        if query.numbers:
            used = {round(v, 6) for v in numbers(text)}
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
