"""Reads of the routing app: what audits cost, what they measured, what profiles learned.

Every selector takes the tenant explicitly and reads only its rows.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

from django.core.cache import cache
from django.db.models import Avg, Count, F, FloatField, Q, Sum, Value
from django.db.models.functions import Coalesce, TruncDay, TruncHour

from routing.engine.learning import Economics, Measured, measured_retention
from routing.engine.policy import PRESETS
from routing.enums import AuditKind, AuditStatus, UsageKind, UsageStatus
from routing.ledger_attempts import attempts_read
from routing.models import Audit, CalibrationVersion, ProfileLearning, RoutingProfile, UsageEvent
from tenants.budgets import period_bounds

_REQUEST = Q(kind=UsageKind.REQUEST)


def usage_totals() -> dict[str, Any]:
    """What a set of ledger rows adds up to: the one definition every figure of usage is
    built from (the usage API, the CSV exports, the dashboard's rollups).

    A request is a row of kind ``request``: an audit's row is spend, never a request, and
    never escalated. ``spend_nanos`` sums every row (what the tenant paid, audits included),
    ``audit_cost_nanos`` the audits alone, so the requests' own cost is their difference and
    a saving (``baseline_cost_nanos - spend_nanos``) is net of audits. Tokens are those paid
    for, audits' included; ``errors`` counts every row that did not end well.
    """
    return {
        "requests": Count("id", filter=_REQUEST),
        "escalated": Count("id", filter=_REQUEST & Q(escalated=True)),
        "errors": Count("id", filter=~Q(status=UsageStatus.OK)),
        "prompt_tokens": Coalesce(Sum("prompt_tokens"), 0),
        "completion_tokens": Coalesce(Sum("completion_tokens"), 0),
        "spend_nanos": Coalesce(Sum("cost_nanos"), 0),
        "audit_cost_nanos": Coalesce(Sum("cost_nanos", filter=Q(kind=UsageKind.AUDIT)), 0),
        "baseline_cost_nanos": Coalesce(Sum("baseline_cost_nanos"), 0),
    }


PROFILE_PREFIX = "cascade/"
CONFIDENCE = 0.9  # of measured retention's interval, and of certification
SPEND_CACHE_SECONDS = 60


# --- audit spend ------------------------------------------------------------------------


@dataclass(frozen=True)
class AuditSpend:
    period: datetime | None  # the hour or day (UTC), when bucketed
    key: str | None  # the profile, when grouped
    cost_nanos: int
    audits: int


def _audit_rows(tenant_id: int, start: datetime | None, end: datetime | None):
    rows = UsageEvent.objects.filter(tenant_id=tenant_id, kind=UsageKind.AUDIT)
    if start is not None:
        rows = rows.filter(created_at__gte=start)
    if end is not None:
        rows = rows.filter(created_at__lt=end)
    return rows


def audit_spend(
    *,
    tenant_id: int,
    start: datetime | None,
    end: datetime | None,
    bucket: str | None = None,
    by: str | None = None,
) -> list[AuditSpend]:
    """What audits cost (their ledger rows), in ``[start, end)``, by hour or day and/or profile.

    Every "saved" figure is net of this: savings are the baseline minus what the
    requests cost minus what auditing them cost.
    """
    if bucket not in (None, "hour", "day") or by not in (None, "profile"):
        raise ValueError("bucket: hour, day or None; by: profile or None")
    rows = _audit_rows(tenant_id, start, end)
    fields = []
    if bucket:
        trunc = TruncHour if bucket == "hour" else TruncDay
        rows = rows.annotate(period=trunc("created_at", tzinfo=UTC))
        fields.append("period")
    if by:
        rows = rows.annotate(key=F("profile"))
        fields.append("key")
    summary = rows.values(*fields).annotate(cost=Sum("cost_nanos"), n=Count("id")).order_by(*fields)
    return [
        AuditSpend(r.get("period"), r.get("key"), int(r["cost"] or 0), int(r["n"])) for r in summary
    ]


ECONOMICS_WINDOW = timedelta(days=30)  # the audits a label's cost is averaged over
ECONOMICS_DAY_CAP = 100_000  # requests read at most; beyond, labels pay at any count


def audit_economics(*, tenant_id: int, profile: str, now: datetime) -> Economics | None:
    """What one more label of a profile is worth auditing for (``learning.Economics``).

    The horizon is a month of the profile's traffic: 30 times its requests of the last
    24 hours (at most ``ECONOMICS_DAY_CAP`` of them are read, through the ledger's
    tenant and time index; a profile that busy has labels worth buying at any count
    the test will see). A label's cost is what its uniform audits of the last 30 days
    cost each, over what the reference would have cost on an average request (the
    requests' baseline). None while the profile has no traffic with a baseline: audits
    stay at the full rate until there is something to weigh them against.
    """
    day = UsageEvent.objects.filter(
        tenant_id=tenant_id,
        profile=profile,
        kind=UsageKind.REQUEST,
        created_at__gte=now - timedelta(days=1),
        created_at__lt=now,
    )[:ECONOMICS_DAY_CAP].aggregate(requests=Count("id"), baseline=Sum("baseline_cost_nanos"))
    requests, baseline = int(day["requests"] or 0), int(day["baseline"] or 0)
    if requests <= 0 or baseline <= 0:
        return None
    audits = Audit.objects.filter(
        tenant_id=tenant_id,
        profile=profile,
        kind=AuditKind.AUDIT,
        status=AuditStatus.DONE,
        created_at__gte=now - ECONOMICS_WINDOW,
    ).aggregate(cost=Avg("cost_nanos"))
    per_request = baseline / requests
    label_cost = float(audits["cost"]) / per_request if audits["cost"] is not None else 1.0
    return Economics(horizon=30.0 * requests, label_cost=label_cost)


def audit_spend_total(*, tenant_id: int, start: datetime | None, end: datetime | None) -> int:
    total = _audit_rows(tenant_id, start, end).aggregate(t=Sum("cost_nanos"))["t"]
    return int(total or 0)


def audit_spend_this_month(*, tenant_id: int, time_zone: str, now: datetime) -> int:
    """The tenant's audit spend in the calendar month of ``now`` (its time zone)."""
    start, end = period_bounds("month", now, time_zone)
    return audit_spend_total(tenant_id=tenant_id, start=start, end=end)


def audit_spend_this_month_cached(*, tenant_id: int, time_zone: str, now: datetime) -> int:
    """As ``audit_spend_this_month``, at most a minute old: what sampling checks the cap with
    (the audit itself checks it again from the ledger before it spends anything)."""
    start, _ = period_bounds("month", now, time_zone)
    key = f"cf:audit-spend:{tenant_id}:{start:%Y%m%d}"
    try:
        cached = cache.get(key)
    except Exception:  # a cache that is away costs a query, never the request
        cached = None
    if cached is not None:
        return int(cached)
    spent = audit_spend_this_month(tenant_id=tenant_id, time_zone=time_zone, now=now)
    try:
        cache.set(key, spent, SPEND_CACHE_SECONDS)
    except Exception:  # noqa: S110 - see above
        pass
    return spent


# --- profiles and what they learned -----------------------------------------------------


def profile_full_name(short: str) -> str:
    return f"{PROFILE_PREFIX}{short.removeprefix(PROFILE_PREFIX)}"


def profile_known(*, tenant_id: int, name: str) -> bool:
    """A built-in preset or one of the tenant's profiles (``name`` with or without prefix)."""
    short = name.removeprefix(PROFILE_PREFIX)
    return (
        short in PRESETS or RoutingProfile.objects.filter(tenant_id=tenant_id, name=short).exists()
    )


@dataclass(frozen=True)
class LearningState:
    profile: str
    audits_enabled: bool  # the tenant's and the profile's
    uniform_labels: int
    nonuniform_labels: int
    active_version: int | None  # its number
    last_refit_at: datetime | None
    target_retention: float

    @property
    def cold_start(self) -> bool:
        return self.active_version is None


def learning_state(*, tenant_id: int, tenant_audits: bool, name: str) -> LearningState:
    profile = profile_full_name(name)
    short = profile.removeprefix(PROFILE_PREFIX)
    row = RoutingProfile.objects.filter(tenant_id=tenant_id, name=short).first()
    preset = row.preset if row else short
    state = (
        ProfileLearning.objects.filter(tenant_id=tenant_id, profile=profile)
        .select_related("active_version")
        .first()
    )
    return LearningState(
        profile=profile,
        audits_enabled=tenant_audits and (row.audits_enabled if row else True),
        uniform_labels=state.uniform_labels if state else 0,
        nonuniform_labels=state.nonuniform_labels if state else 0,
        active_version=state.active_version.version if state and state.active_version else None,
        last_refit_at=state.last_refit_at if state else None,
        target_retention=PRESETS[preset].target_retention if preset in PRESETS else 0.95,
    )


def calibration_versions(*, tenant_id: int, name: str):
    """The profile's versions (a queryset, newest first)."""
    return CalibrationVersion.objects.filter(
        tenant_id=tenant_id, profile=profile_full_name(name)
    ).order_by("-version")


# --- quality ----------------------------------------------------------------------------


@dataclass(frozen=True)
class QualityRow:
    """Measured and estimated quality of what a profile served, for one group of requests."""

    key: str | None
    requests: int
    engine_estimate: float | None  # mean quality score (answers of the last model count as 1)
    measured: Measured | None  # retention from uniform audits, with its interval
    audits: int
    audit_cost_nanos: int


@dataclass(frozen=True)
class ProfileQuality:
    profile: str
    start: datetime
    end: datetime
    learning: LearningState
    overall: QualityRow
    by_domain: list[QualityRow]
    by_draft_model: list[QualityRow]


def _requests(tenant_id: int, profile: str, start: datetime, end: datetime):
    return UsageEvent.objects.filter(
        tenant_id=tenant_id,
        kind=UsageKind.REQUEST,
        profile=profile,
        status=UsageStatus.OK,
        created_at__gte=start,
        created_at__lt=end,
    )


def _audits(tenant_id: int, profile: str, start: datetime, end: datetime):
    return Audit.objects.filter(
        tenant_id=tenant_id,
        profile=profile,
        kind=AuditKind.AUDIT,
        status=AuditStatus.DONE,
        created_at__gte=start,
        created_at__lt=end,
    )


def _rows(tenant_id: int, profile: str, start: datetime, end: datetime, group: str | None):
    """Quality rows grouped by ``group`` ("domain", "model" or None for one row)."""
    estimate = Avg(Coalesce("quality_score", Value(1.0), output_field=FloatField()))
    requests = _requests(tenant_id, profile, start, end)
    audits = _audits(tenant_id, profile, start, end)
    audit_group = {"domain": "domain", "model": "served_model", None: None}[group]
    if group is None:
        req = {None: requests.aggregate(n=Count("id"), estimate=estimate)}
        aud = {None: audits.aggregate(n=Count("id"), cost=Sum("cost_nanos"))}
        losses: dict[Any, list[float]] = {None: []}
        for loss in audits.exclude(served_loss=None).values_list("served_loss", flat=True):
            losses[None].append(loss)
    else:
        req = {
            r[group]: r for r in requests.values(group).annotate(n=Count("id"), estimate=estimate)
        }
        aud = {
            r[audit_group]: r
            for r in audits.values(audit_group).annotate(n=Count("id"), cost=Sum("cost_nanos"))
        }
        losses = {}
        for key, loss in audits.exclude(served_loss=None).values_list(audit_group, "served_loss"):
            losses.setdefault(key, []).append(loss)
    out = []
    for key in sorted(set(req) | set(aud), key=lambda k: (k is None, k or "")):
        r, a = req.get(key) or {}, aud.get(key) or {}
        estimate_value = r.get("estimate")
        out.append(
            QualityRow(
                key=key,
                requests=int(r.get("n") or 0),
                engine_estimate=round(estimate_value, 4) if estimate_value is not None else None,
                measured=measured_retention(losses.get(key) or [], CONFIDENCE),
                audits=int(a.get("n") or 0),
                audit_cost_nanos=int(a.get("cost") or 0),
            )
        )
    return out


def profile_quality(
    *, tenant_id: int, tenant_audits: bool, name: str, start: datetime, end: datetime
) -> ProfileQuality:
    """What a profile served in ``[start, end)``: measured retention (uniform audits, served
    answers against the reference) beside the engine's own estimate, and what audits cost."""
    profile = profile_full_name(name)
    [overall] = _rows(tenant_id, profile, start, end, None)
    spent = audit_spend(tenant_id=tenant_id, start=start, end=end, by="profile")
    overall_cost = sum(s.cost_nanos for s in spent if s.key == profile)
    return ProfileQuality(
        profile=profile,
        start=start,
        end=end,
        learning=learning_state(tenant_id=tenant_id, tenant_audits=tenant_audits, name=name),
        overall=QualityRow(
            None,
            overall.requests,
            overall.engine_estimate,
            overall.measured,
            overall.audits,
            overall_cost,
        ),
        by_domain=_rows(tenant_id, profile, start, end, "domain"),
        by_draft_model=_rows(tenant_id, profile, start, end, "model"),
    )


def served_losses(*, tenant_id: int, profile: str, version_id: int) -> list[float]:
    """Losses of the served answers of uniform audits of requests this version decided."""
    return list(
        Audit.objects.filter(
            tenant_id=tenant_id,
            profile=profile,
            kind=AuditKind.AUDIT,
            status=AuditStatus.DONE,
            calibration_version_id=version_id,
        )
        .exclude(served_loss=None)
        .values_list("served_loss", flat=True)
    )


@dataclass(frozen=True)
class RecentDrafts:
    scores: list[float]  # the first draft's quality score, per request
    accepted_share: float | None  # share of requests served by a draft
    requests: int


def recent_drafts(
    *, tenant_id: int, profile: str, first_model: str, since: datetime, limit: int = 1000
) -> RecentDrafts:
    """The latest requests of a profile since ``since``: what its drafts scored, and how
    many were accepted (drift is measured on these against a version's held-out set)."""
    rows = list(
        UsageEvent.objects.filter(
            tenant_id=tenant_id,
            kind=UsageKind.REQUEST,
            profile=profile,
            status=UsageStatus.OK,
            created_at__gte=since,
        )
        .order_by("-created_at")
        .values_list("attempts", "domain", "complexity")[:limit]
    )
    scores, accepted = [], 0
    for stored, domain, complexity in rows:
        attempts = attempts_read(stored, domain=domain, complexity=complexity)
        drafts = [a for a in attempts if a["role"] == "draft" and a.get("check")]
        first = next((a for a in drafts if a["model"] == first_model), None)
        if first is not None and isinstance(first["check"]["probability"], int | float):
            scores.append(float(first["check"]["probability"]))
        accepted += any(a["decision"] == "accepted" for a in drafts)
    return RecentDrafts(scores, accepted / len(rows) if rows else None, len(rows))
