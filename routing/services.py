"""Writes of the routing app: the ledger (requests and audits alike)."""

from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from django.db import connection, transaction
from django.utils import timezone

from core.db import as_datetime, insert_row, insert_statement, retry_transient
from routing.enforcement import Settlement, settle, settle_with_row
from routing.engine.types import Attempt, models_called
from routing.enums import UsageKind, UsageStatus
from routing.ledger_attempts import attempts_stored
from routing.models import LateLedgerHour, UsageEvent, late_hour


@dataclass
class LedgerEntry:
    """Everything the ledger needs about one request, built by the gateway."""

    tenant_id: int
    token_id: int | None
    end_user_id: int | None
    request_id: str
    created_at: datetime
    requested_model: str
    attempts: list[Attempt] = field(default_factory=list)
    model: str = ""
    prompt_tokens: int = 0
    completion_tokens: int = 0
    baseline_cost_nanos: int = 0
    escalated: bool = False
    stream: bool = False
    latency_ms: int = 0
    status: str = UsageStatus.OK
    http_status: int = 200
    error_code: str = ""
    profile: str = ""
    domain: str = ""
    complexity: float | None = None
    quality_score: float | None = None
    baseline_method: str = ""
    degraded: bool = False
    paid_cost_nanos: int = 0  # self-verification and sampling calls
    budget_status: str = ""
    kind: str = UsageKind.REQUEST
    own_models: frozenset[str] = frozenset()  # the tenant's own models (its keys paid)

    @property
    def cost_nanos(self) -> int:
        return sum(a.cost_nanos for a in self.attempts) + self.paid_cost_nanos

    @property
    def byok_cost_nanos(self) -> int:
        """What the tenant's own provider keys paid of ``cost_nanos``."""
        return sum(a.cost_nanos for a in self.attempts if a.model in self.own_models)

    @property
    def models_called(self) -> list[str]:
        return models_called(self.attempts)


def usage_event_values(entry: LedgerEntry) -> dict[str, Any]:
    """The ledger row of ``entry`` as column values (plain data: it may be spooled as JSON)."""
    return dict(
        tenant=entry.tenant_id,
        token=entry.token_id,
        end_user=entry.end_user_id,
        request_id=entry.request_id,
        created_at=entry.created_at,
        requested_model=entry.requested_model,
        model=entry.model,
        models_called=entry.models_called,
        attempts=attempts_stored(
            [a.as_dict() for a in entry.attempts], domain=entry.domain, complexity=entry.complexity
        ),
        prompt_tokens=entry.prompt_tokens,
        completion_tokens=entry.completion_tokens,
        cost_nanos=entry.cost_nanos,
        byok_cost_nanos=entry.byok_cost_nanos,
        baseline_cost_nanos=entry.baseline_cost_nanos,
        escalated=entry.escalated,
        stream=entry.stream,
        latency_ms=entry.latency_ms,
        status=entry.status,
        http_status=entry.http_status,
        error_code=entry.error_code,
        profile=entry.profile,
        domain=entry.domain,
        complexity=entry.complexity,
        quality_score=entry.quality_score,
        baseline_method=entry.baseline_method,
        degraded=entry.degraded,
        budget_status=entry.budget_status,
        kind=str(entry.kind),
    )


def usage_event_record(*, entry: LedgerEntry) -> None:
    """Insert a ledger row with nothing to settle (the demo's history): one INSERT."""
    insert_row(UsageEvent, usage_event_values(entry))


def ledger_write(*, values: dict[str, Any], settlement: Settlement) -> list[int]:
    """Write a ledger row and settle its reservation in one transaction; return new alert ids.

    Idempotent by ``request_id``: a row that is already there (a spooled row
    replayed twice, or a write whose commit succeeded but whose answer was
    lost) is left as it is and settles nothing. Deadlocks and serialization
    failures are retried whole. A row for an hour the rollups may have closed
    (``routing.models.late_hour``) marks that hour in the same transaction.
    """

    def write() -> list[int]:
        late = late_hour(values["created_at"], timezone.now())
        if late is None:
            return write_row()
        with transaction.atomic():  # the row and the mark of its hour, or neither
            alert_ids = write_row()
            mark = {"tenant": values["tenant"], "hour": late}
            insert_row(LateLedgerHour, mark, ignore_conflicts=True)
            return alert_ids

    def write_row() -> list[int]:
        if settlement.reservation_key is None:
            # Nothing to settle: one statement, atomic on its own, without the two round
            # trips of a transaction (BEGIN, COMMIT).
            insert_row(UsageEvent, values, ignore_conflicts=True)
            return []
        if connection.vendor == "postgresql" and settlement.counter_ids:
            # One statement: the row, the settlement and its alerts, atomic without a
            # transaction's round trips, the counters locked only while it runs.
            return settle_with_row(
                insert=insert_statement(UsageEvent, values, ignore_conflicts=True),
                settlement=settlement,
                actual_nanos=values["cost_nanos"],
                now=timezone.now(),
            )
        with transaction.atomic():
            if not insert_row(UsageEvent, values, ignore_conflicts=True):
                return []
            return settle(settlement=settlement, actual_nanos=values["cost_nanos"])

    return retry_transient(write)


def spooled_record(values: dict[str, Any], settlement: Settlement) -> dict[str, Any]:
    row = {**values, "created_at": values["created_at"].isoformat()}
    return {"v": 1, "row": row, "settlement": settlement.as_dict()}


def spooled_release(settlement: Settlement) -> dict[str, Any]:
    """A reservation to free, of a request that ended before it had a ledger row to write."""
    return {"v": 1, "release": settlement.as_dict()}


def reservation_release(*, settlement: Settlement) -> None:
    """Free the request's reservation if it is still held (idempotent: a no-op otherwise)."""

    def release() -> None:
        with transaction.atomic():
            settle(settlement=settlement, actual_nanos=0)

    retry_transient(release)


def ledger_replay(record: dict[str, Any]) -> None:
    """Apply one spooled record (see ``routing.spool``): a ledger row, or a release."""
    if "release" in record:
        reservation_release(settlement=Settlement.from_dict(record["release"]))
        return
    values = dict(record["row"])
    values["created_at"] = as_datetime(values["created_at"])
    ledger_write(values=values, settlement=Settlement.from_dict(record["settlement"]))
