"""Calling providers without failing the request while a fallback remains.

``Caller`` tries a model's deployments in order. Provider trouble (5xx,
timeouts, rate limits, connection errors, malformed answers) is retried with
exponential backoff and jitter, then moves to the next deployment; a client
mistake (a 400, 413 or 422 the provider returns, or a request that cannot even
be encoded) is not retried. Each call is one ``Attempt``.

A per-deployment circuit breaker skips a deployment that keeps failing: after
``failure_threshold`` failures within ``window_s`` it opens for
``cooldown_s``; the first call after that is a trial whose failure re-opens it
at once. Its state lives in a ``BreakerStore``: Redis when configured, so every
process and machine sees the same state, or process memory otherwise.

The breaker is shared by every tenant, so only the deployment's own failures
count toward it (``Failure.counts_against_deployment``): a request that is at
fault itself fails the same way on any deployment, and counting it would let
one client's bad input switch a model off for everyone.
"""

from __future__ import annotations

import asyncio
import dataclasses
import random
import re
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

import aiohttp
import litellm
from litellm import exceptions as litellm_errors

from routing.engine import litellm_bounds, openai_wire, tracing
from routing.engine.embeddings import count_tokens, embeddings_of
from routing.engine.openai_wire import MalformedAnswer, ProviderHTTPError
from routing.engine.pricing import MAX_TOKENS_PER_CALL, reported_tokens
from routing.engine.types import Attempt, Deployment, Embeddings, ModelSpec

_PREFIX = re.compile(r"^litellm\.\w+:\s*")
# CascadeFlow reports provider errors itself; LiteLLM's banner on each one is noise.
litellm.suppress_debug_info = True
litellm_bounds.install()  # its answers bounded like the OpenAI-wire client's


@dataclass(frozen=True)
class Failure:
    retryable: bool
    status: int
    code: str
    message: str
    provider_status: int = 0  # the status the provider answered (0: none, or not HTTP)

    @property
    def counts_against_deployment(self) -> bool:
        """Whether this failure says something about the deployment (and feeds its breaker).

        Failures that are not retryable are the request's own (a provider's 400,
        413 or 422, text that cannot be encoded): any deployment would fail them.
        """
        return self.retryable


class UpstreamError(Exception):
    """Every deployment of a model failed (or the provider rejected the request)."""

    def __init__(self, model: str, failure: Failure):
        self.model = model
        self.failure = failure
        self.attempts: list[Attempt] = []  # every call the request made, set by the agent
        prefix = (
            ""
            if not failure.retryable
            else f"Every upstream deployment of '{model}' failed; last error: "
        )
        super().__init__(prefix + failure.message)


def _message(exc: BaseException) -> str:
    """The error's own text for the client: no provider banner, no traceback (no server paths)."""
    text = _PREFIX.sub("", str(exc)).split("Traceback (most recent call last)", 1)[0]
    return text.strip()[:500] or exc.__class__.__name__


def _cause(exc: BaseException, kind: type[BaseException]) -> BaseException | None:
    """``exc`` or the first exception of ``kind`` it was raised from (LiteLLM and the SDKs
    it calls wrap a transport's error, message and all, in their own)."""
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        if isinstance(current, kind):
            return current
        seen.add(id(current))
        current = current.__cause__ or current.__context__
    return None


def _cannot_encode(exc: BaseException) -> bool:
    """The request's text could not be encoded (a lone surrogate), however the SDK wrapped it."""
    return _cause(exc, UnicodeError) is not None or "surrogates not allowed" in str(exc)


def classify(exc: BaseException) -> Failure:
    failure = _classify(exc)
    status = getattr(exc, "status", None) or getattr(exc, "status_code", None)
    if isinstance(status, int) and 100 <= status <= 599:
        return dataclasses.replace(failure, provider_status=status)
    return failure


def _classify(exc: BaseException) -> Failure:
    too_large = _cause(exc, litellm_bounds.AnswerTooLarge)
    if too_large is not None:
        return Failure(True, 502, "upstream_error", str(too_large))
    message = _message(exc)
    if _cannot_encode(exc):
        return Failure(
            False,
            400,
            "invalid_request",
            "The request holds text that cannot be encoded as UTF-8 (a lone surrogate).",
        )
    if isinstance(exc, CircuitOpen):
        return Failure(True, 503, "circuit_open", message)
    if isinstance(exc, ProviderHTTPError):
        return _classify_status(exc.status, message)
    if isinstance(exc, aiohttp.ClientError):
        return Failure(True, 502, "upstream_error", message)
    if isinstance(
        exc,
        litellm_errors.ContextWindowExceededError
        | litellm_errors.BadRequestError
        | litellm_errors.UnprocessableEntityError,
    ) and not isinstance(exc, litellm_errors.NotFoundError):
        return Failure(False, 400, "upstream_bad_request", message)
    if isinstance(exc, litellm_errors.RateLimitError):
        return Failure(True, 503, "upstream_rate_limited", message)
    if isinstance(exc, litellm_errors.Timeout | asyncio.TimeoutError):
        return Failure(True, 502, "upstream_timeout", message)
    if isinstance(exc, litellm_errors.ServiceUnavailableError):
        return Failure(True, 503, "upstream_unavailable", message)
    status: int | None = getattr(exc, "status_code", None)
    if status in {400, 413, 422}:
        return _classify_status(status, message)
    return Failure(True, 502, "upstream_error", message)


def _classify_status(status: int, message: str) -> Failure:
    if status in {400, 422}:
        return Failure(False, 400, "upstream_bad_request", message)
    if status == 413:
        return Failure(False, 413, "request_too_large", message)
    if status == 429:
        return Failure(True, 503, "upstream_rate_limited", message)
    if status == 503:
        return Failure(True, 503, "upstream_unavailable", message)
    if status in {408, 504}:
        return Failure(True, 502, "upstream_timeout", message)
    return Failure(True, 502, "upstream_error", message)


class CircuitOpen(Exception):
    pass


# --- circuit breaker ----------------------------------------------------------------


class BreakerStore(Protocol):
    async def is_open(self, key: str) -> bool: ...
    async def record_failure(
        self, key: str, *, threshold: int, window_s: float, cooldown_s: float
    ) -> None: ...
    async def record_success(self, key: str) -> None: ...


class MemoryBreakerStore:
    """Breaker state for one process (tests, single-process deployments)."""

    def __init__(self) -> None:
        self._failures: dict[str, list[float]] = {}
        self._open_until: dict[str, float] = {}

    async def is_open(self, key: str) -> bool:
        return self._open_until.get(key, 0.0) > time.monotonic()

    async def record_failure(
        self, key: str, *, threshold: int, window_s: float, cooldown_s: float
    ) -> None:
        now = time.monotonic()
        recent = [t for t in self._failures.get(key, []) if t > now - window_s] + [now]
        self._failures[key] = recent
        if len(recent) >= threshold:
            self._open_until[key] = now + cooldown_s

    async def record_success(self, key: str) -> None:
        self._failures.pop(key, None)
        self._open_until.pop(key, None)


class RedisBreakerStore:
    """Breaker state shared by every process through Redis.

    ``cf:cb:<key>:fails`` counts failures in a window (INCR + EXPIRE, atomic
    in a MULTI); ``cf:cb:<key>:open`` exists while the circuit is open (SET PX).

    A success clears both keys, but only when the last check of that deployment
    in this process saw either of them: a healthy deployment costs no more than
    the checks, not a write per call. A failure counted by another process after
    that check is not cleared by this success; it expires with its window.

    A check that found a deployment clean (no failure, no open circuit) is
    trusted for ``clean_for_s`` (a quarter of a second): a healthy deployment
    costs one Redis round trip per quarter second per process, not one per
    call. A circuit opened by other processes is seen here that much later at
    most; a failure here is counted at once and ends the trust.
    """

    def __init__(self, url: str, prefix: str = "cf:cb:", *, clean_for_s: float = 0.25):
        import redis.asyncio as aioredis  # noqa: PLC0415 - Redis is needed only when a breaker is shared

        # Short timeouts: with Redis away the breaker fails open (allow) quickly.
        self._redis = aioredis.Redis.from_url(url, socket_connect_timeout=0.25, socket_timeout=0.5)
        self._prefix = prefix
        self._clean_for_s = clean_for_s
        # Keys whose last check found no failure and no open circuit: when it was made.
        self._clean: dict[str, float] = {}

    async def is_open(self, key: str) -> bool:
        checked = self._clean.get(key)
        if checked is not None and time.monotonic() - checked < self._clean_for_s:
            return False
        now = time.monotonic()
        is_open, fails = await self._redis.mget(
            f"{self._prefix}{key}:open", f"{self._prefix}{key}:fails"
        )
        if is_open is None and fails is None:
            self._clean[key] = now
        else:
            self._clean.pop(key, None)
        return is_open is not None

    async def record_failure(
        self, key: str, *, threshold: int, window_s: float, cooldown_s: float
    ) -> None:
        fails_key = f"{self._prefix}{key}:fails"
        self._clean.pop(key, None)
        async with self._redis.pipeline(transaction=True) as pipe:
            pipe.incr(fails_key)
            pipe.expire(fails_key, max(1, int(window_s)), nx=True)
            count, _ = await pipe.execute()
        if int(count) >= threshold:
            await self._redis.set(
                f"{self._prefix}{key}:open", b"1", px=max(1, int(cooldown_s * 1000))
            )

    async def record_success(self, key: str) -> None:
        if key in self._clean:
            return
        now = time.monotonic()
        await self._redis.delete(f"{self._prefix}{key}:fails", f"{self._prefix}{key}:open")
        self._clean[key] = now


@dataclass
class CircuitBreaker:
    """Opens a deployment's circuit after repeated failures; state in ``store``.

    The store is shared (Redis) but never a dependency: when it fails, this
    process keeps a breaker of its own (``fallback``) for ``store_pause_s``
    before trying the store again, so a Redis that is down or silent costs
    one timeout per pause, not one per call.
    """

    store: BreakerStore
    failure_threshold: int = 5
    window_s: float = 60.0
    cooldown_s: float = 30.0
    store_pause_s: float = 5.0
    fallback: BreakerStore = field(default_factory=MemoryBreakerStore)
    _paused_until: float = 0.0
    # Told each deployment's state as it is checked (metrics): (deployment label, is open).
    observe: Callable[[str, bool], None] | None = None

    def _store(self) -> BreakerStore:
        return self.fallback if time.monotonic() < self._paused_until else self.store

    async def _call(self, method: str, *args: Any, **kwargs: Any) -> Any:
        store = self._store()
        try:
            return await getattr(store, method)(*args, **kwargs)
        except Exception:
            if store is self.fallback:
                raise
            self._paused_until = time.monotonic() + self.store_pause_s
            return await getattr(self.fallback, method)(*args, **kwargs)

    async def allow(self, deployment: Deployment) -> bool:
        try:
            is_open = bool(await self._call("is_open", deployment.label))
        except Exception:
            is_open = False
        if self.observe is not None:
            self.observe(deployment.label, is_open)
        return not is_open

    async def failed(self, deployment: Deployment) -> None:
        try:
            await self._call(
                "record_failure",
                deployment.label,
                threshold=self.failure_threshold,
                window_s=self.window_s,
                cooldown_s=self.cooldown_s,
            )
        except Exception:  # noqa: S110 - best effort
            pass

    async def succeeded(self, deployment: Deployment) -> None:
        try:
            await self._call("record_success", deployment.label)
        except Exception:  # noqa: S110
            pass


# --- calling --------------------------------------------------------------------------


@dataclass
class Stream:
    """An upstream stream whose first chunk already arrived (so early errors surfaced)."""

    spec: ModelSpec
    deployment: Deployment
    first_chunk: Any
    rest: AsyncIterator[Any]
    started: float
    attempt: Attempt
    span: Any = tracing.NOTHING  # the call's span, ended once its usage is known


def response_cost_nanos(spec: ModelSpec, response: Any, prompt: int, completion: int) -> int:
    """A provider-reported exact cost (replay) wins; otherwise tokens x the model's price."""
    hidden = getattr(response, "_hidden_params", None) or {}
    exact = hidden.get("cascadeflow_cost_nanos")
    if exact is not None:
        return int(exact)
    return spec.price.cost_nanos(prompt, completion)


@dataclass
class Caller:
    breaker: CircuitBreaker | None = None
    retries: int = 1  # per deployment, for retryable errors
    backoff_s: float = 0.2
    timeout_s: float = 120.0
    # Checked before a model's first call (raises UpstreamError to refuse it): the gateway
    # re-vets a tenant's own server address here.
    vet: Callable[[ModelSpec], Awaitable[None]] | None = None

    def _kwargs(self, deployment: Deployment, kwargs: dict[str, Any]) -> dict[str, Any]:
        call = {**kwargs, **deployment.params, "model": deployment.litellm_model, "num_retries": 0}
        call.setdefault("timeout", self.timeout_s)
        if call.get("tools"):
            # LiteLLM sends any request with tools through its MCP bridge, which needs
            # the optional ``mcp`` package; CascadeFlow passes tools through as they are.
            call["_skip_mcp_handler"] = True
        return call

    async def _attempts(self, spec: ModelSpec) -> AsyncIterator[tuple[Deployment, int]]:
        """Yield (deployment, try number) in the order calls should be made."""
        if self.vet is not None:
            await self.vet(spec)
        skipped: list[Deployment] = []
        for deployment in spec.deployments:
            if self.breaker and not await self.breaker.allow(deployment):
                skipped.append(deployment)
                continue
            for n in range(self.retries + 1):
                yield deployment, n
        # If every deployment's circuit is open, still try them once: an open
        # breaker must not turn a recoverable request into a failure.
        if len(skipped) == len(spec.deployments):
            for deployment in skipped:
                yield deployment, 0

    async def complete(
        self, spec: ModelSpec, kwargs: dict[str, Any], attempts: list[Attempt], *, role: str
    ) -> tuple[Any, Attempt]:
        failure: Failure | None = None
        async for deployment, n in self._attempts(spec):
            if n:
                await self._backoff(n)
            started = time.perf_counter()
            with tracing.span(
                f"chat {spec.name}",
                _call_attributes(spec, deployment, kwargs, role, "chat"),
                client=True,
            ) as span:
                try:
                    call = self._kwargs(deployment, kwargs)
                    if openai_wire.handles(deployment.litellm_model, deployment.params):
                        response = await openai_wire.acompletion(deployment.litellm_model, call)
                    else:
                        response = await litellm.acompletion(**call)
                    usage = getattr(response, "usage", None)
                    if not getattr(response, "choices", None):
                        raise MalformedAnswer("no choices.", reported_tokens(usage))
                except Exception as exc:
                    failure = await self._failed_call(
                        exc, spec, deployment, started, attempts, role
                    )
                    span.set_attribute("error.type", failure.code)
                    continue
                if self.breaker:
                    await self.breaker.succeeded(deployment)
                prompt, completion = reported_tokens(usage) or await counted_off_loop(
                    deployment.litellm_model, kwargs["messages"], answer_text(response)
                )
                attempt = Attempt(
                    model=spec.name,
                    deployment=deployment.label,
                    role=role,
                    status="ok",
                    prompt_tokens=prompt,
                    completion_tokens=completion,
                    cost_nanos=response_cost_nanos(spec, response, prompt, completion),
                    latency_ms=_ms_since(started),
                )
                span.set_attributes(_response_attributes(response, attempt))
            attempts.append(attempt)
            return response, attempt
        raise UpstreamError(
            spec.name, failure or Failure(True, 503, "no_deployment", "No deployment available.")
        )

    async def open_stream(
        self, spec: ModelSpec, kwargs: dict[str, Any], attempts: list[Attempt], *, role: str
    ) -> Stream:
        failure: Failure | None = None
        call = {**kwargs, "stream": True, "stream_options": {"include_usage": True}}
        async for deployment, n in self._attempts(spec):
            if n:
                await self._backoff(n)
            started = time.perf_counter()
            try:
                if openai_wire.handles(deployment.litellm_model, deployment.params):
                    wrapper = await openai_wire.astream(
                        deployment.litellm_model, self._kwargs(deployment, call)
                    )
                else:
                    wrapper = await litellm.acompletion(**self._kwargs(deployment, call))
                iterator = wrapper.__aiter__()
                first = await iterator.__anext__()
            except StopAsyncIteration:
                failure = Failure(True, 502, "upstream_error", "Empty stream from provider.")
                attempts.append(_failed(spec, deployment, started, failure, role))
                continue
            except Exception as exc:
                failure = await self._failed_call(exc, spec, deployment, started, attempts, role)
                continue
            if self.breaker:
                await self.breaker.succeeded(deployment)
            attempt = Attempt(model=spec.name, deployment=deployment.label, role=role, status="ok")
            attempts.append(attempt)
            # Ended when the stream is settled (its usage known): see CascadeStream.
            span = tracing.start(
                f"chat {spec.name}",
                _call_attributes(spec, deployment, call, role, "chat"),
                client=True,
            )
            return Stream(spec, deployment, first, iterator, started, attempt, span)
        raise UpstreamError(
            spec.name, failure or Failure(True, 503, "no_deployment", "No deployment available.")
        )

    async def embed(
        self, spec: ModelSpec, kwargs: dict[str, Any], attempts: list[Attempt], *, role: str
    ) -> tuple[Embeddings, Attempt]:
        """One embedding model's vectors for ``kwargs["input"]`` (a list), with the same
        deployments, retries, breaker and vetting as a chat call. Billed on the provider's
        token count, or on CascadeFlow's own when the provider reports none."""
        failure: Failure | None = None
        inputs = kwargs["input"]
        async for deployment, n in self._attempts(spec):
            if n:
                await self._backoff(n)
            started = time.perf_counter()
            with tracing.span(
                f"embeddings {spec.name}",
                _call_attributes(spec, deployment, kwargs, role, "embeddings"),
                client=True,
            ) as span:
                try:
                    call = self._kwargs(deployment, kwargs)
                    if "dimensions" in call:
                        _pass_dimensions(call, deployment.litellm_model)
                    if openai_wire.handles(deployment.litellm_model, deployment.params):
                        response = await openai_wire.aembedding(deployment.litellm_model, call)
                    else:
                        response = await litellm.aembedding(**call)
                    result = embeddings_of(response, len(inputs))
                except Exception as exc:
                    failure = await self._failed_call(
                        exc, spec, deployment, started, attempts, role
                    )
                    span.set_attribute("error.type", failure.code)
                    continue
                if self.breaker:
                    await self.breaker.succeeded(deployment)
                prompt = result.prompt_tokens or await asyncio.to_thread(
                    count_tokens, deployment.litellm_model, inputs
                )
                attempt = Attempt(
                    model=spec.name,
                    deployment=deployment.label,
                    role=role,
                    status="ok",
                    prompt_tokens=prompt,
                    cost_nanos=spec.price.cost_nanos(prompt, 0),
                    latency_ms=_ms_since(started),
                )
                if tracing.enabled():
                    span.set_attributes(
                        {
                            "gen_ai.response.model": result.model or None,
                            "gen_ai.usage.input_tokens": prompt,
                            "gen_ai.embeddings.dimension.count": len(result.vectors[0]),
                            "cascadeflow.cost_usd": attempt.cost_nanos / 1e9,
                        }
                    )
            attempts.append(attempt)
            return result, attempt
        raise UpstreamError(
            spec.name, failure or Failure(True, 503, "no_deployment", "No deployment available.")
        )

    async def _failed_call(
        self,
        exc: Exception,
        spec: ModelSpec,
        deployment: Deployment,
        started: float,
        attempts: list[Attempt],
        role: str,
    ) -> Failure:
        """Record a failed call; raise unless another deployment could help."""
        failure = classify(exc)
        attempt = _failed(spec, deployment, started, failure, role)
        if isinstance(exc, MalformedAnswer) and exc.tokens:
            # The provider answered, unusably, and says what that cost: it is paid for.
            attempt.prompt_tokens, attempt.completion_tokens = exc.tokens
            attempt.cost_nanos = spec.price.cost_nanos(*exc.tokens)
        attempts.append(attempt)
        if self.breaker and failure.counts_against_deployment:
            await self.breaker.failed(deployment)
        if not failure.retryable:
            raise UpstreamError(spec.name, failure) from None
        return failure

    async def _backoff(self, n: int) -> None:
        delay = self.backoff_s * (2 ** (n - 1))
        await asyncio.sleep(delay * (0.5 + random.random() / 2))  # noqa: S311 - jitter, not crypto


def counted_tokens(litellm_model: str, messages: Any, text: str) -> tuple[int, int]:
    """What a call that reports no usage (or counts that cannot be) is charged: its prompt
    and its answer counted with the model's tokenizer, as LiteLLM counts them."""
    prompt = litellm.token_counter(model=litellm_model, messages=messages)
    completion = litellm.token_counter(model=litellm_model, text=text) if text else 0
    return min(prompt, MAX_TOKENS_PER_CALL), min(completion, MAX_TOKENS_PER_CALL)


async def counted_off_loop(litellm_model: str, messages: Any, text: str) -> tuple[int, int]:
    """``counted_tokens`` in a worker thread. The tokenizer takes up to half a second on a
    large request (a 4 MB prompt) and releases the GIL while it counts: on the event loop it
    would hold up every other request of the process meanwhile."""
    return await asyncio.to_thread(counted_tokens, litellm_model, messages, text)


def answer_text(response: Any) -> str:
    """Every choice's content and tool calls (names and arguments): what was generated."""
    texts: list[str] = []
    for choice in getattr(response, "choices", None) or ():
        message = getattr(choice, "message", None)
        texts.append(getattr(message, "content", None) or "")
        for call in getattr(message, "tool_calls", None) or ():
            function = getattr(call, "function", None)
            texts.append(getattr(function, "name", None) or "")
            texts.append(getattr(function, "arguments", None) or "")
    return "".join(t for t in texts if isinstance(t, str))


def _failed(
    spec: ModelSpec, deployment: Deployment, started: float, failure: Failure, role: str
) -> Attempt:
    return Attempt(
        model=spec.name,
        deployment=deployment.label,
        role=role,
        status="error",
        latency_ms=_ms_since(started),
        error_code=failure.code,
        error_message=failure.message,
    )


def _call_attributes(
    spec: ModelSpec, deployment: Deployment, kwargs: dict[str, Any], role: str, operation: str
) -> dict[str, Any]:
    """The client span of one upstream call (``operation``: ``chat`` or ``embeddings``)."""
    if not tracing.enabled():
        return {}
    attributes: dict[str, Any] = {
        "gen_ai.operation.name": operation,
        "gen_ai.system": tracing.provider_of(deployment.litellm_model),
        "gen_ai.request.model": spec.name,
        "cascadeflow.deployment": deployment.label,
        "cascadeflow.role": role,
    }
    if operation == "embeddings":
        attributes["gen_ai.embeddings.dimension.count"] = kwargs.get("dimensions")
    else:
        attributes["gen_ai.request.max_tokens"] = kwargs.get("max_completion_tokens") or kwargs.get(
            "max_tokens"
        )
        attributes["gen_ai.request.temperature"] = kwargs.get("temperature")
    return attributes


# What a custom LiteLLM provider is asked for as OpenAI's ``dimensions`` (see ``Caller.embed``).
CUSTOM_DIMENSIONS = "output_dimensions"


def _pass_dimensions(call: dict[str, Any], litellm_model: str) -> None:
    """Make LiteLLM send ``dimensions``: the gateway has decided the model takes them.

    LiteLLM guesses from the model's name (an OpenAI-wire model not named
    ``text-embedding-3…`` is refused unless allowed), and hands the parameter only to
    the providers it knows; a custom one (the offline demo) gets it under its own name.
    """
    provider = litellm_model.split("/", 1)[0]
    if any(item.get("provider") == provider for item in litellm.custom_provider_map):
        call[CUSTOM_DIMENSIONS] = call.pop("dimensions")
    else:
        call["allowed_openai_params"] = ["dimensions"]


def _response_attributes(response: Any, attempt: Attempt) -> dict[str, Any]:
    if not tracing.enabled():
        return {}
    reasons = [
        str(c.finish_reason) for c in getattr(response, "choices", None) or [] if c.finish_reason
    ]
    return {
        "gen_ai.response.model": getattr(response, "model", None),
        "gen_ai.response.id": getattr(response, "id", None),
        "gen_ai.response.finish_reasons": reasons,
        "gen_ai.usage.input_tokens": attempt.prompt_tokens,
        "gen_ai.usage.output_tokens": attempt.completion_tokens,
        "cascadeflow.cost_usd": attempt.cost_nanos / 1e9,
    }


def _ms_since(started: float) -> int:
    return int((time.perf_counter() - started) * 1000)
