"""The "Provider keys" page: a tenant's own provider models (bring your own key) in the dashboard.

The page calls the API's services (``routing.tenant_models``), so saving and rotating make
the real validation call, here against the fake upstream (``tests/support/fake_upstream.py``), which
answers a key outside ``keys_accepted`` with a 401 as a provider does.
"""

import json

import pytest
from django.test import Client

from core import crypto
from routing import tenant_models
from routing.engine.resilience import Failure, UpstreamError
from routing.models import TenantProviderModel
from tenants.enums import MemberRole
from tenants.models import AuditEvent, Tenant
from tests.factories import UserFactory
from tests.factories import member_login as login

pytestmark = pytest.mark.django_db

KEY_A = "sk-tenant-a-0123456789abcdef"
KEY_B = "sk-tenant-b-fedcba9876543210"
WRONG = "sk-wrong-key-5555555555555555"


def url(tenant, path=""):
    return f"/dashboard/t/{tenant.slug}/provider-keys/{path}"


def form(upstream, **overrides):
    """The add form as a browser posts it: an OpenAI-compatible server (the fake upstream)."""
    return {
        "provider": "compatible",
        "name": "acme/own-gpt",
        "model": "own-gpt",
        "api_key": KEY_A,
        "api_base": upstream.api_base,
        "input_usd_per_mtok": "2.5",
        "output_usd_per_mtok": "10",
        **overrides,
    }


def secrets_in(response, *secrets):
    return [s for s in secrets if s.encode() in response.content]


def stored_credentials(row):
    row.refresh_from_db()
    return json.loads(crypto.decrypt(row.credentials_encrypted))


def version(tenant):
    return Tenant.objects.get(pk=tenant.pk).models_version


@pytest.fixture
def saved(tenant, upstream):
    """acme/own-gpt saved with KEY_A, through the service the page calls."""
    upstream.keys_accepted = {KEY_A}
    row = tenant_models.provider_model_create(
        tenant=tenant,
        name="acme/own-gpt",
        litellm_model="openai/own-gpt",
        api_base=upstream.api_base,
        credentials={"api_key": KEY_A},
        input_usd_per_mtok="2.5",
        output_usd_per_mtok="10",
    )
    upstream.keys.clear()
    upstream.requests.clear()
    return row


# --- adding ----------------------------------------------------------------------------


def test_an_admin_adds_a_model_and_its_key_never_appears_again(client, tenant, upstream):
    user = login(client, tenant, MemberRole.ADMIN)
    upstream.keys_accepted = {KEY_A}

    created = client.post(url(tenant), form(upstream))

    assert created.status_code == 302, created.content.decode()[:2000]
    assert created["Location"] == url(tenant)
    assert upstream.keys == [KEY_A]  # one validation call, with the tenant's key
    assert upstream.requests[0]["max_tokens"] == 1
    row = TenantProviderModel.objects.get(tenant=tenant)
    assert row.litellm_model == "openai/own-gpt" and row.api_base == upstream.api_base
    assert row.credentials_mask == {"api_key": "…cdef"}
    assert KEY_A not in row.credentials_encrypted  # encrypted at rest
    assert str(row.input_usd_per_mtok) == "2.500000"
    assert version(tenant) == 1
    event = AuditEvent.objects.get(tenant=tenant, action="provider_model.create")
    assert event.actor == user and event.target == "acme/own-gpt"

    listing = client.get(url(tenant))
    assert listing.status_code == 200
    body = listing.content.decode()
    assert "acme/own-gpt" in body and "…cdef" in body and "OpenAI-compatible" in body
    assert "Saved" in body or "saved" in body  # the success message
    # Never again in any page: the list, the rotation form, a form shown again with errors.
    rotate = client.get(url(tenant, f"{row.pk}/rotate/"))
    again = client.post(url(tenant), form(upstream))  # the same name: refused
    assert again.status_code == 200 and "already have a model" in again.content.decode()
    for page in (listing, rotate, again, client.get(f"/dashboard/t/{tenant.slug}/")):
        assert secrets_in(page, KEY_A) == []
    assert 'name="api_key"' in again.content.decode()  # the field is there, empty


def test_a_key_the_provider_refuses_is_not_saved_and_the_reason_is_shown(client, tenant, upstream):
    login(client, tenant, MemberRole.OWNER)
    upstream.keys_accepted = {KEY_A}

    page = client.post(url(tenant), form(upstream, api_key=WRONG))

    assert page.status_code == 200
    assert "refused these credentials" in page.content.decode()
    assert page.context["form"].non_field_errors()
    assert secrets_in(page, WRONG) == []
    assert not TenantProviderModel.objects.exists()
    assert version(tenant) == 0


def test_a_provider_that_echoes_the_key_does_not_get_it_shown(client, tenant, monkeypatch):
    """Some providers repeat the key they refused; the message is shown without it."""
    login(client, tenant, MemberRole.ADMIN)

    async def refuse(caller, spec, messages):
        key = spec.deployments[0].params["api_key"]
        raise UpstreamError(spec.name, Failure(False, 401, "auth", f"Bad key {key} (invalid)", 401))

    monkeypatch.setattr(tenant_models, "_vetted_call", refuse)
    page = client.post(
        url(tenant),
        {"provider": "openai", "name": "acme/gpt", "model": "gpt-4o-mini", "api_key": WRONG},
    )

    assert page.status_code == 200
    body = page.content.decode()
    assert "refused these credentials" in body and "Bad key … (invalid)" in body
    assert secrets_in(page, WRONG) == []


@pytest.mark.parametrize(
    "base",
    [
        None,  # the fake upstream itself: 127.0.0.1
        "http://localhost:11434/v1",
        "http://169.254.169.254/latest",
        "http://10.0.0.7:8000/v1",
        "http://192.168.1.20/v1",
        "http://[::1]:8000/v1",
        "http://2130706433/v1",
    ],
)
def test_a_private_or_loopback_base_url_is_refused_outside_development(
    client, tenant, upstream, settings, base
):
    settings.CASCADEFLOW_ALLOW_PRIVATE_CALLBACKS = False
    login(client, tenant, MemberRole.ADMIN)

    page = client.post(url(tenant), form(upstream, api_base=base or upstream.api_base))

    assert page.status_code == 200
    errors = page.context["form"].errors
    assert "not a public address" in " ".join(errors["api_base"]), errors
    assert upstream.keys == []  # nothing was called
    assert not TenantProviderModel.objects.exists()


# --- roles and tenancy -----------------------------------------------------------------


def test_a_viewer_sees_masks_but_cannot_add_rotate_or_delete(client, tenant, upstream, saved):
    login(client, tenant, MemberRole.VIEWER)

    page = client.get(url(tenant))
    assert page.status_code == 200
    body = page.content.decode()
    assert "acme/own-gpt" in body and "…cdef" in body
    assert "Provider keys" in body  # in the tabs
    assert page.context["form"] is None and "Rotate key" not in body and "Add a model" not in body

    refused = [
        client.post(url(tenant), form(upstream, name="acme/mine")),
        client.get(url(tenant, f"{saved.pk}/rotate/")),
        client.post(url(tenant, f"{saved.pk}/rotate/"), {"api_key": KEY_B}),
        client.post(url(tenant, f"{saved.pk}/delete/")),
    ]

    assert [r.status_code for r in refused] == [403] * 4
    assert upstream.keys == []
    assert list(TenantProviderModel.objects.values_list("name", flat=True)) == ["acme/own-gpt"]
    assert stored_credentials(saved) == {"api_key": KEY_A}


def test_another_tenants_model_is_a_404(client, tenant, other_tenant, upstream):
    upstream.keys_accepted = {KEY_A}
    theirs = tenant_models.provider_model_create(
        tenant=other_tenant,
        name="globex/theirs",
        litellm_model="openai/own-gpt",
        api_base=upstream.api_base,
        credentials={"api_key": KEY_A},
        input_usd_per_mtok="1",
        output_usd_per_mtok="2",
    )
    upstream.keys.clear()
    login(client, tenant, MemberRole.OWNER)

    answers = [
        client.get(url(tenant, f"{theirs.pk}/rotate/")),
        client.post(url(tenant, f"{theirs.pk}/rotate/"), {"api_key": KEY_B}),
        client.post(url(tenant, f"{theirs.pk}/delete/")),
        client.post(url(tenant, f"{10**30}/delete/")),
        client.get(url(other_tenant)),  # not a member of theirs at all
    ]

    assert [r.status_code for r in answers] == [404] * 5
    assert "globex/theirs" not in client.get(url(tenant)).content.decode()
    assert upstream.keys == []
    assert stored_credentials(theirs) == {"api_key": KEY_A}


def test_posts_need_the_csrf_token(tenant, upstream, saved):
    client = Client(enforce_csrf_checks=True)
    login(client, tenant, MemberRole.OWNER)

    page = client.get(url(tenant))
    assert b"csrfmiddlewaretoken" in page.content
    answers = [
        client.post(url(tenant), form(upstream, name="acme/other")),
        client.post(url(tenant, f"{saved.pk}/rotate/"), {"api_key": KEY_B}),
        client.post(url(tenant, f"{saved.pk}/delete/")),
    ]

    assert [r.status_code for r in answers] == [403] * 3
    assert upstream.keys == []
    assert TenantProviderModel.objects.count() == 1


# --- rotation --------------------------------------------------------------------------


def chat(client, token):
    return client.post(
        "/v1/chat/completions",
        json.dumps({"model": "acme/own-gpt", "messages": [{"role": "user", "content": "Hi"}]}),
        content_type="application/json",
        headers={"Authorization": f"Bearer {token}"},
    )


@pytest.mark.django_db(transaction=True)
def test_rotation_keeps_the_old_key_until_the_new_one_passes(
    client, tenant, upstream, saved, api_token
):
    user = login(client, tenant, MemberRole.ADMIN)
    gateway = Client()
    assert chat(gateway, api_token.raw).status_code == 200
    assert upstream.keys[-1] == KEY_A

    # The provider does not know KEY_B yet: refused, shown, and KEY_A keeps serving.
    upstream.keys.clear()
    refused = client.post(url(tenant, f"{saved.pk}/rotate/"), {"api_key": KEY_B})
    assert refused.status_code == 200
    assert "refused these credentials" in refused.content.decode()
    assert secrets_in(refused, KEY_A, KEY_B) == []
    assert upstream.keys == [KEY_B]  # only the validation call tried it
    assert stored_credentials(saved) == {"api_key": KEY_A}
    assert version(tenant) == 1
    served = chat(gateway, api_token.raw)
    assert served.status_code == 200 and upstream.keys[-1] == KEY_A

    # Now it does: swapped in place (same model, same id), and the next request uses it.
    upstream.keys_accepted = {KEY_A, KEY_B}
    rotated = client.post(url(tenant, f"{saved.pk}/rotate/"), {"api_key": KEY_B})
    assert rotated.status_code == 302
    assert rotated["Location"] == url(tenant)
    assert stored_credentials(saved) == {"api_key": KEY_B}
    assert saved.credentials_mask == {"api_key": "…3210"}
    assert version(tenant) == 2
    upstream.keys_accepted = {KEY_B}  # the old key revoked at the provider
    served = chat(gateway, api_token.raw)
    assert served.status_code == 200 and upstream.keys[-1] == KEY_B
    event = AuditEvent.objects.get(tenant=tenant, action="provider_model.rotate")
    assert event.actor == user and event.data == {"fields": ["api_key"]}
    listing = client.get(url(tenant))
    assert "…3210" in listing.content.decode()
    assert secrets_in(listing, KEY_A, KEY_B) == []


def test_rotation_is_refused_when_the_base_url_is_no_longer_public(
    client, tenant, upstream, saved, settings
):
    settings.CASCADEFLOW_ALLOW_PRIVATE_CALLBACKS = False
    login(client, tenant, MemberRole.ADMIN)
    upstream.keys_accepted = {KEY_A, KEY_B}

    page = client.post(url(tenant, f"{saved.pk}/rotate/"), {"api_key": KEY_B})

    assert page.status_code == 200
    assert "not a public address" in page.content.decode()
    assert upstream.keys == []
    assert stored_credentials(saved) == {"api_key": KEY_A}


def test_a_rotation_racing_another_stores_nothing_unvalidated(
    client, tenant, upstream, saved, monkeypatch
):
    """Someone else rotates while this key is being checked: this one is refused rather
    than overwriting theirs with a combination nobody validated."""
    login(client, tenant, MemberRole.ADMIN)
    theirs = crypto.encrypt(json.dumps({"api_key": KEY_B}))

    def meanwhile(spec):
        TenantProviderModel.objects.filter(pk=saved.pk).update(credentials_encrypted=theirs)

    monkeypatch.setattr(tenant_models, "validate_call", meanwhile)
    page = client.post(url(tenant, f"{saved.pk}/rotate/"), {"api_key": WRONG})

    assert page.status_code == 200
    assert "changed meanwhile" in page.content.decode()
    assert stored_credentials(saved) == {"api_key": KEY_B}


def test_rotation_replaces_only_the_secrets_given(client, tenant, upstream, monkeypatch):
    """A Bedrock model: the form asks for its secrets; those left empty are kept, and the
    region (not a secret) is not asked for."""
    monkeypatch.setattr(tenant_models, "validate_call", lambda spec: None)
    row = tenant_models.provider_model_create(
        tenant=tenant,
        name="acme/claude",
        litellm_model="bedrock/anthropic.claude-3-haiku-20240307-v1:0",
        credentials={
            "aws_access_key_id": "AKIAOLDOLDOLDOLD",
            "aws_secret_access_key": "old-secret-0123456789",
            "aws_region_name": "us-east-1",
        },
        input_usd_per_mtok="0.25",
        output_usd_per_mtok="1.25",
    )
    login(client, tenant, MemberRole.ADMIN)

    page = client.get(url(tenant, f"{row.pk}/rotate/"))
    assert set(page.context["form"].fields) == {"aws_access_key_id", "aws_secret_access_key"}
    rotated = client.post(
        url(tenant, f"{row.pk}/rotate/"),
        {"aws_access_key_id": "", "aws_secret_access_key": "new-secret-9876543210"},
    )

    assert rotated.status_code == 302
    assert stored_credentials(row) == {
        "aws_access_key_id": "AKIAOLDOLDOLDOLD",
        "aws_secret_access_key": "new-secret-9876543210",
        "aws_region_name": "us-east-1",
    }
    assert row.credentials_mask["aws_secret_access_key"] == "…3210"
    assert row.credentials_mask["aws_region_name"] == "us-east-1"


# --- deleting --------------------------------------------------------------------------


def test_an_admin_deletes_a_model(client, tenant, upstream, saved):
    user = login(client, tenant, MemberRole.ADMIN)

    deleted = client.post(url(tenant, f"{saved.pk}/delete/"))

    assert deleted.status_code == 302 and deleted["Location"] == url(tenant)
    assert not TenantProviderModel.objects.exists()
    assert version(tenant) == 2
    assert AuditEvent.objects.get(tenant=tenant, action="provider_model.delete").actor == user
    assert client.get(url(tenant, f"{saved.pk}/rotate/")).status_code == 404
    assert "No provider models yet" in client.get(url(tenant)).content.decode()
    assert client.get(url(tenant, f"{saved.pk}/delete/")).status_code == 405  # POST only


# --- hostile input ---------------------------------------------------------------------


@pytest.mark.parametrize(
    ("change", "field"),
    [
        ({"name": "a" * 101}, "name"),
        ({"name": "Has Spaces"}, "name"),
        ({"name": "a/b/c"}, "name"),
        ({"name": "cascade/mine"}, "name"),
        ({"name": "demo/small"}, "name"),
        ({"name": "x\x00y"}, "name"),
        ({"name": ""}, "name"),
        ({"model": "m" * 151}, "model"),
        ({"model": "has spaces"}, "model"),
        ({"provider": "nope"}, "provider"),
        ({"api_key": "k" * (tenant_models.MAX_CREDENTIAL + 1)}, "api_key"),
        ({"api_key": ""}, "api_key"),
        ({"api_base": ""}, "api_base"),
        ({"api_base": "https://example.com/" + "p" * 200}, "api_base"),
        ({"api_base": "not a url"}, "api_base"),
        ({"api_base": "ftp://example.com/v1"}, "api_base"),
        ({"api_base": "javascript:alert(1)"}, "api_base"),
        ({"input_usd_per_mtok": "abc"}, "input_usd_per_mtok"),
        ({"input_usd_per_mtok": "-1"}, "input_usd_per_mtok"),
        ({"input_usd_per_mtok": "10001"}, "input_usd_per_mtok"),
        ({"input_usd_per_mtok": "NaN"}, "input_usd_per_mtok"),
        ({"output_usd_per_mtok": "Infinity"}, "output_usd_per_mtok"),
        ({"output_usd_per_mtok": "1e400"}, "output_usd_per_mtok"),
        ({"output_usd_per_mtok": "0.0000001"}, "output_usd_per_mtok"),
        ({"output_usd_per_mtok": "9" * 5000}, "output_usd_per_mtok"),
        ({"provider": "azure", "model": "dep", "api_version": ""}, "api_version"),
        ({"provider": "azure", "model": "dep", "api_version": "v" * 41}, "api_version"),
        ({"provider": "bedrock", "model": "m", "aws_access_key_id": "AKIA"}, "aws_region_name"),
        ({"provider": "vertex_ai", "model": "gemini-1.5-flash"}, "vertex_credentials"),
    ],
)
def test_hostile_input_is_a_form_error_and_saves_nothing(client, tenant, upstream, change, field):
    login(client, tenant, MemberRole.ADMIN)

    page = client.post(url(tenant), form(upstream, **change))

    assert page.status_code == 200
    errors = page.context["form"].errors
    assert field in errors, (change, errors)
    assert b"errorlist" in page.content
    assert upstream.keys == []  # refused before any call
    assert not TenantProviderModel.objects.exists()
    assert secrets_in(page, KEY_A) == []


def test_prices_default_to_litellms_and_are_required_where_it_has_none(client, tenant, upstream):
    login(client, tenant, MemberRole.ADMIN)
    upstream.keys_accepted = {KEY_A}

    unknown = client.post(
        url(tenant), form(upstream, input_usd_per_mtok="", output_usd_per_mtok="")
    )
    assert unknown.status_code == 200
    assert "LiteLLM has no price" in " ".join(unknown.context["form"].errors["input_usd_per_mtok"])
    assert upstream.keys == []

    known = client.post(
        url(tenant),
        form(upstream, model="gpt-4o-mini", input_usd_per_mtok="", output_usd_per_mtok=""),
    )
    assert known.status_code == 302
    row = TenantProviderModel.objects.get(tenant=tenant)
    assert row.input_usd_per_mtok > 0 and row.output_usd_per_mtok > 0


@pytest.mark.parametrize(
    "data",
    [
        {},
        {"api_key": ""},
        {"api_key": "k" * (tenant_models.MAX_CREDENTIAL + 1)},
        {"api_key": "x\x00y"},
        {"name": "acme/renamed"},  # not a field of rotation: ignored, and no key given
    ],
)
def test_hostile_rotation_input_is_a_form_error(client, tenant, upstream, saved, data):
    login(client, tenant, MemberRole.ADMIN)

    page = client.post(url(tenant, f"{saved.pk}/rotate/"), data)

    assert page.status_code == 200
    assert b"errorlist" in page.content
    assert upstream.keys == []
    assert stored_credentials(saved) == {"api_key": KEY_A}
    assert TenantProviderModel.objects.get().name == "acme/own-gpt"


def test_a_secret_textarea_is_not_shown_again_either(client, tenant, upstream):
    login(client, tenant, MemberRole.ADMIN)
    service_account = '{"type": "service_account", "private_key": "-----BEGIN PRIVATE KEY-----"}'

    page = client.post(
        url(tenant),
        {
            "provider": "vertex_ai",
            "name": "Bad Name",
            "model": "gemini-1.5-flash",
            "vertex_credentials": service_account,
            "vertex_project": "acme-prod",
        },
    )

    assert page.status_code == 200 and "name" in page.context["form"].errors
    assert b"BEGIN PRIVATE KEY" not in page.content and b"service_account" not in page.content
    assert b"acme-prod" in page.content  # not a secret: kept in the form


# --- the form's providers --------------------------------------------------------------


@pytest.mark.parametrize(
    ("data", "litellm_model", "credentials", "api_base"),
    [
        ({"provider": "openai", "model": "gpt-4o"}, "openai/gpt-4o", {"api_key": "k"}, ""),
        ({"provider": "openai", "model": "openai/gpt-4o"}, "openai/gpt-4o", {"api_key": "k"}, ""),
        (
            {"provider": "compatible", "model": "openai/gpt-oss-20b", "api_base": "https://h/v1"},
            "openai/openai/gpt-oss-20b",  # a vLLM model whose own name starts with openai/
            {"api_key": "k"},
            "https://h/v1",
        ),
        (
            {
                "provider": "azure",
                "model": "prod-4o",
                "api_base": "https://acme.openai.azure.com",
                "api_version": "2024-10-21",
            },
            "azure/prod-4o",
            {"api_key": "k"},
            "https://acme.openai.azure.com",
        ),
        (
            {"provider": "anthropic", "model": "claude-3-5-haiku"},
            "anthropic/claude-3-5-haiku",
            {"api_key": "k"},
            "",
        ),
        (
            {"provider": "groq", "model": "llama-3.1-8b-instant"},
            "groq/llama-3.1-8b-instant",
            {"api_key": "k"},
            "",
        ),
        (
            {"provider": "together_ai", "model": "meta-llama/Llama-3-8b"},
            "together_ai/meta-llama/Llama-3-8b",
            {"api_key": "k"},
            "",
        ),
        (
            {
                "provider": "bedrock",
                "model": "anthropic.claude-3-haiku-20240307-v1:0",
                "api_key": "ignored",
                "aws_access_key_id": "AKIA1",
                "aws_secret_access_key": "s",
                "aws_region_name": "eu-west-1",
            },
            "bedrock/anthropic.claude-3-haiku-20240307-v1:0",
            {
                "aws_access_key_id": "AKIA1",
                "aws_secret_access_key": "s",
                "aws_region_name": "eu-west-1",
            },
            "",
        ),
        (
            {
                "provider": "vertex_ai",
                "model": "gemini-1.5-flash",
                "vertex_credentials": "{}",
                "vertex_project": "p",
                "api_base": "https://ignored.example.com",
            },
            "vertex_ai/gemini-1.5-flash",
            {"vertex_credentials": "{}", "vertex_project": "p"},
            "",
        ),
        (
            {"provider": "other", "model": "mistral/mistral-small-latest"},
            "mistral/mistral-small-latest",
            {"api_key": "k"},
            "",
        ),
    ],
)
def test_each_provider_sends_the_service_what_it_needs(data, litellm_model, credentials, api_base):
    from dashboard.forms import ProviderModelForm

    bound = ProviderModelForm({"name": "acme/x", "api_key": "k", **data})

    assert bound.is_valid(), bound.errors
    values = bound.values()
    assert values["litellm_model"] == litellm_model
    assert values["credentials"] == credentials
    assert values["api_base"] == api_base


def test_the_forms_credential_fields_are_the_services():
    from dashboard.forms import CREDENTIAL_LABELS, PROVIDERS, ProviderModelForm

    assert set(CREDENTIAL_LABELS) == tenant_models.CREDENTIAL_KEYS
    for provider in PROVIDERS.values():
        assert set(provider.required) <= set(provider.fields) <= set(ProviderModelForm.OPTIONAL)


def test_a_user_of_no_tenant_and_an_anonymous_one_are_kept_out(client, tenant):
    assert client.get(url(tenant)).status_code == 302  # to the login page
    client.force_login(UserFactory())
    assert client.get(url(tenant)).status_code == 404


@pytest.mark.parametrize(
    ("litellm_model", "api_base", "shown"),
    [
        ("openai/gpt-4o", "", "OpenAI"),
        ("openai/llama3.1:8b", "https://ollama.example.com/v1", "OpenAI-compatible"),
        ("azure/prod-4o", "https://acme.openai.azure.com", "Azure OpenAI"),
        ("bedrock/anthropic.claude-3-haiku-20240307-v1:0", "", "AWS Bedrock"),
        ("vertex_ai/gemini-1.5-flash", "", "Google Vertex AI"),
        ("mistral/mistral-small-latest", "", "mistral"),
    ],
)
def test_the_list_names_each_models_provider(litellm_model, api_base, shown):
    from dashboard.manage_views import ProviderModelRow

    row = ProviderModelRow(TenantProviderModel(litellm_model=litellm_model, api_base=api_base))
    assert row.provider == shown
    assert row.upstream == litellm_model.split("/", 1)[1]
