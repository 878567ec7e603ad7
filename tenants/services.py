"""Writes for tenants, members, end users and API tokens."""

import hashlib
import secrets
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import datetime

from django.conf import settings
from django.contrib.auth import get_user_model
from django.contrib.auth.models import AbstractBaseUser
from django.db import IntegrityError, transaction
from django.db.models import Q
from django.utils import timezone

from tenants.enums import ALL_SCOPES, BudgetPeriod, BudgetScope, MemberRole, Scope
from tenants.models import (
    ApiToken,
    AuditEvent,
    Budget,
    EndUser,
    EndUserTier,
    Member,
    Tenant,
    Tier,
)

TOKEN_PREFIX = "cf_"  # noqa: S105 - a public prefix, not a secret


def token_hash(raw: str) -> str:
    return hashlib.sha256(raw.encode()).hexdigest()


def token_mask(raw: str) -> str:
    return f"{TOKEN_PREFIX}…{raw[-4:]}"


@dataclass(frozen=True)
class IssuedToken:
    token: ApiToken
    raw: str  # shown once, never stored


def audit_record(
    *,
    tenant: Tenant,
    action: str,
    target: str = "",
    acting_user: AbstractBaseUser | None = None,
    data: dict | None = None,
) -> AuditEvent:
    return AuditEvent.objects.create(
        tenant=tenant, actor=acting_user, action=action, target=target, data=data or {}
    )


# --- grants: nobody gives more power than they hold ----------------------------------

# What each dashboard role may do through the API. Admins and owners manage every
# API resource (owners also billing and members, which no token reaches).
ROLE_SCOPES: dict[str, frozenset[str]] = {
    MemberRole.OWNER: frozenset(ALL_SCOPES),
    MemberRole.ADMIN: frozenset(ALL_SCOPES),
    MemberRole.VIEWER: frozenset({Scope.USAGE_READ}),
}
# Roles from least to most power.
ROLE_ORDER: tuple[str, ...] = (MemberRole.VIEWER, MemberRole.ADMIN, MemberRole.OWNER)


class GrantExceedsHolder(PermissionError):
    """Asked to give a token or a member more power than the one giving it holds."""


def scopes_beyond(*, held: Iterable[str], requested: Iterable[str]) -> frozenset[str]:
    """The requested scopes the holder cannot grant (empty: the grant is allowed).

    The one rule for every way a token comes to exist: a holder grants only
    scopes it holds itself, and ``admin`` (which implies every scope) grants
    anything; so only ``admin`` grants ``admin``.
    """
    held = frozenset(held)
    if Scope.ADMIN in held:
        return frozenset()
    return frozenset(requested) - held


def grant_check(*, held: Iterable[str], requested: Iterable[str]) -> None:
    """Raise :class:`GrantExceedsHolder` naming the scopes ``held`` cannot grant."""
    beyond = scopes_beyond(held=held, requested=requested)
    if beyond:
        raise GrantExceedsHolder(
            f"You can only grant scopes you hold yourself; not held: {', '.join(sorted(beyond))}."
        )


def role_scopes(role: str) -> frozenset[str]:
    """The API scopes a member of ``role`` holds (for tokens they create)."""
    return ROLE_SCOPES.get(role, frozenset())


def role_grant_check(*, acting_role: str, role: str) -> None:
    """A member gives another member at most their own role."""
    if role not in ROLE_ORDER or acting_role not in ROLE_ORDER:
        raise GrantExceedsHolder("Unknown role.")
    if ROLE_ORDER.index(role) > ROLE_ORDER.index(acting_role):
        raise GrantExceedsHolder(
            f"You can only give a role up to your own ({MemberRole(acting_role).label.lower()})."
        )


@transaction.atomic
def token_create(
    *,
    tenant: Tenant,
    name: str,
    scopes: list[str] | tuple[str, ...] = ALL_SCOPES,
    expires_at: datetime | None = None,
    acting_user: AbstractBaseUser | None = None,
    granted_by: Iterable[str] | None = None,
) -> IssuedToken:
    """Issue a token; the raw value is in the result, once.

    ``granted_by`` is the scopes of whoever asks (the calling token's, or
    :func:`role_scopes` of the member's role): the new token may not exceed
    them (:class:`GrantExceedsHolder`). ``None`` is CascadeFlow itself
    (tenant creation, management commands), which may issue any scope.
    """
    unknown = set(scopes) - set(ALL_SCOPES)
    if unknown:
        raise ValueError(f"Unknown scopes: {', '.join(sorted(unknown))}")
    if granted_by is not None:
        grant_check(held=granted_by, requested=scopes)
    raw = TOKEN_PREFIX + secrets.token_urlsafe(32)
    token = ApiToken.objects.create(
        tenant=tenant,
        name=name,
        token_hash=token_hash(raw),
        mask=token_mask(raw),
        scopes=sorted(set(scopes)),
        expires_at=expires_at,
        created_by=acting_user,
    )
    audit_record(
        tenant=tenant,
        action="token.create",
        target=token.mask,
        acting_user=acting_user,
        data={"name": name, "scopes": token.scopes},
    )
    return IssuedToken(token=token, raw=raw)


@transaction.atomic
def token_revoke(
    *, tenant: Tenant, token: ApiToken, acting_user: AbstractBaseUser | None = None
) -> ApiToken:
    if token.tenant_id != tenant.pk:
        raise ApiToken.DoesNotExist
    if token.revoked_at is None:
        token.revoked_at = timezone.now()
        token.save(update_fields=["revoked_at"])
        audit_record(
            tenant=tenant, action="token.revoke", target=token.mask, acting_user=acting_user
        )
    return token


def token_touch(*, token_id: int, now: datetime, stale_before: datetime) -> None:
    """Record use, writing at most once per staleness window (not once per request)."""
    ApiToken.objects.filter(
        Q(last_used_at__isnull=True) | Q(last_used_at__lt=stale_before), pk=token_id
    ).update(last_used_at=now)


def end_user_get_or_create(*, tenant: Tenant, external_id: str) -> EndUser:
    """First sight of an end user creates it; concurrent first sights agree."""
    try:
        return EndUser.objects.get(tenant=tenant, external_id=external_id)
    except EndUser.DoesNotExist:
        pass
    try:
        with transaction.atomic():
            return EndUser.objects.create(tenant=tenant, external_id=external_id)
    except IntegrityError:
        return EndUser.objects.get(tenant=tenant, external_id=external_id)


@dataclass(frozen=True)
class CreatedTenant:
    tenant: Tenant
    issued: IssuedToken
    owner: AbstractBaseUser | None


@transaction.atomic
def tenant_create(
    *,
    slug: str,
    name: str = "",
    tier: Tier | None = None,
    time_zone: str = "UTC",
    owner_email: str | None = None,
    owner_password: str | None = None,
    monthly_budget_nanos: int | None = None,
    acting_user: AbstractBaseUser | None = None,
    email_verified: bool = True,
) -> CreatedTenant:
    """Create a tenant, optionally its owner, and a first token with every scope.

    Tenants an operator creates are trusted (``email_verified``); a self-serve sign-up
    passes False, and the tenant's tokens work once :func:`tenant_email_verify` ran.
    """
    if tier is None:
        tier = Tier.objects.filter(is_default=True).first()
    tenant = Tenant.objects.create(
        slug=slug,
        name=name or slug,
        tier=tier,
        time_zone=time_zone,
        email_verified_at=timezone.now() if email_verified else None,
    )
    owner = None
    if owner_email:
        owner = user_get_or_create(email=owner_email, password=owner_password)
        Member.objects.create(tenant=tenant, user=owner, role=MemberRole.OWNER)
    if monthly_budget_nanos is not None:
        budget_create(
            tenant=tenant,
            scope=BudgetScope.TENANT,
            period=BudgetPeriod.MONTH,
            limit_nanos=monthly_budget_nanos,
            acting_user=acting_user,
        )
    audit_record(
        tenant=tenant,
        action="tenant.create",
        target=slug,
        acting_user=acting_user,
        data={"tier": tier.slug if tier else None, "owner": owner_email},
    )
    if tier is not None and tier.monthly_budget_nanos is not None:
        plan_apply(tenant=tenant, tier=tier, reason="tenant created")
    issued = token_create(tenant=tenant, name="default", acting_user=acting_user or owner)
    return CreatedTenant(tenant=tenant, issued=issued, owner=owner)


@transaction.atomic
def tenant_email_verify(
    *, tenant: Tenant, email: str, acting_user: AbstractBaseUser | None = None
) -> bool:
    """Record that the owner proved ``email`` is theirs: the tenant's tokens now work.

    Idempotent: a second verification changes nothing and returns False."""
    updated = Tenant.objects.filter(pk=tenant.pk, email_verified_at__isnull=True).update(
        email_verified_at=timezone.now()
    )
    if updated:
        audit_record(
            tenant=tenant,
            action="tenant.email_verify",
            target=email,
            acting_user=acting_user,
        )
    return bool(updated)


def user_get_or_create(*, email: str, password: str | None) -> AbstractBaseUser:
    User = get_user_model()
    user = User.objects.filter(username__iexact=email).first()
    if user is None:
        user = User(username=email, email=email)
        if password:
            user.set_password(password)
        else:
            user.set_unusable_password()
        user.save()
    elif password:
        user.set_password(password)
        user.save(update_fields=["password"])
    return user


def free_tier_limits() -> dict:
    """The free tier's limits from the settings (``CASCADEFLOW_FREE_TIER_*``).

    Self-serve sign-ups land on the free tier: without limits it would spend the
    platform's provider keys for anyone with an email address."""
    return {
        "monthly_budget_nanos": settings.CASCADEFLOW_FREE_TIER_MONTHLY_BUDGET_NANOS,
        "requests_per_minute": settings.CASCADEFLOW_FREE_TIER_RPM,
        "allowed_models": list(settings.CASCADEFLOW_FREE_TIER_MODELS),
    }


def tier_ensure_defaults() -> Tier:
    """The free tier every tenant starts on until Stripe says otherwise.

    Created with :func:`free_tier_limits`; an existing free tier is left as it is
    (an operator or Stripe's plan sync may have changed it since)."""
    free, _ = Tier.objects.get_or_create(
        slug="free", defaults={"name": "Free", "is_default": True, **free_tier_limits()}
    )
    return free


class PlanBudgetLocked(PermissionError):
    """A budget that comes with the tenant's plan: it changes with the plan, not by hand."""

    def __init__(self) -> None:
        super().__init__("This budget comes with the plan; change the plan instead.")


def _budget_check(limit_nanos: int, warn: int | None, degrade: int | None, block: int | None):
    if limit_nanos < 0:
        raise ValueError("A budget limit cannot be negative.")
    given = [p for p in (warn, degrade, block) if p is not None]
    if given != sorted(given) or any(p <= 0 or p > 1000 for p in given):
        raise ValueError("Thresholds must be positive and ordered warn <= degrade <= block.")


BUDGET_EDITABLE = ("limit_nanos", "warn_pct", "degrade_pct", "block_pct")


@transaction.atomic
def budget_update(
    *, budget: Budget, acting_user: AbstractBaseUser | None = None, **changes
) -> dict[str, int | None]:
    """Change a budget's limit and thresholds; returns what changed (audited with it).

    Plan budgets are refused (:class:`PlanBudgetLocked`): an admin cannot lift the
    plan's cap. Unknown fields, a negative limit or thresholds out of order raise
    ``ValueError`` and change nothing."""
    if budget.from_plan:
        raise PlanBudgetLocked
    unknown = set(changes) - set(BUDGET_EDITABLE)
    if unknown:
        raise ValueError(f"Not editable: {', '.join(sorted(unknown))}.")
    merged = {f: changes.get(f, getattr(budget, f)) for f in BUDGET_EDITABLE}
    _budget_check(
        merged["limit_nanos"], merged["warn_pct"], merged["degrade_pct"], merged["block_pct"]
    )
    changed = {f: v for f, v in changes.items() if getattr(budget, f) != v}
    if changed:
        for field, value in changed.items():
            setattr(budget, field, value)
        budget.save(update_fields=list(changed))
        audit_record(
            tenant=budget.tenant,
            action="budget.update",
            target=str(budget.pk),
            acting_user=acting_user,
            data=changed,
        )
    return changed


@transaction.atomic
def budget_delete(*, budget: Budget, acting_user: AbstractBaseUser | None = None) -> None:
    if budget.from_plan:
        raise PlanBudgetLocked
    audit_record(
        tenant=budget.tenant,
        action="budget.delete",
        target=str(budget.pk),
        acting_user=acting_user,
        data={"scope": budget.scope, "period": budget.period, "limit_nanos": budget.limit_nanos},
    )
    budget.delete()


@transaction.atomic
def end_user_tier_set(
    *, end_user: EndUser, tier: EndUserTier | None, acting_user: AbstractBaseUser | None = None
) -> bool:
    """Put an end user on a tier of its tenant (None: the default); audited. True if changed."""
    if tier is not None and tier.tenant_id != end_user.tenant_id:
        raise ValueError("The tier belongs to another tenant.")
    if end_user.tier_id == (tier.pk if tier else None):
        return False
    previous = end_user.tier
    end_user.tier = tier
    end_user.save(update_fields=["tier"])
    audit_record(
        tenant=end_user.tenant,
        action="end_user.tier",
        target=end_user.external_id,
        acting_user=acting_user,
        data={"from": previous.slug if previous else None, "to": tier.slug if tier else None},
    )
    return True


@transaction.atomic
def end_user_audit_exclusion_set(
    *, end_user: EndUser, excluded: bool, acting_user: AbstractBaseUser | None = None
) -> bool:
    """Exclude an end user's requests from audits (privacy), or include them again. True if
    changed; audited."""
    if end_user.audit_excluded == excluded:
        return False
    end_user.audit_excluded = excluded
    end_user.save(update_fields=["audit_excluded"])
    audit_record(
        tenant=end_user.tenant,
        action="end_user.audit_excluded",
        target=end_user.external_id,
        acting_user=acting_user,
        data={"excluded": excluded},
    )
    return True


class AuditSettingsInvalid(ValueError):
    pass


@transaction.atomic
def tenant_settings_update(
    *,
    tenant: Tenant,
    audits_enabled: bool | None = None,
    audit_monthly_cap_nanos: int | None = None,
    trace_content: bool | None = None,
    acting_user: AbstractBaseUser | None = None,
) -> dict:
    """Turn the tenant's audits on or off, set their monthly cap, and turn on or off the
    export of prompt text in traces (``trace_content``); returns what changed."""
    if audit_monthly_cap_nanos is not None and not 0 <= audit_monthly_cap_nanos <= 2**63 - 1:
        raise AuditSettingsInvalid("The monthly audit cap is a non-negative number of nanos.")
    changes = {
        name: value
        for name, value in (
            ("audits_enabled", audits_enabled),
            ("audit_monthly_cap_nanos", audit_monthly_cap_nanos),
            ("trace_content", trace_content),
        )
        if value is not None and getattr(tenant, name) != value
    }
    if changes:
        Tenant.objects.filter(pk=tenant.pk).update(**changes)
        for name, value in changes.items():
            setattr(tenant, name, value)
        audit_record(tenant=tenant, action="tenant.settings", acting_user=acting_user, data=changes)
    return changes


@transaction.atomic
def budget_create(
    *,
    tenant: Tenant,
    scope: str,
    period: str,
    limit_nanos: int,
    tier: EndUserTier | None = None,
    end_user: EndUser | None = None,
    token: ApiToken | None = None,
    warn_pct: int | None = None,
    degrade_pct: int | None = None,
    block_pct: int | None = None,
    acting_user: AbstractBaseUser | None = None,
) -> Budget:
    _budget_check(limit_nanos, warn_pct, degrade_pct, block_pct)
    for obj in (end_user, token, tier):
        if obj is not None and obj.tenant_id != tenant.pk:
            raise ValueError("Budget target belongs to another tenant.")
    budget = Budget.objects.create(
        tenant=tenant,
        scope=scope,
        period=period,
        limit_nanos=limit_nanos,
        tier=tier,
        end_user=end_user,
        token=token,
        warn_pct=warn_pct,
        degrade_pct=degrade_pct,
        block_pct=block_pct,
    )
    audit_record(
        tenant=tenant,
        action="budget.create",
        target=f"{scope}:{period}",
        acting_user=acting_user,
        data={"limit_nanos": limit_nanos},
    )
    return budget


@transaction.atomic
def plan_apply(*, tenant: Tenant, tier: Tier | None, reason: str) -> bool:
    """Put ``tenant`` on ``tier``: the plan's limits, and the monthly budget that comes with it.

    Returns whether anything changed. The gateway reads the tier and the
    budgets at least once a second in every worker
    (``CASCADEFLOW_ADMISSION_CACHE_SECONDS``), so requests see the new plan
    within a second.
    """
    changed = tenant.tier_id != (tier.pk if tier else None)
    if changed:
        previous = tenant.tier.slug if tenant.tier else None
        tenant.tier = tier
        tenant.save(update_fields=["tier"])
        audit_record(
            tenant=tenant,
            action="plan.change",
            target=tier.slug if tier else "",
            data={"from": previous, "reason": reason},
        )
    limit = tier.monthly_budget_nanos if tier else None
    if limit is None:
        changed |= Budget.objects.filter(tenant=tenant, from_plan=True).delete()[0] > 0
    else:
        _, created = Budget.objects.update_or_create(
            tenant=tenant,
            from_plan=True,
            defaults={
                "scope": BudgetScope.TENANT,
                "period": BudgetPeriod.MONTH,
                "limit_nanos": limit,
            },
        )
        changed |= created
    return changed
