"""Tenants, their members, their end users, plan tiers and API tokens.

Tenancy invariant: every tenant-owned row carries a non-null ``tenant`` FK and
its indexes start with it, so every read can (and must) be scoped by tenant.
"""

from django.conf import settings
from django.db import models
from django.db.models import Q

from core.netguard import public_url_validator
from tenants.enums import BudgetDecision, BudgetPeriod, BudgetScope, MemberRole, Scope

# The fewest whole months of ledger a plan keeps before the current one: the month
# before is still being invoiced and reconciled.
LEDGER_MIN_RETENTION_MONTHS = 2
LEDGER_MAX_RETENTION_MONTHS = 32767  # what the column holds


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
    # Whether usage billed to Stripe includes what tenants' own provider keys paid.
    meters_byok = models.BooleanField(default=False, db_default=False)
    # Whole months of ledger rows kept before the current one; older months are archived
    # to compressed CSV and removed (routing.partitions). None: kept for good.
    ledger_retention_months = models.PositiveSmallIntegerField(null=True, blank=True)
    # Set by billing's plan sync: the Stripe product behind this plan and its prices.
    stripe_product_id = models.CharField(max_length=255, blank=True)
    stripe_price_ids = models.JSONField(default=list, blank=True)
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
            models.CheckConstraint(
                condition=Q(ledger_retention_months__isnull=True)
                | Q(ledger_retention_months__gte=LEDGER_MIN_RETENTION_MONTHS),
                name="tier_retention_covers_invoicing",
            ),
        ]

    def __str__(self) -> str:
        return self.name


def default_audit_cap_nanos() -> int:
    return settings.CASCADEFLOW_AUDIT_MONTHLY_CAP_NANOS


class Tenant(models.Model):
    slug = models.SlugField(max_length=64, unique=True)
    name = models.CharField(max_length=200)
    tier = models.ForeignKey(Tier, on_delete=models.PROTECT, null=True, blank=True)
    time_zone = models.CharField(max_length=64, default="UTC")
    # Public model names this tenant may call besides the demo models; empty = all.
    allowed_models = models.JSONField(default=list, blank=True)
    is_active = models.BooleanField(default=True)
    created_at = models.DateTimeField(auto_now_add=True)
    # Self-serve tenants' API tokens work only once the owner's email is verified
    # (tenants.selectors.token_context_for_raw); operators' tenants are verified at creation.
    email_verified_at = models.DateTimeField(null=True, blank=True)
    # The tenant's own budget decision (see tenants.callbacks): an HTTPS endpoint
    # answering allow / degrade / block, signed both ways with the shared secret.
    # Callback and webhook URLs must reach public addresses (checked again when called).
    budget_callback_url = models.URLField(blank=True, validators=[public_url_validator])
    budget_callback_secret = models.TextField(blank=True)  # Fernet-encrypted
    budget_callback_timeout_ms = models.PositiveIntegerField(default=300)
    # What admission decides when the budget callback is down.
    budget_callback_fallback = models.CharField(
        max_length=8, choices=BudgetDecision.choices, default=BudgetDecision.ALLOW
    )
    budget_callback_cache_seconds = models.PositiveIntegerField(default=30)
    # Budget alerts are also POSTed here, signed with the same kind of secret.
    alert_webhook_url = models.URLField(blank=True, validators=[public_url_validator])
    alert_webhook_secret = models.TextField(blank=True)  # Fernet-encrypted
    # Audits (routing.audits): a sampled share of cascade requests is answered again by
    # the chain's reference model, to measure quality and calibrate the tenant's profiles.
    # They cost model calls, charged to the tenant's budgets like requests and never
    # more than ``audit_monthly_cap_nanos`` a calendar month (the tenant's time zone).
    audits_enabled = models.BooleanField(default=True, db_default=True)
    # Traces carry prompt and completion text only when the tenant turns this on.
    trace_content = models.BooleanField(default=False, db_default=False)
    # Bumped whenever the tenant's own provider models change (routing.tenant_models): the
    # gateway reads it with the token and rebuilds its cached specs when it moves.
    models_version = models.PositiveIntegerField(default=0, db_default=0)
    audit_monthly_cap_nanos = models.BigIntegerField(default=default_audit_cap_nanos)

    class Meta:
        constraints = [
            models.CheckConstraint(
                condition=Q(audit_monthly_cap_nanos__gte=0), name="tenant_audit_cap_non_negative"
            )
        ]

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


class EndUserTier(models.Model):
    """A tenant's tier for its own end users (free, pro…): limits, models and budget policy.

    End users with no tier get the tenant's default tier (``is_default``), if any.
    Thresholds are percentages of a budget's limit: warn (alert and header),
    degrade (cheap models only, no escalation), block (402).
    """

    tenant = models.ForeignKey(Tenant, on_delete=models.CASCADE, related_name="end_user_tiers")
    slug = models.SlugField(max_length=64)
    name = models.CharField(max_length=128)
    requests_per_minute = models.PositiveIntegerField(null=True, blank=True)
    tokens_per_minute = models.PositiveIntegerField(null=True, blank=True)
    # Model names or cascade profiles (``cascade/<name>``) the tier may request; empty = all.
    allowed_models = models.JSONField(default=list, blank=True)
    warn_pct = models.PositiveSmallIntegerField(default=80)
    degrade_pct = models.PositiveSmallIntegerField(default=90)
    block_pct = models.PositiveSmallIntegerField(default=100)
    is_default = models.BooleanField(default=False)
    created_at = models.DateTimeField(auto_now_add=True)

    class Meta:
        constraints = [
            models.UniqueConstraint(fields=["tenant", "slug"], name="end_user_tier_unique_slug"),
            models.UniqueConstraint(
                fields=["tenant"], condition=Q(is_default=True), name="end_user_tier_one_default"
            ),
            models.CheckConstraint(
                condition=Q(warn_pct__lte=models.F("degrade_pct"))
                & Q(degrade_pct__lte=models.F("block_pct")),
                name="end_user_tier_thresholds_ordered",
            ),
        ]

    def __str__(self) -> str:
        return self.name


class EndUser(models.Model):
    """One of the tenant's own customers, keyed by the ``user`` field of requests."""

    tenant = models.ForeignKey(Tenant, on_delete=models.CASCADE, related_name="end_users")
    external_id = models.CharField(max_length=256)
    tier = models.ForeignKey(
        EndUserTier, on_delete=models.SET_NULL, null=True, blank=True, related_name="end_users"
    )
    # Privacy: this end user's requests are never audited (nor labelled from their texts).
    audit_excluded = models.BooleanField(default=False, db_default=False)
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
    requests_per_minute = models.PositiveIntegerField(null=True, blank=True)
    tokens_per_minute = models.PositiveIntegerField(null=True, blank=True)

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
    A tier budget is the default for each end user of the tier, counted per end
    user; an end user's own budget of the same period replaces it. Thresholds
    left empty come from the end user's tier, else 80 / 90 / 100 %.
    """

    tenant = models.ForeignKey(Tenant, on_delete=models.CASCADE, related_name="budgets")
    scope = models.CharField(max_length=16, choices=BudgetScope.choices)
    period = models.CharField(max_length=16, choices=BudgetPeriod.choices)
    limit_nanos = models.BigIntegerField()
    tier = models.ForeignKey(EndUserTier, on_delete=models.CASCADE, null=True, blank=True)
    end_user = models.ForeignKey(EndUser, on_delete=models.CASCADE, null=True, blank=True)
    token = models.ForeignKey(ApiToken, on_delete=models.CASCADE, null=True, blank=True)
    warn_pct = models.PositiveSmallIntegerField(null=True, blank=True)
    degrade_pct = models.PositiveSmallIntegerField(null=True, blank=True)
    block_pct = models.PositiveSmallIntegerField(null=True, blank=True)
    # The monthly budget that comes with the tenant's plan (kept in step by tenants.services).
    from_plan = models.BooleanField(default=False)
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


class BudgetCounter(models.Model):
    """Spent and reserved nano-dollars of one budget, one subject, one period.

    ``subject_id`` is the end user's id for tier budgets (each end user has its
    own counter), 0 otherwise. Invariant: ``spent_nanos`` is the sum of the
    settled costs of the ledger rows counted here; ``reserved_nanos`` the sum of
    the held reservations. Both are changed only by ``tenants.budgets`` under a
    row lock, in the same transaction as the reservation or ledger row.
    """

    tenant = models.ForeignKey(Tenant, on_delete=models.CASCADE, related_name="+")
    budget = models.ForeignKey(Budget, on_delete=models.CASCADE, related_name="counters")
    subject_id = models.BigIntegerField(default=0)
    period_start = models.DateTimeField()
    period_end = models.DateTimeField(null=True, blank=True)
    spent_nanos = models.BigIntegerField(default=0)
    reserved_nanos = models.BigIntegerField(default=0)

    class Meta:
        constraints = [
            models.UniqueConstraint(
                fields=["budget", "subject_id", "period_start"], name="budget_counter_unique"
            ),
            models.CheckConstraint(
                condition=Q(spent_nanos__gte=0), name="counter_spent_non_negative"
            ),
            models.CheckConstraint(
                condition=Q(reserved_nanos__gte=0), name="counter_reserved_non_negative"
            ),
        ]
        indexes = [models.Index(fields=["tenant", "period_start"], name="counter_tenant_period")]

    def __str__(self) -> str:
        return f"budget {self.budget_id} from {self.period_start:%Y-%m-%d}: {self.spent_nanos}n"


class BudgetReservation(models.Model):
    """The worst-case cost of one in-flight request, held on every budget it touches.

    Settled to the actual cost with the ledger row; reclaimed if it expires
    unsettled (a crashed worker). ``state`` changes exactly once, by a
    conditional UPDATE, so a late settlement and a reclaim never both release.
    """

    tenant = models.ForeignKey(Tenant, on_delete=models.CASCADE, related_name="+")
    request_id = models.CharField(max_length=64, unique=True)
    amount_nanos = models.BigIntegerField()
    counter_ids = models.JSONField(default=list)
    # held | settled | expired (reclaimed) | released (never held: the request was blocked)
    state = models.CharField(max_length=10, default="held")
    created_at = models.DateTimeField()
    expires_at = models.DateTimeField()

    class Meta:
        indexes = [models.Index(fields=["state", "expires_at"], name="reservation_expiry")]
        constraints = [
            models.CheckConstraint(
                condition=Q(amount_nanos__gte=0), name="reservation_non_negative"
            )
        ]

    def __str__(self) -> str:
        return f"{self.request_id} {self.amount_nanos}n {self.state}"


class AlertDelivery(models.Model):
    """An alert's delivery to the tenant's owners and admins (email) and webhook.

    Delivery is an outbox (``core.outbox``, ``tenants.alerts``): each
    channel's timestamp (``emailed_at``, ``webhook_at``) is set once it went out,
    and ``delivered_at`` once every channel did. A delivery run holds a short lease
    (``delivering_until``) so two runs never send the same alert at once; the
    sweeper sends undelivered alerts again (``attempts``, ``next_attempt_at``,
    ``last_error``). Concrete alerts add a non-null ``tenant`` FK.
    """

    created_at = models.DateTimeField(auto_now_add=True)
    emailed_at = models.DateTimeField(null=True, blank=True)
    webhook_at = models.DateTimeField(null=True, blank=True)
    delivered_at = models.DateTimeField(null=True, blank=True)
    delivering_until = models.DateTimeField(null=True, blank=True)
    attempts = models.PositiveIntegerField(default=0)  # sends by the sweeper
    next_attempt_at = models.DateTimeField(null=True, blank=True)
    last_error = models.CharField(max_length=300, blank=True)

    class Meta:
        abstract = True


class BudgetAlert(AlertDelivery):
    """A budget crossing a threshold; unique per budget, subject, period and level.

    Delivered as every alert is (``AlertDelivery``).
    """

    tenant = models.ForeignKey(Tenant, on_delete=models.CASCADE, related_name="budget_alerts")
    budget = models.ForeignKey(Budget, on_delete=models.CASCADE, related_name="alerts")
    subject_id = models.BigIntegerField(default=0)
    period_start = models.DateTimeField()
    level = models.CharField(max_length=10)  # warn | degrade | block | forecast
    spent_nanos = models.BigIntegerField()
    limit_nanos = models.BigIntegerField()

    class Meta:
        constraints = [
            models.UniqueConstraint(
                fields=["budget", "subject_id", "period_start", "level"], name="budget_alert_once"
            )
        ]
        indexes = [
            models.Index(fields=["tenant", "-created_at"], name="alert_tenant_created"),
            models.Index(
                fields=["created_at"],
                name="alert_undelivered",
                condition=models.Q(delivered_at__isnull=True),
            ),
        ]

    def __str__(self) -> str:
        return f"budget {self.budget_id} {self.level} at {self.created_at:%Y-%m-%d %H:%M}"
