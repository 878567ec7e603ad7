"""Alerts by email and a signed webhook: budget alerts here, and any other kind of alert.

Budget alerts: one per threshold per period, and every alert is also a
``BudgetAlert`` row, which the dashboard shows. Other apps deliver their own
alerts (rows of an ``AlertDelivery`` model) through the same code, described by
an ``AlertKind``: what the email and the webhook say.

Deduplication lives in the database (each alert model's unique constraint);
delivery is idempotent: each channel's timestamp is set once it succeeded, so a
retried task never sends twice, and a run holds the alert's lease while it
sends, so two runs never send at once. Delivery is an outbox: an alert whose
task was lost (the broker was down) or failed is sent again by the sweeper.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

import httpx
from django.conf import settings
from django.core.mail import send_mail
from django.db.models import Q
from django.utils import timezone

from core import outbox
from core.crypto import decrypt
from core.money import nanos_to_usd
from core.netguard import guarded_client
from tenants.callbacks import SIGNATURE_HEADER, TIMESTAMP_HEADER, sign, url_allowed
from tenants.enums import BudgetDecision, MemberRole
from tenants.models import AlertDelivery, BudgetAlert, Member, Tenant

LEVEL_TEXT = {
    BudgetDecision.WARN: "has passed its warning threshold",
    BudgetDecision.DEGRADE: (
        "has passed its degrade threshold: requests now use the cheap models only"
    ),
    BudgetDecision.BLOCK: "is exhausted: requests are refused until it resets",
    "forecast": "is forecast to run out before the period ends",
}


logger = logging.getLogger(__name__)
LEASE = timedelta(minutes=2)  # longer than the delivery task's time limit
MAX_AGE = timedelta(days=1)  # an older undelivered alert is history, not news: not sent late


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


def webhook_payload(alert: BudgetAlert) -> dict:
    budget = alert.budget
    return {
        "type": f"budget.{alert.level}",
        "alert_id": alert.pk,
        "tenant": alert.tenant.slug,
        "budget": {"id": budget.pk, "scope": budget.scope, "period": budget.period},
        "subject_id": alert.subject_id or None,
        "period_start": alert.period_start.isoformat(),
        "spent_usd": str(nanos_to_usd(alert.spent_nanos)),
        "limit_usd": str(nanos_to_usd(alert.limit_nanos)),
        "created_at": alert.created_at.isoformat(),
    }


@dataclass(frozen=True)
class AlertKind:
    """One kind of alert: its rows (an ``AlertDelivery`` model with a ``tenant``) and words."""

    model: type[AlertDelivery]
    text: Callable[[Any], tuple[str, str]]  # (email subject, body)
    payload: Callable[[Any], dict]  # the webhook's JSON body
    label: str  # in logs
    related: tuple[str, ...] = ("tenant",)


BUDGET_ALERTS = AlertKind(
    BudgetAlert, alert_text, webhook_payload, "Budget alert", ("tenant", "budget")
)


def _post_webhook(tenant: Tenant, payload: dict) -> None:
    if not url_allowed(tenant.alert_webhook_url):
        raise DeliveryError("the alert webhook URL must be HTTPS")
    body = json.dumps(payload, separators=(",", ":"), sort_keys=True).encode()
    timestamp = str(int(time.time()))
    secret = decrypt(tenant.alert_webhook_secret)
    headers = {
        "Content-Type": "application/json",
        TIMESTAMP_HEADER: timestamp,
        SIGNATURE_HEADER: sign(secret, timestamp, body),
    }
    try:
        # Connects only to a public address the name resolves to now (not when saved).
        with guarded_client(timeout=5) as client:
            response = client.post(tenant.alert_webhook_url, content=body, headers=headers)
    except httpx.HTTPError as exc:
        raise DeliveryError(f"webhook unreachable: {exc}") from exc
    if response.status_code >= 300:
        raise DeliveryError(f"webhook answered {response.status_code}")


def _email(tenant: Tenant, subject: str, body: str) -> bool:
    recipients = list(
        Member.objects.filter(tenant=tenant, role__in=[MemberRole.OWNER, MemberRole.ADMIN])
        .exclude(user__email="")
        .values_list("user__email", flat=True)
    )
    if not recipients:
        return False
    try:
        send_mail(subject, body, settings.DEFAULT_FROM_EMAIL, recipients)
    except OSError as exc:
        raise DeliveryError(str(exc)) from exc
    return True


def deliver(kind: AlertKind, *, alert_ids: list[int]) -> int:
    """Email each alert to the tenant's owners and admins and POST it to the tenant's webhook.

    Each channel is marked done once it succeeded, and the alert delivered once
    every channel is; a retry resends only what failed. An alert another run
    holds (its lease) is left to that run. Every alert is tried; then, if one
    failed, DeliveryError is raised for the task to retry. Returns how many
    alerts went out on at least one channel now.
    """
    rows = kind.model._default_manager
    sent, failed = 0, []
    for alert_id in alert_ids:
        now = timezone.now()
        if (
            not rows.filter(pk=alert_id, delivered_at__isnull=True)
            .filter(Q(delivering_until__isnull=True) | Q(delivering_until__lt=now))
            .update(delivering_until=now + LEASE)
        ):
            continue
        alert = rows.select_related(*kind.related).get(pk=alert_id)
        tenant = alert.tenant  # type: ignore[attr-defined]
        delivered, errors = False, []
        if tenant.alert_webhook_url and alert.webhook_at is None:
            try:
                _post_webhook(tenant, kind.payload(alert))
            except Exception as exc:
                errors.append(_failure(kind, alert, "webhook", exc))
            else:
                rows.filter(pk=alert.pk).update(webhook_at=timezone.now())
                delivered = True
        if alert.emailed_at is None:
            try:
                delivered = _email(tenant, *kind.text(alert)) or delivered
            except Exception as exc:
                errors.append(_failure(kind, alert, "email", exc))
            else:
                rows.filter(pk=alert.pk).update(emailed_at=timezone.now())
        rows.filter(pk=alert.pk).update(
            delivering_until=None,
            delivered_at=None if errors else timezone.now(),
            last_error="; ".join(errors)[:300],
        )
        sent += delivered
        failed += errors
    if failed:
        raise DeliveryError("; ".join(failed))
    return sent


def _failure(kind: AlertKind, alert: AlertDelivery, channel: str, exc: Exception) -> str:
    if not isinstance(exc, DeliveryError):
        logger.exception("%s %s: %s delivery failed", kind.label, alert.pk, channel)
    return f"{channel}: {outbox.error_text(exc)}"


def due(kind: AlertKind, *, now: datetime) -> list[int]:
    """Undelivered alerts a grace period old (and younger than ``MAX_AGE``) that no run
    holds, with attempts left: an attempt is counted on each and their ids returned."""
    return outbox.claim_due(
        kind.model._default_manager.filter(
            delivered_at__isnull=True,
            created_at__lt=now - outbox.GRACE,
            created_at__gte=now - MAX_AGE,
        ).filter(Q(delivering_until__isnull=True) | Q(delivering_until__lt=now)),
        now=now,
    )


def given_up(kind: AlertKind, *, now: datetime) -> int:
    """Recent alerts the sweeper has stopped sending: their ``last_error`` says why."""
    return kind.model._default_manager.filter(
        delivered_at__isnull=True,
        created_at__gte=now - MAX_AGE,
        attempts__gte=outbox.MAX_ATTEMPTS,
    ).count()


def alerts_deliver(*, alert_ids: list[int]) -> int:
    return deliver(BUDGET_ALERTS, alert_ids=alert_ids)


def alerts_due(*, now: datetime) -> list[int]:
    return due(BUDGET_ALERTS, now=now)


def alerts_given_up(*, now: datetime) -> int:
    return given_up(BUDGET_ALERTS, now=now)
