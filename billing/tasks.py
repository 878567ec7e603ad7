"""Celery entry points of billing: thin, idempotent."""

import logging

from celery import shared_task
from django.utils import timezone

from billing import exports, services
from billing.metering import usage_report as report
from billing.models import TenantSubscription
from core import outbox

logger = logging.getLogger(__name__)


@shared_task(name="billing.tasks.stripe_event_process", time_limit=60, soft_time_limit=50)
def stripe_event_process(event_pk: int) -> str:
    return services.event_process(event_pk=event_pk)


@shared_task(name="billing.tasks.stripe_events_sweep", time_limit=60, soft_time_limit=50)
def stripe_events_sweep() -> int:
    """Send again the stored Stripe events a lost or failed task left unprocessed."""
    ids = services.events_due(now=timezone.now())
    for event_pk in ids:
        if not outbox.send(stripe_event_process, event_pk):
            break
    if given_up := services.events_given_up():
        logger.warning(
            "%d Stripe events are still not applied after %d attempts (see last_error)",
            given_up,
            outbox.MAX_ATTEMPTS,
        )
    return len(ids)


@shared_task(name="billing.tasks.grace_expire", time_limit=120, soft_time_limit=100)
def grace_expire() -> int:
    return services.grace_expire(now=timezone.now())


@shared_task(
    name="billing.tasks.usage_report",
    time_limit=120,
    soft_time_limit=100,
    autoretry_for=(Exception,),
    retry_backoff=True,
    max_retries=8,
)
def usage_report(tenant_id: int) -> int:

    return report(tenant_id=tenant_id, now=timezone.now())


@shared_task(name="billing.tasks.usage_report_all", time_limit=60, soft_time_limit=50)
def usage_report_all() -> int:

    ids = list(
        TenantSubscription.objects.exclude(stripe_customer_id="").values_list(
            "tenant_id", flat=True
        )
    )
    for tenant_id in ids:
        usage_report.delay(tenant_id)
    return len(ids)


@shared_task(
    name="billing.tasks.export_job_run",
    time_limit=exports.EXPORT_TIME_LIMIT_S,
    soft_time_limit=exports.EXPORT_TIME_LIMIT_S - 100,
)
def export_job_run(job_id: int) -> str:
    return exports.export_job_run(job_id=job_id)


@shared_task(name="billing.tasks.export_jobs_sweep", time_limit=60, soft_time_limit=50)
def export_jobs_sweep() -> int:
    """Send again the export jobs no worker took; fail those no worker will finish."""
    ids = exports.export_jobs_due(now=timezone.now())
    for job_id in ids:
        if not outbox.send(export_job_run, job_id):
            break
    return len(ids)
