"""What each dashboard page shows: selectors in, numbers and figures out."""

import dataclasses
import logging
from dataclasses import dataclass
from datetime import date, datetime, timedelta
from itertools import accumulate
from zoneinfo import ZoneInfo

from django.core.cache import cache

from dashboard import charts, selectors, tasks
from dashboard.charts import Band, Ratio, Series, label, usd
from dashboard.models import SpendForecastSnapshot
from dashboard.selectors import Usage
from routing import selectors as routing_selectors
from routing.engine.policy import PRESETS
from routing.models import CalibrationVersion, RoutingProfile
from tenants.models import Tenant

logger = logging.getLogger(__name__)

FORECAST_MAX_AGE = timedelta(hours=1)
FORECAST_REQUEUE = 300  # seconds before a page may queue the same tenant's forecast again
FORECAST_LEVEL = 0.8  # forecasting.forecast_spend's default
RECENT_HOURS = 48


@dataclass(frozen=True)
class Overview:
    period_start: datetime
    period_end: datetime
    period_first_day: date
    period_last_day: date
    totals: Usage
    gauges: list[selectors.Gauge]
    forecast: SpendForecastSnapshot | None
    figures_json: str
    has_data: bool
    rate_window_hours: int = charts.RATE_WINDOW_HOURS
    rate_min_requests: int = charts.RATE_MIN_REQUESTS


def _forecast(tenant: Tenant, now: datetime, start: datetime) -> SpendForecastSnapshot | None:
    """This period's stored forecast. Fitting one is a worker's job, not the page's: a
    missing or stale one is queued (once per tenant per FORECAST_REQUEUE) and the page
    shows what there is meanwhile."""
    snap = selectors.forecast_snapshot(tenant)
    stale = snap is None or snap.period_start != start or now - snap.computed_at > FORECAST_MAX_AGE
    if stale and cache.add(f"dashboard:forecast-queued:{tenant.pk}", 1, FORECAST_REQUEUE):
        try:
            tasks.tenant_forecast_refresh.apply_async((tenant.pk,), retry=False)
        except Exception:  # a broker outage must not take the dashboard down with it
            logger.warning("Could not queue the forecast of tenant %s", tenant.slug, exc_info=True)
        snap = selectors.forecast_snapshot(tenant)  # already fresh when tasks run in-process
    return snap if snap is not None and snap.period_start == start else None


def overview(tenant: Tenant, now: datetime) -> Overview:
    tz = ZoneInfo(tenant.time_zone or "UTC")
    start, end = selectors.forecast_period(tenant, now)
    hours = selectors.hourly_points(tenant, min(start, now - timedelta(hours=RECENT_HOURS)), now)
    in_period = [p for p in hours if p.at >= start]
    recent = [p for p in hours if p.at > now - timedelta(hours=RECENT_HOURS)]
    totals = Usage()
    for p in in_period:
        totals.add(p.usage)
    days = selectors.daily_points(in_period, tenant.time_zone)
    minutes = selectors.minute_points(tenant, now)
    gauges = selectors.budget_gauges(tenant, now)
    snap = _forecast(tenant, now, start)

    hx = [label(p.at, tz) for p in recent]
    dx = [label(p.at, tz, False) for p in days]
    figures = {
        "spend_hourly": charts.spend_bars(
            title="Spend per hour",
            spend=Series("Paid", hx, [usd(p.usage.cost_nanos) for p in recent]),
            baseline=Series(
                "All on the strongest model", hx, [usd(p.usage.baseline_cost_nanos) for p in recent]
            ),
        ),
        "spend_daily": charts.spend_bars(
            title="Spend per day (this period)",
            spend=Series("Paid", dx, [usd(p.usage.cost_nanos) for p in days]),
            baseline=Series(
                "All on the strongest model", dx, [usd(p.usage.baseline_cost_nanos) for p in days]
            ),
            dates=charts.DAY_TICKS,
        ),
        "forecast": _forecast_figure(days, snap, tz),
        "escalation": charts.rate(
            title="Escalation rate and estimated quality",
            short_title="Escalation and quality",
            rate=Ratio(
                "Escalated",
                hx,
                [p.usage.escalated for p in recent],
                [p.usage.answered for p in recent],
            ),
            volume=Series("Requests", hx, [p.usage.requests for p in recent]),
            quality=Ratio(
                "Estimated quality",
                hx,
                [p.usage.quality_sum for p in recent],
                [p.usage.quality_n for p in recent],
            ),
        ),
        "rpm": charts.counts(
            title="Requests per minute (last hour)",
            series=Series(
                "Requests", [label(p.at, tz) for p in minutes], [p.usage.requests for p in minutes]
            ),
        ),
    }
    for i, g in enumerate(gauges):
        figures[f"gauge_{i}"] = charts.gauge(
            name=g.label,
            spent_nanos=g.spent_nanos,
            limit_nanos=g.limit_nanos,
            thresholds=g.thresholds,
            level=g.level,
        )
    return Overview(
        period_start=start,
        period_end=end,
        period_first_day=start.astimezone(tz).date(),
        period_last_day=(end - timedelta(seconds=1)).astimezone(tz).date(),
        totals=totals,
        gauges=gauges,
        forecast=snap,
        figures_json=charts.to_json(figures),
        has_data=any(p.usage.requests for p in hours),
    )


def _forecast_figure(days, snap, tz):
    actual_x = [label(p.at, tz, False) for p in days]
    actual_y = list(accumulate(usd(p.usage.cost_nanos) for p in days))
    expected_x, expected_y, band = [], [], None
    if snap is not None and snap.days:
        expected_x = [d["day"] for d in snap.days]
        expected_y = [usd(d["cum"]) for d in snap.days]
        band = Band(
            x=expected_x,
            low=[usd(d["cum_low"]) for d in snap.days],
            high=[usd(d["cum_high"]) for d in snap.days],
            name=f"{round(100 * FORECAST_LEVEL)}% interval",
        )
    return charts.forecast(
        actual=Series("Spent", actual_x, actual_y),
        expected=Series("Forecast", expected_x, expected_y),
        band=band,
        limit_nanos=snap.limit_nanos if snap is not None else None,
    )


RANGES = {"24h": timedelta(hours=24), "7d": timedelta(days=7)}  # else: the budget period
RANGE_CHOICES = [("24h", "24 hours"), ("7d", "7 days"), ("period", "This period")]


@dataclass(frozen=True)
class Breakdowns:
    range: str
    start: datetime
    by_model: list[tuple[str, Usage]]
    by_draft: list[tuple[str, Usage]]
    by_profile: list[tuple[str, Usage]]
    by_domain: list[tuple[str, Usage]]
    figures_json: str
    quality: tuple[routing_selectors.ProfileQuality, ...] = ()


def _range_start(tenant: Tenant, now: datetime, range_: str) -> tuple[str, datetime]:
    if range_ in RANGES:
        return range_, now - RANGES[range_]
    return "period", selectors.forecast_period(tenant, now)[0]


def profile_names(tenant: Tenant, served: list[str]) -> list[str]:
    """The cascades worth a quality line: the tenant's own profiles and every built-in
    preset requests named (``served``: full names from the usage breakdown)."""
    own = RoutingProfile.objects.filter(tenant=tenant).values_list("name", flat=True)
    names = {routing_selectors.profile_full_name(n) for n in own}
    for name in served:
        short = (name or "").removeprefix(routing_selectors.PROFILE_PREFIX)
        if name.startswith(routing_selectors.PROFILE_PREFIX) and short in PRESETS:
            names.add(name)
    return sorted(names)


def profile_quality(
    tenant: Tenant, name: str, start: datetime, now: datetime
) -> routing_selectors.ProfileQuality:
    """What the management API's quality endpoint returns, for the same window."""
    return routing_selectors.profile_quality(
        tenant_id=tenant.pk,
        tenant_audits=tenant.audits_enabled,
        name=name,
        start=start,
        end=now,
    )


@dataclass(frozen=True)
class ProfilePage:
    name: str  # cascade/<name>
    short: str
    range: str
    start: datetime
    quality: routing_selectors.ProfileQuality
    versions: list[CalibrationVersion]  # newest first
    active: CalibrationVersion | None

    @property
    def overall_rows(self) -> list[routing_selectors.QualityRow]:
        return [dataclasses.replace(self.quality.overall, key=self.name)]


def profile(tenant: Tenant, name: str, now: datetime, range_: str) -> ProfilePage:
    """One profile's measured quality and calibration history (``name`` must be known)."""
    range_, start = _range_start(tenant, now, range_)
    versions = list(routing_selectors.calibration_versions(tenant_id=tenant.pk, name=name))
    full = routing_selectors.profile_full_name(name)
    return ProfilePage(
        name=full,
        short=full.removeprefix(routing_selectors.PROFILE_PREFIX),
        range=range_,
        start=start,
        quality=profile_quality(tenant, name, start, now),
        versions=versions,
        active=next((v for v in versions if v.active), None),
    )


def models(tenant: Tenant, now: datetime, range_: str) -> Breakdowns:
    """Spend, volume, latency and acceptance per model, draft model, profile and domain."""
    range_, start = _range_start(tenant, now, range_)
    rows = selectors.hourly_usage_grouped(tenant, selectors.hour_floor(start), now)
    by_model = selectors.breakdown(rows, "model")
    by_profile = selectors.breakdown(rows, "profile")
    figures = {
        "by_model": charts.bars_by(
            title="Spend by answering model",
            labels=[name or "(no answer)" for name, _ in by_model],
            values=[usd(u.cost_nanos) for _, u in by_model],
            money=True,
        ),
        "by_profile": charts.bars_by(
            title="Spend by routing profile",
            labels=[name or "(direct model)" for name, _ in by_profile],
            values=[usd(u.cost_nanos) for _, u in by_profile],
            money=True,
        ),
    }
    return Breakdowns(
        range=range_,
        start=start,
        by_model=by_model,
        by_draft=selectors.breakdown(rows, "draft_model"),
        by_profile=by_profile,
        by_domain=selectors.breakdown(rows, "domain"),
        figures_json=charts.to_json(figures),
        quality=tuple(
            profile_quality(tenant, name, start, now)
            for name in profile_names(tenant, [name for name, _ in by_profile])
        ),
    )
