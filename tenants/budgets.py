"""Budget enforcement: reserve the worst case before a call, settle the actual cost after.

Invariants (PostgreSQL is the truth; every process and machine shares it):

- A request is admitted only if, for every budget that applies to it,
  ``spent + reserved + worst_case <= limit * block_pct / 100`` holds at the
  moment its reservation is written. Concurrent requests on any number of
  workers serialise on the counters they share and can never jointly
  overshoot: settled spend exceeds a limit only by what a call cost beyond
  its worst-case estimate.
- One lock order, everywhere: a statement that changes counters locks them
  by key ``(budget_id, subject_id, period_start)`` — admission's upsert in
  its VALUES order, settlement, give-back and reclaim through
  ``_locked_update_sql`` — and a transaction that touches a reservation row
  takes it before its counters. Two requests sharing several budgets
  therefore wait on each other, never for each other. A deadlock or
  serialization failure that happens anyway (an operator's own statement)
  is retried a bounded number of times (``retry_transient``).
- Settlement moves the reservation to ``spent`` at the actual cost atomically
  with the ledger row (on PostgreSQL in the row's own statement,
  ``settle_after_insert``; elsewhere in its transaction), so the counters and
  the ledger agree to the nano-dollar.
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
from decimal import ROUND_HALF_UP, Decimal
from functools import lru_cache, partial
from zoneinfo import ZoneInfo

from django.db import connection, transaction

from core.db import as_datetime, as_json, insert_row, retry_transient, statement_cursor
from tenants.enums import BudgetDecision, BudgetPeriod, BudgetScope
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
        return threshold_level(
            used_nanos, self.limit_nanos, (self.warn_pct, self.degrade_pct, self.block_pct)
        )

    @property
    def thresholds(self) -> tuple[tuple[str, int], ...]:
        """(level, percent of the limit), from warn to block."""
        return (
            (BudgetDecision.WARN, self.warn_pct),
            (BudgetDecision.DEGRADE, self.degrade_pct),
            (BudgetDecision.BLOCK, self.block_pct),
        )

    def crossings(self, before: int, after: int, period_start: datetime) -> list[Crossing]:
        """The thresholds a spend from ``before`` to ``after`` nano-dollars moved across."""
        return [
            Crossing(self.budget_id, self.subject_id, period_start, level, after, self.limit_nanos)
            for level, pct in self.thresholds
            if crossed(before, after, self.limit_nanos, pct)
        ]


def crossed(before: int, after: int, limit_nanos: int, pct: int) -> bool:
    """Whether a spend from ``before`` to ``after`` reached ``pct`` % of the limit (exact
    integer arithmetic, as ``_settle_after_insert_sql`` computes it in SQL)."""
    return before * 100 < limit_nanos * pct <= after * 100


def threshold_level(used_nanos: int, limit_nanos: int, thresholds: tuple[int, int, int]) -> str:
    """allow / warn / degrade / block: the highest threshold ``used_nanos`` has reached."""
    if limit_nanos <= 0:
        return BudgetDecision.BLOCK
    pct = used_nanos * 100 / limit_nanos
    warn, degrade, block = thresholds
    if pct >= block:
        return BudgetDecision.BLOCK
    if pct >= degrade:
        return BudgetDecision.DEGRADE
    if pct >= warn:
        return BudgetDecision.WARN
    return BudgetDecision.ALLOW


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
    reservation_key: str | None = None  # the request id the reservation is held under
    amount_nanos: int = 0
    states: list[BudgetState] = field(default_factory=list)
    tripped: BudgetState | None = None  # the budget that decided degrade / block
    time_zone: str = "UTC"
    override_message: str = ""  # the tenant callback's own words, when it decided
    worst_case_nanos: int = 0  # the most this request may cost on its whole chain
    degraded_worst_case_nanos: int = 0  # ... and on its cheapest model alone

    @property
    def threshold_level(self) -> str:
        """The threshold the deciding budget has reached (allow / warn / degrade / block),
        which is less than the decision when a worst case, not a threshold, did not fit."""
        if self.tripped is None:
            return BudgetDecision.ALLOW
        return self.tripped.line.level(self.tripped.used_nanos)

    @property
    def message(self) -> str:
        """What the deciding budget says, in words and dollars that agree: the percent
        counts what is spent and what requests in progress hold, and both are stated."""
        if self.override_message:
            return self.override_message
        state = self.tripped
        if state is None:
            return ""
        line = state.line
        period = PERIOD_ADJECTIVE[line.period]
        held = f" + {usd_text(state.reserved_nanos)} held by requests in progress"
        usage = (
            f"{_pct(state.used_nanos, line.limit_nanos)} used: "
            f"{usd_text(state.spent_nanos)} spent{held if state.reserved_nanos > 0 else ''}, "
            f"of {usd_text(line.limit_nanos, exact=True)}"
        )
        left = usd_text(max(line.cap_nanos - state.used_nanos, 0))
        budget = f"the {period} budget of {line.label}"
        reached = self.threshold_level
        if self.decision == BudgetDecision.BLOCK:
            text = f"Budget exceeded: {budget} is {usage}"
            if reached == BudgetDecision.BLOCK:
                text += f", at its block threshold ({line.block_pct}%)"
            else:
                text += (
                    f"; the {left} left is less than this request may cost on its cheapest "
                    f"model ({usd_text(self.degraded_worst_case_nanos)})"
                )
        elif self.decision == BudgetDecision.DEGRADE and reached != BudgetDecision.DEGRADE:
            text = (
                f"{budget[0].upper()}{budget[1:]} is {usage}; this request may cost up to "
                f"{usd_text(self.worst_case_nanos)} on its whole chain, more than the {left} "
                f"left, so only its cheapest model answers"
            )
        elif self.decision == BudgetDecision.DEGRADE:
            text = (
                f"{budget[0].upper()}{budget[1:]} is {usage}, past its degrade threshold "
                f"({line.degrade_pct}%), so only the cheapest model answers"
            )
        else:
            text = f"{budget[0].upper()}{budget[1:]} is {usage}"
        if state.period_end is not None:
            reset = state.period_end.astimezone(ZoneInfo(self.time_zone or "UTC"))
            text += f". It resets at {reset.isoformat()}"
        return text + "."


def _pct(used: int, limit: int) -> str:
    return f"{used * 100 / limit:.0f}%" if limit else "100%"


def usd_text(nanos: int, *, exact: bool = False) -> str:
    """Dollars at the precision that keeps a message true: cents from a cent up, three
    significant digits below ($0.00002, never "$0.00" for what is not zero); ``exact``
    (a limit someone set) keeps every digit it has ($2.105, $0.00002)."""
    value = Decimal(nanos) / 10**9
    sign, value = ("-" if value < 0 else ""), abs(value)
    if value == 0:
        return "$0.00"
    if exact:
        text = f"{value:,.9f}".rstrip("0")
        whole, _, cents = text.partition(".")
        return f"{sign}${whole}.{cents.ljust(2, '0')}"
    if value >= Decimal("0.01"):
        return f"{sign}${value.quantize(Decimal('0.01'), ROUND_HALF_UP):,}"
    step = Decimal(1).scaleb(value.adjusted() - 2)  # three significant digits
    return f"{sign}${value.quantize(step, ROUND_HALF_UP):f}".rstrip("0")


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
    lines = []
    for bid, scope, period, limit, _tier_id, _eu, _tok, warn, degrade, block in rows:
        if scope == BudgetScope.TIER and (end_user_id is None or period in own_periods):
            continue
        thresholds = effective_thresholds(
            scope=scope, given=(warn, degrade, block), tier=tier.thresholds if tier else None
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
                warn_pct=thresholds[0],
                degrade_pct=thresholds[1],
                block_pct=thresholds[2],
                label=label,
            )
        )
    return lines


def effective_thresholds(
    *,
    scope: str,
    given: tuple[int | None, int | None, int | None],
    tier: tuple[int, int, int] | None,
) -> tuple[int, int, int]:
    """The warn / degrade / block percents in force: the budget's own, else (for tier and
    end-user budgets) the end user's tier's, else 80 / 90 / 100. The one rule admission,
    alerts and every page that shows thresholds use."""
    defaults = (
        tier if tier and scope in (BudgetScope.TIER, BudgetScope.END_USER) else DEFAULT_THRESHOLDS
    )
    return tuple(g if g is not None else d for g, d in zip(given, defaults, strict=True))  # type: ignore[return-value]


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


def _quoted() -> tuple[str, str]:
    quote = connection.ops.quote_name
    return quote(BudgetCounter._meta.db_table), quote(BudgetReservation._meta.db_table)


@lru_cache(maxsize=64)
def _upsert_sql(vendor: str, rows: int) -> str:
    """Create-or-lock every counter of a request and add the reservation, in one statement.

    Rows are given in key order, so concurrent admissions lock them in the same
    order and never deadlock. ``RETURNING`` gives the counters *after* the
    reservation; the decision subtracts it back.
    """
    counters, _ = _quoted()
    values = ", ".join(["(%s, %s, %s, %s, %s, 0, %s)"] * rows)
    return (
        f"INSERT INTO {counters} (tenant_id, budget_id, subject_id, period_start, period_end, "  # noqa: S608 - identifiers from model metadata
        f"spent_nanos, reserved_nanos) VALUES {values} "
        f"ON CONFLICT (budget_id, subject_id, period_start) "
        f"DO UPDATE SET reserved_nanos = {counters}.reserved_nanos + excluded.reserved_nanos "
        f"RETURNING id, budget_id, subject_id, spent_nanos, reserved_nanos"
    )


@lru_cache(maxsize=64)
def _locked_update_sql(
    vendor: str, rows: int, assignments: str, returning: str = "", condition: str = ""
) -> str:
    """``UPDATE counters SET <assignments> WHERE id IN (...)``, taking the row locks in key order.

    A plain ``UPDATE ... WHERE id IN`` locks rows in whatever order its scan
    meets them (physical order, which every update changes), while admission
    locks them in key order: two requests sharing two counters could then
    wait on each other forever. On PostgreSQL every statement that changes
    counters first locks them ``ORDER BY budget_id, subject_id, period_start``
    (the admission upsert's order). SQLite locks the whole database instead.
    ``condition`` (PostgreSQL only) is ANDed to the choice of rows.
    """
    counters, _ = _quoted()
    ids = ", ".join(["%s"] * rows)
    tail = f" RETURNING {returning}" if returning else ""
    if vendor != "postgresql":
        return f"UPDATE {counters} SET {assignments} WHERE id IN ({ids}){tail}"  # noqa: S608
    qualified = ", ".join(f"{counters}.{name.strip()}" for name in returning.split(",") if name)
    return (
        f"UPDATE {counters} SET {assignments} FROM (SELECT id FROM {counters} "  # noqa: S608 - identifiers from model metadata
        f"WHERE id IN ({ids}){' AND ' + condition if condition else ''} "
        f"ORDER BY budget_id, subject_id, period_start FOR UPDATE) locked "
        f"WHERE {counters}.id = locked.id" + (f" RETURNING {qualified}" if returning else "")
    )


def _release_sql(rows: int) -> str:
    """Take ``%s`` nano-dollars of reservation off the counters (give-back, reclaim)."""
    return _locked_update_sql(connection.vendor, rows, "reserved_nanos = reserved_nanos - %s")


def _settle_sql(rows: int) -> str:
    """Add ``%s`` spent and take ``%s`` reserved off the counters; return their new spend."""
    return _locked_update_sql(
        connection.vendor,
        rows,
        "spent_nanos = spent_nanos + %s, reserved_nanos = reserved_nanos - %s",
        "budget_id, subject_id, period_start, spent_nanos",
    )


@lru_cache(maxsize=4)
def _reservation_sql(vendor: str) -> tuple[str, str, str]:
    _, reservations = _quoted()
    claim = (
        f"UPDATE {reservations} SET state = 'settled' WHERE request_id = %s AND state = 'held' "  # noqa: S608
        f"RETURNING amount_nanos, counter_ids"
    )
    read = f"SELECT amount_nanos, counter_ids FROM {reservations} WHERE request_id = %s"  # noqa: S608
    expire = (
        f"UPDATE {reservations} SET state = 'expired' WHERE id = %s AND state = 'held' "  # noqa: S608
        f"AND expires_at < %s RETURNING amount_nanos, counter_ids"
    )
    return claim, read, expire


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

    Counters are created, locked (in key order, the same in every process, so
    concurrent admissions never deadlock) and reserved by one multi-row upsert;
    on PostgreSQL the same statement records the reservation (a data-modifying
    CTE), elsewhere a second statement in the same transaction does.
    """
    if not lines:
        return Admission(BudgetDecision.ALLOW, time_zone=time_zone)
    adapt = connection.ops.adapt_datetimefield_value
    ordered = sorted(lines, key=lambda line: (line.budget_id, line.subject_id))
    bounds = [period_bounds(line.period, now, time_zone) for line in ordered]
    params: list = []
    for line, (start, end) in zip(ordered, bounds, strict=True):
        params += [
            tenant_id,
            line.budget_id,
            line.subject_id,
            adapt(start),
            adapt(end),
            worst_case_nanos,
        ]
    reservation = {
        "tenant": tenant_id,
        "request_id": request_id,
        "amount_nanos": worst_case_nanos,
        "state": "held",
        "created_at": now,
        "expires_at": now + ttl,
    }
    decide = partial(
        _admission_after,
        ordered=ordered,
        bounds=bounds,
        time_zone=time_zone,
        request_id=request_id,
        full=worst_case_nanos,
        degraded=degraded_worst_case_nanos,
    )
    # Optimistic: reserve the full worst case while taking the row locks; the
    # rare degrade and block decisions give the difference back.
    if connection.vendor == "postgresql":
        # One statement, atomic on its own: lock-and-reserve every counter and
        # record the reservation. If the process dies before a give-back below,
        # the reservation holds the full amount until it expires and is reclaimed.
        def reserve() -> list:
            with statement_cursor() as cursor:
                cursor.execute(
                    _admit_one_sql(len(ordered)),
                    [*params, *_reservation_params(reservation)],
                )
                return cursor.fetchall()

        return decide(retry_transient(reserve))

    def reserve_in_transaction() -> list:
        with transaction.atomic(), connection.cursor() as cursor:
            cursor.execute(_upsert_sql(connection.vendor, len(ordered)), params)
            rows = cursor.fetchall()
            counter_ids = sorted(r[0] for r in rows)
            insert_row(BudgetReservation, {**reservation, "counter_ids": counter_ids})
            return rows

    return decide(retry_transient(reserve_in_transaction))


def _reservation_params(reservation: dict) -> list:
    fields = ("tenant", "request_id", "amount_nanos", "state", "created_at", "expires_at")
    return [
        BudgetReservation._meta.get_field(name).get_db_prep_save(reservation[name], connection)
        for name in fields
    ]


@lru_cache(maxsize=64)
def _admit_one_sql(rows: int) -> str:
    _, reservations = _quoted()
    upsert = _upsert_sql("postgresql", rows)
    return (
        f"WITH up AS ({upsert}), res AS (INSERT INTO {reservations} "  # noqa: S608 - identifiers from model metadata
        f"(tenant_id, request_id, amount_nanos, state, created_at, expires_at, counter_ids) "
        f"SELECT %s, %s, %s, %s, %s, %s, (SELECT jsonb_agg(id ORDER BY id) FROM up)) "
        f"SELECT id, budget_id, subject_id, spent_nanos, reserved_nanos FROM up"
    )


def _admission_after(
    rows, ordered, bounds, time_zone: str, request_id: str, full: int, degraded: int
) -> Admission:
    """Decide from the counters as they were before this reservation; give back what is not held."""
    by_key = {(r[1], r[2]): r for r in rows}
    states = []
    for line, (start, end) in zip(ordered, bounds, strict=True):
        counter_id, _, _, spent, reserved = by_key[(line.budget_id, line.subject_id)]
        states.append(BudgetState(line, counter_id, start, end, int(spent), int(reserved) - full))
    decision, tripped = _decide(states, full, degraded)
    admission = Admission(
        decision,
        states=states,
        tripped=tripped,
        time_zone=time_zone,
        worst_case_nanos=full,
        degraded_worst_case_nanos=degraded,
    )
    amount = degraded if decision == BudgetDecision.DEGRADE else full
    if decision == BudgetDecision.BLOCK or amount != full:
        counter_ids = sorted(state.counter_id for state in states)
        _, reservations = _quoted()

        def give_back() -> None:
            # The reservation row first, then the counters: the order settlement and
            # reclaim take them in too.
            with transaction.atomic(), connection.cursor() as cursor:
                cursor.execute(
                    f"UPDATE {reservations} SET amount_nanos = %s, state = %s "  # noqa: S608
                    f"WHERE request_id = %s",
                    [
                        0 if decision == BudgetDecision.BLOCK else amount,
                        "released" if decision == BudgetDecision.BLOCK else "held",
                        request_id,
                    ],
                )
                cursor.execute(
                    _release_sql(len(counter_ids)),
                    [full - (0 if decision == BudgetDecision.BLOCK else amount), *counter_ids],
                )

        retry_transient(give_back)
    if decision == BudgetDecision.BLOCK:
        return admission
    admission.reservation_key = request_id
    admission.amount_nanos = amount
    return admission


def _decide(states: list[BudgetState], full: int, degraded: int) -> tuple[str, BudgetState | None]:
    decision, tripped = BudgetDecision.ALLOW, None
    for state in states:
        line = state.line
        level = line.level(state.used_nanos)
        if state.used_nanos + degraded > line.cap_nanos:
            level = BudgetDecision.BLOCK
        elif level != BudgetDecision.BLOCK and state.used_nanos + full > line.cap_nanos:
            level = BudgetDecision.DEGRADE
        if BudgetDecision.severity(level) > BudgetDecision.severity(decision):
            decision, tripped = level, state
    return decision, tripped


# --- settle and reclaim ----------------------------------------------------------------


@dataclass(frozen=True)
class Crossing:
    budget_id: int
    subject_id: int
    period_start: datetime
    level: str
    spent_nanos: int
    limit_nanos: int


def budget_settle(
    *,
    request_id: str,
    actual_nanos: int,
    lines: list[BudgetLine],
    counter_ids_hint: list[int] | None = None,
) -> list[Crossing]:
    """Move a request's reservation to spent at its actual cost.

    Call inside the ledger row's transaction. Returns the thresholds this spend
    crossed (for alerts).
    """
    claim, read, _ = _reservation_sql(connection.vendor)
    by_budget = {(line.budget_id, line.subject_id): line for line in lines}
    with connection.cursor() as cursor:
        if connection.vendor == "postgresql" and counter_ids_hint:
            # One statement: claim the reservation and move it to spent.
            cursor.execute(
                _settle_one_sql(len(counter_ids_hint)),
                [request_id, actual_nanos, *counter_ids_hint],
            )
            return _crossings(cursor.fetchall(), by_budget, actual_nanos)
        cursor.execute(claim, [request_id])
        row = cursor.fetchone()
        released = True
        if row is None:  # reclaimed after expiry: add the spend, release nothing
            cursor.execute(read, [request_id])
            row = cursor.fetchone()
            released = False
            if row is None:
                return []
        amount, counter_ids = int(row[0]), as_json(row[1])
        if not counter_ids:
            return []
        cursor.execute(
            _settle_sql(len(counter_ids)), [actual_nanos, amount if released else 0, *counter_ids]
        )
        return _crossings(cursor.fetchall(), by_budget, actual_nanos)


@lru_cache(maxsize=64)
def _settle_one_sql(rows: int) -> str:
    """PostgreSQL: claim the held reservation and settle its counters in one statement.

    A reservation already reclaimed (expired) releases nothing: the claim CTE
    returns no row and the COALESCE gives 0. The counters are locked in key
    order (see ``_locked_update_sql``).
    """
    _, reservations = _quoted()
    claim = (
        f"WITH claimed AS (UPDATE {reservations} SET state = 'settled' "  # noqa: S608 - identifiers from model metadata
        f"WHERE request_id = %s AND state = 'held' RETURNING amount_nanos) "
    )
    return claim + _locked_update_sql(
        "postgresql",
        rows,
        "spent_nanos = spent_nanos + %s, reserved_nanos = reserved_nanos - "
        "COALESCE((SELECT amount_nanos FROM claimed), 0)",
        "budget_id, subject_id, period_start, spent_nanos",
    )


def settle_after_insert(
    *,
    insert: tuple[str, list],
    request_id: str,
    actual_nanos: int,
    lines: list[BudgetLine],
    counter_ids: list[int],
    tenant_id: int,
    tripped: Crossing | None,
    now: datetime,
) -> list[int]:
    """PostgreSQL: write a row and, if it is new, settle its reservation and record the
    alerts it calls for, in one statement. Returns the ids of the new alerts.

    ``insert`` is an ``INSERT ... ON CONFLICT DO NOTHING`` of the row (the ledger's) and
    its parameters: a row already there settles nothing, exactly as a transaction of
    INSERT then ``budget_settle`` then ``alerts_record`` would. One statement is atomic
    on its own: there is no BEGIN and COMMIT to wait for, and the counters' row locks
    are held while the statement runs, not across round trips to the client. The
    thresholds crossed are found in SQL by the rule of ``crossed``; ``tripped`` (the
    threshold the request was admitted past) gets its alert too, unless its budget is
    gone.
    """
    adapt = connection.ops.adapt_datetimefield_value
    created = adapt(now)
    params = [*insert[1], request_id, actual_nanos, *counter_ids]
    if lines:
        # The thresholds as one JSON parameter: the statement's text and its parameter
        # count stay the same whatever the lines, within what psycopg caches the parsing
        # of (50 parameters); three thresholds a line as parameters were 15 each.
        thresholds = [
            {
                "budget_id": line.budget_id,
                "subject_id": line.subject_id,
                "level": str(level),
                "pct": pct,
                "limit_nanos": line.limit_nanos,
            }
            for line in lines
            for level, pct in line.thresholds
        ]
        params += [tenant_id, created, json.dumps(thresholds), actual_nanos]
    if tripped is not None:
        params += [
            tripped.budget_id,
            tripped.subject_id,
            adapt(tripped.period_start),
            str(tripped.level),
            tripped.spent_nanos + actual_nanos,
            tripped.limit_nanos,
            tenant_id,
            created,
        ]
    sql = _settle_after_insert_sql(insert[0], len(counter_ids), bool(lines), tripped is not None)

    with statement_cursor() as cursor:
        cursor.execute(sql, params)
        (alert_ids,) = cursor.fetchone()
    return sorted(alert_ids or ())


_ALERT_COLUMNS = (
    "tenant_id, budget_id, subject_id, period_start, level, spent_nanos, limit_nanos, "
    "created_at, attempts, last_error"
)


@lru_cache(maxsize=256)
def _settle_after_insert_sql(insert_sql: str, rows: int, lines: bool, tripped: bool) -> str:
    _, reservations = _quoted()
    alerts = connection.ops.quote_name(BudgetAlert._meta.db_table)
    settle = _locked_update_sql(
        "postgresql",
        rows,
        "spent_nanos = spent_nanos + %s, reserved_nanos = reserved_nanos - "
        "COALESCE((SELECT amount_nanos FROM claimed), 0)",
        "budget_id, subject_id, period_start, spent_nanos",
        condition="EXISTS (SELECT 1 FROM ins)",
    )
    sources = []
    if lines:
        # Three thresholds per budget line: (budget, subject, level, percent, limit).
        sources.append(
            "SELECT %s::bigint, t.budget_id, t.subject_id, s.period_start, t.level, "
            "s.spent_nanos, t.limit_nanos::bigint, %s::timestamptz "
            "FROM settled s JOIN jsonb_to_recordset(%s::jsonb) AS t(budget_id bigint, "
            "subject_id bigint, level varchar, pct numeric, limit_nanos numeric) "
            "ON s.budget_id = t.budget_id AND s.subject_id = t.subject_id "
            "WHERE (s.spent_nanos - %s::numeric) * 100 < t.limit_nanos * t.pct "
            "AND t.limit_nanos * t.pct <= s.spent_nanos::numeric * 100"
        )
    if tripped:
        sources.append(
            "SELECT tr.tenant_id, tr.budget_id, tr.subject_id, tr.period_start, tr.level, "
            "tr.spent_nanos, tr.limit_nanos, tr.created_at FROM (VALUES (%s::bigint, "
            "%s::bigint, %s::timestamptz, %s::varchar, %s::bigint, %s::bigint, %s::bigint, "
            "%s::timestamptz)) AS tr(budget_id, subject_id, period_start, level, spent_nanos, "
            "limit_nanos, tenant_id, created_at) "
            "WHERE EXISTS (SELECT 1 FROM settled s WHERE s.budget_id = tr.budget_id)"
        )
    head = (
        f"WITH ins AS ({insert_sql} RETURNING 1), "  # noqa: S608 - identifiers from model metadata
        f"claimed AS (UPDATE {reservations} SET state = 'settled' "
        f"WHERE request_id = %s AND state = 'held' AND EXISTS (SELECT 1 FROM ins) "
        f"RETURNING amount_nanos), "
        f"settled AS ({settle})"
    )
    if not sources:
        return f"{head} SELECT ARRAY(SELECT 1 FROM settled LIMIT 0)"  # noqa: S608
    # One alert per (budget, subject, period, level): the tripped threshold may also be
    # crossed by this spend.
    return (
        f"{head}, alerted AS (INSERT INTO {alerts} ({_ALERT_COLUMNS}) "  # noqa: S608
        f"SELECT *, 0, '' FROM (SELECT DISTINCT ON (budget_id, subject_id, period_start, "
        f"level) * FROM ({' UNION ALL '.join(sources)}) AS c(tenant_id, budget_id, "
        f"subject_id, period_start, level, spent_nanos, limit_nanos, created_at)) AS d "
        f"ORDER BY budget_id, CASE level WHEN 'warn' THEN 0 WHEN 'degrade' THEN 1 ELSE 2 END "
        f"ON CONFLICT DO NOTHING RETURNING id) "
        f"SELECT ARRAY(SELECT id FROM alerted)"
    )


def _crossings(rows, by_budget: dict, actual_nanos: int) -> list[Crossing]:
    """The thresholds that the spend of ``actual_nanos`` moved each counter across."""
    crossings = []
    for budget_id, subject_id, period_start, spent in rows:
        line = by_budget.get((budget_id, subject_id))
        if line is not None:
            crossings += line.crossings(
                int(spent) - actual_nanos, int(spent), as_datetime(period_start)
            )
    return crossings


def budget_release(*, request_id: str, counter_ids: list[int]) -> None:
    """Give a held reservation back untouched (the request was refused after admission)."""
    budget_settle(request_id=request_id, actual_nanos=0, lines=[], counter_ids_hint=counter_ids)


def reservations_reclaim(*, now: datetime) -> int:
    """Release reservations that expired unsettled (their worker died). Returns how many."""
    _, _, expire = _reservation_sql(connection.vendor)
    expired = list(
        BudgetReservation.objects.filter(state="held", expires_at__lt=now).values_list(
            "pk", flat=True
        )[:1000]
    )
    reclaimed = 0
    stamp = connection.ops.adapt_datetimefield_value(now)

    def reclaim(reservation_id: int) -> bool:
        with transaction.atomic(), connection.cursor() as cursor:
            cursor.execute(expire, [reservation_id, stamp])
            row = cursor.fetchone()
            if row is None:
                return False
            amount, counter_ids = int(row[0]), as_json(row[1])
            if counter_ids:
                cursor.execute(_release_sql(len(counter_ids)), [amount, *counter_ids])
            return True

    for reservation_id in expired:
        reclaimed += retry_transient(partial(reclaim, reservation_id))
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
