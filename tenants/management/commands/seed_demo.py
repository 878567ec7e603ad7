from django.core.management.base import BaseCommand
from django.db import transaction

from cascadeflow_site import demo_history
from tenants.models import ApiToken, Tenant, Tier
from tenants.services import (
    tenant_create,
    tier_ensure_defaults,
    token_create,
    token_revoke,
    user_get_or_create,
)

DEMO_SLUG = "demo"
DEMO_EMAIL = "demo@cascadeflow.local"
DEMO_PASSWORD = "cascadeflow-demo"  # noqa: S105 - the public demo login
DEMO_TOKEN_NAME = "make-demo"  # noqa: S105 - a token label


class Command(BaseCommand):
    help = (
        "Seed the demo tenant (owner login demo@cascadeflow.local / cascadeflow-demo) with "
        "end users, routing profiles, budgets and 30 days of usage history (real cascades "
        "through the demo models), and print a fresh demo API token alone on the last line. "
        "Earlier demo tokens are revoked. A history less than a day old is kept; an older one "
        "is replaced, never duplicated."
    )

    def add_arguments(self, parser):
        parser.add_argument(
            "--history-days", type=int, default=demo_history.DEFAULT_DAYS, help="days of history"
        )
        parser.add_argument(
            "--history-requests",
            type=int,
            default=demo_history.DEFAULT_REQUESTS,
            help="requests of history (spread over the days)",
        )
        parser.add_argument(
            "--history-seed", type=int, default=demo_history.DEFAULT_SEED, help="random seed"
        )
        parser.add_argument("--no-history", action="store_true", help="do not write usage history")
        parser.add_argument(
            "--reset-history", action="store_true", help="replace the history even if fresh"
        )

    @transaction.atomic
    def handle(self, *args, **options):
        tier_ensure_defaults()
        Tier.objects.get_or_create(
            slug="pro",
            defaults={"name": "Pro", "requests_per_minute": 600, "tokens_per_minute": 200_000},
        )
        tenant = Tenant.objects.filter(slug=DEMO_SLUG).first()
        if tenant is None:
            tenant = tenant_create(
                slug=DEMO_SLUG,
                name="Demo Inc.",
                owner_email=DEMO_EMAIL,
                owner_password=DEMO_PASSWORD,
                monthly_budget_nanos=250 * 10**9,  # resized to the history below
            ).tenant
        else:
            user_get_or_create(email=DEMO_EMAIL, password=DEMO_PASSWORD)
        if options["no_history"]:
            demo_history.ensure_demo_setup(tenant)
        else:
            report = demo_history.generate(
                tenant,
                days=options["history_days"],
                requests=options["history_requests"],
                seed=options["history_seed"],
                force=options["reset_history"],
            )
            self.stderr.write(report.summary())
        for old in ApiToken.objects.filter(
            tenant=tenant, name=DEMO_TOKEN_NAME, revoked_at__isnull=True
        ):
            token_revoke(tenant=tenant, token=old)
        issued = token_create(tenant=tenant, name=DEMO_TOKEN_NAME)
        self.stderr.write(
            f"Demo tenant '{tenant.slug}' ready; dashboard login {DEMO_EMAIL} / {DEMO_PASSWORD}."
        )
        self.stdout.write(issued.raw)
