"""The one place CascadeFlow talks to Stripe's API (money leaves nano-dollars only here)."""

from __future__ import annotations

import stripe
from django.conf import settings


def client() -> stripe.StripeClient:
    """A client on the pinned API version; ``STRIPE_API_BASE`` points it at a local test server."""
    base = settings.STRIPE_API_BASE or stripe.DEFAULT_API_BASE
    return stripe.StripeClient(
        settings.STRIPE_API_KEY,
        base_addresses={"api": base},
        max_network_retries=2,
    )


def _all(listing) -> list[dict]:
    return [item.to_dict() for item in listing.auto_paging_iter()]


def products_and_prices() -> tuple[list[dict], list[dict]]:
    """Every product and price; older accounts and test servers without Prices give Plans."""
    api = client()
    products = _all(api.v1.products.list({"limit": 100}))
    try:
        prices = _all(api.v1.prices.list({"limit": 100}))
    except stripe.InvalidRequestError:
        prices = []
    except stripe.APIError:
        prices = []
    if not prices:
        try:
            prices = _all(api.v1.plans.list({"limit": 100}))
        except stripe.StripeError:
            prices = []
    return products, prices


METER_EVENT_NAME = "cascadeflow_usage_cents"


def customer_create(*, tenant_slug: str, email: str | None) -> str:
    customer = client().v1.customers.create(
        {"email": email or "", "metadata": {"cascadeflow_tenant": tenant_slug}},
        {"idempotency_key": f"customer-{tenant_slug}"},
    )
    return customer.id


def checkout_session(
    *, customer: str, price: str, tenant_slug: str, success_url: str, cancel_url: str
) -> str:
    session = client().v1.checkout.sessions.create(
        {
            "mode": "subscription",
            "customer": customer,
            "client_reference_id": tenant_slug,
            "line_items": [{"price": price, "quantity": 1}],
            "subscription_data": {"metadata": {"cascadeflow_tenant": tenant_slug}},
            "success_url": success_url,
            "cancel_url": cancel_url,
        }
    )
    return session.url


def portal_session(*, customer: str, return_url: str) -> str:
    return (
        client()
        .v1.billing_portal.sessions.create({"customer": customer, "return_url": return_url})
        .url
    )


def meter_event(*, customer: str, cents: int, identifier: str, timestamp: int) -> None:
    """Report usage in cents; Stripe bills an identifier once, so retries are safe."""
    client().v1.billing.meter_events.create(
        {
            "event_name": METER_EVENT_NAME,
            "identifier": identifier,
            "timestamp": timestamp,
            "payload": {"stripe_customer_id": customer, "value": str(cents)},
        },
        {"idempotency_key": identifier},
    )
