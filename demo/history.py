"""30 days of demo history, made of real cascades through the offline demo models.

``generate`` gives the demo tenant a past: end-user tiers and end users,
routing profiles, API keys for its apps, budgets, and a few thousand ledger
rows spread over the last ``days`` days. Every row is a request of the demo
mix (``demo.traffic.sample_request``) run exactly as the gateway
runs a live one: the body is parsed by the gateway's parser, the target is
resolved from the tenant's profiles, and the same ``CascadeAgent`` (same
chain, preset, quality checks and demo models) drafts, judges and escalates;
the ledger row is then built by the gateway's own helpers and written with
``usage_event_record``, backdated. The demo models run instantly while
seeding (``demo.latency_scale = 0``); each row records the latency the
models would have had (their simulated first-token and per-token times).

Deterministic: the same seed gives the same requests, answers and totals
(timestamps follow ``now``). Idempotent: history rows carry a request-id
prefix; a fresh history is kept, a stale one (or ``force``) is replaced,
never duplicated. Afterwards the budget counters are recomputed from the
ledger, so gauges and ledger agree to the nano-dollar.

Audits: the requests of cascades that learn (``routing.targets``: the tenant's
and the profile's audits on) are sampled as ``routing.audits`` samples live ones
(every auditable request until a profile has its first labels, then the
profile's floor), each labelled by ``routing.audits.label`` on the demo models
(the reference asked now, the judge where extraction cannot tell) and written
as the audit task writes it: a done ``Audit`` and its ledger row of kind
``audit``, a few seconds after its request, so every saving shown is net of
audits. As the labels come in, the profile is refitted by
``routing.calibrations.profile_refit`` (a certified refit is promoted), giving
its calibration history. The history's requests themselves ran before any
audit, as a tenant without audits runs them: the learned calibrations serve
live traffic from now on. A replaced history replaces its audits and the
tenant's calibration history with it.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import math
import random
import time
from collections import defaultdict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from zoneinfo import ZoneInfo

from django.db import transaction
from django.db.models import F, Max, Q, Sum
from django.utils import timezone

from core.money import format_usd
from demo import traffic
from routing import audits, calibrations, gateway
from routing.enforcement import worst_case_nanos
from routing.engine import learning
from routing.engine.resilience import UpstreamError, classify
from routing.enums import AuditStatus, UsageKind, UsageStatus
from routing.models import (
    Audit,
    CalibrationVersion,
    ProfileLearning,
    RoutingProfile,
    UsageEvent,
)
from routing.providers import demo
from routing.schemas import parse_chat_request
from routing.services import LedgerEntry, usage_event_record
from routing.targets import Target, resolve_target
from tenants.budgets import (
    BudgetLine,
    Crossing,
    alerts_record,
    effective_thresholds,
    period_bounds,
)
from tenants.enums import ALL_SCOPES, BudgetDecision, BudgetPeriod, BudgetScope
from tenants.models import (
    ApiToken,
    AuditEvent,
    Budget,
    BudgetAlert,
    BudgetCounter,
    EndUser,
    EndUserTier,
    Tenant,
)
from tenants.selectors import TokenContext
from tenants.services import budget_create, token_create

HISTORY_PREFIX = "req_hist_"
DEFAULT_DAYS = 30
DEFAULT_REQUESTS = 4000
DEFAULT_SEED = 20_250_601
# A history whose newest row is younger than this is kept as it is on re-runs.
FRESH_FOR = timedelta(hours=24)
CONCURRENCY = 8  # cascades (and audits) in flight while seeding
RATE_LIMITED_SHARE = 0.006  # of free-tier requests: refused with a 429, as the gateway records them

END_USER_TIERS: dict[str, dict] = {
    "free": {
        "name": "Free",
        "requests_per_minute": 20,
        "tokens_per_minute": 40_000,
        "is_default": True,
    },
    "pro": {"name": "Pro", "requests_per_minute": 300, "tokens_per_minute": 400_000},
}
PROFILES: dict[str, dict] = {
    # The support bot: cheap first; medical questions start on the medium model.
    "support": {
        "preset": "cost_optimized",
        "chain": ["demo/small", "demo/medium"],
        "domain_routes": {"medical": {"chain": ["demo/medium", "demo/large"]}},
    },
    # The IDE plugin: strict, slightly relaxed after looking at its escalations.
    "coding": {
        "preset": "quality_first",
        "chain": ["demo/small", "demo/medium", "demo/large"],
        "threshold_offset": -0.1,
        "judge_model": "demo/medium",  # audits judged by the medium model: a fifth of the price
    },
}
# Budget sizing (see _size_budgets): the tenant's month is on pace for ~95 % of its
# budget, at most 85 % used so far; a free-tier end user has used at most 85 % of theirs.
TENANT_PACE = 0.95
MAX_USED_NOW = 0.85
FREE_USER_PEAK = 0.85
# Room for the live simulator (``generate``'s ``traffic_rate``): it may run non-stop this
# many days without the tenant or a free end user reaching this share of their budget
# (the default warn threshold), and the trial user's daily budget is about this many
# hours of their simulated traffic, and at least this many of their worst cases.
SIMULATOR_DAYS = 31
WARN_SHARE = 0.8
TRIAL_HOURS = 1.25
TRIAL_WORST_CASES = 4

# Audits: every auditable request of a profile until it has AUDIT_WARM labels, then its
# floor (``learning.audit_rate``; live traffic warms up on 400: a month of a small app
# cannot pay for that many judged audits and still save). An audit runs in a worker
# seconds after its request. A profile is refitted when its labels reach each mark (the
# gateway refits every ``audits.REFIT_EVERY`` labels; the history keeps a short
# calibration history) and once more with the history's last labels.
AUDIT_WARM = 150
AUDIT_DELAY_S = (3.0, 45.0)
REFIT_MARKS = (100,)
REFIT_DELAY = timedelta(minutes=2)

# Requests per hour of the day (tenant's local time), relative to the busiest hours.
_HOURLY = (
    0.06, 0.05, 0.05, 0.05, 0.06, 0.1, 0.2, 0.4, 0.75, 1.0, 1.0, 0.95,
    0.8, 0.9, 1.0, 1.0, 0.9, 0.7, 0.5, 0.4, 0.35, 0.3, 0.2, 0.1,
)  # fmt: skip
_WEEKEND = 0.35
_GROWTH = 0.25  # the last day is ~25 % busier than the first


@dataclass
class DemoSetup:
    tenant: Tenant
    tiers: dict[str, EndUserTier]
    end_users: dict[str, EndUser]
    tokens: dict[str, ApiToken]
    profiles: list[RoutingProfile]


@dataclass
class HistoryReport:
    skipped: bool = False
    events: int = 0
    ok: int = 0
    escalated: int = 0
    cost_nanos: int = 0
    baseline_nanos: int = 0
    engine_seconds: float = 0.0
    seconds: float = 0.0
    start: datetime | None = None
    end: datetime | None = None
    by_profile: dict[str, int] = field(default_factory=dict)
    by_domain: dict[str, int] = field(default_factory=dict)
    tenant_budget_nanos: int = 0
    free_user_budget_nanos: int = 0
    trial_budget_nanos: int = 0
    audits: int = 0
    audit_cost_nanos: int = 0
    calibration_versions: int = 0

    @property
    def escalation_rate(self) -> float:
        return self.escalated / self.ok if self.ok else 0.0

    def summary(self) -> str:
        if self.skipped:
            return f"Demo history is fresh ({self.events} requests); kept as it is."
        return (
            f"Demo history: {self.events} requests over {self.start:%Y-%m-%d} .. "
            f"{self.end:%Y-%m-%d}, {self.escalation_rate:.0%} escalated, "
            f"{format_usd(self.cost_nanos)} spent ({format_usd(self.baseline_nanos)} on the "
            f"strongest models), {self.audits} audits ({format_usd(self.audit_cost_nanos)}), "
            f"{self.calibration_versions} calibration versions, seeded in {self.seconds:.1f}s "
            f"(cascades {self.engine_seconds:.1f}s)."
        )


# --- setup ---------------------------------------------------------------------------


def ensure_demo_setup(tenant: Tenant, *, since: datetime | None = None) -> DemoSetup:
    """End-user tiers, end users, profiles and app API keys of the demo tenant. Idempotent.

    Existing rows are kept as they are (a developer's edits survive). ``since``
    backdates what was just created so it predates the history.
    """
    tiers = {}
    for slug, values in END_USER_TIERS.items():
        tier, _ = EndUserTier.objects.get_or_create(tenant=tenant, slug=slug, defaults=values)
        tiers[slug] = tier
    end_users = {}
    for external_id, tier_slug in traffic.END_USERS:
        end_user, _ = EndUser.objects.get_or_create(
            tenant=tenant, external_id=external_id, defaults={"tier": tiers[tier_slug]}
        )
        end_users[external_id] = end_user
    profiles = []
    for name, values in PROFILES.items():
        profile, _ = RoutingProfile.objects.get_or_create(tenant=tenant, name=name, defaults=values)
        profiles.append(profile)
    tokens = {}
    for name in dict.fromkeys(app.token_name for app in traffic.APPS):
        token = ApiToken.objects.filter(tenant=tenant, name=name, revoked_at__isnull=True).first()
        if token is None:  # its raw value is never needed: history is written directly
            token = token_create(tenant=tenant, name=name, scopes=ALL_SCOPES).token
        tokens[name] = token
    if since is not None:
        for model, rows in (
            (EndUser, end_users.values()),
            (ApiToken, tokens.values()),
            (RoutingProfile, profiles),
            (EndUserTier, tiers.values()),
        ):
            model.objects.filter(pk__in=[r.pk for r in rows], created_at__gt=since).update(
                created_at=since
            )
        Tenant.objects.filter(pk=tenant.pk, created_at__gt=since).update(created_at=since)
    return DemoSetup(tenant, tiers, end_users, tokens, profiles)


def _context(tenant: Tenant, token: ApiToken) -> TokenContext:
    """What the gateway resolves from this token (tenant, plan, budgets, tiers)."""
    tier = tenant.tier
    return TokenContext(
        token_id=token.pk,
        tenant_id=tenant.pk,
        tenant_slug=tenant.slug,
        scopes=frozenset(token.scopes),
        tenant_allowed_models=tuple(tenant.allowed_models or ()),
        tier_allowed_models=tuple((tier.allowed_models if tier else None) or ()),
        last_used_at=None,
        token_mask=token.mask,
        time_zone=tenant.time_zone,
        has_budgets=Budget.objects.filter(tenant=tenant).exists(),
        has_end_user_tiers=EndUserTier.objects.filter(tenant=tenant).exists(),
    )


# --- the shape of a month -------------------------------------------------------------


def arrival_times(
    *, n: int, start: datetime, end: datetime, time_zone: str, rng: random.Random
) -> list[datetime]:
    """``n`` sorted instants in [start, end): business hours busy, weekends light, growing."""
    tz = ZoneInfo(time_zone or "UTC")
    hours: list[datetime] = []
    weights: list[float] = []
    span = (end - start).total_seconds()
    at = start
    day_noise: dict = {}
    while at < end:
        local = at.astimezone(tz)
        noise = day_noise.setdefault(local.date(), rng.lognormvariate(0, 0.12))
        weight = _HOURLY[local.hour] * (_WEEKEND if local.weekday() >= 5 else 1.0)
        weight *= (1 + _GROWTH * (at - start).total_seconds() / span) * noise
        weight *= min(1.0, (end - at).total_seconds() / 3600)  # the hour in progress
        hours.append(at)
        weights.append(weight)
        at += timedelta(hours=1)
    cumulative = []
    total = 0.0
    for w in weights:
        total += w
        cumulative.append(total)
    picks = rng.choices(range(len(hours)), cum_weights=cumulative, k=n)
    times = []
    for index in picks:
        hour_start = hours[index]
        length = min(3600.0, (end - hour_start).total_seconds())
        times.append(hour_start + timedelta(seconds=rng.random() * length))
    return sorted(times)


# --- running the cascades --------------------------------------------------------------


@dataclass
class _Planned:
    index: int
    at: datetime
    request: traffic.DemoRequest
    rate_limited: bool


def _simulated_latency(entry: LedgerEntry, rng: random.Random) -> int:
    """The latency the demo models would have had (they ran instantly while seeding)."""
    total = 0
    for attempt in entry.attempts:
        model = demo.DEMO_MODELS.get(attempt.model.removeprefix(f"{demo.PROVIDER}/"))
        if model is None:
            total += attempt.latency_ms
            continue
        ms = model.first_token_ms + model.per_token_ms * attempt.completion_tokens
        attempt.latency_ms = int(ms * rng.uniform(0.85, 1.3))
        total += attempt.latency_ms
    return total + rng.randint(3, 18)  # the gateway's own time


async def _cascade(gw: gateway.GatewayRequest, entry: LedgerEntry) -> None:
    """What ``routing.gateway.complete`` / ``stream`` do between admission and the ledger."""
    agent = gw.agent()
    try:
        if gw.chat.stream:
            cascade = await agent.stream(gw.chat.messages, gateway.upstream_params(gw))
            if gw.target.learning is not None:
                gw.streamed = gateway.StreamedAnswer()
            async for data in cascade.chunks():
                if gw.streamed is not None:
                    gw.streamed.add(data)
            assert cascade.result is not None
            gateway.ledger_fill(entry, cascade.result)
            if cascade.failure is not None:
                failure = classify(cascade.failure)
                entry.status, entry.error_code = UsageStatus.UPSTREAM_ERROR, failure.code
        else:
            result = await agent.run(gw.chat.messages, gateway.upstream_params(gw))
            gateway.ledger_fill(entry, result)
    except UpstreamError as exc:
        error = gateway.gateway_error_of(exc)
        entry.attempts = list(exc.attempts)
        entry.status = UsageStatus.UPSTREAM_ERROR
        entry.http_status = error.status
        entry.error_code = error.code or ""


def _target(ctx: TokenContext, tenant: Tenant, model: str) -> Target:
    """The target as a tenant without audits runs it, carrying what sampling its requests
    for audits needs when the tenant's cascade learns (answers are then kept, as the
    gateway keeps them; the calibration that runs is unchanged)."""
    target = resolve_target(ctx, model)
    learns = resolve_target(dataclasses.replace(ctx, audits_enabled=tenant.audits_enabled), model)
    if learns.learning is None:
        return target
    fresh = dataclasses.replace(
        learns.learning, uniform_labels=0, nonuniform_labels=0, version_id=None
    )
    return dataclasses.replace(target, learning=fresh)


def _run_cascades(
    planned: list[_Planned],
    *,
    tenant: Tenant,
    setup: DemoSetup,
    seed: int,
) -> tuple[list[LedgerEntry], dict[str, int], list[audits.AuditCandidate | None]]:
    """Run every planned request; also return the largest worst case admission would
    reserve, overall and per end user, and each request's audit candidate (None: its
    cascade does not learn)."""
    contexts = {name: _context(tenant, token) for name, token in setup.tokens.items()}
    targets: dict[tuple[str, str], Target] = {}
    jobs = []
    worst: dict[str, int] = defaultdict(int)
    for item in planned:
        request = item.request
        ctx = contexts[request.token_name]
        chat = parse_chat_request(json.dumps(request.body).encode())
        key = (request.token_name, chat.model)
        if key not in targets:
            targets[key] = _target(ctx, tenant, chat.model)
        target = targets[key]
        worst[request.user] = max(
            worst[request.user], worst_case_nanos(target.chain, chat, target.preset)
        )
        end_user = setup.end_users[request.user]
        gw = gateway.GatewayRequest(
            request_id=history_request_id(tenant, item.index),
            ctx=ctx,
            request=chat,
            target=targets[key],
            end_user_id=end_user.pk,
            received_at=item.at,
            started=0.0,
        )
        jobs.append((item, gw))

    async def one(
        item: _Planned, gw: gateway.GatewayRequest, slots: asyncio.Semaphore
    ) -> LedgerEntry:
        entry = gateway.ledger_entry(gw)
        if item.rate_limited:
            entry.status, entry.http_status = UsageStatus.RATE_LIMITED, 429
            entry.error_code = "rate_limit_exceeded"
            return entry
        async with slots:
            await _cascade(gw, entry)
        return entry

    async def run_all() -> list[LedgerEntry]:
        # A few at a time: the demo models are deterministic, so overlap changes no answer.
        slots = asyncio.Semaphore(CONCURRENCY)
        return list(await asyncio.gather(*(one(item, gw, slots) for item, gw in jobs)))

    previous = demo.latency_scale
    demo.latency_scale = 0.0  # instant models while seeding; latency is recorded as simulated
    try:
        entries = asyncio.run(run_all())
    finally:
        demo.latency_scale = previous
    latency_rng = random.Random(seed + 2)  # noqa: S311 - demo data, not security
    for entry in entries:
        if entry.status != UsageStatus.RATE_LIMITED:
            entry.latency_ms = _simulated_latency(entry, latency_rng)
    candidates = [
        gateway.audit_candidate(gw, entry) if entry.status != UsageStatus.RATE_LIMITED else None
        for (_, gw), entry in zip(jobs, entries, strict=True)
    ]
    return entries, worst, candidates


# --- budgets ---------------------------------------------------------------------------


def _nice_up(nanos: float) -> int:
    """Round up to two significant digits of a dollar amount (never 0)."""
    value = max(math.ceil(nanos), 10**7)  # at least a cent
    step = 10 ** (len(str(value)) - 2)
    return -(-value // step) * step


def _period_key(period: str, at: datetime, time_zone: str) -> datetime:
    return period_bounds(period, at, time_zone)[0]


def _size_budgets(
    entries: list[LedgerEntry],
    *,
    tenant: Tenant,
    setup: DemoSetup,
    now: datetime,
    worst: dict[str, int],
    traffic_rate: float,
    audit_spend: Sequence[tuple[datetime, int]] = (),
) -> tuple[Budget, Budget, Budget]:
    """Create or resize the tenant's monthly budget, the free tier's per-user budget and
    the trial user's own daily budget.

    The tenant's month is on pace for ~95 % of its budget. Admission reserves a
    request's worst case (every model of the chain at its output cap), so each
    limit also leaves room for the largest worst case (``worst``) above the
    highest spend of any period: no history request would have been degraded.

    ``traffic_rate``: the requests per second the live simulator sends. The
    tenant's budget and each free end user's leave room for it to run non-stop
    for ``SIMULATOR_DAYS`` without crossing a warn threshold, so the demo's API
    snippets never meet a 402; the trial user's daily budget is about
    ``TRIAL_HOURS`` of their simulated traffic, so it is crossed, then refuses,
    every day the demo runs. ``audit_spend``: (when, cost) of each audit, spend of the
    tenant's month like any other.
    """
    tz = tenant.time_zone
    month_start, month_end = period_bounds(BudgetPeriod.MONTH, now, tz)
    spend_by_month: dict[datetime, int] = defaultdict(int)
    free_ids = {eu.pk for eu in setup.end_users.values() if eu.tier_id == setup.tiers["free"].pk}
    free_by_user_month: dict[tuple[int, datetime], int] = defaultdict(int)
    week_ago = now - timedelta(days=7)
    last_week = 0
    trial = setup.end_users[traffic.TRIAL_USER]
    trial_costs: list[int] = []
    for entry in entries:
        key = _period_key(BudgetPeriod.MONTH, entry.created_at, tz)
        spend_by_month[key] += entry.cost_nanos
        if entry.end_user_id in free_ids:
            free_by_user_month[(entry.end_user_id, key)] += entry.cost_nanos
        if entry.created_at >= week_ago:
            last_week += entry.cost_nanos
        if entry.end_user_id == trial.pk and entry.status == UsageStatus.OK:
            trial_costs.append(entry.cost_nanos)
    for at, cost in audit_spend:  # tenant-wide spend, like any other
        spend_by_month[_period_key(BudgetPeriod.MONTH, at, tz)] += cost
        if at >= week_ago:
            last_week += cost
    all_worst = max(worst.values(), default=0)
    # What the simulator spends a day, in all and as each end user.
    mean_cost = sum(e.cost_nanos for e in entries) / len(entries) if entries else 0
    simulated = traffic_rate * 86_400 * mean_cost
    trial_mean = sum(trial_costs) / len(trial_costs) if trial_costs else mean_cost
    trial_hourly = traffic_rate * 3_600 * traffic.user_share(traffic.TRIAL_USER) * trial_mean
    trial_limit = _nice_up(max(TRIAL_WORST_CASES * worst.get(traffic.TRIAL_USER, 0),
                               TRIAL_HOURS * trial_hourly))  # fmt: skip
    per_free_user = max(
        (
            min(trial_limit, simulated * traffic.user_share(user))
            if user == traffic.TRIAL_USER
            else simulated * traffic.user_share(user)
            for user, tier in traffic.END_USERS
            if tier == "free"
        ),
        default=0,
    )

    to_date = spend_by_month.get(month_start, 0)
    remaining_days = (month_end - now).total_seconds() / 86400
    projected = to_date + last_week / 7 * remaining_days
    earlier = max((v for k, v in spend_by_month.items() if k != month_start), default=0)
    tenant_limit = _nice_up(
        max(
            projected / TENANT_PACE,
            to_date / MAX_USED_NOW,
            earlier / MAX_USED_NOW,
            max(to_date, earlier) + all_worst,
            (to_date + simulated * SIMULATOR_DAYS) / WARN_SHARE,
        )
    )
    tenant_budget = (
        Budget.objects.filter(
            tenant=tenant, scope=BudgetScope.TENANT, period=BudgetPeriod.MONTH, from_plan=False
        )
        .order_by("pk")
        .first()
    )
    if tenant_budget is None:
        tenant_budget = budget_create(
            tenant=tenant,
            scope=BudgetScope.TENANT,
            period=BudgetPeriod.MONTH,
            limit_nanos=tenant_limit,
        )
    else:
        Budget.objects.filter(pk=tenant_budget.pk).update(limit_nanos=tenant_limit)
        tenant_budget.limit_nanos = tenant_limit
    peak = max(free_by_user_month.values(), default=0)
    free_limit = _nice_up(
        max(
            peak / FREE_USER_PEAK,
            peak + all_worst,
            (peak + per_free_user * SIMULATOR_DAYS) / WARN_SHARE,
        )
    )
    free_budget = Budget.objects.filter(
        tenant=tenant,
        scope=BudgetScope.TIER,
        tier=setup.tiers["free"],
        period=BudgetPeriod.MONTH,
    ).first()
    if free_budget is None:
        free_budget = budget_create(
            tenant=tenant,
            scope=BudgetScope.TIER,
            period=BudgetPeriod.MONTH,
            limit_nanos=free_limit,
            tier=setup.tiers["free"],
        )
    else:
        Budget.objects.filter(pk=free_budget.pk).update(limit_nanos=free_limit)
        free_budget.limit_nanos = free_limit
    trial_budget = Budget.objects.filter(
        tenant=tenant, scope=BudgetScope.END_USER, end_user=trial, period=BudgetPeriod.DAY
    ).first()
    if trial_budget is None:
        trial_budget = budget_create(
            tenant=tenant,
            scope=BudgetScope.END_USER,
            period=BudgetPeriod.DAY,
            limit_nanos=trial_limit,
            end_user=trial,
        )
    else:
        Budget.objects.filter(pk=trial_budget.pk).update(limit_nanos=trial_limit)
        trial_budget.limit_nanos = trial_limit
    return tenant_budget, free_budget, trial_budget


def _line(budget: Budget, subject_id: int, tier: EndUserTier | None) -> BudgetLine:
    warn, degrade, block = effective_thresholds(
        scope=budget.scope,
        given=(budget.warn_pct, budget.degrade_pct, budget.block_pct),
        tier=(tier.warn_pct, tier.degrade_pct, tier.block_pct) if tier else None,
    )
    return BudgetLine(
        budget.pk, budget.scope, budget.period, budget.limit_nanos, subject_id,
        warn, degrade, block, "",
    )  # fmt: skip


def _replay_budget_status(
    entries: list[LedgerEntry],
    *,
    tenant: Tenant,
    setup: DemoSetup,
    budgets: tuple[Budget, Budget, Budget],
    audit_spend: Sequence[tuple[datetime, int]] = (),
) -> list[tuple[Crossing, datetime]]:
    """Set each row's ``budget_status`` as admission would have, and collect threshold crossings.

    Replays spend in time order over the budgets sized above (the tenant's
    month, each free end user's month, the trial user's days). Audits (``audit_spend``)
    are charged to the tenant's budget alone, as they are admitted; their rows carry
    no budget status.
    """
    tenant_budget, free_budget, trial_budget = budgets
    free = setup.tiers["free"]
    free_ids = {eu.pk for eu in setup.end_users.values() if eu.tier_id == free.pk}
    trial_id = setup.end_users[traffic.TRIAL_USER].pk
    spent: dict[tuple[int, int, datetime], int] = defaultdict(int)
    crossings: list[tuple[Crossing, datetime]] = []
    moments: list[tuple[datetime, int, LedgerEntry | None, int]] = [
        (entry.created_at, 0, entry, entry.cost_nanos) for entry in entries
    ]
    moments += [(at, 1, None, cost) for at, cost in audit_spend]
    moments.sort(key=lambda m: (m[0], m[1]))
    for at, _, entry, cost in moments:
        lines = [_line(tenant_budget, 0, None)]
        if entry is not None and entry.end_user_id in free_ids:
            lines.append(_line(free_budget, entry.end_user_id or 0, free))
        if entry is not None and entry.end_user_id == trial_id:
            lines.append(_line(trial_budget, 0, free))
        decision = BudgetDecision.ALLOW
        for line in lines:
            start = _period_key(line.period, at, tenant.time_zone)
            key = (line.budget_id, line.subject_id, start)
            before = spent[key]
            level = line.level(before)
            decision = BudgetDecision.most_severe(decision, level)
            after = before + cost
            spent[key] = after
            crossings += [(crossing, at) for crossing in line.crossings(before, after, start)]
        if entry is not None:
            entry.budget_status = decision
    return crossings


def budget_counters_recompute(
    *, tenant: Tenant, now: datetime, since: datetime | None = None
) -> int:
    """Set every budget counter's ``spent_nanos`` to the ledger's sum for its period.

    For the current period of each of the tenant's budgets and, with
    ``since``, every earlier period back to it. Subjects follow
    ``tenants.budgets.applicable_budgets``: a tier budget counts each end user
    of the tier (its default tier for end users without one) unless the end
    user has an own budget of the same period. Reserved amounts are left
    alone. Returns the number of counters written.
    """
    tz = tenant.time_zone
    budgets = list(Budget.objects.filter(tenant=tenant).select_related("tier"))
    own_periods: dict[int, set[str]] = defaultdict(set)
    for budget in budgets:
        if budget.scope == BudgetScope.END_USER and budget.end_user_id:
            own_periods[budget.end_user_id].add(budget.period)
    written = 0
    for budget in budgets:
        for start, end in _periods(budget.period, since or now, now, tz):
            rows = UsageEvent.objects.filter(tenant=tenant, created_at__gte=start)
            if end is not None:
                rows = rows.filter(created_at__lt=end)
            sums: dict[int, int] = {}
            if budget.scope == BudgetScope.TENANT:
                sums[0] = rows.aggregate(s=Sum("cost_nanos"))["s"] or 0
            elif budget.scope == BudgetScope.TOKEN:
                sums[0] = rows.filter(token_id=budget.token_id).aggregate(s=Sum("cost_nanos"))["s"]
            elif budget.scope == BudgetScope.END_USER:
                sums[0] = rows.filter(end_user_id=budget.end_user_id).aggregate(
                    s=Sum("cost_nanos")
                )["s"]
            else:
                members = Q(tier_id=budget.tier_id)
                if budget.tier is not None and budget.tier.is_default:
                    members |= Q(tier__isnull=True)
                subjects = [
                    pk
                    for pk in EndUser.objects.filter(members, tenant=tenant).values_list(
                        "pk", flat=True
                    )
                    if budget.period not in own_periods.get(pk, ())
                ]
                per_user = (
                    rows.filter(end_user_id__in=subjects)
                    .values("end_user_id")
                    .annotate(s=Sum("cost_nanos"))
                )
                sums = {r["end_user_id"]: r["s"] or 0 for r in per_user}
                existing = BudgetCounter.objects.filter(budget=budget, period_start=start)
                for subject_id in existing.values_list("subject_id", flat=True):
                    sums.setdefault(subject_id, 0)
            for subject_id, spent in sums.items():
                BudgetCounter.objects.update_or_create(
                    budget=budget,
                    subject_id=subject_id,
                    period_start=start,
                    defaults={"tenant": tenant, "period_end": end, "spent_nanos": spent or 0},
                )
                written += 1
    return written


def _periods(period: str, since: datetime, now: datetime, tz: str):
    start, end = period_bounds(period, since, tz)
    yield start, end
    while end is not None and end <= now:
        start, end = period_bounds(period, end, tz)
        yield start, end


def _record_alerts(
    tenant: Tenant, budgets: tuple[Budget, ...], crossings: list[tuple[Crossing, datetime]]
) -> None:
    # The budgets were just resized: their earlier alerts no longer match their limits.
    BudgetAlert.objects.filter(tenant=tenant, budget__in=budgets).delete()
    for crossing, at in crossings:
        ids = alerts_record(tenant_id=tenant.pk, crossings=[crossing])
        BudgetAlert.objects.filter(pk__in=ids).update(created_at=at, emailed_at=at, webhook_at=None)


# --- audits ------------------------------------------------------------------------------


@dataclass
class _Audited:
    audit: Audit
    labelled: audits.Labelled


def _sample_audits(
    entries: list[LedgerEntry], candidates: list[audits.AuditCandidate | None], *, seed: int
) -> list[Audit]:
    """The requests sampling would have audited, in time order: ``audits.audit_consider``'s
    rule (auditable requests of a cascade that learns, with ``learning.audit_rate``'s
    probability given the profile's labels so far), each as its pending row. Settling to
    the floor early (``learning.settled``) is left out: it is decided by the refits the
    history makes after sampling, and the candidates carry whatever calibration was active
    before the history was (re)generated, so following it would make the history depend on
    the one it replaces."""
    rng = random.Random(seed + 3)  # noqa: S311 - demo data, not security
    labels: dict[str, int] = defaultdict(int)
    sampled = []
    for entry, candidate in zip(entries, candidates, strict=True):
        if candidate is None or candidate.opted_out or candidate.end_user_excluded:
            continue
        if not candidate.auditable():
            continue
        state = candidate.learning
        rate = learning.audit_rate(labels[state.profile], floor=state.floor, warm=AUDIT_WARM)
        if rng.random() >= rate:
            continue
        labels[state.profile] += 1
        sampled.append(
            audits.audit_row(
                candidate,
                entry.created_at,
                status=AuditStatus.RUNNING,
                runs=1,
                payload=audits.audit_payload(candidate),
            )
        )
    return sampled


def _label_audits(tenant: Tenant, sampled: list[Audit]) -> list[_Audited]:
    """Label each sampled request as the audit task does (``audits.label``: the reference
    and the missing models asked, the judge where extraction cannot tell), on the demo
    models, a few at a time. An audit whose models are not available is not run."""
    plans: dict[tuple[str, str], audits.AuditPlan | audits.AuditSkip] = {}
    jobs = []
    for audit in sampled:
        audit.tenant = tenant
        key = (audit.profile, audit.chain_key)
        if key not in plans:
            plans[key] = audits.audit_plan(audit)
        plan = plans[key]
        if isinstance(plan, audits.AuditPlan):
            jobs.append((audit, plan))

    async def run_all() -> list[audits.Labelled | None]:
        slots = asyncio.Semaphore(CONCURRENCY)
        caller = gateway.caller()

        async def one(audit: Audit, plan: audits.AuditPlan) -> audits.Labelled | None:
            async with slots:
                try:
                    return await audits.label(audit, plan, caller)
                except audits.ReferenceFailed:
                    return None

        return list(await asyncio.gather(*(one(audit, plan) for audit, plan in jobs)))

    previous = demo.latency_scale
    demo.latency_scale = 0.0
    try:
        results = asyncio.run(run_all())
    finally:
        demo.latency_scale = previous
    return [
        _Audited(audit, labelled)
        for (audit, _), labelled in zip(jobs, results, strict=True)
        if labelled is not None
    ]


def _finish_audits(
    audited: list[_Audited], *, tenant: Tenant, now: datetime, seed: int
) -> list[_Audited]:
    """Each audit done as the task finishes it (labels, cost, texts dropped), seconds
    after its request; those past the tenant's monthly audit cap are not run."""
    rng = random.Random(seed + 4)  # noqa: S311 - demo data, not security
    spent: dict[datetime, int] = defaultdict(int)
    done = []
    for item in audited:
        audit, labelled = item.audit, item.labelled
        month = _period_key(BudgetPeriod.MONTH, audit.created_at, tenant.time_zone)
        if spent[month] >= tenant.audit_monthly_cap_nanos:
            continue
        audit.cost_nanos = sum(a.cost_nanos for a in labelled.attempts)
        spent[month] += audit.cost_nanos
        audit.status = AuditStatus.DONE
        audit.observation = learning.observation_to_json(labelled.observation)
        audit.served_verdict = (
            None if labelled.served_verdict is None else int(labelled.served_verdict)
        )
        audit.served_loss = labelled.served_loss
        audit.payload = {}
        audit.finished_at = min(
            audit.created_at + timedelta(seconds=rng.uniform(*AUDIT_DELAY_S)), now
        )
        done.append(item)
    done.sort(key=lambda item: item.audit.finished_at)
    return done


def _insert_audits(tenant: Tenant, batch: list[_Audited], latency_rng: random.Random) -> None:
    """Write done audits, count their labels on their profiles, and write their ledger rows
    (``audits.audit_ledger_entry``: kind audit, ``audit_<id>``, no baseline)."""
    if not batch:
        return
    Audit.objects.bulk_create([item.audit for item in batch])
    by_profile: dict[str, list[Audit]] = defaultdict(list)
    for item in batch:
        by_profile[item.audit.profile].append(item.audit)
    for profile, rows in by_profile.items():
        state, _ = ProfileLearning.objects.get_or_create(
            tenant=tenant,
            profile=profile,
            defaults={"chain_key": rows[0].chain_key, "chain_since": rows[0].created_at},
        )
        ProfileLearning.objects.filter(pk=state.pk).update(
            uniform_labels=F("uniform_labels") + len(rows),
            labels_since_refit=F("labels_since_refit") + len(rows),
        )
    for item in batch:
        audit = item.audit
        entry = audits.audit_ledger_entry(audit, item.labelled.attempts, audit.finished_at)
        entry.latency_ms = _simulated_latency(entry, latency_rng)
        usage_event_record(entry=entry)


def _write_audits(tenant: Tenant, done: list[_Audited], *, now: datetime, seed: int) -> None:
    """Write the audits in the order they finished, refitting each profile (and promoting
    what is certified: ``calibrations.profile_refit``) when its labels reach a mark of
    ``REFIT_MARKS`` and after its last one; each refit sees only the labels before it."""
    latency_rng = random.Random(seed + 5)  # noqa: S311 - demo data, not security
    refits: list[tuple[datetime, str]] = []
    seen: dict[str, int] = defaultdict(int)
    last: dict[str, datetime] = {}
    for item in done:
        profile = item.audit.profile
        seen[profile] += 1
        last[profile] = item.audit.finished_at
        if seen[profile] in REFIT_MARKS:
            refits.append((min(item.audit.finished_at + REFIT_DELAY, now), profile))
    for profile, labels in seen.items():
        if labels >= audits.REFIT_EVERY and labels not in REFIT_MARKS:
            refits.append((min(last[profile] + REFIT_DELAY, now), profile))
    refits.sort()
    written = 0
    for at, profile in refits:
        batch = []
        while written < len(done) and done[written].audit.finished_at <= at:
            batch.append(done[written])
            written += 1
        _insert_audits(tenant, batch, latency_rng)
        calibrations.profile_refit(tenant_id=tenant.pk, profile=profile, now=at)
    _insert_audits(tenant, done[written:], latency_rng)
    # Promotions happened when their refit did, and the audit log says so.
    for version in CalibrationVersion.objects.filter(tenant=tenant, promoted_at__isnull=False):
        CalibrationVersion.objects.filter(pk=version.pk).update(promoted_at=version.created_at)
        for event in AuditEvent.objects.filter(
            tenant=tenant, action="calibration.promote", target=version.profile
        ):
            if (event.data or {}).get("version") == version.version:
                AuditEvent.objects.filter(pk=event.pk).update(created_at=version.created_at)


def _audits_delete(tenant: Tenant) -> None:
    """The history's audits with their ledger rows, and the tenant's calibration history
    (fitted on labels about to be replaced)."""
    old = Audit.objects.filter(tenant=tenant, request_id__startswith=HISTORY_PREFIX)
    ids = [f"audit_{pk}" for pk in old.values_list("pk", flat=True)]
    for i in range(0, len(ids), 500):
        UsageEvent.objects.filter(
            tenant=tenant, kind=UsageKind.AUDIT, request_id__in=ids[i : i + 500]
        ).delete()
    old.delete()
    CalibrationVersion.objects.filter(tenant=tenant).delete()
    ProfileLearning.objects.filter(tenant=tenant).delete()


def history_audits(tenant: Tenant):
    return Audit.objects.filter(tenant=tenant, request_id__startswith=HISTORY_PREFIX)


# --- the generator ------------------------------------------------------------------------


def history_mix(requests: int, seed: int) -> list[tuple[traffic.DemoRequest, bool]]:
    """The history's requests in time order, each with whether a rate limit refused it.

    Depends on ``requests`` and ``seed`` only (not on the time), so the same
    seed gives the same answers and totals whenever it runs.
    """
    rng = random.Random(seed)  # noqa: S311 - demo data, not security
    mix = [traffic.sample_request(rng) for _ in range(requests)]
    free_users = {user for user, tier in traffic.END_USERS if tier == "free"}
    return [(r, r.user in free_users and rng.random() < RATE_LIMITED_SHARE) for r in mix]


def history_request_id(tenant: Tenant, index: int) -> str:
    return f"{HISTORY_PREFIX}{tenant.pk}_{index:06d}"


def _rollup(tenant: Tenant, now: datetime) -> None:
    """Rebuild the tenant's dashboard rollups (the history just replaced lies behind
    their watermark, which only moves forward), then its forecasts."""
    from dashboard import rollups, services  # noqa: PLC0415 - rollups and forecasts run after the history is written

    rollups.rollup_rebuild(tenant, now)
    services.forecasts_refresh(tenant, now)  # a newcomer sees forecasts at once


def history_rows(tenant: Tenant):
    return UsageEvent.objects.filter(tenant=tenant, request_id__startswith=HISTORY_PREFIX)


def generate(
    tenant: Tenant,
    *,
    days: int = DEFAULT_DAYS,
    requests: int = DEFAULT_REQUESTS,
    seed: int = DEFAULT_SEED,
    now: datetime | None = None,
    force: bool = False,
    traffic_rate: float = 0.0,
    announce: Callable[[str], None] | None = None,
) -> HistoryReport:
    """Write ``requests`` requests of history over the ``days`` days ending ``now``.

    Skipped when the tenant's history is fresh (its newest row younger than
    ``FRESH_FOR``) unless ``force``; otherwise the previous history rows are
    replaced (live rows are never touched). ``traffic_rate``: the live
    simulator's requests per second, which the budgets are sized for (see
    ``_size_budgets``). ``announce`` is told, once, when a history is about to
    be written (it takes a while).
    """
    started = time.perf_counter()
    now = now or timezone.now()
    existing = history_rows(tenant)
    newest = existing.aggregate(m=Max("created_at"))["m"]
    if newest is not None and not force and newest >= now - FRESH_FOR:
        return HistoryReport(skipped=True, events=existing.count())
    if announce is not None:
        announce(
            f"Seeding the demo tenant's history: {requests} requests over {days} days, "
            "run through the demo models..."
        )
    start = now - timedelta(days=days)
    with transaction.atomic():
        setup = ensure_demo_setup(tenant, since=start - timedelta(days=1))
        mix = history_mix(requests, seed)
        times = arrival_times(
            n=requests,
            start=start,
            end=now,
            time_zone=tenant.time_zone,
            rng=random.Random(seed + 1),  # noqa: S311 - demo data, not security
        )
        planned = [
            _Planned(i, at, request, limited)
            for i, (at, (request, limited)) in enumerate(zip(times, mix, strict=True))
        ]
        engine_started = time.perf_counter()
        entries, worst, candidates = _run_cascades(planned, tenant=tenant, setup=setup, seed=seed)
        audited = _finish_audits(
            _label_audits(tenant, _sample_audits(entries, candidates, seed=seed)),
            tenant=tenant,
            now=now,
            seed=seed,
        )
        engine_seconds = time.perf_counter() - engine_started

        _audits_delete(tenant)
        existing.delete()
        audit_spend = [(a.audit.finished_at, a.audit.cost_nanos) for a in audited]
        budgets = _size_budgets(
            entries,
            tenant=tenant,
            setup=setup,
            now=now,
            worst=worst,
            traffic_rate=traffic_rate,
            audit_spend=audit_spend,
        )
        crossings = _replay_budget_status(
            entries, tenant=tenant, setup=setup, budgets=budgets, audit_spend=audit_spend
        )
        for entry in entries:
            usage_event_record(entry=entry)
        _write_audits(tenant, audited, now=now, seed=seed)
        last_used: dict[int, datetime] = {}
        for entry in entries:
            if entry.token_id is not None:
                last_used[entry.token_id] = entry.created_at
        for token_id, at in last_used.items():
            ApiToken.objects.filter(pk=token_id).update(last_used_at=at)
        budget_counters_recompute(tenant=tenant, now=now, since=start)
        _record_alerts(tenant, budgets, crossings)

    _rollup(tenant, now)

    report = HistoryReport(
        events=len(entries),
        engine_seconds=engine_seconds,
        start=start,
        end=now,
        tenant_budget_nanos=budgets[0].limit_nanos,
        free_user_budget_nanos=budgets[1].limit_nanos,
        trial_budget_nanos=budgets[2].limit_nanos,
        audits=len(audited),
        audit_cost_nanos=sum(a.audit.cost_nanos for a in audited),
        calibration_versions=CalibrationVersion.objects.filter(tenant=tenant).count(),
    )
    by_profile: dict[str, int] = defaultdict(int)
    by_domain: dict[str, int] = defaultdict(int)
    for entry in entries:
        if entry.status == UsageStatus.OK:
            report.ok += 1
            report.escalated += entry.escalated
        report.cost_nanos += entry.cost_nanos
        report.baseline_nanos += entry.baseline_cost_nanos
        by_profile[entry.profile or entry.requested_model] += 1
        if entry.domain:
            by_domain[entry.domain] += 1
    report.by_profile, report.by_domain = dict(by_profile), dict(by_domain)
    report.seconds = time.perf_counter() - started
    return report
