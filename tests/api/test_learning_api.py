"""Management API: profiles' quality and calibrations, audits, savings net of audits."""

from datetime import UTC, datetime

import pytest
from rest_framework.test import APIClient

from routing.engine.learning import Verdict
from routing.models import Audit, CalibrationVersion, RoutingProfile
from routing.targets import chain_key
from tenants.enums import Scope
from tenants.models import AuditEvent
from tenants.services import token_create
from tests.factories import UsageEventFactory
from tests.routing.learning_fixtures import accepting_version, store_observations

pytestmark = pytest.mark.django_db
DEMO = ["demo/small", "demo/medium", "demo/large"]
BALANCED = "cascade/balanced"
DAY = datetime(2026, 11, 20, 12, tzinfo=UTC)


def client_for(tenant, *scopes) -> APIClient:
    client = APIClient()
    extra = {"scopes": list(scopes)} if scopes else {}
    raw = token_create(tenant=tenant, name="api", **extra).raw
    client.credentials(HTTP_AUTHORIZATION=f"Bearer {raw}")
    return client


@pytest.fixture
def api(tenant):
    return client_for(tenant)


def ledger(tenant, request_id, *, kind="request", cost=0, baseline=0, **values):
    return UsageEventFactory(
        tenant=tenant,
        request_id=request_id,
        created_at=values.pop("created_at", DAY),
        requested_model=values.pop("profile", BALANCED),
        profile=BALANCED,
        kind=kind,
        cost_nanos=cost,
        baseline_cost_nanos=baseline,
        **values,
    )


def served_audit(tenant, request_id, *, domain, served, loss, cost, version=None):
    return Audit.objects.create(
        tenant=tenant,
        request_id=request_id,
        profile=BALANCED,
        created_at=DAY,
        status="done",
        chain=DEMO,
        chain_key=chain_key(DEMO),
        reference_model="demo/large",
        domain=domain,
        served_model=served,
        served_loss=loss,
        cost_nanos=cost,
        calibration_version=version,
        payload={},
    )


# --- quality ----------------------------------------------------------------------------------


def test_quality_of_a_preset(api, tenant):
    for i in range(3):
        ledger(tenant, f"req_m{i}", domain="math", model="demo/small", quality_score=0.8)
    ledger(tenant, "req_c", domain="code", model="demo/large")
    served_audit(tenant, "req_m0", domain="math", served="demo/small", loss=1.0, cost=300)
    served_audit(tenant, "req_m1", domain="math", served="demo/small", loss=0.0, cost=200)
    served_audit(tenant, "req_c", domain="code", served="demo/large", loss=0.0, cost=0)
    ledger(tenant, "audit_1", kind="audit", cost=500)

    response = api.get("/api/v1/profiles/balanced/quality/?start=2026-11-01&end=2026-12-01")

    assert response.status_code == 200, response.content
    data = response.json()
    assert data["profile"] == BALANCED
    assert data["learning"] == {
        "audits_enabled": True,
        "uniform_labels": 0,
        "nonuniform_labels": 0,
        "active_version": None,
        "cold_start": True,
        "last_refit_at": None,
        "target_retention": 0.95,
    }
    overall = data["overall"]
    assert (overall["requests"], overall["audits"], overall["audit_cost_nanos"]) == (4, 3, 500)
    assert overall["engine_estimate"] == pytest.approx((0.8 * 3 + 1) / 4)
    measured = overall["measured_retention"]
    assert measured["n"] == 3 and measured["retention"] == pytest.approx(2 / 3)
    assert measured["lower"] <= measured["retention"] <= measured["upper"]
    by_domain = {row["key"]: row for row in data["by_domain"]}
    assert set(by_domain) == {"math", "code"}
    assert (by_domain["math"]["requests"], by_domain["math"]["audits"]) == (3, 2)
    assert by_domain["math"]["audit_cost_nanos"] == 500
    assert by_domain["math"]["measured_retention"]["retention"] == 0.5
    assert by_domain["code"]["measured_retention"]["retention"] == 1.0
    by_model = {row["key"]: row for row in data["by_draft_model"]}
    assert by_model["demo/small"]["engine_estimate"] == 0.8
    assert by_model["demo/large"]["measured_retention"]["n"] == 1


@pytest.mark.parametrize("path", ["balanced", "cascade/balanced"])
def test_a_profile_is_named_with_or_without_its_prefix(api, path):
    response = api.get(f"/api/v1/profiles/{path}/quality/")

    assert response.status_code == 200
    assert response.json()["overall"]["measured_retention"] is None  # nothing audited yet


def test_quality_of_a_tenant_profile_and_its_settings(api, tenant):
    RoutingProfile.objects.create(tenant=tenant, name="support", chain=DEMO, audits_enabled=False)

    data = api.get("/api/v1/profiles/support/quality/").json()

    assert data["profile"] == "cascade/support"
    assert data["learning"]["audits_enabled"] is False


@pytest.mark.parametrize(
    "url",
    [
        "/api/v1/profiles/nope/quality/",
        "/api/v1/profiles/nope/calibrations/",
        "/api/v1/profiles/theirs/quality/",
        "/api/v1/profiles/theirs/calibrations/",
        "/api/v1/profiles/theirs/calibrations/1/rollback/",
        "/api/v1/profiles/balanced/calibrations/1/rollback/",
    ],
)
def test_unknown_profiles_and_versions_are_404(api, other_tenant, url):
    RoutingProfile.objects.create(tenant=other_tenant, name="theirs", chain=DEMO)
    accepting_version(other_tenant, profile="cascade/theirs", chain=DEMO)
    accepting_version(other_tenant, profile=BALANCED, chain=DEMO)

    response = api.post(url) if url.endswith("rollback/") else api.get(url)

    assert response.status_code == 404
    assert response.json()["error"]["code"] == "not_found"


# --- calibrations -----------------------------------------------------------------------------


def test_calibrations_are_listed_newest_first_with_their_evidence(api, tenant, other_tenant):
    accepting_version(tenant, profile=BALANCED, chain=DEMO, number=1)
    CalibrationVersion.objects.create(
        tenant=tenant,
        profile=BALANCED,
        version=2,
        chain=DEMO,
        evidence={"reason": "no permissive policy met the bound yet", "score_reference": [0.5]},
    )
    accepting_version(other_tenant, profile=BALANCED, chain=DEMO, number=7)

    response = api.get("/api/v1/profiles/balanced/calibrations/")

    assert response.status_code == 200
    rows = response.json()["results"]
    assert [(r["version"], r["certified"], r["active"]) for r in rows] == [
        (2, False, False),
        (1, True, True),
    ]
    assert rows[0]["evidence"] == {
        "reason": "no permissive policy met the bound yet",
        "score_reference_size": 1,
    }


def test_rollback(api, tenant):
    accepting_version(tenant, profile=BALANCED, chain=DEMO, number=1)
    accepting_version(tenant, profile=BALANCED, chain=DEMO, number=2)

    response = api.post("/api/v1/profiles/balanced/calibrations/1/rollback/")

    assert response.status_code == 200, response.content
    assert (response.json()["version"], response.json()["active"]) == (1, True)
    assert CalibrationVersion.objects.get(active=True).version == 1
    assert AuditEvent.objects.filter(action="calibration.rollback").count() == 1


def test_rollback_to_an_uncertified_version_is_refused(api, tenant):
    CalibrationVersion.objects.create(tenant=tenant, profile=BALANCED, version=1, chain=DEMO)

    response = api.post("/api/v1/profiles/balanced/calibrations/1/rollback/")

    assert response.status_code == 400
    assert response.json()["error"]["code"] == "not_certified"


@pytest.mark.parametrize(
    ("scopes", "read", "write"),
    [
        ([Scope.USAGE_READ], 200, 403),
        ([Scope.ROUTING_WRITE], 403, 200),
        ([Scope.COMPLETIONS], 403, 403),
        ([Scope.ADMIN], 200, 200),
    ],
)
def test_scopes(tenant, scopes, read, write):
    accepting_version(tenant, profile=BALANCED, chain=DEMO, number=1)
    client = client_for(tenant, *scopes)

    assert client.get("/api/v1/profiles/balanced/quality/").status_code == read
    assert client.get("/api/v1/profiles/balanced/calibrations/").status_code == read
    assert client.get("/api/v1/audits/").status_code == read
    assert client.post("/api/v1/profiles/balanced/calibrations/1/rollback/").status_code == write


# --- audits -----------------------------------------------------------------------------------


def test_audits_are_listed_without_their_texts(api, tenant, other_tenant):
    version = accepting_version(tenant, profile=BALANCED, chain=DEMO)
    mine = served_audit(
        tenant, "req_1", domain="math", served="demo/small", loss=1.0, cost=10, version=version
    )
    Audit.objects.filter(pk=mine.pk).update(
        payload={"messages": [{"role": "user", "content": "secret text"}]}
    )
    store_observations(tenant, BALANCED, DEMO[:2], [Verdict.AS_GOOD], uniform=False)
    served_audit(other_tenant, "req_theirs", domain="math", served="demo/small", loss=0, cost=1)
    theirs = served_audit(other_tenant, "req_r", domain="math", served="demo/small", loss=0, cost=0)
    Audit.objects.filter(pk=theirs.pk).update(kind="router")

    response = api.get("/api/v1/audits/?uniform=true")

    assert response.status_code == 200
    assert b"secret text" not in response.content
    [row] = response.json()["results"]
    assert row["request_id"] == "req_1"
    assert (row["calibration_version"], row["served_verdict"], row["cost_nanos"]) == (1, None, 10)
    assert "payload" not in row and "observation" not in row
    assert row["kind"] == "audit"
    assert len(api.get("/api/v1/audits/").json()["results"]) == 2
    assert len(api.get("/api/v1/audits/?profile=balanced&status=done").json()["results"]) == 2
    [agreement] = api.get("/api/v1/audits/?kind=agreement").json()["results"]
    assert (agreement["uniform"], agreement["kind"]) == (False, "agreement")
    assert api.get("/api/v1/audits/?kind=router").json()["results"] == []


@pytest.mark.parametrize(
    "query", ["status=nope", "uniform=maybe", "kind=nope", "kind=AUDIT", "cursor=garbage"]
)
def test_audit_filters_are_checked(api, query):
    assert api.get(f"/api/v1/audits/?{query}").status_code == 400


# --- savings net of audits --------------------------------------------------------------------


def test_the_usage_summary_is_net_of_audits(api, tenant):
    ledger(tenant, "req_1", cost=100, baseline=1000, model="demo/small")
    ledger(tenant, "req_2", cost=900, baseline=900, model="demo/large", escalated=True)
    ledger(tenant, "audit_1", kind="audit", cost=250)

    by_none = api.get("/api/v1/usage/summary/?by=none").json()["data"]
    by_profile = api.get("/api/v1/usage/summary/?by=profile").json()["data"]

    assert [
        {k: row[k] for k in ("requests", "cost_nanos", "audit_cost_nanos", "saved_nanos")}
        for row in by_none
    ] == [{"requests": 2, "cost_nanos": 1000, "audit_cost_nanos": 250, "saved_nanos": 650}]
    assert by_none[0]["escalated"] == 1
    assert [(r["key"], r["saved_nanos"]) for r in by_profile] == [(BALANCED, 650)]


def test_the_ledger_lists_audits_by_kind(api, tenant):
    ledger(tenant, "req_1", cost=100)
    ledger(tenant, "audit_1", kind="audit", cost=250)

    rows = api.get("/api/v1/usage/?kind=audit").json()["results"]

    assert [(r["request_id"], r["kind"]) for r in rows] == [("audit_1", "audit")]
    assert api.get("/api/v1/usage/?kind=nope").status_code == 400


def test_audit_spend_selector(tenant):
    from routing.selectors import audit_spend, audit_spend_total

    ledger(tenant, "audit_1", kind="audit", cost=250)
    ledger(tenant, "audit_2", kind="audit", cost=50, created_at=datetime(2026, 11, 21, tzinfo=UTC))
    ledger(tenant, "req_1", cost=999)

    assert audit_spend_total(tenant_id=tenant.pk, start=None, end=None) == 300
    by_day = audit_spend(tenant_id=tenant.pk, start=None, end=None, bucket="day", by="profile")
    assert [(r.period.day, r.key, r.cost_nanos, r.audits) for r in by_day] == [
        (20, BALANCED, 250, 1),
        (21, BALANCED, 50, 1),
    ]


# --- settings: end users and profiles -----------------------------------------------------------


def test_an_end_user_is_excluded_from_audits_through_the_api(api, tenant):
    from tenants.models import EndUser

    alice = EndUser.objects.create(tenant=tenant, external_id="alice")

    excluded = api.patch(f"/api/v1/end-users/{alice.pk}/", {"audit_excluded": True}, format="json")
    nothing = api.patch(f"/api/v1/end-users/{alice.pk}/", {}, format="json")

    assert excluded.status_code == 200
    assert (excluded.json()["audit_excluded"], excluded.json()["tier"]) == (True, None)
    assert nothing.status_code == 400
    alice.refresh_from_db()
    assert alice.audit_excluded is True
    event = AuditEvent.objects.get(action="end_user.audit_excluded")
    assert (event.target, event.data) == ("alice", {"excluded": True})


def test_a_profile_shows_and_takes_its_audit_settings(api):
    created = api.post(
        "/api/v1/profiles/",
        {"name": "support", "chain": DEMO, "audit_rate_floor": 0.1, "judge_model": "none"},
        format="json",
    )

    assert created.status_code == 201, created.content
    body = created.json()
    assert (body["audits_enabled"], body["audit_rate_floor"]) == (True, 0.1)
    assert (body["judge_model"], body["reference_model"]) == ("none", "")
