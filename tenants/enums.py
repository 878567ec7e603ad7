from django.db import models


class MemberRole(models.TextChoices):
    OWNER = "owner", "Owner"
    ADMIN = "admin", "Admin"
    VIEWER = "viewer", "Viewer"


class Scope(models.TextChoices):
    """What an API token may do. ``admin`` implies every other scope."""

    COMPLETIONS = "completions", "Call /v1/ (chat, responses, embeddings, models)"
    USAGE_READ = "usage:read", "Read usage and exports"
    BUDGETS_WRITE = "budgets:write", "Manage budgets"
    TOKENS_WRITE = "tokens:write", "Manage API tokens"
    ROUTING_WRITE = "routing:write", "Manage routing profiles"
    ADMIN = "admin", "Everything"


ALL_SCOPES: tuple[str, ...] = tuple(Scope.values)


class BudgetScope(models.TextChoices):
    TENANT = "tenant", "Whole tenant"
    TIER = "tier", "End users of a tier"
    END_USER = "end_user", "One end user"
    TOKEN = "token", "One API token"


class BudgetPeriod(models.TextChoices):
    DAY = "day", "Day"
    WEEK = "week", "Week"
    MONTH = "month", "Month"
    LIFETIME = "lifetime", "Lifetime"
