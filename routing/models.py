"""The ledger (one ``UsageEvent`` per request or audit), routing profiles, and what the
profiles learn from audits: ``Audit``, ``ProfileLearning``, ``CalibrationVersion``,
``QualityAlert``."""

from datetime import UTC, datetime, timedelta

from django.db import models
from django.db.models import Q
from django.db.models.functions import MD5, Cast
from django.utils import timezone

from routing.enums import (
    AuditKind,
    AuditSkip,
    AuditStatus,
    ModelMode,
    Preset,
    QualityAlertKind,
    UsageKind,
    UsageStatus,
)
from routing.ledger_attempts import attempts_read
from tenants.enums import BudgetDecision
from tenants.models import AlertDelivery, ApiToken, EndUser, Tenant


class UsageEvent(models.Model):
    """What one request (or one audit of a request) cost, and why.

    Money invariant: ``cost_nanos`` and ``baseline_cost_nanos`` are integer
    nano-dollars (1 USD = 10**9) and never negative. ``cost_nanos`` is the sum
    of every attempt's cost in ``attempts`` (failed attempts cost what the
    provider billed for them: nothing, unless it returned usage).

    ``kind`` is ``audit`` for the row of an audit's model and judge calls
    (``request_id`` ``audit_<id>``, no baseline, no token or end user): spend
    like any other, but not a request, and what every "saved" figure is net of.
    """

    # No index of its own: every index of the ledger starts with the tenant.
    tenant = models.ForeignKey(
        Tenant, on_delete=models.CASCADE, related_name="usage_events", db_index=False
    )
    token = models.ForeignKey(ApiToken, on_delete=models.SET_NULL, null=True, blank=True)
    end_user = models.ForeignKey(EndUser, on_delete=models.SET_NULL, null=True, blank=True)
    # Unique with ``created_at`` (a partitioned table's unique keys hold its partition key),
    # through its hash (``usage_request_once``); every write of a request's row carries the
    # time it was received, so a replay of the same row conflicts
    # (``routing.services.ledger_write``).
    request_id = models.CharField(max_length=64)
    created_at = models.DateTimeField(db_index=False)
    requested_model = models.CharField(max_length=200)
    model = models.CharField(max_length=200, blank=True)  # the model whose answer was returned
    models_called = models.JSONField(default=list)  # public model names, in call order
    # One dict per upstream call, stored compactly: read it through ``expanded_attempts``.
    attempts = models.JSONField(default=list)
    prompt_tokens = models.PositiveIntegerField(default=0)
    completion_tokens = models.PositiveIntegerField(default=0)
    cost_nanos = models.BigIntegerField(default=0)
    # The part of cost_nanos paid with the tenant's own provider keys (not the platform's).
    byok_cost_nanos = models.BigIntegerField(default=0, db_default=0)
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
    # What the budgets decided for this request; blank when no budget applied.
    budget_status = models.CharField(max_length=10, blank=True, choices=BudgetDecision.choices)
    kind = models.CharField(
        max_length=8, choices=UsageKind.choices, default=UsageKind.REQUEST, db_default="request"
    )

    class Meta:
        # On PostgreSQL the table is partitioned by month of ``created_at``
        # (``routing.partitions``); every index here exists on every partition.
        indexes = [
            models.Index(fields=["tenant", "created_at"], name="usage_tenant_time"),
            # The usage API's pages (newest first by id, routing.api.UsageCursor).
            models.Index(fields=["tenant", "id"], name="usage_tenant_id"),
            models.Index(
                fields=["tenant", "end_user", "created_at"], name="usage_tenant_user_time"
            ),
            # The monthly audit cap and "saved, net of audits" sum these rows only.
            models.Index(
                fields=["tenant", "created_at"],
                name="usage_tenant_audit_time",
                condition=Q(kind="audit"),
            ),
        ]
        constraints = [
            # On the request id's MD5 as a uuid (16 bytes) rather than on its text (37): the
            # ledger's largest index halves. Ids are made by the server (``req_`` + a uuid4),
            # never chosen by a client, so no one can aim two ids at one hash.
            models.UniqueConstraint(
                Cast(MD5("request_id"), models.UUIDField()),
                "created_at",
                name="usage_request_once",
            ),
            models.CheckConstraint(condition=Q(cost_nanos__gte=0), name="usage_cost_non_negative"),
            models.CheckConstraint(
                condition=Q(baseline_cost_nanos__gte=0), name="usage_baseline_non_negative"
            ),
        ]

    def __str__(self) -> str:
        return f"{self.request_id} {self.model} {self.cost_nanos}n"

    @property
    def expanded_attempts(self) -> list[dict]:
        """``attempts`` in ``Attempt.as_dict()``'s shape, whichever shape the row stores
        (``routing.ledger_attempts``): what every reader of the attempts uses."""
        return attempts_read(self.attempts, domain=self.domain, complexity=self.complexity)


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
    # Learning from audits (routing.audits). Off: the uploaded ``calibration`` (or the
    # preset's defaults) decides, as it did before. The floor is the share of requests
    # audited once the first labels are in; judge and reference default to the chain's
    # last model (judge "none": no judge, a disagreement counts as worse).
    audits_enabled = models.BooleanField(default=True, db_default=True)
    audit_rate_floor = models.FloatField(default=0.03, db_default=0.03)
    judge_model = models.CharField(max_length=200, blank=True, default="", db_default="")
    reference_model = models.CharField(max_length=200, blank=True, default="", db_default="")
    created_at = models.DateTimeField(auto_now_add=True)
    updated_at = models.DateTimeField(auto_now=True)

    class Meta:
        constraints = [
            models.UniqueConstraint(fields=["tenant", "name"], name="profile_unique_per_tenant"),
            models.CheckConstraint(
                condition=Q(threshold_offset__gte=-0.5) & Q(threshold_offset__lte=0.5),
                name="profile_offset_in_range",
            ),
            models.CheckConstraint(
                condition=Q(audit_rate_floor__gte=0) & Q(audit_rate_floor__lte=1),
                name="profile_audit_floor_in_range",
            ),
        ]

    def __str__(self) -> str:
        return f"cascade/{self.name}"


class CalibrationVersion(models.Model):
    """One refit of a profile's calibration (``routing.engine.learning.refit``).

    ``profile`` is the name requests use (``cascade/<name>``: a preset or a tenant
    profile), ``chain`` the model names it was fitted for: a version whose chain is
    no longer the profile's never serves. ``calibration`` is the engine's JSON
    (``Calibration.to_json``), ``evidence`` what the refit found (the test, its
    bound, the held-out scores drift is measured against). Invariant: at most one
    version per (tenant, profile) is active, and only a certified one; it is the one
    ``ProfileLearning.active_version`` names. Versions are never edited.
    """

    tenant = models.ForeignKey(Tenant, on_delete=models.CASCADE, related_name="+")
    profile = models.CharField(max_length=120)
    version = models.PositiveIntegerField()
    chain = models.JSONField(default=list)
    calibration = models.JSONField(default=dict)
    evidence = models.JSONField(default=dict)
    uniform_labels = models.PositiveIntegerField(default=0)
    nonuniform_labels = models.PositiveIntegerField(default=0)
    certified = models.BooleanField(default=False)
    active = models.BooleanField(default=False)
    created_at = models.DateTimeField(default=timezone.now)
    promoted_at = models.DateTimeField(null=True, blank=True)  # latest activation

    class Meta:
        constraints = [
            models.UniqueConstraint(
                fields=["tenant", "profile", "version"], name="calibration_version_unique"
            ),
            models.UniqueConstraint(
                fields=["tenant", "profile"],
                condition=Q(active=True),
                name="calibration_one_active",
            ),
            models.CheckConstraint(
                condition=Q(active=False) | Q(certified=True),
                name="calibration_active_is_certified",
            ),
        ]

    def __str__(self) -> str:
        return f"{self.profile} v{self.version}"


class ProfileLearning(models.Model):
    """What one (tenant, profile) has learned so far, read with the profile on every request.

    Label counts are those of the profile's current chain as audits completed;
    ``labels_since_refit`` counts uniform labels since the last refit (which
    decides when the next one runs). ``refitting_until`` is the lease of a refit
    in progress, so two never run at once.
    """

    tenant = models.ForeignKey(Tenant, on_delete=models.CASCADE, related_name="+")
    profile = models.CharField(max_length=120)
    uniform_labels = models.PositiveIntegerField(default=0)
    nonuniform_labels = models.PositiveIntegerField(default=0)
    # Requests whose drafts' checks were kept for the router, with no label (served drafts,
    # and escalated ones with nothing to compare): sampled like non-uniform labels.
    router_rows = models.PositiveIntegerField(default=0)
    labels_since_refit = models.PositiveIntegerField(default=0)
    labels_at_refit = models.PositiveIntegerField(default=0)
    # The chain the counts are of: a label of another chain completed later starts them over.
    chain_key = models.CharField(max_length=16, blank=True)
    chain_since = models.DateTimeField(null=True, blank=True)
    last_refit_at = models.DateTimeField(null=True, blank=True)
    refitting_until = models.DateTimeField(null=True, blank=True)
    active_version = models.ForeignKey(
        CalibrationVersion, on_delete=models.SET_NULL, null=True, blank=True, related_name="+"
    )
    updated_at = models.DateTimeField(auto_now=True)

    class Meta:
        constraints = [
            models.UniqueConstraint(fields=["tenant", "profile"], name="learning_unique_profile")
        ]

    def __str__(self) -> str:
        return f"{self.profile}: {self.uniform_labels} labels"


class Audit(models.Model):
    """One request answered again by its chain, each draft labelled against the reference.

    A row is written when a cascade request is sampled (``uniform``, ``kind`` audit: a
    uniform coin, what measured quality and certification rest on), or, not uniform and
    only ever used to train: for a request that escalated to the reference anyway,
    labelled on the spot by agreement alone (``kind`` agreement); for a request whose
    draft was served, or that escalated with nothing to compare, its drafts' checks
    with no label, for the router (``kind`` router). At most one per request.

    Privacy: ``payload`` holds the request's messages, parameters and the answers
    already produced while the audit is pending; it is emptied in every final
    state. ``observation`` (``learning.observation_to_json``) holds no text.

    Outbox (``core.outbox``): the row is the durable record of the
    work; ``attempts`` / ``next_attempt_at`` are the sweeper's sends, ``runs``
    the task's starts, ``running_until`` the lease of the run that holds it.
    """

    tenant = models.ForeignKey(Tenant, on_delete=models.CASCADE, related_name="+")
    request_id = models.CharField(max_length=64)  # the audited ledger row's
    profile = models.CharField(max_length=120)
    created_at = models.DateTimeField(default=timezone.now)
    kind = models.CharField(max_length=10, choices=AuditKind.choices, default=AuditKind.AUDIT)
    status = models.CharField(
        max_length=10, choices=AuditStatus.choices, default=AuditStatus.PENDING
    )
    skip_reason = models.CharField(max_length=20, choices=AuditSkip.choices, blank=True)
    chain = models.JSONField(default=list)
    chain_key = models.CharField(max_length=16)  # routing.audits.chain_key(chain)
    reference_model = models.CharField(max_length=200)
    judge_model = models.CharField(max_length=200, blank=True)
    calibration_version = models.ForeignKey(
        CalibrationVersion, on_delete=models.SET_NULL, null=True, blank=True, related_name="+"
    )
    payload = models.JSONField(default=dict, blank=True)
    observation = models.JSONField(null=True, blank=True)
    domain = models.CharField(max_length=32, blank=True)
    served_model = models.CharField(max_length=200, blank=True)
    served_verdict = models.SmallIntegerField(null=True, blank=True)  # learning.Verdict
    served_loss = models.FloatField(null=True, blank=True)  # +1 worse, -1 better, 0
    cost_nanos = models.BigIntegerField(default=0)  # mirrors its ledger row
    runs = models.PositiveSmallIntegerField(default=0)
    running_until = models.DateTimeField(null=True, blank=True)
    attempts = models.PositiveIntegerField(default=0)
    next_attempt_at = models.DateTimeField(null=True, blank=True)
    last_error = models.CharField(max_length=300, blank=True)
    finished_at = models.DateTimeField(null=True, blank=True)

    class Meta:
        constraints = [
            models.UniqueConstraint(fields=["tenant", "request_id"], name="audit_once_per_request"),
            models.CheckConstraint(condition=Q(cost_nanos__gte=0), name="audit_cost_non_negative"),
        ]
        indexes = [
            models.Index(fields=["tenant", "profile", "created_at"], name="audit_tenant_profile"),
            models.Index(fields=["tenant", "-id"], name="audit_tenant_recent"),
            models.Index(
                fields=["created_at"],
                name="audit_unfinished",
                condition=Q(status__in=["pending", "running"]),
            ),
        ]

    def __str__(self) -> str:
        return f"audit {self.pk} of {self.request_id} ({self.status})"

    @property
    def uniform(self) -> bool:
        """Drawn by the uniform sample: a label that certifies and measures, not only trains."""
        return self.kind == AuditKind.AUDIT


class QualityAlert(AlertDelivery):
    """A learned calibration that no longer holds: at most one per version and kind.

    ``retention``: the retention measured on uniform audits since the version was
    promoted has an upper bound below the target. ``drift``: the drafts' scores or
    the share of accepted drafts moved away from what the version was certified on.
    Delivered like budget alerts (``AlertDelivery``, ``tenants.alerts``).
    """

    tenant = models.ForeignKey(Tenant, on_delete=models.CASCADE, related_name="quality_alerts")
    profile = models.CharField(max_length=120)
    version = models.ForeignKey(CalibrationVersion, on_delete=models.CASCADE, related_name="+")
    kind = models.CharField(max_length=10, choices=QualityAlertKind.choices)
    details = models.JSONField(default=dict)

    class Meta:
        constraints = [
            models.UniqueConstraint(fields=["version", "kind"], name="quality_alert_once")
        ]
        indexes = [
            models.Index(fields=["tenant", "-created_at"], name="quality_alert_tenant"),
            models.Index(
                fields=["created_at"],
                name="quality_alert_undelivered",
                condition=Q(delivered_at__isnull=True),
            ),
        ]

    def __str__(self) -> str:
        return f"{self.profile} v{self.version_id} {self.kind}"


class TenantProviderModel(models.Model):
    """A model the tenant calls with its own provider credentials (bring your own key).

    Requested by its ``name`` like a catalog model, and usable in the tenant's profiles
    and allow-lists; only this tenant's requests ever use it. ``credentials_encrypted`` is
    a Fernet token (``core.crypto``) of a JSON object of LiteLLM parameters
    (``api_key``, or ``aws_*`` / ``vertex_*`` for Bedrock and Vertex); it is write-only:
    the API shows ``credentials_mask`` alone.
    """

    tenant = models.ForeignKey(Tenant, on_delete=models.CASCADE, related_name="provider_models")
    name = models.CharField(max_length=100)
    litellm_model = models.CharField(max_length=200)
    api_base = models.URLField(blank=True)
    api_version = models.CharField(max_length=40, blank=True)
    credentials_encrypted = models.TextField()
    credentials_mask = models.JSONField(default=dict)
    input_usd_per_mtok = models.DecimalField(max_digits=12, decimal_places=6)
    output_usd_per_mtok = models.DecimalField(max_digits=12, decimal_places=6)
    # What it serves: chats (and cascades), or /v1/embeddings.
    mode = models.CharField(
        max_length=16, choices=ModelMode.choices, default=ModelMode.CHAT, db_default="chat"
    )
    validated_at = models.DateTimeField()
    created_at = models.DateTimeField(auto_now_add=True)

    class Meta:
        constraints = [
            models.UniqueConstraint(fields=["tenant", "name"], name="uniq_provider_model_name")
        ]

    def __str__(self) -> str:
        return f"{self.name} ({self.litellm_model})"


# How long after an hour ends its rollup waits for the ledger rows of requests that
# started in it (a row carries the time its request started, and is written when it
# ends). A row later than that is written with a ``LateLedgerHour``.
ROLLUP_LATE_MARGIN = timedelta(minutes=5)
# Rows written this close before a rollup could run are marked too: a rollup that starts
# while the row's statement is committing does not see it.
_LATE_SLACK = timedelta(minutes=1)


def late_hour(created_at: datetime, now: datetime) -> datetime | None:
    """The hour (UTC) of a ledger row written at ``now``, if a rollup may already have
    rolled that hour up (``dashboard.rollups``); None for a row in time."""
    hour = created_at.astimezone(UTC).replace(minute=0, second=0, microsecond=0)
    closed = (now - ROLLUP_LATE_MARGIN + _LATE_SLACK).astimezone(UTC)
    return hour if hour < closed.replace(minute=0, second=0, microsecond=0) else None


class LateLedgerHour(models.Model):
    """An hour of a tenant's ledger that received rows after its rollup may have run
    (a request longer than ``ROLLUP_LATE_MARGIN``, a spooled row replayed after an
    outage): the next rollup rebuilds that hour, and its local day, from the ledger.
    Written in the ledger row's transaction (``routing.services.ledger_write``), deleted
    by the rollup that rebuilds it; rare, so the rollups need not reread hours they
    have already rolled."""

    tenant = models.ForeignKey(Tenant, on_delete=models.CASCADE, related_name="+")
    hour = models.DateTimeField()

    class Meta:
        constraints = [
            models.UniqueConstraint(fields=["tenant", "hour"], name="late_ledger_hour_once")
        ]

    def __str__(self) -> str:
        return f"{self.tenant_id} {self.hour:%Y-%m-%d %H:00}"


class LedgerArchive(models.Model):
    """One tenant's ledger rows of one month, moved out of the database by retention.

    The file (``path``, under ``CASCADEFLOW_LEDGER_ARCHIVE_DIR``) is gzip-compressed CSV
    of every column, with a header, as ``COPY`` writes it (``COPY ... FROM`` reads it
    back); ``sha256`` is of the compressed file. The sums are those of the rows archived,
    so what was metered and spent stays known once the rows are gone
    (``billing.metering.reconcile``). Written, with the file on disk, in the transaction
    that removes the rows; rows of the month that arrive later get an archive of their own.
    """

    tenant = models.ForeignKey(Tenant, on_delete=models.CASCADE, related_name="+")
    month = models.DateField()  # the first day of the month (UTC)
    path = models.CharField(max_length=500)
    sha256 = models.CharField(max_length=64)
    rows = models.BigIntegerField()
    cost_nanos = models.BigIntegerField()
    byok_cost_nanos = models.BigIntegerField()
    created_at = models.DateTimeField(default=timezone.now)

    class Meta:
        indexes = [models.Index(fields=["tenant", "month"], name="ledger_archive_tenant")]

    def __str__(self) -> str:
        return f"{self.tenant_id} {self.month:%Y-%m}: {self.rows} rows"
