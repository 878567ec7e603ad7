"""Calls to LLM providers through LiteLLM, with fallback across deployments.

One ``Attempt`` is recorded per upstream call, successful or not, so the
ledger shows every call a request made. Errors are classified once here:
client mistakes (400s) are returned as they are; provider trouble (5xx,
timeouts, rate limits, connection failures, malformed answers) moves on to
the next deployment and, when none is left, becomes a 502/503.
"""

from __future__ import annotations

import re
import time
from collections.abc import AsyncIterator
from dataclasses import asdict, dataclass
from typing import Any

import litellm

from routing.errors import GatewayError
from routing.providers.catalog import CatalogModel, Deployment
from routing.schemas import ChatRequest

_PREFIX = re.compile(r"^litellm\.\w+:\s*")


@dataclass
class Attempt:
    model: str
    deployment: str
    status: str  # "ok" | "error"
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cost_nanos: int = 0
    latency_ms: int = 0
    error_code: str = ""
    error_message: str = ""

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class UpstreamFailure:
    retryable: bool
    status: int
    code: str
    message: str

    def to_error(self, model: str) -> GatewayError:
        if not self.retryable:
            return GatewayError(self.status, self.message, code=self.code)
        return GatewayError(
            self.status,
            f"Every upstream deployment of '{model}' failed; last error: {self.message}",
            type="api_error",
            code=self.code,
        )


def classify(exc: BaseException) -> UpstreamFailure:
    message = _PREFIX.sub("", str(exc)).strip()[:500] or exc.__class__.__name__
    if isinstance(
        exc,
        litellm.ContextWindowExceededError
        | litellm.BadRequestError
        | litellm.UnprocessableEntityError,
    ) and not isinstance(exc, litellm.NotFoundError):
        return UpstreamFailure(False, 400, "upstream_bad_request", message)
    if isinstance(exc, litellm.RateLimitError):
        return UpstreamFailure(True, 503, "upstream_rate_limited", message)
    if isinstance(exc, litellm.Timeout):
        return UpstreamFailure(True, 502, "upstream_timeout", message)
    if isinstance(exc, litellm.ServiceUnavailableError):
        return UpstreamFailure(True, 503, "upstream_unavailable", message)
    return UpstreamFailure(True, 502, "upstream_error", message)


def call_kwargs(
    chat: ChatRequest, deployment: Deployment, *, timeout: float, stream: bool
) -> dict[str, Any]:
    kwargs: dict[str, Any] = {
        **chat.params,
        **deployment.params,
        "model": deployment.litellm_model,
        "messages": chat.messages,
        "num_retries": 0,
        "timeout": deployment.params.get("timeout", timeout),
    }
    if chat.params.get("tools"):
        # LiteLLM routes any request with tools through its MCP bridge, which
        # needs the optional ``mcp`` package; CascadeFlow passes tools through as-is.
        kwargs["_skip_mcp_handler"] = True
    if stream:
        kwargs["stream"] = True
        kwargs["stream_options"] = {"include_usage": True}
    return kwargs


@dataclass
class Completion:
    model: CatalogModel
    response: litellm.ModelResponse
    attempt: Attempt


async def complete(
    model: CatalogModel, chat: ChatRequest, attempts: list[Attempt], *, timeout: float
) -> Completion:
    """Call ``model``'s deployments in order until one answers."""
    failure: UpstreamFailure | None = None
    for deployment in model.deployments:
        started = time.perf_counter()
        try:
            response = await litellm.acompletion(
                **call_kwargs(chat, deployment, timeout=timeout, stream=False)
            )
            if not getattr(response, "choices", None):
                raise litellm.APIError(
                    status_code=502,
                    message="Malformed response: no choices.",
                    llm_provider="",
                    model=deployment.litellm_model,
                )
        except Exception as exc:
            failure = classify(exc)
            attempts.append(_failed(model, deployment, started, failure))
            if not failure.retryable:
                break
            continue
        usage = getattr(response, "usage", None)
        prompt = int(getattr(usage, "prompt_tokens", 0) or 0)
        completion = int(getattr(usage, "completion_tokens", 0) or 0)
        attempt = Attempt(
            model=model.name,
            deployment=deployment.label,
            status="ok",
            prompt_tokens=prompt,
            completion_tokens=completion,
            cost_nanos=model.price.cost_nanos(prompt, completion),
            latency_ms=_ms_since(started),
        )
        attempts.append(attempt)
        return Completion(model, response, attempt)
    assert failure is not None
    raise failure.to_error(model.name)


@dataclass
class Stream:
    """An upstream stream whose first chunk has already arrived (so errors surfaced)."""

    model: CatalogModel
    deployment: Deployment
    first_chunk: Any
    rest: AsyncIterator[Any]
    started: float


async def open_stream(
    model: CatalogModel, chat: ChatRequest, attempts: list[Attempt], *, timeout: float
) -> Stream:
    """Open a stream on the first deployment that yields a first chunk."""
    failure: UpstreamFailure | None = None
    for deployment in model.deployments:
        started = time.perf_counter()
        try:
            wrapper = await litellm.acompletion(
                **call_kwargs(chat, deployment, timeout=timeout, stream=True)
            )
            iterator = wrapper.__aiter__()
            first = await iterator.__anext__()
        except StopAsyncIteration:
            failure = UpstreamFailure(True, 502, "upstream_error", "Empty stream from provider.")
            attempts.append(_failed(model, deployment, started, failure))
            continue
        except Exception as exc:
            failure = classify(exc)
            attempts.append(_failed(model, deployment, started, failure))
            if not failure.retryable:
                break
            continue
        return Stream(model, deployment, first, iterator, started)
    assert failure is not None
    raise failure.to_error(model.name)


def _failed(
    model: CatalogModel, deployment: Deployment, started: float, failure: UpstreamFailure
) -> Attempt:
    return Attempt(
        model=model.name,
        deployment=deployment.label,
        status="error",
        latency_ms=_ms_since(started),
        error_code=failure.code,
        error_message=failure.message,
    )


def _ms_since(started: float) -> int:
    return int((time.perf_counter() - started) * 1000)
