import pytest

from tenants.enums import MemberRole
from tests.factories import MemberFactory, TenantFactory, UserFactory

pytestmark = pytest.mark.django_db


def test_dashboard_needs_login(client):
    response = client.get("/dashboard/")

    assert response.status_code == 302
    assert response["Location"].startswith("/accounts/login/")


def test_home_redirects_to_the_last_tenant_viewed(client, tenant):
    user = UserFactory()
    second = TenantFactory(slug="initech", name="Initech")
    MemberFactory(tenant=tenant, user=user, role=MemberRole.VIEWER)
    MemberFactory(tenant=second, user=user, role=MemberRole.ADMIN)
    client.force_login(user)

    assert client.get("/dashboard/")["Location"] == f"/dashboard/t/{tenant.slug}/"
    client.get("/dashboard/t/initech/")
    assert client.get("/dashboard/")["Location"] == "/dashboard/t/initech/"


def test_a_user_without_tenants_is_offered_sign_up(client):
    client.force_login(UserFactory())

    page = client.get("/dashboard/")

    assert page.status_code == 200
    assert b"/accounts/signup/" in page.content


def test_a_member_of_a_gets_404_on_b(client, tenant, other_tenant):
    user = UserFactory()
    MemberFactory(tenant=tenant, user=user, role=MemberRole.OWNER)
    client.force_login(user)

    assert client.get(f"/dashboard/t/{tenant.slug}/").status_code == 200
    assert client.get(f"/dashboard/t/{other_tenant.slug}/").status_code == 404


@pytest.mark.parametrize(
    ("nanos", "text"),
    [
        (0, "$0.00"),
        (1_234_567_890_123, "$1,234.57"),
        (8_153_000, "$0.008153"),
        (-280_000_000, "-$0.28"),
        (-2_638_000, "-$0.002638"),
    ],
)
def test_money_is_formatted_as_dollars(nanos, text):
    from dashboard.templatetags.money import usd

    assert usd(nanos) == text


def test_favicon_is_served_for_pages_that_name_none(client):
    response = client.get("/favicon.ico")

    assert response.status_code == 301
    assert response["Location"].endswith("dashboard/favicon.svg")


def test_every_page_names_its_icon(client):
    page = client.get("/accounts/login/")

    assert b'rel="icon"' in page.content and b"favicon.svg" in page.content


@pytest.mark.parametrize(("value", "text"), [(0, "0"), (4131, "4,131"), (1_234_567, "1,234,567")])
def test_counts_are_written_as_the_live_view_writes_them(value, text):
    from dashboard.templatetags.money import count

    assert count(value) == text
