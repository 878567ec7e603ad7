"""One definition of usage figures: the usage API, the CSV export and the dashboard's
rollups agree on the same ledger rows (audits are spend, never requests)."""

import csv
import io
from datetime import UTC, datetime, timedelta

import pytest

from billing.exports import grouped_rows
from dashboard.rollups import hourly_rows
from routing.enums import UsageStatus
from tests.factories import ApiTokenFactory, UsageEventFactory

pytestmark = pytest.mark.django_db

HOUR = datetime(2026, 11, 2, 10, tzinfo=UTC)


@pytest.fixture
def ledger(tenant, other_tenant):
    at = HOUR + timedelta(minutes=5)
    UsageEventFactory(tenant=tenant, created_at=at, cost_nanos=100, baseline_cost_nanos=1_000)
    UsageEventFactory(
        tenant=tenant, created_at=at, cost_nanos=1_200, baseline_cost_nanos=1_000, escalated=True
    )
    UsageEventFactory(
        tenant=tenant,
        created_at=at,
        model="",
        cost_nanos=0,
        baseline_cost_nanos=0,
        status=UsageStatus.UPSTREAM_ERROR,
        http_status=502,
    )
    UsageEventFactory(tenant=tenant, created_at=at, audit=True, cost_nanos=300)
    UsageEventFactory(tenant=tenant, created_at=at, audit=True, cost_nanos=50, escalated=False)
    # Another tenant's rows count nowhere here.
    UsageEventFactory.create_batch(4, tenant=other_tenant, created_at=at, cost_nanos=7_777)
    return {"requests": 3, "escalated": 1, "spend": 1_650, "audits": 350, "baseline": 2_000}


def test_api_export_and_rollups_agree_on_requests_spend_and_the_net_saving(client, tenant, ledger):
    token = ApiTokenFactory(tenant=tenant)
    api = client.get(
        "/api/v1/usage/summary/",
        {"bucket": "day", "by": "none", "start": "2026-11-02", "end": "2026-11-03"},
        HTTP_AUTHORIZATION=f"Bearer {token.raw}",
    )
    assert api.status_code == 200, api.content
    (day,) = api.json()["data"]
    exported = list(
        csv.DictReader(
            io.StringIO(
                "".join(
                    grouped_rows(
                        tenant_id=tenant.pk,
                        start=HOUR - timedelta(hours=10),
                        end=HOUR + timedelta(hours=10),
                        group_by="day",
                    )
                )
            )
        )
    )
    (row,) = exported
    rollup = hourly_rows(tenant.pk, HOUR, HOUR + timedelta(hours=1))

    assert day["requests"] == int(row["requests"]) == sum(r.requests for r in rollup) == 3
    assert day["escalated"] == int(row["escalated"]) == sum(r.escalated for r in rollup) == 1
    spend = ledger["spend"]
    assert day["cost_nanos"] + day["audit_cost_nanos"] == spend == sum(r.cost_nanos for r in rollup)
    assert day["audit_cost_nanos"] == ledger["audits"]
    saving = ledger["baseline"] - spend  # net of audits, everywhere
    assert day["saved_nanos"] == saving
    assert row["savings_usd"] == f"{saving / 1e9:.9f}"
    assert sum(r.baseline_cost_nanos - r.cost_nanos for r in rollup) == saving
