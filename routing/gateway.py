"""The path of one request through the OpenAI-compatible API.

``prepare`` authenticates the token and resolves what the request names (a
model, a built-in preset, a tenant profile); ``complete`` / ``stream`` run the
cascade engine and write the ledger row before the response completes; ``embed``
does the same for an embeddings request (one embedding model, no cascade). The
views only translate HTTP to these calls and back.

Database work runs in a thread pool (``db``) with the connection lifecycle
Django gives a request: two hops to the pool per request, one before the upstream
call (auth, target, end user, admission) and one after (the ledger insert). The
token lookup, the end user and its tier come from ``tenants.selectors``'
admission cache when it read them less than a second ago.

A cascade that learns from audits keeps the answers its models gave (drafts
and the final answer) until its ledger row is written; then ``routing.audits``
decides whether to audit it (``X-CascadeFlow-Audit: off`` opts a request out).
"""

from __future__ import annotations

import asyncio
import functools
import json
import logging
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from functools import lru_cache
from typing import Any

from django.conf import settings
from django.db import DatabaseError, InterfaceError, OperationalError
from django.utils import timezone

from core.db import db
from core.money import nanos_to_usd
from routing import audits, embeddings, live, metrics, telemetry, tenant_models
from routing.embeddings import EmbeddingRequest
from routing.enforcement import (
    Enforcement,
    Settlement,
    admit,
    apply_callback,
    blocked_error,
    degraded,
    rate_limited_error,
)
from routing.engine import tracing
from routing.engine.agent import CascadeAgent, CascadeStream, _draft_of, clean_payload
from routing.engine.complexity import QueryProfile
from routing.engine.policy import PRESETS, Policy
from routing.engine.resilience import (
    Caller,
    CircuitBreaker,
    MemoryBreakerStore,
    RedisBreakerStore,
    Stream,
    UpstreamError,
    classify,
)
from routing.engine.signals import Draft
from routing.engine.types import CHAT, EMBEDDING, Attempt, CascadeResult, ModelSpec
from routing.enums import UsageStatus
from routing.errors import GatewayError, forbidden, unauthorized
from routing.schemas import ChatRequest
from routing.services import (
    LedgerEntry,
    ledger_replay,
    ledger_write,
    spooled_record,
    spooled_release,
    usage_event_values,
)
from routing.spool import ledger_spool
from routing.targets import Target, allowed_specs, resolve_target, target_names
from tenants import callbacks
from tenants.enums import BudgetDecision, Scope
from tenants.ratelimits import RateLimited, charge_completion
from tenants.selectors import (
    TokenContext,
    TokenInvalid,
    end_user_of,
    token_context_for_raw,
    token_used,
)
from tenants.services import token_touch

logger = logging.getLogger(__name__)

# The database is unreachable (down, failing over, connect timeout): a 503 the client retries.
DATABASE_DOWN = (OperationalError, InterfaceError)


@lru_cache(maxsize=1)
def caller() -> Caller:
    """One caller per process; its circuit breaker state is shared through Redis when set."""
    store = (
        RedisBreakerStore(settings.REDIS_URL, prefix=settings.CASCADEFLOW_BREAKER_PREFIX)
        if settings.REDIS_URL
        else MemoryBreakerStore()
    )
    breaker = CircuitBreaker(
        store,
        observe=metrics.breaker_observed,
        failure_threshold=settings.CASCADEFLOW_BREAKER_FAILURES,
        window_s=settings.CASCADEFLOW_BREAKER_WINDOW,
        cooldown_s=settings.CASCADEFLOW_BREAKER_COOLDOWN,
    )
    return Caller(
        vet=tenant_models.vet,
        breaker=breaker,
        retries=settings.CASCADEFLOW_UPSTREAM_RETRIES,
        backoff_s=settings.CASCADEFLOW_UPSTREAM_BACKOFF,
        timeout_s=settings.CASCADEFLOW_UPSTREAM_TIMEOUT,
    )


@dataclass
class RecordingCaller:
    """The process's caller, keeping each model's answer to one request (for its audit)."""

    inner: Caller
    answers: dict[str, Any]

    async def complete(
        self, spec: ModelSpec, kwargs: dict[str, Any], attempts: list[Attempt], *, role: str
    ) -> tuple[Any, Attempt]:
        response, attempt = await self.inner.complete(spec, kwargs, attempts, role=role)
        if role in ("draft", "final"):
            self.answers[spec.name] = response
        return response, attempt

    async def open_stream(
        self, spec: ModelSpec, kwargs: dict[str, Any], attempts: list[Attempt], *, role: str
    ) -> Stream:
        return await self.inner.open_stream(spec, kwargs, attempts, role=role)


@dataclass
class StreamedAnswer:
    """The streamed answer, put together from its chunks (content and tool calls)."""

    model: str = ""
    content: list[str] = field(default_factory=list)
    tool_calls: dict[int, dict[str, Any]] = field(default_factory=dict)
    finish_reason: str | None = None

    def add(self, data: dict[str, Any]) -> None:
        self.model = data.get("model") or self.model
        for choice in data.get("choices") or []:
            if choice.get("index", 0) != 0:
                continue
            delta = choice.get("delta") or {}
            self.content.append(delta.get("content") or "")
            for call in delta.get("tool_calls") or []:
                slot = self.tool_calls.setdefault(
                    int(call.get("index") or 0),
                    {"id": "", "type": "function", "function": {"name": "", "arguments": ""}},
                )
                slot["id"] = call.get("id") or slot["id"]
                function = call.get("function") or {}
                slot["function"]["name"] += function.get("name") or ""
                slot["function"]["arguments"] += function.get("arguments") or ""
            self.finish_reason = choice.get("finish_reason") or self.finish_reason

    def draft(self) -> Draft:
        calls = [self.tool_calls[i] for i in sorted(self.tool_calls)]
        return Draft("".join(self.content), self.finish_reason, calls)


@dataclass
class GatewayRequest:
    request_id: str
    ctx: TokenContext
    request: ChatRequest | EmbeddingRequest  # what was asked (chat: also /v1/responses)
    target: Target
    end_user_id: int | None
    received_at: datetime
    started: float
    enforcement: Enforcement = field(default_factory=Enforcement)
    recorded: bool = False  # its ledger row is written (or spooled): exactly once
    audit_opt_out: bool = False  # X-CascadeFlow-Audit: off
    end_user_audit_excluded: bool = False
    answers: dict[str, Any] = field(default_factory=dict)  # model -> its response (learning only)
    streamed: StreamedAnswer | None = None
    span: telemetry.RequestSpan = telemetry.OFF  # the request's trace span (tracing on)
    route: str = "chat-completions"  # the API it came in by (metrics)
    ledger: LedgerEntry | None = None  # its ledger row, once written (or spooled)
    query: QueryProfile | None = None  # the cascade's profile of the query (audits reuse it)

    @property
    def chat(self) -> ChatRequest:
        """The chat request (what the chat path's code reads; never an embeddings one)."""
        assert isinstance(self.request, ChatRequest)
        return self.request

    def agent(self) -> CascadeAgent:

        base = PRESETS[self.target.preset]
        policy = base
        if self.target.threshold_offset:
            policy = Policy(
                **{
                    **base.__dict__,
                    "default_threshold": base.default_threshold + self.target.threshold_offset,
                }
            )
        shared = caller()
        return CascadeAgent(
            self.target.chain,
            policy=policy,
            calibration=self.target.calibration,
            caller=RecordingCaller(shared, self.answers)  # type: ignore[arg-type]
            if self.target.learning is not None
            else shared,
            domain_routes=self.target.domain_routes,
            profile=self.target.profile,
        )


@dataclass
class CompletionOutcome:
    body: dict[str, Any]
    headers: dict[str, str]


@dataclass
class EmbeddingOutcome:
    content: bytes  # OpenAI's JSON body, encoded
    headers: dict[str, str]


COST_UNKNOWN = "unknown"


def cascade_headers(
    *,
    model: str,
    escalated: bool,
    cost_nanos: int | None,
    savings_nanos: int | None,
    profile: str = "",
) -> dict[str, str]:
    """The cascade headers; a cost of ``None`` (not known yet: a stream) says ``unknown``."""
    headers = {
        "x-cascade-model": model or "none",
        "x-cascade-escalated": "true" if escalated else "false",
        "x-cascade-cost-usd": COST_UNKNOWN
        if cost_nanos is None
        else f"{nanos_to_usd(cost_nanos):.9f}",
        "x-cascade-savings-usd": COST_UNKNOWN
        if savings_nanos is None
        else f"{nanos_to_usd(savings_nanos):.9f}",
    }
    if profile:
        headers["x-cascade-profile"] = profile
    return headers


EMPTY_CASCADE_HEADERS = cascade_headers(model="", escalated=False, cost_nanos=0, savings_nanos=0)


def database_unavailable() -> GatewayError:
    return GatewayError(
        503,
        "CascadeFlow cannot reach its database right now; retry shortly.",
        type="api_error",
        code="service_unavailable",
        headers={"Retry-After": str(settings.CASCADEFLOW_RETRY_AFTER_SECONDS)},
    )


def internal_error(request_id: str) -> GatewayError:
    return GatewayError(
        500,
        f"CascadeFlow failed to handle request {request_id}.",
        type="api_error",
        code="internal_error",
    )


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


@db
def _prepare_sync(
    raw_token: str,
    request: ChatRequest | EmbeddingRequest | None,
    parse_error: GatewayError | None,
    request_id: str,
    received_at: datetime,
    started: float,
    audit_opt_out: bool = False,
) -> GatewayRequest:
    ctx = _authenticate(raw_token, Scope.COMPLETIONS)
    if parse_error is not None:
        raise parse_error
    assert request is not None
    target = resolve_target(ctx, request.model)
    if isinstance(request, EmbeddingRequest):
        check_embedding(ctx, request, target)
    else:
        check_chat_model(request, target)
        check_choices(request, target)
    end_user = None
    if request.user:
        end_user = end_user_of(tenant_id=ctx.tenant_id, external_id=request.user)
    try:
        target, enforcement = admit(
            ctx=ctx,
            request=request,
            target=target,
            end_user=end_user,
            request_id=request_id,
            now=received_at,
        )
    except DATABASE_DOWN:
        if ctx.has_budgets:
            # The reservation may have committed before the connection was lost: free it
            # (if it is there) as soon as the database is back, not at its expiry.
            settlement = Settlement(ctx.tenant_id, reservation_key=request_id)
            _spool(spooled_release(settlement), request_id)
        raise
    except RateLimited as exc:
        refused = GatewayRequest(
            request_id,
            ctx,
            request,
            target,
            end_user.pk if end_user else None,
            received_at,
            started,
        )
        metrics.rate_limited(exc.limit.scope)
        raise _refused(refused, UsageStatus.RATE_LIMITED, rate_limited_error(exc)) from None
    gw = GatewayRequest(
        request_id,
        ctx,
        request,
        target,
        end_user.pk if end_user else None,
        received_at,
        started,
        enforcement,
        audit_opt_out=audit_opt_out,
        end_user_audit_excluded=bool(end_user and end_user.audit_excluded),
    )
    if enforcement.decision == BudgetDecision.BLOCK:
        raise _refused(gw, UsageStatus.BLOCKED, blocked_error(enforcement))
    return gw


def _model_kind_error(name: str, problem: str) -> GatewayError:
    return GatewayError(400, f"'{name}' {problem}", param="model", code="model_not_supported")


def check_chat_model(chat: ChatRequest, target: Target) -> None:
    """A chat request names chat models: an embedding model answers no chat (and a call
    that could only fail must not count against its deployment's breaker)."""
    if any(spec.mode != CHAT for spec in target.chain):
        raise _model_kind_error(
            chat.model,
            "is an embedding model: send it to POST /v1/embeddings, or name a chat model "
            "or a cascade here (GET /v1/models lists them).",
        )


def check_embedding(ctx: TokenContext, request: EmbeddingRequest, target: Target) -> None:
    """An embeddings request names one embedding model, and asks for ``dimensions`` only
    where that model takes them. Anything else is a 400 saying why."""
    spec = target.chain[0]
    if target.profile or spec.mode != EMBEDDING:
        names = sorted(n for n, s in allowed_specs(ctx).items() if s.mode == EMBEDDING)
        what = (
            "is a routing profile: a cascade judges chat answers, and an embedding comes "
            "from one embedding model"
            if target.profile
            else "is a chat model, not an embedding model"
        )
        offer = (
            f"Embedding models you can use: {', '.join(names[:10])}."
            if names
            else "You have no embedding model."
        )
        raise _model_kind_error(request.model, f"{what}. {offer}")
    if request.dimensions is None:
        return
    if not spec.supports_dimensions:
        size = f" (its vectors have {spec.dimensions})" if spec.dimensions else ""
        raise GatewayError(
            400,
            f"'{spec.name}' does not take 'dimensions'{size}: leave it out.",
            param="dimensions",
            code="unsupported_parameter",
        )
    if spec.dimensions and request.dimensions > spec.dimensions:
        raise GatewayError(
            400,
            f"'dimensions' must be at most {spec.dimensions} for '{spec.name}'.",
            param="dimensions",
            code="invalid_value",
        )


def check_choices(chat: ChatRequest, target: Target) -> None:
    """``n`` > 1 is served by one model, unstreamed; anything else is a 400 saying why.

    A cascade judges one draft and escalates on it: it cannot serve several
    choices, and serving one would silently drop what was asked for. A stream
    of several choices is refused too: not every transport keeps their indexes.
    """
    n = chat.params.get("n") or 1
    if n == 1:
        return
    if target.is_cascade:
        raise GatewayError(
            400,
            f"'n' must be 1 for '{chat.model}': a cascade judges one draft and escalates "
            f"on it, so it cannot serve {n} choices. Ask one model for several choices "
            "(GET /v1/models lists them), or send n=1.",
            param="n",
            code="unsupported_parameter",
        )
    if chat.stream:
        raise GatewayError(
            400,
            f"'n' must be 1 when 'stream' is true: {n} choices are not streamed. "
            "Send stream=false for several choices, or n=1 to stream.",
            param="n",
            code="unsupported_parameter",
        )


def _refused(gw: GatewayRequest, status: str, error: GatewayError) -> GatewayError:
    """A request refused at admission (rate limit, budget): its row written from the
    admission thread, freeing whatever is still held for it in the same transaction."""
    entry = ended(ledger_entry(gw), status, error.status, error.code or "")
    entry.latency_ms = int((time.perf_counter() - gw.started) * 1000)
    gw.recorded = True
    _write(entry, gw.ctx, gw.enforcement)
    _published(entry)
    return error


async def _ask_tenant(gw: GatewayRequest) -> None:
    """The tenant's budget callback, asked on the event loop (never on the database pool)."""
    question = gw.enforcement.question
    assert question is not None
    apply_callback(gw.enforcement, await callbacks.ask(question))
    if gw.enforcement.decision == BudgetDecision.BLOCK:
        raise await db(_refused)(gw, UsageStatus.BLOCKED, blocked_error(gw.enforcement))
    if gw.enforcement.decision == BudgetDecision.DEGRADE:
        gw.target = degraded(gw.target)


async def prepare(
    *,
    request_id: str,
    authorization: str | None,
    request: ChatRequest | EmbeddingRequest | None,
    parse_error: GatewayError | None,
    audit_opt_out: bool = False,
    span: telemetry.RequestSpan = telemetry.OFF,
) -> GatewayRequest:
    """Authenticate first (401 beats 400), then resolve the target, end user and budgets."""
    live.publisher.bind()
    try:
        with tracing.span("admission"):
            gw = await _prepare_sync(
                bearer_token(authorization),
                request,
                parse_error,
                request_id,
                timezone.now(),
                time.perf_counter(),
                audit_opt_out,
            )
            gw.span = span
            if gw.enforcement.question is not None:
                try:
                    await _ask_tenant(gw)
                except GatewayError:
                    raise
                except Exception:  # nothing must stay reserved for a request that ends here
                    raise await _crashed(gw, ledger_entry(gw), []) from None
    except DATABASE_DOWN as exc:
        # One line per refused request: an outage must not flood the log with tracebacks.
        logger.warning("Database unreachable while admitting %s: %r", request_id, exc)
        raise database_unavailable() from None
    return gw


@db
def authenticate(authorization: str | None, scope: str = Scope.COMPLETIONS) -> TokenContext:
    return _authenticate(bearer_token(authorization), scope)


MODEL_CREATED = 1_700_000_000  # models and profiles have no creation date OpenAI's way


def _model(name: str, owner: str) -> dict[str, Any]:
    return {"id": name, "object": "model", "created": MODEL_CREATED, "owned_by": owner}


@db
def list_models(ctx: TokenContext) -> dict[str, Any]:
    return {"object": "list", "data": [_model(name, owner) for name, owner in target_names(ctx)]}


@db
def retrieve_model(ctx: TokenContext, model_id: str) -> dict[str, Any]:
    """One entry of ``list_models`` (the same names: what this tenant may request), or a 404.

    A model that exists but is not allowed is the same 404 as one that does not exist.
    """
    for name, owner in target_names(ctx):
        if name == model_id:
            return _model(name, owner)
    raise GatewayError(
        404,
        f"The model '{model_id}' does not exist or you do not have access to it. "
        "GET /v1/models lists the models you can use.",
        param="model",
        code="model_not_found",
    )


# --- ledger ---------------------------------------------------------------------------


def ledger_entry(gw: GatewayRequest) -> LedgerEntry:
    return LedgerEntry(
        tenant_id=gw.ctx.tenant_id,
        token_id=gw.ctx.token_id,
        end_user_id=gw.end_user_id,
        request_id=gw.request_id,
        created_at=gw.received_at,
        requested_model=gw.request.model,
        stream=gw.request.stream,
        profile=gw.target.profile,
        budget_status=gw.enforcement.decision,
        own_models=own_models(gw.target),
    )


def own_models(target: Target) -> frozenset[str]:
    """The tenant's own models among those ``target`` may call."""
    chains = [target.chain, *(route.chain for route in target.domain_routes.values())]
    return frozenset(
        spec.name for chain in chains for spec in chain if tenant_models.is_tenant_model(spec)
    )


def ledger_fill(entry: LedgerEntry, result: CascadeResult) -> None:
    entry.attempts = result.attempts
    entry.paid_cost_nanos = result.cost_nanos - sum(a.cost_nanos for a in result.attempts)
    entry.model = result.model.name
    entry.prompt_tokens = result.prompt_tokens
    entry.completion_tokens = result.completion_tokens
    entry.baseline_cost_nanos = result.baseline_cost_nanos
    entry.baseline_method = result.baseline_method
    entry.escalated = result.escalated
    entry.domain = result.domain
    entry.complexity = result.complexity
    entry.quality_score = result.quality_score
    entry.degraded = result.degraded


def ended(
    entry: LedgerEntry,
    status: str,
    http_status: int,
    error_code: str = "",
    *,
    attempts: list[Attempt] | None = None,
    result: CascadeResult | None = None,
) -> LedgerEntry:
    """The row of a request that ended otherwise than answered: refused, failed upstream,
    crashed, or left by its client. Whatever was paid before the end stays on it."""
    if result is not None:
        ledger_fill(entry, result)
    if attempts is not None:
        entry.attempts = list(attempts)
    entry.status, entry.http_status, entry.error_code = status, http_status, error_code
    return entry


def _published(entry: LedgerEntry) -> None:
    live.publish(entry)
    metrics.ledger_recorded(entry)


def _write(
    entry: LedgerEntry,
    ctx: TokenContext,
    enforcement: Enforcement,
    audit: audits.AuditCandidate | None = None,
) -> None:
    """Write the ledger row and settle the budgets, or spool both; never raises.

    The row and the settlement commit together, so counters and ledger agree
    to the nano-dollar. A request that reaches this point has been answered
    (or has failed for good): if the database cannot take the row now, it is
    spooled to disk and written as soon as the database is back (and the
    request is not audited). Then, for a cascade that learns, the audit sample
    is decided; whatever happens there is logged, never raised.
    """
    values = usage_event_values(entry)
    settlement = Settlement.of(tenant_id=ctx.tenant_id, enforcement=enforcement)
    try:
        ledger_write(values=values, settlement=settlement)
    except Exception:
        logger.exception("Ledger write failed for %s; spooling it", entry.request_id)
        _spool(spooled_record(values, settlement), entry.request_id)
        return
    spool = ledger_spool()
    if spool.dirty:  # the database is back: write what this process spooled
        try:
            spool.replay(ledger_replay)
        except Exception:
            logger.exception("Ledger spool replay failed")
    if enforcement.limits:
        try:
            charge_completion(enforcement.limits, completion_tokens=entry.completion_tokens)
        except Exception:  # token accounting is best effort; the answer is delivered
            logger.warning("Could not charge completion tokens of %s", entry.request_id)
    now = timezone.now()
    stale_before = now - timedelta(seconds=settings.CASCADEFLOW_TOKEN_TOUCH_SECONDS)
    if ctx.last_used_at is None or ctx.last_used_at < stale_before:
        try:
            token_touch(token_id=ctx.token_id, now=now, stale_before=stale_before)
            token_used(token_id=ctx.token_id, at=now)
        except DatabaseError:
            logger.warning("Could not record the last use of token %s", ctx.token_id)
    if audit is not None:
        try:
            audits.audit_consider(candidate=audit)
        except Exception:
            logger.exception("Audit sampling failed for %s", entry.request_id)


_record_sync = db(_write)


def _spool(record: dict[str, Any], request_id: str) -> None:
    try:
        ledger_spool().append(record)
    except Exception:
        # Last resort: the record in the log, where an operator can replay it from.
        logger.critical(
            "Spool record of %s could not be written: %s",
            request_id,
            json.dumps(record, default=str),
            exc_info=True,
        )


def audit_candidate(gw: GatewayRequest, entry: LedgerEntry) -> audits.AuditCandidate | None:
    """What sampling needs of a request of a cascade that learns (None otherwise)."""
    learning = gw.target.learning
    if learning is None:
        return None
    responses = {name: _draft_of(response) for name, response in gw.answers.items()}
    if gw.streamed is not None and gw.streamed.model:
        responses[gw.streamed.model] = gw.streamed.draft()
    return audits.AuditCandidate(
        tenant_id=gw.ctx.tenant_id,
        request_id=gw.request_id,
        learning=learning,
        messages=gw.chat.messages,
        params=upstream_params(gw),
        responses=responses,
        attempts=list(entry.attempts),
        served_model=entry.model,
        domain=entry.domain,
        status=entry.status,
        time_zone=gw.ctx.time_zone,
        audit_cap_nanos=gw.ctx.audit_cap_nanos,
        degraded=entry.degraded,
        domain_routed=entry.domain in gw.target.domain_routes,
        opted_out=gw.audit_opt_out,
        end_user_excluded=gw.end_user_audit_excluded,
        query=gw.query,
    )


async def record(gw: GatewayRequest, entry: LedgerEntry) -> None:
    if gw.recorded:
        return
    gw.recorded = True
    gw.ledger = entry
    entry.latency_ms = int((time.perf_counter() - gw.started) * 1000)
    try:
        candidate = audit_candidate(gw, entry)
    except Exception:  # the request's own row comes first
        logger.exception("Could not prepare the audit sample of %s", gw.request_id)
        candidate = None
    # Shielded: a client that disconnects must not cancel its own ledger row.
    with tracing.span("ledger write"):
        await asyncio.shield(_record_sync(entry, gw.ctx, gw.enforcement, candidate))
    _published(entry)
    gw.span.finish(
        span_attributes(gw, entry),
        error=entry.error_code or None if entry.status != UsageStatus.OK else None,
    )


def span_attributes(gw: GatewayRequest, entry: LedgerEntry) -> dict[str, Any]:
    """The request span's story: GenAI conventions, then CascadeFlow's own decisions."""
    if not tracing.enabled():
        return {}
    if isinstance(gw.request, EmbeddingRequest):
        return embedding_span_attributes(gw, entry)
    attributes: dict[str, Any] = {
        "gen_ai.operation.name": "chat",
        "gen_ai.request.model": gw.chat.model,
        "gen_ai.response.model": entry.model or None,
        "gen_ai.usage.input_tokens": sum(a.prompt_tokens for a in entry.attempts),
        "gen_ai.usage.output_tokens": sum(a.completion_tokens for a in entry.attempts),
        "gen_ai.request.max_tokens": gw.chat.max_output_tokens,
        "http.response.status_code": entry.http_status,
        "cascadeflow.request_id": gw.request_id,
        "cascadeflow.status": entry.status,
        "cascadeflow.escalated": entry.escalated,
        "cascadeflow.cost_usd": entry.cost_nanos / 1e9,
        "cascadeflow.saving_usd": max(entry.baseline_cost_nanos - entry.cost_nanos, 0) / 1e9
        if entry.status == UsageStatus.OK
        else 0.0,
        "cascadeflow.profile": entry.profile or None,
        "cascadeflow.domain": entry.domain or None,
        "cascadeflow.budget": entry.budget_status or None,
        "cascadeflow.models_called": entry.models_called,
    }
    if gw.ctx.trace_content:  # the tenant turned content capture on
        attributes["gen_ai.prompt"] = json.dumps(gw.chat.messages, default=str)[:16_000]
    return attributes


def embedding_span_attributes(gw: GatewayRequest, entry: LedgerEntry) -> dict[str, Any]:
    request = gw.request
    assert isinstance(request, EmbeddingRequest)
    attributes: dict[str, Any] = {
        "gen_ai.operation.name": request.operation,
        "gen_ai.request.model": request.model,
        "gen_ai.response.model": entry.model or None,
        "gen_ai.usage.input_tokens": entry.prompt_tokens,
        "gen_ai.request.encoding_formats": [request.encoding_format],
        "gen_ai.embeddings.dimension.count": request.dimensions,
        "http.response.status_code": entry.http_status,
        "cascadeflow.request_id": gw.request_id,
        "cascadeflow.status": entry.status,
        "cascadeflow.cost_usd": entry.cost_nanos / 1e9,
        "cascadeflow.budget": entry.budget_status or None,
        "cascadeflow.inputs": len(request.inputs),
    }
    if gw.ctx.trace_content:  # the tenant turned content capture on
        attributes["gen_ai.prompt"] = json.dumps(request.inputs)[:16_000]
    return attributes


def gateway_error_of(exc: UpstreamError) -> GatewayError:
    failure = exc.failure
    if not failure.retryable:
        return GatewayError(failure.status, failure.message, code=failure.code)
    return GatewayError(failure.status, str(exc), type="api_error", code=failure.code)


async def _fail(
    gw: GatewayRequest, entry: LedgerEntry, exc: UpstreamError, attempts: list[Attempt]
) -> GatewayError:
    error = gateway_error_of(exc)
    ended(entry, UsageStatus.UPSTREAM_ERROR, error.status, error.code or "", attempts=attempts)
    await record(gw, entry)
    error.headers.update(
        cascade_headers(
            model="",
            escalated=False,
            cost_nanos=entry.cost_nanos,
            savings_nanos=0,
            profile=gw.target.profile,
        )
    )
    return error


async def _crashed(gw: GatewayRequest, entry: LedgerEntry, attempts: list[Attempt]) -> GatewayError:
    """An unexpected failure after admission: the row (with what was paid) is still written."""
    logger.exception("Unhandled error in request %s", gw.request_id)
    error = internal_error(gw.request_id)
    ended(entry, UsageStatus.INTERNAL_ERROR, error.status, error.code or "", attempts=attempts)
    await record(gw, entry)
    return error


def upstream_params(gw: GatewayRequest) -> dict[str, Any]:
    return dict(gw.chat.params)


# --- non-streaming ------------------------------------------------------------------


async def complete(gw: GatewayRequest) -> CompletionOutcome:
    entry = ledger_entry(gw)
    agent = gw.agent()
    try:
        result = await agent.run(gw.chat.messages, upstream_params(gw))
        gw.query = result.query
        ledger_fill(entry, result)
        await record(gw, entry)
        body = clean_payload(result.response.model_dump())
    except UpstreamError as exc:
        raise await _fail(gw, entry, exc, list(exc.attempts)) from None
    except Exception:
        if gw.recorded:
            logger.exception("Unhandled error in request %s", gw.request_id)
            raise internal_error(gw.request_id) from None
        raise await _crashed(gw, entry, agent.attempts) from None
    body["model"] = result.model.name
    return CompletionOutcome(
        body=body,
        headers={
            **cascade_headers(
                model=result.model.name,
                escalated=result.escalated,
                cost_nanos=result.cost_nanos,
                savings_nanos=result.savings_nanos,
                profile=gw.target.profile,
            ),
            **gw.enforcement.headers(),
        },
    )


# --- embeddings ---------------------------------------------------------------------


async def embed(gw: GatewayRequest) -> EmbeddingOutcome:
    """One embedding model's vectors, billed like a chat request to one model (its input
    tokens at its input price, no saving), with the same deployments, retries and
    breaker; the answer's ``content`` is OpenAI's JSON body, already encoded."""
    request = gw.request
    assert isinstance(request, EmbeddingRequest)
    entry = ledger_entry(gw)
    spec = gw.target.chain[0]
    attempts: list[Attempt] = []
    try:
        result, attempt = await caller().embed(
            spec, request.upstream_params(), attempts, role="final"
        )
        attempt.decision = "returned"
        entry.attempts = attempts
        entry.model = spec.name
        entry.prompt_tokens = attempt.prompt_tokens
        entry.baseline_cost_nanos = attempt.cost_nanos  # one model: the baseline is itself
        entry.baseline_method = "actual"
        await record(gw, entry)
    except UpstreamError as exc:
        raise await _fail(gw, entry, exc, attempts) from None
    except Exception:
        if gw.recorded:
            logger.exception("Unhandled error in request %s", gw.request_id)
            raise internal_error(gw.request_id) from None
        raise await _crashed(gw, entry, attempts) from None
    write = functools.partial(
        embeddings.content, request, result, model=spec.name, prompt_tokens=entry.prompt_tokens
    )
    # A large answer is encoded off the event loop (millions of numbers take seconds).
    large = embeddings.size(result) > embeddings.LARGE_ANSWER
    return EmbeddingOutcome(
        content=await asyncio.to_thread(write) if large else write(),
        headers={
            **cascade_headers(
                model=spec.name,
                escalated=False,
                cost_nanos=entry.cost_nanos,
                savings_nanos=0,
                profile=gw.target.profile,
            ),
            **gw.enforcement.headers(),
        },
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
    """Judge drafts, then stream the answer (errors before any output are HTTP errors)."""
    entry = ledger_entry(gw)
    agent = gw.agent()
    try:
        cascade = await agent.stream(gw.chat.messages, upstream_params(gw))
        gw.query = cascade.plan.query
    except UpstreamError as exc:
        raise await _fail(gw, entry, exc, list(exc.attempts)) from None
    except Exception:
        raise await _crashed(gw, entry, agent.attempts) from None
    # Headers leave before the answer ends: the cost is not known yet, and saying 0 would
    # be a lie. It is in the stream's last chunk (stream_options.include_usage), in its
    # closing comment, and in the ledger.
    headers = gw.enforcement.headers() | cascade_headers(
        model=cascade.model.name,
        escalated=cascade.escalated or bool(cascade.buffered and cascade.buffered.escalated),
        cost_nanos=None,
        savings_nanos=None,
        profile=gw.target.profile,
    )
    return StreamOutcome(events=_relay(gw, entry, cascade), headers=headers)


def stream_summary(entry: LedgerEntry) -> dict[str, Any]:
    """What a stream says of its ledger row: the ``cascadeflow`` object of its usage chunk.

    Amounts are the row's, in US dollars as decimal strings (nine places: nano-dollars),
    like the ``x-cascade-cost-usd`` header of an answer that is not streamed.
    """
    return {
        "model": entry.model,
        "escalated": entry.escalated,
        "cost_usd": f"{nanos_to_usd(entry.cost_nanos):.9f}",
        "savings_usd": f"{nanos_to_usd(entry.baseline_cost_nanos - entry.cost_nanos):.9f}",
    }


async def _relay(
    gw: GatewayRequest, entry: LedgerEntry, cascade: CascadeStream
) -> AsyncIterator[str]:
    chunks = cascade.chunks()
    if gw.target.learning is not None:
        gw.streamed = StreamedAnswer()
    first = True
    try:
        async for data in chunks:
            if first:
                first = False
                metrics.first_token(cascade.model.name, time.perf_counter() - gw.started)
            if gw.streamed is not None:
                gw.streamed.add(data)
            yield _sse(data)
    except (asyncio.CancelledError, GeneratorExit):
        await chunks.aclose()  # the engine counts what the upstream streamed so far
        ended(
            entry,
            UsageStatus.CLIENT_CLOSED,
            499,
            result=cascade.result,
            attempts=cascade.attempts,
        )
        await record(gw, entry)
        raise
    except Exception:
        # The status line is sent: the stream ends with an error event, never cut short.
        await chunks.aclose()
        if cascade.result is not None:
            ledger_fill(entry, cascade.result)
        error = await _crashed(gw, entry, cascade.attempts)
        yield _sse(error.payload())
        return
    assert cascade.result is not None
    ledger_fill(entry, cascade.result)
    if cascade.failure is not None:
        failure = classify(cascade.failure)
        # The status line (200) is sent: the failure is in the stream and on the row.
        ended(entry, UsageStatus.UPSTREAM_ERROR, entry.http_status, failure.code)
        last = cascade.attempts[-1]
        last.error_code, last.error_message = failure.code, failure.message
        await record(gw, entry)
        yield _sse(
            GatewayError(502, failure.message, type="api_error", code=failure.code).payload()
        )
        return
    await record(gw, entry)
    summary = stream_summary(entry)
    if gw.chat.include_usage:
        # OpenAI's last chunk (no choices, the usage), and the row's cost beside it.
        yield _sse(cascade.usage_chunk(cascadeflow=summary))
    # An SSE comment: ignored by clients, readable by anyone tailing the stream.
    yield f": cascade {json.dumps(summary, separators=(',', ':'))}\n\n"
    yield "data: [DONE]\n\n"
    metrics.stream_finished(gw.route, time.perf_counter() - gw.started)
