"""Celery entry points of the routing app."""

from celery import shared_task

from routing.services import ledger_replay
from routing.spool import ledger_spool


@shared_task(name="routing.tasks.ledger_spool_replay", time_limit=300, soft_time_limit=240)
def ledger_spool_replay() -> dict[str, int]:
    """Write spooled ledger rows (and settle their budgets) once the database takes them."""
    return ledger_spool().replay(ledger_replay).as_dict()
