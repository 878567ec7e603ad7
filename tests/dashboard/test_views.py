import pytest

from routing.models import UsageEvent
from tenants.enums import MemberRole
from tests.factories import MemberFactory, UserFactory

pytestmark = pytest.mark.django_db


def test_dashboard_needs_login(client):
    response = client.get("/dashboard/")

    assert response.status_code == 302
    assert response["Location"].startswith("/accounts/login/")


def test_dashboard_shows_only_the_members_tenants(client, tenant, other_tenant):
    user = UserFactory()
    MemberFactory(tenant=tenant, user=user, role=MemberRole.ADMIN)
    from django.utils import timezone

    for t, cost in ((tenant, 1_500_000_000), (other_tenant, 9_000_000_000)):
        UsageEvent.objects.create(
            tenant=t,
            request_id=f"req_{t.slug}",
            created_at=timezone.now(),
            requested_model="demo/small",
            status="ok",
            cost_nanos=cost,
        )
    client.force_login(user)

    page = client.get("/dashboard/").content.decode()

    assert "Acme" in page and "$1.50" in page
    assert "Globex" not in page and "$9.00" not in page
