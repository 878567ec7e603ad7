"""Backtest of the spend forecasts (dashboard/forecasting.py): accuracy, interval coverage, speed.

    .venv/bin/python bench/forecast.py [--seeds 5] [--level 0.8] [--json OUT]
                                       [--database-url URL] [--skip-demo]

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
import statistics
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import date, timedelta
from pathlib import Path

import numpy as np

os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")
ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from dashboard import forecasting  # noqa: E402
from dashboard.forecasting import forecast_spend  # noqa: E402

USD = 10**9
START = date(2026, 1, 1)
METHODS = ("auto", "ETS, plain", "ETS(A,Ad,A), plain", "seasonal_naive", "run_rate")


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
    series: list[int], first: date, origins: list[Origin], method: str, level: float
) -> Score:
    score = Score()
    for o in origins:
        actual_days = series[o.index : o.end + 1]
        spent = sum(series[max(o.start, 0) : o.index])
        actual_total = spent + sum(actual_days)
        today = first + timedelta(days=o.index)
        f = run_method(
            method,
            history=series[: o.index],
            today=today,
            period_end=first + timedelta(days=o.end),
            spent_nanos=spent,
            level=level,
        )
        score.methods[f.method] = score.methods.get(f.method, 0) + 1
        if actual_total > 0:
            score.total_ape.append(abs(f.expected_nanos - actual_total) / actual_total)
            score.total_in.append(f.low_nanos <= actual_total <= f.high_nanos)
        rest = actual_total - spent
        if rest > 0:
            score.rest_ape.append(abs(f.expected_nanos - actual_total) / rest)
        for d, actual in zip(f.days, actual_days, strict=True):
            if actual > 0:
                score.daily_ape.append(abs(d.mean_nanos - actual) / actual)
            score.daily_in.append(d.low_nanos <= actual <= d.high_nanos)
    return score


def merge(scores: list[Score]) -> Score:
    out = Score()
    for s in scores:
        for name in ("total_ape", "rest_ape", "daily_ape", "total_in", "daily_in"):
            getattr(out, name).extend(getattr(s, name))
        for k, v in s.methods.items():
            out.methods[k] = out.methods.get(k, 0) + v
    return out


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
    args = parser.parse_args()
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
            return merge(
                [
                    backtest(y, START, month_origins(START, len(y), lo, hi), method, args.level)
                    for y in series_by_seed.values()
                ]
            )

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
                    lambda m, y=y, f=first, o=origins: backtest(y, f, o, m, args.level),
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
    print(
        f"| series | method | origins | total MAPE | rest MAPE | daily MAPE "
        f"| total cover ({level}) | daily cover ({level}) |"
    )
    print("|---|---|---:|---:|---:|---:|---:|---:|")
    cell = lambda v: "n/a" if v is None else f"{v:.1f} %"  # noqa: E731
    for r in results:
        print(
            f"| {r['series']} | {r['method']} | {r['origins']} | {cell(r['total_mape'])} "
            f"| {cell(r['rest_mape'])} | {cell(r['daily_mape'])} "
            f"| {cell(r['total_coverage'])} | {cell(r['daily_coverage'])} |"
        )
    print(
        f"\nforecast_spend(method='auto'), 90 days of history, 30 days to forecast: "
        f"p50 {speed['p50_ms']} ms, p95 {speed['p95_ms']} ms, max {speed['max_ms']} ms "
        f"(CPU p50 {speed['cpu_p50_ms']} ms) over {speed['calls']} calls; "
        f"load average {speed['load_average_1m']} on {speed['cpus']} CPUs, "
        f"OPENBLAS_NUM_THREADS {speed['OPENBLAS_NUM_THREADS']}"
    )
    wall = round(time.time() - started, 1)
    print(f"wall time {wall} s")
    if args.json_out:
        Path(args.json_out).write_text(
            json.dumps(
                {
                    "level": args.level,
                    "seeds": args.seeds,
                    "demo": demo_note,
                    "results": results,
                    "per_call": speed,
                    "wall_time_s": wall,
                },
                indent=2,
            )
            + "\n"
        )


if __name__ == "__main__":
    main()
