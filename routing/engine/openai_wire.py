"""A lean client for providers that speak OpenAI's wire format (chat completions, embeddings).

LiteLLM is the transport for every provider; for the many that speak
OpenAI's own format (OpenAI, Azure-compatible gateways, vLLM, TGI, Together,
Fireworks, local servers — any ``openai/<model>`` deployment) this path sends
the request with one shared, keep-alive ``aiohttp`` session and parses the answer
into LiteLLM's own ``ModelResponse``. It does what LiteLLM's OpenAI path does
for a chat completion at a fraction of the CPU per call (measured in
``bench/overhead.py``), which is what lets one gateway process serve several
times more requests. ``CASCADEFLOW_OPENAI_FAST_PATH=false`` turns it off.

Errors become ``ProviderHTTPError`` (status, message, Retry-After), classified
by ``resilience.classify`` exactly like LiteLLM's exceptions.
"""

from __future__ import annotations

import asyncio
import json
import os
from array import array
from collections.abc import AsyncIterator, Mapping
from operator import itemgetter
from typing import Any

import aiohttp
import litellm

from routing.engine.pricing import reported_tokens

# The request parameters of OpenAI's chat-completions API that are forwarded.
OPENAI_PARAMS: frozenset[str] = frozenset(
    {
        "temperature", "top_p", "n", "stop", "max_tokens", "max_completion_tokens",
        "presence_penalty", "frequency_penalty", "logit_bias", "logprobs", "top_logprobs",
        "seed", "tools", "tool_choice", "parallel_tool_calls", "response_format",
        "reasoning_effort", "stream", "stream_options", "user",
    }
)  # fmt: skip
DEFAULT_API_BASE = "https://api.openai.com/v1"
# The key of a parsed answer's ``_hidden_params`` (LiteLLM's private, never serialised
# metadata of a response) that keeps its first choice's token log-probabilities as one
# array of floats, with the list of LiteLLM's entries they were read from:
# ``(choices[0].logprobs.content, array("d", [entry.logprob, ...]))``.
FLAT_LOGPROBS = "cascadeflow_token_logprobs"
_EXACT = 2**53  # every integer up to this is a float exactly
_LOGPROB = itemgetter("logprob")

_sessions: dict[int, aiohttp.ClientSession] = {}


class ProviderHTTPError(Exception):
    def __init__(self, status: int, message: str, retry_after: str | None = None):
        super().__init__(message)
        self.status = status
        self.message = message
        self.retry_after = retry_after


class MalformedAnswer(ProviderHTTPError):
    """A provider answered (200) with what is not a usable completion: a failed call (502)
    that was made, and billed. ``tokens`` is what its usage says it cost, if it says so
    in counts that can be (``pricing.reported_tokens``)."""

    def __init__(self, message: str, tokens: tuple[int, int] | None = None):
        super().__init__(502, f"Malformed response: {message}")
        self.tokens = tokens


def handles(litellm_model: str, params: Mapping[str, Any]) -> bool:
    enabled = os.environ.get("CASCADEFLOW_OPENAI_FAST_PATH", "true").lower() not in {
        "0",
        "false",
        "no",
    }
    return enabled and litellm_model.startswith("openai/")


def _session() -> aiohttp.ClientSession:
    """One pooled session per event loop (a session cannot be shared across loops)."""
    loop = asyncio.get_running_loop()
    session = _sessions.get(id(loop))
    if session is None or session.closed:
        if len(_sessions) > 8:  # loops come and go in tests; keep the map small
            _sessions.clear()
        session = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(limit=512, ttl_dns_cache=300),
            json_serialize=json.dumps,
            # Shared by every tenant's requests: a cookie one upstream sets must never
            # go out with another request (another tenant's, to the same host).
            cookie_jar=aiohttp.DummyCookieJar(),
        )
        _sessions[id(loop)] = session
    return session


def _endpoint(kwargs: Mapping[str, Any], path: str) -> tuple[str, dict[str, str], float]:
    base = (kwargs.get("api_base") or os.environ.get("OPENAI_API_BASE") or DEFAULT_API_BASE).rstrip(
        "/"
    )
    key = kwargs.get("api_key") or os.environ.get("OPENAI_API_KEY") or ""
    headers = {"Content-Type": "application/json"}
    if key:
        headers["Authorization"] = f"Bearer {key}"
    if kwargs.get("organization"):
        headers["OpenAI-Organization"] = kwargs["organization"]
    headers.update(kwargs.get("extra_headers") or {})
    timeout = kwargs.get("timeout")
    return f"{base}/{path}", headers, float(timeout) if timeout else 120.0


def _request(
    litellm_model: str, kwargs: Mapping[str, Any]
) -> tuple[str, dict[str, str], dict[str, Any], float]:
    url, headers, timeout = _endpoint(kwargs, "chat/completions")
    body = {k: v for k, v in kwargs.items() if k in OPENAI_PARAMS}
    body["model"] = litellm_model.removeprefix("openai/")
    body["messages"] = kwargs["messages"]
    return url, headers, body, timeout


MAX_RESPONSE_BYTES = 64 * 1024 * 1024
ERROR_BODY_BYTES = 64 * 1024  # of an error answer, what is read for its message


def max_response_bytes() -> int:
    """The most one answer of a provider may hold (``CASCADEFLOW_MAX_UPSTREAM_RESPONSE_BYTES``,
    64 MiB by default): a completion's body, or all the events of a stream.

    A provider's answer is read into the gateway's memory (a cascade holds a streamed draft
    until it is judged), and a tenant's own server (``api_base``) sends whatever it likes:
    without a bound, one answer of gigabytes would take the memory of a process that
    serves every tenant. 64 MiB holds some 100,000 streamed tokens with log-probabilities;
    an embeddings answer may hold four times as much.
    """
    try:
        return max(1, int(os.environ.get("CASCADEFLOW_MAX_UPSTREAM_RESPONSE_BYTES", "")))
    except ValueError:
        return MAX_RESPONSE_BYTES


def _too_large(limit: int) -> ProviderHTTPError:
    return ProviderHTTPError(502, f"The provider's answer is larger than {limit:,} bytes.")


async def _head(response: aiohttp.ClientResponse, size: int) -> bytes:
    """The body's first ``size`` bytes (all of it when shorter)."""
    chunks: list[bytes] = []
    read = 0
    async for chunk in response.content.iter_chunked(1 << 16):
        chunks.append(chunk)
        read += len(chunk)
        if read >= size:
            break
    return b"".join(chunks)[:size]


async def _body(response: aiohttp.ClientResponse, limit: int) -> bytes:
    """The whole body, or ``_too_large`` when it holds more than ``limit`` bytes (read no
    further than one chunk past them)."""
    if response.content_length is not None and response.content_length > limit:
        raise _too_large(limit)
    raw = await _head(response, limit + 1)
    if len(raw) > limit:
        raise _too_large(limit)
    return raw


async def _raise_for_status(response: aiohttp.ClientResponse) -> None:
    if response.status < 400:
        return
    raw = await _head(response, ERROR_BODY_BYTES)
    message = raw.decode(errors="replace")[:500]
    try:
        message = json.loads(raw)["error"]["message"]
    except (ValueError, KeyError, TypeError):
        pass
    raise ProviderHTTPError(response.status, message, response.headers.get("retry-after"))


def _timeout(seconds: float) -> aiohttp.ClientTimeout:
    return aiohttp.ClientTimeout(total=seconds, connect=min(10.0, seconds))


async def acompletion(litellm_model: str, kwargs: Mapping[str, Any]) -> litellm.ModelResponse:
    url, headers, body, timeout = _request(litellm_model, kwargs)
    async with _session().post(
        url, headers=headers, json=body, timeout=_timeout(timeout)
    ) as response:
        await _raise_for_status(response)
        raw = await _body(response, max_response_bytes())
    try:
        data = json.loads(raw)
    except ValueError:
        raise MalformedAnswer("not JSON.") from None
    if not isinstance(data, dict):
        raise MalformedAnswer("not a JSON object.")
    tokens = reported_tokens(data.get("usage"))
    if not data.get("choices"):
        raise MalformedAnswer("no choices.", tokens)
    try:
        return parse_completion(data)
    except Exception:
        raise MalformedAnswer("not a chat completion.", tokens) from None


def parse_completion(data: dict[str, Any]) -> litellm.ModelResponse:
    """A chat completion (parsed JSON) as LiteLLM's ``ModelResponse``; the first choice's
    token log-probabilities are also kept as one array of floats (``FLAT_LOGPROBS``).

    The quality check reads every log-probability of the draft: read from LiteLLM's
    objects (one per token, each with its dict, key and float) long after they were
    made, that is a cache miss or more per token; read here, from the JSON just parsed,
    into one contiguous array, it is not. What the client receives is unchanged: the
    array is in the response's private metadata only.
    """
    flat = _token_logprobs(data)
    if "usage" in data and reported_tokens(data["usage"]) is None:
        # Not counts of tokens: the gateway counts them itself (``resilience``), as it does
        # for a provider that reports no usage.
        data = {key: value for key, value in data.items() if key != "usage"}
    response = litellm.ModelResponse(**data)
    if flat is not None:
        logprobs = getattr(response.choices[0], "logprobs", None)
        content = getattr(logprobs, "content", None)
        # The same entries, in the same order: LiteLLM validated each logprob as a float
        # (the same value as float() of the JSON number).
        if type(content) is list and len(content) == len(flat):
            response._hidden_params[FLAT_LOGPROBS] = (content, flat)
    return response


def _token_logprobs(data: dict[str, Any]) -> array[float] | None:
    """``choices[0].logprobs.content[*].logprob`` as floats; None unless every one is a
    JSON number (int or float) that a float holds."""
    try:
        entries = data["choices"][0]["logprobs"]["content"]
        if type(entries) is not list or not entries:
            return None
        values = list(map(_LOGPROB, entries))
    except (KeyError, IndexError, TypeError):
        return None
    kinds = set(map(type, values))
    if not kinds <= {float, int}:
        return None
    if int in kinds and not all(-_EXACT <= v <= _EXACT for v in values if type(v) is int):
        return None  # an integer a float may not hold exactly: LiteLLM's own conversion
    try:
        return array("d", values)
    except OverflowError:  # an integer beyond any float
        return None


async def aembedding(litellm_model: str, kwargs: Mapping[str, Any]) -> dict[str, Any]:
    """``POST /embeddings``; the answer as OpenAI sends it (vectors as floats)."""
    url, headers, timeout = _endpoint(kwargs, "embeddings")
    body: dict[str, Any] = {
        "model": litellm_model.removeprefix("openai/"),
        "input": kwargs["input"],
        "encoding_format": "float",
    }
    if kwargs.get("dimensions") is not None:
        body["dimensions"] = kwargs["dimensions"]
    async with _session().post(
        url, headers=headers, json=body, timeout=_timeout(timeout)
    ) as response:
        await _raise_for_status(response)
        # 2,048 vectors of 3,072 floats, as JSON, take some 130 MB: four times the bound.
        raw = await _body(response, 4 * max_response_bytes())
    try:
        data = json.loads(raw)
    except ValueError:
        raise ProviderHTTPError(502, "Malformed response: not JSON.") from None
    if not isinstance(data, dict):
        raise ProviderHTTPError(502, "Malformed response: not an object.")
    return data


class Chunk:
    """One streamed chunk, with the ``model_dump`` the engine reads."""

    __slots__ = ("data",)

    def __init__(self, data: dict[str, Any]):
        self.data = data

    def model_dump(self, exclude_none: bool = False) -> dict[str, Any]:
        return _drop_none(self.data) if exclude_none else self.data


def _drop_none(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _drop_none(v) for k, v in value.items() if v is not None}
    if isinstance(value, list):
        return [_drop_none(v) for v in value]
    return value


async def astream(litellm_model: str, kwargs: Mapping[str, Any]) -> AsyncIterator[Chunk]:
    """Server-sent events from the provider, as chunks; raises before the first one on errors."""
    url, headers, body, timeout = _request(litellm_model, kwargs)
    response = await _session().post(url, headers=headers, json=body, timeout=_timeout(timeout))
    try:
        await _raise_for_status(response)
    except BaseException:
        response.release()
        raise
    return _events(response)


async def _events(response: aiohttp.ClientResponse) -> AsyncIterator[Chunk]:
    finished = False
    limit, size = max_response_bytes(), 0
    try:
        async for raw_line in response.content:
            size += len(raw_line)
            if size > limit:
                raise _too_large(limit)
            line = raw_line.decode("utf-8", errors="replace").strip()
            if not line.startswith("data:"):
                continue
            payload = line[5:].strip()
            if payload == "[DONE]":
                return
            try:
                data = json.loads(payload)
            except ValueError:
                raise ProviderHTTPError(502, "Malformed stream chunk from provider.") from None
            if "error" in data and "choices" not in data:
                error = (
                    data["error"]
                    if isinstance(data["error"], dict)
                    else {"message": str(data["error"])}
                )
                raise ProviderHTTPError(502, str(error.get("message", "provider error")))
            finished = finished or any(c.get("finish_reason") for c in data.get("choices") or [])
            yield Chunk(data)
        if not finished:
            raise ProviderHTTPError(502, "The provider closed the stream before finishing.")
    finally:
        response.release()


async def close_session() -> None:
    """Close the running loop's session (at shutdown, or at the end of a test's loop)."""
    session = _sessions.pop(id(asyncio.get_running_loop()), None)
    if session is not None and not session.closed:
        await session.close()
