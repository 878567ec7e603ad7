"""CSV cost exports: streamed, RFC 4180, UTF-8, exact decimals, safe to open in a spreadsheet.

Columns are stable (documented in docs/exports.md). ``format=focus`` names
them as the FinOps FOCUS specification does so cost tools ingest the file.
Cells starting with ``=``, ``+``, ``-`` or ``@`` (or tab / carriage return)
are prefixed with a quote so no spreadsheet evaluates them (CSV injection);
numbers are written by us and never start with those characters except a
minus sign, which costs never have.
"""

from __future__ import annotations

import csv
from collections.abc import Iterator
from datetime import UTC, datetime

from routing.engine.pricing import nanos_to_usd
from routing.models import UsageEvent

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
_DANGEROUS = ("=", "+", "-", "@", "\t", "\r")


class _Echo:
    def write(self, value: str) -> str:
        return value


def safe(value: object) -> str:
    text = "" if value is None else str(value)
    return "'" + text if text.startswith(_DANGEROUS) else text


def _usd(nanos: int) -> str:
    return f"{nanos_to_usd(nanos):.9f}"


def rows(*, tenant_id: int, start: datetime, end: datetime, focus: bool) -> Iterator[str]:
    """The CSV, line by line, reading the ledger in chunks (constant memory)."""
    writer = csv.writer(_Echo(), lineterminator="\r\n")
    yield writer.writerow(FOCUS_COLUMNS if focus else COLUMNS)
    events = (
        UsageEvent.objects.filter(tenant_id=tenant_id, created_at__gte=start, created_at__lt=end)
        .order_by("created_at", "id")
        .values_list(
            "created_at",
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
    )
    for row in events.iterator(chunk_size=2000):
        (created, request_id, end_user, token, profile, requested, called, escalated,
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
                    safe(f'{{"end_user": "{end_user or ""}", "profile": "{profile}"}}'),
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


def parse_range(start: str | None, end: str | None) -> tuple[datetime, datetime]:
    """``start``/``end`` as UTC dates (YYYY-MM-DD); ``end`` is inclusive of that whole day."""
    from datetime import timedelta

    if not start or not end:
        raise ValueError("start and end are required (YYYY-MM-DD, UTC).")
    first = datetime.strptime(start, "%Y-%m-%d").replace(tzinfo=UTC)
    last = datetime.strptime(end, "%Y-%m-%d").replace(tzinfo=UTC) + timedelta(days=1)
    if last <= first:
        raise ValueError("end must not be before start.")
    return first, last
