"""Writes of the dashboard: forecast snapshots (rollups live in dashboard.rollups)."""

from collections import defaultdict
from datetime import date, datetime, timedelta
from zoneinfo import ZoneInfo

from django.conf import settings
from django.db import transaction
from django.db.models import Sum
from django.utils import timezone

from core import outbox
from dashboard.batch_forecasting import forecast_spend_batch
from dashboard.forecasting import forecast_spend
from dashboard.models import DailyUsage, SpendForecastSnapshot
from dashboard.rollups import daily_rows
from dashboard.selectors import forecast_period, monthly_budgets, rollup_watermark
from tenants.budgets import Crossing, alerts_record
from tenants.models import Budget, Tenant

HISTORY_DAYS = 56  # eight weeks: enough for weekly seasonality, short enough to follow change
END_USER_ACTIVE_DAYS = 14  # end users forecast: those with spend in this window


def daily_spend(
    tenant: Tenant, first: date, last: date, by_end_user: bool = True
) -> dict[int, dict[date, int]]:
    """Spend per end user (0 = none) per local day in [first, last], rollups + open tail;
    with ``by_end_user=False``, the tenant's total per day under key 0."""
    out: dict[int, dict[date, int]] = defaultdict(dict)
    _, daily_until = rollup_watermark(tenant)
    if daily_until is not None and daily_until > first:
        stored = DailyUsage.objects.filter(tenant=tenant, day__gte=first, day__lt=daily_until)
        if by_end_user:
            stored = stored.values("end_user_id", "day")
        else:
            stored = stored.values("day")
        for row in stored.annotate(cost=Sum("cost_nanos")).order_by():
            per_day = out[row.get("end_user_id", 0)]
            per_day[row["day"]] = per_day.get(row["day"], 0) + row["cost"]
    tail = max(first, daily_until) if daily_until is not None else first
    for row in daily_rows(tenant.pk, tenant.time_zone, tail, last + timedelta(days=1)):
        per_day = out[row.end_user_id if by_end_user else 0]
        per_day[row.day] = per_day.get(row.day, 0) + row.cost_nanos
    return out


def _inputs(per_day: dict[date, int], today: date, first_day: date) -> tuple[list[int], int, int]:
    """(history, spent in the period, spent today) of one subject's spend per local day."""
    history = [per_day.get(today - timedelta(days=i), 0) for i in range(HISTORY_DAYS, 0, -1)]
    # Days before the first day with spend are "not a customer yet", not zero spend.
    while history and history[0] == 0:
        history.pop(0)
    spent = sum(v for d, v in per_day.items() if first_day <= d <= today)
    return history, spent, per_day.get(today, 0)


def forecasts_refresh(tenant: Tenant, now: datetime | None = None, end_users: bool = True) -> int:
    """Recompute the tenant's forecast and those of its recently active end users.

    The tenant's own series is fitted alone (forecast_spend); its end users' are
    forecast together (forecast_spend_batch: one vectorised fit for all of them)."""
    now = now or timezone.now()
    tz = ZoneInfo(tenant.time_zone or "UTC")
    start, end = forecast_period(tenant, now)
    local_now = now.astimezone(tz)
    today = local_now.date()
    first_day, last_day = (
        start.astimezone(tz).date(),
        (end - timedelta(seconds=1)).astimezone(tz).date(),
    )
    midnight = datetime(today.year, today.month, today.day, tzinfo=tz)
    fraction = min(1.0, max(0.0, (local_now - midnight).total_seconds() / 86_400))
    series = daily_spend(
        tenant, min(first_day, today - timedelta(days=HISTORY_DAYS)), today, by_end_user=end_users
    )

    totals: dict[date, int] = defaultdict(int)
    for per_day in series.values():
        for d, v in per_day.items():
            totals[d] += v
    active_since = today - timedelta(days=END_USER_ACTIVE_DAYS)
    active = [
        uid
        for uid, per_day in series.items()
        if uid and end_users and any(d >= active_since and v for d, v in per_day.items())
    ]
    budgets = monthly_budgets(tenant, active)
    limits = [budgets[uid][0].limit_nanos if uid in budgets else None for uid in active]
    period = {"today": today, "period_end": last_day, "day_fraction_elapsed": fraction}
    history, spent, today_spent = _inputs(totals, today, first_day)
    own = forecast_spend(
        history=history,
        spent_nanos=spent,
        today_spent_nanos=today_spent,
        limit_nanos=budgets[0][0].limit_nanos if 0 in budgets else None,
        **period,
    )
    inputs = [_inputs(series[uid], today, first_day) for uid in active]
    forecasts = [
        own,
        *forecast_spend_batch(
            histories=[h for h, _, _ in inputs],
            spent_nanos=[s for _, s, _ in inputs],
            today_spent_nanos=[t for _, _, t in inputs],
            limit_nanos=limits,
            **period,
        ),
    ]
    snapshots = [
        SpendForecastSnapshot(
            tenant=tenant,
            end_user_id=uid,
            period_start=start,
            period_end=end,
            computed_at=now,
            method=f.method,
            spent_nanos=f.spent_nanos,
            expected_nanos=f.expected_nanos,
            low_nanos=f.low_nanos,
            high_nanos=f.high_nanos,
            limit_nanos=f.limit_nanos,
            runs_out_on=f.runs_out_on,
            exceed_probability=f.exceed_probability,
            days=[
                {
                    "day": d.day.isoformat(),
                    "mean": d.mean_nanos,
                    "low": d.low_nanos,
                    "high": d.high_nanos,
                    "cum": d.cumulative_nanos,
                    "cum_low": d.cumulative_low_nanos,
                    "cum_high": d.cumulative_high_nanos,
                }
                for d in f.days
            ],
        )
        for uid, f in zip([0, *active], forecasts, strict=True)
    ]
    with transaction.atomic():
        stale = SpendForecastSnapshot.objects.filter(tenant=tenant)
        if not end_users:
            stale = stale.filter(end_user_id=0)
        stale.delete()
        SpendForecastSnapshot.objects.bulk_create(snapshots, batch_size=500)
        forecast_alerts_record(tenant, snapshots, budgets)
    return len(snapshots)


def forecast_alerts_record(
    tenant: Tenant,
    snapshots: list[SpendForecastSnapshot],
    budgets: dict[int, tuple[Budget, int]],
) -> list[int]:
    """A "forecast" alert, once per budget and period, when the budget is likely to run out.

    Likely: the expected path crosses the limit before the period ends and the
    forecast puts the chance of ending over the limit at FORECAST_ALERT_PROBABILITY
    or more. Delivered like threshold alerts (email and signed webhook)."""
    threshold = settings.CASCADEFLOW_FORECAST_ALERT_PROBABILITY
    crossings = [
        Crossing(
            budget_id=budgets[s.end_user_id][0].pk,
            subject_id=budgets[s.end_user_id][1],
            period_start=s.period_start,
            level="forecast",
            spent_nanos=s.spent_nanos,
            limit_nanos=s.limit_nanos,
        )
        for s in snapshots
        if s.end_user_id in budgets
        and s.limit_nanos
        and s.runs_out_on is not None
        and (s.exceed_probability or 0.0) >= threshold
    ]
    ids = alerts_record(tenant_id=tenant.pk, crossings=crossings) if crossings else []
    if ids:
        from tenants.tasks import budget_alerts_deliver  # noqa: PLC0415 - tenants.tasks imports the services of every app

        transaction.on_commit(lambda: outbox.send(budget_alerts_deliver, ids))
    return ids
