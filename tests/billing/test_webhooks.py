"""Stripe webhooks: signed payloads shaped like Stripe's (API version pinned by stripe-python)."""

import hashlib
import hmac
import json
import time
import uuid
from datetime import timedelta

import pytest
import stripe
from django.utils import timezone

from billing.models import StripeEvent, TenantSubscription
from billing.services import grace_expire
from tenants.models import AuditEvent, Tier
from tenants.selectors import token_context_for_raw
from tenants.services import tier_ensure_defaults

pytestmark = pytest.mark.django_db(transaction=True)
SECRET = "whsec_test_secret"
URL = "/billing/stripe/webhook/"


@pytest.fixture(autouse=True)
def stripe_settings(settings):
    settings.STRIPE_WEBHOOK_SECRET = SECRET
    tier_ensure_defaults()


def event(kind, obj, created=None, event_id=None):
    return {
        "id": event_id or f"evt_{uuid.uuid4().hex[:24]}",
        "object": "event",
        "api_version": stripe.api_version,
        "created": created or int(time.time()),
        "type": kind,
        "livemode": False,
        "pending_webhooks": 1,
        "request": {"id": None, "idempotency_key": None},
        "data": {"object": obj},
    }


def deliver(client, payload, secret=SECRET, timestamp=None):
    body = json.dumps(payload)
    t = timestamp or int(time.time())
    signature = hmac.new(secret.encode(), f"{t}.{body}".encode(), hashlib.sha256).hexdigest()
    return client.post(
        URL,
        data=body,
        content_type="application/json",
        HTTP_STRIPE_SIGNATURE=f"t={t},v1={signature}",
    )


def product(tier="pro", **metadata):
    return {
        "id": "prod_pro",
        "object": "product",
        "name": "Pro",
        "active": True,
        "metadata": {"cascadeflow_tier": tier, **metadata},
    }


def price(price_id="price_pro_monthly"):
    return {
        "id": price_id,
        "object": "price",
        "product": "prod_pro",
        "active": True,
        "unit_amount": 4900,
        "currency": "usd",
        "recurring": {"interval": "month"},
    }


def subscription(status="active", customer="cus_acme", price_id="price_pro_monthly", **extra):
    return {
        "id": "sub_acme",
        "object": "subscription",
        "customer": customer,
        "status": status,
        "cancel_at_period_end": False,
        "metadata": {},
        "items": {
            "object": "list",
            "data": [
                {
                    "id": "si_1",
                    "object": "subscription_item",
                    "price": price(price_id),
                    "current_period_end": int(time.time()) + 30 * 86400,
                }
            ],
        },
        **extra,
    }


@pytest.fixture
def pro_plan(client):
    deliver(
        client,
        event(
            "product.created",
            product(
                rpm="600",
                tpm="200000",
                monthly_budget_usd="49.5",
                allowed_models="demo/small,demo/medium",
            ),
        ),
    )
    deliver(client, event("price.created", price()))
    return Tier.objects.get(slug="pro")


@pytest.fixture
def subscribed(client, tenant, api_token, pro_plan):
    deliver(
        client,
        event(
            "checkout.session.completed",
            {
                "id": "cs_1",
                "object": "checkout.session",
                "client_reference_id": tenant.slug,
                "customer": "cus_acme",
                "subscription": "sub_acme",
                "mode": "subscription",
            },
        ),
    )
    deliver(
        client,
        event("customer.subscription.created", subscription(), created=int(time.time()) - 100),
    )
    tenant.refresh_from_db()
    return tenant


def test_forged_signature_is_refused_and_nothing_stored(client):
    response = deliver(client, event("invoice.paid", {"customer": "cus_x"}), secret="whsec_wrong")

    assert response.status_code == 400
    assert response.json()["error"]["code"] == "invalid_signature"
    assert StripeEvent.objects.count() == 0


def test_stale_timestamp_is_refused(client):
    response = deliver(
        client, event("invoice.paid", {"customer": "cus_x"}), timestamp=int(time.time()) - 3600
    )

    assert response.status_code == 400
    assert StripeEvent.objects.count() == 0


def test_product_and_price_events_sync_the_tier(pro_plan):
    assert pro_plan.name == "Pro"
    assert (pro_plan.requests_per_minute, pro_plan.tokens_per_minute) == (600, 200000)
    assert pro_plan.monthly_budget_nanos == 49_500_000_000
    assert pro_plan.allowed_models == ["demo/small", "demo/medium"]
    assert pro_plan.stripe_price_ids == ["price_pro_monthly"]


def test_subscription_moves_the_tenant_to_the_plan_and_the_gateway_sees_it(subscribed, api_token):
    assert subscribed.tier.slug == "pro"
    context = token_context_for_raw(raw=api_token.raw, now=timezone.now())
    assert (context.tenant_rpm, context.tenant_tpm) == (600, 200000)
    assert context.tier_allowed_models == ("demo/small", "demo/medium")
    assert (
        AuditEvent.objects.filter(tenant=subscribed, action="plan.change", target="pro").count()
        == 1
    )


def test_duplicate_delivery_is_processed_once(client, subscribed):
    payload = event(
        "invoice.payment_failed", {"id": "in_1", "customer": "cus_acme"}, event_id="evt_dup"
    )

    first = deliver(client, payload)
    second = deliver(client, payload)

    assert first.json() == {"received": True, "duplicate": False}
    assert second.json() == {"received": True, "duplicate": True}
    assert StripeEvent.objects.filter(event_id="evt_dup").count() == 1
    assert StripeEvent.objects.get(event_id="evt_dup").processed_at is not None


def test_an_older_update_arriving_late_never_rolls_back(client, subscribed):
    now = int(time.time())
    deliver(client, event("customer.subscription.updated", subscription("active"), created=now))
    response = deliver(
        client, event("customer.subscription.updated", subscription("past_due"), created=now - 50)
    )

    assert response.status_code == 200
    sub = TenantSubscription.objects.get(tenant=subscribed)
    assert sub.status == "active"
    assert "ignored: older" in StripeEvent.objects.order_by("-id").first().outcome


def test_payment_failure_grace_then_degrade_then_paid_restores(client, subscribed, settings):
    settings.CASCADEFLOW_BILLING_GRACE_DAYS = 3
    deliver(client, event("invoice.payment_failed", {"id": "in_2", "customer": "cus_acme"}))
    subscribed.refresh_from_db()
    assert subscribed.tier.slug == "pro"  # still in the grace period

    assert grace_expire(now=timezone.now() + timedelta(days=2)) == 0
    assert grace_expire(now=timezone.now() + timedelta(days=4)) == 1
    subscribed.refresh_from_db()
    assert subscribed.tier.slug == "free"

    deliver(
        client,
        event("invoice.paid", {"id": "in_2", "customer": "cus_acme"}, created=int(time.time()) + 5),
    )
    subscribed.refresh_from_db()
    assert subscribed.tier.slug == "pro"
    assert TenantSubscription.objects.get(tenant=subscribed).grace_until is None


def test_cancellation_at_period_end_keeps_the_plan_until_deleted(client, subscribed):
    now = int(time.time())
    deliver(
        client,
        event(
            "customer.subscription.updated",
            subscription("active", cancel_at_period_end=True),
            created=now,
        ),
    )
    subscribed.refresh_from_db()
    assert subscribed.tier.slug == "pro"
    assert TenantSubscription.objects.get(tenant=subscribed).cancel_at_period_end

    deliver(
        client, event("customer.subscription.deleted", subscription("canceled"), created=now + 10)
    )
    subscribed.refresh_from_db()
    assert subscribed.tier.slug == "free"


def test_unknown_event_types_are_stored_and_ignored(client):
    response = deliver(client, event("customer.tax_id.created", {"id": "txi_1"}))

    assert response.status_code == 200
    stored = StripeEvent.objects.get()
    assert stored.outcome.startswith("ignored")
