import asyncio
from pathlib import Path

from django.core.management.base import BaseCommand, CommandError
from django.db import transaction

from routing.engine.policy import PRESETS
from routing.engine.types import Deployment, ModelSpec
from routing.models import RoutingProfile
from routing.platform_models import model_catalog
from routing.providers import replay
from tenants.services import audit_record


class Command(BaseCommand):
    help = (
        "Calibrate a tenant's routing profile on labelled traffic in the replay format: fit the "
        "draft scorer and pick thresholds that keep the target retention (lower bound) on its "
        "train split. Models are matched by name; --map recorded=profile renames."
    )

    def add_arguments(self, parser):
        parser.add_argument("tenant", help="tenant slug")
        parser.add_argument("profile", help="profile name (as in cascade/<name>)")
        parser.add_argument("file", help="replay-format .jsonl (with its .models.json sidecar)")
        parser.add_argument("--target-retention", type=float)
        parser.add_argument("--confidence", type=float, default=0.9)
        parser.add_argument("--map", action="append", default=[], metavar="RECORDED=MODEL")
        parser.add_argument("--no-paid", action="store_true")

    def handle(
        self, *args, tenant, profile, file, target_retention, confidence, map, no_paid, **options
    ):
        try:
            routing_profile = RoutingProfile.objects.select_related("tenant").get(
                tenant__slug=tenant, name=profile
            )
        except RoutingProfile.DoesNotExist:
            raise CommandError(f"Tenant '{tenant}' has no profile '{profile}'.") from None
        path = Path(file)
        if not path.exists():
            raise CommandError(f"No such file: {file}")
        renames = dict(item.split("=", 1) for item in map)
        by_profile = {v: k for k, v in renames.items()}
        catalog = model_catalog()
        recorded, specs = [], []
        for name in routing_profile.chain:
            model = catalog.get(name)
            if model is None:
                raise CommandError(f"The profile names an unknown model '{name}'.")
            source = by_profile.get(name, name)
            recorded.append(source)
            specs.append(
                ModelSpec(
                    name=name,
                    deployments=(Deployment(f"replay/{source}"),),
                    price=model.price,
                    supports_logprobs=model.supports_logprobs,
                )
            )
        data = replay.ReplayFile.load(path)
        missing = [m for m in recorded if not any(m in r["responses"] for r in data.rows)]
        if missing:
            raise CommandError(f"{file} has no answers of {', '.join(missing)} (use --map).")
        policy = PRESETS[routing_profile.preset]
        target = target_retention or policy.target_retention
        calibration, rows, _, _ = asyncio.run(
            replay.calibrate_on_file(
                data,
                specs,
                recorded,
                policy=policy,
                target_retention=target,
                confidence=confidence,
                allow_paid=not no_paid,
            )
        )
        if not calibration.steps:
            raise CommandError("Nothing to calibrate: the profile's chain has a single model.")
        calibration.meta["source"] = path.name
        with transaction.atomic():
            routing_profile.calibration = calibration.to_json()
            routing_profile.save(update_fields=["calibration", "updated_at"])
            audit_record(
                tenant=routing_profile.tenant,
                action="profile.calibrate",
                target=f"cascade/{profile}",
                data={"file": path.name, "target_retention": target, "rows": len(rows)},
            )
        for index, step in enumerate(calibration.steps, start=1):
            s = step.stats
            self.stdout.write(
                f"step {index}: threshold {step.threshold:.3f} ({step.paid_mode}), train retention "
                f"{s['train_retention']:.1%} (lower bound {s['train_retention_lower_bound']:.1%}), "
                f"saving {s['train_saving']:.1%}, AUROC {s['auroc']}"
            )
