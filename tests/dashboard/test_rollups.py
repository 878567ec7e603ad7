import importlib
from datetime import UTC, date, datetime, timedelta
from unittest.mock import patch
from zoneinfo import ZoneInfo

import pytest
from django.db import DatabaseError, connection
from django.db.models import Sum

from dashboard.models import DailyUsage, HourlyTotal, HourlyUsage, MinuteUsage, RollupState
from dashboard.rollups import (
    BY_HOUR_UP_TO,
    MINUTES_KEPT,
    hourly_rows,
    rollup_all,
    rollup_minutes,
    rollup_minutes_recent,
    rollup_rebuild,
    rollup_tenant,
)
from dashboard.selectors import end_user_lines, hourly_points, minute_points
from routing import services
from routing.enforcement import Settlement
from routing.models import LateLedgerHour, UsageEvent, late_hour
from routing.services import LedgerEntry, ledger_write, usage_event_values
from tests.factories import EndUserFactory, UsageEventFactory
from tests.support.services import skip_or_fail

pytestmark = pytest.mark.django_db

NOW = datetime(2026, 11, 20, 15, 30, tzinfo=UTC)
_seq = iter(range(10**9))


def event(tenant, at, cost=1_000, **kw):
    defaults = dict(
        requested_model="cascade/balanced",
        model="demo/small",
        models_called=["demo/small"],
        status="ok",
        cost_nanos=cost,
        baseline_cost_nanos=cost * 10,
        profile="balanced",
        domain="general",
        latency_ms=120,
    )
    defaults.update(kw)
    return UsageEventFactory(tenant=tenant, request_id=f"r{next(_seq)}", created_at=at, **defaults)


def ledger_total(tenant, before):
    return UsageEvent.objects.filter(tenant=tenant, created_at__lt=before).aggregate(
        s=Sum("cost_nanos")
    )["s"]


def test_rollup_matches_the_ledger_and_is_idempotent(tenant, other_tenant):
    for h in range(30):
        at = NOW - timedelta(hours=h, minutes=7)
        event(tenant, at, cost=1_000 + h)
        event(
            tenant,
            at,
            cost=5_000,
            model="demo/large",
            escalated=True,
            models_called=["demo/small", "demo/large"],
            domain="code",
            latency_ms=2_400,
        )
        event(other_tenant, at, cost=7)

    first = rollup_tenant(tenant, NOW)
    rows = list(HourlyUsage.objects.filter(tenant=tenant).order_by("pk").values())
    again = rollup_tenant(tenant, NOW)

    assert first.hourly_rows > 0 and again.hourly_rows == 0  # nothing new closed: no-op
    closed = NOW.replace(minute=0)  # 15:00, more than the late margin ago
    stored = HourlyUsage.objects.filter(tenant=tenant).aggregate(s=Sum("cost_nanos"))["s"]
    assert stored == ledger_total(tenant, closed)
    assert not HourlyUsage.objects.filter(tenant=tenant, hour__gte=closed).exists()
    escalated = HourlyUsage.objects.get(
        tenant=tenant, hour=closed - timedelta(hours=1), model="demo/large"
    )
    assert (escalated.draft_model, escalated.domain, escalated.escalated) == (
        "demo/small",
        "code",
        1,
    )
    assert sum(escalated.latency_hist) == 1 and escalated.latency_hist[9] == 1  # 2-3 s bucket
    assert list(HourlyUsage.objects.filter(tenant=tenant).order_by("pk").values()) == rows
    assert not HourlyUsage.objects.filter(tenant=other_tenant).exclude(cost_nanos=7).exists()


def written(tenant, at, *, when=None, cost=1_000):
    """A ledger row of a request started at ``at``, written through ``ledger_write`` at
    the wall-clock time ``when`` (the gateway's path, and the spool's replay; None: the
    real clock, with nothing patched, as a concurrent writer needs)."""
    entry = LedgerEntry(
        tenant_id=tenant.pk,
        token_id=None,
        end_user_id=None,
        request_id=f"w{next(_seq)}",
        created_at=at,
        requested_model="cascade/balanced",
        model="demo/small",
        paid_cost_nanos=cost,
        baseline_cost_nanos=cost * 10,
        profile="balanced",
        domain="general",
    )
    if when is None:
        ledger_write(values=usage_event_values(entry), settlement=Settlement(tenant.pk))
        return
    with patch("routing.services.timezone.now", return_value=when):
        ledger_write(values=usage_event_values(entry), settlement=Settlement(tenant.pk))


@pytest.mark.parametrize(
    "started, written_at, marked",
    [
        ("14:59:59", "15:03:59", None),  # within the margin (and its slack): in time
        ("14:59:59", "15:04:00", "14:00"),  # a rollup may run within a minute: marked
        ("14:10:00", "15:30:00", "14:00"),  # a request of 80 minutes
        ("15:00:00", "15:30:00", None),  # the open hour
        ("09:00:00", "15:30:00", "09:00"),  # a spooled row, replayed hours later
        ("15:40:00", "15:30:00", None),  # a clock ahead of this one: never a closed hour
    ],
)
def test_late_hour_marks_only_rows_whose_hour_a_rollup_may_have_closed(started, written_at, marked):
    day = NOW.date().isoformat()
    at = datetime.fromisoformat(f"{day}T{started}+00:00")
    now = datetime.fromisoformat(f"{day}T{written_at}+00:00").astimezone(ZoneInfo("Asia/Kolkata"))
    expected = None if marked is None else datetime.fromisoformat(f"{day}T{marked}:00+00:00")
    assert late_hour(at, now) == expected


def test_a_straggler_in_the_last_rolled_hour_is_counted_at_the_next_advance(tenant):
    event(tenant, NOW - timedelta(hours=3))
    rollup_tenant(tenant, NOW)
    late = NOW - timedelta(minutes=50)  # hour 14:00, already rolled
    written(tenant, late, when=NOW + timedelta(minutes=1), cost=777)

    result = rollup_tenant(tenant, NOW + timedelta(hours=1))

    hour = HourlyUsage.objects.get(tenant=tenant, hour=late.replace(minute=0, second=0))
    assert hour.cost_nanos == 777
    assert result.hours == 2  # 15:00, closed now, and 14:00, marked
    assert not LateLedgerHour.objects.filter(tenant=tenant).exists()
    assert rollup_tenant(tenant, NOW + timedelta(hours=1)).hours == 0  # the mark is spent


def test_an_advance_reads_only_the_hours_it_closes_when_nothing_is_late(tenant):
    for h in range(6):
        event(tenant, NOW - timedelta(hours=h, minutes=10))
    rollup_tenant(tenant, NOW)
    written(tenant, NOW + timedelta(minutes=20), when=NOW + timedelta(minutes=25))

    result = rollup_tenant(tenant, NOW + timedelta(hours=1))

    assert (result.hours, result.days) == (1, 0)  # 15:00 only: 14:00 is not read again
    assert not LateLedgerHour.objects.exists()


@pytest.mark.parametrize("time_zone", ["UTC", "Asia/Kolkata", "America/St_Johns"])
def test_rows_replayed_a_day_late_reach_their_hours_and_local_days(tenant, time_zone):
    tenant.time_zone = time_zone
    tenant.save(update_fields=["time_zone"])
    start = NOW - timedelta(days=3)
    for h in range(0, 72, 5):
        event(tenant, start + timedelta(hours=h, minutes=31), cost=1_000 + h)
    rollup_tenant(tenant, NOW)
    # An outage: rows spooled two days ago, replayed now, one in every hour of a day.
    outage = (NOW - timedelta(days=2)).replace(minute=45)
    for h in range(24):
        written(tenant, outage + timedelta(hours=h), when=NOW + timedelta(minutes=2), cost=5)

    rollup_tenant(tenant, NOW + timedelta(minutes=30))

    def stored():
        hourly = HourlyUsage.objects.filter(tenant=tenant).values_list("hour")
        daily = DailyUsage.objects.filter(tenant=tenant).values_list("day")
        return (
            dict(hourly.annotate(Sum("cost_nanos"))),
            dict(daily.annotate(Sum("cost_nanos"))),
        )

    tz = ZoneInfo(time_zone)
    closed = NOW.replace(minute=0)
    expected: tuple[dict, dict] = ({}, {})
    for e in UsageEvent.objects.filter(tenant=tenant, created_at__lt=closed):
        hour = e.created_at.replace(minute=0, second=0, microsecond=0)
        expected[0][hour] = expected[0].get(hour, 0) + e.cost_nanos
        day = e.created_at.astimezone(tz).date()
        if day < closed.astimezone(tz).date():
            expected[1][day] = expected[1].get(day, 0) + e.cost_nanos
    assert stored() == expected
    assert sum(expected[1].values()) >= sum(1_000 + h for h in range(0, 48, 5)) + 24 * 5
    rollup_rebuild(tenant, NOW + timedelta(minutes=30))  # from scratch: the same
    assert stored() == expected


def test_a_late_row_in_an_hour_across_local_midnight_reaches_its_own_day(tenant):
    """Asia/Kolkata is UTC+5:30: the UTC hour 18:00 is 23:30-00:30 there, two local days."""
    tenant.time_zone = "Asia/Kolkata"
    tenant.save(update_fields=["time_zone"])
    event(tenant, NOW - timedelta(days=3))
    rollup_tenant(tenant, NOW)
    at = (NOW - timedelta(days=2)).replace(hour=18, minute=45)  # 00:15 local, the later day
    written(tenant, at, when=NOW, cost=4_321)

    rollup_tenant(tenant, NOW + timedelta(minutes=10))

    day = at.astimezone(ZoneInfo("Asia/Kolkata")).date()
    assert day == (at + timedelta(days=1)).date()
    assert DailyUsage.objects.get(tenant=tenant, day=day).cost_nanos == 4_321


def test_a_late_row_and_its_mark_are_written_together_or_not_at_all(tenant):
    real = services.insert_row

    def failing(model, values, *args, **kwargs):
        if model is LateLedgerHour:
            raise DatabaseError("the mark could not be written")
        return real(model, values, *args, **kwargs)

    with patch("routing.services.insert_row", side_effect=failing), pytest.raises(DatabaseError):
        written(tenant, NOW - timedelta(hours=2), when=NOW)
    assert not UsageEvent.objects.filter(tenant=tenant).exists()


def test_pages_merge_rollups_with_the_open_tail(tenant):
    for m in range(0, 300, 20):
        event(tenant, NOW - timedelta(minutes=m), cost=100 + m)
    rollup_tenant(tenant, NOW)
    assert RollupState.objects.get(tenant=tenant).hourly_until == NOW.replace(minute=0)

    points = hourly_points(tenant, NOW - timedelta(hours=6), NOW)

    assert sum(p.usage.cost_nanos for p in points) == ledger_total(tenant, NOW + timedelta(1))
    assert sum(p.usage.requests for p in points) == 15
    assert points[-1].at == NOW.replace(minute=0) and points[-1].usage.requests == 2


def test_daily_rows_use_the_tenants_time_zone(tenant):
    tenant.time_zone = "America/New_York"
    tenant.save()
    user = EndUserFactory(tenant=tenant)
    event(tenant, datetime(2026, 11, 18, 3, 0, tzinfo=UTC), cost=10, end_user=user)  # 17th local
    event(tenant, datetime(2026, 11, 18, 6, 0, tzinfo=UTC), cost=20, end_user=user)  # 18th local

    rollup_tenant(tenant, NOW)

    days = dict(DailyUsage.objects.filter(tenant=tenant).values_list("day", "cost_nanos"))
    assert days == {date(2026, 11, 17): 10, date(2026, 11, 18): 20}


def test_end_user_lines_merge_days_and_tail(tenant):
    big, small = EndUserFactory(tenant=tenant), EndUserFactory(tenant=tenant)
    event(tenant, NOW - timedelta(days=2), cost=5_000, end_user=big)
    event(tenant, NOW - timedelta(minutes=1), cost=4_000, end_user=big)
    event(tenant, NOW - timedelta(minutes=1), cost=100, end_user=small)
    rollup_all(NOW)

    lines = end_user_lines(tenant, NOW)

    assert [(line.end_user, line.usage.cost_nanos) for line in lines] == [
        (big, 9_000),
        (small, 100),
    ]


def test_requests_per_minute(tenant):
    event(tenant, NOW + timedelta(seconds=5))
    event(tenant, NOW + timedelta(seconds=10))
    event(tenant, NOW - timedelta(minutes=5))

    points = minute_points(tenant, NOW + timedelta(seconds=20), minutes=10)

    assert len(points) == 10
    assert points[-1].usage.requests == 2 and points[-6].usage.requests == 1


def test_audits_are_not_requests_and_their_cost_comes_off_the_saving(tenant):
    at = NOW - timedelta(hours=2, minutes=10)
    event(tenant, at, cost=1_000)  # baseline 10,000: saved 9,000
    event(
        tenant,
        at,
        cost=2_500,
        baseline_cost_nanos=0,
        kind="audit",
        requested_model="",
        model="demo/large",
        latency_ms=9_000,
    )
    rollup_tenant(tenant, NOW)
    rows = list(HourlyUsage.objects.filter(tenant=tenant))
    assert sum(r.requests for r in rows) == 1
    assert sum(r.cost_nanos for r in rows) == 3_500
    assert sum(r.baseline_cost_nanos - r.cost_nanos for r in rows) == 6_500  # net of the audit
    # The audit's latency is not a request's.
    assert sum(sum(r.latency_hist) for r in rows) == 1
    assert sum(r.latency_ms_sum for r in rows) == 120
    points = hourly_points(tenant, NOW - timedelta(hours=6), NOW)
    assert sum(p.usage.requests for p in points) == 1
    assert sum(p.usage.savings_nanos for p in points) == 6_500


# --- minutes: the overview's open hour and requests per minute -----------------------------


def overview_figures(tenant, now):
    """What the overview charts from: the open hours and the last hour's minutes."""
    hours = hourly_points(tenant, now - timedelta(hours=8), now)
    minutes = minute_points(tenant, now, minutes=60)
    return (
        [(p.at, p.usage.requests, p.usage.cost_nanos, p.usage.baseline_cost_nanos,
          p.usage.escalated, p.usage.errors, p.usage.quality_n, round(p.usage.quality_sum, 6))
         for p in hours],
        [(p.at, p.usage.requests, p.usage.cost_nanos, p.usage.errors) for p in minutes],
    )  # fmt: skip


def busy_hours(tenant, other_tenant):
    """Events every 7 minutes for 7 hours, some escalated, failed or scored; another
    tenant's in the same minutes."""
    for m in range(0, 7 * 60, 7):
        at = NOW - timedelta(minutes=m, seconds=m % 50)
        event(tenant, at, cost=100 + m, escalated=m % 3 == 0, quality_score=0.5 + m % 5 / 10)
        if m % 4 == 0:
            event(tenant, at, cost=9, status="upstream_error")
        event(other_tenant, at, cost=5)


@pytest.mark.parametrize(
    ("rolled_at", "hourly_rolled"),
    [
        pytest.param(None, True, id="minutes-never-rolled"),
        pytest.param(timedelta(0), True, id="minutes-current"),
        pytest.param(timedelta(minutes=-3), True, id="minutes-3-minutes-behind"),
        pytest.param(timedelta(minutes=-50), True, id="minutes-50-minutes-behind"),
        pytest.param(timedelta(hours=-9), True, id="minutes-older-than-kept"),
        pytest.param(timedelta(0), False, id="hours-never-rolled"),
    ],
)
def test_the_overview_reads_the_same_figures_from_rolled_minutes(
    tenant, other_tenant, rolled_at, hourly_rolled
):
    busy_hours(tenant, other_tenant)
    expected = overview_figures(tenant, NOW)
    if hourly_rolled:
        rollup_tenant(tenant, NOW)
    if rolled_at is not None:
        rollup_minutes(tenant, NOW + rolled_at)
    assert overview_figures(tenant, NOW) == expected


def test_minute_rollup_keeps_its_window_and_rebuilds_the_late_margin(tenant, other_tenant):
    busy_hours(tenant, other_tenant)
    rollup_minutes(tenant, NOW)
    stored = MinuteUsage.objects.filter(tenant=tenant)
    assert min(stored.values_list("minute", flat=True)) >= NOW.replace(second=0) - MINUTES_KEPT
    assert sum(stored.values_list("requests", flat=True)) == UsageEvent.objects.filter(
        tenant=tenant, created_at__gte=NOW.replace(second=0) - MINUTES_KEPT,
        created_at__lt=NOW.replace(second=0),
    ).count()  # fmt: skip
    # A request that started 4 minutes ago ends now: the next run counts it.
    late = event(tenant, NOW - timedelta(minutes=4), cost=4_444)
    rollup_minutes(tenant, NOW + timedelta(minutes=1))
    minute = MinuteUsage.objects.get(tenant=tenant, minute=late.created_at.replace(second=0))
    assert minute.cost_nanos >= 4_444
    # An hour later the oldest hour of minutes is gone.
    rollup_minutes(tenant, NOW + timedelta(hours=1))
    assert min(stored.values_list("minute", flat=True)) >= (
        NOW.replace(second=0) + timedelta(hours=1) - MINUTES_KEPT
    )
    assert not MinuteUsage.objects.filter(tenant=other_tenant).exists()


def test_the_minute_task_rolls_only_tenants_with_recent_events(tenant, other_tenant):
    event(tenant, NOW - timedelta(minutes=2), cost=10)
    event(other_tenant, NOW - timedelta(hours=2), cost=10)
    assert rollup_minutes_recent(NOW) == 1
    assert RollupState.objects.get(tenant=tenant).minutely_until == NOW.replace(second=0)
    assert not RollupState.objects.filter(tenant=other_tenant, minutely_until__isnull=False)


def hourly_sums(tenant):
    return {
        hour.astimezone(UTC): (requests, errors, escalated, cost, baseline, quality_n)
        for hour, requests, errors, escalated, cost, baseline, quality_n in (
            HourlyUsage.objects.filter(tenant=tenant)
            .values("hour")
            .annotate(
                r=Sum("requests"),
                e=Sum("errors"),
                x=Sum("escalated"),
                c=Sum("cost_nanos"),
                b=Sum("baseline_cost_nanos"),
                q=Sum("quality_n"),
            )
            .values_list("hour", "r", "e", "x", "c", "b", "q")
        )
    }


def hourly_totals_of(tenant):
    return {
        t.hour.astimezone(UTC): (
            t.requests,
            t.errors,
            t.escalated,
            t.cost_nanos,
            t.baseline_cost_nanos,
            t.quality_n,
        )
        for t in HourlyTotal.objects.filter(tenant=tenant)
    }


def test_hourly_totals_are_the_hourly_rows_summed_through_reruns_stragglers_and_rebuilds(
    tenant, other_tenant
):
    busy_hours(tenant, other_tenant)
    rollup_tenant(tenant, NOW - timedelta(hours=3))
    rollup_tenant(tenant, NOW)  # advances over the overlap hour
    event(tenant, NOW - timedelta(hours=1, minutes=50), cost=777)  # a straggler
    rollup_tenant(tenant, NOW + timedelta(hours=1))
    assert hourly_totals_of(tenant) == hourly_sums(tenant) != {}
    assert not HourlyTotal.objects.filter(tenant=other_tenant).exists()
    rollup_rebuild(tenant, NOW + timedelta(hours=1))
    assert hourly_totals_of(tenant) == hourly_sums(tenant)


def test_the_migration_backfills_hourly_totals_from_the_hourly_rows(tenant, other_tenant):
    from django.apps import apps

    backfill = importlib.import_module("dashboard.migrations.0003_overview_totals")
    busy_hours(tenant, other_tenant)
    rollup_all(NOW)
    expected = {t.pk: hourly_totals_of(t) for t in (tenant, other_tenant)}
    HourlyTotal.objects.all().delete()
    backfill.hourly_totals_backfill(apps, None)
    assert {t.pk: hourly_totals_of(t) for t in (tenant, other_tenant)} == expected
    assert expected[tenant.pk]


def test_an_hour_at_a_time_and_a_backfill_aggregate_the_same_rows(tenant):
    """Up to BY_HOUR_UP_TO one query per hour, beyond it one query grouped by hour too:
    the rows are the same."""
    start = NOW.replace(minute=0) - timedelta(hours=40)
    for h in range(40):
        at = start + timedelta(hours=h, minutes=h)
        event(tenant, at, cost=1_000 + h, latency_ms=40 * h, quality_score=h / 40)
        event(tenant, at, cost=7, model="demo/large", domain="code", kind="audit")
        if h % 3 == 0:
            event(tenant, at, status="upstream_error", models_called=[], model="")

    def rows(chunks):
        made = [r for a, b in chunks for r in hourly_rows(tenant.pk, a, b)]
        return sorted(
            (r.hour, r.model, r.draft_model, r.domain, r.requests, r.errors, r.cost_nanos,
             r.baseline_cost_nanos, r.latency_ms_sum, r.latency_hist, r.quality_n,
             round(r.quality_sum, 9))
            for r in made
        )  # fmt: skip

    whole = rows([(start, start + timedelta(hours=40))])
    by_hour = rows(
        [(start + timedelta(hours=h), start + timedelta(hours=h + 1)) for h in range(40)]
    )
    assert timedelta(hours=40) > BY_HOUR_UP_TO
    assert whole == by_hour and len(whole) == 40 * 2 + 14


def test_the_latency_histogram_counts_each_request_in_its_bucket_at_every_edge(tenant):
    """A request of ``latency_ms`` is in bucket ``bisect_right(LATENCY_BOUNDS_MS, ms)``;
    audits and other kinds are in none, whatever their latency; errors are requests."""
    from bisect import bisect_right

    from dashboard.models import LATENCY_BOUNDS_MS

    edges = sorted(
        {0, 1, 10**9, *(b - 1 for b in LATENCY_BOUNDS_MS), *LATENCY_BOUNDS_MS}
        | {b + 1 for b in LATENCY_BOUNDS_MS}
    )
    start = NOW.replace(minute=0) - timedelta(hours=30)
    expected: dict[tuple, list[int]] = {}
    for i, ms in enumerate(edges):
        at = start + timedelta(hours=i % 30, minutes=i % 60)
        domain = ("general", "code")[i % 2]
        status = "upstream_error" if i % 7 == 0 else "ok"
        event(tenant, at, latency_ms=ms, domain=domain, status=status)
        event(tenant, at, latency_ms=ms, domain=domain, kind="audit", model="demo/large")
        hist = expected.setdefault(
            (at.replace(minute=0), domain), [0] * (len(LATENCY_BOUNDS_MS) + 1)
        )
        hist[bisect_right(LATENCY_BOUNDS_MS, ms)] += 1

    def hists(chunks):
        got: dict[tuple, list[int]] = {}
        for a, b in chunks:
            for r in hourly_rows(tenant.pk, a, b):
                hist = got.setdefault((r.hour, r.domain), [0] * (len(LATENCY_BOUNDS_MS) + 1))
                got[(r.hour, r.domain)] = [x + y for x, y in zip(hist, r.latency_hist, strict=True)]
        return got

    whole = hists([(start, start + timedelta(hours=30))])
    by_hour = hists(
        [(start + timedelta(hours=h), start + timedelta(hours=h + 1)) for h in range(30)]
    )
    assert timedelta(hours=30) > BY_HOUR_UP_TO
    assert whole == by_hour == expected
    assert sum(map(sum, expected.values())) == len(edges)


@pytest.mark.django_db(transaction=True)
def test_a_late_row_written_while_a_rollup_rebuilds_its_hour_is_rolled_by_the_next(tenant):
    """The rollup has taken (deleted, not yet committed) the mark of 13:00 and is reading
    the ledger when another late row of 13:00 is written: that row's mark waits on the
    rollup's delete, so the row is not lost between the two runs."""
    if connection.vendor != "postgresql":
        skip_or_fail("row locks of concurrent writers need PostgreSQL")
    import threading
    import time

    from dashboard import rollups

    event(tenant, NOW - timedelta(hours=3))
    rollup_tenant(tenant, NOW)
    late = NOW.replace(hour=13, minute=20)
    written(tenant, late, when=NOW, cost=100)  # marks 13:00
    reading, resumed = threading.Event(), threading.Event()
    finished: dict[str, float] = {}
    real_rows = rollups.hourly_rows

    def rows_after_the_second_write(tenant_id, start, end):
        reading.set()
        resumed.wait(10)
        return real_rows(tenant_id, start, end)

    def roll():
        try:
            with patch("dashboard.rollups.hourly_rows", side_effect=rows_after_the_second_write):
                rollup_tenant(tenant, NOW + timedelta(minutes=10))
            finished["rollup"] = time.monotonic()
        finally:
            connection.close()

    def write():
        try:
            reading.wait(10)
            written(tenant, late, cost=20)
            finished["write"] = time.monotonic()
        finally:
            connection.close()

    threads = [threading.Thread(target=roll), threading.Thread(target=write)]
    for t in threads:
        t.start()
    assert reading.wait(10)
    time.sleep(1.0)  # the writer is now blocked on the mark the rollup deleted
    assert "write" not in finished
    resumed.set()
    for t in threads:
        t.join(20)
    assert finished["rollup"] <= finished["write"]

    hour = NOW.replace(hour=13, minute=0)

    def rolled() -> int:
        return HourlyUsage.objects.filter(tenant=tenant, hour=hour).aggregate(s=Sum("cost_nanos"))[
            "s"
        ]

    assert rolled() == 100  # the second row was not committed when the hour was read
    assert LateLedgerHour.objects.filter(tenant=tenant, hour=hour).exists()  # but it is marked
    rollup_tenant(tenant, NOW + timedelta(minutes=15))
    assert rolled() == 120
    assert not LateLedgerHour.objects.exists()
