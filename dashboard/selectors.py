"""Reads for the dashboard."""

from dataclasses import dataclass

from django.db.models import Count, Sum

from routing.models import UsageEvent
from tenants.models import Member, Tenant


@dataclass(frozen=True)
class TenantSummary:
    tenant: Tenant
    role: str
    requests: int
    cost_nanos: int


def memberships_for_user(*, user) -> list[Member]:
    return list(Member.objects.filter(user=user).select_related("tenant").order_by("tenant__slug"))


def tenant_summary(*, member: Member) -> TenantSummary:
    totals = UsageEvent.objects.filter(tenant=member.tenant).aggregate(
        requests=Count("id"), cost=Sum("cost_nanos")
    )
    return TenantSummary(
        tenant=member.tenant,
        role=member.role,
        requests=totals["requests"] or 0,
        cost_nanos=totals["cost"] or 0,
    )
