"""Celery entry points of the dashboard: rollups, then forecasts from them."""

import logging

from celery import shared_task
from django.utils import timezone

from dashboard import rollups, services
from tenants.models import Tenant

logger = logging.getLogger(__name__)


@shared_task(name="dashboard.tasks.usage_rollup", time_limit=1800, soft_time_limit=1700)
def usage_rollup() -> dict:
    results = rollups.rollup_all(now=timezone.now())
    return {"tenants": len(results), "hourly_rows": sum(r.hourly_rows for r in results)}


@shared_task(name="dashboard.tasks.usage_rollup_minutes", time_limit=120, soft_time_limit=100)
def usage_rollup_minutes() -> int:
    """The last minutes of the tenants with recent events (the overview's live charts)."""
    return rollups.rollup_minutes_recent(now=timezone.now())


@shared_task(name="dashboard.tasks.forecasts_refresh", time_limit=1800, soft_time_limit=1700)
def forecasts_refresh() -> int:
    count = 0
    now = timezone.now()
    for tenant in Tenant.objects.filter(is_active=True).order_by("pk"):
        try:
            count += services.forecasts_refresh(tenant, now)
        except Exception:  # one tenant's failure must not stop the others
            logger.exception("Forecast failed for tenant %s", tenant.slug)
    return count


@shared_task(name="dashboard.tasks.tenant_forecast_refresh", time_limit=120, soft_time_limit=100)
def tenant_forecast_refresh(tenant_id: int) -> int:
    """The tenant's own forecast, asked for by a page that found it missing or stale."""
    tenant = Tenant.objects.filter(pk=tenant_id, is_active=True).first()
    return services.forecasts_refresh(tenant, timezone.now(), end_users=False) if tenant else 0
