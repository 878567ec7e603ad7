"""Work a broker outage may delay but never lose: the outbox.

A row that asks for background work (a Stripe event, an export job, a budget
alert) is the durable record of that work; the Celery message sent once its
transaction commits is only the fast path. Beat sweepers find the rows stored
more than ``GRACE`` ago that are still not done and send them again.

Invariants:
- Processing claims its row first (a row lock, a conditional update or a
  lease), so a row sent twice (by the request and by a sweeper) is done once.
- ``attempts`` counts the sweeper's sends (the request's own send is attempt
  0); after ``MAX_ATTEMPTS`` a row is left for an operator, with its
  ``last_error``.
- Sends back off: a row sent by a sweeper is due again ``backoff(attempts)``
  later (``next_attempt_at``), 2 minutes doubling up to an hour.
- Sending never fails the caller: a broker that refuses a message is logged
  and the row waits for the next sweep.
"""

from __future__ import annotations

import logging
from datetime import datetime, timedelta
from typing import Any

from django.db import models, transaction
from kombu.exceptions import OperationalError

logger = logging.getLogger(__name__)

GRACE = timedelta(minutes=2)
MAX_ATTEMPTS = 8
MAX_BACKOFF = timedelta(hours=1)
BATCH = 200


def backoff(attempts: int) -> timedelta:
    return min(GRACE * 2 ** max(attempts - 1, 0), MAX_BACKOFF)


def due(*, now: datetime) -> models.Q:
    """Rows with attempts left whose next attempt is not in the future."""
    return models.Q(attempts__lt=MAX_ATTEMPTS) & (
        models.Q(next_attempt_at__isnull=True) | models.Q(next_attempt_at__lte=now)
    )


def claim_due(queryset: models.QuerySet, *, now: datetime, limit: int = BATCH) -> list[int]:
    """Count an attempt on the due rows of ``queryset`` and schedule their next; their ids.

    Rows another sweep or a processor holds locked are skipped, not waited for.
    """
    with transaction.atomic():
        rows = list(
            queryset.filter(due(now=now))
            .select_for_update(skip_locked=True, of=("self",))
            .only("pk", "attempts")
            .order_by("pk")[:limit]
        )
        for row in rows:
            row.attempts += 1
            row.next_attempt_at = now + backoff(row.attempts)
        queryset.model.objects.bulk_update(rows, ["attempts", "next_attempt_at"])
    return [row.pk for row in rows]


def send(task: Any, *args: Any) -> bool:
    """Send a task message; False, logged, when the broker is unreachable."""
    try:
        task.delay(*args)
    except (OperationalError, ConnectionError) as exc:
        logger.warning("%s%r not sent, a sweeper will send it again: %s", task.name, args, exc)
        return False
    return True


def error_text(exc: BaseException) -> str:
    """One line for a row's ``last_error``: the exception's class and first line."""
    lines = str(exc).strip().splitlines()
    return (f"{type(exc).__name__}: {lines[0]}" if lines else type(exc).__name__)[:300]
