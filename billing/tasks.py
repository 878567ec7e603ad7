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


@shared_task(
    name="billing.tasks.usage_report",
    time_limit=120,
    soft_time_limit=100,
    autoretry_for=(Exception,),
    retry_backoff=True,
    max_retries=8,
)
def usage_report(tenant_id: int) -> int:
    from billing.metering import usage_report as report

    return report(tenant_id=tenant_id, now=timezone.now())


@shared_task(name="billing.tasks.usage_report_all", time_limit=60, soft_time_limit=50)
def usage_report_all() -> int:
    from billing.models import TenantSubscription

    ids = list(
        TenantSubscription.objects.exclude(stripe_customer_id="").values_list(
            "tenant_id", flat=True
        )
    )
    for tenant_id in ids:
        usage_report.delay(tenant_id)
    return len(ids)


@shared_task(name="billing.tasks.export_job_run", time_limit=3600, soft_time_limit=3500)
def export_job_run(job_id: int) -> str:
    from billing.exports import export_job_run as run

    return run(job_id=job_id)
