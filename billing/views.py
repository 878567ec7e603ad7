from django.db import transaction
from django.http import HttpRequest, JsonResponse
from django.views.decorators.csrf import csrf_exempt
from django.views.decorators.http import require_POST

from billing.services import WebhookRejected, event_store, webhook_verify
from billing.tasks import stripe_event_process


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
