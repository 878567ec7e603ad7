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
