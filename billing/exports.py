"""CSV cost exports: streamed, RFC 4180, UTF-8, exact decimals, safe to open in a spreadsheet.

Columns are stable (documented in docs/exports.md). ``format=focus`` names
them as the FinOps FOCUS specification does so cost tools ingest the file.
A text cell starting with ``=``, ``+``, ``-`` or ``@`` (also after leading
whitespace: spaces, tabs, line breaks), or with a tab or carriage return, is
prefixed with a quote so no spreadsheet evaluates it (CSV injection, as
OWASP describes it); numbers are written by us and never start with those
characters except a minus sign, which costs never have. FOCUS ``Tags`` is a
JSON object written by a JSON encoder, so no value can add a key or break it.
"""

from __future__ import annotations

import csv
import json
import logging
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from itertools import islice
from pathlib import Path
from zoneinfo import ZoneInfo

from asgiref.sync import sync_to_async
from celery.exceptions import SoftTimeLimitExceeded
from django.conf import settings
from django.core import signing
from django.db import models, transaction
from django.db.models.functions import TruncDay
from django.utils import timezone

from billing.models import ExportJob
from core import outbox
from core.money import nanos_to_usd
from routing.models import UsageEvent
from routing.selectors import usage_totals

logger = logging.getLogger(__name__)

COLUMNS = [
    "timestamp_utc",
    "request_id",
    "end_user",
    "token",
    "profile",
    "requested_model",
    "models_called",
    "escalated",
    "prompt_tokens",
    "completion_tokens",
    "cost_usd",
    "baseline_cost_usd",
    "savings_usd",
    "status",
]
FOCUS_COLUMNS = [
    "ChargePeriodStart",
    "ChargePeriodEnd",
    "BilledCost",
    "EffectiveCost",
    "ListCost",
    "BillingCurrency",
    "ServiceName",
    "ServiceCategory",
    "ResourceId",
    "ResourceName",
    "ChargeCategory",
    "ChargeDescription",
    "ConsumedQuantity",
    "ConsumedUnit",
    "Tags",
]
_LEDGER_FIELDS = (
    "request_id",
    "end_user__external_id",
    "token__mask",
    "profile",
    "requested_model",
    "models_called",
    "escalated",
    "prompt_tokens",
    "completion_tokens",
    "cost_nanos",
    "baseline_cost_nanos",
    "status",
    "model",
)
# Ledger rows read per query of an export.
EXPORT_PAGE_ROWS = 2000
_FORMULA = ("=", "+", "-", "@")
_CONTROL = ("\t", "\r")
# The task's hard time limit; a job still running after it (and a grace) has lost its worker.
EXPORT_TIME_LIMIT_S = 3600


class _Echo:
    def write(self, value: str) -> str:
        return value


def safe(value: object) -> str:
    """A text cell no spreadsheet evaluates as a formula."""
    text = "" if value is None else str(value)
    if text.startswith(_CONTROL) or text.lstrip().startswith(_FORMULA):
        return "'" + text
    return text


def focus_tags(*, end_user: str | None, profile: str | None) -> str:
    """FOCUS ``Tags``: a JSON object with exactly these keys, whatever the values hold."""
    return json.dumps({"end_user": end_user or "", "profile": profile or ""}, sort_keys=True)


def _usd(nanos: int) -> str:
    return f"{nanos_to_usd(nanos):.9f}"


def rows(*, tenant_id: int, start: datetime, end: datetime, focus: bool) -> Iterator[str]:
    """The CSV, line by line, reading the ledger in pages (constant memory)."""
    writer = csv.writer(_Echo(), lineterminator="\r\n")
    yield writer.writerow(FOCUS_COLUMNS if focus else COLUMNS)
    for row in _ledger_pages(tenant_id=tenant_id, start=start, end=end):
        (created, _id, request_id, end_user, token, profile, requested, called, escalated,
         prompt, completion, cost, baseline, status, model) = row  # fmt: skip
        timestamp = created.astimezone(UTC).isoformat()
        if focus:
            yield writer.writerow(
                [
                    timestamp,
                    timestamp,
                    _usd(cost),
                    _usd(cost),
                    _usd(baseline),
                    "USD",
                    "CascadeFlow",
                    "AI and Machine Learning",
                    safe(request_id),
                    safe(model or requested),
                    "Usage",
                    safe(f"{requested} via {'/'.join(called or [])}"),
                    prompt + completion,
                    "Tokens",
                    focus_tags(end_user=end_user, profile=profile),  # an object: starts with {
                ]
            )
        else:
            yield writer.writerow(
                [
                    timestamp,
                    safe(request_id),
                    safe(end_user),
                    safe(token),
                    safe(profile),
                    safe(requested),
                    safe(" ".join(called or [])),
                    "true" if escalated else "false",
                    prompt,
                    completion,
                    _usd(cost),
                    _usd(baseline),
                    _usd(baseline - cost),
                    safe(status),
                ]
            )


def _ledger_pages(*, tenant_id: int, start: datetime, end: datetime) -> Iterator[tuple]:
    """The range's ledger rows in (created_at, id) order, one short query per page.

    Each page starts after the last row of the one before (keyset), so no database
    cursor stays open between pages: a server-side cursor would outlive its
    transaction, which PgBouncer in transaction mode does not allow (the next
    page may run on another server connection), and reading the range in one
    client-side query would hold it all in memory.
    """
    ledger = UsageEvent.objects.filter(
        tenant_id=tenant_id, created_at__gte=start, created_at__lt=end
    ).order_by("created_at", "id")
    page = ledger
    while True:
        batch = list(page.values_list("created_at", "id", *_LEDGER_FIELDS)[:EXPORT_PAGE_ROWS])
        yield from batch
        if len(batch) < EXPORT_PAGE_ROWS:
            return
        created, last_id = batch[-1][0], batch[-1][1]
        page = ledger.filter(created_at__gte=created).exclude(created_at=created, id__lte=last_id)


def parse_range(start: str | None, end: str | None) -> tuple[datetime, datetime]:
    """``start``/``end`` as UTC dates (YYYY-MM-DD); ``end`` is inclusive of that whole day."""

    if not start or not end:
        raise ValueError("start and end are required (YYYY-MM-DD, UTC).")
    first = datetime.strptime(start, "%Y-%m-%d").replace(tzinfo=UTC)
    last = datetime.strptime(end, "%Y-%m-%d").replace(tzinfo=UTC) + timedelta(days=1)
    if last <= first:
        raise ValueError("end must not be before start.")
    return first, last


def export_job_run(*, job_id: int) -> str:
    """Write the job's CSV to a file under var/exports, recording progress as it goes.

    Only the run that moves the job from ``queued`` to ``running`` builds it, so
    a job sent twice is built once. A crash ends the job ``failed`` with a
    one-line reason (the traceback goes to the log, not to the user).
    """

    claimed = ExportJob.objects.filter(pk=job_id, status="queued").update(
        status="running", started_at=timezone.now(), total_rows=0, rows_written=0, error=""
    )
    if not claimed:
        return ExportJob.objects.filter(pk=job_id).values_list("status", flat=True).first() or ""
    job = ExportJob.objects.get(pk=job_id)
    path = Path(settings.VAR_DIR) / "exports" / f"export-{job.pk}.csv"
    try:
        written = _export_write(job, path)
    except Exception as exc:
        logger.exception("Export job %s failed", job.pk)
        path.unlink(missing_ok=True)
        ExportJob.objects.filter(pk=job.pk, status="running").update(
            status="failed", error=_failure_text(exc), finished_at=timezone.now()
        )
        return "failed"
    ExportJob.objects.filter(pk=job.pk, status="running").update(
        status="done", rows_written=written, file_path=str(path), finished_at=timezone.now()
    )
    return "done"


def _export_write(job, path) -> int:

    path.parent.mkdir(parents=True, exist_ok=True)
    total = UsageEvent.objects.filter(
        tenant_id=job.tenant_id, created_at__gte=job.start, created_at__lt=job.end
    ).count()
    ExportJob.objects.filter(pk=job.pk).update(total_rows=total)
    written = 0
    with open(path, "w", encoding="utf-8", newline="") as out:
        for index, line in enumerate(
            rows(tenant_id=job.tenant_id, start=job.start, end=job.end, focus=job.focus)
        ):
            out.write(line)
            if index and index % 10_000 == 0:
                written = index
                ExportJob.objects.filter(pk=job.pk).update(rows_written=written)
        written = max(index, 0)
    return written


def _failure_text(exc: BaseException) -> str:

    if isinstance(exc, SoftTimeLimitExceeded):
        return "The export took longer than its time limit; try a shorter range."
    return outbox.error_text(exc)


def export_jobs_due(*, now: datetime) -> list[int]:
    """Settle the jobs no worker will finish, and return those to send again.

    A job still ``running`` after the task's time limit lost its worker; a job
    still ``queued`` after its last attempt was never picked up: both end
    ``failed``, so the page stops waiting. Jobs ``queued`` a grace period after
    they were created get an attempt counted, and their ids are returned.
    """

    stale = now - timedelta(seconds=EXPORT_TIME_LIMIT_S) - outbox.GRACE
    ExportJob.objects.filter(status="running").filter(
        models.Q(started_at__lt=stale) | models.Q(started_at__isnull=True, created_at__lt=stale)
    ).update(
        status="failed",
        error="The export stopped before it finished (its worker was lost); try again.",
        finished_at=now,
    )
    ExportJob.objects.filter(
        status="queued", attempts__gte=outbox.MAX_ATTEMPTS, next_attempt_at__lte=now
    ).update(
        status="failed",
        error="The export could not be started (no worker took it); try again later.",
        finished_at=now,
    )
    return outbox.claim_due(
        ExportJob.objects.filter(status="queued", created_at__lt=now - outbox.GRACE), now=now
    )


def download_token(job_id: int) -> str:

    return signing.TimestampSigner(salt="cascadeflow.export").sign(str(job_id))


def download_job_id(token: str, max_age_s: int) -> int | None:

    try:
        return int(
            signing.TimestampSigner(salt="cascadeflow.export").unsign(token, max_age=max_age_s)
        )
    except (signing.BadSignature, ValueError):
        return None


GROUP_FIELDS = {
    "day": None,
    "model": "model",
    "end_user": "end_user__external_id",
    "profile": "profile",
}
GROUPED_COLUMNS = [
    "group",
    "key",
    "requests",
    "escalated",
    "prompt_tokens",
    "completion_tokens",
    "cost_usd",
    "baseline_cost_usd",
    "savings_usd",
]


def grouped_rows(
    *, tenant_id: int, start: datetime, end: datetime, group_by: str, time_zone: str = "UTC"
) -> Iterator[str]:
    """One row per day, model, end user or profile over the range (same money rules).

    Days are calendar days in ``time_zone``: UTC for the API (its dates are UTC), the
    tenant's zone for the dashboard (its date range is in the tenant's zone)."""

    writer = csv.writer(_Echo(), lineterminator="\r\n")
    yield writer.writerow(GROUPED_COLUMNS)
    events = UsageEvent.objects.filter(
        tenant_id=tenant_id, created_at__gte=start, created_at__lt=end
    )
    field = GROUP_FIELDS[group_by]
    keyed = (
        events.annotate(key=TruncDay("created_at", tzinfo=ZoneInfo(time_zone or "UTC")))
        if field is None
        else events.annotate(key=models.F(field))
    )
    totals = usage_totals()
    summary = (
        keyed.values("key")
        .annotate(
            requests=totals["requests"],
            escalated=totals["escalated"],
            prompt=totals["prompt_tokens"],
            completion=totals["completion_tokens"],
            cost=totals["spend_nanos"],
            baseline=totals["baseline_cost_nanos"],
        )
        .order_by("key")
    )
    for row in summary.iterator():
        key = row["key"].date().isoformat() if field is None and row["key"] else row["key"]
        cost, baseline = int(row["cost"] or 0), int(row["baseline"] or 0)
        yield writer.writerow(
            [
                group_by,
                safe(key),
                row["requests"],
                row["escalated"],
                row["prompt"] or 0,
                row["completion"] or 0,
                _usd(cost),
                _usd(baseline),
                _usd(baseline - cost),
            ]
        )


def export_job_queue(*, tenant_id: int, start: datetime, end: datetime, focus: bool):
    """Create an export job; the Celery task is sent once the job row is committed.

    The job row is durable: when the broker refuses the task the caller still
    gets the queued job, and the outbox sweeper sends it later.
    """

    from billing.tasks import export_job_run  # noqa: PLC0415 - billing.tasks imports this module

    job = ExportJob.objects.create(tenant_id=tenant_id, start=start, end=end, focus=focus)
    transaction.on_commit(lambda: outbox.send(export_job_run, job.pk), robust=True)
    return job


async def stream_in_batches(lines, batch: int = 2000):
    """Stream a sync generator from ASGI without buffering it.

    Django serves a *sync* iterator under ASGI by reading it whole into
    memory; this reads it in batches on one thread (the database cursor's).
    """
    iterator = iter(lines)

    def next_batch() -> str:
        return "".join(islice(iterator, batch))

    while chunk := await sync_to_async(next_batch, thread_sensitive=True)():
        yield chunk
