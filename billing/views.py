from django.contrib.auth.decorators import login_required
from django.db import transaction
from django.http import (
    HttpRequest,
    HttpResponse,
    HttpResponseForbidden,
    HttpResponseRedirect,
    JsonResponse,
)
from django.shortcuts import get_object_or_404
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
from tenants.enums import MemberRole
from tenants.models import Tier


@csrf_exempt
@require_POST
def stripe_webhook(request: HttpRequest) -> JsonResponse:
    """Verify, store once, acknowledge; a Celery task applies the event."""
    try:
        event = webhook_verify(
            payload=request.body, signature=request.headers.get("Stripe-Signature")
        )
    except WebhookRejected as exc:
        return JsonResponse(
            {"error": {"message": f"Invalid webhook: {exc}", "code": "invalid_signature"}},
            status=400,
        )
    stored = event_store(event=event)
    if stored is not None:
        transaction.on_commit(lambda: stripe_event_process.delay(stored.pk), robust=True)
    return JsonResponse({"received": True, "duplicate": stored is None})


def _member_tenant(request: HttpRequest, slug: str, roles: set[str]):
    """The tenant if the user belongs to it with one of ``roles``; 404 for any other tenant."""
    from django.http import Http404

    from tenants.models import Member

    member = (
        Member.objects.select_related("tenant").filter(user=request.user, tenant__slug=slug).first()
    )
    if member is None:
        raise Http404
    return member.tenant, member.role in roles


@login_required
@require_POST
def checkout(request: HttpRequest, tenant_slug: str, tier_slug: str) -> HttpResponse:
    tenant, allowed = _member_tenant(request, tenant_slug, {MemberRole.OWNER, MemberRole.ADMIN})
    if not allowed:
        return HttpResponseForbidden("Only owners and admins can change the plan.")
    tier = get_object_or_404(Tier, slug=tier_slug)
    base = request.build_absolute_uri("/dashboard/")
    url = checkout_start(
        tenant=tenant,
        tier=tier,
        email=request.user.email,
        success_url=f"{base}?checkout=success",
        cancel_url=f"{base}?checkout=cancelled",
    )
    return HttpResponseRedirect(url, status=303)


@login_required
@require_POST
def portal(request: HttpRequest, tenant_slug: str) -> HttpResponse:
    tenant, allowed = _member_tenant(request, tenant_slug, {MemberRole.OWNER, MemberRole.ADMIN})
    if not allowed:
        return HttpResponseForbidden("Only owners and admins can manage billing.")
    url = portal_start(
        tenant=tenant,
        email=request.user.email,
        return_url=request.build_absolute_uri("/dashboard/"),
    )
    return HttpResponseRedirect(url, status=303)
