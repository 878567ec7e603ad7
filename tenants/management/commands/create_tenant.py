from decimal import Decimal, InvalidOperation
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from django.core.exceptions import ValidationError
from django.core.management.base import BaseCommand, CommandError
from django.core.validators import validate_slug
from django.db import IntegrityError

from core.money import usd_to_nanos
from tenants.models import Tenant, Tier
from tenants.services import tenant_create, tier_ensure_defaults


class Command(BaseCommand):
    help = (
        "Create a tenant (optionally its owner and a monthly budget) and print its first "
        "API token, which has every scope, alone on the last line."
    )

    def add_arguments(self, parser):
        parser.add_argument("slug")
        parser.add_argument("--name", default="")
        parser.add_argument("--plan", metavar="TIER", help="Tier slug (default: the default tier).")
        parser.add_argument("--monthly-budget-usd", metavar="N")
        parser.add_argument("--time-zone", default="UTC")
        parser.add_argument("--owner-email")
        parser.add_argument("--owner-password")

    def handle(
        self,
        *args,
        slug,
        name,
        plan,
        monthly_budget_usd,
        time_zone,
        owner_email,
        owner_password,
        **options,
    ):
        if owner_password and not owner_email:
            raise CommandError("--owner-password needs --owner-email.")
        try:
            validate_slug(slug)
        except ValidationError:
            raise CommandError(
                f"'{slug}' is not a valid slug (letters, digits, hyphens, underscores)."
            ) from None
        try:
            ZoneInfo(time_zone)
        except (ZoneInfoNotFoundError, ValueError):
            raise CommandError(f"Unknown time zone '{time_zone}'.") from None
        if Tenant.objects.filter(slug=slug).exists():
            raise CommandError(f"A tenant with slug '{slug}' already exists.")
        tier_ensure_defaults()
        tier = None
        if plan:
            tier = Tier.objects.filter(slug=plan).first()
            if tier is None:
                known = ", ".join(Tier.objects.order_by("slug").values_list("slug", flat=True))
                raise CommandError(f"Unknown plan '{plan}'. Known plans: {known}.")
        budget_nanos = None
        if monthly_budget_usd is not None:
            try:
                amount = Decimal(monthly_budget_usd)
            except InvalidOperation:
                raise CommandError(
                    "--monthly-budget-usd must be a number, e.g. 250 or 99.50."
                ) from None
            if amount < 0:
                raise CommandError("--monthly-budget-usd cannot be negative.")
            budget_nanos = usd_to_nanos(amount)
        try:
            created = tenant_create(
                slug=slug,
                name=name,
                tier=tier,
                time_zone=time_zone,
                owner_email=owner_email,
                owner_password=owner_password,
                monthly_budget_nanos=budget_nanos,
            )
        except IntegrityError as exc:
            raise CommandError(f"Could not create tenant '{slug}': {exc}") from None
        tenant = created.tenant
        self.stderr.write(
            f"Created tenant '{tenant.slug}' on plan '{tenant.tier.slug if tenant.tier else '-'}'"
            + (f", owner {owner_email}" if owner_email else "")
            + (f", monthly budget ${monthly_budget_usd}" if budget_nanos is not None else "")
            + ". API token (shown once):"
        )
        self.stdout.write(created.issued.raw)
