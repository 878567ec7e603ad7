"""Celery entry points of the tenants app: thin, idempotent, retried only when retryable."""

import logging

from celery import shared_task
from django.utils import timezone

from core import outbox
from tenants import alerts, budgets

logger = logging.getLogger(__name__)


@shared_task(name="tenants.tasks.reservations_reclaim", time_limit=120, soft_time_limit=100)
def reservations_reclaim() -> int:
    return budgets.reservations_reclaim(now=timezone.now())


@shared_task(
    name="tenants.tasks.budget_alerts_deliver",
    time_limit=60,
    soft_time_limit=50,
    autoretry_for=(alerts.DeliveryError,),
    retry_backoff=True,
    max_retries=5,
)
def budget_alerts_deliver(alert_ids: list[int]) -> int:
    return alerts.alerts_deliver(alert_ids=alert_ids)


@shared_task(name="tenants.tasks.budget_alerts_sweep", time_limit=60, soft_time_limit=50)
def budget_alerts_sweep() -> int:
    """Send again the budget alerts a lost or failed task left undelivered, one task each."""
    now = timezone.now()
    ids = alerts.alerts_due(now=now)
    for alert_id in ids:
        if not outbox.send(budget_alerts_deliver, [alert_id]):
            break
    if given_up := alerts.alerts_given_up(now=now):
        logger.warning(
            "%d budget alerts are still not delivered after %d attempts (see last_error)",
            given_up,
            outbox.MAX_ATTEMPTS,
        )
    return len(ids)
