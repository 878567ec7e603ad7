from django.core.management.base import BaseCommand
from django.utils import timezone

from billing.metering import reconcile
from billing.models import TenantSubscription


class Command(BaseCommand):
    help = "Compare each tenant's ledger with the usage reported to Stripe, in whole cents."

    def add_arguments(self, parser):
        parser.add_argument("--tenant", help="tenant slug (default: every subscribed tenant)")

    def handle(self, *args, tenant=None, **options):
        subs = TenantSubscription.objects.select_related("tenant").order_by("tenant__slug")
        if tenant:
            subs = subs.filter(tenant__slug=tenant)
        now = timezone.now()
        header = f"{'tenant':<24}{'ledger c':>10}{'reported c':>12}{'unsent c':>10}"
        self.stdout.write(header + f"{'diff c':>8}{'open n$':>14}")
        for sub in subs:
            r = reconcile(tenant_id=sub.tenant_id, now=now)
            self.stdout.write(
                f"{sub.tenant.slug:<24}{r.ledger_cents:>10}{r.reported_cents:>12}{r.unsent_cents:>10}"
                f"{r.difference_cents:>8}{r.unreported_nanos:>14}"
            )
