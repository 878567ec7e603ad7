"""Budget alerts: one per threshold per period, delivered by email (and recorded for the dashboard).

Deduplication lives in the database (``BudgetAlert``'s unique constraint);
delivery is idempotent: each channel's timestamp is set once it succeeded, so a
retried task never sends twice.
"""

from django.conf import settings
from django.core.mail import send_mail
from django.utils import timezone

from routing.engine.pricing import nanos_to_usd
from tenants.enums import MemberRole
from tenants.models import BudgetAlert, Member

LEVEL_TEXT = {
    "warn": "has passed its warning threshold",
    "degrade": "has passed its degrade threshold: requests now use the cheap models only",
    "block": "is exhausted: requests are refused until it resets",
    "forecast": "is forecast to run out before the period ends",
}


class DeliveryError(Exception):
    pass


def alert_text(alert: BudgetAlert) -> tuple[str, str]:
    budget = alert.budget
    period = budget.get_period_display().lower()
    subject = f"[CascadeFlow] {alert.tenant.name}: {period} budget {alert.level}"
    body = (
        f"The {budget.get_period_display().lower()} {budget.get_scope_display().lower()} budget of "
        f"{alert.tenant.name} {LEVEL_TEXT.get(alert.level, alert.level)}.\n\n"
        f"Spent: ${nanos_to_usd(alert.spent_nanos):.2f} of ${nanos_to_usd(alert.limit_nanos):.2f} "
        f"(period from {alert.period_start.isoformat()}).\n"
    )
    return subject, body


def alerts_deliver(*, alert_ids: list[int]) -> int:
    """Email each alert to the tenant's owners and admins; returns how many were sent now."""
    sent = 0
    for alert in BudgetAlert.objects.filter(
        pk__in=alert_ids, emailed_at__isnull=True
    ).select_related("tenant", "budget"):
        recipients = list(
            Member.objects.filter(
                tenant=alert.tenant, role__in=[MemberRole.OWNER, MemberRole.ADMIN]
            )
            .exclude(user__email="")
            .values_list("user__email", flat=True)
        )
        if recipients:
            subject, body = alert_text(alert)
            try:
                send_mail(subject, body, settings.DEFAULT_FROM_EMAIL, recipients)
            except OSError as exc:
                raise DeliveryError(str(exc)) from exc
            sent += 1
        BudgetAlert.objects.filter(pk=alert.pk, emailed_at__isnull=True).update(
            emailed_at=timezone.now()
        )
    return sent
