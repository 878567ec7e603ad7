"""Checkout and portal (the customer link made once), and usage metering that never double-bills."""

from datetime import timedelta

import pytest
from django.core.management import call_command
from django.utils import timezone

from billing.metering import NANOS_PER_CENT, reconcile
from billing.models import TenantSubscription, UsageReport
from billing.tasks import usage_report
from routing.models import UsageEvent
from tenants.enums import MemberRole
from tests.factories import MemberFactory, UsageEventFactory, UserFactory
from tests.support.fake_stripe import FakeStripe

pytestmark = pytest.mark.django_db


@pytest.fixture
def fake_stripe(settings):
    server = FakeStripe().start()
    settings.STRIPE_API_BASE = server.base
    settings.STRIPE_API_KEY = "sk_test_fake"
    yield server
    server.stop()


@pytest.fixture
def pro(db):
    from tenants.models import Tier

    return Tier.objects.create(
        slug="pro", name="Pro", stripe_product_id="prod_1", stripe_price_ids=["price_pro"]
    )


def login(client, tenant, role):
    user = UserFactory()
    MemberFactory(tenant=tenant, user=user, role=role)
    client.force_login(user)
    return user


def test_owner_checkout_redirects_to_stripe_and_reuses_the_customer(
    client, tenant, pro, fake_stripe
):
    login(client, tenant, MemberRole.OWNER)

    first = client.post(f"/billing/{tenant.slug}/checkout/pro/")
    second = client.post(f"/billing/{tenant.slug}/checkout/pro/")

    assert first.status_code == 303
    assert first["Location"].startswith("https://checkout.stripe.test/")
    assert second.status_code == 303
    assert len(fake_stripe.customers) == 1  # created once, reused
    link = TenantSubscription.objects.get(tenant=tenant)
    session = fake_stripe.checkout_sessions[-1]
    assert session["customer"] == link.stripe_customer_id
    assert session["client_reference_id"] == tenant.slug
    assert session["line_items"]["0"]["price"] == "price_pro"
    assert session["mode"] == "subscription"


def test_owner_checkout_returns_to_the_dashboard_billing_page(client, tenant, pro, fake_stripe):
    login(client, tenant, MemberRole.OWNER)

    client.post(f"/billing/{tenant.slug}/checkout/pro/")

    session = fake_stripe.checkout_sessions[-1]
    page = f"http://testserver/dashboard/t/{tenant.slug}/billing/"
    assert session["success_url"] == f"{page}?checkout=success"
    assert session["cancel_url"] == f"{page}?checkout=cancelled"


def test_checkout_is_for_owners_only(client, tenant, pro, fake_stripe):
    for role in (MemberRole.ADMIN, MemberRole.VIEWER):
        login(client, tenant, role)
        assert client.post(f"/billing/{tenant.slug}/checkout/pro/").status_code == 403
    assert fake_stripe.checkout_sessions == []
    assert not TenantSubscription.objects.filter(tenant=tenant).exists()


def test_portal_for_owners_only_and_never_for_another_tenant(
    client, tenant, other_tenant, fake_stripe
):
    login(client, tenant, MemberRole.OWNER)
    response = client.post(f"/billing/{tenant.slug}/portal/")
    assert response.status_code == 303
    assert fake_stripe.portal_sessions[-1]["return_url"] == (
        f"http://testserver/dashboard/t/{tenant.slug}/billing/"
    )
    assert client.post(f"/billing/{other_tenant.slug}/portal/").status_code == 404

    for role in (MemberRole.ADMIN, MemberRole.VIEWER):
        login(client, tenant, role)
        assert client.post(f"/billing/{tenant.slug}/portal/").status_code == 403
    assert len(fake_stripe.portal_sessions) == 1


@pytest.mark.parametrize("path", ["checkout/pro/", "portal/"])
def test_a_deactivated_tenant_is_not_found_even_by_its_owner(
    client, tenant, pro, fake_stripe, path
):
    """The same membership rule as the dashboard: an inactive tenant does not exist."""
    login(client, tenant, MemberRole.OWNER)
    tenant.is_active = False
    tenant.save(update_fields=["is_active"])

    assert client.post(f"/billing/{tenant.slug}/{path}").status_code == 404
    assert fake_stripe.checkout_sessions == [] and fake_stripe.portal_sessions == []


def events(tenant, hours_ago, nanos, n=3):
    when = timezone.now() - timedelta(hours=hours_ago)
    for i in range(n):
        UsageEventFactory(
            tenant=tenant,
            request_id=f"req_{hours_ago}_{i}_{nanos}",
            created_at=when,
            cost_nanos=nanos,
            baseline_cost_nanos=0,
        )


def test_metering_retry_sends_the_same_identifier_and_bills_once(tenant, fake_stripe, settings):
    link = TenantSubscription.objects.create(tenant=tenant, stripe_customer_id="cus_meter")
    fake_stripe.customers["cus_meter"] = {"id": "cus_meter", "metadata": {}}
    events(tenant, hours_ago=5, nanos=3 * NANOS_PER_CENT + 4_000_000)  # 3.4 cents each
    events(tenant, hours_ago=3, nanos=1_500_000_000)  # $1.50 each
    fake_stripe.fail_next_meter_posts = 1

    # The first send fails; the task's automatic retry re-sends the same identifier.
    usage_report.apply(args=[tenant.pk], throw=True)
    usage_report.apply(args=[tenant.pk], throw=True)  # nothing new: no resend

    ledger = sum(UsageEvent.objects.filter(tenant=tenant).values_list("cost_nanos", flat=True))
    assert fake_stripe.billed_cents("cus_meter") == ledger // NANOS_PER_CENT == 460
    assert len(fake_stripe.meter_events) == 2  # one per billed hour
    retried = [k for k in fake_stripe.idempotency_keys if k.startswith("cf-usage-")]
    assert len(retried) == 3 and len(set(retried)) == 2  # the retry re-used its identifier
    assert UsageReport.objects.filter(tenant=tenant, reported_at__isnull=True).count() == 0
    assert link.stripe_customer_id == "cus_meter"


def test_reconciliation_reports_no_difference(tenant, fake_stripe, capsys):
    TenantSubscription.objects.create(tenant=tenant, stripe_customer_id="cus_rec")
    events(tenant, hours_ago=2, nanos=12_345_678)
    usage_report.apply(args=[tenant.pk], throw=True)

    result = reconcile(tenant_id=tenant.pk, now=timezone.now())
    call_command("reconcile_stripe_usage", "--tenant", tenant.slug)

    assert result.difference_cents == 0
    assert result.reported_cents == 3 * 12_345_678 // NANOS_PER_CENT
    assert tenant.slug in capsys.readouterr().out


@pytest.mark.parametrize("meters_byok", [False, True])
def test_what_the_tenants_own_keys_paid_is_billed_only_if_its_plan_says(
    tenant, fake_stripe, meters_byok
):
    from tenants.models import Tenant, Tier

    plan = Tier.objects.create(slug=f"byok-{meters_byok}", name="BYOK", meters_byok=meters_byok)
    Tenant.objects.filter(pk=tenant.pk).update(tier=plan)
    TenantSubscription.objects.create(tenant=tenant, stripe_customer_id="cus_byok")
    fake_stripe.customers["cus_byok"] = {"id": "cus_byok", "metadata": {}}
    events(tenant, hours_ago=3, nanos=50 * NANOS_PER_CENT)  # 3 x 50 cents on the platform
    when = timezone.now() - timedelta(hours=3)
    for i in range(2):  # 2 x 80 cents, of which the tenant's own key paid 60
        UsageEventFactory(
            tenant=tenant,
            request_id=f"req_byok_{i}",
            created_at=when,
            requested_model="acme/own",
            cost_nanos=80 * NANOS_PER_CENT,
            baseline_cost_nanos=0,
            byok_cost_nanos=60 * NANOS_PER_CENT,
        )
    usage_report.apply(args=[tenant.pk], throw=True)

    expected = 150 + 160 if meters_byok else 150 + 40
    assert fake_stripe.billed_cents("cus_byok") == expected
    assert reconcile(tenant_id=tenant.pk, now=timezone.now()).difference_cents == 0
