"""Backtest of the spend forecasts (dashboard/forecasting.py): accuracy, interval coverage, speed.

    .venv/bin/python bench/forecast.py [--seeds 5] [--level 0.8] [--json OUT]
                                       [--database-url URL] [--skip-demo] [--sweep]
    .venv/bin/python bench/forecast.py --end-users 10000 [--sample 200] [--skip-service]

Rolling origin: at every origin (the start of a day), the forecaster sees the
complete days before it and forecasts the rest of the budget period; the
forecast is then compared with what was actually spent. Reported per series
and method:

- **total MAPE**: mean absolute percentage error of the period's total (spent
  so far + forecast), the figure a budget page shows;
- **rest MAPE**: the same on the forecast part only (the period total minus
  what was already spent), which is not diluted by the known part;
- **daily MAPE**: per forecast day (days with actual spend > 0);
- **total cover / daily cover**: how often the actual value fell inside the
  forecast's interval (nominal: ``--level``).

Series:

(a) synthetic, 120 days from 2026-01-01 (Jan-Apr), one per seed: a weekday /
    weekend pattern (weekends at 35 %), a linear trend (+50 % over the 120
    days) and multiplicative log-normal noise (sigma 0.2). Periods are calendar
    months; origins every day of Feb-Apr (31-119 days of history), and
    separately every day of January from the 3rd (2-30 days: a new tenant);
(a2) synthetic end user, 120 days, one per seed: intermittent (active on 60 % of
    weekdays and 20 % of weekend days, log-normal spend when active), no trend.
    The forecaster also runs per end user;
(b) the ``demo`` tenant's ledger (``routing.models.UsageEvent``), summed by day
    in the tenant's time zone, if the database has it (``manage.py seed_demo``
    writes a history); calendar months when there are two or more, else the
    next 7 days from each origin with 14+ days of history.

Methods:

- ``auto``: what the dashboard uses (ETS chosen by AICc, level smoothing >= 0.05,
  intervals widened by the model's own recent misses; run rate below 10 days);
- ``ets_batch``: the batched model of ``dashboard.batch_forecasting`` (every series
  of an origin in one ``forecast_spend_batch`` call, none kept on ETS): ETS(A,N,N) or
  ETS(A,N,A) on a grid, normal intervals in closed form, the same widening;
- ``ETS, plain``: the same AICc choice with statsmodels' defaults (smoothing
  free) and no widening;
- ``ETS(A,Ad,A), plain``: the one ETS model first suggested for this job
  (damped trend, weekly season), no AICc choice, defaults, no widening;
- ``seasonal_naive``: last week repeated (bootstrapped week-on-week changes);
- ``run_rate``: the baseline, mean of the last 7 days x remaining days
  (bootstrapped from those days).

``--sweep`` adds ``auto`` with other floors on the level's smoothing
parameter (free, 0.02, 0.1; ``auto`` itself uses 0.05), which is how that floor
was chosen.

``--end-users N`` runs instead what batching end users' forecasts is judged on:

1. the end-user backtest (a2) with ``auto``, ``ets_batch`` and ``ets_batch`` with
   its grid's level smoothing held >= 0.05 (as ``auto``'s);
2. N synthetic end users (``fleet``: heavy, medium and sparse spenders, seeded),
   the 56 days of history the refresh reads, April 2026 as the period, origins on
   April 1st, 11th and 21st: the period total's rest MAPE, WAPE (sum of absolute
   errors over the sum of the forecast part) and interval coverage per segment, for
   ``forecast_spend`` one by one on ``--sample`` users, and ``forecast_spend_batch``
   (as deployed: ETS for the ``ETS_SERIES`` largest spenders; without ETS; without
   ETS and with the 0.05 floor) on the same users and on all N;
3. the time of one refresh of all N (April 11th): one by one, ``--sample``
   sequential ``forecast_spend`` calls timed and extrapolated to N; batched, the
   whole N timed; and ``dashboard.services.forecasts_refresh`` itself, twice (the
   first refresh, then one that replaces its snapshots), for a tenant with the N
   end users as daily rollups in a throwaway PostgreSQL database (created,
   migrated, dropped; every user made active with one nano-dollar yesterday if it
   spent nothing in the last 14 days). Target: N = 10,000 in <= 20 s.

Speed: ``forecast_spend`` with ``method="auto"`` on 90 days of history and a
30-day rest of period, median and p95 per call (wall), and CPU time. Most of a
call is statsmodels' L-BFGS-B fit, whose BLAS calls go multi-threaded: on a
busy machine that costs several times the single-threaded time, so compare
runs with ``OPENBLAS_NUM_THREADS=1``.
"""

from __future__ import annotations

import argparse
import calendar
import contextlib
import json
import os
import secrets
import statistics
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, date, datetime, timedelta
from pathlib import Path

import numpy as np

os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")
ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from dashboard import batch_forecasting, forecasting  # noqa: E402
from dashboard.batch_forecasting import ETS_SERIES, forecast_spend_batch  # noqa: E402
from dashboard.forecasting import forecast_spend  # noqa: E402

USD = 10**9
START = date(2026, 1, 1)
METHODS = ("auto", "ets_batch", "ETS, plain", "ETS(A,Ad,A), plain", "seasonal_naive", "run_rate")


# --- series ------------------------------------------------------------------


def synthetic_seasonal(seed: int, days: int = 120) -> list[int]:
    rng = np.random.default_rng(seed)
    t = np.arange(days)
    weekday = np.array([(START + timedelta(days=int(i))).weekday() for i in t])
    level = 20.0 * (1.0 + 0.5 * t / days)  # USD per weekday
    season = np.where(weekday >= 5, 0.35, 1.0)
    noise = rng.lognormal(-0.02, 0.2, days)  # mean ~1
    return [int(v * USD) for v in level * season * noise]


def synthetic_end_user(seed: int, days: int = 120) -> list[int]:
    rng = np.random.default_rng(10_000 + seed)
    out = []
    for i in range(days):
        weekend = (START + timedelta(days=i)).weekday() >= 5
        active = rng.random() < (0.2 if weekend else 0.6)
        out.append(int(rng.lognormal(0.3, 0.8) * USD) if active else 0)
    return out


def demo_series(database_url: str | None) -> tuple[list[int], date] | str:
    """(daily spend, first day) of the demo tenant, or why there is none."""
    if database_url:
        os.environ["DATABASE_URL"] = database_url
    if not os.environ.get("DATABASE_URL"):
        sqlite = Path(os.environ.get("CASCADEFLOW_VAR_DIR", ROOT / "var")) / "cascadeflow.sqlite3"
        if not sqlite.exists():  # don't let the connection create an empty file
            return f"no database ({sqlite} does not exist and DATABASE_URL is not set)"
    os.environ.setdefault("DJANGO_SETTINGS_MODULE", "cascadeflow_site.settings")
    import django

    django.setup()
    from zoneinfo import ZoneInfo

    from django.db import DatabaseError
    from django.db.models import Sum
    from django.db.models.functions import TruncDate
    from django.utils import timezone

    from routing.models import UsageEvent
    from tenants.models import Tenant

    try:
        tenant = Tenant.objects.filter(slug="demo").first()
        if tenant is None:
            return "the database has no 'demo' tenant"
        tz = ZoneInfo(tenant.time_zone or "UTC")
        rows = (
            UsageEvent.objects.filter(tenant=tenant)
            .order_by()
            .annotate(day=TruncDate("created_at", tzinfo=tz))
            .values("day")
            .annotate(cost=Sum("cost_nanos"))
        )
        by_day = {r["day"]: int(r["cost"] or 0) for r in rows}
    except DatabaseError as exc:
        return f"could not read the ledger ({exc.__class__.__name__}: {exc})"
    if not by_day:
        return "the 'demo' tenant has no usage events"
    today = timezone.now().astimezone(tz).date()
    first, last = min(by_day), min(max(by_day), today - timedelta(days=1))  # complete days only
    n = (last - first).days + 1
    if n < 21:
        return f"the 'demo' tenant has {max(n, 0)} complete days of usage; 21 needed"
    return [by_day.get(first + timedelta(days=i), 0) for i in range(n)], first


# --- backtest ------------------------------------------------------------------


@dataclass
class Score:
    total_ape: list[float] = field(default_factory=list)
    rest_ape: list[float] = field(default_factory=list)
    daily_ape: list[float] = field(default_factory=list)
    total_in: list[bool] = field(default_factory=list)
    daily_in: list[bool] = field(default_factory=list)
    methods: dict[str, int] = field(default_factory=dict)

    def add(self, f: forecasting.SpendForecast, spent: int, actual_days: list[int]) -> None:
        """One forecast against what was then spent: ``actual_days`` from its first day."""
        actual_total = spent + sum(actual_days)
        self.methods[f.method] = self.methods.get(f.method, 0) + 1
        if actual_total > 0:
            self.total_ape.append(abs(f.expected_nanos - actual_total) / actual_total)
            self.total_in.append(f.low_nanos <= actual_total <= f.high_nanos)
        rest = actual_total - spent
        if rest > 0:
            self.rest_ape.append(abs(f.expected_nanos - actual_total) / rest)
        for d, actual in zip(f.days, actual_days, strict=True):
            if actual > 0:
                self.daily_ape.append(abs(d.mean_nanos - actual) / actual)
            self.daily_in.append(d.low_nanos <= actual <= d.high_nanos)

    def row(self) -> dict:
        pct = lambda v: round(100 * statistics.fmean(v), 1) if v else None  # noqa: E731
        return {
            "origins": len(self.total_ape),
            "total_mape": pct(self.total_ape),
            "rest_mape": pct(self.rest_ape),
            "daily_mape": pct(self.daily_ape),
            "total_coverage": pct(self.total_in),
            "daily_coverage": pct(self.daily_in),
            "methods_used": dict(sorted(self.methods.items())),
        }


@dataclass(frozen=True)
class Origin:
    index: int  # first forecast day (today), as an index into the series
    start: int  # first day of the period (index; may be < 0 if before the data)
    end: int  # last day of the period (index, inclusive)


def month_origins(first: date, n: int, min_history: int, max_history: int) -> list[Origin]:
    out = []
    for i in range(n):
        day = first + timedelta(days=i)
        start = i - (day.day - 1)
        end = i + calendar.monthrange(day.year, day.month)[1] - day.day
        if end < n and min_history <= i <= max_history:
            out.append(Origin(i, start, end))
    return out


def week_origins(n: int, min_history: int) -> list[Origin]:
    return [Origin(i, i, i + 6) for i in range(min_history, n - 6)]


@contextlib.contextmanager
def plain_ets(fixed_spec: bool) -> Iterator[None]:
    """statsmodels' defaults: alpha free, no widening; optionally ETS(A,Ad,A) only (no AICc)."""
    saved = (forecasting._ets_specs, forecasting.MIN_SMOOTHING_LEVEL)
    saved_origins = forecasting.CALIBRATION_ORIGINS
    specs = saved[0]
    if fixed_spec:
        forecasting._ets_specs = lambda n: [specs(n)[-1]]
    forecasting.MIN_SMOOTHING_LEVEL = None
    forecasting.CALIBRATION_ORIGINS = 0
    try:
        yield
    finally:
        forecasting._ets_specs, forecasting.MIN_SMOOTHING_LEVEL = saved
        forecasting.CALIBRATION_ORIGINS = saved_origins


@contextlib.contextmanager
def smoothing_floor(floor: float | None) -> Iterator[None]:
    saved = forecasting.MIN_SMOOTHING_LEVEL
    forecasting.MIN_SMOOTHING_LEVEL = floor
    try:
        yield
    finally:
        forecasting.MIN_SMOOTHING_LEVEL = saved


@contextlib.contextmanager
def batch_floor(floor: float | None) -> Iterator[None]:
    """The batched model's grid of level smoothing without the values below ``floor``."""
    saved = batch_forecasting.ALPHAS
    if floor is not None:
        batch_forecasting.ALPHAS = tuple(a for a in saved if a >= floor)
    try:
        yield
    finally:
        batch_forecasting.ALPHAS = saved


def run_method(method: str, **kwargs) -> forecasting.SpendForecast:
    if method.startswith("auto, alpha"):  # "auto, alpha >= 0.1" / "auto, alpha free"
        floor = None if method.endswith("free") else float(method.rsplit(" ", 1)[1])
        with smoothing_floor(floor):
            return forecast_spend(method="auto", **kwargs)
    if method.startswith("ETS"):
        with plain_ets(fixed_spec=method.startswith("ETS(A,Ad,A)")):
            return forecast_spend(method="ets", **kwargs)
    return forecast_spend(method=method, **kwargs)


def backtest(
    series: list[list[int]], first: date, origins: list[Origin], method: str, level: float
) -> Score:
    """Every series (same days) from every origin; ``ets_batch`` forecasts the series of
    an origin together (forecast_spend_batch, every series through the batched model)."""
    score = Score()
    for o in origins:
        today = first + timedelta(days=o.index)
        common = dict(today=today, period_end=first + timedelta(days=o.end), level=level)
        spent = [sum(y[max(o.start, 0) : o.index]) for y in series]
        if method.startswith("ets_batch"):  # "ets_batch" / "ets_batch, alpha >= 0.05"
            floor = float(method.rsplit(" ", 1)[1]) if "alpha" in method else None
            with batch_floor(floor):
                forecasts = forecast_spend_batch(
                    histories=[y[: o.index] for y in series],
                    spent_nanos=spent,
                    ets_series=0,
                    **common,
                )
        else:
            forecasts = [
                run_method(method, history=y[: o.index], spent_nanos=paid, **common)
                for y, paid in zip(series, spent, strict=True)
            ]
        for y, paid, f in zip(series, spent, forecasts, strict=True):
            score.add(f, paid, y[o.index : o.end + 1])
    return score


def timing(seeds: int, calls: int = 20) -> dict:
    """Wall and CPU milliseconds per forecast_spend call (90 days of history, 30 to forecast)."""
    wall, cpu = [], []
    for seed in range(1, seeds + 1):
        history = synthetic_seasonal(seed)[:90]
        kwargs = dict(
            history=history,
            today=START + timedelta(days=90),
            period_end=START + timedelta(days=119),
            spent_nanos=0,
            limit_nanos=1000 * USD,
        )
        forecast_spend(**kwargs)  # warm-up (imports)
        for _ in range(calls):
            started, started_cpu = time.perf_counter(), time.process_time()
            forecast_spend(**kwargs)
            wall.append((time.perf_counter() - started) * 1000)
            cpu.append((time.process_time() - started_cpu) * 1000)
    wall.sort()
    return {
        "calls": len(wall),
        "p50_ms": round(statistics.median(wall), 1),
        "p95_ms": round(wall[int(0.95 * (len(wall) - 1))], 1),
        "max_ms": round(wall[-1], 1),
        "cpu_p50_ms": round(statistics.median(cpu), 1),
        "load_average_1m": round(os.getloadavg()[0], 2),
        "OPENBLAS_NUM_THREADS": os.environ.get("OPENBLAS_NUM_THREADS", "unset"),
        "cpus": os.cpu_count(),
    }


# --- many end users (--end-users) --------------------------------------------------

FLEET_DAYS = 120  # 2026-01-01 to 2026-04-30, like the other synthetic series
FLEET_PERIOD = (90, 119)  # April, as indices into the series
FLEET_ORIGINS = (90, 100, 110)  # April 1st, 11th and 21st: 30, 20 and 10 days to forecast
TIMED_ORIGIN = 100
SEGMENTS = ("heavy", "medium", "sparse")
PG_ADMIN = "postgresql://postgres@127.0.0.1:5432/postgres"


def fleet(count: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(segment of each end user, daily spend in nano-dollars, shape (count, FLEET_DAYS)).

    heavy (5 %): spends every day, $20 a weekday (log-normal across users, sigma 0.8),
    weekends at 30-100 % of that, daily noise log-normal (sigma 0.15-0.4);
    medium (25 %): $1 (sigma 0.8) on 60-95 % of weekdays and a fifth to all as many
    weekend days, amounts log-normal (sigma 0.6);
    sparse (70 %): $0.20 (sigma 1.0) on 5-50 % of weekdays, as medium on weekends,
    amounts log-normal (sigma 1.0).
    Every user grows linearly by -30 % to +60 % over the 120 days; of the medium and
    sparse ones 10 % stop spending (from day 60-119), 10 % change level once (x0.3-3,
    from day 30-119) and, independently, 20 % start late (on day 1-99).
    """
    rng = np.random.default_rng(seed)
    t = np.arange(FLEET_DAYS)
    weekend = np.array([(START + timedelta(days=int(i))).weekday() >= 5 for i in t])
    kinds = rng.choice(np.array(SEGMENTS), size=count, p=[0.05, 0.25, 0.70])
    spend = np.zeros((count, FLEET_DAYS), dtype=np.int64)
    for u, kind in enumerate(kinds):
        if kind == "heavy":
            level, p_weekday, p_weekend = rng.lognormal(np.log(20.0), 0.8), 1.0, 1.0
            noise, weekend_factor = rng.uniform(0.15, 0.4), rng.uniform(0.3, 1.0)
        else:
            level = (
                rng.lognormal(np.log(1.0), 0.8)
                if kind == "medium"
                else rng.lognormal(np.log(0.2), 1.0)
            )
            p_weekday = rng.uniform(0.6, 0.95) if kind == "medium" else rng.uniform(0.05, 0.5)
            p_weekend = p_weekday * rng.uniform(0.2, 1.0)
            noise, weekend_factor = (0.6 if kind == "medium" else 1.0), 1.0
        path = level * (1.0 + rng.uniform(-0.3, 0.6) * t / FLEET_DAYS)
        path *= np.where(weekend, weekend_factor, 1.0)
        if kind != "heavy":
            event = rng.random()
            if event < 0.1:  # stops
                path[rng.integers(60, FLEET_DAYS) :] = 0.0
            elif event < 0.2:  # changes level
                path[rng.integers(30, FLEET_DAYS) :] *= rng.uniform(0.3, 3.0)
            if rng.random() < 0.2:  # starts late
                path[: rng.integers(1, 100)] = 0.0
        active = rng.random(FLEET_DAYS) < np.where(weekend, p_weekend, p_weekday)
        amounts = rng.lognormal(-(noise**2) / 2, noise, FLEET_DAYS)
        spend[u] = (path * active * amounts * USD).astype(np.int64)
    return kinds, spend


@dataclass
class FleetScore:
    """Per segment: rest APE per user, sum of |error| and of the rest, total interval hits."""

    rest_ape: dict[str, list[float]] = field(default_factory=dict)
    error: dict[str, float] = field(default_factory=dict)
    rest: dict[str, float] = field(default_factory=dict)
    covered: dict[str, list[bool]] = field(default_factory=dict)

    def add(self, segment: str, f: forecasting.SpendForecast, spent: int, future: int) -> None:
        total = spent + future
        for key in (segment, "all"):
            if future > 0:
                self.rest_ape.setdefault(key, []).append(abs(f.expected_nanos - total) / future)
            self.error[key] = self.error.get(key, 0.0) + abs(f.expected_nanos - total)
            self.rest[key] = self.rest.get(key, 0.0) + future
            if total > 0:
                self.covered.setdefault(key, []).append(f.low_nanos <= total <= f.high_nanos)

    def row(self) -> dict:
        def one(key: str) -> dict:
            hits, apes = self.covered.get(key, []), self.rest_ape.get(key, [])
            return {
                "forecasts": len(hits),
                "rest_mape": round(100 * statistics.fmean(apes), 1) if apes else None,
                "wape": round(100 * self.error[key] / self.rest[key], 1)
                if self.rest.get(key)
                else None,
                "total_coverage": round(100 * statistics.fmean(hits), 1) if hits else None,
            }

        return {key: one(key) for key in (*SEGMENTS, "all")}


def fleet_backtest(
    kinds: np.ndarray, spend: np.ndarray, sample: np.ndarray, history_days: int, level: float
) -> tuple[list[dict], dict]:
    """Per end user (forecast_spend, on the sample) and batched (forecast_spend_batch, on
    every user, scored on the sample and on all): accuracy rows and the timed origin's times."""
    period_end = START + timedelta(days=FLEET_PERIOD[1])
    variants = (("batched", ETS_SERIES, None), ("no_ets", 0, None), ("no_ets_05", 0, 0.05))
    names = ("per_user", "batched_sample", *(name for name, _, _ in variants))
    scores = {name: FleetScore() for name in names}
    times: dict = {}
    forecast_spend(
        history=spend[0, :30].tolist(), today=START, period_end=period_end, spent_nanos=0
    )  # warm-up: statsmodels' import
    for origin in FLEET_ORIGINS:
        today = START + timedelta(days=origin)
        histories = spend[:, max(origin - history_days, 0) : origin].tolist()
        spent = spend[:, FLEET_PERIOD[0] : origin].sum(axis=1).tolist()
        future = spend[:, origin : FLEET_PERIOD[1] + 1].sum(axis=1).tolist()
        common = dict(today=today, period_end=period_end, level=level)

        wall, cpu = time.perf_counter(), time.process_time()
        per_user = [
            forecast_spend(history=histories[u], spent_nanos=spent[u], **common) for u in sample
        ]
        wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
        if origin == TIMED_ORIGIN:
            times["per_user"] = {"calls": len(sample), "wall_s": wall, "cpu_s": cpu}
        for u, f in zip(sample, per_user, strict=True):
            scores["per_user"].add(kinds[u], f, spent[u], future[u])

        for name, ets_series, floor in variants:
            wall, cpu = time.perf_counter(), time.process_time()
            with batch_floor(floor):
                batch = forecast_spend_batch(
                    histories=histories, spent_nanos=spent, ets_series=ets_series, **common
                )
            wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
            if origin == TIMED_ORIGIN:
                times[name] = {"series": len(histories), "wall_s": wall, "cpu_s": cpu}
            for u, f in enumerate(batch):
                scores[name].add(kinds[u], f, spent[u], future[u])
            if name == "batched":
                for u in sample:
                    scores["batched_sample"].add(kinds[u], batch[u], spent[u], future[u])
                methods = {}
                for f in batch:
                    methods[f.method] = methods.get(f.method, 0) + 1
                times.setdefault("methods", {})[str(today)] = methods
        print(".", end="", file=sys.stderr, flush=True)
    print(file=sys.stderr)
    labels = {
        "per_user": f"per end user (forecast_spend), sample of {len(sample):,}",
        "batched_sample": f"batched (ETS for the top {ETS_SERIES}), same sample",
        "batched": f"batched (ETS for the top {ETS_SERIES}), all {len(kinds):,}",
        "no_ets": f"batched, no ETS (ets_series=0), all {len(kinds):,}",
        "no_ets_05": f"batched, no ETS, level smoothing >= 0.05, all {len(kinds):,}",
    }
    rows = [{"method": labels[name], **score.row()} for name, score in scores.items()]
    return rows, times


def service_refresh(spend: np.ndarray, origin: int) -> dict | str:
    """``dashboard.services.forecasts_refresh`` for a tenant whose end users spent ``spend``,
    timed, in a throwaway PostgreSQL database (created, migrated, dropped); or why not."""
    try:
        import psycopg

        throwaway = f"cf_bench_forecast_{secrets.token_hex(3)}"
        with psycopg.connect(PG_ADMIN, autocommit=True, connect_timeout=5) as conn:
            conn.execute(f'CREATE DATABASE "{throwaway}"')
    except Exception as exc:  # no server: the rest of the bench still runs
        return f"no PostgreSQL at {PG_ADMIN} ({exc.__class__.__name__})"
    os.environ["DATABASE_URL"] = f"postgres://postgres@127.0.0.1:5432/{throwaway}"
    os.environ["DJANGO_SETTINGS_MODULE"] = "cascadeflow_site.settings"
    os.environ["DJANGO_DEBUG"] = "false"
    os.environ["CELERY_BROKER_URL"] = "memory://"
    os.environ.setdefault("DJANGO_SECRET_KEY", secrets.token_urlsafe(50))
    os.environ.pop("REDIS_URL", None)
    try:
        return _service_refresh(spend, origin)
    finally:
        from django.db import connections

        connections.close_all()
        with psycopg.connect(PG_ADMIN, autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{throwaway}" WITH (FORCE)')


def _service_refresh(spend: np.ndarray, origin: int) -> dict:
    import django

    django.setup()
    from django.core.management import call_command

    from dashboard import services
    from dashboard.models import DailyUsage, RollupState
    from tenants.services import tenant_create

    call_command("migrate", verbosity=0)
    tenant = tenant_create(slug=f"bench-forecast-{secrets.token_hex(3)}").tenant
    today = START + timedelta(days=origin)
    first = origin - services.HISTORY_DAYS
    window = spend[:, first:origin].copy()
    # Every end user active (the refresh forecasts those with spend in the last
    # END_USER_ACTIVE_DAYS): one nano-dollar yesterday for the few without.
    idle = ~window[:, -services.END_USER_ACTIVE_DAYS :].any(axis=1)
    window[idle, -1] = 1
    users, days = np.nonzero(window)
    DailyUsage.objects.bulk_create(
        (
            DailyUsage(
                tenant=tenant,
                day=START + timedelta(days=first + int(d)),
                end_user_id=int(u) + 1,
                model="demo/small",
                requests=1,
                cost_nanos=int(window[u, d]),
                baseline_cost_nanos=int(window[u, d]),
            )
            for u, d in zip(users.tolist(), days.tolist(), strict=True)
        ),
        batch_size=5000,
    )
    now = datetime.combine(today, datetime.min.time(), tzinfo=UTC)
    RollupState.objects.create(tenant=tenant, hourly_until=now, daily_until=today)

    batched = services.forecast_spend_batch
    inner: list[float] = []

    def timed_batch(**kwargs):
        started = time.perf_counter()
        try:
            return batched(**kwargs)
        finally:
            inner.append(time.perf_counter() - started)

    # Twice: the first refresh writes into an empty table, the second replaces its
    # snapshots, as every refresh after the first does (beat runs it every 15 minutes).
    runs = []
    services.forecast_spend_batch = timed_batch
    try:
        for _ in range(2):
            inner.clear()
            wall, cpu = time.perf_counter(), time.process_time()
            count = services.forecasts_refresh(tenant, now)
            wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
            runs.append({"wall_s": wall, "cpu_s": cpu, "forecast_s": sum(inner)})
    finally:
        services.forecast_spend_batch = batched
    return {
        "end_users": count - 1,
        "daily_rows": int(users.size),
        "first": runs[0],
        "next": runs[1],
        "database": "PostgreSQL",
    }


def end_users_main(args: argparse.Namespace) -> None:
    """--end-users N: the existing end-user backtest (a2), auto against the batched model;
    then N synthetic end users: accuracy, and the time of one refresh before and now."""
    started = time.time()
    level = f"{args.level:.0%}"
    end_user = [synthetic_end_user(s) for s in range(1, args.seeds + 1)]
    a2 = [
        {
            "series": f"(a2) synthetic end user x{args.seeds}, Feb-Apr",
            "method": method,
            **backtest(
                end_user, START, month_origins(START, FLEET_DAYS, 31, 119), method, args.level
            ).row(),
        }
        for method in ("auto", "ets_batch", "ets_batch, alpha >= 0.05")
    ]
    kinds, spend = fleet(args.end_users, seed=args.fleet_seed)
    sample = np.sort(
        np.random.default_rng(args.fleet_seed + 1).choice(
            args.end_users, size=min(args.sample, args.end_users), replace=False
        )
    )
    history_days = 56  # dashboard.services.HISTORY_DAYS (checked against it below)
    rows, times = fleet_backtest(kinds, spend, sample, history_days, args.level)
    service = "skipped (--skip-service)"
    if not args.skip_service:
        service = service_refresh(spend, TIMED_ORIGIN)
        from dashboard.services import HISTORY_DAYS

        assert HISTORY_DAYS == history_days, "bench/forecast.py: update history_days"

    print(f"\nbench/forecast.py --end-users {args.end_users}: {level} intervals\n")
    print("The existing end-user backtest (a2): forecast_spend (auto) and the batched model.\n")
    print_backtest(a2, level)
    counts = {k: int((kinds == k).sum()) for k in SEGMENTS}
    print(
        f"\n{args.end_users:,} synthetic end users (seed {args.fleet_seed}: "
        + ", ".join(f"{counts[k]:,} {k}" for k in SEGMENTS)
        + f"), {history_days} days of history, period April 2026, origins April 1st, "
        "11th and 21st. Per segment: rest MAPE / WAPE (sum of |error| over sum of the "
        f"forecast part) / total cover ({level}).\n"
    )
    print("| method | forecasts | heavy | medium | sparse | all: WAPE / cover |")
    print("|---|---:|---:|---:|---:|---:|")
    for r in rows:
        cells = [
            f"{pct(r[k]['rest_mape'])} / {pct(r[k]['wape'])} / {pct(r[k]['total_coverage'])}"
            for k in SEGMENTS
        ]
        print(
            f"| {r['method']} | {r['all']['forecasts']:,} | {' | '.join(cells)} "
            f"| {pct(r['all']['wape'])} / {pct(r['all']['total_coverage'])} |"
        )

    per_user, batched = times["per_user"], times["batched"]
    per_call = per_user["wall_s"] / per_user["calls"]
    before = per_call * args.end_users
    before_cpu = per_user["cpu_s"] / per_user["calls"] * args.end_users
    print(
        f"\nOne refresh of {args.end_users:,} end users (April 11th, 20 days to forecast). "
        f"Before: {per_user['calls']} sequential forecast_spend calls timed, "
        f"{1000 * per_call:.1f} ms each, extrapolated to {args.end_users:,}.\n"
    )
    print("| | before (per end user) | now (batched) | ratio |")
    print("|---|---:|---:|---:|")
    print(
        f"| forecasts, wall | {before:.1f} s (extrapolated) | {batched['wall_s']:.1f} s "
        f"| {before / batched['wall_s']:.0f}x |"
    )
    print(
        f"| forecasts, CPU | {before_cpu:.1f} s (extrapolated) | {batched['cpu_s']:.1f} s "
        f"| {before_cpu / batched['cpu_s']:.0f}x |"
    )
    print(
        f"| no ETS at all (ets_series=0), wall | | {times['no_ets']['wall_s']:.1f} s "
        f"| {before / times['no_ets']['wall_s']:.0f}x |"
    )
    if isinstance(service, dict):
        for key, label in (("first", "first"), ("next", "next (replacing the first's)")):
            run = service[key]
            rest = run["wall_s"] - run["forecast_s"]
            print(
                f"| whole refresh, {label} (forecasts_refresh, {service['database']}), wall "
                f"| {before + rest:.1f} s (estimated: forecasts extrapolated + the same "
                f"{rest:.1f} s of reads and writes) | {run['wall_s']:.1f} s "
                f"| {(before + rest) / run['wall_s']:.0f}x |"
            )
        print(
            f"\nWhole refresh: {service['end_users']:,} end users from "
            f"{service['daily_rows']:,} DailyUsage rows. "
            + "; ".join(
                f"{key}: {service[key]['forecast_s']:.1f} s in forecast_spend_batch, "
                f"{service[key]['wall_s'] - service[key]['forecast_s']:.1f} s reading and "
                f"writing, CPU {service[key]['cpu_s']:.1f} s"
                for key in ("first", "next")
            )
            + "."
        )
    else:
        print(f"\nWhole refresh (forecasts_refresh): {service}")
    met = lambda seconds: f"{'met' if seconds <= 20.0 else 'NOT met'} ({seconds:.1f} s)"  # noqa: E731
    print(
        f"Target, {args.end_users:,} end users in <= 20 s: forecasts {met(batched['wall_s'])}",
        end="",
    )
    if isinstance(service, dict):
        print(
            f", whole refresh {met(service['first']['wall_s'])} first, "
            f"{met(service['next']['wall_s'])} next",
            end="",
        )
    print(".")
    print(f"Methods used by the batch: {times['methods']}")
    wall = round(time.time() - started, 1)
    print(
        f"load average {os.getloadavg()[0]:.2f} on {os.cpu_count()} CPUs, OPENBLAS_NUM_THREADS "
        f"{os.environ.get('OPENBLAS_NUM_THREADS', 'unset')}; wall time {wall} s"
    )
    write_json(
        args.json_out,
        {
            "end_users": args.end_users,
            "fleet_seed": args.fleet_seed,
            "segments": counts,
            "a2": a2,
            "accuracy": rows,
            "times": times,
            "service": service,
            "wall_time_s": wall,
        },
    )


def write_json(path: str | None, data: dict) -> None:
    if path:
        Path(path).write_text(json.dumps(data, indent=2, default=str) + "\n")


def print_backtest(results: list[dict], level: str) -> None:
    print(
        f"| series | method | origins | total MAPE | rest MAPE | daily MAPE "
        f"| total cover ({level}) | daily cover ({level}) |"
    )
    print("|---|---|---:|---:|---:|---:|---:|---:|")
    for r in results:
        print(
            f"| {r['series']} | {r['method']} | {r['origins']} | {pct(r['total_mape'])} "
            f"| {pct(r['rest_mape'])} | {pct(r['daily_mape'])} "
            f"| {pct(r['total_coverage'])} | {pct(r['daily_coverage'])} |"
        )


def pct(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.1f} %"


# --- main ------------------------------------------------------------------------


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--seeds", type=int, default=5, help="synthetic series per kind")
    parser.add_argument("--level", type=float, default=0.8, help="interval coverage")
    parser.add_argument("--database-url", help="for the demo history (default: the settings')")
    parser.add_argument("--skip-demo", action="store_true")
    parser.add_argument(
        "--sweep",
        action="store_true",
        help="also run auto with other floors on the level smoothing (free, 0.02, 0.1)",
    )
    parser.add_argument("--json", dest="json_out")
    parser.add_argument(
        "--end-users",
        type=int,
        metavar="N",
        help="instead: the batched forecasts of N synthetic end users against one by one",
    )
    parser.add_argument(
        "--sample", type=int, default=200, help="end users forecast one by one (--end-users)"
    )
    parser.add_argument("--fleet-seed", type=int, default=7, help="of the --end-users series")
    parser.add_argument(
        "--skip-service",
        action="store_true",
        help="--end-users without timing forecasts_refresh in a throwaway PostgreSQL database",
    )
    args = parser.parse_args()
    if args.end_users:
        end_users_main(args)
        return
    methods = list(METHODS)
    if args.sweep:
        methods[1:1] = ["auto, alpha free", "auto, alpha >= 0.02", "auto, alpha >= 0.1"]
    started = time.time()

    suites: list[tuple[str, Callable[[str], Score]]] = []
    seeds = range(1, args.seeds + 1)
    seasonal = {s: synthetic_seasonal(s) for s in seeds}
    end_user = {s: synthetic_end_user(s) for s in seeds}

    def over(series_by_seed: dict[int, list[int]], lo: int, hi: int) -> Callable[[str], Score]:
        def run(method: str) -> Score:
            series = list(series_by_seed.values())
            origins = month_origins(START, len(series[0]), lo, hi)
            return backtest(series, START, origins, method, args.level)

        return run

    suites.append((f"(a) synthetic seasonal x{args.seeds}, Feb-Apr", over(seasonal, 31, 119)))
    suites.append((f"(a) synthetic seasonal x{args.seeds}, Jan (new)", over(seasonal, 2, 30)))
    suites.append((f"(a2) synthetic end user x{args.seeds}, Feb-Apr", over(end_user, 31, 119)))

    demo_note = "skipped (--skip-demo)"
    if not args.skip_demo:
        demo = demo_series(args.database_url)
        if isinstance(demo, str):
            demo_note = f"skipped: {demo}"
            print(
                f"\n(b) demo history {demo_note}.\n"
                "    Run `.venv/bin/python manage.py seed_demo` first (it writes the demo "
                "tenant's usage history; on a new database run `manage.py migrate` before "
                "it), then rerun this script.\n",
                file=sys.stderr,
            )
        else:
            y, first = demo
            months = month_origins(first, len(y), 14, len(y))
            monthly = len({(first + timedelta(days=o.index)).month for o in months}) >= 2
            origins = months if monthly else week_origins(len(y), 14)
            kind = "month" if monthly else "next 7 days"
            demo_note = f"{len(y)} days from {first}, periods: {kind}, {len(origins)} origins"
            suites.append(
                (
                    f"(b) demo tenant, {len(y)} days ({kind})",
                    lambda m, y=y, f=first, o=origins: backtest([y], f, o, m, args.level),
                )
            )

    results = []
    for name, run in suites:
        for method in methods:
            row = {"series": name, "method": method, **run(method).row()}
            results.append(row)
            print(".", end="", file=sys.stderr, flush=True)
    print(file=sys.stderr)
    speed = timing(args.seeds)

    level = f"{args.level:.0%}"
    print(f"\nbench/forecast.py: rolling-origin backtest, {level} intervals; demo: {demo_note}\n")
    print_backtest(results, level)
    print(
        f"\nforecast_spend(method='auto'), 90 days of history, 30 days to forecast: "
        f"p50 {speed['p50_ms']} ms, p95 {speed['p95_ms']} ms, max {speed['max_ms']} ms "
        f"(CPU p50 {speed['cpu_p50_ms']} ms) over {speed['calls']} calls; "
        f"load average {speed['load_average_1m']} on {speed['cpus']} CPUs, "
        f"OPENBLAS_NUM_THREADS {speed['OPENBLAS_NUM_THREADS']}"
    )
    wall = round(time.time() - started, 1)
    print(f"wall time {wall} s")
    write_json(
        args.json_out,
        {
            "level": args.level,
            "seeds": args.seeds,
            "demo": demo_note,
            "results": results,
            "per_call": speed,
            "wall_time_s": wall,
        },
    )


if __name__ == "__main__":
    main()
