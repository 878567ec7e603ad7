"""The path of one request through the OpenAI-compatible API.

``prepare`` authenticates the token and resolves what the request asks for;
``complete`` / ``stream`` produce the answer and write the ledger row before
the response completes. The views only translate HTTP to these calls and
back, so the routing behind them (pass-through today, the cascade engine
tomorrow) changes without touching the views.

Database work runs in a thread pool (``db``) with persistent, health-checked
connections: two round trips per request, one before the upstream call
(auth + end user) and one after (the ledger insert).
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any, ParamSpec, TypeVar

import litellm
from asgiref.sync import sync_to_async
from django.conf import settings
from django.db import close_old_connections
from django.utils import timezone

from routing.catalog import model_catalog, models_allowed
from routing.engine.pricing import nanos_to_usd
from routing.enums import UsageStatus
from routing.errors import GatewayError, forbidden, unauthorized
from routing.providers.catalog import CatalogModel
from routing.schemas import ChatRequest
from routing.services import LedgerEntry, usage_event_record
from routing.upstream import Attempt, open_stream
from routing.upstream import complete as upstream_complete
from tenants.enums import Scope
from tenants.selectors import TokenContext, TokenInvalid, token_context_for_raw
from tenants.services import end_user_get_or_create, token_touch

P = ParamSpec("P")
R = TypeVar("R")


def db(fn: Callable[P, R]) -> Callable[P, Any]:
    """Run ORM work off the event loop on a pooled thread with a usable connection."""

    def run(*args: P.args, **kwargs: P.kwargs) -> R:
        # The same connection lifecycle Django gives a request: drop connections
        # that are broken or past CONN_MAX_AGE before and after the work.
        close_old_connections()
        try:
            return fn(*args, **kwargs)
        finally:
            close_old_connections()

    return sync_to_async(run, thread_sensitive=False)


@dataclass
class GatewayRequest:
    request_id: str
    ctx: TokenContext
    chat: ChatRequest
    target: CatalogModel
    end_user_id: int | None
    received_at: datetime
    started: float


@dataclass
class CompletionOutcome:
    body: dict[str, Any]
    headers: dict[str, str]


def cascade_headers(
    *, model: str, escalated: bool, cost_nanos: int, savings_nanos: int
) -> dict[str, str]:
    return {
        "x-cascade-model": model or "none",
        "x-cascade-escalated": "true" if escalated else "false",
        "x-cascade-cost-usd": f"{nanos_to_usd(cost_nanos):.9f}",
        "x-cascade-savings-usd": f"{nanos_to_usd(savings_nanos):.9f}",
    }


EMPTY_CASCADE_HEADERS = cascade_headers(model="", escalated=False, cost_nanos=0, savings_nanos=0)


def bearer_token(authorization: str | None) -> str:
    if not authorization:
        return ""
    scheme, _, value = authorization.partition(" ")
    return value.strip() if scheme.lower() == "bearer" else ""


def _authenticate(raw_token: str, scope: str) -> TokenContext:
    try:
        ctx = token_context_for_raw(raw=raw_token, now=timezone.now())
    except TokenInvalid as exc:
        raise unauthorized(exc.reason) from None
    if not ctx.has_scope(scope):
        raise forbidden(f"This API key lacks the '{scope}' scope.", code="insufficient_scope")
    return ctx


def _resolve_model(ctx: TokenContext, name: str) -> CatalogModel:
    model = model_catalog().get(name)
    if model is None:
        raise GatewayError(
            404,
            f"The model '{name}' does not exist. GET /v1/models lists the models you can use.",
            param="model",
            code="model_not_found",
        )
    allowed = models_allowed(
        tenant_allowed=ctx.tenant_allowed_models, tier_allowed=ctx.tier_allowed_models
    )
    if model not in allowed:
        raise forbidden(f"Your plan does not allow the model '{name}'.", code="model_not_allowed")
    return model


@db
def _prepare_sync(
    raw_token: str, chat: ChatRequest | None, parse_error: GatewayError | None
) -> tuple[TokenContext, CatalogModel, int | None]:
    ctx = _authenticate(raw_token, Scope.COMPLETIONS)
    if parse_error is not None:
        raise parse_error
    assert chat is not None
    target = _resolve_model(ctx, chat.model)
    end_user_id = None
    if chat.user:
        from tenants.models import Tenant

        end_user_id = end_user_get_or_create(
            tenant=Tenant(pk=ctx.tenant_id), external_id=chat.user
        ).pk
    return ctx, target, end_user_id


async def prepare(
    *,
    request_id: str,
    authorization: str | None,
    chat: ChatRequest | None,
    parse_error: GatewayError | None,
) -> GatewayRequest:
    """Authenticate first (401 beats 400), then resolve the model and end user."""
    received_at = timezone.now()
    started = time.perf_counter()
    ctx, target, end_user_id = await _prepare_sync(bearer_token(authorization), chat, parse_error)
    assert chat is not None
    return GatewayRequest(request_id, ctx, chat, target, end_user_id, received_at, started)


@db
def authenticate(authorization: str | None, scope: str = Scope.COMPLETIONS) -> TokenContext:
    return _authenticate(bearer_token(authorization), scope)


def list_models(ctx: TokenContext) -> dict[str, Any]:
    created = 1_700_000_000
    return {
        "object": "list",
        "data": [
            {"id": m.name, "object": "model", "created": created, "owned_by": m.owned_by}
            for m in models_allowed(
                tenant_allowed=ctx.tenant_allowed_models, tier_allowed=ctx.tier_allowed_models
            )
        ],
    }


# --- ledger ----------------------------------------------------------------------


def _entry(gw: GatewayRequest, attempts: list[Attempt]) -> LedgerEntry:
    return LedgerEntry(
        tenant_id=gw.ctx.tenant_id,
        token_id=gw.ctx.token_id,
        end_user_id=gw.end_user_id,
        request_id=gw.request_id,
        created_at=gw.received_at,
        requested_model=gw.chat.model,
        attempts=attempts,
        stream=gw.chat.stream,
    )


@db
def _record_sync(entry: LedgerEntry, ctx: TokenContext) -> None:
    usage_event_record(entry=entry)
    now = timezone.now()
    stale_before = now - timedelta(seconds=settings.CASCADEFLOW_TOKEN_TOUCH_SECONDS)
    if ctx.last_used_at is None or ctx.last_used_at < stale_before:
        token_touch(token_id=ctx.token_id, now=now, stale_before=stale_before)


async def record(gw: GatewayRequest, entry: LedgerEntry) -> None:
    entry.latency_ms = int((time.perf_counter() - gw.started) * 1000)
    # Shielded: a client that disconnects must not cancel its own ledger row.
    await asyncio.shield(_record_sync(entry, gw.ctx))


async def _fail(gw: GatewayRequest, entry: LedgerEntry, error: GatewayError) -> GatewayError:
    entry.status = UsageStatus.UPSTREAM_ERROR
    entry.http_status = error.status
    entry.error_code = error.code or ""
    await record(gw, entry)
    error.headers.update(
        cascade_headers(model="", escalated=False, cost_nanos=entry.cost_nanos, savings_nanos=0)
    )
    return error


# --- non-streaming -----------------------------------------------------------------


def _clean(value: Any) -> Any:
    """Drop LiteLLM's private fields so the body is exactly OpenAI's shape."""
    if isinstance(value, dict):
        return {
            k: _clean(v)
            for k, v in value.items()
            if k != "provider_specific_fields" and not (k == "function_call" and v is None)
        }
    if isinstance(value, list):
        return [_clean(v) for v in value]
    return value


async def complete(gw: GatewayRequest) -> CompletionOutcome:
    attempts: list[Attempt] = []
    entry = _entry(gw, attempts)
    try:
        done = await upstream_complete(
            gw.target, gw.chat, attempts, timeout=settings.CASCADEFLOW_UPSTREAM_TIMEOUT
        )
    except GatewayError as error:
        raise await _fail(gw, entry, error) from None
    entry.model = done.model.name
    entry.prompt_tokens = done.attempt.prompt_tokens
    entry.completion_tokens = done.attempt.completion_tokens
    # Pass-through: the requested model is the strongest of its one-model chain.
    entry.baseline_cost_nanos = entry.cost_nanos
    await record(gw, entry)
    body = _clean(done.response.model_dump())
    body["model"] = done.model.name
    return CompletionOutcome(
        body=body,
        headers=cascade_headers(
            model=done.model.name,
            escalated=entry.escalated,
            cost_nanos=entry.cost_nanos,
            savings_nanos=entry.baseline_cost_nanos - entry.cost_nanos,
        ),
    )


# --- streaming ----------------------------------------------------------------------


@dataclass
class StreamOutcome:
    events: AsyncIterator[str]
    headers: dict[str, str]


def _sse(data: dict[str, Any] | str) -> str:
    payload = data if isinstance(data, str) else json.dumps(data, separators=(",", ":"))
    return f"data: {payload}\n\n"


async def stream(gw: GatewayRequest) -> StreamOutcome:
    """Open the upstream stream (errors before the first chunk become HTTP errors)."""
    attempts: list[Attempt] = []
    entry = _entry(gw, attempts)
    try:
        upstream = await open_stream(
            gw.target, gw.chat, attempts, timeout=settings.CASCADEFLOW_UPSTREAM_TIMEOUT
        )
    except GatewayError as error:
        raise await _fail(gw, entry, error) from None
    headers = cascade_headers(
        model=upstream.model.name, escalated=False, cost_nanos=entry.cost_nanos, savings_nanos=0
    )
    return StreamOutcome(events=_relay(gw, entry, upstream), headers=headers)


async def _relay(gw: GatewayRequest, entry: LedgerEntry, upstream) -> AsyncIterator[str]:
    model = upstream.model
    usage: dict[str, int] | None = None
    texts: list[str] = []
    chunk = upstream.first_chunk
    entry.model = model.name
    try:
        while True:
            data = _clean(chunk.model_dump(exclude_none=True))
            data["model"] = model.name
            if data.get("usage"):
                usage = data["usage"]
            for choice in data.get("choices") or []:
                delta = choice.get("delta") or {}
                texts.append(delta.get("content") or "")
                for call in delta.get("tool_calls") or []:
                    function = call.get("function") or {}
                    texts.append((function.get("name") or "") + (function.get("arguments") or ""))
            if not gw.chat.include_usage:
                data.pop("usage", None)
                if _is_empty(data):
                    data = None
            if data is not None:
                yield _sse(data)
            try:
                chunk = await upstream.rest.__anext__()
            except StopAsyncIteration:
                break
    except (asyncio.CancelledError, GeneratorExit):
        _settle_stream(entry, upstream, usage, texts, gw.chat)
        entry.status = UsageStatus.CLIENT_CLOSED
        entry.http_status = 499
        await record(gw, entry)
        raise
    except Exception as exc:
        from routing.upstream import classify

        failure = classify(exc)
        _settle_stream(entry, upstream, usage, texts, gw.chat)
        entry.status = UsageStatus.UPSTREAM_ERROR
        entry.error_code = failure.code
        entry.attempts[-1].status = "error"
        entry.attempts[-1].error_code = failure.code
        entry.attempts[-1].error_message = failure.message
        await record(gw, entry)
        yield _sse(
            GatewayError(502, failure.message, type="api_error", code=failure.code).payload()
        )
        return
    _settle_stream(entry, upstream, usage, texts, gw.chat)
    entry.baseline_cost_nanos = entry.cost_nanos
    await record(gw, entry)
    summary = {
        "model": entry.model,
        "escalated": entry.escalated,
        "cost_usd": f"{nanos_to_usd(entry.cost_nanos):.9f}",
        "savings_usd": f"{nanos_to_usd(entry.baseline_cost_nanos - entry.cost_nanos):.9f}",
    }
    # An SSE comment: ignored by clients, readable by anyone tailing the stream.
    yield f": cascade {json.dumps(summary, separators=(',', ':'))}\n\n"
    yield "data: [DONE]\n\n"


def _is_empty(data: dict[str, Any]) -> bool:
    return all(
        not (c.get("delta") or {}) and not c.get("finish_reason") and not c.get("logprobs")
        for c in data.get("choices") or [{}]
    )


def _settle_stream(entry: LedgerEntry, upstream, usage, texts, chat: ChatRequest) -> None:
    """Price what was streamed: provider usage when sent, else LiteLLM's token counter."""
    model: CatalogModel = upstream.model
    if usage:
        prompt = int(usage.get("prompt_tokens") or 0)
        completion = int(usage.get("completion_tokens") or 0)
    else:
        litellm_model = upstream.deployment.litellm_model
        prompt = litellm.token_counter(model=litellm_model, messages=chat.messages)
        text = "".join(texts)
        completion = litellm.token_counter(model=litellm_model, text=text) if text else 0
    entry.attempts.append(
        Attempt(
            model=model.name,
            deployment=upstream.deployment.label,
            status="ok",
            prompt_tokens=prompt,
            completion_tokens=completion,
            cost_nanos=model.price.cost_nanos(prompt, completion),
            latency_ms=int((time.perf_counter() - upstream.started) * 1000),
        )
    )
    entry.prompt_tokens = prompt
    entry.completion_tokens = completion
