"""The ledger: one ``UsageEvent`` per request to the OpenAI-compatible API."""

from django.db import models
from django.db.models import Q

from routing.enums import UsageStatus
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
