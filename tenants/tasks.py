"""Celery entry points of the tenants app: thin, idempotent, retried only when retryable."""

from celery import shared_task
from django.utils import timezone

from tenants import alerts, budgets


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
