"""Audits: a sampled share of cascade requests answered again, every draft labelled.

A cascade that learns (``routing.targets.Learning``) has some of its requests
**audited**: every model of the chain that did not answer the request is asked
now (the reference included), and each draft is labelled against the reference's
answer (``routing.engine.audit``: agreement of extracted answers; otherwise a
judge asked in both orders; with no judge, a disagreement is worse). The labels
are ``Observation``s (``routing.engine.learning``): what certifies the profile's
next calibration (``routing.calibrations``) and measures what it serves.

Sampling (``audit_consider``, on the request path right after its ledger row):
a uniform coin with probability ``learning.audit_rate`` (every request while the
profile has few labels, then its floor). Never sampled: a request of a tenant or
profile with audits off, of an end user excluded from audits, sent with
``X-CascadeFlow-Audit: off``, answered by one model (or degraded, or routed by
domain to another chain, or with several choices), or whose tenant has spent its
monthly audit cap. A request that escalated to the reference anyway and was not
sampled is labelled on the spot by agreement alone, with no model call: a
*non-uniform* label, used only to fit scorers. A request whose draft was served
(or that escalated with nothing to compare) keeps its drafts' checks with no
label: a *router row*. The router learns from both kinds alike (whether a
draft's score would pass a threshold needs no label); were it to learn from the
escalated requests alone, every draft it saw would be one that failed, and it
would route past drafts that pass. Both are taken from every eligible request
while the profile has fewer than ``NONUNIFORM_FULL`` of them, then from one in
ten, so their mix is the traffic's.

Invariants:

- An audit never affects the request it audits: sampling runs after the ledger
  row is written and its errors are logged, never raised; the audit runs in a
  Celery task.
- Once: at most one ``Audit`` per request (a unique constraint); a run claims its
  row (a conditional update with a lease), so a task sent twice (by the request
  and by the sweeper) labels once.
- Money: an audit's model and judge calls are one ledger row (``kind`` audit,
  ``request_id`` ``audit_<id>``), admitted like a request against the tenant's
  tenant-wide budgets at its worst case and settled with that row. An audit a
  budget would block or degrade is skipped, not run; so is one that would take
  the month's audit spend (from the ledger) past the tenant's cap.
- Privacy: the request's texts live in ``payload`` only while the audit is
  pending; every final state empties it.
- Durable: the row is the audit's record, the task message its fast path; the
  sweeper (``audits_due``) sends again what a lost message or a failed run left,
  with backoff, a bounded number of times, and gives up on day-old audits.
"""

from __future__ import annotations

import asyncio
import contextvars
import json
import logging
import math
import secrets
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from enum import StrEnum
from typing import Any

import litellm
from asgiref.sync import SyncToAsync, async_to_sync
from django.conf import settings
from django.db import IntegrityError, transaction
from django.db.models import F, Q
from django.utils import timezone

from core import outbox
from core.db import retry_transient
from routing.enforcement import DEFAULT_OUTPUT_CAP, Enforcement, Settlement, settle
from routing.engine import learning, tracing
from routing.engine.agent import _draft_of, draft_params
from routing.engine.audit import (
    combine,
    extraction_verdict,
    judge_messages,
    parse_judgement,
    served_losses,
)
from routing.engine.complexity import QueryProfile, profile_query, query_text
from routing.engine.learning import Observation, StepLabel, Verdict
from routing.engine.policy import PRESETS
from routing.engine.resilience import Caller, UpstreamError
from routing.engine.signals import Draft, extract
from routing.engine.types import Attempt, ModelSpec
from routing.enums import AuditKind, AuditSkip, AuditStatus, UsageKind, UsageStatus
from routing.models import Audit, ProfileLearning, RoutingProfile
from routing.platform_models import model_catalog
from routing.selectors import (
    PROFILE_PREFIX,
    audit_spend_this_month,
    audit_spend_this_month_cached,
)
from routing.services import LedgerEntry, ledger_write, reservation_release, usage_event_values
from routing.targets import Learning, allowed_models, chain_key
from tenants.budgets import applicable_budgets, budget_admit
from tenants.enums import BudgetDecision, BudgetScope
from tenants.models import Tenant

logger = logging.getLogger(__name__)

REFIT_EVERY = 25  # uniform labels between refits, at least ...
REFIT_GROWTH = 0.10  # ... or this share of the labels the last refit had
NONUNIFORM_FULL = 2000  # non-uniform labels and router rows: from every eligible request, then ...
NONUNIFORM_AFTER = 0.10  # ... from this share of them
LEASE = timedelta(minutes=10)  # longer than the task's time limit
MAX_RUNS = 4
MAX_AGE = timedelta(days=1)
JUDGE_MAX_TOKENS = 16
JUDGE_PROMPT_TOKENS = 120  # the judge's instructions and framing, beyond the two answers

_coin = secrets.SystemRandom()


class Sampling(StrEnum):
    """What sampling decided for one request."""

    OPTED_OUT = "opted_out"  # X-CascadeFlow-Audit: off
    END_USER_EXCLUDED = "end_user_excluded"
    NOT_AUDITABLE = "not_auditable"  # failed, degraded, several choices, another chain
    CAP_REACHED = "cap_reached"
    SAMPLED = "sampled"  # a uniform audit is pending
    LABELLED = "labelled"  # a non-uniform label was stored
    ROUTER_ROW = "router_row"  # the drafts' checks were kept for the router, unlabelled
    NOT_SAMPLED = "not_sampled"


# --- answers ---------------------------------------------------------------------------


def answer_json(draft: Draft, cost_nanos: int) -> dict[str, Any]:
    return {
        "content": draft.content,
        "tool_calls": draft.tool_calls,
        "finish_reason": draft.finish_reason,
        "cost_nanos": cost_nanos,
    }


def _draft(answer: dict[str, Any]) -> Draft:
    return Draft(
        content=answer.get("content") or "",
        finish_reason=answer.get("finish_reason"),
        tool_calls=list(answer.get("tool_calls") or []),
    )


def _judge_text(draft: Draft) -> str:
    """An answer as the judge reads it: its text, and its tool calls if any."""
    if not draft.tool_calls:
        return draft.content
    calls = [
        [(c.get("function") or {}).get("name"), (c.get("function") or {}).get("arguments")]
        for c in draft.tool_calls
    ]
    return f"{draft.content}\n(tool calls: {json.dumps(calls)})".strip()


@dataclass
class AuditCandidate:
    """A cascade request whose ledger row was just written, as the gateway saw it."""

    tenant_id: int
    request_id: str
    learning: Learning
    messages: list[dict[str, Any]]
    params: dict[str, Any]
    responses: dict[str, Draft]  # the answers produced, by model
    attempts: list[Attempt]
    served_model: str
    domain: str
    status: str
    time_zone: str = "UTC"
    audit_cap_nanos: int = 0
    degraded: bool = False
    domain_routed: bool = False
    opted_out: bool = False
    end_user_excluded: bool = False
    # The profile the cascade made of the query (None: profiled here). Profiling a long
    # query costs up to a millisecond; the request path does it once.
    query: QueryProfile | None = None

    def profile(self) -> QueryProfile:
        if self.query is not None and self.query.domain:  # not QueryProfile.unjudged()
            return self.query
        return profile_query(query_text(self.messages))

    def costs(self) -> dict[str, int]:
        """What each model's answer cost (its successful draft or final call)."""
        costs: dict[str, int] = {}
        for a in self.attempts:
            if a.status == "ok" and a.role in ("draft", "final"):
                costs[a.model] = costs.get(a.model, 0) + a.cost_nanos
        return costs

    def checks(self) -> dict[str, dict[str, Any]]:
        """Each draft's quality check: the features it was judged on, and a hard failure."""
        return {
            a.model: {"features": dict(a.check.features), "hard_fail": bool(a.check.hard_fail)}
            for a in self.attempts
            if a.status == "ok" and a.check is not None
        }

    def auditable(self) -> bool:
        chain = self.learning.chain
        if self.status != UsageStatus.OK or self.degraded or self.domain_routed:
            return False
        if (self.params.get("n") or 1) != 1 or self.served_model not in chain:
            return False
        if self.params.get("tools"):
            catalog = model_catalog()
            specs = [catalog.get(name) for name in chain]
            return all(spec is not None and spec.supports_tools for spec in specs)
        return True

    def drafted(self) -> bool:
        """Whether the chain's first model drafted an answer that was checked (not routed
        past, not failed): what the router learns from."""
        first = self.learning.chain[0]
        return any(
            a.model == first and a.status == "ok" and a.check is not None for a in self.attempts
        )

    def escalated_to_reference(self) -> bool:
        chain = self.learning.chain
        return (
            self.served_model == chain[-1] == self.learning.reference_model
            and chain[-1] in self.responses
            and any(name in self.responses for name in chain[:-1])
        )


# --- sampling (the request path) ---------------------------------------------------------


def audit_consider(
    *,
    candidate: AuditCandidate,
    now: datetime | None = None,
    coin: Callable[[], float] | None = None,
) -> Sampling:
    """Decide whether to audit a cascade request whose ledger row is written; store it.

    Cheap: no query unless the coin says audit (then the month's audit spend, cached
    a minute, and one insert) or the request is kept as a non-uniform row, a label by
    agreement or a router row (one insert, one update; every drafted request until the
    profile has ``NONUNIFORM_FULL`` of them, then one in ten).
    """
    flip = coin or _coin.random
    now = now or timezone.now()
    if candidate.opted_out:
        return Sampling.OPTED_OUT
    if candidate.end_user_excluded:
        return Sampling.END_USER_EXCLUDED
    if not candidate.auditable():
        return Sampling.NOT_AUDITABLE
    state = candidate.learning
    decision = Sampling.NOT_SAMPLED
    if flip() < learning.audit_rate(state.uniform_labels, floor=state.floor, settled=state.settled):
        spent = audit_spend_this_month_cached(
            tenant_id=candidate.tenant_id, time_zone=candidate.time_zone, now=now
        )
        if spent >= candidate.audit_cap_nanos:
            decision = Sampling.CAP_REACHED
        else:
            _audit_create(candidate, now)
            return Sampling.SAMPLED
    if candidate.drafted() and (
        state.nonuniform_labels + state.router_rows < NONUNIFORM_FULL or flip() < NONUNIFORM_AFTER
    ):
        return _keep_nonuniform(candidate, now) or decision
    return decision


def audit_row(candidate: AuditCandidate, now: datetime, **values: Any) -> Audit:
    """The audit row of a sampled (or agreement-labelled) request, not saved."""
    state = candidate.learning
    return Audit(
        tenant_id=candidate.tenant_id,
        request_id=candidate.request_id,
        profile=state.profile,
        created_at=now,
        chain=list(state.chain),
        chain_key=chain_key(state.chain),
        reference_model=state.reference_model,
        judge_model=state.judge_model,
        calibration_version_id=state.version_id,
        domain=candidate.domain,
        served_model=candidate.served_model,
        **values,
    )


def audit_payload(candidate: AuditCandidate) -> dict[str, Any]:
    """What a pending audit keeps of its request: messages, parameters, the answers
    already produced (with what each cost) and each draft's quality check."""
    costs = candidate.costs()
    return {
        "messages": candidate.messages,
        "params": candidate.params,
        "answers": {
            name: answer_json(draft, costs.get(name, 0))
            for name, draft in candidate.responses.items()
        },
        "drafts": candidate.checks(),
    }


def _audit_create(candidate: AuditCandidate, now: datetime) -> Audit | None:
    from routing.tasks import audit_run  # noqa: PLC0415 - routing.tasks imports this module

    audit = audit_row(candidate, now, status=AuditStatus.PENDING, payload=audit_payload(candidate))
    try:
        with transaction.atomic():
            audit.save(force_insert=True)
            # Off the request's thread: a broker that is down must not hold the answer;
            # a message lost here is sent again by the sweeper.
            transaction.on_commit(lambda: outbox.send_soon(audit_run, audit.pk))
    except IntegrityError:  # this request has its audit already
        return None
    return audit


def _keep_nonuniform(candidate: AuditCandidate, now: datetime) -> Sampling | None:
    """Keep a drafted request outside the uniform sample, to train on (no model call).

    Escalated to the reference: each draft labelled by agreement with its answer (no
    judge here: a disagreement is the conservative reading, worse), a label by
    agreement. A served draft, or nothing to compare: the drafts' checks with no
    label, a router row. None when the request has its row already.
    """
    chain = candidate.learning.chain
    query = candidate.profile()
    reference = candidate.responses[chain[-1]] if candidate.escalated_to_reference() else None
    costs, checks = candidate.costs(), candidate.checks()
    steps = []
    for name in chain[:-1]:
        draft, check = candidate.responses.get(name), checks.get(name)
        if check is None:
            steps.append(StepLabel({}, None))
            continue
        verdict = None
        if reference is not None and draft is not None:
            verdict, comparable = extraction_verdict(draft, reference, candidate.params, query)
            if verdict is None and comparable:
                verdict = Verdict.WORSE
        steps.append(StepLabel(check["features"], verdict, check["hard_fail"], costs.get(name, 0)))
    observation = Observation(
        key=candidate.request_id,
        steps=tuple(steps),
        pre=learning.pre_features(query),
        # 0 for a model that was not asked: its cost is unknown (the router's break-even
        # is read from the requests that asked it).
        reference_cost_nanos=costs.get(chain[-1], 0),
        next_cost_nanos=tuple(costs.get(name, 0) for name in chain[1:]),
        uniform=False,
    )
    labelled = learning.labelled(observation)
    kind = AuditKind.AGREEMENT if labelled else AuditKind.ROUTER
    if not _store_nonuniform(candidate, now, observation, kind):
        return None
    return Sampling.LABELLED if labelled else Sampling.ROUTER_ROW


def _store_nonuniform(
    candidate: AuditCandidate, now: datetime, observation: Observation, kind: AuditKind
) -> bool:
    audit = audit_row(
        candidate,
        now,
        kind=kind,
        status=AuditStatus.DONE,
        observation=learning.observation_to_json(observation),
        finished_at=now,
    )
    try:
        with transaction.atomic():
            audit.save(force_insert=True)
            _count_label(audit, now)
    except IntegrityError:
        return False
    return True


def _count_label(audit: Audit, now: datetime) -> bool:
    """Count a label (or a router row) on its profile's learning state; True when a refit
    is due.

    The counts are of one chain: a label of another chain, newer than the counts,
    starts them over; a late label of an older one is not counted.
    """
    key = audit.chain_key
    increments: dict[str, Any]
    if audit.uniform:
        increments = {
            "uniform_labels": F("uniform_labels") + 1,
            "labels_since_refit": F("labels_since_refit") + 1,
        }
    elif audit.kind == AuditKind.AGREEMENT:
        increments = {"nonuniform_labels": F("nonuniform_labels") + 1}
    else:
        increments = {"router_rows": F("router_rows") + 1}
    rows = ProfileLearning.objects.filter(
        tenant_id=audit.tenant_id, profile=audit.profile, chain_key=key
    )
    if not rows.update(**increments):
        with transaction.atomic():
            state, _ = ProfileLearning.objects.select_for_update().get_or_create(
                tenant_id=audit.tenant_id, profile=audit.profile
            )
            if state.chain_key != key:
                if state.chain_since is not None and audit.created_at < state.chain_since:
                    return False
                state.chain_key, state.chain_since = key, audit.created_at
                state.uniform_labels = state.nonuniform_labels = state.router_rows = 0
                state.labels_since_refit = state.labels_at_refit = 0
                state.save()
            rows.update(**increments)
    if not audit.uniform:
        return False
    since, at_refit = rows.values_list("labels_since_refit", "labels_at_refit").get()
    return since >= max(REFIT_EVERY, math.ceil(REFIT_GROWTH * at_refit))


# --- running an audit (the Celery task) --------------------------------------------------


class ReferenceFailed(Exception):
    """The reference model could not answer: nothing can be labelled now; try again later."""


class LeaseLost(Exception):
    pass


@dataclass(frozen=True)
class AuditPlan:
    chain: tuple[ModelSpec, ...]
    reference: ModelSpec
    judge: ModelSpec | None


@dataclass
class Labelled:
    observation: Observation
    served_verdict: Verdict | None
    served_loss: float | None
    attempts: list[Attempt] = field(default_factory=list)


def audit_run(*, audit_id: int, caller: Caller, now: datetime | None = None) -> str:
    """Run one audit: claim it, check it may spend, ask, label, record. Returns its outcome.

    Traced (tracing on) as its own ``audit`` span, with the audited request's id: the
    reference's and the judge's calls are its children."""
    with tracing.span("audit", {"cascadeflow.audit_id": audit_id}) as span:
        outcome = _audit_run(audit_id, caller, now or timezone.now(), span)
        span.set_attribute("cascadeflow.audit.outcome", str(outcome))
        return outcome


def _audit_run(audit_id: int, caller: Caller, now: datetime, span: Any) -> str:
    audit = _claim(audit_id, now)
    if audit is None:
        return "not claimed"
    span.set_attributes(
        {"cascadeflow.request_id": audit.request_id, "cascadeflow.profile": audit.profile}
    )
    plan = audit_plan(audit)
    if isinstance(plan, AuditSkip):
        return _skip(audit, plan, now)
    tenant = audit.tenant
    worst = worst_case_nanos(audit, plan)
    spent = audit_spend_this_month(tenant_id=tenant.pk, time_zone=tenant.time_zone, now=now)
    if spent + worst > tenant.audit_monthly_cap_nanos:
        return _skip(audit, AuditSkip.CAP_REACHED, now)
    settlement = _admit(audit, tenant, worst, now)
    if settlement is None:
        return _skip(audit, AuditSkip.BUDGET, now)
    try:
        labelled = run_async(label, audit, plan, caller)
    except ReferenceFailed as exc:
        _release(settlement)
        return _retry_later(audit, exc, timezone.now())
    except BaseException as exc:
        _release(settlement)
        _retry_later(audit, exc, timezone.now())
        raise
    try:
        _finish(audit, labelled, settlement, timezone.now())
    except LeaseLost:
        _release(settlement)
        return "lease lost"
    except BaseException as exc:  # nothing was recorded: the calls are made again later
        _release(settlement)
        _retry_later(audit, exc, timezone.now())
        raise
    return AuditStatus.DONE


def _claim(audit_id: int, now: datetime) -> Audit | None:
    claimable = Q(status=AuditStatus.PENDING) | Q(status=AuditStatus.RUNNING, running_until__lt=now)
    if not Audit.objects.filter(
        claimable, pk=audit_id, kind=AuditKind.AUDIT, runs__lt=MAX_RUNS
    ).update(status=AuditStatus.RUNNING, running_until=now + LEASE, runs=F("runs") + 1):
        return None
    return Audit.objects.select_related("tenant", "tenant__tier").get(pk=audit_id)


def audit_plan(audit: Audit) -> AuditPlan | AuditSkip:
    """The models an audit asks, or why it cannot run (audits off, a profile or model gone)."""
    tenant = audit.tenant
    if not tenant.audits_enabled:
        return AuditSkip.AUDITS_OFF
    short = audit.profile.removeprefix(PROFILE_PREFIX)
    profile = RoutingProfile.objects.filter(tenant=tenant, name=short).first()
    if profile is None and short not in PRESETS:
        return AuditSkip.PROFILE_CHANGED
    if profile is not None and not profile.audits_enabled:
        return AuditSkip.AUDITS_OFF
    allowed = allowed_models(
        tenant_allowed=tuple(tenant.allowed_models or ()),
        tier_allowed=tuple((tenant.tier.allowed_models if tenant.tier else None) or ()),
    )
    needed = [*audit.chain, audit.reference_model, *([audit.judge_model] * bool(audit.judge_model))]
    if len(audit.chain) < 2 or any(name not in allowed for name in needed):
        return AuditSkip.MODEL_UNAVAILABLE
    return AuditPlan(
        chain=tuple(allowed[name] for name in audit.chain),
        reference=allowed[audit.reference_model],
        judge=allowed[audit.judge_model] if audit.judge_model else None,
    )


def _labels_needed(plan: AuditPlan) -> list[ModelSpec]:
    """The answers labelled against the reference: every draft, and the chain's last
    model's when the reference is another model."""
    drafts = list(plan.chain[:-1])
    if plan.reference.name != plan.chain[-1].name:
        drafts.append(plan.chain[-1])
    return drafts


def _prompt_tokens(spec: ModelSpec, messages: list[dict[str, Any]]) -> int:
    try:
        return int(
            litellm.token_counter(model=spec.deployments[0].litellm_model, messages=messages)
        )
    except Exception:  # an estimate is enough for a reservation
        return len(json.dumps(messages)) // 2 + 16


def worst_case_nanos(audit: Audit, plan: AuditPlan) -> int:
    """The most an audit can cost: every model it asks, at its output cap, and two judge
    calls per label (rounded up per call, as requests' reservations are)."""
    payload = audit.payload or {}
    answers = payload.get("answers") or {}
    params = payload.get("params") or {}
    prompt = _prompt_tokens(plan.reference, payload.get("messages") or [])
    requested = params.get("max_completion_tokens") or params.get("max_tokens")

    def cap(spec: ModelSpec) -> int:
        return int(requested or spec.max_output_tokens or DEFAULT_OUTPUT_CAP)

    models = {spec.name: spec for spec in (*plan.chain, plan.reference)}
    total = sum(
        spec.price.cost_nanos(prompt, cap(spec)) + 1
        for name, spec in models.items()
        if name not in answers
    )
    if plan.judge is not None:
        longest = max(cap(spec) for spec in models.values())
        judge_prompt = prompt + 2 * longest + JUDGE_PROMPT_TOKENS
        calls = 2 * len(_labels_needed(plan))
        total += calls * (plan.judge.price.cost_nanos(judge_prompt, JUDGE_MAX_TOKENS) + 1)
    return total


def _admit(audit: Audit, tenant: Tenant, worst: int, now: datetime) -> Settlement | None:
    """Reserve the audit's worst case on the tenant-wide budgets; None if one refuses it."""
    lines = [
        line
        for line in applicable_budgets(
            tenant_id=tenant.pk,
            token_id=None,
            token_label="",
            end_user_id=None,
            end_user_label="",
            tier=None,
        )
        if line.scope == BudgetScope.TENANT
    ]
    if not lines:
        return Settlement(tenant.pk)
    admission = budget_admit(
        tenant_id=tenant.pk,
        time_zone=tenant.time_zone,
        lines=lines,
        # One reservation per run: a run that died leaves its own to expire.
        request_id=f"audit_{audit.pk}_{audit.runs}",
        worst_case_nanos=worst,
        degraded_worst_case_nanos=worst,
        now=now,
        ttl=timedelta(seconds=settings.CASCADEFLOW_RESERVATION_TTL),
    )
    settlement = Settlement.of(
        tenant_id=tenant.pk, enforcement=Enforcement(lines=lines, admission=admission)
    )
    if admission.decision in (BudgetDecision.BLOCK, BudgetDecision.DEGRADE):
        _release(settlement)  # past a degrade threshold, the budget is for requests
        return None
    return settlement


def _release(settlement: Settlement) -> None:
    if settlement.reservation_key is None:
        return
    try:
        reservation_release(settlement=settlement)
    except Exception:  # it expires and is reclaimed
        logger.exception("Could not release the reservation %s", settlement.reservation_key)


_local = threading.local()


def run_async(fn: Callable[..., Any], *args: Any) -> Any:
    """Run a coroutine function from synchronous code.

    Called from a thread the event loop handed work to (the gateway's database
    thread, with tasks run in process), the coroutine runs on that loop, where
    the shared caller's connections live. In a worker, on one loop per thread,
    kept for the life of the process for the same reason.
    """
    loop = getattr(SyncToAsync.threadlocal, "main_event_loop", None)
    if loop is not None and loop.is_running():
        return async_to_sync(fn)(*args)
    runner = getattr(_local, "runner", None)
    if runner is None:
        runner = _local.runner = asyncio.Runner()
    # The caller's context (its trace span, say), not the one the runner was made in.
    return runner.run(fn(*args), context=contextvars.copy_context())


async def label(audit: Audit, plan: AuditPlan, caller: Caller) -> Labelled:
    """Ask what is missing (the reference first), label every draft, build the observation."""
    payload = audit.payload or {}
    messages: list[dict[str, Any]] = payload.get("messages") or []
    params: dict[str, Any] = payload.get("params") or {}
    answers = {name: _draft(a) for name, a in (payload.get("answers") or {}).items()}
    costs = {
        name: int(a.get("cost_nanos") or 0) for name, a in (payload.get("answers") or {}).items()
    }
    checks: dict[str, dict[str, Any]] = payload.get("drafts") or {}
    query = profile_query(query_text(messages))
    attempts: list[Attempt] = []

    async def ask(spec: ModelSpec) -> tuple[Draft, int] | None:
        kwargs = {**draft_params(spec, params), "messages": messages}
        try:
            response, attempt = await caller.complete(spec, kwargs, attempts, role="audit")
        except UpstreamError:
            return None
        return _draft_of(response), attempt.cost_nanos

    reference_name = plan.reference.name
    if reference_name not in answers:
        answered = await ask(plan.reference)
        if answered is None:
            last = next((a for a in reversed(attempts) if a.status == "error"), None)
            raise ReferenceFailed(last.error_message if last else "no answer")
        answers[reference_name], costs[reference_name] = answered
    missing = list({s.name: s for s in plan.chain if s.name not in answers}.values())
    for spec, answered in zip(missing, await asyncio.gather(*map(ask, missing)), strict=True):
        if answered is not None:
            answers[spec.name], costs[spec.name] = answered
    reference = answers[reference_name]

    async def judge(first: str, second: str) -> str | None:
        assert plan.judge is not None
        kwargs = {
            "messages": judge_messages(messages, first, second),
            "max_tokens": JUDGE_MAX_TOKENS,
            "temperature": 0,
        }
        try:
            response, _ = await caller.complete(plan.judge, kwargs, attempts, role="judge")
        except UpstreamError:
            return None
        return parse_judgement(response.choices[0].message.content or "")

    async def verdict_of(name: str) -> Verdict | None:
        draft = answers.get(name)
        if draft is None:
            return None
        verdict, comparable = extraction_verdict(draft, reference, params, query)
        if verdict is not None:
            return verdict
        if plan.judge is None:
            return Verdict.WORSE if comparable else None
        mine, theirs = _judge_text(draft), _judge_text(reference)
        draft_first, reference_first = await asyncio.gather(
            judge(mine, theirs), judge(theirs, mine)
        )
        return combine(draft_first, reference_first)

    labelled = _labels_needed(plan)
    verdicts = dict(
        zip(
            [s.name for s in labelled],
            await asyncio.gather(*(verdict_of(s.name) for s in labelled)),
            strict=True,
        )
    )
    steps = []
    for spec in plan.chain[:-1]:
        draft = answers.get(spec.name)
        if draft is None:
            steps.append(StepLabel({}, None))
            continue
        features, hard_fail = _features(spec.name, draft, checks, query, params)
        steps.append(StepLabel(features, verdicts[spec.name], hard_fail, costs.get(spec.name, 0)))
    observation = Observation(
        key=audit.request_id,
        steps=tuple(steps),
        pre=learning.pre_features(query),
        reference_cost_nanos=costs.get(plan.chain[-1].name, 0),
        next_cost_nanos=tuple(costs.get(s.name, 0) for s in plan.chain[1:]),
        uniform=audit.uniform,
    )
    served_verdict, served_loss = None, None
    if audit.served_model == reference_name:
        served_loss = 0.0
    elif audit.served_model in verdicts:
        served_verdict = verdicts[audit.served_model]
        served_loss = served_losses([served_verdict])[0]
    return Labelled(observation, served_verdict, served_loss, attempts)


def _features(
    name: str,
    draft: Draft,
    checks: dict[str, dict[str, Any]],
    query: QueryProfile,
    params: dict[str, Any],
) -> tuple[dict[str, float], bool]:
    """The features a draft was judged on when the request made it; computed now otherwise."""
    check = checks.get(name)
    if check is not None:
        return dict(check.get("features") or {}), bool(check.get("hard_fail"))
    report = extract(draft, query, params)
    return dict(report.features), report.hard_fail is not None


def audit_ledger_entry(audit: Audit, attempts: list[Attempt], now: datetime) -> LedgerEntry:
    """An audit's ledger row: its model and judge calls, spend that is not a request."""
    return LedgerEntry(
        tenant_id=audit.tenant_id,
        token_id=None,
        end_user_id=None,
        request_id=f"audit_{audit.pk}",
        created_at=now,
        requested_model=audit.profile,
        attempts=attempts,
        prompt_tokens=sum(a.prompt_tokens for a in attempts),
        completion_tokens=sum(a.completion_tokens for a in attempts),
        status=UsageStatus.OK,
        profile=audit.profile,
        domain=audit.domain,
        baseline_method="none",
        kind=UsageKind.AUDIT,
    )


def _finish(audit: Audit, labelled: Labelled, settlement: Settlement, now: datetime) -> None:
    """Record the labels, the audit's ledger row and its settlement, in one transaction."""
    from routing.tasks import profile_refit  # noqa: PLC0415 - routing.tasks imports this module

    attempts = labelled.attempts
    cost = sum(a.cost_nanos for a in attempts)
    entry = audit_ledger_entry(audit, attempts, now)

    def write() -> None:
        with transaction.atomic():
            if not Audit.objects.filter(
                pk=audit.pk, status=AuditStatus.RUNNING, runs=audit.runs
            ).update(
                status=AuditStatus.DONE,
                observation=learning.observation_to_json(labelled.observation),
                served_verdict=None
                if labelled.served_verdict is None
                else int(labelled.served_verdict),
                served_loss=labelled.served_loss,
                cost_nanos=cost,
                payload={},
                finished_at=now,
                running_until=None,
                last_error="",
            ):
                raise LeaseLost
            if attempts:
                ledger_write(values=usage_event_values(entry), settlement=settlement)
            elif settlement.reservation_key is not None:
                settle(settlement=settlement, actual_nanos=0)
            if _count_label(audit, now):
                transaction.on_commit(
                    lambda: outbox.send_soon(profile_refit, audit.tenant_id, audit.profile)
                )

    retry_transient(write)


def _skip(audit: Audit, reason: AuditSkip, now: datetime) -> str:
    Audit.objects.filter(pk=audit.pk, status=AuditStatus.RUNNING, runs=audit.runs).update(
        status=AuditStatus.SKIPPED,
        skip_reason=reason,
        payload={},
        finished_at=now,
        running_until=None,
    )
    return f"skipped: {reason}"


def _retry_later(audit: Audit, exc: BaseException, now: datetime) -> str:
    """Back to pending for the sweeper, after a backoff; failed for good after MAX_RUNS."""
    final = audit.runs >= MAX_RUNS
    changes: dict[str, Any] = {"running_until": None, "last_error": outbox.error_text(exc)}
    if final:
        changes |= {"status": AuditStatus.FAILED, "payload": {}, "finished_at": now}
    else:
        changes |= {
            "status": AuditStatus.PENDING,
            "next_attempt_at": now + outbox.backoff(audit.runs),
        }
    try:
        Audit.objects.filter(pk=audit.pk, status=AuditStatus.RUNNING, runs=audit.runs).update(
            **changes
        )
    except Exception:  # the lease expires and the sweeper takes it again
        logger.exception("Could not put audit %s back", audit.pk)
    return "failed" if final else "retry"


# --- the sweeper ------------------------------------------------------------------------


def audits_due(*, now: datetime) -> list[int]:
    """Pending audits a grace period old whose message was lost (or whose run failed or
    died), with attempts left: an attempt is counted on each and their ids returned.
    Audits nobody could run in time are given up (their texts dropped)."""
    unfinished = Audit.objects.filter(
        kind=AuditKind.AUDIT, status__in=[AuditStatus.PENDING, AuditStatus.RUNNING]
    ).exclude(status=AuditStatus.RUNNING, running_until__gte=now)
    unfinished.filter(runs__gte=MAX_RUNS).update(
        status=AuditStatus.FAILED, payload={}, finished_at=now, running_until=None
    )
    unfinished.filter(
        Q(created_at__lt=now - MAX_AGE) | Q(attempts__gte=outbox.MAX_ATTEMPTS)
    ).update(
        status=AuditStatus.SKIPPED,
        skip_reason=AuditSkip.EXPIRED,
        payload={},
        finished_at=now,
        running_until=None,
    )
    return outbox.claim_due(unfinished.filter(created_at__lt=now - outbox.GRACE), now=now)
