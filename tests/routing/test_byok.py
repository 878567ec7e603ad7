"""Tenants' own provider models: validated on save, write-only secrets, used only for their
owner's requests, named by its profiles, and paid for by its keys in the ledger."""

import json

import pytest
from asgiref.sync import sync_to_async
from rest_framework.test import APIClient

from core import crypto
from routing.models import TenantProviderModel, UsageEvent
from routing.tenant_models import tenant_specs
from tenants.enums import Scope
from tenants.models import Tenant
from tenants.services import token_create
from tests.routing.test_gateway import error_of, post

pytestmark = pytest.mark.django_db(transaction=True)

URL = "/api/v1/provider-models/"
KEY_A = "sk-tenant-a-0123456789abcdef"
KEY_B = "sk-tenant-b-fedcba9876543210"


def api(tenant, scopes=(Scope.ADMIN,)):
    client = APIClient()
    raw = token_create(tenant=tenant, name="byok", scopes=list(scopes)).raw
    client.credentials(HTTP_AUTHORIZATION=f"Bearer {raw}")
    return client


def own_model(upstream, **overrides):
    return {
        "name": "acme/own-gpt",
        "litellm_model": "openai/own-gpt",
        "api_base": upstream.api_base,
        "credentials": {"api_key": KEY_A},
        "input_usd_per_mtok": "2.5",
        "output_usd_per_mtok": "10",
        **overrides,
    }


def chat(model, content="What is 2 + 2?"):
    return json.dumps({"model": model, "messages": [{"role": "user", "content": content}]})


@pytest.fixture
def saved(tenant, upstream):
    upstream.keys_accepted = {KEY_A, KEY_B}
    response = api(tenant).post(URL, own_model(upstream), format="json")
    assert response.status_code == 201, response.content
    return response.json()


def test_saving_validates_with_one_cheap_call_and_never_shows_the_key(tenant, upstream, saved):
    assert upstream.keys == [KEY_A]  # the validation call, with the tenant's key
    [call] = upstream.requests
    assert call["model"] == "own-gpt" and call.get("max_tokens") == 1
    assert saved["credentials_mask"] == {"api_key": "…cdef"}
    assert "credentials" not in saved and KEY_A not in json.dumps(saved)
    listed = api(tenant).get(URL).json()["data"]
    assert [m["name"] for m in listed] == ["acme/own-gpt"] and KEY_A not in json.dumps(listed)
    row = TenantProviderModel.objects.get(tenant=tenant)
    assert KEY_A not in row.credentials_encrypted  # encrypted at rest
    assert Tenant.objects.get(pk=tenant.pk).models_version == 1


def test_a_key_the_provider_refuses_is_not_saved(tenant, upstream):
    upstream.keys_accepted = {KEY_A}
    response = api(tenant).post(
        URL, own_model(upstream, credentials={"api_key": "sk-wrong-key-000000"}), format="json"
    )
    assert response.status_code == 400, response.content
    body = response.json()["error"]
    assert "refused these credentials" in json.dumps(body)
    assert not TenantProviderModel.objects.exists()
    assert Tenant.objects.get(pk=tenant.pk).models_version == 0


async def test_the_tenants_key_pays_for_its_requests_and_no_one_elses(
    tenant, other_tenant, upstream, saved, api_token, other_api_token
):
    response = await post(api_token.raw, chat("acme/own-gpt"))
    assert response.status_code == 200, response.content
    assert upstream.keys[-1] == KEY_A
    event = await UsageEvent.objects.aget(request_id=response["x-request-id"])
    assert event.model == "acme/own-gpt"
    assert event.byok_cost_nanos == event.cost_nanos > 0
    # 12 prompt tokens at $2.50/M and the completion at $10/M: the tenant's own prices.
    expected = event.prompt_tokens * 2_500 + event.completion_tokens * 10_000
    assert event.cost_nanos == expected

    # A platform model's cost is not the tenant's key's.
    demo = await post(api_token.raw, chat("demo/small"))
    assert (await UsageEvent.objects.aget(request_id=demo["x-request-id"])).byok_cost_nanos == 0

    # Another tenant can neither call it, nor see it listed, nor read it.
    calls = len(upstream.keys)
    theirs = await post(other_api_token.raw, chat("acme/own-gpt"))
    assert theirs.status_code == 404
    assert error_of(theirs)["code"] == "model_not_found"
    assert len(upstream.keys) == calls
    models = await sync_to_async(lambda: api(other_tenant).get("/v1/models"))()
    assert "acme/own-gpt" not in models.content.decode()
    listing = await sync_to_async(lambda: api(other_tenant).get(URL))()
    assert listing.json()["data"] == []
    detail = await sync_to_async(lambda: api(other_tenant).get(f"{URL}{saved['id']}/"))()
    assert detail.status_code == 404


def test_profiles_name_the_tenants_own_models_and_no_one_elses(
    tenant, other_tenant, upstream, saved
):
    profile = {"name": "mine", "chain": ["demo/small", "acme/own-gpt"]}
    created = api(tenant).post("/api/v1/profiles/", profile, format="json")
    assert created.status_code == 201, created.content
    refused = api(other_tenant).post("/api/v1/profiles/", profile, format="json")
    assert refused.status_code == 400
    assert "acme/own-gpt" in json.dumps(refused.json())


async def test_a_cascade_escalating_to_the_tenants_model_bills_only_that_step(
    tenant, upstream, saved, api_token
):
    created = await sync_to_async(
        lambda: api(tenant).post(
            "/api/v1/profiles/",
            {"name": "mine", "chain": ["demo/small", "acme/own-gpt"], "audits_enabled": False},
            format="json",
        )
    )()
    assert created.status_code == 201, created.content
    response = await post(api_token.raw, chat("cascade/mine", "Prove that sqrt(2) is irrational."))
    assert response.status_code == 200, response.content
    event = await UsageEvent.objects.aget(request_id=response["x-request-id"])
    own = sum(a["cost_nanos"] for a in event.expanded_attempts if a["model"] == "acme/own-gpt")
    assert event.byok_cost_nanos == own
    assert event.byok_cost_nanos <= event.cost_nanos


def test_deleting_stops_its_use_at_once(tenant, upstream, saved, api_token):
    client = api(tenant)
    assert client.delete(f"{URL}{saved['id']}/").status_code == 204
    version = Tenant.objects.get(pk=tenant.pk).models_version
    assert version == 2
    assert tenant_specs(tenant.pk, version) == {}


async def test_a_deleted_model_is_a_404(tenant, upstream, saved, api_token):
    await sync_to_async(lambda: api(tenant).delete(f"{URL}{saved['id']}/"))()
    response = await post(api_token.raw, chat("acme/own-gpt"))
    assert response.status_code == 404


def test_a_private_address_is_refused_outside_development(tenant, upstream, settings):
    settings.CASCADEFLOW_ALLOW_PRIVATE_CALLBACKS = False
    for base in (upstream.api_base, "http://169.254.169.254/v1", "http://10.0.0.7:8000/v1"):
        response = api(tenant).post(URL, own_model(upstream, api_base=base), format="json")
        assert response.status_code == 400, (base, response.content)
        assert "api_base" in json.dumps(response.json())
    assert upstream.keys == []  # nothing was called


@pytest.mark.parametrize(
    "change",
    [
        {"name": "cascade/mine"},
        {"name": "demo/small"},
        {"name": "Has Spaces"},
        {"name": ""},
        {"name": "a/b/c"},
        {"litellm_model": "no-provider"},
        {"litellm_model": ""},
        {"credentials": {}},
        {"credentials": {"password": "x"}},
        {"credentials": {"api_key": ""}},
        {"credentials": {"api_key": 5}},
        {"credentials": ["sk-x"]},
        {"credentials": "sk-x"},
        {"input_usd_per_mtok": "-1"},
        {"input_usd_per_mtok": "abc"},
        {"output_usd_per_mtok": "1e400"},
        {"output_usd_per_mtok": "NaN"},
        {"api_base": "ftp://example.com"},
        {"api_base": "not a url"},
    ],
)
def test_hostile_inputs_are_400_and_save_nothing(tenant, upstream, change):
    response = api(tenant).post(URL, own_model(upstream, **change), format="json")
    assert response.status_code == 400, (change, response.content)
    assert "error" in response.json()
    assert not TenantProviderModel.objects.exists()


def test_a_second_model_under_the_same_name_is_refused(tenant, upstream, saved):
    again = api(tenant).post(URL, own_model(upstream), format="json")
    assert again.status_code == 400
    assert TenantProviderModel.objects.count() == 1


def test_scopes(tenant, upstream):
    reader = api(tenant, scopes=(Scope.USAGE_READ,))
    assert reader.get(URL).status_code == 200
    assert reader.post(URL, own_model(upstream), format="json").status_code == 403
    assert APIClient().get(URL).status_code == 401
    assert upstream.keys == []


def test_a_key_is_rotated_in_place_only_once_the_new_one_passes(tenant, upstream, saved):
    """PATCH with only the new key: validated first, the stored key kept when refused."""
    client = api(tenant)
    detail = f"{URL}{saved['id']}/"
    upstream.keys_accepted = {KEY_A}
    upstream.keys.clear()

    refused = client.patch(detail, {"credentials": {"api_key": KEY_B}}, format="json")
    assert refused.status_code == 400, refused.content
    assert "refused these credentials" in json.dumps(refused.json())
    assert upstream.keys == [KEY_B]
    row = TenantProviderModel.objects.get(pk=saved["id"])
    assert json.loads(crypto.decrypt(row.credentials_encrypted)) == {"api_key": KEY_A}
    assert Tenant.objects.get(pk=tenant.pk).models_version == 1

    upstream.keys_accepted = {KEY_B}
    rotated = client.patch(detail, {"credentials": {"api_key": KEY_B}}, format="json")
    assert rotated.status_code == 200, rotated.content
    body = rotated.json()
    assert body["id"] == saved["id"] and body["name"] == "acme/own-gpt"
    assert body["credentials_mask"] == {"api_key": "…3210"} and KEY_B not in json.dumps(body)
    row.refresh_from_db()
    assert json.loads(crypto.decrypt(row.credentials_encrypted)) == {"api_key": KEY_B}
    version = Tenant.objects.get(pk=tenant.pk).models_version
    assert version == 2
    [spec] = tenant_specs(tenant.pk, version).values()
    assert spec.deployments[0].params["api_key"] == KEY_B


@pytest.mark.parametrize(
    "body",
    [
        {},
        {"name": "acme/renamed", "credentials": {"api_key": KEY_B}},
        {"api_base": "https://example.com/v1"},
        {"credentials": {}},
        {"credentials": {"password": "x"}},
        {"credentials": {"api_key": ""}},
        {"credentials": {"api_key": 5}},
        {"credentials": "sk-x"},
    ],
)
def test_rotation_changes_nothing_but_credentials(tenant, upstream, saved, body):
    upstream.keys.clear()
    response = api(tenant).patch(f"{URL}{saved['id']}/", body, format="json")
    assert response.status_code == 400, (body, response.content)
    assert upstream.keys == []
    row = TenantProviderModel.objects.get(pk=saved["id"])
    assert row.name == "acme/own-gpt"
    assert json.loads(crypto.decrypt(row.credentials_encrypted)) == {"api_key": KEY_A}


def test_rotation_needs_routing_write_and_the_tenants_own_model(
    tenant, other_tenant, upstream, saved
):
    upstream.keys.clear()
    detail = f"{URL}{saved['id']}/"
    new = {"credentials": {"api_key": KEY_B}}
    reader = api(tenant, scopes=(Scope.USAGE_READ,))
    assert reader.patch(detail, new, format="json").status_code == 403
    assert api(other_tenant).patch(detail, new, format="json").status_code == 404
    assert upstream.keys == []


def test_a_provider_echoing_the_key_in_its_refusal_does_not_leak_it(tenant, monkeypatch):
    from routing import tenant_models
    from routing.engine.resilience import Failure, UpstreamError

    async def echo(caller, spec, messages):
        key = spec.deployments[0].params["api_key"]
        raise UpstreamError(spec.name, Failure(False, 401, "auth", f"Key {key} is wrong", 401))

    monkeypatch.setattr(tenant_models, "_vetted_call", echo)
    response = api(tenant).post(
        URL,
        {
            "name": "acme/gpt",
            "litellm_model": "openai/gpt-4o-mini",
            "credentials": {"api_key": KEY_A},
        },
        format="json",
    )
    assert response.status_code == 400
    assert "Key … is wrong" in json.dumps(response.json(), ensure_ascii=False)
    assert KEY_A not in response.content.decode()
