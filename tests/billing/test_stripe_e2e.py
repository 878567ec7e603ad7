"""End to end against a local Stripe test server (localstripe): plans -> sync -> subscribe -> webhook."""

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
from django.core.management import call_command
from django.utils import timezone

from billing.stripe_api import client
from tenants.models import Tier
from tenants.selectors import token_context_for_raw
from tenants.services import tier_ensure_defaults
from tests.billing.test_webhooks import SECRET, deliver, event

pytestmark = pytest.mark.django_db(transaction=True)


@pytest.fixture(scope="module")
def localstripe():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    executable = Path(sys.executable).with_name("localstripe")
    process = subprocess.Popen(
        [str(executable), "--port", str(port), "--from-scratch"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        env={**os.environ},
    )
    base = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        try:
            httpx.get(
                f"{base}/v1/products", timeout=1, headers={"Authorization": "Bearer sk_test_x"}
            )
            break
        except httpx.HTTPError:
            time.sleep(0.1)
    yield base
    process.terminate()
    process.wait(timeout=10)


@pytest.fixture
def stripe_local(localstripe, settings):
    settings.STRIPE_API_BASE = localstripe
    settings.STRIPE_API_KEY = "sk_test_cascadeflow"
    settings.STRIPE_WEBHOOK_SECRET = SECRET
    tier_ensure_defaults()
    return client()


def test_plan_sync_subscription_webhook_and_cancellation(stripe_local, client, tenant, api_token):
    api = stripe_local
    product = api.v1.products.create(
        {
            "name": "Pro",
            "metadata": {
                "cascadeflow_tier": "pro",
                "rpm": "2",
                "tpm": "150000",
                "monthly_budget_usd": "25",
            },
        }
    )
    plan = api.v1.plans.create(
        {
            "product": product.id,
            "amount": 4900,
            "currency": "usd",
            "interval": "month",
        }
    )

    call_command("sync_stripe_plans")

    pro = Tier.objects.get(slug="pro")
    assert pro.stripe_product_id == product.id
    assert plan.id in pro.stripe_price_ids
    assert pro.requests_per_minute == 2
    assert [gateway(client, api_token) for _ in range(3)] == [200, 200, 200]  # free plan: no limit

    customer = api.v1.customers.create(
        {"email": "ops@acme.test", "metadata": {"cascadeflow_tenant": tenant.slug}}
    )
    method = api.v1.payment_methods.create(
        {
            "type": "card",
            "card": {"number": "4242424242424242", "exp_month": 12, "exp_year": 2030, "cvc": "123"},
        }
    )
    api.v1.payment_methods.attach(method.id, {"customer": customer.id})
    api.v1.customers.update(
        customer.id, {"invoice_settings": {"default_payment_method": method.id}}
    )
    subscription = api.v1.subscriptions.create(
        {"customer": customer.id, "items": [{"plan": plan.id}]}
    )

    response = deliver(
        client,
        event(
            "customer.subscription.created", subscription.to_dict(), created=int(time.time()) - 10
        ),
    )

    assert response.status_code == 200
    tenant.refresh_from_db()
    assert tenant.tier.slug == "pro"
    context = token_context_for_raw(raw=api_token.raw, now=timezone.now())
    assert (context.tenant_rpm, context.tenant_tpm) == (2, 150000)
    assert tenant.budgets.get(from_plan=True).limit_nanos == 25 * 10**9
    # The very next requests run under the new plan: its 2 requests per minute.
    assert [gateway(client, api_token) for _ in range(3)] == [200, 200, 429]

    canceled = api.v1.subscriptions.cancel(subscription.id)
    deliver(client, event("customer.subscription.deleted", canceled.to_dict()))

    tenant.refresh_from_db()
    assert tenant.tier.slug == "free"
    assert token_context_for_raw(raw=api_token.raw, now=timezone.now()).tenant_rpm is None
    assert not tenant.budgets.filter(from_plan=True).exists()


def gateway(client, api_token) -> int:
    response = client.post(
        "/v1/chat/completions",
        data=json.dumps({"model": "demo/small", "messages": [{"role": "user", "content": "Hi"}]}),
        content_type="application/json",
        HTTP_AUTHORIZATION=f"Bearer {api_token.raw}",
    )
    return response.status_code
