"""dashboard.forecasting: spend forecasts to the end of a budget period (no database)."""

import dataclasses
import warnings
from datetime import date, timedelta

import numpy as np
import pytest

from dashboard import forecasting
from dashboard.forecasting import ForecastDay, SpendForecast, forecast_spend

USD = 10**9
TODAY = date(2026, 3, 10)  # a Tuesday


def noisy(values, sigma=0.05, seed=1):
    """Daily nanos: values (USD) times log-normal noise."""
    rng = np.random.default_rng(seed)
    return [int(v * USD * rng.lognormal(0, sigma)) for v in values]


def dates_before(today, n):
    return [today - timedelta(days=n - i) for i in range(n)]


def test_a_flat_series_forecasts_its_run_rate_and_the_interval_holds_the_truth():
    history = noisy([10.0] * 60)
    f = forecast_spend(
        history=history, today=TODAY, period_end=TODAY + timedelta(days=9), spent_nanos=50 * USD
    )

    truth = 50 * USD + 10 * 10 * USD
    assert f.method == "ets"
    assert f.expected_nanos == pytest.approx(truth, rel=0.05)
    assert f.low_nanos <= truth <= f.high_nanos
    assert f.low_nanos < f.expected_nanos < f.high_nanos
    assert [d.day for d in f.days] == [TODAY + timedelta(days=i) for i in range(10)]
    assert f.spent_nanos + sum(d.mean_nanos for d in f.days) == f.expected_nanos


def test_a_constant_series_is_its_run_rate_exactly():
    f = forecast_spend(
        history=[7 * USD] * 30, today=TODAY, period_end=TODAY + timedelta(days=2), spent_nanos=5
    )

    assert f.method == "run_rate"
    assert f.expected_nanos == f.low_nanos == f.high_nanos == 5 + 21 * USD
    assert all(d.mean_nanos == d.low_nanos == d.high_nanos == 7 * USD for d in f.days)


def test_a_growing_series_forecasts_more_than_the_flat_run_rate():
    history = noisy([2.0 + 0.3 * i for i in range(60)], sigma=0.03)
    kwargs = dict(
        history=history, today=TODAY, period_end=TODAY + timedelta(days=20), spent_nanos=0
    )

    trend = forecast_spend(**kwargs)
    flat = forecast_spend(**kwargs, method="run_rate")

    assert trend.method == "ets"
    assert flat.method == "run_rate"
    assert trend.expected_nanos > flat.expected_nanos * 1.05
    assert trend.days[-1].mean_nanos > trend.days[0].mean_nanos


def test_cheaper_weekends_give_lower_weekend_forecasts():
    days = dates_before(TODAY, 56)
    history = noisy([2.0 if d.weekday() >= 5 else 10.0 for d in days], sigma=0.1)

    f = forecast_spend(
        history=history, today=TODAY, period_end=TODAY + timedelta(days=13), spent_nanos=0
    )

    assert f.method == "ets"
    assert "A)" in f.model  # the weekly season was chosen
    weekend = [d.mean_nanos for d in f.days if d.day.weekday() >= 5]
    weekdays = [d.mean_nanos for d in f.days if d.day.weekday() < 5]
    assert max(weekend) < min(weekdays)
    assert max(weekend) < 4 * USD < 8 * USD < min(weekdays)


def test_runs_out_on_and_exceed_probability():
    history = noisy([10.0] * 60)
    kwargs = dict(
        history=history, today=TODAY, period_end=TODAY + timedelta(days=29), spent_nanos=0
    )

    tight = forecast_spend(**kwargs, limit_nanos=100 * USD)
    assert tight.limit_nanos == 100 * USD
    assert TODAY + timedelta(days=8) <= tight.runs_out_on <= TODAY + timedelta(days=10)
    assert tight.exceed_probability > 0.99

    roomy = forecast_spend(**kwargs, limit_nanos=1000 * USD)
    assert roomy.runs_out_on is None
    assert roomy.exceed_probability < 0.01

    unlimited = forecast_spend(**kwargs)
    assert unlimited.runs_out_on is None
    assert unlimited.exceed_probability is None


def test_a_limit_already_spent_runs_out_today():
    f = forecast_spend(
        history=noisy([10.0] * 30),
        today=TODAY,
        period_end=TODAY + timedelta(days=5),
        spent_nanos=120 * USD,
        limit_nanos=100 * USD,
    )

    assert f.runs_out_on == TODAY
    assert f.exceed_probability == 1.0


def test_the_limit_crossed_near_the_end_of_the_period_is_uncertain():
    history = noisy([10.0] * 60, sigma=0.2)
    f = forecast_spend(
        history=history,
        today=TODAY,
        period_end=TODAY + timedelta(days=9),
        spent_nanos=0,
        limit_nanos=100 * USD,
    )

    assert 0.1 < f.exceed_probability < 0.9


def test_no_history_forecasts_what_was_spent():
    f = forecast_spend(
        history=[],
        today=TODAY,
        period_end=TODAY + timedelta(days=20),
        spent_nanos=3 * USD,
        today_spent_nanos=3 * USD,
        day_fraction_elapsed=0.4,
        limit_nanos=10 * USD,
    )

    assert f.method == "none"
    assert f.expected_nanos == f.low_nanos == f.high_nanos == f.spent_nanos == 3 * USD
    assert f.runs_out_on is None
    assert f.exceed_probability is None  # nothing to judge from
    assert len(f.days) == 21
    assert all(d.mean_nanos == 0 for d in f.days)


def test_all_zero_history_forecasts_nothing_more():
    f = forecast_spend(
        history=[0] * 45,
        today=TODAY,
        period_end=TODAY + timedelta(days=20),
        spent_nanos=0,
        limit_nanos=USD,
    )

    assert f.method == "run_rate"
    assert f.expected_nanos == f.low_nanos == f.high_nanos == 0
    assert f.runs_out_on is None
    assert f.exceed_probability == 0.0


def test_leading_zero_days_are_not_history():
    history = [0] * 80 + noisy([10.0] * 5)

    f = forecast_spend(
        history=history, today=TODAY, period_end=TODAY + timedelta(days=9), spent_nanos=0
    )

    assert f.history_days == 5
    assert f.method == "run_rate"  # too short for a model
    assert f.expected_nanos == pytest.approx(100 * USD, rel=0.05)


def test_the_partial_today_is_respected():
    history = noisy([10.0] * 60, sigma=0.02)
    kwargs = dict(history=history, today=TODAY, period_end=TODAY + timedelta(days=4))

    half = forecast_spend(
        **kwargs, spent_nanos=36 * USD, today_spent_nanos=6 * USD, day_fraction_elapsed=0.5
    )
    assert half.expected_nanos >= half.spent_nanos
    # Half the day left, at a pace between the model's and today's own (12 $/day so far).
    assert 4.5 * USD < half.days[0].mean_nanos < 6.5 * USD
    assert half.days[1].mean_nanos == pytest.approx(10 * USD, rel=0.05)
    assert half.expected_nanos == pytest.approx(36 * USD + 5.5 * USD + 40 * USD, rel=0.03)

    over = forecast_spend(
        **kwargs, spent_nanos=36 * USD, today_spent_nanos=6 * USD, day_fraction_elapsed=1.0
    )
    assert over.days[0].mean_nanos == over.days[0].high_nanos == 0
    assert over.expected_nanos >= over.spent_nanos


def test_a_finished_period_is_what_was_spent():
    f = forecast_spend(
        history=noisy([10.0] * 30),
        today=TODAY,
        period_end=TODAY - timedelta(days=1),
        spent_nanos=7 * USD,
        limit_nanos=5 * USD,
    )

    assert f.days == []
    assert f.expected_nanos == 7 * USD
    assert f.exceed_probability == 1.0


def test_outputs_are_plain_ints_and_ordered():
    f = forecast_spend(
        history=noisy([3.0 + (i % 7 == 0) for i in range(90)], sigma=0.3),
        today=TODAY,
        period_end=TODAY + timedelta(days=21),
        spent_nanos=12 * USD,
        today_spent_nanos=USD,
        day_fraction_elapsed=0.25,
        limit_nanos=60 * USD,
    )

    assert isinstance(f, SpendForecast)
    for name in ("spent_nanos", "expected_nanos", "low_nanos", "high_nanos", "limit_nanos"):
        assert type(getattr(f, name)) is int, name
    assert type(f.exceed_probability) is float
    assert f.low_nanos <= f.expected_nanos <= f.high_nanos
    assert f.spent_nanos <= f.low_nanos
    for d in f.days:
        assert isinstance(d, ForecastDay)
        assert all(type(v) is int for v in (d.mean_nanos, d.low_nanos, d.high_nanos))
        assert 0 <= d.low_nanos <= d.mean_nanos <= d.high_nanos


def test_huge_amounts_stay_exact_ints():
    history = noisy([1e6] * 60)  # a million dollars a day: 1e15 nanos

    f = forecast_spend(
        history=history, today=TODAY, period_end=TODAY + timedelta(days=9), spent_nanos=10**16 + 1
    )

    assert type(f.expected_nanos) is int
    assert f.expected_nanos - 10**16 - 1 == pytest.approx(10**16, rel=0.05)


def test_deterministic():
    kwargs = dict(
        history=noisy([5.0 + (i % 7 < 2) * 3 for i in range(70)], sigma=0.4, seed=7),
        today=TODAY,
        period_end=TODAY + timedelta(days=20),
        spent_nanos=40 * USD,
        limit_nanos=150 * USD,
    )

    assert forecast_spend(**kwargs) == forecast_spend(**kwargs)
    assert dataclasses.asdict(forecast_spend(**kwargs)) == dataclasses.asdict(
        forecast_spend(**kwargs)
    )


def test_short_histories_use_the_run_rate():
    f = forecast_spend(
        history=noisy([4.0, 6.0, 5.0]),
        today=TODAY,
        period_end=TODAY + timedelta(days=9),
        spent_nanos=0,
    )

    assert f.method == "run_rate"
    assert f.expected_nanos == pytest.approx(50 * USD, rel=0.05)
    assert f.low_nanos < f.expected_nanos < f.high_nanos


def test_warning_filters_are_left_alone():
    before = list(warnings.filters)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        forecast_spend(
            history=noisy([1.0] * 20 + [50.0] * 20, sigma=0.5),
            today=TODAY,
            period_end=TODAY + timedelta(days=9),
            spent_nanos=0,
        )
    assert caught == []
    assert warnings.filters == before


def test_bad_arguments():
    with pytest.raises(ValueError):
        forecast_spend(history=[], today=TODAY, period_end=TODAY, spent_nanos=0, level=1.0)
    with pytest.raises(ValueError):
        forecast_spend(history=[], today=TODAY, period_end=TODAY, spent_nanos=0, method="magic")


def test_a_failed_fit_falls_back_to_the_run_rate(monkeypatch):
    def broken(y, horizon):
        raise np.linalg.LinAlgError("singular")

    monkeypatch.setattr(forecasting, "_ets_paths", broken)
    f = forecast_spend(
        history=noisy([10.0] * 30), today=TODAY, period_end=TODAY + timedelta(days=9), spent_nanos=0
    )

    assert f.method == "run_rate"
    assert f.expected_nanos == pytest.approx(100 * USD, rel=0.05)


def sparse(days, seed=3):
    """Intermittent spend: most days nothing, some days a lot (paths dip below zero)."""
    rng = np.random.default_rng(seed)
    return [int(USD * rng.exponential(20.0)) if rng.random() < 0.3 else 0 for _ in range(days)]


@pytest.mark.parametrize(
    "history",
    [noisy([10.0] * 60, sigma=0.2), sparse(60), sparse(25, seed=7)],
    ids=["steady", "sparse", "short-sparse"],
)
def test_the_cumulative_interval_grows_along_the_period_and_ends_at_the_totals(history):
    f = forecast_spend(
        history=history, today=TODAY, period_end=TODAY + timedelta(days=20), spent_nanos=90 * USD
    )

    widths = [d.cumulative_high_nanos - d.cumulative_low_nanos for d in f.days]
    last = f.days[-1]
    assert (last.cumulative_nanos, last.cumulative_low_nanos, last.cumulative_high_nanos) == (
        f.expected_nanos,
        f.low_nanos,
        f.high_nanos,
    )
    assert all(
        d.cumulative_low_nanos <= d.cumulative_nanos <= d.cumulative_high_nanos for d in f.days
    )
    assert widths[-1] > widths[0] and widths == sorted(widths)
    # Narrower than adding up the daily bounds: daily errors partly cancel.
    assert last.cumulative_high_nanos - f.spent_nanos < sum(d.high_nanos for d in f.days)


def test_no_history_keeps_the_cumulative_at_what_was_spent():
    f = forecast_spend(history=[], today=TODAY, period_end=TODAY + timedelta(days=3), spent_nanos=7)

    assert {
        (d.cumulative_nanos, d.cumulative_low_nanos, d.cumulative_high_nanos) for d in f.days
    } == {(7, 7, 7)}
