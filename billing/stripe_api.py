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
