"""How a ledger row stores its attempts, and how every reader gets them back.

``UsageEvent.attempts`` holds one JSON object per upstream call. Rows written before
this module store ``Attempt.as_dict()`` whole; rows written since store it compactly
(:func:`attempt_stored`), and :func:`attempts_read` gives both back in the whole shape,
so no reader needs to know which one a row has:

- keys are short (``ATTEMPT_KEYS``, ``CHECK_KEYS``, ``PAID_KEYS``: ``cost_nanos`` is
  ``c``): a key is stored in every attempt of every row, and the long ones were a
  fifth of what an attempt holds;
- a field equal to its default is left out (zero tokens, cost and latency; empty error
  and decision; no hard failure; no paid checks), and ``deployment`` when it names the
  model itself;
- the check's floats (probability, threshold, features, contributions, a paid check's
  value) keep 6 significant digits (the engine rounds them to 4 decimals already);
  integers, money above all (``cost_nanos``), are never rounded;
- the check's ``reasons`` are not stored when :func:`routing.engine.types.check_reasons`
  gives them back from the rest of the check and the row's ``domain`` and
  ``complexity``; the notes it cannot derive (hedging words, arithmetic errors) are
  stored as ``notes``. A check whose reasons would not come back identical keeps them
  verbatim, so nothing is ever lost.

Reading never fails on a stored shape it does not expect (a missing key takes its
default, an unknown key is kept, a value of the wrong type is dropped): the ledger is
data, and old, hand-made or damaged rows must still show.
"""

from __future__ import annotations

import math
from typing import Any, TypeGuard

from routing.engine.types import check_reasons, lp_note

# Attempt fields left out of a stored attempt when they hold these values.
ATTEMPT_DEFAULTS: dict[str, Any] = {
    "prompt_tokens": 0,
    "completion_tokens": 0,
    "cost_nanos": 0,
    "latency_ms": 0,
    "error_code": "",
    "error_message": "",
    "decision": "",
}
PAID_DEFAULTS: dict[str, Any] = {
    "value": None,
    "cost_nanos": 0,
    "prompt_tokens": 0,
    "completion_tokens": 0,
    "detail": "",
}
SIGNIFICANT_DIGITS = 6
# Field -> stored key. Never reuse a stored key for another field: old rows keep theirs.
ATTEMPT_KEYS = {
    "model": "m",
    "deployment": "d",
    "role": "r",
    "status": "s",
    "prompt_tokens": "pt",
    "completion_tokens": "ct",
    "cost_nanos": "c",
    "latency_ms": "ms",
    "error_code": "ec",
    "error_message": "em",
    "decision": "dc",
    "check": "k",
}
CHECK_KEYS = {
    "probability": "p",
    "threshold": "t",
    "accepted": "a",
    "features": "f",
    "contributions": "w",
    "hard_fail": "hf",
    "paid": "pd",
    "notes": "n",
    "reasons": "rs",
}
PAID_KEYS = {
    "kind": "kd",
    "model": "m",
    "value": "v",
    "cost_nanos": "c",
    "prompt_tokens": "pt",
    "completion_tokens": "ct",
    "detail": "dt",
}
_ATTEMPT_FIELDS, _CHECK_FIELDS, _PAID_FIELDS = (
    {short: name for name, short in keys.items()} for keys in (ATTEMPT_KEYS, CHECK_KEYS, PAID_KEYS)
)


def _shortened(data: dict[str, Any], keys: dict[str, str]) -> dict[str, Any]:
    return {keys.get(k, k): v for k, v in data.items()}


def _named(data: dict[str, Any], fields: dict[str, str]) -> dict[str, Any]:
    """A stored dict with its fields' names (a row stored whole already has them)."""
    return {fields.get(k, k): v for k, v in data.items()}


def rounded(value: Any) -> Any:
    """A float to ``SIGNIFICANT_DIGITS`` significant digits; anything else as it is."""
    if isinstance(value, float) and math.isfinite(value):
        return float(f"{value:.{SIGNIFICANT_DIGITS}g}")
    return value


def _rounded_map(values: Any) -> dict[str, Any]:
    return {k: rounded(v) for k, v in values.items()} if isinstance(values, dict) else {}


# --- writing ----------------------------------------------------------------------------


def attempts_stored(
    attempts: list[dict[str, Any]], *, domain: str, complexity: float | None
) -> list[dict[str, Any]]:
    """``Attempt.as_dict()`` of each attempt of a row, as the row stores them."""
    return [attempt_stored(a, domain=domain, complexity=complexity) for a in attempts]


def attempt_stored(
    attempt: dict[str, Any], *, domain: str, complexity: float | None
) -> dict[str, Any]:
    stored = {
        k: v
        for k, v in attempt.items()
        if k != "check" and not (k in ATTEMPT_DEFAULTS and v == ATTEMPT_DEFAULTS[k])
    }
    if stored.get("deployment") == stored.get("model"):
        stored.pop("deployment", None)
    check = attempt.get("check")
    if isinstance(check, dict):
        stored["check"] = _shortened(
            _check_stored(check, domain=domain, complexity=complexity), CHECK_KEYS
        )
    return _shortened(stored, ATTEMPT_KEYS)


def _check_stored(
    check: dict[str, Any], *, domain: str, complexity: float | None
) -> dict[str, Any]:
    stored: dict[str, Any] = {}
    for key, value in check.items():
        if key in ("probability", "threshold"):
            stored[key] = rounded(value)
        elif key in ("features", "contributions"):
            stored[key] = _rounded_map(value)
        elif key == "paid":
            if value:
                stored[key] = [_paid_stored(p) for p in value]
        elif key == "hard_fail":
            if value is not None:
                stored[key] = value
        elif key != "reasons":
            stored[key] = value
    reasons = check.get("reasons")
    if reasons is None:
        return stored
    notes = _notes(reasons, stored, domain=domain, complexity=complexity)
    if notes is None:
        stored["reasons"] = reasons
    elif notes:
        stored["notes"] = notes
    return stored


def _paid_stored(paid: Any) -> Any:
    if not isinstance(paid, dict):
        return paid
    return _shortened(
        {
            k: rounded(v) if k == "value" else v
            for k, v in paid.items()
            if not (k in PAID_DEFAULTS and v == PAID_DEFAULTS[k])
        },
        PAID_KEYS,
    )


def _notes(
    reasons: Any, stored: dict[str, Any], *, domain: str, complexity: float | None
) -> list[str] | None:
    """The fewest notes from which ``reasons`` come back identical; None when they do not."""
    if not isinstance(reasons, list):
        return None
    head = 1 if stored.get("hard_fail") else 0
    tail = 2 if stored.get("contributions") else 1  # p(acceptable), then the main signals
    middle = reasons[head : max(head, len(reasons) - tail)]
    lp = lp_note(stored.get("features"))
    notes = middle[1:] if lp is not None and middle[:1] == [lp] else middle
    if _reasons(stored, notes, domain=domain, complexity=complexity) != reasons:
        return None
    return notes


# --- reading ----------------------------------------------------------------------------


def attempts_read(stored: Any, *, domain: Any, complexity: Any) -> list[dict[str, Any]]:
    """A row's attempts in ``Attempt.as_dict()``'s shape, whichever shape the row stores
    (``domain`` and ``complexity`` are the row's: a check's reasons are derived from them)."""
    if not isinstance(stored, list):
        return []
    return [
        attempt_read(a, domain=domain, complexity=complexity) for a in stored if isinstance(a, dict)
    ]


def attempt_read(stored: dict[str, Any], *, domain: Any, complexity: Any) -> dict[str, Any]:
    stored = _named(stored, _ATTEMPT_FIELDS)
    attempt = {
        "model": "",
        "deployment": stored.get("model") if isinstance(stored.get("model"), str) else "",
        "role": "",
        "status": "",
        **ATTEMPT_DEFAULTS,
        **{k: v for k, v in stored.items() if k != "check"},
    }
    check = stored.get("check")
    if isinstance(check, dict):
        attempt["check"] = _check_read(
            _named(check, _CHECK_FIELDS), domain=domain, complexity=complexity
        )
    return attempt


def _check_read(stored: dict[str, Any], *, domain: Any, complexity: Any) -> dict[str, Any]:
    check = {
        "probability": None,
        "threshold": None,
        "accepted": False,
        **{k: v for k, v in stored.items() if k != "notes"},
        "features": stored.get("features") if isinstance(stored.get("features"), dict) else {},
        "contributions": (
            stored.get("contributions") if isinstance(stored.get("contributions"), dict) else {}
        ),
        "hard_fail": stored.get("hard_fail"),
        "paid": [
            {"kind": "", "model": "", **PAID_DEFAULTS, **_named(p, _PAID_FIELDS)}
            for p in stored.get("paid") or []
            if isinstance(p, dict)
        ]
        if isinstance(stored.get("paid"), list)
        else [],
    }
    if not isinstance(stored.get("reasons"), list):
        notes = stored.get("notes")
        notes = [n for n in notes if isinstance(n, str)] if isinstance(notes, list) else []
        check["reasons"] = _reasons(check, notes, domain=domain, complexity=complexity)
    return check


def _reasons(check: dict[str, Any], notes: list[str], *, domain: Any, complexity: Any) -> list[str]:
    """``check_reasons`` of a stored check; what cannot be derived from a damaged one is
    left out rather than raised."""
    probability, threshold = check.get("probability"), check.get("threshold")
    if not (_is_number(probability) and _is_number(threshold)):
        return list(notes)
    contributions = {
        k: float(v) for k, v in (check.get("contributions") or {}).items() if _is_number(v)
    }
    hard_fail = check.get("hard_fail")
    return check_reasons(
        probability=float(probability),
        threshold=float(threshold),
        accepted=bool(check.get("accepted")),
        contributions=contributions,
        hard_fail=hard_fail if isinstance(hard_fail, str) else None,
        notes=[*filter(None, [lp_note(check.get("features"))]), *notes],
        domain=domain if isinstance(domain, str) else "",
        complexity=float(complexity) if _is_number(complexity) else 0.0,
    )


def _is_number(value: Any) -> TypeGuard[int | float]:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)
