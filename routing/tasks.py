"""Celery entry points of the routing app: thin, idempotent, taking ids."""

import logging

from celery import shared_task
from django.utils import timezone

from core import outbox
from routing import audits, calibrations, partitions
from routing.gateway import caller
from routing.services import ledger_replay
from routing.spool import ledger_spool
from tenants import alerts

logger = logging.getLogger(__name__)


@shared_task(name="routing.tasks.ledger_spool_replay", time_limit=300, soft_time_limit=240)
def ledger_spool_replay() -> dict[str, int]:
    """Write spooled ledger rows (and settle their budgets) once the database takes them."""
    return ledger_spool().replay(ledger_replay).as_dict()


@shared_task(name="routing.tasks.ledger_partitions_ensure", time_limit=600, soft_time_limit=540)
def ledger_partitions_ensure() -> list[str]:
    """Create the ledger's partitions of this month and the next ones (PostgreSQL)."""
    return partitions.partitions_ensure(now=timezone.now())


# A month of a large tenant is hundreds of millions of rows to copy out: hours, not seconds.
# Acknowledged on receipt: a broker's delivery timeout (RabbitMQ's is 30 minutes) would
# otherwise cut a long run off; a run that dies is simply the next day's to do again.
@shared_task(
    name="routing.tasks.ledger_retention",
    time_limit=6 * 3600,
    soft_time_limit=21000,
    acks_late=False,
)
def ledger_retention() -> dict[str, object]:
    """Archive and remove the ledger months their plans no longer keep (PostgreSQL)."""
    return partitions.retention_sweep(now=timezone.now()).as_dict()


@shared_task(name="routing.tasks.audit_run", time_limit=300, soft_time_limit=240)
def audit_run(audit_id: int) -> str:
    """Label one sampled request (a run that cannot finish leaves it to the sweeper)."""
    return str(audits.audit_run(audit_id=audit_id, caller=caller()))


@shared_task(name="routing.tasks.audits_sweep", time_limit=60, soft_time_limit=50)
def audits_sweep() -> int:
    """Send again the audits a lost message or a failed run left pending, one task each."""
    ids = audits.audits_due(now=timezone.now())
    for audit_id in ids:
        if not outbox.send(audit_run, audit_id):
            break
    return len(ids)


@shared_task(name="routing.tasks.profile_refit", time_limit=600, soft_time_limit=540)
def profile_refit(tenant_id: int, profile: str) -> int | None:
    """Refit a profile on its audits (promoting what is certified) and check it still holds."""
    version = calibrations.profile_refit(tenant_id=tenant_id, profile=profile)
    return version.version if version is not None else None


@shared_task(name="routing.tasks.profiles_learning_sweep", time_limit=60, soft_time_limit=50)
def profiles_learning_sweep() -> int:
    """Refit profiles with labels no refit has used for a while; check every active version."""
    pairs = calibrations.profiles_to_refit(now=timezone.now())
    for tenant_id, profile in pairs:
        if not outbox.send(profile_refit, tenant_id, profile):
            break
    return len(pairs)


@shared_task(
    name="routing.tasks.quality_alerts_deliver",
    time_limit=60,
    soft_time_limit=50,
    autoretry_for=(alerts.DeliveryError,),
    retry_backoff=True,
    max_retries=5,
)
def quality_alerts_deliver(alert_ids: list[int]) -> int:
    return alerts.deliver(calibrations.QUALITY_ALERTS, alert_ids=alert_ids)


@shared_task(name="routing.tasks.quality_alerts_sweep", time_limit=60, soft_time_limit=50)
def quality_alerts_sweep() -> int:
    """Send again the quality alerts a lost or failed task left undelivered."""
    now = timezone.now()
    ids = alerts.due(calibrations.QUALITY_ALERTS, now=now)
    for alert_id in ids:
        if not outbox.send(quality_alerts_deliver, [alert_id]):
            break
    if given_up := alerts.given_up(calibrations.QUALITY_ALERTS, now=now):
        logger.warning(
            "%d quality alerts are still not delivered after %d attempts (see last_error)",
            given_up,
            outbox.MAX_ATTEMPTS,
        )
    return len(ids)
