"""Spend forecasts to the end of a budget period.

Pure functions over a daily spend series (integer nano-dollars per tenant-local
calendar day); callers read the ledger and pass the series in. One call fits a
small model and simulates ``PATHS`` future paths of daily spend; the period
total's interval, the chance of going over a limit and the day-by-day bands
come from those paths, the expected values from the model's mean.

Models, by how much history there is (leading zero days are dropped first: a
tenant that started last week has a week of history, not 90 days of zeros):

- no history: ``"none"`` (the forecast is what was spent so far);
- fewer than ``MIN_ETS_DAYS`` days, a constant or an all-zero series:
  ``"run_rate"``, the mean of the last 7 days per remaining day, with paths
  bootstrapped from those days;
- otherwise ``"ets"``: statsmodels' ``ETSModel`` with additive errors, chosen by
  AICc among {no trend, damped additive trend} x {no season, weekly additive
  season} (the season needs ``MIN_SEASONAL_DAYS`` days, the least statsmodels'
  heuristic initialisation accepts), with the level's smoothing held at or
  above ``MIN_SMOOTHING_LEVEL``. Paths come from ``ETSResults.simulate`` with
  antithetic normal errors, widened by ``_calibrate`` when the model's own
  recent multi-day forecasts missed by more than it expects.

Spend is never negative: a day's expected value is the model's mean floored at
0, its band the simulated quantiles floored at 0, and the period total's
interval the quantiles of the simulated sums floored at 0. (Averaging paths
clipped day by day would count the clipped-off negative mass as spend: an
upward bias that was large on intermittent, end-user-like series.)

``bench/forecast.py`` backtests these choices against simpler ones;
docs/benchmarks.md ("Forecasts") has the numbers. Many end users at once:
``dashboard.batch_forecasting`` (one vectorised fit instead of one ETS fit each).
"""

from __future__ import annotations

import logging
import math
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import date, timedelta

import numpy as np

logger = logging.getLogger(__name__)

SEASON = 7  # days; spend follows the working week
MAX_HISTORY_DAYS = 120  # older days are ignored (and the fit stays fast)
MIN_ETS_DAYS = 10  # fewer days: run rate
MIN_SEASONAL_DAYS = 16  # 10 + 2 * (SEASON // 2): statsmodels' heuristic initialisation
RUN_RATE_DAYS = 7
PATHS = 500  # simulated futures (even: antithetic pairs)
SEED = 20_261_128
# The level adapts at least this fast (statsmodels' own lower bound is 1e-4). On noisy
# series the unconstrained fit often freezes the level (alpha ~ 0) at its initial
# value; in the backtest that lagged growing spend and gave over-confident intervals.
# Chosen on bench/forecast.py (free, 0.02, 0.05, 0.1 compared): higher suits growing
# weekly series, lower intermittent (end-user) ones; 0.05 is the compromise.
MIN_SMOOTHING_LEVEL: float | None = 0.05
CALIBRATION_ORIGINS = 8  # see _calibrate; 0 turns it off
MAX_WIDENING = 5.0
METHODS = ("auto", "ets", "run_rate", "seasonal_naive")


@dataclass(frozen=True)
class ForecastDay:
    day: date
    mean_nanos: int
    low_nanos: int
    high_nanos: int
    # The period's total spend by the end of this day (spent so far included): its
    # interval comes from the cumulative sums of the simulated paths, not from adding
    # up daily bounds (which would overstate it).
    cumulative_nanos: int = 0
    cumulative_low_nanos: int = 0
    cumulative_high_nanos: int = 0


@dataclass(frozen=True)
class SpendForecast:
    method: str  # "ets", "seasonal_naive", "run_rate" or "none"
    level: float  # prediction-interval coverage, e.g. 0.8
    spent_nanos: int  # actual spend so far in the period (input, echoed)
    expected_nanos: int  # point forecast of the period's total spend
    low_nanos: int  # lower bound of the period total at `level`
    high_nanos: int  # upper bound of the period total at `level`
    days: list[ForecastDay]  # rest of the period; today holds only its remaining part
    limit_nanos: int | None
    runs_out_on: date | None  # first day the expected cumulative spend reaches the limit
    exceed_probability: float | None  # P(period total > limit)
    model: str = ""  # the fitted model, e.g. "ETS(A,Ad,A)"; empty for "none"
    history_days: int = 0  # days of history the model saw (after dropping leading zeros)


def forecast_spend(
    *,
    history: Sequence[int],
    today: date,
    period_end: date,
    spent_nanos: int,
    today_spent_nanos: int = 0,
    day_fraction_elapsed: float = 0.0,
    limit_nanos: int | None = None,
    level: float = 0.8,
    method: str = "auto",
) -> SpendForecast:
    """Forecast the period's total spend, day by day, with a prediction interval.

    history: complete days before ``today``, oldest first, zero-filled (last
    element = yesterday). period_end: last day of the period (inclusive).
    spent_nanos: period spend so far, today's included. today_spent_nanos /
    day_fraction_elapsed: today's partial day; today's remainder is forecast as
    ``(1 - f) * (f * observed_rate + (1 - f) * model)``, with ``f`` the fraction
    elapsed and ``observed_rate = today_spent / f``: the model early in the day,
    more and more today's own pace as the day goes on.
    method: "auto" (the choice above); "ets", "run_rate" or "seasonal_naive"
    force one model (the benchmark compares them).

    Deterministic: the same inputs give the same forecast.
    """
    if not 0.0 < level < 1.0:
        raise ValueError("level must be between 0 and 1")
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}")
    spent = int(spent_nanos)
    horizon = (period_end - today).days + 1
    fraction = min(max(float(day_fraction_elapsed), 0.0), 1.0)
    series = clean_history(history)

    if horizon <= 0 or series.size == 0:
        # Nothing left to forecast, or nothing to forecast from.
        return _none(spent, today, max(horizon, 0), limit_nanos, level, series.size)

    scale = max(float(series.mean()), 1.0)  # work near 1, whatever the magnitude
    y = series / scale
    name, model, means, paths = _paths(y, horizon, method)
    means = np.clip(means, 0.0, None)

    # Today's remaining part.
    if fraction > 0.0:
        rate = max(int(today_spent_nanos), 0) / scale / fraction
        paths[0] = (1.0 - fraction) * (fraction * rate + (1.0 - fraction) * paths[0])
        means[0] = (1.0 - fraction) * (fraction * rate + (1.0 - fraction) * means[0])

    return _summarise(
        name, model, paths, means, scale, spent, today, limit_nanos, level, history_days=series.size
    )


def clean_history(history: Sequence[int]) -> np.ndarray:
    """The days a model sees: the last MAX_HISTORY_DAYS, negatives as 0, leading zero days
    dropped (an all-zero history keeps its last RUN_RATE_DAYS: a zero run rate)."""
    series = np.clip(np.asarray(history, dtype=np.float64)[-MAX_HISTORY_DAYS:], 0.0, None)
    nonzero = np.flatnonzero(series)
    if series.size and nonzero.size:
        return series[nonzero[0] :]
    return series[-RUN_RATE_DAYS:]


# --- models -----------------------------------------------------------------


def _rng() -> np.random.Generator:
    return np.random.default_rng(SEED)


def _paths(y: np.ndarray, horizon: int, method: str) -> tuple[str, str, np.ndarray, np.ndarray]:
    """(method, model, mean, paths) in scaled units: mean (horizon,), paths (horizon, PATHS)."""
    n = y.size
    if method == "seasonal_naive" and n >= SEASON:
        return "seasonal_naive", "last week repeated", *_seasonal_naive(y, horizon)
    if method in ("auto", "ets") and n >= MIN_ETS_DAYS and np.ptp(y) > 0.0:
        try:
            model, paths = _ets_paths(y, horizon)
        except Exception:  # a degenerate fit must not break the dashboard: use the run rate
            logger.warning("ETS forecast failed on %d days; using the run rate", n, exc_info=True)
        else:
            return "ets", model, paths.mean(axis=1), paths  # antithetic: the model's mean
    days = min(n, RUN_RATE_DAYS)
    return "run_rate", f"mean of last {days} days", *_run_rate(y, horizon)


def _run_rate(y: np.ndarray, horizon: int) -> tuple[np.ndarray, np.ndarray]:
    """The mean of the last RUN_RATE_DAYS days; paths bootstrapped from those days."""
    window = y[-RUN_RATE_DAYS:]
    draws = _rng().integers(window.size, size=(horizon, PATHS))
    return np.full(horizon, window.mean()), window[draws]


def _seasonal_naive(y: np.ndarray, horizon: int) -> tuple[np.ndarray, np.ndarray]:
    """Last week repeated; errors bootstrapped from week-on-week changes, accumulating by week."""
    rng = _rng()
    changes = (y[SEASON:] - y[:-SEASON])[-4 * SEASON :]
    if changes.size == 0:
        changes = np.zeros(1)
    changes = changes - changes.mean()
    mean = np.array([y[y.size - SEASON + day % SEASON] for day in range(horizon)])
    paths = np.empty((horizon, PATHS))
    for day in range(horizon):
        previous = paths[day - SEASON] if day >= SEASON else np.full(PATHS, mean[day])
        paths[day] = previous + changes[rng.integers(changes.size, size=PATHS)]
    return mean, paths


def _ets_specs(n: int) -> list[tuple[str | None, bool, str | None]]:
    specs: list[tuple[str | None, bool, str | None]] = [(None, False, None), ("add", True, None)]
    if n >= MIN_SEASONAL_DAYS:
        specs += [(None, False, "add"), ("add", True, "add")]
    return specs


def _ets_paths(y: np.ndarray, horizon: int) -> tuple[str, np.ndarray]:
    from statsmodels.tools.sm_exceptions import ConvergenceWarning, ValueWarning  # noqa: PLC0415 - statsmodels takes a second to import; only the forecast task needs it
    from statsmodels.tsa.exponential_smoothing.ets import ETSModel  # noqa: PLC0415 - statsmodels takes a second to import; only the forecast task needs it

    bounds = None if MIN_SMOOTHING_LEVEL is None else (MIN_SMOOTHING_LEVEL, 0.9999)
    best = None
    with warnings.catch_warnings(), np.errstate(all="ignore"):
        warnings.simplefilter("ignore", ConvergenceWarning)
        warnings.simplefilter("ignore", ValueWarning)
        warnings.simplefilter("ignore", RuntimeWarning)
        for trend, damped, seasonal in _ets_specs(y.size):
            fitted = ETSModel(
                y,
                error="add",
                trend=trend,
                damped_trend=damped,
                seasonal=seasonal,
                seasonal_periods=SEASON if seasonal else None,
                initialization_method="heuristic",
                # statsmodels writes into this dict: a fresh one per model
                bounds={"smoothing_level": bounds} if bounds else None,
            ).fit(disp=False)
            if math.isfinite(fitted.aicc) and (best is None or fitted.aicc < best[0]):
                best = (fitted.aicc, (trend, damped, seasonal), fitted)
        if best is None:
            raise ValueError("no ETS model could be fitted")
        _, (trend, damped, seasonal), fitted = best
        sigma = math.sqrt(max(float(fitted.scale), 0.0))
        half = _rng().standard_normal((horizon, PATHS // 2))
        errors = sigma * np.concatenate([half, -half], axis=1)  # antithetic: exact mean
        paths = np.asarray(
            fitted.simulate(horizon, anchor="end", repetitions=PATHS, random_errors=errors),
            dtype=np.float64,
        ).reshape(horizon, PATHS)
        paths = _calibrate(fitted, y, paths)
    if not np.isfinite(paths).all():
        raise ValueError("ETS simulation diverged")
    name = f"ETS(A,{'Ad' if damped else 'N'},{'A' if seasonal else 'N'})"
    return name, paths


def _calibrate(fitted, y: np.ndarray, paths: np.ndarray) -> np.ndarray:
    """Widen the paths when the model's own past multi-day sums missed by more than it expects.

    From CALIBRATION_ORIGINS past origins in the last five weeks, the fitted
    model forecasts the next ``span`` days (as many as are left in the period,
    at most what the history holds) from the data before each origin; if the
    root mean square error of those sums exceeds the spread of the simulated
    sums over the same span, every path's deviation from the mean is scaled up
    by the ratio (capped at MAX_WIDENING). The simulation alone assumes the
    level is known exactly; in the backtest it covered the period total too
    rarely.
    """
    n, horizon = y.size, paths.shape[0]
    span = min(horizon, n - MIN_ETS_DAYS)
    if CALIBRATION_ORIGINS < 3 or span < 1:
        return paths
    last = n - span
    first = max(MIN_ETS_DAYS, last - 5 * SEASON)
    origins = np.unique(np.linspace(first, last, CALIBRATION_ORIGINS).astype(int))
    if origins.size < 3:
        return paths
    zeros = np.zeros((span, 1))
    misses = [
        y[t : t + span].sum()
        - float(np.sum(fitted.simulate(span, anchor=int(t), repetitions=1, random_errors=zeros)))
        for t in origins
    ]
    spread = float(paths[:span].sum(axis=0).std())
    if spread <= 0.0:
        return paths
    factor = min(max(math.sqrt(float(np.mean(np.square(misses)))) / spread, 1.0), MAX_WIDENING)
    mean = paths.mean(axis=1, keepdims=True)
    return mean + factor * (paths - mean)


# --- summaries ----------------------------------------------------------------


def _nanos(values: np.ndarray, scale: float | np.ndarray) -> list:
    """Scaled values to whole nano-dollars floored at 0, as Python ints (a list, or a list
    of lists for a matrix)."""
    rounded = np.maximum(np.rint(np.asarray(values) * scale), 0.0)
    if rounded.size == 0 or rounded.max() < 2.0**62:
        return rounded.astype(np.int64).tolist()
    return np.vectorize(int, otypes=[object])(rounded).tolist()  # beyond int64


def _summarise(
    method: str,
    model: str,
    paths: np.ndarray,
    means: np.ndarray,
    scale: float,
    spent: int,
    today: date,
    limit: int | None,
    level: float,
    *,
    history_days: int,
) -> SpendForecast:
    q_low, q_high = (1.0 - level) / 2.0, (1.0 + level) / 2.0
    lows, highs = np.clip(np.quantile(paths, [q_low, q_high], axis=1), 0.0, None)
    # A day's spend is never negative: each path is floored day by day, and its period
    # total is its last cumulative value, so the band's end is the total's interval.
    cumulative = np.cumsum(np.clip(paths, 0.0, None), axis=0)
    cum_lows, cum_highs = np.quantile(cumulative, [q_low, q_high], axis=1)
    totals = cumulative[-1]
    total_low, total_high = _nanos(np.quantile(totals, [q_low, q_high]), scale)
    exceed = None if limit is None else float(np.mean(totals * scale > limit - spent))
    return _assemble(
        method,
        model,
        level,
        spent,
        today,
        limit,
        history_days,
        bands=(
            _nanos(means, scale),
            _nanos(lows, scale),
            _nanos(highs, scale),
            _nanos(cum_lows, scale),
            _nanos(cum_highs, scale),
        ),
        total=(total_low, total_high),
        exceed=exceed,
    )


def _assemble(
    method: str,
    model: str,
    level: float,
    spent: int,
    today: date,
    limit: int | None,
    history_days: int,
    *,
    bands: tuple[list[int], list[int], list[int], list[int], list[int]],
    total: tuple[int, int],
    exceed: float | None,
) -> SpendForecast:
    """The forecast from its figures in nano-dollars: per day the mean, its band and the
    band of the cumulative forecast spend (spent excluded); the forecast part's interval."""
    days, cumulative = [], spent
    for offset, (mean, low, high, cum_low, cum_high) in enumerate(zip(*bands, strict=True)):
        cumulative += mean
        days.append(
            ForecastDay(
                day=today + timedelta(days=offset),
                mean_nanos=mean,
                low_nanos=min(low, mean),
                high_nanos=max(high, mean),
                cumulative_nanos=cumulative,
                cumulative_low_nanos=min(spent + cum_low, cumulative),
                cumulative_high_nanos=max(spent + cum_high, cumulative),
            )
        )
    expected = cumulative
    low = min(spent + total[0], expected)
    high = max(spent + total[1], expected)

    runs_out_on = None
    if limit is not None:
        if spent >= limit:
            runs_out_on = today
        else:
            runs_out_on = next((d.day for d in days if d.cumulative_nanos >= limit), None)
    return SpendForecast(
        method=method,
        level=level,
        spent_nanos=spent,
        expected_nanos=expected,
        low_nanos=low,
        high_nanos=high,
        days=days,
        limit_nanos=limit,
        runs_out_on=runs_out_on,
        exceed_probability=exceed,
        model=model,
        history_days=history_days,
    )


def _none(
    spent: int, today: date, horizon: int, limit: int | None, level: float, history_days: int
) -> SpendForecast:
    """No model: the period total is what was spent (history empty, or the period is over)."""
    days = [
        ForecastDay(today + timedelta(days=i), 0, 0, 0, spent, spent, spent) for i in range(horizon)
    ]
    over = limit is not None and spent > limit
    if limit is None:
        exceed = None
    elif over or horizon == 0:
        exceed = 1.0 if over else 0.0
    else:
        exceed = None  # no history: unknown
    return SpendForecast(
        method="none",
        level=level,
        spent_nanos=spent,
        expected_nanos=spent,
        low_nanos=spent,
        high_nanos=spent,
        days=days,
        limit_nanos=limit,
        runs_out_on=today if limit is not None and spent >= limit else None,
        exceed_probability=exceed,
        history_days=history_days,
    )
