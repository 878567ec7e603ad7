"""Writes of the routing app: the ledger."""

from dataclasses import dataclass, field
from datetime import datetime

from cascadeflow_site.db import insert_row
from routing.engine.types import Attempt, models_called
from routing.enums import UsageStatus
from routing.models import UsageEvent


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

    @property
    def cost_nanos(self) -> int:
        return sum(a.cost_nanos for a in self.attempts) + self.paid_cost_nanos

    @property
    def models_called(self) -> list[str]:
        return models_called(self.attempts)


def usage_event_record(*, entry: LedgerEntry) -> None:
    """Insert the request's ledger row: one INSERT, built once, no read back."""
    insert_row(
        UsageEvent,
        dict(
            tenant=entry.tenant_id,
            token=entry.token_id,
            end_user=entry.end_user_id,
            request_id=entry.request_id,
            created_at=entry.created_at,
            requested_model=entry.requested_model,
            model=entry.model,
            models_called=entry.models_called,
            attempts=[a.as_dict() for a in entry.attempts],
            prompt_tokens=entry.prompt_tokens,
            completion_tokens=entry.completion_tokens,
            cost_nanos=entry.cost_nanos,
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
        ),
    )
