"""OpenAI's embeddings API (``POST /v1/embeddings``): the request read, the answer written.

The request runs the gateway's path (``gateway.prepare`` then ``gateway.embed``):
the token and its scope, the end user, rate limits, budgets, the ledger row,
metrics and traces are the chat path's code. What differs is here and in
``enforcement`` (an embedding request has input tokens only).

Invariants:

- ``model`` names one embedding model (a catalog model of ``mode: "embedding"``, or
  the tenant's own): a chat model or a routing profile is a 400 saying why
  (``gateway.check_embedding``), an unknown model the same 404 as on chat.
- ``input`` is OpenAI's: a string, a list of strings, a list of token ids, or a list
  of lists of token ids; at most ``MAX_INPUTS`` inputs, none empty. Anything else is a
  400 naming the input at fault, before anything is counted, reserved or called.
- Only ``input`` (as a list) and ``dimensions`` reach the provider. ``user`` names the
  end user (tracked and budgeted, never sent); ``encoding_format`` is applied here:
  the provider is always asked for floats, and ``base64`` is the little-endian
  float32 bytes of each vector, as OpenAI sends them. Other parameters are ignored,
  as on chat.
"""

from __future__ import annotations

import base64
import json
import struct
from dataclasses import dataclass
from typing import Any, ClassVar

from routing.engine.types import Embeddings
from routing.errors import bad_request
from routing.schemas import MAX_USER_LENGTH, json_object, model_name

MAX_INPUTS = 2048  # OpenAI's own bound on inputs per request
MAX_TOKEN_ID = 2**31 - 1
MAX_DIMENSIONS = 65_536
ENCODING_FORMATS = ("float", "base64")
_INPUT_SHAPE = (
    "'input' must be a non-empty string, an array of non-empty strings, an array of "
    f"token ids, or an array of non-empty arrays of token ids (at most {MAX_INPUTS} inputs)."
)


@dataclass
class EmbeddingRequest:
    """An embeddings request as the gateway runs it; ``inputs`` always a list of inputs."""

    model: str
    inputs: list[str] | list[list[int]]
    encoding_format: str = "float"
    dimensions: int | None = None
    user: str | None = None
    stream: ClassVar[bool] = False  # the ledger's column: an embedding is never streamed
    operation: ClassVar[str] = "embeddings"  # GenAI's gen_ai.operation.name

    def upstream_params(self) -> dict[str, Any]:
        params: dict[str, Any] = {"input": self.inputs}
        if self.dimensions is not None:
            params["dimensions"] = self.dimensions
        return params


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _token_ids(value: list[Any], param: str) -> list[int]:
    if not value:
        raise bad_request(f"'{param}' must not be empty.", param=param)
    for index, token in enumerate(value):
        if not _is_int(token) or not 0 <= token <= MAX_TOKEN_ID:
            raise bad_request(
                f"'{param}[{index}]' must be a token id: an integer between 0 and {MAX_TOKEN_ID}.",
                param=f"{param}[{index}]",
            )
    return value


def _inputs(value: Any) -> list[str] | list[list[int]]:
    if isinstance(value, str):
        if not value:
            raise bad_request("'input' must not be an empty string.", param="input")
        return [value]
    if not isinstance(value, list) or not value:
        raise bad_request(_INPUT_SHAPE, param="input")
    if len(value) > MAX_INPUTS:
        raise bad_request(
            f"'input' holds {len(value)} inputs; at most {MAX_INPUTS} are allowed per request.",
            param="input",
        )
    first = value[0]
    if isinstance(first, int | float):  # one input given as its token ids (or meant to be)
        return [_token_ids(value, "input")]
    if isinstance(first, str):
        for index, item in enumerate(value):
            if not isinstance(item, str) or not item:
                raise bad_request(
                    f"'input[{index}]' must be a non-empty string, like every input of an "
                    "array of strings.",
                    param=f"input[{index}]",
                )
        return value
    if isinstance(first, list):
        for index, item in enumerate(value):
            if not isinstance(item, list):
                raise bad_request(
                    f"'input[{index}]' must be an array of token ids, like every input of an "
                    "array of token arrays.",
                    param=f"input[{index}]",
                )
            _token_ids(item, f"input[{index}]")
        return value
    raise bad_request(_INPUT_SHAPE, param="input")


def parse_embedding_request(body: bytes) -> EmbeddingRequest:
    data = json_object(body)
    model = model_name(data)
    if "input" not in data or data["input"] is None:
        raise bad_request("'input' is required.", param="input")
    inputs = _inputs(data["input"])

    encoding_format = data.get("encoding_format")
    if encoding_format is None:
        encoding_format = "float"
    if encoding_format not in ENCODING_FORMATS:
        raise bad_request("'encoding_format' must be 'float' or 'base64'.", param="encoding_format")
    dimensions = data.get("dimensions")
    if dimensions is not None and (
        not _is_int(dimensions) or not 1 <= dimensions <= MAX_DIMENSIONS
    ):
        raise bad_request(
            f"'dimensions' must be an integer between 1 and {MAX_DIMENSIONS}.",
            param="dimensions",
        )
    user = data.get("user")
    if user is not None and (not isinstance(user, str) or len(user) > MAX_USER_LENGTH):
        raise bad_request(
            f"'user' must be a string of at most {MAX_USER_LENGTH} characters.", param="user"
        )
    return EmbeddingRequest(
        model=model.strip(),
        inputs=inputs,
        encoding_format=encoding_format,
        dimensions=dimensions,
        user=user or None,
    )


def base64_of(vector: list[float]) -> str:
    """A vector as OpenAI's ``base64`` format: its little-endian float32 bytes, base64."""
    return base64.b64encode(struct.pack(f"<{len(vector)}f", *vector)).decode("ascii")


# Above this many numbers an answer is written on a worker thread (see ``content``).
LARGE_ANSWER = 200_000


def size(result: Embeddings) -> int:
    return len(result.vectors) * len(result.vectors[0])


def content(
    request: EmbeddingRequest, result: Embeddings, *, model: str, prompt_tokens: int
) -> bytes:
    """The answer's body, in OpenAI's shape; ``usage`` is what the ledger row bills."""
    encode = base64_of if request.encoding_format == "base64" else None
    body = {
        "object": "list",
        "data": [
            {
                "object": "embedding",
                "index": index,
                "embedding": encode(vector) if encode else vector,
            }
            for index, vector in enumerate(result.vectors)
        ],
        "model": model,
        "usage": {"prompt_tokens": prompt_tokens, "total_tokens": prompt_tokens},
    }
    return json.dumps(body, separators=(",", ":")).encode()
