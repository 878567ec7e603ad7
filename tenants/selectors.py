"""Reads for tenants and API tokens."""

import threading
import time
from collections.abc import Callable, Hashable
from dataclasses import dataclass
from datetime import datetime
from functools import lru_cache
from typing import Any

from django.conf import settings
from django.db import connection
from django.db.models import Exists, OuterRef

from core.db import as_datetime, as_json, fetch_one, select_sql
from tenants.budgets import (
    BudgetLine,
    EndUserTierPolicy,
    applicable_budgets,
    effective_thresholds,
    end_user_tier,
    period_bounds,
    threshold_level,
)
from tenants.enums import BudgetDecision, BudgetScope
from tenants.models import ApiToken, Budget, BudgetCounter, EndUser, EndUserTier, Member, Tenant
from tenants.services import end_user_get_or_create, token_hash


def memberships_of(*, user) -> tuple[Member, ...]:
    """Every membership of ``user`` in an active tenant, tenants by name: the one rule for
    "may this user act for this tenant" (dashboard pages, live socket, billing)."""
    return tuple(
        Member.objects.filter(user=user, tenant__is_active=True)
        .select_related("tenant")
        .order_by("tenant__name", "tenant__slug")
    )


def membership_of(*, user, tenant_slug: str) -> Member | None:
    """``user``'s membership of the active tenant ``tenant_slug``, else None."""
    return (
        Member.objects.filter(user=user, tenant__slug=tenant_slug, tenant__is_active=True)
        .select_related("tenant")
        .first()
    )


@dataclass(frozen=True)
class TokenContext:
    """Who is calling: resolved from the bearer token, never from the request body."""

    token_id: int
    tenant_id: int
    tenant_slug: str
    scopes: frozenset[str]
    tenant_allowed_models: tuple[str, ...]
    tier_allowed_models: tuple[str, ...]
    last_used_at: datetime | None
    token_mask: str = ""
    time_zone: str = "UTC"
    has_budgets: bool = False
    has_end_user_tiers: bool = False
    tenant_rpm: int | None = None  # from the tenant's plan tier
    tenant_tpm: int | None = None
    token_rpm: int | None = None
    token_tpm: int | None = None
    budget_callback_url: str = ""
    # Audits (routing.audits): off unless the tenant has them on.
    audits_enabled: bool = False
    audit_cap_nanos: int = 0
    trace_content: bool = False  # traces may carry prompt and completion text
    models_version: int = 0  # of the tenant's own provider models (0: it has none)

    def has_scope(self, scope: str) -> bool:
        return "admin" in self.scopes or scope in self.scopes


EMAIL_UNVERIFIED = (
    "Verify your email to activate this API key: open the link we sent to the "
    "organisation owner's address (or send a new one from /accounts/verify/)."
)


class TokenInvalid(Exception):
    def __init__(self, reason: str):
        super().__init__(reason)
        self.reason = reason


_TOKEN_COLUMNS = (
    "pk",
    "tenant_id",
    "scopes",
    "expires_at",
    "revoked_at",
    "last_used_at",
    "tenant__slug",
    "tenant__is_active",
    "tenant__allowed_models",
    "tenant__tier__allowed_models",
    "mask",
    "tenant__time_zone",
    "has_budgets",
    "has_tiers",
    "tenant__tier__requests_per_minute",
    "tenant__tier__tokens_per_minute",
    "requests_per_minute",
    "tokens_per_minute",
    "tenant__budget_callback_url",
    "tenant__email_verified_at",
    "tenant__audits_enabled",
    "tenant__audit_monthly_cap_nanos",
    "tenant__trace_content",
    "tenant__models_version",
)
_HASH_PLACEHOLDER = "\x00token-hash\x00"


@lru_cache(maxsize=4)
def _token_query(vendor: str) -> tuple[str, int, int]:
    """The token lookup's SQL, compiled once per database backend (it runs on every request)."""
    queryset = (
        ApiToken.objects.filter(token_hash=_HASH_PLACEHOLDER)
        .annotate(
            has_budgets=Exists(Budget.objects.filter(tenant_id=OuterRef("tenant_id"))),
            has_tiers=Exists(EndUserTier.objects.filter(tenant_id=OuterRef("tenant_id"))),
        )
        .values_list(*_TOKEN_COLUMNS)
    )
    sql, index = select_sql(queryset, _HASH_PLACEHOLDER)
    return sql, index, len(queryset.query.sql_with_params()[1])


class AdmissionCache:
    """What admission reads about a caller (the token lookup's row, the end user, the end
    user's tier), kept by this process for at most ``CASCADEFLOW_ADMISSION_CACHE_SECONDS``
    (<= 1 s).

    Invariants:

    - An entry is stamped with the time its query *started*, and is served only
      while ``now - stamp < ttl``. A change committed at T (a token revoked or
      expired, a tenant deactivated, a plan, budgets or tiers changed, an end
      user moved to another tier) is therefore seen by every process, whatever
      it cached, by T + ttl <= T + 1 s. Nothing is shared between processes, so
      nothing can fail to invalidate: Redis down or not, the bound holds.
    - For tokens, what is cached is the database row, not the verdict:
      revocation, expiry (against the request's ``now``), deactivation and
      verification are checked on every request, from a row at most ``ttl`` old.
    - Unknown tokens are never cached (a hostile caller cannot fill the cache
      with them), and the cache holds at most ``MAX_ENTRIES`` entries: beyond,
      it starts over.
    - Budget counters are never cached: spend and reservations are read and
      written in PostgreSQL by every admission (``tenants.budgets``). The budget
      lines that apply to a request are (``budget_lines_of``): a line of a budget
      deleted since fails its reservation (foreign key) and admission reads the
      lines again, uncached.
    """

    MAX_ENTRIES = 10_000

    def __init__(self, clock: Callable[[], float] = time.monotonic):
        self._clock = clock
        self._entries: dict[Hashable, tuple[float, Any]] = {}
        self._used: dict[int, datetime] = {}  # token id -> last use this process recorded
        self._lock = threading.Lock()

    def get(self, key: Hashable, ttl: float, load: Callable[[], Any], *, keep_none: bool = False):
        """``load()``'s value for ``key``: the one cached if younger than ``ttl``, else read
        (and cached unless it is None, or ``keep_none``)."""
        if ttl > 0:
            hit = self._entries.get(key)
            if hit is not None and self._clock() - hit[0] < ttl:
                return hit[1]
        stamp = self._clock()  # before the query: the value is at least this fresh
        value = load()
        if ttl > 0 and (value is not None or keep_none):
            with self._lock:
                if len(self._entries) >= self.MAX_ENTRIES:
                    self._entries.clear()
                    self._used.clear()
                self._entries[key] = (stamp, value)
        return value

    def token_row(self, digest: str, ttl: float) -> tuple | None:
        """The token lookup's row for the token whose hash is ``digest``, None if unknown."""

        def load() -> tuple | None:
            sql, index, count = _token_query(connection.vendor)
            params: list = [None] * count
            params[index] = digest
            row = fetch_one(sql, params)
            return None if row is None else tuple(row)

        return self.get(("token", digest), ttl, load)

    def forget(self, key: Hashable) -> None:
        with self._lock:
            self._entries.pop(key, None)

    def used(self, token_id: int, at: datetime) -> None:
        """Remember that this process recorded a use of the token (``token_touch``)."""
        self._used[token_id] = at

    def last_used(self, token_id: int, stored: datetime | None) -> datetime | None:
        mine = self._used.get(token_id)
        if mine is None or (stored is not None and stored >= mine):
            return stored
        return mine

    def clear(self) -> None:
        with self._lock:
            self._entries.clear()
            self._used.clear()


admission_cache = AdmissionCache()


def _ttl() -> float:
    return settings.CASCADEFLOW_ADMISSION_CACHE_SECONDS


def token_used(*, token_id: int, at: datetime) -> None:
    """The gateway recorded a use of the token at ``at``: a cached row must not make it
    record the same use again on the next requests."""
    admission_cache.used(token_id, at)


def end_user_of(*, tenant_id: int, external_id: str) -> EndUser:
    """The tenant's end user ``external_id``, created at first sight; at most 1 s old
    (``AdmissionCache``). Read-only: callers never change or save it."""
    return admission_cache.get(
        ("end_user", tenant_id, external_id),
        _ttl(),
        lambda: end_user_get_or_create(tenant=Tenant(pk=tenant_id), external_id=external_id),
    )


def end_user_tier_of(*, tenant_id: int, end_user: EndUser | None) -> EndUserTierPolicy | None:
    """``tenants.budgets.end_user_tier``, at most 1 s old (``AdmissionCache``)."""
    key = (
        "tier",
        tenant_id,
        end_user.pk if end_user else None,
        end_user.tier_id if end_user else None,
    )
    return admission_cache.get(
        key,
        _ttl(),
        lambda: end_user_tier(tenant_id=tenant_id, end_user=end_user),
        keep_none=True,
    )


def budget_lines_of(
    *,
    tenant_id: int,
    token_id: int | None,
    token_label: str,
    end_user: EndUser | None,
    tier: EndUserTierPolicy | None,
    fresh: bool = False,
) -> list[BudgetLine]:
    """``tenants.budgets.applicable_budgets``, at most 1 s old (``AdmissionCache``), or
    read now if ``fresh``. The lines only: counters are never cached."""
    end_user_id = end_user.pk if end_user else None

    def load() -> tuple[BudgetLine, ...]:
        return tuple(
            applicable_budgets(
                tenant_id=tenant_id,
                token_id=token_id,
                token_label=token_label,
                end_user_id=end_user_id,
                end_user_label=end_user.external_id if end_user else "",
                tier=tier,
            )
        )

    key = ("budgets", tenant_id, token_id, end_user_id, tier)
    if fresh:
        admission_cache.forget(key)
    return list(admission_cache.get(key, _ttl(), load, keep_none=True))


def token_context_for_raw(*, raw: str, now: datetime) -> TokenContext:
    """Resolve a raw bearer token; raise ``TokenInvalid`` with a user-facing reason.

    Unknown, revoked and expired tokens, and tokens of inactive tenants or of
    self-serve tenants whose owner has not verified their email yet, are all
    refused; the reason never reveals whether another tenant's token exists.
    The row may come from ``admission_cache`` (at most 1 s old): see its invariants.
    """
    if not raw:
        raise TokenInvalid("Missing API key. Send it as 'Authorization: Bearer <token>'.")
    row = admission_cache.token_row(token_hash(raw), _ttl())
    if row is None:
        raise TokenInvalid("Incorrect API key provided.")
    (token_id, tenant_id, scopes, expires_at, revoked_at, last_used_at, slug, tenant_active,
     tenant_models, tier_models, mask, time_zone, has_budgets, has_tiers,
     tenant_rpm, tenant_tpm, token_rpm, token_tpm, callback_url, verified_at,
     audits_enabled, audit_cap_nanos, trace_content, models_version) = row  # fmt: skip
    if revoked_at is not None:
        raise TokenInvalid("This API key has been revoked.")
    expires_at = as_datetime(expires_at)
    if expires_at is not None and expires_at <= now:
        raise TokenInvalid("This API key has expired.")
    if not tenant_active:
        raise TokenInvalid("This API key belongs to a deactivated account.")
    if verified_at is None:
        raise TokenInvalid(EMAIL_UNVERIFIED)
    return TokenContext(
        token_id=token_id,
        tenant_id=tenant_id,
        tenant_slug=slug,
        scopes=frozenset(as_json(scopes) or ()),
        tenant_allowed_models=tuple(as_json(tenant_models) or ()),
        tier_allowed_models=tuple(as_json(tier_models) or ()),
        last_used_at=admission_cache.last_used(token_id, as_datetime(last_used_at)),
        token_mask=mask,
        time_zone=time_zone,
        has_budgets=bool(has_budgets),
        has_end_user_tiers=bool(has_tiers),
        tenant_rpm=tenant_rpm,
        tenant_tpm=tenant_tpm,
        token_rpm=token_rpm,
        token_tpm=token_tpm,
        budget_callback_url=callback_url or "",
        audits_enabled=bool(audits_enabled),
        audit_cap_nanos=int(audit_cap_nanos or 0),
        trace_content=bool(trace_content),
        models_version=int(models_version or 0),
    )


@dataclass(frozen=True)
class BudgetStatus:
    """A budget in its current period, from its counters (what admission reads).

    A tier budget counts each end user of the tier apart: its figures are those
    of the end user closest to the limit (``end_user_id``).
    """

    budget: Budget
    period_start: datetime
    resets_at: datetime | None
    spent_nanos: int
    reserved_nanos: int  # held by requests in progress
    thresholds: tuple[int, int, int]  # warn / degrade / block percent in force
    end_user_id: int | None = None

    @property
    def per_end_user(self) -> bool:
        return self.budget.scope == BudgetScope.TIER

    @property
    def cap_nanos(self) -> int:
        return self.budget.limit_nanos * self.thresholds[2] // 100

    @property
    def remaining_nanos(self) -> int:
        """What may still be spent before the block threshold, requests in progress aside."""
        return max(self.cap_nanos - self.spent_nanos - self.reserved_nanos, 0)

    @property
    def used_pct(self) -> float | None:
        limit = self.budget.limit_nanos
        return 100.0 * self.spent_nanos / limit if limit else None

    @property
    def state(self) -> str:
        """ok / warn / degrade / block: the highest threshold this period's spend has
        crossed, the crossings the alert history records."""
        level = threshold_level(self.spent_nanos, self.budget.limit_nanos, self.thresholds)
        return "ok" if level == BudgetDecision.ALLOW else level


def budget_statuses(
    *, tenant_id: int, time_zone: str, now: datetime, budgets: list[Budget] | None = None
) -> dict[int, BudgetStatus]:
    """Each budget of the tenant (or ``budgets``) in its current period, by budget id.

    Thresholds are the ones in force (``effective_thresholds``): an end user's own
    budget and a tier budget default to the tier's, the others to 80 / 90 / 100.
    """
    if budgets is None:
        budgets = list(
            Budget.objects.filter(tenant_id=tenant_id).select_related("tier", "end_user__tier")
        )
    if not budgets:
        return {}
    default_tier = EndUserTier.objects.filter(tenant_id=tenant_id, is_default=True).first()
    bounds = {b.pk: period_bounds(b.period, now, time_zone) for b in budgets}
    counters: dict[int, tuple[int, int, int]] = {}
    for budget_id, subject_id, start, spent, reserved in BudgetCounter.objects.filter(
        tenant_id=tenant_id,
        budget_id__in=bounds,
        period_start__in={start for start, _ in bounds.values()},
    ).values_list("budget_id", "subject_id", "period_start", "spent_nanos", "reserved_nanos"):
        if as_datetime(start) != bounds[budget_id][0]:
            continue
        best = counters.get(budget_id)
        if best is None or spent + reserved > best[1] + best[2]:
            counters[budget_id] = (subject_id, spent, reserved)
    statuses = {}
    for budget in budgets:
        tier = budget.tier if budget.scope == BudgetScope.TIER else None
        if budget.scope == BudgetScope.END_USER:
            tier = (budget.end_user.tier if budget.end_user else None) or default_tier
        subject_id, spent, reserved = counters.get(budget.pk, (0, 0, 0))
        start, end = bounds[budget.pk]
        statuses[budget.pk] = BudgetStatus(
            budget=budget,
            period_start=start,
            resets_at=end,
            spent_nanos=int(spent),
            reserved_nanos=int(reserved),
            thresholds=effective_thresholds(
                scope=budget.scope,
                given=(budget.warn_pct, budget.degrade_pct, budget.block_pct),
                tier=(tier.warn_pct, tier.degrade_pct, tier.block_pct) if tier else None,
            ),
            end_user_id=subject_id or None if budget.scope == BudgetScope.TIER else None,
        )
    return statuses
