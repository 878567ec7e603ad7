"""Admission control for one request: end-user tier, budgets (and their decision).

Runs inside the gateway's preparation step (one database round trip group,
on a pooled thread). Budgets are reserved at the request's worst-case cost:
every model of the chain may answer (draft, escalation, final), each up to
``max_tokens`` or the model's output cap, plus the self-check when paid checks
may run. Degraded, the chain is its cheapest model alone.

An embeddings request is admitted by the same rules (tier, rate limits, budgets);
what differs is its demand: its input tokens only (each input counted alone, as
providers bill them), and a worst case of those tokens at its model's input price.
``prompt_tokens`` and ``worst_case_nanos`` are the one place that difference lives.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from functools import partial

import litellm
from django.conf import settings
from django.db import IntegrityError, transaction

from core import outbox
from core.crypto import decrypt
from core.db import as_datetime
from core.money import nanos_to_usd
from routing.embeddings import EmbeddingRequest
from routing.engine import embeddings as embedding_inputs
from routing.engine.policy import PRESETS
from routing.engine.types import ModelSpec
from routing.errors import GatewayError, forbidden
from routing.schemas import ChatRequest
from routing.targets import Target
from tenants.budgets import (
    Admission,
    BudgetLine,
    Crossing,
    EndUserTierPolicy,
    alerts_record,
    budget_admit,
    budget_settle,
    settle_after_insert,
)
from tenants.callbacks import CallbackDecision, CallbackQuestion, cached_decision
from tenants.enums import BudgetDecision
from tenants.models import Budget, EndUser, Tenant
from tenants.ratelimits import Limit, RateLimited, check_and_hit
from tenants.selectors import TokenContext, budget_lines_of, end_user_tier_of

DEFAULT_OUTPUT_CAP = 4096


@dataclass
class Enforcement:
    tier: EndUserTierPolicy | None = None
    lines: list[BudgetLine] = field(default_factory=list)
    admission: Admission | None = None
    limits: list[Limit] = field(default_factory=list)
    callback: CallbackDecision | None = None
    question: CallbackQuestion | None = None  # the tenant's callback, still to be asked

    @property
    def decision(self) -> str:
        return self.admission.decision if self.admission else ""

    def headers(self) -> dict[str, str]:
        headers = {}
        if self.callback is not None:
            headers["x-cascade-budget-callback"] = self.callback.source
        if self.admission is None or self.admission.decision == BudgetDecision.ALLOW:
            return headers
        return headers | {
            "x-cascade-budget": self.admission.decision,
            "x-cascade-budget-message": self.admission.message.encode("ascii", "replace").decode(),
        }


Request = ChatRequest | EmbeddingRequest


def prompt_tokens(chain: tuple[ModelSpec, ...], request: Request) -> int:
    model = chain[-1].deployments[0].litellm_model
    if isinstance(request, EmbeddingRequest):
        return embedding_inputs.count_tokens(model, request.inputs)
    return litellm.token_counter(model=model, messages=request.messages)


def worst_case_nanos(
    chain: tuple[ModelSpec, ...], request: Request, preset: str, prompt: int | None = None
) -> int:
    """The most this request can cost on ``chain`` (integer nano-dollars, rounded up per call)."""
    if not chain:
        return 0
    if prompt is None:
        prompt = prompt_tokens(chain, request)
    if isinstance(request, EmbeddingRequest):  # one model, input tokens only
        return sum(model.price.cost_nanos(prompt, 0) + 1 for model in chain)
    chat = request
    n = chat.params.get("n") or 1
    total = 0
    for model in chain:
        cap = chat.max_output_tokens or model.max_output_tokens or DEFAULT_OUTPUT_CAP
        total += model.price.cost_nanos(prompt, cap * n) + 1
    if len(chain) > 1 and PRESETS[preset].paid_checks != "never":
        first = chain[0]
        cap = chat.max_output_tokens or first.max_output_tokens or DEFAULT_OUTPUT_CAP
        samples = 1 + PRESETS[preset].agreement_samples
        total += samples * first.price.cost_nanos(prompt + cap + 64, cap) + samples
    return total


def admit(
    *,
    ctx: TokenContext,
    request: Request,
    target: Target,
    end_user: EndUser | None,
    request_id: str,
    now: datetime,
) -> tuple[Target, Enforcement]:
    """Apply the end user's tier and the budgets; return the (possibly degraded) target.

    Raises a 403 for a model the tier does not allow and a 402 when a budget blocks.
    """
    enforcement = Enforcement()
    if ctx.has_end_user_tiers:
        enforcement.tier = end_user_tier_of(tenant_id=ctx.tenant_id, end_user=end_user)
        allowed = enforcement.tier.allowed_models if enforcement.tier else ()
        if allowed and target.name not in allowed:
            raise forbidden(
                f"The '{enforcement.tier.slug}' tier does not allow '{target.name}'.",
                code="model_not_allowed",
            )
    enforcement.limits = rate_limits(ctx, enforcement.tier, end_user)
    prompt: int | None = None
    if enforcement.limits:
        if any(limit.tokens_per_minute for limit in enforcement.limits):
            prompt = prompt_tokens(target.chain, request)
        check_and_hit(enforcement.limits, prompt_tokens=prompt or 0)
    if not ctx.has_budgets:
        return target, enforcement
    lines = partial(
        budget_lines_of,
        tenant_id=ctx.tenant_id,
        token_id=ctx.token_id,
        token_label=ctx.token_mask,
        end_user=end_user,
        tier=enforcement.tier,
    )
    enforcement.lines = lines()
    if not enforcement.lines:
        return target, enforcement
    if prompt is None:
        prompt = prompt_tokens(target.chain, request)
    full = worst_case_nanos(target.chain, request, target.preset, prompt)
    cheap = worst_case_nanos(target.chain[:1], request, target.preset, prompt)
    reserve = partial(
        budget_admit,
        tenant_id=ctx.tenant_id,
        time_zone=ctx.time_zone,
        request_id=request_id,
        worst_case_nanos=full,
        degraded_worst_case_nanos=cheap,
        now=now,
        ttl=timedelta(seconds=settings.CASCADEFLOW_RESERVATION_TTL),
    )
    try:
        admission = reserve(lines=enforcement.lines)
    except IntegrityError:
        # A cached line of a budget deleted in the last second: its counter cannot be
        # created. The statement changed nothing; read the lines again and reserve.
        enforcement.lines = lines(fresh=True)
        if not enforcement.lines:
            return target, enforcement
        admission = reserve(lines=enforcement.lines)
    enforcement.admission = admission
    if ctx.budget_callback_url and admission.decision != BudgetDecision.BLOCK:
        question = _callback_question(ctx, enforcement, target, end_user, request_id)
        answer = cached_decision(question.cache_key)
        if answer is not None:
            apply_callback(enforcement, answer)
        else:
            enforcement.question = question  # asked by the gateway, on the event loop
    if admission.decision == BudgetDecision.DEGRADE:
        target = degraded(target)
    return target, enforcement


def _callback_question(
    ctx: TokenContext,
    enforcement: Enforcement,
    target: Target,
    end_user: EndUser | None,
    request_id: str,
) -> CallbackQuestion:
    """What to ask the tenant's callback about this request (read here, asked on the loop)."""

    admission = enforcement.admission
    assert admission is not None
    tenant = Tenant.objects.get(pk=ctx.tenant_id)
    context = {
        "tenant": ctx.tenant_slug,
        "request_id": request_id,
        "end_user": end_user.external_id if end_user else None,
        "tier": enforcement.tier.slug if enforcement.tier else None,
        "model": target.name,
        "decision": admission.decision,
        "forecast": None,
        "budgets": [
            {
                "scope": s.line.scope,
                "budget": s.line.label,
                "period": s.line.period,
                "spent_usd": str(nanos_to_usd(s.spent_nanos)),
                "reserved_usd": str(nanos_to_usd(s.reserved_nanos)),
                "limit_usd": str(nanos_to_usd(s.line.limit_nanos)),
                "remaining_usd": str(nanos_to_usd(max(s.line.cap_nanos - s.used_nanos, 0))),
                "resets_at": s.period_end.isoformat() if s.period_end else None,
            }
            for s in admission.states
        ],
    }
    return CallbackQuestion(
        tenant_id=ctx.tenant_id,
        url=tenant.budget_callback_url,
        secret=decrypt(tenant.budget_callback_secret),
        timeout_ms=tenant.budget_callback_timeout_ms,
        fallback=tenant.budget_callback_fallback,
        cache_seconds=tenant.budget_callback_cache_seconds,
        cache_key=":".join(
            [
                "cf:cb-decision",
                str(ctx.tenant_id),
                str(end_user.pk if end_user else "-"),
                admission.decision,
            ]
        ),
        context=context,
    )


def apply_callback(enforcement: Enforcement, answer: CallbackDecision) -> None:
    """Let the tenant's answer make the decision stricter (never looser).

    A block leaves the reservation held: the caller settles it at zero with
    the request's ledger row, in one transaction.
    """
    admission = enforcement.admission
    assert admission is not None
    enforcement.callback = answer
    enforcement.question = None
    if BudgetDecision.severity(answer.decision) > BudgetDecision.severity(admission.decision):
        admission.decision = answer.decision
        admission.override_message = answer.message or "Refused by the account's budget policy."


def degraded(target: Target) -> Target:
    """Cheap models only, no escalation, no domain detours to stronger chains (nor audits)."""
    return dataclasses.replace(target, chain=target.chain[:1], domain_routes={}, learning=None)


def rate_limits(
    ctx: TokenContext, tier: EndUserTierPolicy | None, end_user: EndUser | None
) -> list[Limit]:
    limits = []
    if ctx.tenant_rpm or ctx.tenant_tpm:
        limits.append(
            Limit("tenant", f"t{ctx.tenant_id}", ctx.tenant_rpm, ctx.tenant_tpm, "the tenant")
        )
    if ctx.token_rpm or ctx.token_tpm:
        limits.append(
            Limit(
                "token",
                f"k{ctx.token_id}",
                ctx.token_rpm,
                ctx.token_tpm,
                f"API key {ctx.token_mask}",
            )
        )
    if (
        end_user is not None
        and tier is not None
        and (tier.requests_per_minute or tier.tokens_per_minute)
    ):
        limits.append(
            Limit(
                "end_user",
                f"u{end_user.pk}",
                tier.requests_per_minute,
                tier.tokens_per_minute,
                f"end user '{end_user.external_id}' (tier '{tier.slug}')",
            )
        )
    return limits


def rate_limited_error(exc: RateLimited) -> GatewayError:
    return GatewayError(
        429,
        str(exc),
        type="rate_limit_error",
        code="rate_limit_exceeded",
        headers={"Retry-After": str(exc.retry_after)},
    )


def blocked_error(enforcement: Enforcement) -> GatewayError:
    assert enforcement.admission is not None
    return GatewayError(
        402,
        enforcement.admission.message,
        type="insufficient_quota",
        code="budget_exceeded",
        headers=enforcement.headers(),
    )


@dataclass(frozen=True)
class Settlement:
    """What settling one request needs, as plain data: it is spooled with the ledger row
    when the database cannot take it, and applied when it can."""

    tenant_id: int
    reservation_key: str | None = None
    counter_ids: tuple[int, ...] = ()
    lines: tuple[BudgetLine, ...] = ()
    # The threshold the request was admitted past (warn / degrade), which must have its alert.
    tripped: Crossing | None = None

    @classmethod
    def of(cls, *, tenant_id: int, enforcement: Enforcement) -> Settlement:
        admission = enforcement.admission
        if admission is None or admission.reservation_key is None:
            return cls(tenant_id)
        tripped = None
        # The alert names the threshold spend reached, which is less than the decision when
        # a worst case that did not fit decided it (a degrade at 84 % is no degrade alert).
        level = admission.threshold_level
        alerting = (BudgetDecision.WARN, BudgetDecision.DEGRADE)
        if admission.decision in alerting and level in alerting:
            state = admission.tripped
            tripped = Crossing(
                state.line.budget_id,
                state.line.subject_id,
                state.period_start,
                level,
                state.spent_nanos,  # before this request; its cost is added when settled
                state.line.limit_nanos,
            )
        return cls(
            tenant_id,
            admission.reservation_key,
            tuple(state.counter_id for state in admission.states),
            tuple(enforcement.lines),
            tripped,
        )

    def as_dict(self) -> dict:
        data = dataclasses.asdict(self)
        if self.tripped is not None:
            data["tripped"]["period_start"] = self.tripped.period_start.isoformat()
        return data

    @classmethod
    def from_dict(cls, data: dict) -> Settlement:
        tripped = data.get("tripped")
        return cls(
            tenant_id=data["tenant_id"],
            reservation_key=data.get("reservation_key"),
            counter_ids=tuple(data.get("counter_ids") or ()),
            lines=tuple(BudgetLine(**line) for line in data.get("lines") or ()),
            tripped=Crossing(**{**tripped, "period_start": as_datetime(tripped["period_start"])})
            if tripped
            else None,
        )


def settle(*, settlement: Settlement, actual_nanos: int) -> list[int]:
    """Settle the request's reservation; return the ids of new alerts.

    Call inside the ledger row's transaction.
    """
    if settlement.reservation_key is None:
        return []
    crossings = budget_settle(
        request_id=settlement.reservation_key,
        actual_nanos=actual_nanos,
        lines=list(settlement.lines),
        counter_ids_hint=list(settlement.counter_ids),
    )
    tripped = settlement.tripped
    if tripped is not None and Budget.objects.filter(pk=tripped.budget_id).exists():
        # The request ran while past a threshold: make sure that threshold has its alert
        # (unless the budget was deleted since: an alert of no budget would fail the commit).
        crossings.append(
            dataclasses.replace(tripped, spent_nanos=tripped.spent_nanos + actual_nanos)
        )
    alert_ids = alerts_record(tenant_id=settlement.tenant_id, crossings=crossings)
    _deliver_after_commit(alert_ids)
    return alert_ids


def settle_with_row(
    *, insert: tuple[str, list], settlement: Settlement, actual_nanos: int, now: datetime
) -> list[int]:
    """PostgreSQL: write the request's row (``insert``, conflicts ignored) and, if it is
    new, settle its reservation and record its alerts, all in one statement (see
    ``tenants.budgets.settle_after_insert``). Returns the ids of new alerts."""
    assert settlement.reservation_key is not None
    alert_ids = settle_after_insert(
        insert=insert,
        request_id=settlement.reservation_key,
        actual_nanos=actual_nanos,
        lines=list(settlement.lines),
        counter_ids=list(settlement.counter_ids),
        tenant_id=settlement.tenant_id,
        tripped=settlement.tripped,
        now=now,
    )
    _deliver_after_commit(alert_ids)
    return alert_ids


def _deliver_after_commit(alert_ids: list[int]) -> None:
    if not alert_ids:
        return
    from tenants.tasks import budget_alerts_deliver  # noqa: PLC0415 - tenants.tasks imports the services of every app

    # Off the request's thread: a broker that is down or silent must not hold an
    # answered request; undelivered alerts are swept up by beat.
    transaction.on_commit(lambda: outbox.send_soon(budget_alerts_deliver, alert_ids))
