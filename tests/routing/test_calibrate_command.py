import pytest
from django.core.management import CommandError, call_command

from routing.engine.policy import Calibration
from routing.models import RoutingProfile
from tenants.models import AuditEvent
from tests.support import replay_fixture

pytestmark = pytest.mark.django_db


def test_calibrate_profile_stores_a_calibration_the_gateway_uses(tenant, tmp_path, capsys):
    path = replay_fixture.write(tmp_path)
    profile = RoutingProfile.objects.create(
        tenant=tenant, name="mcq", chain=["demo/small", "demo/large"]
    )

    call_command(
        "calibrate_profile",
        "acme",
        "mcq",
        str(path),
        "--map",
        f"{replay_fixture.CHEAP}=demo/small",
        "--map",
        f"{replay_fixture.STRONG}=demo/large",
        "--target-retention",
        "0.9",
    )

    profile.refresh_from_db()
    calibration = Calibration.from_json(profile.calibration)
    [step] = calibration.steps
    assert step.threshold is not None
    assert step.stats["n"] == 72  # the fixture's train rows
    assert step.stats["train_retention_lower_bound"] >= 0.9
    assert calibration.meta["source"] == "tiny.jsonl"
    assert "step 1: threshold" in capsys.readouterr().out
    assert AuditEvent.objects.filter(tenant=tenant, action="profile.calibrate").exists()


def test_calibrate_profile_refuses_unknown_profiles_and_models(tenant, tmp_path):
    path = replay_fixture.write(tmp_path)
    RoutingProfile.objects.create(tenant=tenant, name="p", chain=["demo/small", "demo/large"])

    with pytest.raises(CommandError, match="no profile 'nope'"):
        call_command("calibrate_profile", "acme", "nope", str(path))
    with pytest.raises(CommandError, match="no answers of demo/small"):
        call_command("calibrate_profile", "acme", "p", str(path))
