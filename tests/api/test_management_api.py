"""The management API: scopes, happy paths, pagination, filters, CSV export."""

import csv
import io
from datetime import UTC, datetime, timedelta
from decimal import Decimal

import pytest
from rest_framework.test import APIClient

from routing.models import RoutingProfile, UsageEvent
from tenants.enums import Scope
from tenants.models import Budget, EndUser, EndUserTier
from tenants.services import token_create
from tests.factories import UsageEventFactory

pytestmark = pytest.mark.django_db


def api(raw):
    client = APIClient()
    client.credentials(HTTP_AUTHORIZATION=f"Bearer {raw}")
    return client


def test_missing_or_bad_token_is_401_with_a_stable_code(client):
    response = APIClient().get("/api/v1/budgets/")
    assert response.status_code in (401, 403)
    response = api("cf_nope").get("/api/v1/budgets/")
    assert response.status_code == 401
    assert response.json()["error"]["code"] == "invalid_api_key"


def test_token_without_budgets_write_gets_403(tenant):
    reader = token_create(tenant=tenant, name="ro", scopes=[Scope.USAGE_READ])

    assert api(reader.raw).get("/api/v1/budgets/").status_code == 200
    response = api(reader.raw).post(
        "/api/v1/budgets/", {"scope": "tenant", "period": "month", "limit_nanos": 5}, format="json"
    )

    assert response.status_code == 403
    assert response.json()["error"]["code"] == "insufficient_scope"


def test_tokens_create_list_revoke(api_token, tenant):
    client = api(api_token.raw)

    created = client.post(
        "/api/v1/tokens/", {"name": "ci", "scopes": ["usage:read"]}, format="json"
    )
    assert created.status_code == 201
    raw = created.json()["token"]
    assert raw.startswith("cf_")
    listed = client.get("/api/v1/tokens/").json()["data"]
    assert {t["name"] for t in listed} == {"test", "ci"}
    assert all("token" not in t and "token_hash" not in t for t in listed)

    revoked = client.post(f"/api/v1/tokens/{created.json()['id']}/revoke/")
    assert revoked.json()["revoked_at"] is not None
    assert api(raw).get("/api/v1/usage/").status_code == 401


def test_budgets_crud_and_validation(api_token, tenant):
    client = api(api_token.raw)
    alice = EndUser.objects.create(tenant=tenant, external_id="alice")

    created = client.post(
        "/api/v1/budgets/",
        {
            "scope": "end_user",
            "period": "day",
            "limit_nanos": 2 * 10**9,
            "end_user": alice.pk,
            "warn_pct": 50,
        },
        format="json",
    )
    assert created.status_code == 201
    assert created.json()["limit_usd"] == "2"
    budget_id = created.json()["id"]
    assert (
        client.patch(f"/api/v1/budgets/{budget_id}/", {"limit_nanos": 10**9}, format="json").json()[
            "limit_nanos"
        ]
        == 10**9
    )
    bad = client.post(
        "/api/v1/budgets/", {"scope": "token", "period": "week", "limit_nanos": -1}, format="json"
    )
    assert bad.status_code == 400
    assert bad.json()["error"]["code"] == "invalid_request"
    assert client.delete(f"/api/v1/budgets/{budget_id}/").status_code == 204
    assert not Budget.objects.filter(pk=budget_id).exists()


def test_a_budget_is_set_in_dollars_as_get_returns_them(api_token, tenant):
    client = api(api_token.raw)

    created = client.post(
        "/api/v1/budgets/",
        {"scope": "tenant", "period": "month", "limit_usd": "12.5"},
        format="json",
    )
    assert created.status_code == 201, created.json()
    assert (created.json()["limit_nanos"], created.json()["limit_usd"]) == (12_500_000_000, "12.5")
    budget_id = created.json()["id"]

    # What GET returns can be sent back as it is.
    again = client.post(
        "/api/v1/budgets/",
        {"scope": "tenant", "period": "day", "limit_usd": created.json()["limit_usd"]},
        format="json",
    )
    assert again.json()["limit_nanos"] == 12_500_000_000
    patched = client.patch(
        f"/api/v1/budgets/{budget_id}/", {"limit_usd": "0.000000001"}, format="json"
    )
    assert patched.json()["limit_nanos"] == 1


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({"limit_usd": "1", "limit_nanos": 10**9}, "limit_usd"),
        ({}, "limit_usd"),
        ({"limit_usd": "0.0000000001"}, "limit_usd"),  # finer than a nano-dollar
        ({"limit_usd": "-1"}, "limit_usd"),
        ({"limit_usd": "ten"}, "limit_usd"),
        ({"limit_usd": "1e30"}, "limit_usd"),
    ],
)
def test_a_budget_limit_is_one_valid_amount(api_token, tenant, body, field):
    response = api(api_token.raw).post(
        "/api/v1/budgets/", {"scope": "tenant", "period": "month", **body}, format="json"
    )

    assert response.status_code == 400
    assert field in response.json()["error"]["detail"]
    assert not Budget.objects.filter(tenant=tenant).exists()


def test_each_budget_shows_where_it_stands_this_period(api_token, tenant):
    from django.utils import timezone

    from tenants.budgets import period_bounds
    from tenants.models import BudgetCounter

    now = timezone.now()
    month = Budget.objects.create(
        tenant=tenant, scope="tenant", period="month", limit_nanos=2 * 10**9
    )
    start, end = period_bounds("month", now, tenant.time_zone)
    BudgetCounter.objects.create(
        tenant=tenant, budget=month, period_start=start, period_end=end,
        spent_nanos=1_500_000_000, reserved_nanos=100_000_000,
    )  # fmt: skip
    # A counter of last month does not count.
    BudgetCounter.objects.create(
        tenant=tenant, budget=month, period_start=start - timedelta(days=40),
        period_end=start - timedelta(days=10), spent_nanos=7 * 10**9,
    )  # fmt: skip
    free = EndUserTier.objects.create(tenant=tenant, slug="free", name="Free", warn_pct=50)
    ana, bo = (EndUser.objects.create(tenant=tenant, external_id=n, tier=free) for n in "ab")
    per_user = Budget.objects.create(
        tenant=tenant, scope="tier", tier=free, period="lifetime", limit_nanos=10**9
    )
    for user, spent in ((ana, 100_000_000), (bo, 600_000_000)):
        BudgetCounter.objects.create(
            tenant=tenant, budget=per_user, subject_id=user.pk,
            period_start=period_bounds("lifetime", now, "UTC")[0], spent_nanos=spent,
        )  # fmt: skip

    rows = {b["id"]: b for b in api(api_token.raw).get("/api/v1/budgets/").json()["data"]}

    monthly = rows[month.pk]
    assert (monthly["spent_nanos"], monthly["reserved_nanos"]) == (1_500_000_000, 100_000_000)
    assert (monthly["spent_usd"], monthly["reserved_usd"]) == ("1.5", "0.1")
    assert (monthly["remaining_nanos"], monthly["remaining_usd"]) == (400_000_000, "0.4")
    assert monthly["resets_at"] == end.isoformat().replace("+00:00", "Z")
    assert monthly["period_start"] == start.isoformat().replace("+00:00", "Z")
    assert (monthly["thresholds_pct"], monthly["state"]) == ([80, 90, 100], "ok")
    assert monthly["counted_per_end_user"] is False and monthly["end_user_counted"] is None
    tier = rows[per_user.pk]
    assert tier["resets_at"] is None  # a lifetime budget never resets
    assert tier["counted_per_end_user"] is True and tier["end_user_counted"] == bo.pk
    assert (tier["spent_nanos"], tier["thresholds_pct"]) == (600_000_000, [50, 90, 100])
    assert tier["state"] == "warn"
    detail = api(api_token.raw).get(f"/api/v1/budgets/{month.pk}/").json()
    assert detail["spent_nanos"] == 1_500_000_000


def test_a_token_used_only_on_the_management_api_records_its_last_use(tenant, settings):
    from tenants.models import ApiToken

    settings.CASCADEFLOW_TOKEN_TOUCH_SECONDS = 60
    issued = token_create(tenant=tenant, name="ops", scopes=[Scope.USAGE_READ])
    assert issued.token.last_used_at is None

    assert api(issued.raw).get("/api/v1/budgets/").status_code == 200
    first = ApiToken.objects.get(pk=issued.token.pk).last_used_at
    assert api(issued.raw).get("/api/v1/usage/").status_code == 200

    assert first is not None
    assert ApiToken.objects.get(pk=issued.token.pk).last_used_at == first  # once per window
    assert api("cf_unknown").get("/api/v1/budgets/").status_code == 401


def test_end_user_tier_and_profiles(api_token, tenant):
    client = api(api_token.raw)
    tier = EndUserTier.objects.create(tenant=tenant, slug="pro", name="Pro")
    bob = EndUser.objects.create(tenant=tenant, external_id="bob")

    assert (
        client.patch(f"/api/v1/end-users/{bob.pk}/", {"tier": tier.pk}, format="json").json()[
            "tier"
        ]
        == tier.pk
    )
    created = client.post(
        "/api/v1/profiles/",
        {"name": "support", "preset": "balanced", "chain": ["demo/small", "demo/large"]},
        format="json",
    )
    assert created.status_code == 201
    bad = client.post("/api/v1/profiles/", {"name": "x", "chain": ["nope/model"]}, format="json")
    assert bad.status_code == 400
    assert RoutingProfile.objects.filter(tenant=tenant).count() == 1


def ledger(tenant, n=5, **extra):
    base = datetime(2026, 11, 20, 12, 0, tzinfo=UTC)
    for i in range(n):
        UsageEventFactory(
            tenant=tenant,
            request_id=f"req_{tenant.slug}_{i}_{extra.get('requested_model', 'm')}",
            created_at=base + timedelta(minutes=i),
            requested_model=extra.get("requested_model", "demo/small"),
            model=extra.get("model", "demo/small"),
            models_called=["demo/small"],
            cost_nanos=1_234_567 + i,
            baseline_cost_nanos=9_000_001,
            completion_tokens=5,
        )


def test_usage_is_cursor_paginated_and_filtered(api_token, tenant):
    ledger(tenant, n=7)
    ledger(tenant, n=2, requested_model="demo/large", model="demo/large")
    client = api(api_token.raw)

    page = client.get("/api/v1/usage/?limit=4").json()
    assert len(page["results"]) == 4 and page["next"]
    ids = [r["id"] for r in page["results"]]
    while page["next"]:
        page = client.get(page["next"]).json()
        ids += [r["id"] for r in page["results"]]
    assert len(ids) == len(set(ids)) == 9
    assert ids == sorted(ids, reverse=True)  # newest first
    large = client.get("/api/v1/usage/?model=demo/large").json()["results"]
    assert {r["model"] for r in large} == {"demo/large"}


def test_csv_header_and_row_round_trip_to_the_nano_dollar(api_token, tenant):
    ledger(tenant, n=3)

    response = api(api_token.raw).get("/api/v1/usage/export.csv?start=2026-11-20&end=2026-11-20")

    assert response.status_code == 200
    text = b"".join(response.streaming_content).decode()
    rows = list(csv.reader(io.StringIO(text)))
    assert rows[0] == [
        "timestamp_utc",
        "request_id",
        "end_user",
        "token",
        "profile",
        "requested_model",
        "models_called",
        "escalated",
        "prompt_tokens",
        "completion_tokens",
        "cost_usd",
        "baseline_cost_usd",
        "savings_usd",
        "status",
    ]
    assert len(rows) == 4
    event = UsageEvent.objects.get(request_id=rows[1][1])
    assert Decimal(rows[1][10]) * 10**9 == event.cost_nanos
    assert Decimal(rows[1][12]) * 10**9 == event.baseline_cost_nanos - event.cost_nanos
    assert text.count("\r\n") == 4  # RFC 4180 line endings


def test_csv_neutralises_formula_injection(api_token, tenant):
    alice = EndUser.objects.create(tenant=tenant, external_id='=HYPERLINK("http://evil")')
    UsageEventFactory(
        tenant=tenant,
        end_user=alice,
        request_id="req_evil",
        requested_model="@SUM(A1)",
        created_at=datetime(2026, 11, 20, tzinfo=UTC),
    )

    response = api(api_token.raw).get("/api/v1/usage/export.csv?start=2026-11-20&end=2026-11-21")
    [_, row] = list(csv.reader(io.StringIO(b"".join(response.streaming_content).decode())))

    assert row[2].startswith("'=")
    assert row[5].startswith("'@")


def test_focus_format_uses_focus_column_names(api_token, tenant):
    ledger(tenant, n=1)

    response = api(api_token.raw).get(
        "/api/v1/usage/export.csv?start=2026-11-20&end=2026-11-20&format=focus"
    )
    header = next(csv.reader(io.StringIO(b"".join(response.streaming_content).decode())))

    assert {
        "BilledCost",
        "EffectiveCost",
        "ChargePeriodStart",
        "ChargePeriodEnd",
        "ServiceName",
        "ResourceId",
    } <= set(header)


def test_schema_is_served(api_token):
    response = APIClient().get("/api/v1/schema/")
    assert response.status_code == 200
    assert b"/api/v1/budgets/" in response.content


def test_usage_summary_labels_the_rows_without_a_key(api_token, tenant):
    ledger(tenant, n=2)
    ledger(tenant, n=1, requested_model="refused", model="")

    body = api(api_token.raw).get("/api/v1/usage/summary/?by=model").json()
    by_profile = api(api_token.raw).get("/api/v1/usage/summary/?by=profile").json()

    labels = {r["key"]: r["label"] for r in body["data"]}
    assert labels == {
        "demo/small": "demo/small",
        "": "(no answering model: refused or failed requests, audits)",
    }
    assert [r["label"] for r in by_profile["data"]] == ["(no profile: models called directly)"]


def test_usage_summary_by_day_and_model(api_token, tenant):
    ledger(tenant, n=3)
    ledger(tenant, n=2, requested_model="demo/large", model="demo/large")

    body = api(api_token.raw).get("/api/v1/usage/summary/?bucket=day&by=model").json()

    rows = {r["key"]: r for r in body["data"]}
    assert rows["demo/small"]["requests"] == 3
    assert rows["demo/small"]["cost_nanos"] == sum(1_234_567 + i for i in range(3))
    assert rows["demo/large"]["requests"] == 2
    assert api(api_token.raw).get("/api/v1/usage/summary/?bucket=week").status_code == 400


def test_async_export_reports_progress_and_its_link_expires(
    api_token, tenant, settings, tmp_path, django_capture_on_commit_callbacks
):
    settings.VAR_DIR = tmp_path
    ledger(tenant, n=4)
    client = api(api_token.raw)

    with django_capture_on_commit_callbacks(execute=True):
        created = client.post(
            "/api/v1/usage/exports/", {"start": "2026-11-20", "end": "2026-11-20"}, format="json"
        )
    assert created.status_code == 202
    job = client.get(f"/api/v1/usage/exports/{created.json()['id']}/").json()
    assert job["status"] == "done"  # the Celery task ran (eagerly in tests) after the commit
    assert (job["total_rows"], job["rows_written"]) == (4, 4)
    download = APIClient().get(job["download_url"])  # the signed link is the credential
    assert download.status_code == 200
    assert len(list(csv.reader(io.StringIO(b"".join(download.streaming_content).decode())))) == 5

    tampered = job["download_url"].replace("token=", "token=x")
    assert APIClient().get(tampered).status_code == 404
    settings.CASCADEFLOW_EXPORT_LINK_SECONDS = -1
    expired = APIClient().get(job["download_url"])
    assert expired.status_code == 410
    assert expired.json()["error"]["code"] == "link_expired"


def test_export_over_the_threshold_becomes_a_job(api_token, tenant, settings, tmp_path):
    settings.VAR_DIR = tmp_path
    settings.CASCADEFLOW_EXPORT_SYNC_MAX_ROWS = 2
    ledger(tenant, n=3)

    response = api(api_token.raw).get("/api/v1/usage/export.csv?start=2026-11-20&end=2026-11-20")

    assert response.status_code == 202
    assert response.json()["status"] in {"queued", "done"}


def test_grouped_export_sums_to_the_ledger(api_token, tenant):
    ledger(tenant, n=3)
    ledger(tenant, n=2, requested_model="demo/large", model="demo/large")

    response = api(api_token.raw).get(
        "/api/v1/usage/export.csv?start=2026-11-20&end=2026-11-20&group_by=model"
    )
    header, *rows = list(csv.reader(io.StringIO(b"".join(response.streaming_content).decode())))

    assert header[:3] == ["group", "key", "requests"]
    by_key = {r[1]: r for r in rows}
    assert by_key["demo/small"][2] == "3" and by_key["demo/large"][2] == "2"
    total = sum(Decimal(r[6]) for r in rows) * 10**9
    assert total == sum(
        UsageEvent.objects.filter(tenant=tenant).values_list("cost_nanos", flat=True)
    )
    bad = api(api_token.raw).get(
        "/api/v1/usage/export.csv?start=2026-11-20&end=2026-11-20&group_by=week"
    )
    assert bad.status_code == 400


def test_usage_filters_by_time_end_user_and_token_and_lists_alerts(api_token, tenant):
    from tenants.models import BudgetAlert

    ledger(tenant, n=4)
    alice = EndUser.objects.create(tenant=tenant, external_id="alice")
    UsageEvent.objects.filter(request_id=f"req_{tenant.slug}_0_m").update(
        end_user=alice, token=api_token.token
    )
    budget = Budget.objects.create(tenant=tenant, scope="tenant", period="month", limit_nanos=10)
    BudgetAlert.objects.create(
        tenant=tenant,
        budget=budget,
        period_start=datetime(2026, 11, 1, tzinfo=UTC),
        level="warn",
        spent_nanos=8,
        limit_nanos=10,
    )
    client = api(api_token.raw)

    assert len(client.get("/api/v1/usage/?end_user=alice").json()["results"]) == 1
    assert len(client.get(f"/api/v1/usage/?token={api_token.token.pk}").json()["results"]) == 1
    window = client.get(
        "/api/v1/usage/?start=2026-11-20T12:01:00%2B00:00&end=2026-11-20T12:03:00%2B00:00"
    )
    assert len(window.json()["results"]) == 2
    assert client.get("/api/v1/usage/?start=yesterday").status_code == 400
    [alert] = client.get("/api/v1/alerts/").json()["data"]
    assert (alert["level"], alert["spent_nanos"]) == ("warn", 8)


def test_plan_budgets_cannot_be_edited_or_deleted_and_thresholds_stay_ordered(api_token, tenant):
    from tenants.models import Budget

    plan = Budget.objects.create(
        tenant=tenant, scope="tenant", period="month", limit_nanos=10**9, from_plan=True
    )
    own = Budget.objects.create(
        tenant=tenant, scope="tenant", period="day", limit_nanos=10**8, warn_pct=50, block_pct=100
    )
    client = api(api_token.raw)

    lifted = client.patch(f"/api/v1/budgets/{plan.pk}/", {"limit_nanos": 10**12}, format="json")
    deleted = client.delete(f"/api/v1/budgets/{plan.pk}/")
    unordered = client.patch(f"/api/v1/budgets/{own.pk}/", {"warn_pct": 150}, format="json")

    assert lifted.status_code == 403 and deleted.status_code == 403
    assert lifted.json()["error"]["message"].startswith("This budget comes with the plan")
    assert unordered.status_code == 400
    plan.refresh_from_db()
    own.refresh_from_db()
    assert plan.limit_nanos == 10**9 and own.warn_pct == 50
