from django.core.management.base import BaseCommand
from django.db import transaction

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
        "Seed the demo tenant (owner login demo@cascadeflow.local / cascadeflow-demo) and print "
        "a fresh demo API token alone on the last line. Earlier demo tokens are revoked."
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
                monthly_budget_nanos=250 * 10**9,
            ).tenant
        else:
            user_get_or_create(email=DEMO_EMAIL, password=DEMO_PASSWORD)
        for old in ApiToken.objects.filter(
            tenant=tenant, name=DEMO_TOKEN_NAME, revoked_at__isnull=True
        ):
            token_revoke(tenant=tenant, token=old)
        issued = token_create(tenant=tenant, name=DEMO_TOKEN_NAME)
        self.stderr.write(
            f"Demo tenant '{tenant.slug}' ready; dashboard login {DEMO_EMAIL} / {DEMO_PASSWORD}."
        )
        self.stdout.write(issued.raw)
