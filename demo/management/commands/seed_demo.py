import os
from pathlib import Path

from django.conf import settings
from django.core.management.base import BaseCommand
from django.db import transaction
from django.utils import timezone

from demo import history, traffic
from tenants.models import ApiToken, Tenant, Tier
from tenants.services import (
    tenant_create,
    tier_ensure_defaults,
    token_create,
    token_hash,
    token_revoke,
    user_get_or_create,
)

DEMO_SLUG = "demo"
DEMO_EMAIL = "demo@cascadeflow.local"
DEMO_PASSWORD = "cascadeflow-demo"  # noqa: S105 - the public demo login
DEMO_TOKEN_NAME = "make-demo"  # noqa: S105 - a token label
TOKEN_FILE = "demo-token"  # noqa: S105 - a file name, under the settings' VAR_DIR


def token_file() -> Path:
    return Path(settings.VAR_DIR) / TOKEN_FILE


class Command(BaseCommand):
    help = (
        "Seed the demo tenant (owner login demo@cascadeflow.local / cascadeflow-demo) with "
        "end users, routing profiles, budgets and 30 days of usage history (real cascades "
        "through the demo models, a sample of them audited, and the calibrations fitted on "
        "those audits), and print a demo API token alone on the last line. "
        "Earlier demo tokens are revoked, unless --keep-token finds the one it saved last "
        "time still active (make demo: snippets pasted earlier keep working). A history less "
        "than a day old is kept; an older one is replaced, never duplicated."
    )

    def add_arguments(self, parser):
        parser.add_argument(
            "--history-days", type=int, default=history.DEFAULT_DAYS, help="days of history"
        )
        parser.add_argument(
            "--history-requests",
            type=int,
            default=history.DEFAULT_REQUESTS,
            help="requests of history (spread over the days)",
        )
        parser.add_argument(
            "--history-seed", type=int, default=history.DEFAULT_SEED, help="random seed"
        )
        parser.add_argument("--no-history", action="store_true", help="do not write usage history")
        parser.add_argument(
            "--reset-history", action="store_true", help="replace the history even if fresh"
        )
        parser.add_argument(
            "--traffic-rate",
            type=float,
            default=traffic.DEFAULT_RATE,
            help="requests per second the live simulator will send; budgets leave room for "
            "it (0: no simulator)",
        )
        parser.add_argument(
            "--keep-token",
            action="store_true",
            help=f"reuse the demo token saved in VAR_DIR/{TOKEN_FILE} while it is active "
            "(else issue one and save it there)",
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
            history.ensure_demo_setup(tenant)
        else:
            report = history.generate(
                tenant,
                days=options["history_days"],
                requests=options["history_requests"],
                seed=options["history_seed"],
                force=options["reset_history"],
                traffic_rate=max(options["traffic_rate"], 0.0),
                announce=lambda text: self.stderr.write(text),
            )
            self.stderr.write(report.summary())
        raw = self._kept_token(tenant) if options["keep_token"] else None
        if raw is None:
            raw = self._new_token(tenant, save=options["keep_token"])
        self.stderr.write(
            f"Demo tenant '{tenant.slug}' ready; dashboard login {DEMO_EMAIL} / {DEMO_PASSWORD}."
        )
        self.stdout.write(raw)

    def _kept_token(self, tenant: Tenant) -> str | None:
        """The token saved last time, if it is still an active demo token of this tenant."""
        try:
            raw = token_file().read_text().strip()
        except OSError:
            return None
        if not raw:
            return None
        active = ApiToken.objects.filter(
            tenant=tenant,
            name=DEMO_TOKEN_NAME,
            token_hash=token_hash(raw),
            revoked_at__isnull=True,
        ).exclude(expires_at__lte=timezone.now())
        return raw if active.exists() else None

    def _new_token(self, tenant: Tenant, *, save: bool) -> str:
        """Revoke the earlier demo tokens and issue one (saved for the next run: owner-only)."""
        for old in ApiToken.objects.filter(
            tenant=tenant, name=DEMO_TOKEN_NAME, revoked_at__isnull=True
        ):
            token_revoke(tenant=tenant, token=old)
        raw = token_create(tenant=tenant, name=DEMO_TOKEN_NAME).raw
        if save:
            path = token_file()
            path.parent.mkdir(parents=True, exist_ok=True)
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            with os.fdopen(fd, "w") as out:
                out.write(raw + "\n")
        return raw
