"""Rollups of the ledger and stored forecasts: what the dashboard reads instead of raw events.

Two grains, chosen so neither grows with the number of raw events:

- :class:`HourlyUsage` — tenant x UTC hour x served model x draft model x profile x
  domain. End users are left out on purpose: a tenant with thousands of end users
  would otherwise get nearly one row per request, and the overview and model pages
  need none of them.
- :class:`DailyUsage` — tenant x tenant-local day x end user x served model x profile,
  for the end-user pages and per-end-user forecasts.

And two grains without dimensions, for the overview: :class:`HourlyTotal` — tenant x
UTC hour, written with the hourly rows; :class:`MinuteUsage` — tenant x UTC minute,
for the last hours only, rolled every minute, so the overview's live charts (the open
hour, requests per minute) read a few minutes of raw events however busy the tenant is.

Rows are rebuilt from the ledger for whole buckets (delete + insert in one
transaction), so running a rollup twice, or over a range already rolled, gives the
same rows. :class:`RollupState` remembers how far each tenant is rolled; pages merge
the rollups with the raw events after that point.
"""

from django.db import models

from tenants.models import Tenant

# Upper bounds (ms) of the latency histogram kept per hourly row; the last bucket is open.
LATENCY_BOUNDS_MS = (
    50, 100, 200, 300, 500, 750, 1_000, 1_500, 2_000, 3_000, 5_000, 7_500,
    10_000, 15_000, 20_000, 30_000, 60_000,
)  # fmt: skip


class HourlyUsage(models.Model):
    tenant = models.ForeignKey(Tenant, on_delete=models.CASCADE, related_name="+")
    hour = models.DateTimeField()  # start of the UTC hour
    model = models.CharField(max_length=200, blank=True)  # the model whose answer was returned
    draft_model = models.CharField(max_length=200, blank=True)  # the first model called
    profile = models.CharField(max_length=120, blank=True)
    domain = models.CharField(max_length=32, blank=True)
    requests = models.PositiveIntegerField(default=0)
    errors = models.PositiveIntegerField(default=0)  # any status other than ok
    escalated = models.PositiveIntegerField(default=0)
    cost_nanos = models.BigIntegerField(default=0)
    baseline_cost_nanos = models.BigIntegerField(default=0)
    prompt_tokens = models.BigIntegerField(default=0)
    completion_tokens = models.BigIntegerField(default=0)
    latency_ms_sum = models.BigIntegerField(default=0)
    latency_hist = models.JSONField(default=list)  # counts per LATENCY_BOUNDS_MS bucket (+1 open)
    # The quality check's calibrated probability that the returned answer is acceptable,
    # summed over the requests that have one (quality_n): "is quality holding?"
    quality_sum = models.FloatField(default=0.0)
    quality_n = models.PositiveIntegerField(default=0)

    class Meta:
        constraints = [
            models.UniqueConstraint(
                fields=["tenant", "hour", "model", "draft_model", "profile", "domain"],
                name="hourly_usage_unique_bucket",
            )
        ]
        indexes = [models.Index(fields=["tenant", "hour"], name="hourly_usage_tenant_hour")]

    def __str__(self) -> str:
        return f"{self.tenant_id} {self.hour:%Y-%m-%d %H:00} {self.model}"


class DailyUsage(models.Model):
    tenant = models.ForeignKey(Tenant, on_delete=models.CASCADE, related_name="+")
    day = models.DateField()  # calendar day in the tenant's time zone
    end_user_id = models.BigIntegerField(default=0)  # 0: requests without an end user
    model = models.CharField(max_length=200, blank=True)
    profile = models.CharField(max_length=120, blank=True)
    requests = models.PositiveIntegerField(default=0)
    errors = models.PositiveIntegerField(default=0)
    escalated = models.PositiveIntegerField(default=0)
    cost_nanos = models.BigIntegerField(default=0)
    baseline_cost_nanos = models.BigIntegerField(default=0)

    class Meta:
        constraints = [
            models.UniqueConstraint(
                fields=["tenant", "day", "end_user_id", "model", "profile"],
                name="daily_usage_unique_bucket",
            )
        ]
        indexes = [
            models.Index(fields=["tenant", "day"], name="daily_usage_tenant_day"),
            models.Index(fields=["tenant", "end_user_id", "day"], name="daily_usage_end_user"),
        ]

    def __str__(self) -> str:
        return f"{self.tenant_id} {self.day} end user {self.end_user_id} {self.model}"


class UsageTotals(models.Model):
    """The sums, over every model, profile and domain, that the overview charts."""

    requests = models.PositiveIntegerField(default=0)
    errors = models.PositiveIntegerField(default=0)
    escalated = models.PositiveIntegerField(default=0)
    cost_nanos = models.BigIntegerField(default=0)
    baseline_cost_nanos = models.BigIntegerField(default=0)
    quality_sum = models.FloatField(default=0.0)
    quality_n = models.PositiveIntegerField(default=0)

    TOTALS = (
        "requests",
        "errors",
        "escalated",
        "cost_nanos",
        "baseline_cost_nanos",
        "quality_sum",
        "quality_n",
    )

    class Meta:
        abstract = True

    def add(self, row) -> None:
        """Add another row's totals (a finer rollup's, or another total's) to this one's."""
        for name in self.TOTALS:
            setattr(self, name, getattr(self, name) + getattr(row, name))


class HourlyTotal(UsageTotals):
    """A tenant's usage in one UTC hour: the sum of its HourlyUsage rows, one row an hour
    (the overview reads a month of these, not a month of model x profile x domain rows)."""

    tenant = models.ForeignKey(Tenant, on_delete=models.CASCADE, related_name="+")
    hour = models.DateTimeField()  # start of the UTC hour

    class Meta:
        constraints = [
            models.UniqueConstraint(fields=["tenant", "hour"], name="hourly_total_unique_bucket")
        ]

    def __str__(self) -> str:
        return f"{self.tenant_id} {self.hour:%Y-%m-%d %H:00}"


class MinuteUsage(UsageTotals):
    """A tenant's usage in one UTC minute of the last ``rollups.MINUTES_KEPT``."""

    tenant = models.ForeignKey(Tenant, on_delete=models.CASCADE, related_name="+")
    minute = models.DateTimeField()  # start of the UTC minute

    class Meta:
        constraints = [
            models.UniqueConstraint(fields=["tenant", "minute"], name="minute_usage_unique_bucket")
        ]

    def __str__(self) -> str:
        return f"{self.tenant_id} {self.minute:%Y-%m-%d %H:%M}"


class RollupState(models.Model):
    """How far a tenant's ledger is rolled up: events before ``hourly_until`` are in
    HourlyUsage, local days before ``daily_until`` are in DailyUsage, and the minutes of
    the ``rollups.MINUTES_KEPT`` before ``minutely_until`` are in MinuteUsage."""

    tenant = models.OneToOneField(Tenant, on_delete=models.CASCADE, related_name="+")
    hourly_until = models.DateTimeField()
    daily_until = models.DateField()
    minutely_until = models.DateTimeField(null=True, blank=True)
    updated_at = models.DateTimeField(auto_now=True)

    def __str__(self) -> str:
        return f"{self.tenant_id} rolled until {self.hourly_until:%Y-%m-%d %H:00}"


class SpendForecastSnapshot(models.Model):
    """The latest forecast of a tenant's (end_user_id 0) or an end user's period spend."""

    tenant = models.ForeignKey(Tenant, on_delete=models.CASCADE, related_name="+")
    end_user_id = models.BigIntegerField(default=0)
    period_start = models.DateTimeField()
    period_end = models.DateTimeField()
    computed_at = models.DateTimeField()
    method = models.CharField(max_length=24)
    spent_nanos = models.BigIntegerField()
    expected_nanos = models.BigIntegerField()
    low_nanos = models.BigIntegerField()
    high_nanos = models.BigIntegerField()
    limit_nanos = models.BigIntegerField(null=True, blank=True)
    runs_out_on = models.DateField(null=True, blank=True)
    exceed_probability = models.FloatField(null=True, blank=True)
    days = models.JSONField(
        default=list
    )  # [{"day", "mean", "low", "high"}] for the rest of the period

    class Meta:
        constraints = [
            models.UniqueConstraint(
                fields=["tenant", "end_user_id"], name="forecast_snapshot_unique_subject"
            )
        ]

    def __str__(self) -> str:
        return f"{self.tenant_id}/{self.end_user_id}: {self.expected_nanos} expected"
