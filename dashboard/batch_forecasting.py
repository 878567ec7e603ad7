"""Spend forecasts of many end users at once.

``forecasting.forecast_spend`` fits statsmodels' ETS models one series at a
time (about 15 ms a series): a tenant with 10,000 active end users would take
minutes per refresh. ``forecast_spend_batch`` forecasts them together:

- a series with no history, under ``MIN_ETS_DAYS`` days or constant goes
  through ``forecast_spend`` as before (``"none"`` / ``"run_rate"``; well
  under a millisecond each);
- the ``ets_series`` largest spenders among the rest go through
  ``forecast_spend`` too (``"ets"``, unchanged);
- every other series is fitted by one vectorised pass over a matrix of all of
  them (``"ets_batch"``): additive-error exponential smoothing without trend,
  ETS(A,N,N) or, from ``MIN_SEASONAL_DAYS`` days, ETS(A,N,A) with the weekly
  season, its smoothing parameters the best on a grid (least squares, i.e.
  maximum likelihood), the model chosen per series by AICc. Initial states are
  heuristic: the level is the mean of the first ``INIT_DAYS`` days, the season
  those days' mean deviation per weekday. The interval is the model's own
  (normal errors, their variance at each horizon in closed form), widened as
  ``forecast_spend`` widens its ETS paths: by how far the model's recent
  multi-day sums missed, against what it expects.

Why those choices (the grid's level floor of 0.02 instead of ETS's 0.05, no
trend, how many series keep the ETS fit) is the backtest of ``bench/forecast.py
--end-users``; docs/benchmarks.md has its figures.

Each result is a ``forecasting.SpendForecast`` built like ``forecast_spend``'s
(expected values floored at 0 per day, interval of the period total floored at
0, today's partial day blended in the same way). The batched model's quantiles
and exceed probability come from its normal errors rather than from simulated
paths.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import date, timedelta
from statistics import NormalDist

import numpy as np

from dashboard.forecasting import (
    CALIBRATION_ORIGINS,
    MAX_WIDENING,
    MIN_ETS_DAYS,
    MIN_SEASONAL_DAYS,
    SEASON,
    SpendForecast,
    _assemble,
    _nanos,
    clean_history,
    forecast_spend,
)

ALPHAS = (0.02, 0.05, 0.1, 0.15, 0.2, 0.3, 0.5, 0.7)  # level smoothing on the grid
GAMMAS = (0.0, 0.05, 0.1, 0.2)  # season smoothing on the grid (seasonal model only)
INIT_DAYS = 14  # days the initial states are estimated from
ETS_SERIES = 100  # largest spenders still fitted one by one (bench/forecast.py --end-users)
CHUNK_SERIES = 5_000  # series per vectorised pass: bounds its memory (some 50 MB)
METHOD = "ets_batch"


def forecast_spend_batch(
    *,
    histories: Sequence[Sequence[int]],
    today: date,
    period_end: date,
    spent_nanos: Sequence[int],
    today_spent_nanos: Sequence[int] | None = None,
    day_fraction_elapsed: float = 0.0,
    limit_nanos: Sequence[int | None] | None = None,
    level: float = 0.8,
    ets_series: int | None = None,
) -> list[SpendForecast]:
    """``forecast_spend`` for many series on the same day and period, in their order.

    Every sequence holds one entry per series; the arguments mean what they mean
    for ``forecast_spend`` (every history ends yesterday). ``ets_series``: how many
    of the largest spenders keep the ETS fit (default ``ETS_SERIES``). Deterministic.
    """
    if not 0.0 < level < 1.0:
        raise ValueError("level must be between 0 and 1")
    count = len(histories)
    today_spent = list(today_spent_nanos) if today_spent_nanos is not None else [0] * count
    limits = list(limit_nanos) if limit_nanos is not None else [None] * count
    if not len(spent_nanos) == len(today_spent) == len(limits) == count:
        raise ValueError("one spent, today's spend and limit per history")
    horizon = (period_end - today).days + 1
    series = [clean_history(h) for h in histories]

    def single(i: int) -> SpendForecast:
        return forecast_spend(
            history=histories[i],
            today=today,
            period_end=period_end,
            spent_nanos=spent_nanos[i],
            today_spent_nanos=today_spent[i],
            day_fraction_elapsed=day_fraction_elapsed,
            limit_nanos=limits[i],
            level=level,
        )

    modelled = [
        i
        for i, y in enumerate(series)
        if horizon > 0 and y.size >= MIN_ETS_DAYS and np.ptp(y) > 0.0
    ]
    by_spend = sorted(modelled, key=lambda i: -float(series[i].sum()))
    one_by_one = set(by_spend[: max(ETS_SERIES if ets_series is None else ets_series, 0)])
    batched = [i for i in modelled if i not in one_by_one]
    out: list[SpendForecast | None] = [None] * count
    for first in range(0, len(batched), CHUNK_SERIES):
        chunk = batched[first : first + CHUNK_SERIES]
        results = _batch(
            [series[i] for i in chunk],
            today=today,
            horizon=horizon,
            spent=[int(spent_nanos[i]) for i in chunk],
            today_spent=[int(today_spent[i]) for i in chunk],
            fraction=min(max(float(day_fraction_elapsed), 0.0), 1.0),
            limits=[limits[i] for i in chunk],
            level=level,
        )
        for i, result in zip(chunk, results, strict=True):
            out[i] = result
    return [result if result is not None else single(i) for i, result in enumerate(out)]


def _batch(
    series: list[np.ndarray],
    *,
    today: date,
    horizon: int,
    spent: list[int],
    today_spent: list[int],
    fraction: float,
    limits: list[int | None],
    level: float,
) -> list[SpendForecast]:
    """The vectorised model over series of MIN_ETS_DAYS days or more, none constant."""
    fit = _fit(series, today)
    # Today's remaining part, as forecast_spend blends it: the mean (floored at 0 first)
    # and the centre of the band move to today's pace; today's own error shrinks by
    # (1 - f)^2 (the later days' dependence on it does not).
    mu, sd, cum_sd = _moments(fit, horizon, today_weight=(1.0 - fraction) ** 2)
    scale = fit.scale[:, None]
    mean = np.clip(mu, 0.0, None)
    if fraction > 0.0:
        rate = np.maximum(np.asarray(today_spent, dtype=np.float64), 0.0) / fit.scale / fraction
        mu[:, 0] = (1.0 - fraction) * (fraction * rate + (1.0 - fraction) * mu[:, 0])
        mean[:, 0] = (1.0 - fraction) * (fraction * rate + (1.0 - fraction) * mean[:, 0])

    normal = NormalDist()
    z = normal.inv_cdf((1.0 + level) / 2.0)
    cum_mu = np.cumsum(mu, axis=1)
    total_mu, total_sd = cum_mu[:, -1], cum_sd[:, -1]
    rows = zip(
        _nanos(mean, scale),
        _nanos(mu - z * sd, scale),
        _nanos(mu + z * sd, scale),
        _nanos(cum_mu - z * cum_sd, scale),
        _nanos(cum_mu + z * cum_sd, scale),
        _nanos(total_mu - z * total_sd, fit.scale),
        _nanos(total_mu + z * total_sd, fit.scale),
        strict=True,
    )
    out = []
    for u, (means, lows, highs, cum_lows, cum_highs, low, high) in enumerate(rows):
        exceed, limit = None, limits[u]
        if limit is not None:
            # P(max(total, 0) * scale > limit - spent), the total normal.
            room = (limit - spent[u]) / float(fit.scale[u])
            if room < 0.0:
                exceed = 1.0
            elif total_sd[u] > 0.0:
                exceed = 1.0 - normal.cdf((room - total_mu[u]) / total_sd[u])
            else:
                exceed = float(total_mu[u] > room)
        out.append(
            _assemble(
                METHOD,
                fit.models[u],
                level,
                spent[u],
                today,
                limit,
                int(fit.days[u]),
                bands=(means, lows, highs, cum_lows, cum_highs),
                total=(low, high),
                exceed=exceed,
            )
        )
    return out


class _Fit:
    """Every series' chosen model: its parameters, and its states after every day."""

    def __init__(self, series: list[np.ndarray], today: date) -> None:
        self.today = today
        self.days = np.array([y.size for y in series])
        count, width = len(series), int(self.days.max())
        # Right-aligned: column c is the day ``today - width + c`` in every row.
        self.y = np.zeros((count, width))
        for u, y in enumerate(series):
            self.y[u, width - y.size :] = y
        self.scale = np.maximum(self.y.sum(axis=1) / self.days, 1.0)
        self.y /= self.scale[:, None]  # work near 1, whatever the magnitude
        self.first = width - self.days  # each series' first column
        self.active = np.arange(width)[None, :] >= self.first[:, None]
        self.weekday0 = (today - timedelta(days=width)).weekday()  # column 0's
        self.alpha, self.gamma, self.sigma2 = np.zeros(count), np.zeros(count), np.zeros(count)
        self.seasonal = np.zeros(count, dtype=bool)
        self.levels = np.zeros((count, width))
        self.seasons = np.zeros((count, width, SEASON))  # by weekday
        self.models: list[str] = []

    def weekday(self, columns: np.ndarray) -> np.ndarray:
        return (self.weekday0 + columns) % SEASON


def _fit(series: list[np.ndarray], today: date) -> _Fit:
    """Every grid point on every series at once, the best by AICc, then its states."""
    fit = _Fit(series, today)
    count = len(series)
    level0, season0 = _initial_states(fit)
    alphas = np.array(ALPHAS + tuple(a for a in ALPHAS for _ in GAMMAS))
    gammas = np.array((0.0,) * len(ALPHAS) + tuple(g for _ in ALPHAS for g in GAMMAS))
    seasonal = np.arange(alphas.size) >= len(ALPHAS)
    sse = _filter(fit, alphas, gammas, level0, season0[None] * seasonal[:, None, None])

    n = fit.days.astype(np.float64)
    params = np.where(seasonal, 3 + SEASON, 3)[:, None]  # alpha, [gamma, 6 seasons], level, sigma
    with np.errstate(divide="ignore"):
        aicc = (
            n * np.log(np.maximum(sse, 1e-300) / n)
            + 2 * params
            + 2 * params * (params + 1) / np.maximum(n - params - 1, 1)
        )
    aicc[seasonal[:, None] & (fit.days < MIN_SEASONAL_DAYS)[None, :]] = np.inf
    best = np.argmin(aicc, axis=0)
    fit.alpha, fit.gamma, fit.seasonal = alphas[best], gammas[best], seasonal[best]
    fit.sigma2 = sse[best, np.arange(count)] / n
    fit.models = [
        f"ETS(A,N,A) a={a:g} g={g:g}" if s else f"ETS(A,N,N) a={a:g}"
        for a, g, s in zip(
            fit.alpha.tolist(), fit.gamma.tolist(), fit.seasonal.tolist(), strict=True
        )
    ]
    _filter(
        fit,
        fit.alpha[None],
        fit.gamma[None],
        level0,
        season0[None] * fit.seasonal[None, :, None],
        keep=True,
    )
    return fit


def _initial_states(fit: _Fit) -> tuple[np.ndarray, np.ndarray]:
    """Level: the mean of each series' first INIT_DAYS days. Season: those days' mean
    deviation from it per weekday, centred (used by the seasonal models only)."""
    count, width = fit.y.shape
    columns = np.minimum(fit.first[:, None] + np.arange(INIT_DAYS)[None, :], width - 1)
    valid = fit.first[:, None] + np.arange(INIT_DAYS)[None, :] < width
    values = np.take_along_axis(fit.y, columns, axis=1)
    level0 = (values * valid).sum(axis=1) / valid.sum(axis=1)
    weekdays = fit.weekday(columns)
    season0 = np.zeros((count, SEASON))
    seen = np.zeros((count, SEASON))
    rows = np.repeat(np.arange(count), INIT_DAYS)
    np.add.at(season0, (rows, weekdays.ravel()), ((values - level0[:, None]) * valid).ravel())
    np.add.at(seen, (rows, weekdays.ravel()), valid.ravel())
    season0 = np.where(seen > 0, season0 / np.maximum(seen, 1), 0.0)
    return level0, season0 - season0.mean(axis=1, keepdims=True)


def _filter(
    fit: _Fit,
    alphas: np.ndarray,
    gammas: np.ndarray,
    level0: np.ndarray,
    season0: np.ndarray,
    *,
    keep: bool = False,
) -> np.ndarray:
    """ETS(A,N,A) on every series for each of G parameter pairs: alphas and gammas are
    (G,) or (G, count), season0 (G, count, SEASON); the sum of squared one-step errors,
    (G, count). With ``keep`` (G == 1) the states after every day go to ``fit``."""
    alphas = alphas.reshape(alphas.shape[0], -1)
    gammas = gammas.reshape(gammas.shape[0], -1)
    level = np.repeat(level0[None, :], alphas.shape[0], axis=0)
    season = np.array(np.broadcast_to(season0, (alphas.shape[0], *season0.shape[1:])))
    sse = np.zeros_like(level)
    for column in range(int(fit.first.min()), fit.y.shape[1]):
        day = (fit.weekday0 + column) % SEASON
        error = np.where(fit.active[:, column], fit.y[:, column] - level - season[:, :, day], 0.0)
        sse += error * error
        level += alphas * error
        season[:, :, day] += gammas * error
        if keep:
            fit.levels[:, column] = level[0]
            fit.seasons[:, column] = season[0]
    return sse


def _moments(
    fit: _Fit, horizon: int, *, today_weight: float
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per series and forecast day: the mean, the standard deviation of the day and of
    the cumulative sum to that day, in scaled units, widened by the model's recent misses.

    With additive errors, day h's error is sum_j psi_{h-j} e_j (psi_0 = 1; psi_k = alpha,
    plus gamma when k is a whole number of weeks): its variance is sigma^2 times the
    running sum of psi^2, and the cumulative sum's sigma^2 times the running sum of
    Psi^2, Psi the running sum of psi. ``today_weight`` scales day 0's own error (its
    elapsed part is known), after the widening is measured as forecast_spend does."""
    weekdays = (fit.today.weekday() + np.arange(horizon)) % SEASON
    mu = fit.levels[:, -1][:, None] + fit.seasons[:, -1][:, weekdays]

    steps = np.arange(horizon)
    psi = fit.alpha[:, None] + fit.gamma[:, None] * ((steps % SEASON == 0) & (steps > 0))
    psi[:, 0] = 1.0
    big_psi = np.cumsum(psi, axis=1)
    daily_var = np.cumsum(psi**2, axis=1)
    cum_var = np.cumsum(big_psi**2, axis=1)
    sigma = np.sqrt(fit.sigma2)[:, None]
    widening = _widening(fit, horizon, sigma[:, 0:1] * np.sqrt(cum_var))[:, None]
    # The first day's innovation: its weight on day 0 changes from 1 to today_weight.
    daily_var[:, 0] = today_weight**2
    cum_var += (big_psi - 1.0 + today_weight) ** 2 - big_psi**2
    scale = widening * sigma
    return mu, scale * np.sqrt(daily_var), scale * np.sqrt(np.maximum(cum_var, 0.0))


def _widening(fit: _Fit, horizon: int, cum_sd: np.ndarray) -> np.ndarray:
    """forecasting._calibrate for every series: from CALIBRATION_ORIGINS past origins in
    the last five weeks, the model's forecast of the next ``span`` days against what was
    spent; the root mean square miss over the model's own spread, between 1 and
    MAX_WIDENING (1 with fewer than 3 distinct origins)."""
    count, width = fit.y.shape
    rows = np.arange(count)
    span = np.minimum(horizon, fit.days - MIN_ETS_DAYS)
    last = fit.days - span
    first = np.maximum(MIN_ETS_DAYS, last - 5 * SEASON)
    k = np.arange(max(CALIBRATION_ORIGINS, 1))
    steps = max(CALIBRATION_ORIGINS - 1, 1)
    origins = np.floor(first[:, None] + k[None, :] * (last - first)[:, None] / steps + 1e-9)
    origins = origins.astype(int)  # days seen before each origin
    distinct = np.ones_like(origins, dtype=bool)
    distinct[:, 1:] = origins[:, 1:] != origins[:, :-1]
    usable = (span >= 1) & (distinct.sum(axis=1) >= 3) & (CALIBRATION_ORIGINS >= 3)

    column = fit.first[:, None] + origins  # first forecast column from each origin
    seen = np.clip(column - 1, 0, width - 1)
    level = fit.levels[rows[:, None], seen]
    season = fit.seasons[rows[:, None], seen]  # (count, origins, SEASON)
    # Weekdays in the span from each origin: whole weeks, then the first span % 7 days.
    start_day = fit.weekday(column)
    offset = (np.arange(SEASON)[None, None, :] - start_day[:, :, None]) % SEASON
    in_span = span[:, None, None] // SEASON + (offset < (span % SEASON)[:, None, None])
    forecast = span[:, None] * level + (in_span * season).sum(axis=2)
    sums = np.concatenate([np.zeros((count, 1)), np.cumsum(fit.y, axis=1)], axis=1)
    end = np.clip(column + span[:, None], 0, width)
    actual = sums[rows[:, None], end] - sums[rows[:, None], np.clip(column, 0, width)]
    misses = np.where(distinct, (actual - forecast) ** 2, 0.0).sum(axis=1) / distinct.sum(axis=1)
    spread = cum_sd[rows, np.clip(span - 1, 0, horizon - 1)]
    with np.errstate(divide="ignore", invalid="ignore"):
        ratio = np.sqrt(misses) / spread
    factor = np.clip(ratio, 1.0, MAX_WIDENING)
    return np.where(usable & (spread > 0.0) & np.isfinite(ratio), factor, 1.0)
