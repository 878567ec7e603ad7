from django.core.management.base import BaseCommand, CommandError

from billing.services import plans_sync
from billing.stripe_api import products_and_prices


class Command(BaseCommand):
    help = "Create or update tiers from Stripe products with cascadeflow_tier metadata."

    def handle(self, *args, **options):
        try:
            products, prices = products_and_prices()
        except Exception as exc:
            raise CommandError(f"Could not read plans from Stripe: {exc}") from None
        for line in plans_sync(products=products, prices=prices):
            self.stdout.write(line)
