"""Budget enforcement: reserve the worst case before a call, settle the actual cost after.

Invariants (PostgreSQL is the truth; every process and machine shares it):

- A request is admitted only if, for every budget that applies to it,
  ``spent + reserved + worst_case <= limit * block_pct / 100`` holds at the
  moment its reservation is written. Counters are locked in id order inside
  one transaction, so concurrent requests on any number of workers serialise
  on the rows they share and can never jointly overshoot: settled spend
  exceeds a limit only by what a call cost beyond its worst-case estimate.
- Settlement moves the reservation to ``spent`` at the actual cost, in the
  same transaction as the ledger row, so the counters and the ledger agree to
  the nano-dollar.
- A reservation changes state exactly once (held -> settled | expired) by a
  conditional UPDATE; a reclaimed reservation that settles late adds its
  spend without releasing twice.

The hot path is written in SQL built from model metadata, not ORM queries:
admission runs on every request of a tenant with budgets, and ORM query
compilation alone would cost more than the check's budget (bench/budget.py).
"""

from __future__ import annotations

import calendar
import json
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from functools import lru_cache
from zoneinfo import ZoneInfo

from django.db import connection, transaction

from cascadeflow_site.db import as_datetime
from routing.engine.pricing import nanos_to_usd
from tenants.enums import BudgetPeriod, BudgetScope
from tenants.models import (
    Budget,
    BudgetAlert,
    BudgetCounter,
    BudgetReservation,
    EndUser,
    EndUserTier,
)

LIFETIME_START = datetime(1970, 1, 1, tzinfo=UTC)
DEFAULT_THRESHOLDS = (80, 90, 100)
LEVELS = ("allow", "warn", "degrade", "block")
PERIOD_ADJECTIVE = {"day": "daily", "week": "weekly", "month": "monthly", "lifetime": "lifetime"}


def period_bounds(period: str, now: datetime, time_zone: str) -> tuple[datetime, datetime | None]:
    """The calendar period containing ``now`` in the tenant's time zone, as UTC instants."""
    if period == BudgetPeriod.LIFETIME:
        return LIFETIME_START, None
    tz = ZoneInfo(time_zone or "UTC")
    local = now.astimezone(tz)
    midnight = local.replace(hour=0, minute=0, second=0, microsecond=0)
    if period == BudgetPeriod.DAY:
        start = midnight
        end = _local_midnight(start.date() + timedelta(days=1), tz)
    elif period == BudgetPeriod.WEEK:
        start = _local_midnight(midnight.date() - timedelta(days=midnight.weekday()), tz)
        end = _local_midnight(start.date() + timedelta(days=7), tz)
    elif period == BudgetPeriod.MONTH:
        start = _local_midnight(midnight.date().replace(day=1), tz)
        days = calendar.monthrange(start.year, start.month)[1]
        end = _local_midnight(start.date() + timedelta(days=days), tz)
    else:
        raise ValueError(f"Unknown budget period '{period}'.")
    return start.astimezone(UTC), end.astimezone(UTC)


def _local_midnight(day, tz: ZoneInfo) -> datetime:
    # Built from the date (not by adding hours) so DST changes keep midnight local.
    return datetime(day.year, day.month, day.day, tzinfo=tz)


@dataclass(frozen=True)
class BudgetLine:
    """A budget that applies to one request, with the thresholds in force."""

    budget_id: int
    scope: str
    period: str
    limit_nanos: int
    subject_id: int
    warn_pct: int
    degrade_pct: int
    block_pct: int
    label: str

    @property
    def cap_nanos(self) -> int:
        return self.limit_nanos * self.block_pct // 100

    def level(self, used_nanos: int) -> str:
        if self.limit_nanos <= 0:
            return "block"
        pct = used_nanos * 100 / self.limit_nanos
        if pct >= self.block_pct:
            return "block"
        if pct >= self.degrade_pct:
            return "degrade"
        if pct >= self.warn_pct:
            return "warn"
        return "allow"


@dataclass
class BudgetState:
    line: BudgetLine
    counter_id: int
    period_start: datetime
    period_end: datetime | None
    spent_nanos: int
    reserved_nanos: int

    @property
    def used_nanos(self) -> int:
        return self.spent_nanos + self.reserved_nanos


@dataclass
class Admission:
    decision: str  # allow | warn | degrade | block
    reservation_id: int | None = None
    amount_nanos: int = 0
    states: list[BudgetState] = field(default_factory=list)
    tripped: BudgetState | None = None  # the budget that decided degrade / block
    time_zone: str = "UTC"

    @property
    def message(self) -> str:
        state = self.tripped
        if state is None:
            return ""
        line = state.line
        period = PERIOD_ADJECTIVE[line.period]
        used = _pct(state.used_nanos, line.limit_nanos)
        spent, limit = nanos_to_usd(state.spent_nanos), nanos_to_usd(line.limit_nanos)
        text = f"The {period} budget of {line.label} is {used} used"
        text += f" (${spent:.2f} spent of ${limit:.2f})"
        if self.decision == "block":
            text = (
                f"Budget exceeded: the {period} budget of {line.label} "
                f"(${nanos_to_usd(line.limit_nanos):.2f}) has "
                f"${nanos_to_usd(max(line.cap_nanos - state.used_nanos, 0)):.6f} left"
            )
        if state.period_end is not None:
            reset = state.period_end.astimezone(ZoneInfo(self.time_zone or "UTC"))
            text += f"; it resets at {reset.isoformat()}"
        return text + "."


def _pct(used: int, limit: int) -> str:
    return f"{used * 100 / limit:.0f}%" if limit else "100%"


# --- which budgets apply ------------------------------------------------------------


@lru_cache(maxsize=4)
def _budget_sql(vendor: str) -> str:
    quote = connection.ops.quote_name
    return (
        f"SELECT id, scope, period, limit_nanos, tier_id, end_user_id, token_id, "  # noqa: S608 - identifiers from model metadata
        f"warn_pct, degrade_pct, block_pct FROM {quote(Budget._meta.db_table)} "
        f"WHERE tenant_id = %s AND (scope = 'tenant' OR (scope = 'token' AND token_id = %s) "
        f"OR (scope = 'end_user' AND end_user_id = %s) OR (scope = 'tier' AND tier_id = %s)) "
        f"ORDER BY id"
    )


def applicable_budgets(
    *,
    tenant_id: int,
    token_id: int | None,
    token_label: str,
    end_user_id: int | None,
    end_user_label: str,
    tier: EndUserTierPolicy | None,
) -> list[BudgetLine]:
    """Every budget a request is counted against, with thresholds resolved.

    A tier budget counts per end user and is replaced by the end user's own
    budget of the same period.
    """
    with connection.cursor() as cursor:
        cursor.execute(
            _budget_sql(connection.vendor),
            [tenant_id, token_id or -1, end_user_id or -1, (tier.tier_id if tier else None) or -1],
        )
        rows = cursor.fetchall()
    own_periods = {r[2] for r in rows if r[1] == BudgetScope.END_USER}
    tier_thresholds = tier.thresholds if tier else DEFAULT_THRESHOLDS
    lines = []
    for bid, scope, period, limit, _tier_id, _eu, _tok, warn, degrade, block in rows:
        if scope == BudgetScope.TIER and (end_user_id is None or period in own_periods):
            continue
        defaults = (
            tier_thresholds
            if scope in (BudgetScope.TIER, BudgetScope.END_USER)
            else DEFAULT_THRESHOLDS
        )
        label = {
            BudgetScope.TENANT: "the tenant",
            BudgetScope.TOKEN: f"API key {token_label}",
            BudgetScope.END_USER: f"end user '{end_user_label}'",
            BudgetScope.TIER: f"end user '{end_user_label}' (tier '{tier.slug if tier else ''}')",
        }[scope]
        lines.append(
            BudgetLine(
                budget_id=bid,
                scope=scope,
                period=period,
                limit_nanos=int(limit),
                subject_id=int(end_user_id or 0) if scope == BudgetScope.TIER else 0,
                warn_pct=warn if warn is not None else defaults[0],
                degrade_pct=degrade if degrade is not None else defaults[1],
                block_pct=block if block is not None else defaults[2],
                label=label,
            )
        )
    return lines


@dataclass(frozen=True)
class EndUserTierPolicy:
    tier_id: int
    slug: str
    thresholds: tuple[int, int, int]
    requests_per_minute: int | None
    tokens_per_minute: int | None
    allowed_models: tuple[str, ...]

    @classmethod
    def of(cls, tier: EndUserTier) -> EndUserTierPolicy:
        return cls(
            tier.pk,
            tier.slug,
            (tier.warn_pct, tier.degrade_pct, tier.block_pct),
            tier.requests_per_minute,
            tier.tokens_per_minute,
            tuple(tier.allowed_models or ()),
        )


def end_user_tier(*, tenant_id: int, end_user: EndUser | None) -> EndUserTierPolicy | None:
    """The end user's tier, else the tenant's default tier, else None."""
    tier = None
    if end_user is not None and end_user.tier_id:
        tier = EndUserTier.objects.filter(pk=end_user.tier_id).first()
    if tier is None:
        tier = EndUserTier.objects.filter(tenant_id=tenant_id, is_default=True).first()
    return EndUserTierPolicy.of(tier) if tier else None


# --- reserve ---------------------------------------------------------------------------


@lru_cache(maxsize=4)
def _counter_sql(vendor: str) -> tuple[str, str, str]:
    quote = connection.ops.quote_name
    table = quote(BudgetCounter._meta.db_table)
    upsert = (
        f"INSERT INTO {table} (tenant_id, budget_id, subject_id, period_start, period_end, "  # noqa: S608
        f"spent_nanos, reserved_nanos) VALUES (%s, %s, %s, %s, %s, 0, 0) "
        f"ON CONFLICT (budget_id, subject_id, period_start) DO NOTHING"
    )
    lock = " FOR UPDATE" if vendor == "postgresql" else ""
    select = (
        f"SELECT id, spent_nanos, reserved_nanos, period_end FROM {table} "  # noqa: S608
        f"WHERE budget_id = %s AND subject_id = %s AND period_start = %s{lock}"
    )
    reserve = f"UPDATE {table} SET reserved_nanos = reserved_nanos + %s WHERE id = %s"  # noqa: S608
    return upsert, select, reserve


def budget_admit(
    *,
    tenant_id: int,
    time_zone: str,
    lines: list[BudgetLine],
    request_id: str,
    worst_case_nanos: int,
    degraded_worst_case_nanos: int,
    now: datetime,
    ttl: timedelta,
) -> Admission:
    """Decide allow / warn / degrade / block and hold the worst case on every budget.

    ``degraded_worst_case_nanos`` is what the request costs at most on the cheap
    models alone: a request that no longer fits at full cost, or whose budget is
    past its degrade threshold, is admitted degraded if that fits.
    """
    if not lines:
        return Admission("allow", time_zone=time_zone)
    upsert, select, reserve = _counter_sql(connection.vendor)
    bounds = [period_bounds(line.period, now, time_zone) for line in lines]
    with transaction.atomic(), connection.cursor() as cursor:
        states: list[BudgetState] = []
        # Lock order: by counter key, the same in every process, so no deadlocks.
        for line, (start, end) in sorted(
            zip(lines, bounds, strict=True), key=lambda lb: (lb[0].budget_id, lb[0].subject_id)
        ):
            adapt = connection.ops.adapt_datetimefield_value
            params = [line.budget_id, line.subject_id, adapt(start)]
            cursor.execute(upsert, [tenant_id, *params, adapt(end)])
            cursor.execute(select, params)
            counter_id, spent, reserved, period_end = cursor.fetchone()
            states.append(
                BudgetState(
                    line, counter_id, start, as_datetime(period_end), int(spent), int(reserved)
                )
            )
        decision, tripped = _decide(states, worst_case_nanos, degraded_worst_case_nanos)
        admission = Admission(decision, states=states, tripped=tripped, time_zone=time_zone)
        if decision == "block":
            return admission
        amount = degraded_worst_case_nanos if decision == "degrade" else worst_case_nanos
        for state in states:
            cursor.execute(reserve, [amount, state.counter_id])
        reservation = BudgetReservation.objects.create(
            tenant_id=tenant_id,
            request_id=request_id,
            amount_nanos=amount,
            counter_ids=[s.counter_id for s in states],
            created_at=now,
            expires_at=now + ttl,
        )
        admission.reservation_id = reservation.pk
        admission.amount_nanos = amount
        return admission


def _decide(states: list[BudgetState], full: int, degraded: int) -> tuple[str, BudgetState | None]:
    decision, tripped = "allow", None
    for state in states:
        line = state.line
        level = line.level(state.used_nanos)
        if state.used_nanos + degraded > line.cap_nanos:
            level = "block"
        elif level != "block" and state.used_nanos + full > line.cap_nanos:
            level = "degrade"
        if LEVELS.index(level) > LEVELS.index(decision):
            decision, tripped = level, state
    return decision, tripped


# --- settle and reclaim ----------------------------------------------------------------


@lru_cache(maxsize=4)
def _settle_sql(vendor: str) -> tuple[str, str, str, str, str]:
    quote = connection.ops.quote_name
    reservations = quote(BudgetReservation._meta.db_table)
    counters = quote(BudgetCounter._meta.db_table)
    claim = (
        f"UPDATE {reservations} SET state = %s WHERE id = %s AND state = 'held' "  # noqa: S608
        f"RETURNING amount_nanos, counter_ids"
    )
    read = f"SELECT amount_nanos, counter_ids FROM {reservations} WHERE id = %s"  # noqa: S608
    settle = (
        f"UPDATE {counters} SET spent_nanos = spent_nanos + %s, "  # noqa: S608
        f"reserved_nanos = reserved_nanos - %s WHERE id = %s "
        f"RETURNING budget_id, subject_id, period_start, spent_nanos"
    )
    release = f"UPDATE {counters} SET reserved_nanos = reserved_nanos - %s WHERE id = %s"  # noqa: S608
    expire = (
        f"UPDATE {reservations} SET state = 'expired' WHERE id = %s AND state = 'held' "  # noqa: S608
        f"AND expires_at < %s RETURNING amount_nanos, counter_ids"
    )
    return claim, read, settle, release, expire


@dataclass(frozen=True)
class Crossing:
    budget_id: int
    subject_id: int
    period_start: datetime
    level: str
    spent_nanos: int
    limit_nanos: int


def budget_settle(
    *, reservation_id: int, actual_nanos: int, lines: list[BudgetLine]
) -> list[Crossing]:
    """Move a reservation to spent at its actual cost. Call inside the ledger's transaction.

    Returns the thresholds this spend crossed (for alerts).
    """
    claim, read, settle, _, _ = _settle_sql(connection.vendor)
    by_budget = {(line.budget_id, line.subject_id): line for line in lines}
    with connection.cursor() as cursor:
        cursor.execute(claim, ["settled", reservation_id])
        row = cursor.fetchone()
        released = True
        if row is None:  # reclaimed after expiry: add the spend, release nothing
            cursor.execute(read, [reservation_id])
            row = cursor.fetchone()
            released = False
            if row is None:
                return []
        amount, counter_ids = int(row[0]), row[1]
        if isinstance(counter_ids, str):
            counter_ids = json.loads(counter_ids)
        crossings = []
        for counter_id in sorted(counter_ids):
            cursor.execute(settle, [actual_nanos, amount if released else 0, counter_id])
            budget_id, subject_id, period_start, spent = cursor.fetchone()
            line = by_budget.get((budget_id, subject_id))
            if line is None:
                continue
            before, after = int(spent) - actual_nanos, int(spent)
            for level, pct in (
                ("warn", line.warn_pct),
                ("degrade", line.degrade_pct),
                ("block", line.block_pct),
            ):
                mark = line.limit_nanos * pct / 100
                if before < mark <= after:
                    crossings.append(
                        Crossing(
                            budget_id,
                            subject_id,
                            as_datetime(period_start),
                            level,
                            after,
                            line.limit_nanos,
                        )
                    )
        return crossings


def budget_release(*, reservation_id: int) -> None:
    """Give a reservation back untouched (the request was never sent upstream)."""
    budget_settle(reservation_id=reservation_id, actual_nanos=0, lines=[])


def reservations_reclaim(*, now: datetime) -> int:
    """Release reservations that expired unsettled (their worker died). Returns how many."""

    _, _, _, release, expire = _settle_sql(connection.vendor)
    expired = list(
        BudgetReservation.objects.filter(state="held", expires_at__lt=now).values_list(
            "pk", flat=True
        )[:1000]
    )
    reclaimed = 0
    for reservation_id in expired:
        with transaction.atomic(), connection.cursor() as cursor:
            cursor.execute(expire, [reservation_id, connection.ops.adapt_datetimefield_value(now)])
            row = cursor.fetchone()
            if row is None:
                continue
            amount, counter_ids = int(row[0]), row[1]
            for counter_id in sorted(
                json.loads(counter_ids) if isinstance(counter_ids, str) else counter_ids
            ):
                cursor.execute(release, [amount, counter_id])
            reclaimed += 1
    return reclaimed


def alerts_record(*, tenant_id: int, crossings: list[Crossing]) -> list[int]:
    """Store one alert per threshold per period; return the ids of the new ones only."""
    created = []
    for c in crossings:
        alert = BudgetAlert.objects.filter(
            budget_id=c.budget_id,
            subject_id=c.subject_id,
            period_start=c.period_start,
            level=c.level,
        ).first()
        if alert is not None:
            continue
        with transaction.atomic():
            obj, was_created = BudgetAlert.objects.get_or_create(
                budget_id=c.budget_id,
                subject_id=c.subject_id,
                period_start=c.period_start,
                level=c.level,
                defaults={
                    "tenant_id": tenant_id,
                    "spent_nanos": c.spent_nanos,
                    "limit_nanos": c.limit_nanos,
                },
            )
        if was_created:
            created.append(obj.pk)
    return created
