"""Tenants, their members, their end users, plan tiers and API tokens.

Tenancy invariant: every tenant-owned row carries a non-null ``tenant`` FK and
its indexes start with it, so every read can (and must) be scoped by tenant.
"""

from django.conf import settings
from django.db import models
from django.db.models import Q

from tenants.enums import BudgetPeriod, BudgetScope, MemberRole, Scope


class Tier(models.Model):
    """A CascadeFlow plan (free, pro, …) and the limits it grants.

    Tiers are platform-wide; Stripe products map onto them by ``slug``.
    Limits of ``None`` mean "no limit from the plan".
    """

    slug = models.SlugField(max_length=64, unique=True)
    name = models.CharField(max_length=128)
    monthly_budget_nanos = models.BigIntegerField(null=True, blank=True)
    requests_per_minute = models.PositiveIntegerField(null=True, blank=True)
    tokens_per_minute = models.PositiveIntegerField(null=True, blank=True)
    # Public model names (or routing profiles) the plan allows; empty = all.
    allowed_models = models.JSONField(default=list, blank=True)
    is_default = models.BooleanField(default=False)
    created_at = models.DateTimeField(auto_now_add=True)
    updated_at = models.DateTimeField(auto_now=True)

    class Meta:
        constraints = [
            models.UniqueConstraint(
                fields=["is_default"], condition=Q(is_default=True), name="tier_single_default"
            ),
            models.CheckConstraint(
                condition=Q(monthly_budget_nanos__isnull=True) | Q(monthly_budget_nanos__gte=0),
                name="tier_budget_non_negative",
            ),
        ]

    def __str__(self) -> str:
        return self.name


class Tenant(models.Model):
    slug = models.SlugField(max_length=64, unique=True)
    name = models.CharField(max_length=200)
    tier = models.ForeignKey(Tier, on_delete=models.PROTECT, null=True, blank=True)
    time_zone = models.CharField(max_length=64, default="UTC")
    # Public model names this tenant may call besides the demo models; empty = all.
    allowed_models = models.JSONField(default=list, blank=True)
    is_active = models.BooleanField(default=True)
    created_at = models.DateTimeField(auto_now_add=True)

    def __str__(self) -> str:
        return self.slug


class Member(models.Model):
    tenant = models.ForeignKey(Tenant, on_delete=models.CASCADE, related_name="members")
    user = models.ForeignKey(
        settings.AUTH_USER_MODEL, on_delete=models.CASCADE, related_name="memberships"
    )
    role = models.CharField(max_length=16, choices=MemberRole.choices, default=MemberRole.VIEWER)
    created_at = models.DateTimeField(auto_now_add=True)

    class Meta:
        constraints = [
            models.UniqueConstraint(fields=["tenant", "user"], name="member_unique_per_tenant")
        ]

    def __str__(self) -> str:
        return f"{self.user} @ {self.tenant} ({self.role})"


class EndUser(models.Model):
    """One of the tenant's own customers, keyed by the ``user`` field of requests."""

    tenant = models.ForeignKey(Tenant, on_delete=models.CASCADE, related_name="end_users")
    external_id = models.CharField(max_length=256)
    created_at = models.DateTimeField(auto_now_add=True)

    class Meta:
        constraints = [
            models.UniqueConstraint(
                fields=["tenant", "external_id"], name="end_user_unique_per_tenant"
            )
        ]

    def __str__(self) -> str:
        return self.external_id


class ApiToken(models.Model):
    """A tenant's API token. Only the SHA-256 of the raw value is stored.

    The raw token is returned once by ``services.token_create`` and never again;
    ``mask`` (``cf_…abcd``) is what pages and the API display.
    """

    tenant = models.ForeignKey(Tenant, on_delete=models.CASCADE, related_name="api_tokens")
    name = models.CharField(max_length=128)
    token_hash = models.CharField(max_length=64, unique=True)
    mask = models.CharField(max_length=32)
    scopes = models.JSONField(default=list)
    created_by = models.ForeignKey(
        settings.AUTH_USER_MODEL, on_delete=models.SET_NULL, null=True, blank=True, related_name="+"
    )
    created_at = models.DateTimeField(auto_now_add=True)
    last_used_at = models.DateTimeField(null=True, blank=True)
    expires_at = models.DateTimeField(null=True, blank=True)
    revoked_at = models.DateTimeField(null=True, blank=True)

    class Meta:
        indexes = [models.Index(fields=["tenant", "-created_at"], name="token_tenant_created")]

    def __str__(self) -> str:
        return f"{self.name} ({self.mask})"

    def has_scope(self, scope: Scope | str) -> bool:
        return Scope.ADMIN in self.scopes or str(scope) in self.scopes


class AuditEvent(models.Model):
    """Who changed what in a tenant, written in the same transaction as the change."""

    tenant = models.ForeignKey(Tenant, on_delete=models.CASCADE, related_name="audit_events")
    actor = models.ForeignKey(
        settings.AUTH_USER_MODEL, on_delete=models.SET_NULL, null=True, blank=True, related_name="+"
    )
    action = models.CharField(max_length=64)
    target = models.CharField(max_length=256, blank=True)
    data = models.JSONField(default=dict, blank=True)
    created_at = models.DateTimeField(auto_now_add=True)

    class Meta:
        indexes = [models.Index(fields=["tenant", "-created_at"], name="audit_tenant_created")]

    def __str__(self) -> str:
        return f"{self.action} {self.target}"


class Budget(models.Model):
    """A spending limit on one scope over a calendar period in the tenant's time zone.

    Money invariant: ``limit_nanos`` is integer nano-dollars, never negative.
    Exactly the FK matching ``scope`` is set (none for a tenant-wide budget).
    """

    tenant = models.ForeignKey(Tenant, on_delete=models.CASCADE, related_name="budgets")
    scope = models.CharField(max_length=16, choices=BudgetScope.choices)
    period = models.CharField(max_length=16, choices=BudgetPeriod.choices)
    limit_nanos = models.BigIntegerField()
    tier = models.ForeignKey(Tier, on_delete=models.CASCADE, null=True, blank=True)
    end_user = models.ForeignKey(EndUser, on_delete=models.CASCADE, null=True, blank=True)
    token = models.ForeignKey(ApiToken, on_delete=models.CASCADE, null=True, blank=True)
    created_at = models.DateTimeField(auto_now_add=True)

    class Meta:
        indexes = [models.Index(fields=["tenant", "scope"], name="budget_tenant_scope")]
        constraints = [
            models.CheckConstraint(
                condition=Q(limit_nanos__gte=0), name="budget_limit_non_negative"
            ),
            models.CheckConstraint(
                condition=(
                    Q(
                        scope=BudgetScope.TENANT,
                        tier__isnull=True,
                        end_user__isnull=True,
                        token__isnull=True,
                    )
                    | Q(
                        scope=BudgetScope.TIER,
                        tier__isnull=False,
                        end_user__isnull=True,
                        token__isnull=True,
                    )
                    | Q(
                        scope=BudgetScope.END_USER,
                        tier__isnull=True,
                        end_user__isnull=False,
                        token__isnull=True,
                    )
                    | Q(
                        scope=BudgetScope.TOKEN,
                        tier__isnull=True,
                        end_user__isnull=True,
                        token__isnull=False,
                    )
                ),
                name="budget_target_matches_scope",
            ),
        ]

    def __str__(self) -> str:
        return f"{self.scope} {self.period} {self.limit_nanos}n"
