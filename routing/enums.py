from django.db import models


class UsageStatus(models.TextChoices):
    OK = "ok", "Answered"
    UPSTREAM_ERROR = "upstream_error", "Every upstream attempt failed"
    CLIENT_CLOSED = "client_closed", "Client disconnected mid-stream"
    BLOCKED = "blocked", "Refused by a budget"
    RATE_LIMITED = "rate_limited", "Refused by a rate limit"
    INTERNAL_ERROR = "internal_error", "Failed inside CascadeFlow"


class Preset(models.TextChoices):
    COST_OPTIMIZED = "cost_optimized", "Cost optimized"
    BALANCED = "balanced", "Balanced"
    QUALITY_FIRST = "quality_first", "Quality first"
    FAST = "fast", "Fast"


class UsageKind(models.TextChoices):
    """What a ledger row paid for: a request, or the audit of one (``routing.audits``)."""

    REQUEST = "request", "Request"
    AUDIT = "audit", "Audit"


class AuditStatus(models.TextChoices):
    PENDING = "pending", "Waiting for a worker"
    RUNNING = "running", "Being labelled"
    DONE = "done", "Labelled"
    SKIPPED = "skipped", "Skipped"
    FAILED = "failed", "Failed for good"


class AuditKind(models.TextChoices):
    """What an audit row is: only ``audit`` rows are the uniform sample."""

    AUDIT = "audit", "Sampled: the chain asked again, every draft labelled"
    AGREEMENT = "agreement", "Escalated anyway: labelled by agreement alone, no model asked"
    ROUTER = "router", "A drafted request's checks, unlabelled, for the router"


class AuditSkip(models.TextChoices):
    """Why an audit did not run (its request is unaffected either way)."""

    AUDITS_OFF = "audits_off", "Audits were turned off for the tenant or the profile"
    CAP_REACHED = "cap_reached", "The tenant's monthly audit cap would be passed"
    BUDGET = "budget", "A tenant budget would not admit it"
    PROFILE_CHANGED = "profile_changed", "The profile's chain changed"
    MODEL_UNAVAILABLE = "model_unavailable", "The catalog or the plan lacks a model it needs"
    EXPIRED = "expired", "No worker ran it in time"


class QualityAlertKind(models.TextChoices):
    RETENTION = "retention", "Measured retention below the target"
    DRIFT = "drift", "Traffic drifted from what the calibration was certified on"


class ModelMode(models.TextChoices):
    """What a model serves (LiteLLM's ``mode``; the engine's ``types.CHAT`` / ``EMBEDDING``)."""

    CHAT = "chat", "Chat completions (and cascades)"
    EMBEDDING = "embedding", "Embeddings"
