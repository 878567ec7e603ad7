"""/api/v1/settings/: a tenant's own switches (audits, their cap, content in traces)."""

import pytest
from rest_framework.test import APIClient

from tenants.enums import Scope
from tenants.models import AuditEvent, Tenant
from tenants.services import token_create

URL = "/api/v1/settings/"


def client_for(tenant, scopes=(Scope.ADMIN,)):
    client = APIClient()
    raw = token_create(tenant=tenant, name="settings", scopes=list(scopes)).raw
    client.credentials(HTTP_AUTHORIZATION=f"Bearer {raw}")
    return client


def test_read_and_change_own_settings_only(tenant, other_tenant):
    mine = client_for(tenant)
    before = mine.get(URL)
    assert before.status_code == 200
    assert before.json() == {
        "audits_enabled": True,
        "audit_monthly_cap_nanos": tenant.audit_monthly_cap_nanos,
        "trace_content": False,
    }
    changed = mine.patch(URL, {"trace_content": True, "audit_monthly_cap_nanos": 7}, format="json")
    assert changed.status_code == 200, changed.content
    assert changed.json()["trace_content"] is True
    tenant.refresh_from_db()
    other_tenant.refresh_from_db()
    assert (tenant.trace_content, tenant.audit_monthly_cap_nanos) == (True, 7)
    assert other_tenant.trace_content is False
    assert other_tenant.audit_monthly_cap_nanos != 7
    [event] = AuditEvent.objects.filter(tenant=tenant, action="tenant.settings")
    assert event.data == {"trace_content": True, "audit_monthly_cap_nanos": 7}
    # Their client reads theirs.
    assert client_for(other_tenant).get(URL).json()["trace_content"] is False


@pytest.mark.parametrize(
    "body",
    [
        {},
        {"trace_content": "maybe"},
        {"trace_content": None},
        {"audit_monthly_cap_nanos": -1},
        {"audit_monthly_cap_nanos": 2**63},
        {"audit_monthly_cap_nanos": "1e3"},
        {"audits_enabled": [True]},
        ["trace_content"],
    ],
)
def test_bad_changes_are_400_and_change_nothing(tenant, body):
    response = client_for(tenant).patch(URL, body, format="json")
    assert response.status_code == 400, response.content
    assert "error" in response.json()
    tenant.refresh_from_db()
    assert tenant.trace_content is False and tenant.audits_enabled is True


def test_scopes(tenant):
    reader = client_for(tenant, scopes=(Scope.USAGE_READ,))
    assert reader.get(URL).status_code == 200
    assert reader.patch(URL, {"trace_content": True}, format="json").status_code == 403
    completions = client_for(tenant, scopes=(Scope.COMPLETIONS,))
    assert completions.get(URL).status_code == 403
    assert APIClient().get(URL).status_code == 401
    assert Tenant.objects.get(pk=tenant.pk).trace_content is False
