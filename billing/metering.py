"""Usage metering to Stripe and its reconciliation with the ledger.

Closed hours only: an hour is reported once it has ended (plus a settling
delay for in-flight requests), so a window's sum never changes after it is
reported. Each report is first written as a ``UsageReport`` row (unique per
tenant and hour), then sent with its identifier; a failed send is retried
with the same identifier, which Stripe bills once.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

from django.db import IntegrityError, transaction
from django.db.models import F, Sum

from billing import stripe_api
from billing.models import TenantSubscription, UsageReport
from routing.models import LedgerArchive, UsageEvent
from tenants.models import Tenant

NANOS_PER_CENT = 10**7
SETTLE_DELAY = timedelta(minutes=5)


def _hour(dt: datetime) -> datetime:
    return dt.astimezone(UTC).replace(minute=0, second=0, microsecond=0)


def _metered(tenant_id: int):
    """What is billed of a ledger row: its cost, less what the tenant's own provider keys
    paid unless its plan meters that too (``Tier.meters_byok``)."""
    meters_byok = Tenant.objects.filter(pk=tenant_id, tier__meters_byok=True).exists()
    return Sum("cost_nanos") if meters_byok else Sum(F("cost_nanos") - F("byok_cost_nanos"))


def _window_cost(tenant_id: int, start: datetime, end: datetime) -> int:
    total = UsageEvent.objects.filter(
        tenant_id=tenant_id, created_at__gte=start, created_at__lt=end
    ).aggregate(total=_metered(tenant_id))["total"]
    return int(total or 0)


def reports_prepare(
    *, subscription: TenantSubscription, now: datetime, max_windows: int = 48
) -> list[UsageReport]:
    """Write the report rows of the tenant's closed, unreported hours (in order)."""
    last = UsageReport.objects.filter(tenant=subscription.tenant).order_by("-window_start").first()
    if last is not None:
        start, cumulative = last.window_end, last.cumulative_nanos
    else:
        first_event = (
            UsageEvent.objects.filter(tenant=subscription.tenant)
            .order_by("created_at")
            .values_list("created_at", flat=True)
            .first()
        )
        if first_event is None:
            return []
        start, cumulative = _hour(first_event), 0
    horizon = _hour(now - SETTLE_DELAY)
    created = []
    while start < horizon and len(created) < max_windows:
        end = start + timedelta(hours=1)
        cost = _window_cost(subscription.tenant_id, start, end)
        cents = (cumulative + cost) // NANOS_PER_CENT - cumulative // NANOS_PER_CENT
        cumulative += cost
        try:
            with transaction.atomic():
                report = UsageReport.objects.create(
                    tenant=subscription.tenant,
                    window_start=start,
                    window_end=end,
                    cost_nanos=cost,
                    cumulative_nanos=cumulative,
                    cents=cents,
                    identifier=f"cf-usage-{subscription.tenant_id}-{start:%Y%m%dT%H}",
                )
        except IntegrityError:  # another worker prepared it
            report = UsageReport.objects.get(tenant=subscription.tenant, window_start=start)
            cumulative = report.cumulative_nanos
        created.append(report)
        start = end
    return created


def reports_send(*, subscription: TenantSubscription) -> int:
    """Send every unsent report with cents to bill; returns how many were sent now."""
    sent = 0
    for report in UsageReport.objects.filter(
        tenant=subscription.tenant, reported_at__isnull=True
    ).order_by("window_start"):
        if report.cents:
            try:
                stripe_api.meter_event(
                    customer=subscription.stripe_customer_id,
                    cents=report.cents,
                    identifier=report.identifier,
                    timestamp=int(report.window_end.timestamp()) - 1,
                )
            except Exception as exc:
                report.error = str(exc)[:300]
                report.save(update_fields=["error"])
                raise
        report.reported_at = datetime.now(UTC)
        report.error = ""
        report.save(update_fields=["reported_at", "error"])
        sent += 1
    return sent


def usage_report(*, tenant_id: int, now: datetime) -> int:
    subscription = (
        TenantSubscription.objects.select_related("tenant").filter(tenant_id=tenant_id).first()
    )
    if subscription is None or not subscription.stripe_customer_id:
        return 0
    reports_prepare(subscription=subscription, now=now)
    return reports_send(subscription=subscription)


@dataclass(frozen=True)
class Reconciliation:
    ledger_cents: int
    reported_cents: int
    unsent_cents: int
    unreported_nanos: int  # ledger cost of hours not yet prepared (open or settling)

    @property
    def difference_cents(self) -> int:
        return self.ledger_cents - self.reported_cents - self.unsent_cents


def reconcile(*, tenant_id: int, now: datetime) -> Reconciliation:
    """Compare the ledger with what was reported to Stripe (in whole cents).

    The ledger is its rows plus the months retention archived (their sums were kept).
    """
    metered = _metered(tenant_id)
    ledger = int(UsageEvent.objects.filter(tenant_id=tenant_id).aggregate(t=metered)["t"] or 0)
    ledger += int(LedgerArchive.objects.filter(tenant_id=tenant_id).aggregate(t=metered)["t"] or 0)
    reports = UsageReport.objects.filter(tenant_id=tenant_id)
    reported = int(reports.filter(reported_at__isnull=False).aggregate(c=Sum("cents"))["c"] or 0)
    unsent = int(reports.filter(reported_at__isnull=True).aggregate(c=Sum("cents"))["c"] or 0)
    last = reports.order_by("-window_end").first()
    covered = last.cumulative_nanos if last else 0
    return Reconciliation(
        ledger_cents=covered // NANOS_PER_CENT,
        reported_cents=reported,
        unsent_cents=unsent,
        unreported_nanos=ledger - covered,
    )
