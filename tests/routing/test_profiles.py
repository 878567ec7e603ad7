"""Routing profiles: one rule for their shape, checked when saved and again when resolved."""

import json

import pytest
from asgiref.sync import sync_to_async
from django.test import AsyncClient
from rest_framework.test import APIClient

from routing import profiles
from routing.models import RoutingProfile, UsageEvent
from tenants.models import AuditEvent

VALID = {"name": "support", "chain": ["demo/small", "demo/large"]}
ROUTE = {"chain": ["demo/medium", "demo/large"], "threshold_offset": 0.05}

# (changes to a valid profile, the field the error names)
INVALID = [
    ({"chain": ["demo/small"] * 2}, "chain"),
    ({"chain": [f"demo/m{i}" for i in range(profiles.MAX_CHAIN_LENGTH + 1)]}, "chain"),
    ({"chain": ["demo/small", "nope/model"]}, "chain"),
    ({"chain": []}, "chain"),
    ({"chain": "demo/small"}, "chain"),
    ({"chain": [1, 2]}, "chain"),
    ({"preset": "reckless"}, "preset"),
    ({"threshold_offset": 0.75}, "threshold_offset"),
    ({"threshold_offset": "abc"}, "threshold_offset"),
    ({"domain_routes": ["code"]}, "domain_routes"),
    ({"domain_routes": {"code": "x"}}, "domain_routes"),
    ({"domain_routes": {"astrology": ROUTE}}, "domain_routes"),
    ({"domain_routes": {"code": {**ROUTE, "threshold_offset": "abc"}}}, "domain_routes"),
    ({"domain_routes": {"code": {**ROUTE, "threshold_offset": 50}}}, "domain_routes"),
    ({"domain_routes": {"code": {**ROUTE, "threshold_offset": True}}}, "domain_routes"),
    ({"domain_routes": {"code": {**ROUTE, "chain": ["demo/small"] * 200}}}, "domain_routes"),
    ({"domain_routes": {"code": {**ROUTE, "calibrate": "yes"}}}, "domain_routes"),
    ({"domain_routes": {"code": {"chain": []}}}, "domain_routes"),
    ({"name": "has space"}, "name"),
    ({"audit_rate_floor": 1.5}, "audit_rate_floor"),
    ({"audit_rate_floor": -0.01}, "audit_rate_floor"),
    ({"audit_rate_floor": "abc"}, "audit_rate_floor"),
    ({"audits_enabled": "maybe"}, "audits_enabled"),
    ({"judge_model": "nope/model"}, "judge_model"),
    ({"judge_model": 5}, "judge_model"),
    ({"reference_model": "nope/model"}, "reference_model"),
    ({"reference_model": "none"}, "reference_model"),
    ({"reference_model": "x" * 300}, "reference_model"),
]
IDS = [f"{field}-{i}" for i, (_, field) in enumerate(INVALID)]


# --- the services ----------------------------------------------------------------------


@pytest.mark.django_db
def test_create_saves_a_valid_profile_with_its_audit_event(tenant):
    profile = profiles.profile_create(tenant=tenant, domain_routes={"code": ROUTE}, **VALID)

    assert profile.chain == VALID["chain"]
    event = AuditEvent.objects.get(tenant=tenant, action="profile.create")
    assert event.target == "support"
    assert event.data["domain_routes"] == {"code": ROUTE}


@pytest.mark.django_db
@pytest.mark.parametrize(("changes", "field"), INVALID, ids=IDS)
def test_create_refuses_what_could_not_run(tenant, changes, field):
    with pytest.raises(profiles.ProfileInvalid) as raised:
        profiles.profile_create(tenant=tenant, **{**VALID, **changes})

    assert set(raised.value.errors) == {field}
    assert not RoutingProfile.objects.exists()
    assert not AuditEvent.objects.filter(action="profile.create").exists()


@pytest.mark.django_db
@pytest.mark.parametrize(("changes", "field"), INVALID, ids=IDS)
def test_update_refuses_what_could_not_run(tenant, changes, field):
    profile = profiles.profile_create(tenant=tenant, **VALID)

    with pytest.raises(profiles.ProfileInvalid) as raised:
        profiles.profile_update(profile=profile, **changes)

    assert set(raised.value.errors) == {field}
    profile.refresh_from_db()
    assert profile.chain == VALID["chain"] and profile.name == "support"
    assert not AuditEvent.objects.filter(action="profile.update").exists()


@pytest.mark.django_db
def test_update_and_delete_are_audited_and_a_no_op_is_not(tenant):
    profile = profiles.profile_create(tenant=tenant, **VALID)

    assert profiles.profile_update(profile=profile, chain=VALID["chain"]) == {}
    changed = profiles.profile_update(profile=profile, preset="fast", threshold_offset=0.1)
    profiles.profile_delete(profile=profile)

    assert changed == {"preset": "fast", "threshold_offset": 0.1}
    actions = list(
        AuditEvent.objects.filter(tenant=tenant, action__startswith="profile.")
        .order_by("id")
        .values_list("action", flat=True)
    )
    assert actions == ["profile.create", "profile.update", "profile.delete"]
    assert not RoutingProfile.objects.exists()


@pytest.mark.django_db
def test_audit_settings_are_saved_and_audited(tenant):
    settings = {
        "audits_enabled": False,
        "audit_rate_floor": 0.1,
        "judge_model": "none",
        "reference_model": "demo/large",
    }

    profile = profiles.profile_create(tenant=tenant, **VALID, **settings)
    changed = profiles.profile_update(profile=profile, judge_model="demo/medium")

    profile.refresh_from_db()
    assert {name: getattr(profile, name) for name in settings} == {
        **settings,
        "judge_model": "demo/medium",
    }
    assert changed == {"judge_model": "demo/medium"}
    created = AuditEvent.objects.get(tenant=tenant, action="profile.create")
    assert {name: created.data[name] for name in settings} == settings


@pytest.mark.django_db
def test_names_are_unique_per_tenant(tenant, other_tenant):
    profiles.profile_create(tenant=tenant, **VALID)
    profiles.profile_create(tenant=other_tenant, **VALID)
    other = profiles.profile_create(tenant=tenant, **{**VALID, "name": "other"})

    with pytest.raises(profiles.ProfileInvalid) as raised:
        profiles.profile_create(tenant=tenant, **VALID)
    assert set(raised.value.errors) == {"name"}
    with pytest.raises(profiles.ProfileInvalid):
        profiles.profile_update(profile=other, name="support")


# --- through the management API --------------------------------------------------------


def api(api_token):
    client = APIClient()
    client.credentials(HTTP_AUTHORIZATION=f"Bearer {api_token.raw}")
    return client


@pytest.mark.django_db
@pytest.mark.parametrize(("changes", "field"), INVALID, ids=IDS)
def test_the_api_answers_400_naming_the_field_on_create_and_patch(
    api_token, tenant, changes, field
):
    client = api(api_token)
    created = client.post("/api/v1/profiles/", VALID, format="json")
    assert created.status_code == 201

    for response in (
        client.post("/api/v1/profiles/", {**VALID, "name": "new", **changes}, format="json"),
        client.patch(f"/api/v1/profiles/{created.json()['id']}/", changes, format="json"),
    ):
        assert response.status_code == 400, response.content
        error = response.json()["error"]
        assert error["code"] == "invalid_request"
        assert field in error["detail"]
    assert list(RoutingProfile.objects.values_list("name", "chain")) == [
        ("support", VALID["chain"])
    ]


@pytest.mark.django_db
def test_the_api_requires_a_chain(api_token):
    response = api(api_token).post("/api/v1/profiles/", {"name": "empty"}, format="json")

    assert response.status_code == 400
    assert "chain" in response.json()["error"]["detail"]


# --- a bad profile already stored ------------------------------------------------------

STORED = [
    {"domain_routes": {"code": {"chain": ["demo/small"], "threshold_offset": "abc"}}},
    {"domain_routes": {"code": {"chain": ["demo/small"], "threshold_offset": 50}}},
    {"domain_routes": {"code": "x"}},
    {"domain_routes": ["code"]},
    {"chain": ["demo/small", "gone/model"]},
    {"chain": [1]},
    {"chain": "demo/small"},
    {"chain": [f"demo/small-{i}" for i in range(200)]},
]


@pytest.mark.django_db(transaction=True)
@pytest.mark.parametrize("stored", STORED, ids=range(len(STORED)))
async def test_a_stored_profile_that_cannot_run_is_a_clean_400(api_token, tenant, stored):
    await RoutingProfile.objects.acreate(tenant=tenant, **{**VALID, **stored})
    client = AsyncClient()

    response = await client.post(
        "/v1/chat/completions",
        data=json.dumps(
            {"model": "cascade/support", "messages": [{"role": "user", "content": "def f(): pass"}]}
        ),
        content_type="application/json",
        headers={"Authorization": f"Bearer {api_token.raw}"},
    )

    assert response.status_code == 400, response.content
    error = json.loads(response.content)["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert (error["type"], error["param"], error["code"]) == (
        "invalid_request_error",
        "model",
        "profile_misconfigured",
    )
    assert "cascade/support" in error["message"]
    assert await sync_to_async(UsageEvent.objects.count)() == 0
