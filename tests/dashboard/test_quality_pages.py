"""Profiles' measured quality and calibration history on the dashboard, and rollback."""

from datetime import timedelta

import pytest
from django.utils import timezone

from routing.models import Audit, CalibrationVersion, RoutingProfile
from routing.targets import chain_key
from tenants.enums import MemberRole
from tenants.models import AuditEvent
from tests.factories import UsageEventFactory
from tests.factories import member_login as login
from tests.routing.learning_fixtures import accepting_version

pytestmark = pytest.mark.django_db
DEMO = ["demo/small", "demo/medium", "demo/large"]
BALANCED = "cascade/balanced"


def url(tenant, path=""):
    return f"/dashboard/t/{tenant.slug}/{path}"


def earlier_this_month():
    """Up to two hours ago, never before this month (UTC): the pages show this month, and
    two hours before 00:37 on the first of a month is the month before."""
    now = timezone.now()
    month_start = now.replace(day=1, hour=0, minute=0, second=0, microsecond=0)
    return now - min(timedelta(hours=2), (now - month_start) / 2)


def ledger(tenant, request_id, *, kind="request", cost=0, profile=BALANCED, **values):
    values.setdefault("baseline_cost_nanos", 0)
    return UsageEventFactory(
        tenant=tenant,
        request_id=request_id,
        created_at=values.pop("created_at", earlier_this_month()),
        requested_model=profile,
        profile=profile,
        kind=kind,
        cost_nanos=cost,
        **values,
    )


def served_audit(tenant, request_id, *, domain, served, loss, cost, profile=BALANCED):
    return Audit.objects.create(
        tenant=tenant,
        request_id=request_id,
        profile=profile,
        created_at=earlier_this_month(),
        status="done",
        chain=DEMO,
        chain_key=chain_key(DEMO),
        reference_model="demo/large",
        domain=domain,
        served_model=served,
        served_loss=loss,
        cost_nanos=cost,
        payload={},
    )


def audited_traffic(tenant, prefix="req"):
    """Four requests of cascade/balanced, three audited (one worse), audits costing 500n."""
    for i in range(3):
        ledger(tenant, f"{prefix}_m{i}", domain="math", model="demo/small", quality_score=0.8)
    ledger(tenant, f"{prefix}_c", domain="code", model="demo/large")
    served_audit(tenant, f"{prefix}_m0", domain="math", served="demo/small", loss=1.0, cost=300)
    served_audit(tenant, f"{prefix}_m1", domain="math", served="demo/small", loss=0.0, cost=200)
    served_audit(tenant, f"{prefix}_c", domain="code", served="demo/large", loss=0.0, cost=0)
    ledger(tenant, f"audit_{prefix}", kind="audit", cost=500)


def history(tenant):
    """v1 certified, v2 not certified, v3 certified and active."""
    accepting_version(tenant, profile=BALANCED, chain=DEMO, number=1)
    CalibrationVersion.objects.create(
        tenant=tenant,
        profile=BALANCED,
        version=2,
        chain=DEMO,
        uniform_labels=140,
        evidence={"reason": "no permissive policy met the bound yet"},
    )
    accepting_version(tenant, profile=BALANCED, chain=DEMO, number=3)


# --- the models page ----------------------------------------------------------------------


def test_models_page_shows_each_profiles_measured_quality(client, tenant):
    audited_traffic(tenant)
    RoutingProfile.objects.create(tenant=tenant, name="support", chain=DEMO[:2])
    login(client, tenant, MemberRole.VIEWER)

    page = client.get(url(tenant, "models/"))

    assert page.status_code == 200
    quality = {q.profile: q for q in page.context["page"].quality}
    assert set(quality) == {BALANCED, "cascade/support"}  # served preset + own profile
    balanced = quality[BALANCED]
    assert (balanced.overall.requests, balanced.overall.audits) == (4, 3)
    assert balanced.overall.audit_cost_nanos == 500
    assert balanced.overall.measured.retention == pytest.approx(2 / 3)
    assert balanced.learning.cold_start
    html = page.content.decode()
    assert 'data-testid="quality-profiles"' in html
    assert "66.7%" in html  # measured retention, one decimal
    assert "85.0%" in html  # engine estimate: (3 * 0.8 + 1) / 4
    assert "cold start" in html
    assert f'href="/dashboard/t/{tenant.slug}/profiles/balanced/?range=period"' in html
    assert "not audited" in html  # cascade/support has no audits


def test_models_page_with_no_traffic_says_so(client, tenant):
    login(client, tenant, MemberRole.VIEWER)

    page = client.get(url(tenant, "models/"))

    assert page.status_code == 200
    assert page.context["page"].quality == ()
    assert b"No routing profiles in use in this range." in page.content


# --- the profile page -----------------------------------------------------------------------


def test_profile_page_shows_quality_by_domain_and_model_and_the_history(client, tenant):
    audited_traffic(tenant)
    history(tenant)
    login(client, tenant, MemberRole.VIEWER)

    page = client.get(url(tenant, "profiles/balanced/"))

    assert page.status_code == 200
    data = page.context["page"]
    assert data.name == BALANCED and data.active.version == 3
    assert [v.version for v in data.versions] == [3, 2, 1]
    assert {r.key for r in data.quality.by_domain} == {"math", "code"}
    assert {r.key for r in data.quality.by_draft_model} == {"demo/small", "demo/large"}
    html = page.content.decode()
    assert "certified v3" in html
    assert 'data-testid="quality-domain"' in html and 'data-testid="quality-model"' in html
    assert "50.0%" in html  # math: one worse of two
    assert "no permissive policy met the bound yet" in html
    assert html.count("Roll back to") == 0  # a viewer sees no rollback button


@pytest.mark.parametrize("role", [MemberRole.ADMIN, MemberRole.OWNER])
def test_admins_and_owners_see_rollback_for_certified_inactive_versions_only(client, tenant, role):
    history(tenant)
    login(client, tenant, role)

    html = client.get(url(tenant, "profiles/balanced/")).content.decode()

    assert "Roll back to v1" in html
    assert "Roll back to v2" not in html  # not certified
    assert "Roll back to v3" not in html  # active


@pytest.mark.parametrize("name", ["balanced", "cascade"])
def test_profile_page_of_an_empty_profile(client, tenant, name):
    if name == "cascade":
        RoutingProfile.objects.create(tenant=tenant, name="cascade", chain=DEMO[:2])
    login(client, tenant, MemberRole.VIEWER)

    page = client.get(url(tenant, f"profiles/{name}/"))

    assert page.status_code == 200
    assert page.context["page"].versions == []
    html = page.content.decode()
    assert "No calibration fitted yet" in html
    assert "no audited answers in this range" in html


@pytest.mark.parametrize(
    "name",
    [
        "nope",  # neither a preset nor one of the tenant's profiles
        "theirs",  # another tenant's profile
        "BALANCED",  # names are exact
    ],
)
def test_unknown_profiles_are_404(client, tenant, other_tenant, name):
    RoutingProfile.objects.create(tenant=other_tenant, name="theirs", chain=DEMO[:2])
    login(client, tenant, MemberRole.OWNER)

    assert client.get(url(tenant, f"profiles/{name}/")).status_code == 404
    assert client.post(url(tenant, f"profiles/{name}/calibrations/1/rollback/")).status_code == 404


@pytest.mark.parametrize("path", ["models/", "profiles/balanced/"])
def test_only_the_members_tenant_is_shown(client, tenant, other_tenant, path):
    audited_traffic(other_tenant, prefix="theirs")
    history(other_tenant)
    login(client, tenant, MemberRole.OWNER)

    page = client.get(url(tenant, path))

    assert page.status_code == 200
    html = page.content.decode()
    if path == "models/":
        assert page.context["page"].quality == ()
    else:
        data = page.context["page"]
        assert data.versions == [] and data.active is None
        assert (data.quality.overall.requests, data.quality.overall.audits) == (0, 0)
        assert data.quality.overall.audit_cost_nanos == 0
        assert "Roll back" not in html
    assert client.get(f"/dashboard/t/{other_tenant.slug}/{path}").status_code == 404


# --- rollback -------------------------------------------------------------------------------


@pytest.mark.parametrize("role", [MemberRole.ADMIN, MemberRole.OWNER])
def test_rollback_serves_the_version_again_and_is_audited(client, tenant, role):
    history(tenant)
    user = login(client, tenant, role)

    response = client.post(url(tenant, "profiles/balanced/calibrations/1/rollback/"))

    assert response.status_code == 302
    assert response["Location"] == url(tenant, "profiles/balanced/")
    active = CalibrationVersion.objects.get(tenant=tenant, profile=BALANCED, active=True)
    assert active.version == 1
    event = AuditEvent.objects.get(tenant=tenant, action="calibration.rollback")
    assert event.actor == user and event.target == BALANCED
    assert event.data["version"] == 1 and event.data["previous"] == 3
    page = client.get(response["Location"])
    assert "certified v1" in page.content.decode()
    assert "now runs calibration version 1" in page.content.decode()


def test_rollback_by_a_viewer_is_refused(client, tenant):
    role = MemberRole.VIEWER
    history(tenant)
    login(client, tenant, role)

    response = client.post(url(tenant, "profiles/balanced/calibrations/1/rollback/"))

    assert response.status_code == 403
    assert CalibrationVersion.objects.get(tenant=tenant, active=True).version == 3
    assert not AuditEvent.objects.filter(action="calibration.rollback").exists()


@pytest.mark.parametrize(
    ("version", "status", "active", "message"),
    [
        (2, 302, 3, "not certified"),  # refused with a message, nothing changes
        (3, 302, 3, "now runs calibration version 3"),  # already active: a no-op
        (9, 404, 3, None),  # no such version
        (0, 404, 3, None),
        (2**31, 404, 3, None),  # more than the database holds
        (10**30, 404, 3, None),
    ],
)
def test_rollback_edge_cases(client, tenant, version, status, active, message):
    history(tenant)
    login(client, tenant, MemberRole.ADMIN)

    response = client.post(url(tenant, f"profiles/balanced/calibrations/{version}/rollback/"))

    assert response.status_code == status
    assert CalibrationVersion.objects.get(tenant=tenant, active=True).version == active
    if message:
        assert message in client.get(response["Location"]).content.decode()
    assert not AuditEvent.objects.filter(action="calibration.rollback").exists()


def test_rollback_to_another_tenants_version_is_404(client, tenant, other_tenant):
    history(tenant)
    accepting_version(other_tenant, profile=BALANCED, chain=DEMO, number=7)
    accepting_version(other_tenant, profile=BALANCED, chain=DEMO, number=8)
    login(client, tenant, MemberRole.OWNER)

    response = client.post(url(tenant, "profiles/balanced/calibrations/7/rollback/"))

    assert response.status_code == 404
    assert CalibrationVersion.objects.get(tenant=other_tenant, active=True).version == 8


def test_rollback_needs_a_post(client, tenant):
    history(tenant)
    login(client, tenant, MemberRole.OWNER)

    assert client.get(url(tenant, "profiles/balanced/calibrations/1/rollback/")).status_code == 405
    assert CalibrationVersion.objects.get(tenant=tenant, active=True).version == 3
