"""The ledger row, its settlement and its alerts in one statement (PostgreSQL).

Each case runs twice on the same scenario: through ``ledger_write``'s one statement
and through the transaction it replaces (INSERT, ``budget_settle``, ``alerts_record``);
both must leave the same counters, reservation and alerts.
"""

from datetime import timedelta

import pytest
from django.db import connection
from django.utils import timezone

from routing.enforcement import Settlement
from routing.engine.types import Attempt
from routing.models import UsageEvent
from routing.services import LedgerEntry, ledger_write, usage_event_values
from tenants.budgets import BudgetLine, Crossing, budget_admit, crossed, reservations_reclaim
from tenants.enums import BudgetPeriod, BudgetScope
from tenants.models import Budget, BudgetAlert, BudgetCounter, BudgetReservation
from tenants.services import budget_create
from tests.support.services import skip_or_fail

pytestmark = pytest.mark.services

USD = 10**9
BIG = 9_000_000_000_000_000_000  # near the largest bigint


@pytest.fixture(autouse=True)
def postgres(db):
    if connection.vendor != "postgresql":
        skip_or_fail("The one-statement settlement is PostgreSQL's (DATABASE_URL)")


def scenario(tenant, *, limit, actual, spent_before=0, pct=(80, 90, 100), one_statement, **kw):
    budget = budget_create(
        tenant=tenant, scope=BudgetScope.TENANT, period=BudgetPeriod.MONTH, limit_nanos=limit
    )
    line = BudgetLine(budget.pk, budget.scope, budget.period, limit, 0, *pct, "the tenant")
    now = timezone.now()
    request_id = f"req_{budget.pk:032x}"
    admission = budget_admit(
        tenant_id=tenant.pk,
        time_zone="UTC",
        lines=[line],
        request_id=request_id,
        worst_case_nanos=min(actual, limit // 10**6) or 1,
        degraded_worst_case_nanos=1,
        now=now,
        ttl=timedelta(minutes=5),
    )
    assert admission.reservation_key == request_id
    BudgetCounter.objects.filter(budget=budget).update(spent_nanos=spent_before)
    [state] = admission.states
    tripped = None
    if kw.get("tripped"):
        tripped = Crossing(budget.pk, 0, state.period_start, kw["tripped"], spent_before, limit)
    settlement = Settlement(
        tenant.pk,
        request_id,
        # Without counter ids the settlement takes the transaction path.
        (state.counter_id,) if one_statement else (),
        (line,),
        tripped,
    )
    if kw.get("expired"):
        BudgetReservation.objects.filter(request_id=request_id).update(
            expires_at=now - timedelta(seconds=1)
        )
        assert reservations_reclaim(now=now) == 1
    if kw.get("budget_deleted"):
        Budget.objects.filter(pk=budget.pk).delete()
    entry = LedgerEntry(
        tenant_id=tenant.pk,
        token_id=None,
        end_user_id=None,
        request_id=request_id,
        created_at=now,
        requested_model="m",
        model="m",
        attempts=[Attempt("m", "d", "final", "ok", 10, 5, actual)],
    )
    values = usage_event_values(entry)
    ids = ledger_write(values=values, settlement=settlement)
    for _ in range(kw.get("replays", 0)):
        assert ledger_write(values=values, settlement=settlement) == []
    counter = BudgetCounter.objects.filter(budget_id=budget.pk).first()
    alerts = BudgetAlert.objects.filter(budget_id=budget.pk).order_by("id")
    assert sorted(ids) == [a.pk for a in alerts]
    return {
        "rows": UsageEvent.objects.filter(request_id=request_id).count(),
        "counter": counter and (counter.spent_nanos, counter.reserved_nanos),
        "reservation": BudgetReservation.objects.get(request_id=request_id).state,
        "alerts": sorted((a.level, a.spent_nanos, a.limit_nanos, a.period_start) for a in alerts),
    }


CASES = {
    "no threshold crossed": dict(limit=10 * USD, actual=USD),
    "warn crossed": dict(limit=10 * USD, spent_before=7_900_000_000, actual=200_000_000),
    "all three crossed at once": dict(limit=10 * USD, actual=10 * USD),
    "spend landing exactly on warn": dict(limit=10 * USD, spent_before=USD, actual=7 * USD),
    "one nano-dollar short of warn": dict(limit=10 * USD, spent_before=USD, actual=7 * USD - 1),
    "already past every threshold": dict(limit=10 * USD, spent_before=11 * USD, actual=USD),
    "odd thresholds": dict(limit=7, pct=(33, 66, 99), spent_before=2, actual=3),
    "limit near the largest bigint": dict(
        limit=BIG, spent_before=BIG * 8 // 10 - 1, actual=1, pct=(80, 90, 100)
    ),
    "admitted past warn, crossing degrade": dict(
        limit=10 * USD, spent_before=8_500_000_000, actual=USD, tripped="warn"
    ),
    "admitted past warn, crossing warn too": dict(
        limit=10 * USD, spent_before=7_900_000_000, actual=USD, tripped="warn"
    ),
    "replayed three times": dict(limit=10 * USD, actual=9 * USD, replays=3),
    "reservation reclaimed before the settlement": dict(
        limit=10 * USD, actual=9 * USD, expired=True
    ),
    "budget deleted before the settlement": dict(
        limit=10 * USD, actual=9 * USD, tripped="warn", budget_deleted=True
    ),
}


@pytest.mark.parametrize("case", list(CASES))
def test_one_statement_settles_as_the_transaction_does(tenant, case):
    kw = CASES[case]

    one = scenario(tenant, one_statement=True, **kw)
    two = scenario(tenant, one_statement=False, **kw)

    assert one["rows"] == two["rows"] == 1
    assert one == two
    if kw.get("budget_deleted"):
        assert one["counter"] is None and one["alerts"] == []
        return
    spent, reserved = one["counter"]
    assert spent == kw.get("spent_before", 0) + kw["actual"]
    assert reserved == 0
    assert one["reservation"] == ("expired" if kw.get("expired") else "settled")
    expected = [
        level
        for level, pct in zip(
            ("warn", "degrade", "block"), kw.get("pct", (80, 90, 100)), strict=True
        )
        if crossed(kw.get("spent_before", 0), spent, kw["limit"], pct)
    ]
    if kw.get("tripped") and kw["tripped"] not in expected:
        expected.insert(0, kw["tripped"])
    assert sorted(level for level, *_ in one["alerts"]) == sorted(expected)


def test_threshold_rule_is_exact_where_floats_are_not():
    # 80 % of a limit near the largest bigint: a float rounds it, integers do not.
    warn = BIG * 80 // 100
    assert crossed(warn - 1, warn, BIG, 80)
    assert not crossed(warn - 2, warn - 1, BIG, 80)
    assert not crossed(warn, warn + 1, BIG, 80)


def test_a_settlement_of_a_row_written_before_settles_nothing(tenant):
    kw = CASES["warn crossed"]
    first = scenario(tenant, one_statement=True, replays=2, **kw)

    assert first["counter"] == (8_100_000_000, 0)
    assert [level for level, *_ in first["alerts"]] == ["warn"]


# psycopg parses a statement's placeholders once and caches the result only for
# statements of at most 4,096 bytes and 50 parameters (psycopg._queries); past that it
# parses the text again on every execution, a tenth of the gateway's CPU with budgets.
PSYCOPG_CACHED_BYTES, PSYCOPG_CACHED_PARAMS = 4096, 50


@pytest.mark.parametrize("budgets", [1, 3, 6])
def test_settlement_with_several_budgets_crosses_each_on_its_own(tenant, budgets):
    lines = []
    now = timezone.now()
    for limit in (10 * USD, 2 * USD, 100 * USD, 50 * USD, 20 * USD, 30 * USD)[:budgets]:
        budget = budget_create(
            tenant=tenant, scope=BudgetScope.TENANT, period=BudgetPeriod.MONTH, limit_nanos=limit
        )
        lines.append(BudgetLine(budget.pk, budget.scope, budget.period, limit, 0, 80, 90, 100, ""))
    admission = budget_admit(
        tenant_id=tenant.pk,
        time_zone="UTC",
        lines=lines,
        request_id="req_several",
        worst_case_nanos=USD,
        degraded_worst_case_nanos=1,
        now=now,
        ttl=timedelta(minutes=5),
    )
    states = admission.states
    settlement = Settlement(
        tenant.pk, "req_several", tuple(s.counter_id for s in states), tuple(lines)
    )
    entry = LedgerEntry(
        tenant_id=tenant.pk,
        token_id=None,
        end_user_id=None,
        request_id="req_several",
        created_at=now,
        requested_model="m",
        attempts=[Attempt("m", "d", "final", "ok", 1, 1, 1_700_000_000)],
    )

    sent: list[tuple[str, int]] = []

    def capture(execute, sql, params, many, context):
        sent.append((sql, len(params or ())))
        return execute(sql, params, many, context)

    with connection.execute_wrapper(capture):
        ids = ledger_write(values=usage_event_values(entry), settlement=settlement)

    alerts = {(a.budget_id, a.level) for a in BudgetAlert.objects.filter(pk__in=ids)}
    # 1.7 $ is 17 % of 10 $, 85 % of 2 $ (warn), 1.7 % of 100 $ and of the others.
    expected = {(lines[1].budget_id, "warn")} if budgets > 1 else set()
    assert alerts == expected
    assert (
        sorted(BudgetCounter.objects.values_list("spent_nanos", "reserved_nanos"))
        == [(1_700_000_000, 0)] * budgets
    )
    [(sql, params)] = sent  # the row, the settlement and the alerts: one statement
    assert len(sql.encode()) <= PSYCOPG_CACHED_BYTES
    assert params <= PSYCOPG_CACHED_PARAMS
