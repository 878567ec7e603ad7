"""bench/ledger_scale.py's ledger rows: what its COPY writes is what the gateway wrote, re-homed."""

import random
import re
import sys
from collections import Counter
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from django.db import connection

from routing.enums import UsageKind
from routing.models import UsageEvent
from tests.factories import TenantFactory, UsageEventFactory
from tests.support.services import skip_or_fail

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "bench"))
import ledger_scale

# A reason with what COPY's text format must escape: a tab, a newline, a backslash.
CHECK = {
    "probability": 0.0598,
    "threshold": 0.6,
    "accepted": False,
    "features": {"lp_mean": -0.9598, "complexity": 0.715},
    "contributions": {"lp_mean": -2.3995},
    "reasons": ["p(acceptable)=0.060 < threshold 0.600\tcode\nline \\ two", "ünïcode"],
    "hard_fail": None,
    "paid": [],
}
ATTEMPTS = [
    {"model": "demo/small", "role": "draft", "status": "ok", "cost_nanos": 37350, "check": CHECK},
    {"model": "demo/large", "role": "final", "status": "ok", "cost_nanos": 1810000},
]


@pytest.fixture
def templates(db):
    if connection.vendor != "postgresql":
        skip_or_fail("the ledger bench writes with PostgreSQL's COPY")
    demo = TenantFactory(slug="demo")
    UsageEventFactory(
        tenant=demo,
        model="demo/large",
        models_called=["demo/small", "demo/large"],
        attempts=ATTEMPTS,
        cost_nanos=1847350,
        baseline_cost_nanos=1810000,
        escalated=True,
        profile="cascade/balanced",
        domain="code",
        complexity=0.715,
        quality_score=0.42,
    )
    UsageEventFactory(tenant=demo, audit=True, attempts=ATTEMPTS[1:], cost_nanos=1810000)
    return demo


def test_generated_rows_are_template_rows_with_their_own_tenant_time_and_request_id(templates):
    bench = ledger_scale.Bench()
    ledger_scale.tenants_create(bench)
    columns = ledger_scale.copy_columns()
    lines = ledger_scale.template_lines(columns)
    start = datetime(2026, 8, 1, tzinfo=UTC)
    hours = ledger_scale.hour_counts(start, start + timedelta(days=90), 400)

    seconds = ledger_scale.copy_rows(
        ledger_scale.rows(bench, lines, hours, random.Random(1)), columns, 400, "test"
    )

    assert seconds > 0
    assert sum(n for _, n in hours) == 400
    assert sum(n for _, n in hours[-240:]) > 4 * sum(n for _, n in hours[:240])  # it grows
    rows = list(UsageEvent.objects.exclude(tenant=templates).order_by("id"))
    assert len(rows) == 400
    assert [r.created_at for r in rows] == sorted(r.created_at for r in rows)
    assert all(start <= r.created_at < start + timedelta(days=90) for r in rows)
    per_tenant = Counter(r.tenant_id for r in rows)
    assert per_tenant.most_common(1)[0][0] == bench.big["pk"]
    assert set(per_tenant) <= {t["pk"] for t in bench.tenants}
    for row in rows:
        if row.kind == UsageKind.AUDIT:
            assert row.attempts == ATTEMPTS[1:]
            assert (row.token_id, row.end_user_id) == (None, None)
            assert re.fullmatch(r"audit_[0-9a-f]{32}", row.request_id)
        else:
            assert row.attempts == ATTEMPTS
            assert (row.cost_nanos, row.models_called) == (1847350, ["demo/small", "demo/large"])
            assert row.token.tenant_id == row.tenant_id
            assert row.end_user is None or row.end_user.tenant_id == row.tenant_id
            assert re.fullmatch(r"req_[0-9a-f]{32}", row.request_id)
