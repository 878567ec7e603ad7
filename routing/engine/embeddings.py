"""Embedding calls' data: what an input costs in tokens, and a provider's answer read back.

An input is a list of strings or a list of token-id lists (OpenAI's shapes, already
validated by the gateway). A provider's answer (LiteLLM's ``EmbeddingResponse`` or
OpenAI's JSON as a dict) becomes :class:`Embeddings`; one that does not hold exactly
one vector of numbers per input, all of one size, is malformed: a ``MalformedAnswer``
(502), retried and failed over like any provider trouble, and charged what its usage
says it cost.
"""

from __future__ import annotations

import base64
import math
import struct
from collections.abc import Sequence
from typing import Any

import litellm

from routing.engine.openai_wire import MalformedAnswer
from routing.engine.pricing import token_count
from routing.engine.types import Embeddings

Inputs = Sequence[str] | Sequence[Sequence[int]]


def count_tokens(litellm_model: str, inputs: Inputs) -> int:
    """The inputs' tokens, each input counted alone as the provider bills them (token-id
    inputs are their length)."""
    total = 0
    for item in inputs:
        if isinstance(item, str):
            total += len(litellm.encode(model=litellm_model, text=item))
        else:
            total += len(item)
    return total


def _field(obj: Any, name: str) -> Any:
    return obj.get(name) if isinstance(obj, dict) else getattr(obj, name, None)


def _vector(value: Any, where: int) -> list[float]:
    if isinstance(value, str):  # base64 of little-endian float32s, should a provider send it
        try:
            packed = base64.b64decode(value, validate=True)
            return list(struct.unpack(f"<{len(packed) // 4}f", packed))
        except (ValueError, struct.error):
            pass
    elif (
        isinstance(value, list)
        and value
        and all(type(x) is float or type(x) is int for x in value)
        and math.isfinite(sum(value))  # no NaN or infinity (JSON cannot carry them on)
    ):
        return value
    raise MalformedAnswer(f"embedding {where} is not a vector.")


def _prompt_tokens(response: Any) -> int:
    """The usage's prompt tokens when they are a count of tokens (``token_count``), else 0."""
    usage = _field(response, "usage")
    return token_count(_field(usage, "prompt_tokens") if usage is not None else None) or 0


def embeddings_of(response: Any, expected: int) -> Embeddings:
    """The vectors of ``response``, in input order, or a ``MalformedAnswer`` (a 502 charged
    what the answer's usage says it cost)."""
    prompt = _prompt_tokens(response)
    try:
        vectors = _vectors(response, expected)
    except MalformedAnswer as exc:
        exc.tokens = (prompt, 0) if prompt else None
        raise
    return Embeddings(
        vectors=vectors,
        model=str(_field(response, "model") or ""),
        prompt_tokens=prompt,
    )


def _vectors(response: Any, expected: int) -> list[list[float]]:
    data = _field(response, "data")
    if not isinstance(data, list) or len(data) != expected:
        found = len(data) if isinstance(data, list) else 0
        raise MalformedAnswer(f"{found} embeddings for {expected} inputs.")
    vectors: list[list[float] | None] = [None] * expected
    for position, item in enumerate(data):
        index = _field(item, "index")
        index = position if index is None else index
        if type(index) is not int or not 0 <= index < expected or vectors[index] is not None:
            raise MalformedAnswer("embedding indexes do not match.")
        vectors[index] = _vector(_field(item, "embedding"), index)
    sizes = {len(v) for v in vectors if v is not None}
    if len(sizes) != 1:
        raise MalformedAnswer("embeddings of different sizes.")
    return vectors  # type: ignore[return-value]  # every slot was filled above
