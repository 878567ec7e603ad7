"""dashboard.batch_forecasting: many end users' forecasts at once (no database)."""

from datetime import date, timedelta

import numpy as np
import pytest

from dashboard import batch_forecasting
from dashboard.batch_forecasting import forecast_spend_batch
from dashboard.forecasting import MIN_ETS_DAYS, SEASON, clean_history, forecast_spend

USD = 10**9
TODAY = date(2026, 3, 10)  # a Tuesday
END = TODAY + timedelta(days=21)


def intermittent(days, seed, level=1.0):
    """An end user's spend from its first day on: some days, log-normal amounts (USD *
    level), weekdays busier."""
    rng = np.random.default_rng(seed)
    out = []
    for i in range(days):
        weekend = (TODAY - timedelta(days=days - i)).weekday() >= 5
        active = i == 0 or rng.random() < (0.2 if weekend else 0.7)
        out.append(int(rng.lognormal(0.0, 0.6) * level * USD) if active else 0)
    return out


def batch(histories, **kwargs):
    kwargs.setdefault("spent_nanos", [0] * len(histories))
    return forecast_spend_batch(histories=histories, today=TODAY, period_end=END, **kwargs)


def alone(history, **kwargs):
    return forecast_spend(history=history, today=TODAY, period_end=END, spent_nanos=0, **kwargs)


def reference_means(history, model):
    """The chosen model's daily means by a plain loop: ETS(A,N,N) or ETS(A,N,A) with the
    grid's parameters (read from the model name) and the heuristic initial states."""
    y = clean_history(history)
    scale = max(y.mean(), 1.0)
    y = y / scale
    params = dict(part.split("=") for part in model.split(") ")[1].split())
    alpha, gamma = float(params["a"]), float(params.get("g", 0.0))
    weekday = [(TODAY - timedelta(days=y.size - i)).weekday() for i in range(y.size)]
    init = y[: batch_forecasting.INIT_DAYS]
    level = init.mean()
    season = [0.0] * SEASON
    if "A) " in model:
        sums, seen = [0.0] * SEASON, [0] * SEASON
        for value, day in zip(init, weekday, strict=False):
            sums[day] += value - level
            seen[day] += 1
        season = [s / n if n else 0.0 for s, n in zip(sums, seen, strict=True)]
        centre = sum(season) / SEASON
        season = [s - centre for s in season]
    for value, day in zip(y, weekday, strict=True):
        error = value - level - season[day]
        level += alpha * error
        season[day] += gamma * error
    days = (END - TODAY).days + 1
    means = [level + season[(TODAY + timedelta(days=h)).weekday()] for h in range(days)]
    return [max(round(max(m, 0.0) * scale), 0) for m in means]


def test_each_series_gets_the_method_chosen_for_it():
    big = [int(v * 50) for v in intermittent(56, seed=1)]
    histories = [
        [],  # no history
        [3 * USD],  # a single day
        [0] * 30,  # nothing spent
        [2 * USD] * 30,  # constant
        intermittent(MIN_ETS_DAYS - 1, seed=2),  # too short for a model
        big,  # the largest spender: still fitted alone
        intermittent(56, seed=3),
        intermittent(12, seed=4),
    ]

    forecasts = batch(histories, ets_series=1)

    assert [f.method for f in forecasts] == [
        "none",
        "run_rate",
        "run_rate",
        "run_rate",
        "run_rate",
        "ets",
        "ets_batch",
        "ets_batch",
    ]
    for history, f in list(zip(histories, forecasts, strict=True))[:6]:
        assert f == alone(history)  # exactly what forecast_spend gives it


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("days", [MIN_ETS_DAYS, 15, 16, 30, 56, 120])
def test_the_batched_model_forecasts_what_its_model_says(seed, days):
    rng = np.random.default_rng(seed)
    weekly = [
        (6.0 if (TODAY - timedelta(days=days - i)).weekday() < 5 else 1.0) for i in range(days)
    ]
    history = (
        intermittent(days, seed)
        if seed % 2
        else [int(v * USD * rng.lognormal(0, 0.2)) for v in weekly]
    )

    [f] = batch([history], ets_series=0)

    assert f.method == "ets_batch"
    assert f.history_days == days
    assert [d.mean_nanos for d in f.days] == pytest.approx(reference_means(history, f.model), abs=1)
    if days < 16:
        assert f.model.startswith("ETS(A,N,N)")  # too short for the weekly season


def test_a_weekly_pattern_gets_the_seasonal_model_and_lower_weekends():
    days = [TODAY - timedelta(days=56 - i) for i in range(56)]
    rng = np.random.default_rng(5)
    history = [int((1.0 if d.weekday() >= 5 else 9.0) * USD * rng.lognormal(0, 0.1)) for d in days]

    [f] = batch([history], ets_series=0)

    assert f.model.startswith("ETS(A,N,A)")
    weekend = [d.mean_nanos for d in f.days if d.day.weekday() >= 5]
    weekdays = [d.mean_nanos for d in f.days if d.day.weekday() < 5]
    assert max(weekend) < 3 * USD < 7 * USD < min(weekdays)


def test_a_series_is_forecast_the_same_alone_or_among_many():
    histories = [intermittent(10 + 3 * i, seed=i, level=1 + i) for i in range(15)]

    together = batch(histories, ets_series=0, limit_nanos=[20 * USD] * 15)
    one_by_one = [batch([h], ets_series=0, limit_nanos=[20 * USD])[0] for h in histories]

    assert together == one_by_one


def test_series_split_into_chunks_are_forecast_as_in_one(monkeypatch):
    histories = [intermittent(30, seed=i) for i in range(7)]
    whole = batch(histories, ets_series=0)

    monkeypatch.setattr(batch_forecasting, "CHUNK_SERIES", 3)

    assert batch(histories, ets_series=0) == whole


def test_the_largest_spenders_keep_the_ets_fit():
    histories = [intermittent(40, seed=i, level=level) for i, level in enumerate([1, 30, 2, 20])]

    forecasts = batch(histories, ets_series=2)

    assert [f.method for f in forecasts] == ["ets_batch", "ets", "ets_batch", "ets"]
    assert forecasts[1] == alone(histories[1])
    assert forecasts[3] == alone(histories[3])


def test_the_default_number_of_ets_fits_is_the_module_setting(monkeypatch):
    histories = [intermittent(40, seed=i, level=1 + i) for i in range(3)]
    monkeypatch.setattr(batch_forecasting, "ETS_SERIES", 1)

    assert [f.method for f in batch(histories)] == ["ets_batch", "ets_batch", "ets"]


def test_zero_spend_forecasts_zero():
    forecasts = batch([[0] * 56, [0]], spent_nanos=[5, 0], ets_series=0)

    for f, spent in zip(forecasts, [5, 0], strict=True):
        assert f.method == "run_rate"
        assert f.expected_nanos == f.low_nanos == f.high_nanos == spent
        assert all(d.mean_nanos == d.low_nanos == d.high_nanos == 0 for d in f.days)


@pytest.mark.parametrize("per_day", [10**16, 10**19])  # ten million dollars a day, and beyond int64
def test_a_huge_spender_keeps_exact_whole_nanos(per_day):
    rng = np.random.default_rng(3)
    history = [int(per_day * rng.lognormal(0, 0.05)) for _ in range(40)]
    spent = 5 * per_day + 1

    [f] = batch([history], spent_nanos=[spent], limit_nanos=[100 * per_day], ets_series=0)

    assert f.method == "ets_batch"
    days = len(f.days)
    assert type(f.expected_nanos) is int and type(f.days[0].mean_nanos) is int
    assert f.expected_nanos - spent == pytest.approx(days * per_day, rel=0.1)
    assert f.expected_nanos == spent + sum(d.mean_nanos for d in f.days)
    assert f.low_nanos <= f.expected_nanos <= f.high_nanos
    assert f.runs_out_on is None and f.exceed_probability == pytest.approx(0.0, abs=1e-6)


def test_ten_thousand_end_users_go_through_one_batch():
    rng = np.random.default_rng(11)
    lengths = rng.integers(0, 40, size=10_000)
    histories = [
        (rng.lognormal(0, 1, n) * USD * (rng.random(n) < 0.5)).astype(int).tolist() for n in lengths
    ]
    spent = rng.integers(0, 10 * USD, size=10_000).tolist()

    forecasts = batch(histories, spent_nanos=spent, ets_series=3)

    assert len(forecasts) == 10_000
    methods = {f.method for f in forecasts}
    assert methods == {"none", "run_rate", "ets", "ets_batch"}
    assert sum(f.method == "ets" for f in forecasts) == 3
    assert [f.spent_nanos for f in forecasts] == spent
    assert all(f.low_nanos <= f.expected_nanos <= f.high_nanos for f in forecasts)
    assert all(f.spent_nanos <= f.low_nanos for f in forecasts)


def test_the_interval_bands_and_totals_are_consistent():
    history = intermittent(56, seed=9)

    [f] = batch([history], spent_nanos=[4 * USD], ets_series=0)

    assert f.spent_nanos <= f.low_nanos < f.expected_nanos < f.high_nanos
    last = f.days[-1]
    assert last.cumulative_nanos == f.expected_nanos
    assert last.cumulative_low_nanos == pytest.approx(f.low_nanos, rel=1e-9, abs=2)
    assert last.cumulative_high_nanos == pytest.approx(f.high_nanos, rel=1e-9, abs=2)
    for d in f.days:
        assert 0 <= d.low_nanos <= d.mean_nanos <= d.high_nanos
        assert d.cumulative_low_nanos <= d.cumulative_nanos <= d.cumulative_high_nanos
    widths = [d.cumulative_high_nanos - d.cumulative_low_nanos for d in f.days]
    assert widths == sorted(widths)  # more days to come, more uncertainty


def test_todays_partial_day_is_blended_in_as_forecast_spend_does():
    history = intermittent(56, seed=10)
    [morning] = batch([history], ets_series=0)

    [evening] = batch(
        [history],
        spent_nanos=[30 * USD],
        today_spent_nanos=[30 * USD],
        day_fraction_elapsed=0.9,
        ets_series=0,
    )

    # 90 % of the day gone at 30 USD: 0.1 * (0.9 * 30 / 0.9 + 0.1 * the model's mean)
    model = morning.days[0].mean_nanos
    assert evening.days[0].mean_nanos == pytest.approx(0.1 * (30 * USD + 0.1 * model), rel=1e-6)
    later = [(d.mean_nanos, d.low_nanos, d.high_nanos) for d in morning.days[1:]]
    assert [(d.mean_nanos, d.low_nanos, d.high_nanos) for d in evening.days[1:]] == later
    assert evening.expected_nanos == 30 * USD + evening.days[0].mean_nanos + sum(
        mean for mean, _, _ in later
    )
    day0, first = evening.days[0], morning.days[0]
    assert day0.high_nanos - day0.low_nanos < first.high_nanos - first.low_nanos


def test_a_limit_gives_the_run_out_day_and_the_chance_of_going_over():
    history = [int(v * 10) for v in intermittent(56, seed=12)]
    spent = 50 * USD

    tight, roomy, over = batch(
        [history] * 3,
        spent_nanos=[spent] * 3,
        limit_nanos=[spent + 10 * USD, spent + 10**6 * USD, spent - 1],
        ets_series=0,
    )

    assert tight.exceed_probability > 0.9 and tight.runs_out_on is not None
    cumulative = next(d for d in tight.days if d.day == tight.runs_out_on).cumulative_nanos
    assert cumulative >= tight.limit_nanos
    assert roomy.exceed_probability < 0.01 and roomy.runs_out_on is None
    assert over.exceed_probability == 1.0 and over.runs_out_on == TODAY


def test_the_period_over_gives_no_forecast():
    [f] = forecast_spend_batch(
        histories=[intermittent(30, seed=1)],
        today=TODAY,
        period_end=TODAY - timedelta(days=1),
        spent_nanos=[7],
        ets_series=0,
    )

    assert (f.method, f.expected_nanos, f.days) == ("none", 7, [])


def test_deterministic_and_in_order():
    histories = [intermittent(20 + i, seed=i) for i in range(5)]

    assert batch(histories, ets_series=0) == batch(histories, ets_series=0)
    assert batch(histories[::-1], ets_series=0) == batch(histories, ets_series=0)[::-1]


def test_bad_arguments_are_refused():
    with pytest.raises(ValueError, match="level"):
        batch([[1]], level=1.0)
    with pytest.raises(ValueError, match="one spent"):
        forecast_spend_batch(histories=[[1], [2]], today=TODAY, period_end=END, spent_nanos=[0])
    assert forecast_spend_batch(histories=[], today=TODAY, period_end=END, spent_nanos=[]) == []
