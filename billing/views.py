from django.contrib import messages
from django.contrib.auth.decorators import login_required
from django.db import transaction
from django.http import (
    Http404,
    HttpRequest,
    HttpResponse,
    HttpResponseForbidden,
    HttpResponseRedirect,
    JsonResponse,
)
from django.shortcuts import get_object_or_404
from django.urls import reverse
from django.views.decorators.csrf import csrf_exempt
from django.views.decorators.http import require_POST

from billing.services import (
    WebhookRejected,
    checkout_start,
    event_store,
    portal_start,
    webhook_verify,
)
from billing.tasks import stripe_event_process
from core import outbox
from tenants.enums import MemberRole
from tenants.models import Tier
from tenants.selectors import membership_of


@csrf_exempt
@require_POST
def stripe_webhook(request: HttpRequest) -> JsonResponse:
    """Verify, store once, acknowledge; a Celery task applies the event.

    The stored row is durable: Stripe gets its 200 even when the broker
    refuses the task, and the outbox sweeper sends it later.
    """
    try:
        event = webhook_verify(
            payload=request.body, signature=request.headers.get("Stripe-Signature")
        )
    except WebhookRejected as exc:
        return JsonResponse(
            {"error": {"message": f"Invalid webhook: {exc}", "code": exc.code}}, status=400
        )
    stored = event_store(event=event)
    if stored is not None:
        transaction.on_commit(lambda: outbox.send(stripe_event_process, stored.pk), robust=True)
    return JsonResponse({"received": True, "duplicate": stored is None})


def _member_tenant(request: HttpRequest, slug: str, roles: set[str]):
    """The tenant if the user belongs to it with one of ``roles``; 404 for any other tenant
    (and for a deactivated one)."""
    member = membership_of(user=request.user, tenant_slug=slug)
    if member is None:
        raise Http404
    return member.tenant, member.role in roles


def _billing_page(request: HttpRequest, tenant) -> str:
    return request.build_absolute_uri(reverse("dashboard:billing", args=[tenant.slug]))


@login_required
@require_POST
def checkout(request: HttpRequest, tenant_slug: str, tier_slug: str) -> HttpResponse:
    """Owners only: the plan is what the tenant pays for."""
    tenant, allowed = _member_tenant(request, tenant_slug, {MemberRole.OWNER})
    if not allowed:
        return HttpResponseForbidden("Only owners can change the plan.")
    tier = get_object_or_404(Tier, slug=tier_slug)
    page = _billing_page(request, tenant)
    try:
        url = checkout_start(
            tenant=tenant,
            tier=tier,
            email=request.user.email,
            success_url=f"{page}?checkout=success",
            cancel_url=f"{page}?checkout=cancelled",
        )
    except ValueError as exc:  # a plan with no Stripe price cannot be bought
        messages.error(request, str(exc))
        return HttpResponseRedirect(page, status=303)
    return HttpResponseRedirect(url, status=303)


@login_required
@require_POST
def portal(request: HttpRequest, tenant_slug: str) -> HttpResponse:
    """Owners only: invoices, payment method and cancellation."""
    tenant, allowed = _member_tenant(request, tenant_slug, {MemberRole.OWNER})
    if not allowed:
        return HttpResponseForbidden("Only owners can manage billing.")
    url = portal_start(
        tenant=tenant, email=request.user.email, return_url=_billing_page(request, tenant)
    )
    return HttpResponseRedirect(url, status=303)
