"""Reads for the dashboard: rollups merged with the ledger's open tail.

Closed hours come from HourlyUsage (and local days from DailyUsage); whatever
happened after the tenant's rollup watermark is aggregated from raw ledger rows
with the same code the rollup uses, so the two halves agree to the nano-dollar. The
overview's open hours and minutes come from MinuteUsage, and raw rows only after it.
"""

from collections import defaultdict
from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import UTC, date, datetime, timedelta
from zoneinfo import ZoneInfo

from django.core.paginator import Page, Paginator
from django.db.models import BigIntegerField, F, QuerySet, Sum
from django.db.models.fields.json import KT
from django.db.models.functions import Cast, Coalesce

from billing.models import ExportJob, TenantSubscription
from dashboard.models import (
    LATENCY_BOUNDS_MS,
    DailyUsage,
    HourlyTotal,
    HourlyUsage,
    MinuteUsage,
    RollupState,
    SpendForecastSnapshot,
)
from dashboard.rollups import (
    MINUTES_KEPT,
    daily_rows,
    hour_floor,
    hourly_rows,
    minute_floor,
    minute_rows,
)
from routing.models import TenantProviderModel, UsageEvent
from tenants.budgets import effective_thresholds, period_bounds, threshold_level
from tenants.enums import BudgetDecision, BudgetPeriod, BudgetScope
from tenants.models import ApiToken, Budget, BudgetAlert, BudgetCounter, EndUser, Tenant, Tier
from tenants.selectors import BudgetStatus, budget_statuses


@dataclass
class Usage:
    """Additive request counts and money; the unit every chart and table is built from."""

    requests: int = 0
    errors: int = 0
    escalated: int = 0
    cost_nanos: int = 0
    baseline_cost_nanos: int = 0
    latency_ms_sum: int = 0
    latency_hist: list[int] = field(default_factory=list)
    quality_sum: float = 0.0
    quality_n: int = 0

    def add(self, row) -> "Usage":
        self.quality_sum += getattr(row, "quality_sum", 0.0) or 0.0
        self.quality_n += getattr(row, "quality_n", 0) or 0
        self.requests += row.requests
        self.errors += row.errors
        self.escalated += row.escalated
        self.cost_nanos += row.cost_nanos
        self.baseline_cost_nanos += row.baseline_cost_nanos
        hist = getattr(row, "latency_hist", None)
        if hist:
            self.latency_ms_sum += row.latency_ms_sum
            if not self.latency_hist:
                self.latency_hist = [0] * len(hist)
            self.latency_hist = [a + b for a, b in zip(self.latency_hist, hist, strict=True)]
        return self

    @property
    def quality_pct(self) -> float | None:
        """Mean calibrated probability that an answer was acceptable (quality checks)."""
        return 100.0 * self.quality_sum / self.quality_n if self.quality_n else None

    @property
    def answered(self) -> int:
        return self.requests - self.errors

    @property
    def savings_nanos(self) -> int:
        """What sending everything to the strongest model would have cost, minus what
        was paid (drafts, checks and escalations included)."""
        return self.baseline_cost_nanos - self.cost_nanos

    @property
    def savings_pct(self) -> float | None:
        if self.baseline_cost_nanos <= 0:
            return None
        return 100.0 * self.savings_nanos / self.baseline_cost_nanos

    @property
    def escalation_pct(self) -> float | None:
        return 100.0 * self.escalated / self.answered if self.answered else None

    @property
    def acceptance_pct(self) -> float | None:
        """Share of answered requests whose first (cheapest) draft was accepted."""
        return 100.0 - self.escalation_pct if self.answered else None

    def latency_pct(self, q: float) -> float | None:
        """Latency percentile estimated from the histogram (linear within a bucket)."""
        total = sum(self.latency_hist)
        if not total:
            return None
        rank, seen = q * total, 0
        bounds = (0, *LATENCY_BOUNDS_MS)
        for i, count in enumerate(self.latency_hist):
            if count and seen + count >= rank:
                lo = bounds[i]
                hi = bounds[i + 1] if i + 1 < len(bounds) else lo * 2
                return lo + (hi - lo) * (rank - seen) / count
            seen += count
        return float(bounds[-1])


@dataclass(frozen=True)
class Point:
    at: datetime
    usage: Usage


def rollup_watermark(tenant: Tenant) -> tuple[datetime | None, date | None]:
    state = RollupState.objects.filter(tenant=tenant).values_list("hourly_until", "daily_until")
    return state.first() or (None, None)


_DIMENSIONS = ("model", "draft_model", "profile", "domain")


def hourly_usage_grouped(tenant: Tenant, start: datetime, now: datetime) -> list[HourlyUsage]:
    """Usage from ``start`` to now, one row per model x draft model x profile x domain:
    stored rows summed in SQL (histograms included), then the open tail's rows."""
    watermark, _ = rollup_watermark(tenant)
    grouped: list[HourlyUsage] = []
    if watermark is not None and watermark > start:
        buckets = len(LATENCY_BOUNDS_MS) + 1
        hist = {
            f"h{i}": Coalesce(Sum(Cast(KT(f"latency_hist__{i}"), BigIntegerField())), 0)
            for i in range(buckets)
        }
        for g in (
            HourlyUsage.objects.filter(tenant=tenant, hour__gte=start, hour__lt=watermark)
            .values(*_DIMENSIONS)
            .annotate(
                n=Sum("requests"),
                e=Sum("errors"),
                x=Sum("escalated"),
                c=Sum("cost_nanos"),
                b=Sum("baseline_cost_nanos"),
                lat=Sum("latency_ms_sum"),
                qs=Sum("quality_sum"),
                qn=Sum("quality_n"),
                **hist,
            )
            .order_by()
        ):
            grouped.append(
                HourlyUsage(
                    **{d: g[d] for d in _DIMENSIONS},
                    requests=g["n"],
                    errors=g["e"],
                    escalated=g["x"],
                    cost_nanos=g["c"],
                    baseline_cost_nanos=g["b"],
                    latency_ms_sum=g["lat"],
                    latency_hist=[g[f"h{i}"] for i in range(buckets)],
                    quality_sum=g["qs"] or 0.0,
                    quality_n=g["qn"] or 0,
                )
            )
    tail_from = max(start, watermark) if watermark is not None else start
    return grouped + hourly_rows(tenant.pk, tail_from, now + timedelta(seconds=1))


def _usage_sums() -> dict:
    """Sums of the additive rollup columns that make a :class:`Usage`."""
    fields = ("requests", "errors", "escalated", "cost_nanos", "baseline_cost_nanos")
    return {f: Sum(f) for f in fields}


def hourly_points(tenant: Tenant, start: datetime, now: datetime) -> list[Point]:
    """Usage per UTC hour from ``start`` to now, zero-filled."""
    by_hour: dict[datetime, Usage] = defaultdict(Usage)
    watermark, _ = rollup_watermark(tenant)
    if watermark is not None and watermark > start:
        for row in HourlyTotal.objects.filter(tenant=tenant, hour__gte=start, hour__lt=watermark):
            by_hour[row.hour.astimezone(UTC)].add(row)
    tail_from = max(start, watermark) if watermark is not None else start
    for minute, usage in minute_usage(tenant, tail_from, now).items():
        by_hour[hour_floor(minute)].add(usage)
    points, at = [], hour_floor(start)
    while at <= now:
        points.append(Point(at, by_hour.get(at, Usage())))
        at += timedelta(hours=1)
    return points


def daily_points(points: Iterable[Point], time_zone: str) -> list[Point]:
    """Hourly points folded into tenant-local days (each point at local midnight)."""
    tz = ZoneInfo(time_zone or "UTC")
    by_day: dict[date, Usage] = {}
    for p in points:
        by_day.setdefault(p.at.astimezone(tz).date(), Usage()).add(p.usage)
    return [
        Point(datetime(d.year, d.month, d.day, tzinfo=tz), u) for d, u in sorted(by_day.items())
    ]


def minute_usage(tenant: Tenant, start: datetime, now: datetime) -> dict[datetime, Usage]:
    """Usage per UTC minute from ``start`` to now: the rolled minutes (MinuteUsage), and
    the ledger's events around them (after ``minutely_until``: the last minute or two
    while the minute rollup runs; before the minutes kept, only if asked for)."""
    until = (
        RollupState.objects.filter(tenant=tenant).values_list("minutely_until", flat=True).first()
    )
    end = now + timedelta(seconds=1)
    raw = [(start, end)]
    by_minute: dict[datetime, Usage] = defaultdict(Usage)
    first_whole = minute_floor(start) + (
        timedelta(minutes=1) if minute_floor(start) < start else timedelta()
    )
    if until is not None:
        covered_from = max(first_whole, until - MINUTES_KEPT)
        if covered_from < until:
            for row in MinuteUsage.objects.filter(
                tenant=tenant, minute__gte=covered_from, minute__lt=until
            ):
                by_minute[row.minute.astimezone(UTC)].add(row)
            raw = [(start, covered_from), (until, end)]
    for low, high in raw:
        if low < high:
            for row in minute_rows(tenant.pk, low, high):
                by_minute[row.minute.astimezone(UTC)].add(row)
    return by_minute


def minute_points(tenant: Tenant, now: datetime, minutes: int = 60) -> list[Point]:
    """Requests per minute over the last ``minutes`` (``minute_usage``)."""
    start = minute_floor(now) - timedelta(minutes=minutes - 1)
    by_minute = minute_usage(tenant, start, now)
    return [
        Point(at, by_minute.get(at, Usage()))
        for at in (start + timedelta(minutes=i) for i in range(minutes))
    ]


# --- budgets and forecasts -----------------------------------------------------------


@dataclass(frozen=True)
class Gauge:
    budget: Budget
    label: str
    period_start: datetime
    period_end: datetime | None
    spent_nanos: int
    limit_nanos: int

    @property
    def used_pct(self) -> float:
        return 100.0 * self.spent_nanos / self.limit_nanos if self.limit_nanos else 0.0

    @property
    def thresholds(self) -> tuple[int, int, int]:
        b = self.budget
        return effective_thresholds(
            scope=b.scope, given=(b.warn_pct, b.degrade_pct, b.block_pct), tier=None
        )

    @property
    def level(self) -> str:
        """allow / warn / degrade / block, from what is spent (as the budgets page shows it)."""
        return threshold_level(self.spent_nanos, self.limit_nanos, self.thresholds)

    @property
    def state(self) -> str:
        """The level as the dashboard names it: ok / warn / degrade / block."""
        return "ok" if self.level == BudgetDecision.ALLOW else self.level


def budget_gauges(tenant: Tenant, now: datetime) -> list[Gauge]:
    """Spend this period against each tenant-wide budget, from the budget counters."""
    gauges = []
    budgets = list(Budget.objects.filter(tenant=tenant, scope=BudgetScope.TENANT).order_by("pk"))
    bounds = {b.pk: period_bounds(b.period, now, tenant.time_zone) for b in budgets}
    counters = {
        (c.budget_id, c.period_start): c.spent_nanos
        for c in BudgetCounter.objects.filter(
            tenant=tenant, budget__in=budgets, subject_id=0
        ).filter(period_start__in={start for start, _ in bounds.values()})
    }
    for b in budgets:
        start, end = bounds[b.pk]
        gauges.append(
            Gauge(
                budget=b,
                label=f"{BudgetPeriod(b.period).label} budget",
                period_start=start,
                period_end=end,
                spent_nanos=counters.get((b.pk, start), 0),
                limit_nanos=b.limit_nanos,
            )
        )
    return gauges


def forecast_period(tenant: Tenant, now: datetime) -> tuple[datetime, datetime]:
    """The period forecasts run to: the calendar month in the tenant's time zone (the
    period of monthly budgets, whose limits :func:`monthly_budgets` gives)."""
    return period_bounds(BudgetPeriod.MONTH, now, tenant.time_zone)


def monthly_budgets(tenant: Tenant, end_user_ids: list[int]) -> dict[int, tuple[Budget, int]]:
    """The tightest monthly budget per subject, with the counter subject it is kept under.

    Subject 0 is the tenant (its tenant-wide budgets); an end user's id gets its own
    end-user budgets and its tier's per-user budgets (counted under its id)."""
    out: dict[int, tuple[Budget, int]] = {}

    def consider(uid: int, budget: Budget, subject_id: int) -> None:
        if uid not in out or budget.limit_nanos < out[uid][0].limit_nanos:
            out[uid] = (budget, subject_id)

    budgets = list(
        Budget.objects.filter(
            tenant=tenant,
            period=BudgetPeriod.MONTH,
            scope__in=[BudgetScope.TENANT, BudgetScope.END_USER, BudgetScope.TIER],
        )
    )
    tiers: dict[int, int] = {}
    if end_user_ids and any(b.scope == BudgetScope.TIER for b in budgets):
        tiers = dict(
            EndUser.objects.filter(
                tenant=tenant, pk__in=end_user_ids, tier__isnull=False
            ).values_list("pk", "tier_id")
        )
    wanted = set(end_user_ids)
    for b in budgets:
        if b.scope == BudgetScope.TENANT:
            consider(0, b, 0)
        elif b.scope == BudgetScope.END_USER and b.end_user_id in wanted:
            consider(b.end_user_id, b, 0)
        elif b.scope == BudgetScope.TIER:
            for uid, tier_id in tiers.items():
                if tier_id == b.tier_id:
                    consider(uid, b, uid)
    return out


def forecast_snapshot(tenant: Tenant, end_user_id: int = 0) -> SpendForecastSnapshot | None:
    return SpendForecastSnapshot.objects.filter(tenant=tenant, end_user_id=end_user_id).first()


# --- breakdowns ----------------------------------------------------------------------


def breakdown(rows: Iterable[HourlyUsage], key: str) -> list[tuple[str, Usage]]:
    """Usage grouped by one HourlyUsage dimension (model, draft_model, profile, domain)."""
    groups: dict[str, Usage] = defaultdict(Usage)
    for row in rows:
        groups[getattr(row, key)].add(row)
    return sorted(groups.items(), key=lambda kv: (-kv[1].cost_nanos, kv[0]))


@dataclass(frozen=True)
class EndUserLine:
    end_user: EndUser | None
    end_user_id: int
    usage: Usage
    forecast: SpendForecastSnapshot | None
    budget: Budget | None = None  # the tightest monthly budget on this end user
    budget_spent_nanos: int = 0  # its counter this period

    @property
    def budget_used_pct(self) -> float | None:
        if self.budget is None or not self.budget.limit_nanos:
            return None
        return 100.0 * self.budget_spent_nanos / self.budget.limit_nanos


def end_user_lines(tenant: Tenant, now: datetime, limit: int = 50) -> list[EndUserLine]:
    """Top end users by spend this period (daily rollups + the open tail)."""
    start, _ = forecast_period(tenant, now)
    tz = ZoneInfo(tenant.time_zone or "UTC")
    first_day = start.astimezone(tz).date()
    _, daily_until = rollup_watermark(tenant)
    totals: dict[int, Usage] = defaultdict(Usage)
    if daily_until is not None and daily_until > first_day:
        for row in (
            DailyUsage.objects.filter(tenant=tenant, day__gte=first_day, day__lt=daily_until)
            .values("end_user_id")
            .annotate(**_usage_sums())
            .order_by()
        ):
            totals[row.pop("end_user_id")].add(Usage(**row))
    tail_day = max(first_day, daily_until) if daily_until is not None else first_day
    tomorrow = now.astimezone(tz).date() + timedelta(days=1)
    for row in daily_rows(tenant.pk, tenant.time_zone, tail_day, tomorrow):
        totals[row.end_user_id].add(row)
    top = sorted(totals.items(), key=lambda kv: -kv[1].cost_nanos)[:limit]
    ids = [i for i, _ in top if i]
    users = {
        u.pk: u for u in EndUser.objects.filter(tenant=tenant, pk__in=ids).select_related("tier")
    }
    forecasts = {
        f.end_user_id: f
        for f in SpendForecastSnapshot.objects.filter(tenant=tenant, end_user_id__in=ids)
    }
    budgets = monthly_budgets(tenant, ids)
    start, _ = period_bounds(BudgetPeriod.MONTH, now, tenant.time_zone)
    spent = {
        (c.budget_id, c.subject_id): c.spent_nanos
        for c in BudgetCounter.objects.filter(
            tenant=tenant,
            budget__in=[b for uid, (b, _) in budgets.items() if uid],
            period_start=start,
        )
    }
    lines = []
    for i, usage in top:
        budget, subject = budgets.get(i, (None, 0)) if i else (None, 0)
        lines.append(
            EndUserLine(
                users.get(i),
                i,
                usage,
                forecasts.get(i),
                budget,
                spent.get((budget.pk, subject), 0) if budget else 0,
            )
        )
    return lines


# --- the management pages' reads --------------------------------------------------------

ALERTS_PER_PAGE = 50
EXPORT_JOBS_SHOWN = 10


def tokens_of(*, tenant: Tenant) -> QuerySet[ApiToken]:
    return ApiToken.objects.filter(tenant=tenant).order_by("-created_at")


@dataclass(frozen=True)
class BudgetRow:
    status: BudgetStatus
    subject: str

    @property
    def budget(self) -> Budget:
        return self.status.budget


def budget_subject(budget: Budget) -> str:
    """Who a budget counts, in words."""
    if budget.scope == BudgetScope.TIER:
        return f"Each end user of tier “{budget.tier.name}”"
    if budget.scope == BudgetScope.END_USER:
        return budget.end_user.external_id
    if budget.scope == BudgetScope.TOKEN:
        return f"{budget.token.name} ({budget.token.mask})"
    return "Whole tenant"


def budget_rows(*, tenant: Tenant, now: datetime, time_zone: str) -> list[BudgetRow]:
    """Budgets where they stand this period, as the API shows them (one rule, one query)."""
    budgets = list(
        Budget.objects.filter(tenant=tenant)
        .select_related("tier", "end_user__tier", "token")
        .order_by("scope", "period", "id")
    )
    statuses = budget_statuses(tenant_id=tenant.pk, time_zone=time_zone, now=now, budgets=budgets)
    return [BudgetRow(statuses[b.pk], budget_subject(b)) for b in budgets]


def alerts_page(*, tenant: Tenant, page_number: str | None) -> Page:
    """One page of the tenant's budget alerts, newest first, each with its subject."""
    alerts = (
        BudgetAlert.objects.filter(tenant=tenant)
        .select_related("budget__tier", "budget__end_user", "budget__token")
        .order_by("-created_at", "-id")
    )
    page = Paginator(alerts, ALERTS_PER_PAGE).get_page(page_number)
    subject_ids = {a.subject_id for a in page if a.subject_id}
    names = dict(
        EndUser.objects.filter(tenant=tenant, pk__in=subject_ids).values_list("pk", "external_id")
    )
    for alert in page:
        alert.subject = names.get(alert.subject_id) or budget_subject(alert.budget)
    return page


def plans() -> QuerySet[Tier]:
    """The plans a tenant may choose, the default first, then by monthly budget."""
    return Tier.objects.order_by(
        "-is_default", F("monthly_budget_nanos").asc(nulls_last=True), "name"
    )


def subscription_of(*, tenant: Tenant) -> TenantSubscription | None:
    return TenantSubscription.objects.filter(tenant=tenant).select_related("paid_tier").first()


def export_jobs_recent(*, tenant: Tenant) -> QuerySet[ExportJob]:
    return ExportJob.objects.filter(tenant=tenant).order_by("-created_at")[:EXPORT_JOBS_SHOWN]


def usage_row_count(*, tenant: Tenant, start: datetime, end: datetime) -> int:
    """Ledger rows in [start, end): what a per-request export would hold."""
    return UsageEvent.objects.filter(
        tenant_id=tenant.pk, created_at__gte=start, created_at__lt=end
    ).count()


def provider_models_of(*, tenant: Tenant) -> QuerySet[TenantProviderModel]:
    """The tenant's own provider models (BYOK), by name."""
    return TenantProviderModel.objects.filter(tenant=tenant).order_by("name")
