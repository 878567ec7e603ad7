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


class BudgetDecision(models.TextChoices):
    """What the budgets decide for a request, mildest first. The order is the enum's own:
    admission keeps the most severe of its budgets' levels, a tenant callback may only make
    a decision stricter, and ``UsageEvent.budget_status`` records the outcome."""

    ALLOW = "allow", "Allow"
    WARN = "warn", "Warn"
    DEGRADE = "degrade", "Degrade"
    BLOCK = "block", "Block"

    @staticmethod
    def severity(decision: str) -> int:
        """0 for allow up to 3 for block."""
        return _SEVERITY[decision]

    @classmethod
    def most_severe(cls, *decisions: str) -> "BudgetDecision":
        return cls(max(decisions, key=_SEVERITY.__getitem__))


_SEVERITY: dict[str, int] = {decision: rank for rank, decision in enumerate(BudgetDecision)}
