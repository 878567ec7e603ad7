"""Stripe webhooks and plans, applied to tenants.

Invariants:
- Only a well-formed event is stored: signed by Stripe, a JSON object with a
  string ``id`` and ``type``, an integer ``created`` and an object
  ``data.object``. Anything else is refused (400) and leaves no row.
- An event is stored once (unique ``event_id``) and its effects applied once
  (``processed_at``, set under a row lock), however many times its task is
  sent: by the webhook, then by the outbox sweeper while it is not processed.
- A subscription never moves back to an older state: every change records the
  Stripe timestamp of the event that made it (``state_at``), and events older
  than that are ignored, whatever order deliveries arrive in.
- ``Tenant.tier`` is the plan in force, read by the gateway on every request:
  a change is visible to the next request, with no cache in between.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from decimal import Decimal, InvalidOperation

import stripe
from django.conf import settings
from django.db import IntegrityError, transaction
from django.utils import timezone

from billing import stripe_api
from billing.models import StripeEvent, TenantSubscription
from billing.stripe_api import client
from core import outbox
from core.money import usd_to_nanos
from tenants.models import (
    LEDGER_MAX_RETENTION_MONTHS,
    LEDGER_MIN_RETENTION_MONTHS,
    Tenant,
    Tier,
)
from tenants.services import plan_apply

PAID_STATUSES = {"active", "trialing"}
ENDED_STATUSES = {"canceled", "unpaid", "incomplete_expired"}


class WebhookRejected(Exception):
    code = "invalid_signature"


class WebhookMalformed(WebhookRejected):
    """Signed by Stripe, but not an event CascadeFlow can store and apply."""

    code = "invalid_payload"


def _no_constant(name: str) -> float:
    raise ValueError(f"{name} is not JSON")


def _event_shape(text: str) -> dict:
    """The event as a dict if it has the shape every handler relies on, else raise."""
    try:
        event = json.loads(text, parse_constant=_no_constant)
    except (ValueError, RecursionError):
        raise WebhookMalformed("the body is not JSON") from None
    if not isinstance(event, dict):
        raise WebhookMalformed("the body is not a JSON object")
    fields = {"id": 255, "type": 100}
    for name, max_length in fields.items():
        value = event.get(name)
        if not isinstance(value, str) or not value.strip() or len(value) > max_length:
            raise WebhookMalformed(f"'{name}' must be a string of 1 to {max_length} characters")
    created = event.get("created")
    if not isinstance(created, int) or isinstance(created, bool) or not 0 <= created < 2**53:
        raise WebhookMalformed("'created' must be a Unix timestamp")
    data = event.get("data")
    if not isinstance(data, dict) or not isinstance(data.get("object"), dict):
        raise WebhookMalformed("'data.object' must be an object")
    if not all(_storable(string) for string in _strings(event)):
        raise WebhookMalformed("the body contains a NUL character or a lone surrogate")
    return event


def _strings(value: object) -> Iterator[str]:
    """Every key and string value of parsed JSON, without recursion (nesting may be deep)."""
    stack = [value]
    while stack:
        item = stack.pop()
        if isinstance(item, str):
            yield item
        elif isinstance(item, dict):
            stack.extend(item.keys())
            stack.extend(item.values())
        elif isinstance(item, list):
            stack.extend(item)


def _storable(text: str) -> bool:
    """JSON may escape a NUL or a lone surrogate; a database JSON column holds neither."""
    if "\x00" in text:
        return False
    try:
        text.encode()
    except UnicodeEncodeError:
        return False
    return True


def webhook_verify(*, payload: bytes, signature: str | None) -> dict:
    """The event if Stripe signed it with our secret within the tolerance and it is
    well formed (see the module's invariants), else raise ``WebhookRejected``."""
    if not settings.STRIPE_WEBHOOK_SECRET:
        raise WebhookRejected("Stripe webhooks are not configured (STRIPE_WEBHOOK_SECRET).")
    try:
        text = payload.decode()
        stripe.WebhookSignature.verify_header(
            text,
            signature or "",
            settings.STRIPE_WEBHOOK_SECRET,
            tolerance=settings.STRIPE_WEBHOOK_TOLERANCE,
        )
    except (ValueError, stripe.SignatureVerificationError) as exc:
        raise WebhookRejected(str(exc) or exc.__class__.__name__) from None
    return _event_shape(text)


def event_store(*, event: dict) -> StripeEvent | None:
    """Store a verified event; None when it was already stored (a duplicate delivery)."""
    try:
        with transaction.atomic():
            return StripeEvent.objects.create(
                event_id=event["id"],
                type=event["type"],
                created=int(event["created"]),
                payload=event,
            )
    except IntegrityError:
        return None


def event_process(*, event_pk: int, now: datetime | None = None) -> str:
    """Apply one stored event, once. Returns what it did (kept on the event row).

    A failure rolls the event's effects back, keeps its one-line reason in
    ``last_error`` and re-raises; the sweeper sends the event again later.
    """
    now = now or timezone.now()
    try:
        with transaction.atomic():
            event = StripeEvent.objects.select_for_update().get(pk=event_pk)
            if event.processed_at is not None:
                return event.outcome
            outcome = _dispatch(event, now)
            event.processed_at = now
            event.outcome = outcome[:200]
            event.last_error = ""
            event.save(update_fields=["processed_at", "outcome", "last_error"])
    except Exception as exc:
        StripeEvent.objects.filter(pk=event_pk, processed_at__isnull=True).update(
            last_error=outbox.error_text(exc)
        )
        raise
    return outcome


def events_due(*, now: datetime) -> list[int]:
    """Stored events still not processed a grace period after they arrived, with attempts
    left: an attempt is counted on each and their ids are returned, to be sent again."""
    return outbox.claim_due(
        StripeEvent.objects.filter(processed_at__isnull=True, received_at__lt=now - outbox.GRACE),
        now=now,
    )


def events_given_up() -> int:
    """Events the sweeper has stopped sending: an operator must look at their ``last_error``."""
    return StripeEvent.objects.filter(
        processed_at__isnull=True, attempts__gte=outbox.MAX_ATTEMPTS
    ).count()


def _dispatch(event: StripeEvent, now: datetime) -> str:
    obj = event.payload.get("data", {}).get("object", {})
    kind = event.type
    if kind.startswith("product."):
        return plan_from_product(product=obj, deleted=kind == "product.deleted")
    if kind.startswith("price."):
        return plan_price(price=obj, deleted=kind == "price.deleted")
    if kind == "checkout.session.completed":
        return checkout_completed(session=obj)
    if kind.startswith("customer.subscription."):
        return subscription_apply(
            subscription=obj, at=event.created, deleted=kind.endswith(".deleted"), now=now
        )
    if kind == "invoice.paid":
        return invoice_paid(invoice=obj, at=event.created, now=now)
    if kind == "invoice.payment_failed":
        return invoice_failed(invoice=obj, at=event.created, now=now)
    return "ignored: not an event CascadeFlow acts on"


# --- plans ---------------------------------------------------------------------------


def _int_or_none(value) -> int | None:
    try:
        return int(value) if value not in (None, "") else None
    except (TypeError, ValueError):
        return None


def plan_from_product(*, product: dict, deleted: bool = False) -> str:
    """Create or update the tier a product's ``cascadeflow_tier`` metadata names."""
    metadata = product.get("metadata") or {}
    slug = metadata.get("cascadeflow_tier")
    if not slug:
        return "ignored: product has no cascadeflow_tier metadata"
    budget_nanos = None
    if metadata.get("monthly_budget_usd"):
        try:
            budget_nanos = usd_to_nanos(Decimal(metadata["monthly_budget_usd"]))
        except InvalidOperation:
            budget_nanos = None
    retention = _int_or_none(metadata.get("ledger_retention_months"))
    if retention is not None:  # the field's range; past it, the months are kept for good
        retention = max(retention, LEDGER_MIN_RETENTION_MONTHS)
        retention = None if retention > LEDGER_MAX_RETENTION_MONTHS else retention
    models_allowed = [
        m.strip() for m in (metadata.get("allowed_models") or "").split(",") if m.strip()
    ]
    tier, created = Tier.objects.update_or_create(
        slug=slug,
        defaults={
            "name": product.get("name") or slug,
            "stripe_product_id": "" if deleted else product.get("id", ""),
            "monthly_budget_nanos": budget_nanos,
            "requests_per_minute": _int_or_none(metadata.get("rpm")),
            "tokens_per_minute": _int_or_none(metadata.get("tpm")),
            "allowed_models": models_allowed,
            "ledger_retention_months": retention,
        },
    )
    return f"{'created' if created else 'updated'} tier {tier.slug}"


def plan_price(*, price: dict, deleted: bool = False) -> str:
    product_id = price.get("product")
    if isinstance(product_id, dict):
        product_id = product_id.get("id")
    tier = Tier.objects.filter(stripe_product_id=product_id).first()
    if tier is None:
        return "ignored: price of a product without a tier"
    ids = [p for p in tier.stripe_price_ids if p != price["id"]]
    if not deleted and price.get("active", True):
        ids.append(price["id"])
    tier.stripe_price_ids = ids
    tier.save(update_fields=["stripe_price_ids", "updated_at"])
    return f"tier {tier.slug} prices {len(ids)}"


def plans_sync(*, products: list[dict], prices: list[dict]) -> list[str]:
    """Full sync from Stripe's lists (``manage.py sync_stripe_plans``)."""
    done = [plan_from_product(product=p, deleted=not p.get("active", True)) for p in products]
    by_product: dict[str, list[str]] = {}
    for price in prices:
        if price.get("active", True):
            product_id = (
                price["product"] if isinstance(price["product"], str) else price["product"]["id"]
            )
            by_product.setdefault(product_id, []).append(price["id"])
    for tier in Tier.objects.exclude(stripe_product_id=""):
        tier.stripe_price_ids = sorted(by_product.get(tier.stripe_product_id, []))
        tier.save(update_fields=["stripe_price_ids", "updated_at"])
    return done


def _tier_for(subscription: dict) -> Tier | None:
    """The plan a subscription pays for: its price's tier, else its product's."""
    plans = list(Tier.objects.exclude(stripe_product_id=""))
    for item in (subscription.get("items") or {}).get("data") or []:
        price = item.get("price") or item.get("plan") or {}
        product = price.get("product")
        product_id = product.get("id") if isinstance(product, dict) else product
        for tier in plans:
            if price.get("id") in tier.stripe_price_ids:
                return tier
        for tier in plans:
            if tier.stripe_product_id == product_id:
                return tier
    return None


def _period_end(subscription: dict) -> datetime | None:
    value = subscription.get("current_period_end")
    if value is None:  # newer API versions keep it on the items
        items = (subscription.get("items") or {}).get("data") or []
        value = items[0].get("current_period_end") if items else None
    return datetime.fromtimestamp(int(value), tz=UTC) if value else None


def _default_tier() -> Tier | None:
    return Tier.objects.filter(is_default=True).first()


# --- subscriptions ------------------------------------------------------------------------


def checkout_completed(*, session: dict) -> str:
    """Link the Stripe customer to the tenant that started the checkout."""
    reference = session.get("client_reference_id") or (session.get("metadata") or {}).get(
        "cascadeflow_tenant"
    )
    customer = session.get("customer")
    tenant = Tenant.objects.filter(slug=reference).first() if reference else None
    if tenant is None or not customer:
        return "ignored: checkout without a known tenant or customer"
    sub, _ = TenantSubscription.objects.get_or_create(
        tenant=tenant, defaults={"stripe_customer_id": customer}
    )
    if session.get("subscription") and not sub.stripe_subscription_id:
        sub.stripe_subscription_id = session["subscription"]
        sub.save(update_fields=["stripe_subscription_id", "updated_at"])
    return f"linked {customer} to {tenant.slug}"


def _customer_metadata(customer: str) -> dict:
    """The customer's own metadata, from Stripe (a customer made outside our checkout)."""
    if not settings.STRIPE_API_KEY or not customer:
        return {}

    try:
        return dict(client().v1.customers.retrieve(customer).to_dict().get("metadata") or {})
    except stripe.StripeError:
        return {}


def _subscription_for(customer: str, metadata: dict) -> TenantSubscription | None:
    sub = (
        TenantSubscription.objects.select_for_update()
        .select_related("tenant")
        .filter(stripe_customer_id=customer)
        .first()
    )
    if sub is None and not metadata.get("cascadeflow_tenant"):
        metadata = _customer_metadata(customer)
    if sub is None and metadata.get("cascadeflow_tenant"):
        tenant = Tenant.objects.filter(slug=metadata["cascadeflow_tenant"]).first()
        if tenant is not None:
            sub, _ = TenantSubscription.objects.get_or_create(
                tenant=tenant, defaults={"stripe_customer_id": customer}
            )
            sub = (
                TenantSubscription.objects.select_for_update()
                .select_related("tenant")
                .get(pk=sub.pk)
            )
    return sub


def subscription_apply(*, subscription: dict, at: int, deleted: bool, now: datetime) -> str:
    sub = _subscription_for(subscription.get("customer", ""), subscription.get("metadata") or {})
    if sub is None:
        return "ignored: subscription of an unknown customer"
    if at < sub.state_at:
        return f"ignored: older than the state already applied ({at} < {sub.state_at})"
    status = "canceled" if deleted else subscription.get("status", "")
    tier = _tier_for(subscription) or sub.paid_tier
    sub.stripe_subscription_id = subscription.get("id", sub.stripe_subscription_id)
    sub.status = status
    sub.paid_tier = tier
    sub.current_period_end = _period_end(subscription)
    sub.cancel_at_period_end = bool(subscription.get("cancel_at_period_end"))
    sub.state_at = at
    if status in PAID_STATUSES:
        sub.grace_until = None
        plan_apply(tenant=sub.tenant, tier=tier, reason=f"subscription {status}")
    elif status == "past_due":
        sub.grace_until = sub.grace_until or now + timedelta(
            days=settings.CASCADEFLOW_BILLING_GRACE_DAYS
        )
    elif status in ENDED_STATUSES:
        sub.grace_until = None
        plan_apply(tenant=sub.tenant, tier=_default_tier(), reason=f"subscription {status}")
    sub.save()
    return f"{sub.tenant.slug}: {status}, plan {sub.tenant.tier.slug if sub.tenant.tier else '-'}"


def invoice_paid(*, invoice: dict, at: int, now: datetime) -> str:
    sub = _subscription_for(invoice.get("customer", ""), {})
    if sub is None:
        return "ignored: invoice of an unknown customer"
    if at < sub.state_at or sub.status in ENDED_STATUSES:
        return "ignored: older than the state already applied, or subscription ended"
    sub.status, sub.grace_until, sub.state_at = "active", None, at
    sub.save()
    plan_apply(tenant=sub.tenant, tier=sub.paid_tier, reason="invoice paid")
    return f"{sub.tenant.slug}: paid, plan restored"


def invoice_failed(*, invoice: dict, at: int, now: datetime) -> str:
    sub = _subscription_for(invoice.get("customer", ""), {})
    if sub is None:
        return "ignored: invoice of an unknown customer"
    if at < sub.state_at:
        return "ignored: older than the state already applied"
    sub.status, sub.state_at = "past_due", at
    sub.grace_until = sub.grace_until or now + timedelta(
        days=settings.CASCADEFLOW_BILLING_GRACE_DAYS
    )
    sub.save()
    return f"{sub.tenant.slug}: payment failed, grace until {sub.grace_until.isoformat()}"


def grace_expire(*, now: datetime) -> int:
    """Tenants past due beyond their grace period fall to the free tier's limits."""
    expired = 0
    for sub in TenantSubscription.objects.select_related("tenant").filter(
        status="past_due", grace_until__lt=now
    ):
        with transaction.atomic():
            plan_apply(
                tenant=sub.tenant, tier=_default_tier(), reason="payment failed; grace period over"
            )
            expired += 1
    return expired


# --- checkout and portal -----------------------------------------------------------------


def customer_ensure(*, tenant: Tenant, email: str | None) -> TenantSubscription:
    """The tenant's Stripe customer, created once and reused (the link is a unique row)."""

    existing = TenantSubscription.objects.filter(tenant=tenant).first()
    if existing is not None:
        return existing
    customer = stripe_api.customer_create(tenant_slug=tenant.slug, email=email)
    try:
        with transaction.atomic():
            return TenantSubscription.objects.create(tenant=tenant, stripe_customer_id=customer)
    except IntegrityError:
        return TenantSubscription.objects.get(tenant=tenant)


def checkout_start(
    *, tenant: Tenant, tier: Tier, email: str | None, success_url: str, cancel_url: str
) -> str:

    if not tier.stripe_price_ids:
        raise ValueError(f"The plan '{tier.slug}' has no Stripe price.")
    link = customer_ensure(tenant=tenant, email=email)
    return stripe_api.checkout_session(
        customer=link.stripe_customer_id,
        price=tier.stripe_price_ids[0],
        tenant_slug=tenant.slug,
        success_url=success_url,
        cancel_url=cancel_url,
    )


def portal_start(*, tenant: Tenant, email: str | None, return_url: str) -> str:

    link = customer_ensure(tenant=tenant, email=email)
    return stripe_api.portal_session(customer=link.stripe_customer_id, return_url=return_url)
