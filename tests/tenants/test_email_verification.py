"""A self-serve tenant's tokens are refused until its owner verified their email."""

import json

import pytest
from django.test import AsyncClient
from django.utils import timezone
from rest_framework.test import APIClient

from tenants.selectors import TokenInvalid, token_context_for_raw
from tenants.services import tenant_create, tenant_email_verify

pytestmark = pytest.mark.django_db(transaction=True)


@pytest.fixture
def unverified():
    created = tenant_create(slug="newcomer", email_verified=False)
    return created.tenant, created.issued.raw


def test_an_unverified_tenants_token_is_refused_with_the_reason(unverified):
    _, raw = unverified

    with pytest.raises(TokenInvalid, match="Verify your email"):
        token_context_for_raw(raw=raw, now=timezone.now())


async def test_the_gateway_answers_401_verify_your_email(unverified):
    _, raw = unverified

    response = await AsyncClient().post(
        "/v1/chat/completions",
        data=json.dumps({"model": "demo/small", "messages": [{"role": "user", "content": "hi"}]}),
        content_type="application/json",
        headers={"Authorization": f"Bearer {raw}"},
    )

    assert response.status_code == 401
    assert "Verify your email" in response.json()["error"]["message"]


def test_the_management_api_answers_401_verify_your_email(unverified):
    _, raw = unverified
    client = APIClient()
    client.credentials(HTTP_AUTHORIZATION=f"Bearer {raw}")

    response = client.get("/api/v1/usage/summary/")

    assert response.status_code == 401
    assert "Verify your email" in json.dumps(response.json())


def test_once_verified_the_token_works(unverified):
    tenant, raw = unverified

    assert tenant_email_verify(tenant=tenant, email="owner@example.test") is True
    assert tenant_email_verify(tenant=tenant, email="owner@example.test") is False

    assert token_context_for_raw(raw=raw, now=timezone.now()).tenant_id == tenant.pk


def test_tenants_an_operator_creates_are_verified(capsys):
    from django.core.management import call_command

    call_command("create_tenant", "operated")
    raw = capsys.readouterr().out.strip().splitlines()[-1]

    assert token_context_for_raw(raw=raw, now=timezone.now()).tenant_slug == "operated"
