"""Roll the ledger up into HourlyUsage and DailyUsage, idempotently.

A bucket is rebuilt whole from the ledger (delete + insert in one transaction),
never incremented, so a rerun, an overlap or a crash halfway leaves correct rows.
An hour is rolled once it is over and ``LATE_MARGIN`` has passed: the ledger row is
written when a request ends but carries the time it started, so a long request can
land in an hour that has just closed. A row later than that (a longer request, a
spooled row replayed after an outage) marks its hour (``routing.models.LateLedgerHour``,
written with the row), and the next advance rebuilds that hour and its local day: an
advance reads only the hours it closes and the hours marked, never an hour again
"in case".

The same aggregation serves pages: :func:`hourly_rows` over the open tail (after
the rollup watermark) gives unsaved rows that merge with the stored ones.

Minutes (``MinuteUsage``, no dimension) are rolled every minute for the tenants with
recent events, the last ``LATE_MARGIN`` rebuilt each time, and kept ``MINUTES_KEPT``:
the overview reads its open hour and its requests per minute from them, and raw
events only after ``minutely_until``. A straggler older than the margin reaches the
minutes no more, but still reaches its hour, which is rebuilt from the ledger.
"""

import logging
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, date, datetime, timedelta
from itertools import pairwise
from zoneinfo import ZoneInfo

from django.db import connection, transaction
from django.db.models import CharField, Count, F, Func, IntegerField, Min, Q, Sum, Value
from django.db.models.fields.json import KT
from django.db.models.functions import Coalesce, TruncDate, TruncHour, TruncMinute
from django.utils import timezone

from dashboard.models import (
    LATENCY_BOUNDS_MS,
    DailyUsage,
    HourlyTotal,
    HourlyUsage,
    MinuteUsage,
    RollupState,
)
from routing.enums import UsageKind
from routing.models import ROLLUP_LATE_MARGIN, LateLedgerHour, UsageEvent
from routing.selectors import usage_totals
from tenants.models import Tenant

logger = logging.getLogger(__name__)

LATE_MARGIN = ROLLUP_LATE_MARGIN
HOUR = timedelta(hours=1)
BY_HOUR_UP_TO = timedelta(hours=24)  # longer ranges are aggregated in one query
MINUTES_KEPT = timedelta(hours=6)
_BUCKETS = tuple(pairwise((0, *LATENCY_BOUNDS_MS, None)))


def hour_floor(moment: datetime) -> datetime:
    return moment.astimezone(UTC).replace(minute=0, second=0, microsecond=0)


def minute_floor(moment: datetime) -> datetime:
    return moment.astimezone(UTC).replace(second=0, microsecond=0)


def usage_sums() -> dict:
    """``routing.selectors.usage_totals`` named as the Usage / rollup fields they fill: cost
    is spend (audits included), so the saving a rollup gives is net of what audits cost."""
    totals = usage_totals()
    return {
        "requests": totals["requests"],
        "errors": totals["errors"],
        "escalated": totals["escalated"],
        "cost_nanos": totals["spend_nanos"],
        "baseline_cost_nanos": totals["baseline_cost_nanos"],
    }


class _LatencyBucket(Func):
    """The latency bucket of a request's row (``LATENCY_BOUNDS_MS``: 0 below the first
    bound, ``len(bounds)`` from the last), NULL for any other row.

    The histogram is a grouping key, folded into ``latency_hist`` per group afterwards:
    one bucket per row, where a filtered count per bucket tested every row 18 times."""

    output_field = IntegerField()

    def __init__(self) -> None:
        super().__init__(F("kind"), F("latency_ms"))

    def as_sql(self, compiler, connection, **extra_context):
        kind, kind_params = compiler.compile(self.source_expressions[0])
        latency, latency_params = compiler.compile(self.source_expressions[1])
        if connection.vendor == "postgresql":
            bounds = ",".join(map(str, LATENCY_BOUNDS_MS))
            bucket = f"width_bucket({latency}, ARRAY[{bounds}]::integer[])"
            bucket_params = list(latency_params)
        else:
            whens = [f"WHEN {latency} < {hi} THEN {i}" for i, (_, hi) in enumerate(_BUCKETS) if hi]
            bucket = f"CASE {' '.join(whens)} ELSE {len(_BUCKETS) - 1} END"
            bucket_params = list(latency_params) * len(whens)
        sql = f"CASE WHEN {kind} = %s THEN {bucket} END"
        return sql, [*kind_params, UsageKind.REQUEST.value, *bucket_params]


def hourly_rows(tenant_id: int, start: datetime, end: datetime) -> list[HourlyUsage]:
    """Unsaved HourlyUsage rows for the ledger events in [start, end).

    A few hours (the beat's advance, a page's open tail) are aggregated one query per
    hour, grouped by the dimensions alone: grouped by the hour as well, PostgreSQL
    expects about one group per row (it cannot tell how many hours a range of timestamps
    holds) and sorts a busy hour's rows on disk instead of hashing them into the few
    dozen groups there are (about twice as slow on an hour of 416 667 rows; see
    docs/benchmarks.md). A longer range (a backfill) is one query grouped by the hour
    too, where one sort is cheaper than thousands of queries.
    """
    if end - start > BY_HOUR_UP_TO:
        return list(_grouped_rows(tenant_id, start, end, hour=None))
    rows = []
    hour = hour_floor(start)
    while hour < end:
        rows.extend(_grouped_rows(tenant_id, max(start, hour), min(end, hour + HOUR), hour=hour))
        hour += HOUR
    return rows


def _grouped_rows(
    tenant_id: int, start: datetime, end: datetime, *, hour: datetime | None
) -> Iterator[HourlyUsage]:
    """The rows of [start, end): of ``hour`` when given, else grouped by hour as well."""
    events = UsageEvent.objects.filter(
        tenant_id=tenant_id, created_at__gte=start, created_at__lt=end
    ).annotate(draft=Coalesce(KT("models_called__0"), Value(""), output_field=CharField()))
    keys = ["model", "draft", "profile", "domain"]
    if hour is None:
        events = events.annotate(hour_bucket=TruncHour("created_at", tzinfo=UTC))
        keys.append("hour_bucket")
    groups = (
        events.annotate(latency_bucket=_LatencyBucket())
        .order_by()
        .values(*keys, "latency_bucket")
        .annotate(
            **usage_sums(),
            prompt_tokens_sum=Coalesce(Sum("prompt_tokens"), 0),
            completion_tokens_sum=Coalesce(Sum("completion_tokens"), 0),
            latency_ms_sum=Coalesce(Sum("latency_ms", filter=Q(kind=UsageKind.REQUEST)), 0),
            quality_sum=Coalesce(Sum("quality_score"), 0.0),
            quality_n=Count("quality_score"),
        )
    )
    folded: dict[tuple, dict] = {}
    for g in groups:
        bucket = g.pop("latency_bucket")
        key = tuple(g.pop(k) for k in keys)
        sums = folded.get(key)
        if sums is None:
            sums = folded[key] = {**g, "latency_hist": [0] * len(_BUCKETS)}
        else:
            for field, value in g.items():
                sums[field] += value
        if bucket is not None:  # a request's row: every request of the group is in it
            sums["latency_hist"][bucket] += g["requests"]
    for key, sums in folded.items():
        named = dict(zip(keys, key, strict=True))
        yield HourlyUsage(
            tenant_id=tenant_id,
            hour=named.pop("hour_bucket", hour),
            draft_model=named.pop("draft"),
            prompt_tokens=sums.pop("prompt_tokens_sum"),
            completion_tokens=sums.pop("completion_tokens_sum"),
            **named,
            **sums,
        )


def hourly_totals(rows: list[HourlyUsage]) -> list[HourlyTotal]:
    """Unsaved HourlyTotal rows: ``rows`` summed per tenant and hour."""
    totals: dict[tuple[int, datetime], HourlyTotal] = {}
    for row in rows:
        key = (row.tenant_id, row.hour)
        if key not in totals:
            totals[key] = HourlyTotal(tenant_id=row.tenant_id, hour=row.hour)
        totals[key].add(row)
    return list(totals.values())


def minute_rows(tenant_id: int, start: datetime, end: datetime) -> list[MinuteUsage]:
    """Unsaved MinuteUsage rows for the ledger events in [start, end)."""
    groups = (
        UsageEvent.objects.filter(tenant_id=tenant_id, created_at__gte=start, created_at__lt=end)
        .order_by()
        .annotate(bucket=TruncMinute("created_at", tzinfo=UTC))
        .values("bucket")
        .annotate(
            **usage_sums(),
            quality_sum=Coalesce(Sum("quality_score"), 0.0),
            quality_n=Count("quality_score"),
        )
    )
    return [MinuteUsage(tenant_id=tenant_id, minute=g.pop("bucket"), **g) for g in groups]


def daily_rows(tenant_id: int, time_zone: str, start: date, end: date) -> list[DailyUsage]:
    """Unsaved DailyUsage rows for the tenant-local days in [start, end)."""
    tz = ZoneInfo(time_zone or "UTC")
    groups = (
        UsageEvent.objects.filter(
            tenant_id=tenant_id,
            created_at__gte=local_midnight(start, tz),
            created_at__lt=local_midnight(end, tz),
        )
        .order_by()
        .annotate(local_day=TruncDate("created_at", tzinfo=tz), user=Coalesce("end_user_id", 0))
        .values("local_day", "user", "model", "profile")
        .annotate(**usage_sums())
    )
    return [
        DailyUsage(tenant_id=tenant_id, day=g.pop("local_day"), end_user_id=g.pop("user"), **g)
        for g in groups
    ]


def local_midnight(day: date, tz: ZoneInfo) -> datetime:
    return datetime(day.year, day.month, day.day, tzinfo=tz).astimezone(UTC)


@dataclass(frozen=True)
class RollupResult:
    tenant_id: int
    hours: int  # hourly buckets rebuilt
    days: int  # daily buckets rebuilt
    hourly_rows: int
    daily_rows: int


def rollup_tenant(tenant: Tenant, now: datetime | None = None) -> RollupResult:
    """Bring the tenant's rollups up to the last closed hour and local day, and rebuild
    the hours (and their local days) that received ledger rows after they were rolled."""
    now = now or timezone.now()
    tz = ZoneInfo(tenant.time_zone or "UTC")
    hourly_end = hour_floor(now - LATE_MARGIN)
    daily_end = hourly_end.astimezone(tz).date()  # local days before this one are over
    with transaction.atomic():
        _planned_for_rollups()
        state = _locked_state(tenant, tz)
        if state is None:
            return RollupResult(tenant.pk, 0, 0, 0, 0)
        late = [hour for hour in _late_hours_taken(tenant, hourly_end) if hour < state.hourly_until]
        hour_spans = [(hour, hour + HOUR) for hour in late]
        if hourly_end > state.hourly_until:
            hour_spans.append((state.hourly_until, hourly_end))
            state.hourly_until = hourly_end
        late_days = {d for hour in late for d in _local_days(hour, tz) if d < state.daily_until}
        day_spans = [(day, day + timedelta(days=1)) for day in sorted(late_days)]
        if daily_end > state.daily_until:
            day_spans.append((state.daily_until, daily_end))
            state.daily_until = daily_end
        hours = days = n_hourly = n_daily = 0
        for start, end in hour_spans:
            HourlyUsage.objects.filter(tenant=tenant, hour__gte=start, hour__lt=end).delete()
            HourlyTotal.objects.filter(tenant=tenant, hour__gte=start, hour__lt=end).delete()
            rows = HourlyUsage.objects.bulk_create(
                hourly_rows(tenant.pk, start, end), batch_size=2000
            )
            HourlyTotal.objects.bulk_create(hourly_totals(rows), batch_size=2000)
            hours += int((end - start).total_seconds() // 3600)
            n_hourly += len(rows)
        for start_day, end_day in day_spans:
            DailyUsage.objects.filter(tenant=tenant, day__gte=start_day, day__lt=end_day).delete()
            rows = DailyUsage.objects.bulk_create(
                daily_rows(tenant.pk, tenant.time_zone, start_day, end_day), batch_size=2000
            )
            days += (end_day - start_day).days
            n_daily += len(rows)
        state.save()
    return RollupResult(tenant.pk, hours, days, n_hourly, n_daily)


def _late_hours_taken(tenant: Tenant, before: datetime) -> list[datetime]:
    """The tenant's hours before ``before`` marked by late ledger rows, the marks deleted.

    Taken before the ledger is read: a row marked since the marks were read is in the
    ledger by then (its mark commits with it); a row whose mark waits on this
    transaction's delete is not, and its mark is written once this transaction commits,
    for the next run."""
    marks = dict(
        LateLedgerHour.objects.filter(tenant=tenant, hour__lt=before).values_list("pk", "hour")
    )
    LateLedgerHour.objects.filter(pk__in=list(marks)).delete()
    return sorted(set(marks.values()))


def _local_days(hour: datetime, tz: ZoneInfo) -> set[date]:
    """The tenant-local days an hour (UTC) overlaps: two where the offset is not whole hours."""
    return {
        hour.astimezone(tz).date(),
        (hour + HOUR - timedelta(microseconds=1)).astimezone(tz).date(),
    }


def _planned_for_rollups() -> None:
    """How PostgreSQL plans this transaction's aggregations: without JIT (compiling one
    took about 0.3 s of an hour's 1-2 s, and it runs once) and hashing rather than
    sorting. The hour just closed is newer than the table's statistics, so the planner
    expects it to hold one row, and sorts its 400 000 rows on disk to group them into
    the few dozen groups a hash holds in memory."""
    if connection.vendor == "postgresql":
        with connection.cursor() as cursor:
            cursor.execute("SET LOCAL jit = off")
            cursor.execute("SET LOCAL enable_sort = off")


def _locked_state(tenant: Tenant, tz: ZoneInfo) -> RollupState | None:
    """The tenant's RollupState, locked for this transaction (None: no event yet).

    A new state starts at the tenant's first event: nothing before it to roll."""
    state = RollupState.objects.select_for_update().filter(tenant=tenant).first()
    if state is not None:
        return state
    first = UsageEvent.objects.filter(tenant=tenant).aggregate(first=Min("created_at"))["first"]
    if first is None:
        return None
    state, _ = RollupState.objects.get_or_create(
        tenant=tenant,
        defaults={"hourly_until": hour_floor(first), "daily_until": first.astimezone(tz).date()},
    )
    return RollupState.objects.select_for_update().get(pk=state.pk)


def rollup_minutes(tenant: Tenant, now: datetime | None = None) -> int:
    """Roll the tenant's minutes up to the current one (excluded); return the rows written.

    Rebuilds the minutes after ``minutely_until`` and the ``LATE_MARGIN`` before it, and
    drops minutes older than ``MINUTES_KEPT``: the stored minutes are always exactly those
    of the ``MINUTES_KEPT`` before ``minutely_until``.
    """
    now = now or timezone.now()
    end = minute_floor(now)
    with transaction.atomic():
        state = _locked_state(tenant, ZoneInfo(tenant.time_zone or "UTC"))
        if state is None:
            return 0
        oldest = end - MINUTES_KEPT
        start = max(oldest, (state.minutely_until or oldest) - LATE_MARGIN)
        if start >= end:
            return 0
        MinuteUsage.objects.filter(tenant=tenant, minute__lt=oldest).delete()
        MinuteUsage.objects.filter(tenant=tenant, minute__gte=start, minute__lt=end).delete()
        rows = MinuteUsage.objects.bulk_create(minute_rows(tenant.pk, start, end))
        state.minutely_until = end
        state.save(update_fields=["minutely_until", "updated_at"])
    return len(rows)


def rollup_minutes_recent(now: datetime | None = None) -> int:
    """Roll the minutes of every active tenant with events in the last few minutes (the
    others' stored minutes are already complete: readers find no raw events after them)."""
    now = now or timezone.now()
    recent = (
        UsageEvent.objects.filter(created_at__gte=now - 2 * LATE_MARGIN)
        .order_by()
        .values_list("tenant_id", flat=True)
        .distinct()
    )
    written = 0
    for tenant in Tenant.objects.filter(is_active=True, pk__in=recent).order_by("pk"):
        try:
            written += rollup_minutes(tenant, now)
        except Exception:  # one tenant's failure must not stop the others
            logger.exception("Minute rollup failed for tenant %s", tenant.slug)
    return written


def rollup_rebuild(tenant: Tenant, now: datetime | None = None) -> RollupResult:
    """Drop the tenant's rollups and roll its whole ledger again (after a backfill or a
    correction of past ledger rows, which the forward-only watermark would miss)."""
    with transaction.atomic():
        RollupState.objects.filter(tenant=tenant).delete()
        HourlyUsage.objects.filter(tenant=tenant).delete()
        HourlyTotal.objects.filter(tenant=tenant).delete()
        DailyUsage.objects.filter(tenant=tenant).delete()
        MinuteUsage.objects.filter(tenant=tenant).delete()
        return rollup_tenant(tenant, now)


def rollup_all(now: datetime | None = None) -> list[RollupResult]:
    results = []
    for tenant in Tenant.objects.filter(is_active=True).order_by("pk"):
        try:
            results.append(rollup_tenant(tenant, now))
        except Exception:  # one tenant's failure must not stop the others
            logger.exception("Rollup failed for tenant %s", tenant.slug)
    return results
