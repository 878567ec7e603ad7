"""JSON Lines, read as the format defines them: one record per ``\\n``.

``str.splitlines()`` also splits on characters JSON strings may legally carry
unescaped (U+2028 and U+2029, form feed, vertical tab, U+0085…), cutting a
record in two. Records are split on ``\\n`` only (a ``\\r`` before it is
whitespace to the parser).
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any


def iter_jsonl(path: str | Path) -> Iterator[dict[str, Any]]:
    """Every record of ``path``, in order; blank lines are skipped."""
    with open(path, "rb") as handle:
        for number, raw in enumerate(handle, start=1):  # binary lines end at b"\n" only
            if raw.strip():
                try:
                    yield json.loads(raw)
                except ValueError as exc:
                    raise ValueError(f"{path}: line {number} is not JSON ({exc})") from None


def read_jsonl(path: str | Path) -> list[dict[str, Any]]:
    return list(iter_jsonl(path))
