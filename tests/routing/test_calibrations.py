"""Learned calibrations: the gateway runs them, refits certify them, drift and retention watch them."""

import random
from datetime import UTC, datetime, timedelta

import pytest
from asgiref.sync import sync_to_async
from django.utils import timezone

from core import outbox
from routing import calibrations
from routing.audits import REFIT_EVERY
from routing.calibrations import (
    CalibrationNotCertified,
    calibration_promote,
    calibration_rollback,
    profile_refit,
    quality_check,
)
from routing.engine import learning
from routing.engine.learning import NEVER, Verdict
from routing.enums import QualityAlertKind, UsageKind
from routing.models import (
    Audit,
    CalibrationVersion,
    ProfileLearning,
    QualityAlert,
    RoutingProfile,
    UsageEvent,
)
from routing.targets import chain_key, resolve_target
from tenants.enums import MemberRole
from tenants.models import AuditEvent, Member
from tenants.selectors import token_context_for_raw
from tenants.services import tenant_settings_update, user_get_or_create
from tests.factories import UsageEventFactory
from tests.routing.learning_fixtures import (
    BAD,
    GOOD,
    accepting_version,
    chat,
    store_observations,
)
from tests.routing.test_gateway import post
from tests.support.broker import broker_down

pytestmark = pytest.mark.django_db(transaction=True)
ALIKE = {"complexity": 0.64}  # the prior scores it 0.5 exactly: one candidate, accepting all
DEMO = ["demo/small", "demo/medium", "demo/large"]
BALANCED = "cascade/balanced"
TWO = ["demo/small", "demo/large"]


def ctx_of(api_token):
    return token_context_for_raw(raw=api_token.raw, now=timezone.now())


# --- the gateway runs what was learned --------------------------------------------------------


def test_cold_start_escalates_every_draft(api_token):
    target = resolve_target(ctx_of(api_token), BALANCED)

    assert target.learning is not None
    assert target.learning.version_id is None
    assert target.calibration.meta == {"learned": True, "cold_start": True}
    assert [s.threshold for s in target.calibration.steps] == [NEVER, NEVER]


async def test_cold_start_request_is_answered_by_the_reference(api_token):
    response = await post(api_token.raw, chat(BALANCED, "What is 12 + 30?"))

    assert response["x-cascade-model"] == "demo/large"
    event = await UsageEvent.objects.aget(kind=UsageKind.REQUEST)
    assert event.model == "demo/large"
    assert not any(a["decision"] == "accepted" for a in event.expanded_attempts)  # no draft served


# (tenant audits, profile audits, version, what runs)
RESOLUTION = {
    "learning, no version: cold start": (True, True, None, "cold_start"),
    "learning, a certified version of this chain": (True, True, "same", "learned"),
    "learning, a version of another chain": (True, True, "other", "cold_start"),
    "tenant audits off: the uploaded calibration": (False, True, "same", "uploaded"),
    "profile audits off: the uploaded calibration": (True, False, "same", "uploaded"),
}


@pytest.mark.parametrize("case", list(RESOLUTION))
def test_what_a_profile_runs(api_token, tenant, case):
    tenant_on, profile_on, version, runs = RESOLUTION[case]
    uploaded = {"version": 1, "steps": [{"threshold": 0.42}], "meta": {"source": "file.jsonl"}}
    RoutingProfile.objects.create(
        tenant=tenant, name="geo", chain=TWO, calibration=uploaded, audits_enabled=profile_on
    )
    tenant_settings_update(tenant=tenant, audits_enabled=tenant_on)
    if version:
        accepting_version(tenant, chain=TWO if version == "same" else DEMO)

    target = resolve_target(ctx_of(api_token), "cascade/geo")

    meta = target.calibration.meta
    assert {
        "cold_start": meta.get("cold_start") is True,
        "learned": meta.get("learned") is True and not meta.get("cold_start"),
        "uploaded": meta.get("source") == "file.jsonl",
    } == {name: name == runs for name in ("cold_start", "learned", "uploaded")}
    assert (target.learning is not None) == (runs != "uploaded")


@pytest.mark.parametrize(("chain", "labels"), [(DEMO, 500), (TWO, 0)])
def test_labels_of_another_chain_do_not_count_for_sampling(api_token, tenant, chain, labels):
    _learning(tenant, BALANCED, chain, since=500)

    target = resolve_target(ctx_of(api_token), BALANCED)

    assert target.learning.uniform_labels == labels


@pytest.mark.parametrize(
    ("verdict", "settled"),
    [(None, False), (False, False), (True, True)],
    ids=["no verdict recorded", "a label still pays", "a label would not pay"],
)
def test_a_settled_guarantee_is_read_with_the_target(api_token, tenant, verdict, settled):
    accepting_version(tenant, profile=BALANCED, chain=DEMO, settled=verdict)

    target = resolve_target(ctx_of(api_token), BALANCED)

    assert target.learning.version_id is not None
    assert target.learning.settled is settled


def test_cold_start_is_never_settled(api_token):
    assert resolve_target(ctx_of(api_token), BALANCED).learning.settled is False


def test_a_learning_preset_resolves_in_one_query(api_token, tenant, django_assert_num_queries):
    accepting_version(tenant, profile=BALANCED, chain=DEMO)
    ctx = ctx_of(api_token)
    resolve_target(ctx, BALANCED)  # parses the version once per process

    with django_assert_num_queries(1):
        target = resolve_target(ctx, BALANCED)

    assert target.learning.version_id is not None


async def test_a_learned_calibration_serves_drafts(api_token, tenant):
    await sync_to_async(accepting_version)(tenant, profile=BALANCED, chain=DEMO)

    response = await post(api_token.raw, chat(BALANCED, "What is 12 + 30?"))

    assert response["x-cascade-model"] == "demo/small"


# --- refits: promotion refused, promotion accepted ---------------------------------------------


def _learning(tenant, profile, chain, since=0):
    return ProfileLearning.objects.create(
        tenant=tenant,
        profile=profile,
        chain_key=chain_key(chain),
        uniform_labels=since,
        labels_since_refit=since,
    )


# (verdicts, features): labels that certify nothing that serves a draft
REFUSED = {
    "every draft worse, all alike": ([Verdict.WORSE] * 400, [ALIKE] * 400),
    "mostly worse, indistinguishable": (
        [Verdict.WORSE] * 300 + [Verdict.AS_GOOD] * 100,
        [GOOD] * 400,
    ),
    "too few labels to test": ([Verdict.AS_GOOD] * 40, None),
}


@pytest.mark.parametrize("case", list(REFUSED))
def test_a_refit_whose_bound_fails_is_stored_but_not_promoted(tenant, case):
    verdicts, features = REFUSED[case]
    store_observations(tenant, BALANCED, TWO, verdicts, features=features)
    _learning(tenant, BALANCED, TWO, since=len(verdicts))

    version = profile_refit(tenant_id=tenant.pk, profile=BALANCED)

    assert (version.version, version.active, version.promoted_at) == (1, False, None)
    # Whatever passed (if anything) escalates every draft: the cold start again.
    assert not version.certified or version.evidence["held_out_acceptance"] == 0
    assert version.calibration["meta"]["learned"] is True
    state = ProfileLearning.objects.get()
    assert (state.active_version, state.labels_since_refit) == (None, 0)
    assert state.labels_at_refit == len(verdicts)
    assert not AuditEvent.objects.filter(action__startswith="calibration").exists()


def test_a_refit_whose_bound_holds_is_promoted(tenant):
    verdicts = [Verdict.AS_GOOD] * 250 + [Verdict.WORSE] * 150
    store_observations(tenant, BALANCED, TWO, verdicts)
    _learning(tenant, BALANCED, TWO, since=400)

    version = profile_refit(tenant_id=tenant.pk, profile=BALANCED)

    assert (version.certified, version.active) == (True, True)
    evidence = version.evidence
    assert evidence["retention_lower_bound"] >= 0.95
    assert evidence["target_retention"] == 0.95
    assert 0 < len(evidence["score_reference"]) <= evidence["n_held_out"]
    assert ProfileLearning.objects.get().active_version == version
    event = AuditEvent.objects.get(action="calibration.promote")
    assert (event.target, event.data["version"], event.data["previous"]) == (BALANCED, 1, None)


# (the profile's requests of the last day, an audit's cost over a request's baseline,
# settled): a month of traffic is 30 such days
ECONOMICS = {
    "no traffic: audits stay at the full rate": (0, 2.0, None),
    "one request a day, an audit at twice a request: a label does not pay": (1, 2.0, True),
    "forty requests a day, audits nearly free: labels still pay": (40, 0.001, False),
}


@pytest.mark.parametrize("case", list(ECONOMICS))
def test_a_refit_weighs_one_more_label_against_the_profiles_traffic(tenant, case):
    requests, audit_cost, settled = ECONOMICS[case]
    now = datetime(2026, 11, 20, tzinfo=UTC)
    # Drafts whose chance of being worse falls with their log-probabilities: every later
    # rule of the sequence serves a few more worse drafts, so labels have value.
    rng = random.Random(0)
    means = [-2.5 * i / 400 for i in range(400)]
    verdicts = [Verdict.WORSE if rng.random() < 0.3 * -m else Verdict.AS_GOOD for m in means]
    features = [{**GOOD, "lp_mean": m} for m in means]
    store_observations(tenant, BALANCED, TWO, verdicts, features=features)
    Audit.objects.update(cost_nanos=int(audit_cost * 1_000_000))
    ledger = [
        UsageEventFactory.build(
            tenant=tenant,
            profile=BALANCED,
            created_at=now - timedelta(hours=1 + i % 20),
            baseline_cost_nanos=1_000_000,
        )
        for i in range(requests)
    ]
    ledger += [  # none of these counts: a day and more ago, another profile, an audit
        UsageEventFactory.build(tenant=tenant, profile=BALANCED, created_at=at, kind=kind)
        for at, kind in [
            (now - timedelta(days=1, minutes=1), UsageKind.REQUEST),
            (now - timedelta(days=3), UsageKind.REQUEST),
            (now - timedelta(hours=2), UsageKind.AUDIT),
        ]
    ] + [UsageEventFactory.build(tenant=tenant, profile="cascade/other", created_at=now)]
    UsageEvent.objects.bulk_create(ledger)
    _learning(tenant, BALANCED, TWO, since=400)

    version = profile_refit(tenant_id=tenant.pk, profile=BALANCED, now=now)

    assert version.certified
    audits = version.evidence.get("audits")
    if settled is None:
        assert audits is None
    else:
        assert audits["horizon_requests"] == 30 * requests
        assert audits["label_cost_requests"] == pytest.approx(audit_cost)
        assert audits["settled"] is settled
        assert version.evidence["acceptance_per_label"] > 0
    assert learning.settled(version.calibration["meta"]) is bool(settled)  # what the gateway reads


def test_too_few_labels_certify_nothing(tenant):
    store_observations(tenant, BALANCED, TWO, [Verdict.AS_GOOD] * 40)
    _learning(tenant, BALANCED, TWO, since=40)

    version = profile_refit(tenant_id=tenant.pk, profile=BALANCED)

    assert version.certified is False
    assert "uniform labels" in version.evidence["reason"]


def test_labels_of_another_chain_are_not_refitted_on(tenant):
    store_observations(tenant, BALANCED, DEMO[:2], [Verdict.AS_GOOD] * 400, prefix="old")
    _learning(tenant, BALANCED, TWO, since=1)

    assert profile_refit(tenant_id=tenant.pk, profile=BALANCED) is None


def test_the_25th_uniform_label_triggers_a_refit(tenant):
    from routing.audits import _count_label

    store_observations(tenant, BALANCED, TWO, [Verdict.AS_GOOD] * REFIT_EVERY)
    due = [_count_label(audit, timezone.now()) for audit in Audit.objects.order_by("id")]

    assert due == [False] * (REFIT_EVERY - 1) + [True]
    state = ProfileLearning.objects.get()
    assert (state.uniform_labels, state.labels_since_refit) == (REFIT_EVERY, REFIT_EVERY)


def test_a_refit_already_running_is_not_run_twice(tenant):
    store_observations(tenant, BALANCED, TWO, [Verdict.AS_GOOD] * 30)
    state = _learning(tenant, BALANCED, TWO, since=30)
    ProfileLearning.objects.filter(pk=state.pk).update(
        refitting_until=timezone.now() + timedelta(minutes=5)
    )

    assert profile_refit(tenant_id=tenant.pk, profile=BALANCED) is None
    assert not CalibrationVersion.objects.exists()


# --- promotion and rollback --------------------------------------------------------------------


def test_rollback_reactivates_an_earlier_version(tenant):
    first = accepting_version(tenant, profile=BALANCED, chain=DEMO, number=1)
    second = accepting_version(tenant, profile=BALANCED, chain=DEMO, number=2)

    rolled = calibration_rollback(tenant=tenant, profile="balanced", version=1)

    assert rolled.pk == first.pk
    assert list(CalibrationVersion.objects.filter(active=True)) == [first]
    second.refresh_from_db()
    assert second.active is False
    assert ProfileLearning.objects.get().active_version == first
    event = AuditEvent.objects.get(action="calibration.rollback")
    assert (event.data["version"], event.data["previous"]) == (1, 2)


def test_rollback_to_the_active_version_changes_nothing(tenant):
    accepting_version(tenant, profile=BALANCED, chain=DEMO, number=1)

    calibration_rollback(tenant=tenant, profile=BALANCED, version=1)

    assert not AuditEvent.objects.filter(action="calibration.rollback").exists()


def test_an_uncertified_version_never_serves(tenant):
    version = CalibrationVersion.objects.create(
        tenant=tenant, profile=BALANCED, version=1, chain=DEMO, certified=False
    )

    with pytest.raises(CalibrationNotCertified):
        calibration_rollback(tenant=tenant, profile=BALANCED, version=1)
    with pytest.raises(CalibrationNotCertified):
        calibration_promote(version=version)
    assert not CalibrationVersion.objects.filter(active=True).exists()


def test_another_tenants_version_cannot_be_rolled_back_to(tenant, other_tenant):
    accepting_version(other_tenant, profile=BALANCED, chain=DEMO, number=1, promote=False)

    with pytest.raises(CalibrationVersion.DoesNotExist):
        calibration_rollback(tenant=tenant, profile=BALANCED, version=1)


# --- watching: measured retention and drift --------------------------------------------------


@pytest.fixture
def owner(tenant):
    user = user_get_or_create(email="owner@acme.test", password=None)
    Member.objects.create(tenant=tenant, user=user, role=MemberRole.OWNER)
    return user


def _served(tenant, version, losses):
    rows = [
        Audit(
            tenant=tenant,
            request_id=f"req_served_{i}",
            profile=version.profile,
            status="done",
            chain=version.chain,
            chain_key=chain_key(version.chain),
            reference_model=version.chain[-1],
            calibration_version=version,
            served_loss=loss,
        )
        for i, loss in enumerate(losses)
    ]
    Audit.objects.bulk_create(rows)


def _requests(tenant, version, probabilities, accepted):
    now = timezone.now()
    UsageEvent.objects.bulk_create(
        UsageEvent(
            tenant=tenant,
            request_id=f"req_recent_{i}",
            created_at=now,
            requested_model=version.profile,
            profile=version.profile,
            status="ok",
            attempts=[
                {
                    "model": version.chain[0],
                    "role": "draft",
                    "status": "ok",
                    "decision": "accepted" if accepted else "escalated",
                    "check": {"probability": p},
                }
            ],
        )
        for i, p in enumerate(probabilities)
    )


def _watched(tenant, **evidence):
    version = accepting_version(tenant, profile=BALANCED, chain=TWO)
    version.evidence = {**version.evidence, **evidence}
    version.save(update_fields=["evidence"])
    return version


# (audited losses, recent scores, recent accepted, alerts)
WATCH = {
    "all well": ([0.0] * 200, [0.8 + i / 1000 for i in range(100)], True, []),
    "retention below the target": ([1.0] * 30 + [0.0] * 70, [], True, ["retention"]),
    "too few audits to tell": ([1.0], [], True, []),
    "scores shifted": ([0.0] * 50, [0.1 + i / 1000 for i in range(100)], True, ["drift"]),
    "accepted share moved": ([0.0] * 50, [0.8 + i / 1000 for i in range(100)], False, ["drift"]),
}


@pytest.mark.parametrize("case", list(WATCH))
def test_quality_alerts(tenant, owner, mailoutbox, case):
    losses, scores, accepted, expected = WATCH[case]
    version = _watched(
        tenant, score_reference=[0.8 + i / 1000 for i in range(100)], held_out_acceptance=1.0
    )
    _served(tenant, version, losses)
    _requests(tenant, version, scores, accepted)

    raised = quality_check(tenant_id=tenant.pk, profile=BALANCED)

    assert sorted(a.kind for a in raised) == expected
    assert len(mailoutbox) == len(expected)
    for alert in raised:
        alert.refresh_from_db()
        assert alert.delivered_at is not None and alert.emailed_at is not None


def test_a_drift_alert_fires_once_per_version(tenant, owner, mailoutbox):
    version = _watched(
        tenant, score_reference=[0.8 + i / 1000 for i in range(100)], held_out_acceptance=1.0
    )
    _requests(tenant, version, [0.1 + i / 1000 for i in range(100)], True)

    first = quality_check(tenant_id=tenant.pk, profile=BALANCED)
    again = quality_check(tenant_id=tenant.pk, profile=BALANCED)
    profile_refit(tenant_id=tenant.pk, profile=BALANCED)  # the sweep's path, no new labels

    assert [a.kind for a in first] == [QualityAlertKind.DRIFT]
    assert again == []
    assert QualityAlert.objects.count() == 1
    assert [m.subject for m in mailoutbox] == [
        f"[CascadeFlow] {tenant.name}: {BALANCED} quality (drift)"
    ]
    assert first[0].details["psi"] >= calibrations.PSI_ALERT

    newer = accepting_version(tenant, profile=BALANCED, chain=TWO, number=2)
    newer.evidence = version.evidence
    newer.save(update_fields=["evidence"])
    UsageEvent.objects.update(created_at=timezone.now())  # served by the newer version
    assert [a.kind for a in quality_check(tenant_id=tenant.pk, profile=BALANCED)] == ["drift"]


def test_requests_before_the_promotion_are_not_drift(tenant):
    version = _watched(
        tenant, score_reference=[0.8 + i / 1000 for i in range(100)], held_out_acceptance=1.0
    )
    _requests(tenant, version, [0.1] * 100, True)
    UsageEvent.objects.update(created_at=version.promoted_at - timedelta(minutes=1))

    assert quality_check(tenant_id=tenant.pk, profile=BALANCED) == []


def test_no_active_version_nothing_to_watch(tenant):
    assert quality_check(tenant_id=tenant.pk, profile=BALANCED) == []


def test_a_learned_calibration_survives_the_bad_features_it_was_fitted_on(tenant):
    # The scorers learn which drafts to accept: good features pass, bad ones do not.
    verdicts = [Verdict.AS_GOOD] * 250 + [Verdict.WORSE] * 150
    store_observations(tenant, BALANCED, TWO, verdicts)
    _learning(tenant, BALANCED, TWO, since=400)
    version = profile_refit(tenant_id=tenant.pk, profile=BALANCED)

    from routing.engine.policy import Calibration

    calibration = Calibration.from_json(version.calibration)
    step = calibration.steps[0]
    assert step.scorer.probability(GOOD) >= step.threshold > step.scorer.probability(BAD)


def test_a_quality_alert_raised_while_the_broker_is_down_is_sent_by_the_sweeper_once(
    tenant, owner, mailoutbox
):
    from routing.tasks import quality_alerts_sweep

    version = _watched(tenant, score_reference=[0.9] * 100, held_out_acceptance=1.0)
    _requests(tenant, version, [0.1] * 100, True)
    with broker_down() as refused:
        [alert] = quality_check(tenant_id=tenant.pk, profile=BALANCED)
    assert refused == ["routing.tasks.quality_alerts_deliver"]
    assert mailoutbox == []

    assert quality_alerts_sweep() == 0  # its message may still be queued
    QualityAlert.objects.update(created_at=timezone.now() - outbox.GRACE - timedelta(minutes=1))
    assert quality_alerts_sweep() == 1
    assert quality_alerts_sweep() == 0

    alert.refresh_from_db()
    assert (alert.delivered_at is not None, alert.attempts) == (True, 1)
    assert [m.to for m in mailoutbox] == [["owner@acme.test"]]
