"""Celery entry points of billing: thin, idempotent."""

from celery import shared_task
from django.utils import timezone

from billing import services


@shared_task(name="billing.tasks.stripe_event_process", time_limit=60, soft_time_limit=50)
def stripe_event_process(event_pk: int) -> str:
    return services.event_process(event_pk=event_pk)


@shared_task(name="billing.tasks.grace_expire", time_limit=120, soft_time_limit=100)
def grace_expire() -> int:
    return services.grace_expire(now=timezone.now())
