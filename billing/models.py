"""Stripe: every webhook event once, and each tenant's subscription as Stripe last described it."""

from django.db import models

from tenants.models import Tenant, Tier


class StripeEvent(models.Model):
    """A verified webhook event, stored once (unique ``event_id``), applied by a task.

    The row is the durable record: Stripe was answered 200 once it was stored,
    so an event whose task never ran (the broker was down) or failed is sent
    again by the outbox sweeper (``attempts``, ``next_attempt_at``,
    ``last_error``; see ``core.outbox``) until ``processed_at``.
    """

    event_id = models.CharField(max_length=255, unique=True)
    type = models.CharField(max_length=100)
    created = models.BigIntegerField()  # Stripe's own timestamp of the event
    payload = models.JSONField()
    received_at = models.DateTimeField(auto_now_add=True)
    processed_at = models.DateTimeField(null=True, blank=True)
    outcome = models.CharField(max_length=200, blank=True)
    attempts = models.PositiveIntegerField(default=0)  # sends by the sweeper
    next_attempt_at = models.DateTimeField(null=True, blank=True)
    last_error = models.CharField(max_length=300, blank=True)

    class Meta:
        indexes = [
            models.Index(fields=["type", "-created"], name="stripe_event_type"),
            models.Index(
                fields=["received_at"],
                name="stripe_event_pending",
                condition=models.Q(processed_at__isnull=True),
            ),
        ]

    def __str__(self) -> str:
        return f"{self.event_id} {self.type}"


class TenantSubscription(models.Model):
    """The tenant's Stripe customer and subscription, and the plan it pays for.

    ``state_at`` is the Stripe timestamp of the event that last changed this
    row: an event older than it never rolls the subscription back, whatever
    order deliveries arrive in. ``Tenant.tier`` is the plan *in force*: the
    paid tier, or the default (free) tier after cancellation or once a
    payment-failure grace period has run out.
    """

    tenant = models.OneToOneField(Tenant, on_delete=models.CASCADE, related_name="subscription")
    stripe_customer_id = models.CharField(max_length=255, unique=True)
    stripe_subscription_id = models.CharField(max_length=255, blank=True)
    status = models.CharField(max_length=32, blank=True)  # Stripe's subscription status
    paid_tier = models.ForeignKey(Tier, on_delete=models.SET_NULL, null=True, blank=True)
    current_period_end = models.DateTimeField(null=True, blank=True)
    cancel_at_period_end = models.BooleanField(default=False)
    grace_until = models.DateTimeField(null=True, blank=True)
    state_at = models.BigIntegerField(default=0)
    updated_at = models.DateTimeField(auto_now=True)

    def __str__(self) -> str:
        return f"{self.tenant} {self.status}"


class UsageReport(models.Model):
    """One hour of a tenant's usage, reported to Stripe as a billing meter event.

    Money invariant: Stripe is billed in whole cents, the ledger holds
    nano-dollars. ``cents`` is what this window adds to the cumulative whole
    cents of the tenant's ledger, so rounding never loses or double-counts a
    fraction across windows. ``identifier`` is Stripe's deduplication key:
    a retry re-sends the same identifier and Stripe bills it once.
    """

    tenant = models.ForeignKey(Tenant, on_delete=models.CASCADE, related_name="usage_reports")
    window_start = models.DateTimeField()
    window_end = models.DateTimeField()
    cost_nanos = models.BigIntegerField()
    cumulative_nanos = models.BigIntegerField()
    cents = models.BigIntegerField()
    identifier = models.CharField(max_length=120, unique=True)
    reported_at = models.DateTimeField(null=True, blank=True)
    error = models.CharField(max_length=300, blank=True)

    class Meta:
        constraints = [
            models.UniqueConstraint(fields=["tenant", "window_start"], name="usage_report_once"),
            models.CheckConstraint(
                condition=models.Q(cents__gte=0), name="usage_report_cents_non_negative"
            ),
        ]

    def __str__(self) -> str:
        return f"{self.tenant} {self.window_start:%Y-%m-%d %H:00} {self.cents}c"


class ExportJob(models.Model):
    """A large CSV export built by a Celery task; downloaded through an expiring signed link.

    A job leaves ``queued`` only by one task claiming it (a conditional update
    to ``running``), so a job sent twice is built once. The outbox sweeper
    sends a job still ``queued`` again (``attempts``, ``next_attempt_at``),
    fails it once it has used its attempts, and fails a ``running`` job that
    outlived the task's time limit (its worker died): every job ends ``done``
    or ``failed``, and ``error`` says why in one line.
    """

    tenant = models.ForeignKey(Tenant, on_delete=models.CASCADE, related_name="export_jobs")
    start = models.DateTimeField()
    end = models.DateTimeField()
    focus = models.BooleanField(default=False)
    status = models.CharField(max_length=10, default="queued")  # queued | running | done | failed
    total_rows = models.BigIntegerField(default=0)
    rows_written = models.BigIntegerField(default=0)
    file_path = models.CharField(max_length=500, blank=True)
    error = models.CharField(max_length=300, blank=True)
    created_at = models.DateTimeField(auto_now_add=True)
    started_at = models.DateTimeField(null=True, blank=True)
    finished_at = models.DateTimeField(null=True, blank=True)
    attempts = models.PositiveIntegerField(default=0)  # sends by the sweeper
    next_attempt_at = models.DateTimeField(null=True, blank=True)

    class Meta:
        indexes = [
            models.Index(fields=["tenant", "-created_at"], name="export_tenant_created"),
            models.Index(
                fields=["created_at"],
                name="export_job_unfinished",
                condition=models.Q(status__in=["queued", "running"]),
            ),
        ]

    def __str__(self) -> str:
        return f"export {self.pk} {self.status} {self.rows_written}/{self.total_rows}"
