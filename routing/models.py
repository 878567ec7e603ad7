"""The ledger: one ``UsageEvent`` per request to the OpenAI-compatible API."""

from django.db import models
from django.db.models import Q

from routing.enums import Preset, UsageStatus
from tenants.models import ApiToken, EndUser, Tenant


class UsageEvent(models.Model):
    """What one request cost, and why.

    Money invariant: ``cost_nanos`` and ``baseline_cost_nanos`` are integer
    nano-dollars (1 USD = 10**9) and never negative. ``cost_nanos`` is the sum
    of every attempt's cost in ``attempts`` (failed attempts cost what the
    provider billed for them: nothing, unless it returned usage).
    """

    tenant = models.ForeignKey(Tenant, on_delete=models.CASCADE, related_name="usage_events")
    token = models.ForeignKey(ApiToken, on_delete=models.SET_NULL, null=True, blank=True)
    end_user = models.ForeignKey(EndUser, on_delete=models.SET_NULL, null=True, blank=True)
    request_id = models.CharField(max_length=64, unique=True)
    created_at = models.DateTimeField(db_index=False)
    requested_model = models.CharField(max_length=200)
    model = models.CharField(max_length=200, blank=True)  # the model whose answer was returned
    models_called = models.JSONField(default=list)  # public model names, in call order
    attempts = models.JSONField(default=list)  # one dict per upstream call
    prompt_tokens = models.PositiveIntegerField(default=0)
    completion_tokens = models.PositiveIntegerField(default=0)
    cost_nanos = models.BigIntegerField(default=0)
    baseline_cost_nanos = models.BigIntegerField(default=0)
    escalated = models.BooleanField(default=False)
    stream = models.BooleanField(default=False)
    latency_ms = models.PositiveIntegerField(default=0)
    status = models.CharField(max_length=24, choices=UsageStatus.choices)
    http_status = models.PositiveSmallIntegerField(default=200)
    error_code = models.CharField(max_length=64, blank=True)
    # The cascade's decision, explained: attempts[*].check holds every signal and weight.
    profile = models.CharField(max_length=120, blank=True)
    domain = models.CharField(max_length=32, blank=True)
    complexity = models.FloatField(null=True, blank=True)
    quality_score = models.FloatField(null=True, blank=True)
    baseline_method = models.CharField(max_length=16, blank=True)  # actual | estimated | none
    degraded = models.BooleanField(default=False)
    # allow | warn | degrade | block: what the budgets decided for this request.
    budget_status = models.CharField(max_length=10, blank=True)

    class Meta:
        indexes = [
            models.Index(fields=["tenant", "created_at"], name="usage_tenant_time"),
            models.Index(
                fields=["tenant", "end_user", "created_at"], name="usage_tenant_user_time"
            ),
        ]
        constraints = [
            models.CheckConstraint(condition=Q(cost_nanos__gte=0), name="usage_cost_non_negative"),
            models.CheckConstraint(
                condition=Q(baseline_cost_nanos__gte=0), name="usage_baseline_non_negative"
            ),
        ]

    def __str__(self) -> str:
        return f"{self.request_id} {self.model} {self.cost_nanos}n"


class RoutingProfile(models.Model):
    """A tenant's cascade: its chain, preset, thresholds and domain routes.

    Requested as ``cascade/<name>``. A profile named like a built-in preset
    (``balanced``…) replaces that built-in for this tenant.

    ``domain_routes``: ``{"code": {"chain": [...], "threshold_offset": 0.05}}``.
    ``calibration``: what ``manage.py calibrate_profile`` learned (engine JSON).
    """

    tenant = models.ForeignKey(Tenant, on_delete=models.CASCADE, related_name="routing_profiles")
    name = models.SlugField(max_length=64)
    preset = models.CharField(max_length=20, choices=Preset.choices, default=Preset.BALANCED)
    chain = models.JSONField(default=list, help_text="Model names, cheapest first.")
    threshold_offset = models.FloatField(default=0.0)
    domain_routes = models.JSONField(default=dict, blank=True)
    calibration = models.JSONField(default=dict, blank=True)
    created_at = models.DateTimeField(auto_now_add=True)
    updated_at = models.DateTimeField(auto_now=True)

    class Meta:
        constraints = [
            models.UniqueConstraint(fields=["tenant", "name"], name="profile_unique_per_tenant"),
            models.CheckConstraint(
                condition=Q(threshold_offset__gte=-0.5) & Q(threshold_offset__lte=0.5),
                name="profile_offset_in_range",
            ),
        ]

    def __str__(self) -> str:
        return f"cascade/{self.name}"
