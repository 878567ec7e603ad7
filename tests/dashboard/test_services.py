"""dashboard.services.forecasts_refresh: the tenant fitted alone, its end users in one batch."""

from datetime import UTC, date, datetime, timedelta

import numpy as np
import pytest

from dashboard import batch_forecasting, services
from dashboard.batch_forecasting import forecast_spend_batch
from dashboard.forecasting import forecast_spend
from dashboard.models import DailyUsage, RollupState, SpendForecastSnapshot
from tenants.enums import BudgetPeriod, BudgetScope
from tenants.models import Budget, BudgetAlert
from tests.factories import EndUserFactory

pytestmark = pytest.mark.django_db

USD = 10**9
NOW = datetime(2026, 3, 10, 15, 0, tzinfo=UTC)  # 62.5 % of the day gone
TODAY = NOW.date()
PERIOD_END = date(2026, 3, 31)


def spend(days, level, seed):
    """Daily nanos for the ``days`` days before today, spent on about two days in three."""
    rng = np.random.default_rng(seed)
    return [
        int(rng.lognormal(0, 0.5) * level * USD) if i == 0 or rng.random() < 0.7 else 0
        for i in range(days)
    ]


def rolled_up(tenant, series_by_user):
    """The tenant's spend as daily rollups up to yesterday: {end user id: daily nanos}."""
    DailyUsage.objects.bulk_create(
        DailyUsage(
            tenant=tenant,
            day=TODAY - timedelta(days=len(series) - i),
            end_user_id=uid,
            model="demo/small",
            requests=1,
            cost_nanos=cost,
        )
        for uid, series in series_by_user.items()
        for i, cost in enumerate(series)
        if cost
    )
    RollupState.objects.create(tenant=tenant, hourly_until=NOW, daily_until=TODAY)


def inputs(series):
    """(history, spent this period) as the refresh reads them: the last HISTORY_DAYS."""
    history = series[-services.HISTORY_DAYS :]
    while history and history[0] == 0:
        history = history[1:]
    return history, sum(series[-(TODAY.day - 1) :])


def test_end_users_are_forecast_in_one_batch_and_the_tenant_alone(tenant, monkeypatch):
    monkeypatch.setattr(batch_forecasting, "ETS_SERIES", 1)
    series = {
        11: spend(40, level=30, seed=1),  # the largest spender: still fitted alone
        12: spend(40, level=1, seed=2),
        13: spend(20, level=2, seed=3),
        14: spend(3, level=1, seed=4),  # three days: the run rate
    }
    rolled_up(tenant, series)

    count = services.forecasts_refresh(tenant, NOW)

    snaps = {s.end_user_id: s for s in SpendForecastSnapshot.objects.filter(tenant=tenant)}
    assert count == len(snaps) == 5
    assert {uid: s.method for uid, s in snaps.items()} == {
        0: "ets",
        11: "ets",
        12: "ets_batch",
        13: "ets_batch",
        14: "run_rate",
    }
    users = list(series)
    expected = forecast_spend_batch(
        histories=[inputs(series[u])[0] for u in users],
        today=TODAY,
        period_end=PERIOD_END,
        spent_nanos=[inputs(series[u])[1] for u in users],
        day_fraction_elapsed=0.625,
        ets_series=1,
    )
    for uid, f in zip(users, expected, strict=True):
        snap = snaps[uid]
        assert (snap.expected_nanos, snap.low_nanos, snap.high_nanos) == (
            f.expected_nanos,
            f.low_nanos,
            f.high_nanos,
        )
        assert [d["mean"] for d in snap.days] == [d.mean_nanos for d in f.days]
    totals = [0] * 40  # the tenant's own series: every end user's, day by day
    for daily in series.values():
        for i, cost in enumerate(daily):
            totals[40 - len(daily) + i] += cost
    history, spent = inputs(totals)
    tenant_alone = forecast_spend(
        history=history,
        today=TODAY,
        period_end=PERIOD_END,
        spent_nanos=spent,
        day_fraction_elapsed=0.625,
    )
    assert snaps[0].expected_nanos == tenant_alone.expected_nanos


def test_a_batched_end_user_likely_to_run_out_gets_a_forecast_alert(
    tenant, monkeypatch, django_capture_on_commit_callbacks
):
    monkeypatch.setattr(batch_forecasting, "ETS_SERIES", 0)
    user = EndUserFactory(tenant=tenant)
    series = spend(30, level=1, seed=5)
    rolled_up(tenant, {user.pk: series})
    _, spent = inputs(series)
    budget = Budget.objects.create(
        tenant=tenant,
        scope=BudgetScope.END_USER,
        end_user=user,
        period=BudgetPeriod.MONTH,
        limit_nanos=spent + 2 * USD,  # some 3 weeks at about a dollar a day to come
    )

    with django_capture_on_commit_callbacks(execute=True):
        services.forecasts_refresh(tenant, NOW)

    snap = SpendForecastSnapshot.objects.get(tenant=tenant, end_user_id=user.pk)
    assert snap.method == "ets_batch"
    assert snap.limit_nanos == budget.limit_nanos
    assert snap.runs_out_on is not None and snap.exceed_probability > 0.9
    alert = BudgetAlert.objects.get(budget=budget)
    assert (alert.level, alert.subject_id) == ("forecast", 0)


def test_no_end_user_activity_leaves_only_the_tenant_forecast(tenant):
    rolled_up(tenant, {})

    assert services.forecasts_refresh(tenant, NOW) == 1

    snap = SpendForecastSnapshot.objects.get(tenant=tenant)
    assert (snap.end_user_id, snap.method) == (0, "none")
