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
import threading
from concurrent.futures import ThreadPoolExecutor
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
    """Send a task message once (no publish retries); False, logged, when the broker
    is unreachable: the row waits for the next sweep."""
    try:
        task.apply_async(args, retry=False)
    except (OperationalError, ConnectionError, OSError) as exc:
        logger.warning("%s%r not sent, a sweeper will send it again: %s", task.name, args, exc)
        return False
    return True


_sender = ThreadPoolExecutor(max_workers=1, thread_name_prefix="outbox-send")
_backlog = threading.BoundedSemaphore(1000)


def send_soon(task: Any, *args: Any) -> None:
    """``send`` from a background thread: a request never waits on the broker.

    For work whose row is its durable record (what a sweeper picks up): a
    message that is dropped here (a backlog of 1,000 unsent) or refused by
    the broker is sent again by the sweeper.
    """
    if task.app.conf.task_always_eager:  # no broker to wait on: the task runs here
        send(task, *args)
        return
    if not _backlog.acquire(blocking=False):
        logger.warning("%s%r not sent (backlog full), a sweeper will send it", task.name, args)
        return

    def run() -> None:
        try:
            send(task, *args)
        finally:
            _backlog.release()

    _sender.submit(run)


def error_text(exc: BaseException) -> str:
    """One line for a row's ``last_error``: the exception's class and first line."""
    lines = str(exc).strip().splitlines()
    return (f"{type(exc).__name__}: {lines[0]}" if lines else type(exc).__name__)[:300]
