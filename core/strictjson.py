"""JSON from clients, parsed so that bad input is the client's error and never ours.

Python's ``json`` accepts documents nothing downstream can use, and fails on
others with exceptions a view does not expect:

- a lone surrogate (``"\\ud800"``) parses, then cannot be encoded to UTF-8 to
  send upstream or to store; NUL parses, and PostgreSQL text cannot hold it;
- ``NaN`` and ``Infinity`` parse (they are not JSON), and so does ``1e400``
  (as ``inf``);
- deep nesting raises ``RecursionError``; an integer of more than 4,300 digits
  raises ``ValueError`` (``sys.set_int_max_str_digits``), after quadratic work.

``loads`` refuses all of these with :class:`InvalidJSON`, whose message is fit
to show the client (it never carries a traceback or a server path) and whose
``path`` names the offending string (``messages[0].content``) when there is one.
"""

from __future__ import annotations

import json
import math
import re
from typing import Any

MAX_DEPTH = 64  # objects and arrays nested in each other
MAX_NUMBER_LENGTH = 100  # characters of one number literal

_BAD_TEXT = re.compile("[\x00\ud800-\udfff]")


class InvalidJSON(ValueError):
    """The body is not JSON CascadeFlow accepts; ``str(exc)`` is safe to show the client."""

    def __init__(self, message: str, *, path: str | None = None):
        super().__init__(message)
        self.message = message
        self.path = path  # the string at fault, e.g. "messages[0].content"


def _number_too_long(literal: str) -> InvalidJSON:
    return InvalidJSON(f"A number in the body is longer than {MAX_NUMBER_LENGTH} characters.")


def _parse_int(literal: str) -> int:
    if len(literal) > MAX_NUMBER_LENGTH:
        raise _number_too_long(literal)
    return int(literal)


def _parse_float(literal: str) -> float:
    if len(literal) > MAX_NUMBER_LENGTH:
        raise _number_too_long(literal)
    value = float(literal)
    if not math.isfinite(value):
        raise InvalidJSON("A number in the body is out of range.")
    return value


def _parse_constant(name: str) -> Any:
    raise InvalidJSON(f"{name} is not a JSON value.")


def loads(body: bytes | str, *, max_depth: int = MAX_DEPTH) -> Any:
    """Parse ``body``; raise :class:`InvalidJSON` for anything that is not usable JSON text."""
    try:
        data = json.loads(
            body or b"",
            parse_int=_parse_int,
            parse_float=_parse_float,
            parse_constant=_parse_constant,
        )
    except InvalidJSON:
        raise
    except RecursionError:
        raise InvalidJSON(f"The body is nested deeper than {max_depth} levels.") from None
    except UnicodeDecodeError:
        raise InvalidJSON("The body is not valid UTF-8.") from None
    except json.JSONDecodeError as exc:
        raise InvalidJSON(f"The body is not valid JSON: {exc.msg} at position {exc.pos}.") from None
    except ValueError:
        raise InvalidJSON("The body is not valid JSON.") from None
    check(data, max_depth=max_depth)
    return data


def check(data: Any, *, max_depth: int = MAX_DEPTH) -> None:
    """Refuse nesting deeper than ``max_depth`` and strings (keys too) holding NUL or a surrogate.

    Iterative, so a document of any depth is walked without recursion; paths
    are built only for the string at fault.
    """
    # (value, depth, parent entry, key in parent)
    stack: list[tuple[Any, int, Any, Any]] = [(data, 0, None, None)]
    while stack:
        entry = stack.pop()
        value, depth = entry[0], entry[1]
        if isinstance(value, str):
            if _BAD_TEXT.search(value):
                raise _bad_text(entry)
        elif isinstance(value, dict | list):
            if depth >= max_depth:
                raise InvalidJSON(f"The body is nested deeper than {max_depth} levels.")
            if isinstance(value, dict):
                for key, item in value.items():
                    if _BAD_TEXT.search(key):
                        raise _bad_text(entry, key_of=key)
                    stack.append((item, depth + 1, entry, key))
            else:
                stack.extend((item, depth + 1, entry, i) for i, item in enumerate(value))


def _bad_text(entry: tuple, *, key_of: str | None = None) -> InvalidJSON:
    parts: list[str] = []
    if key_of is not None:
        parts.append(f".{key_of}")
    while entry[2] is not None:
        key = entry[3]
        parts.append(f"[{key}]" if isinstance(key, int) else f".{key}")
        entry = entry[2]
    path = "".join(reversed(parts)).lstrip(".") or None
    # The path itself may hold the bad text (a key): show it with escapes.
    shown = path.encode("ascii", "backslashreplace").decode() if path else None
    where = f"'{shown}'" if shown else "The body"
    return InvalidJSON(
        f"{where} must be text without NUL (U+0000) or lone surrogates (U+D800 to U+DFFF).",
        path=shown,
    )


def text_problem(value: str) -> bool:
    """True when ``value`` holds NUL or a lone surrogate (unusable as text anywhere)."""
    return bool(_BAD_TEXT.search(value))
