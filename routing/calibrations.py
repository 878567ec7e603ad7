"""A profile's learned calibrations: refits, promotion, rollback, and watching them hold.

``profile_refit`` fits a new ``CalibrationVersion`` on the profile's audits
(``routing.engine.learning.refit``: Learn then Test at the preset's target
retention, confidence ``CONFIDENCE``) and promotes it when it is certified (and
serves drafts at all: one that escalates every draft is the cold start again). It
runs when a profile has gathered enough new uniform labels (``routing.audits``)
and from beat's sweep, which also has every active version checked:

- **measured retention**: the served answers of the uniform audits of requests
  the version decided, against the reference (``learning.measured_retention``);
  the version no longer holds when the interval's upper bound is below the target;
- **drift**: the first draft's quality scores of recent requests against the
  held-out scores the version was certified on (``learning.population_stability``,
  0.2 and above), or the share of requests served by a draft moving more than 15
  points away from the held-out share.

Either raises a ``QualityAlert``, once per version and kind, delivered like
budget alerts (email to owners and admins, the tenant's signed webhook).

Invariants: at most one active version per (tenant, profile), a certified one,
named by ``ProfileLearning.active_version``; promotions of one profile are
serialised on its learning row; every promotion and rollback writes an audit
event in its transaction.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from django.contrib.auth.models import AbstractBaseUser
from django.db import transaction
from django.db.models import F, Max, Q
from django.utils import timezone

from core import outbox
from routing.engine import learning
from routing.engine.policy import PRESETS
from routing.enums import AuditKind, AuditStatus, QualityAlertKind
from routing.models import Audit, CalibrationVersion, ProfileLearning, QualityAlert, RoutingProfile
from routing.selectors import (
    CONFIDENCE,
    PROFILE_PREFIX,
    audit_economics,
    profile_full_name,
    recent_drafts,
    served_losses,
)
from tenants.alerts import AlertKind
from tenants.models import Tenant
from tenants.services import audit_record

logger = logging.getLogger(__name__)

REFIT_LEASE = timedelta(minutes=15)  # longer than the refit task's time limit
SWEEP_REFIT_AFTER = timedelta(hours=1)  # a profile with new labels is refitted at least this often
MAX_UNIFORM = 20_000  # the most recent labels a refit reads
MAX_NONUNIFORM = 5_000
SCORE_SAMPLE = 2_000  # held-out scores kept as the drift reference
PSI_ALERT = 0.2
ACCEPTED_SHIFT = 0.15
MIN_RECENT = 50  # requests needed before the accepted share is compared


class CalibrationNotCertified(ValueError):
    """Only a certified version may serve requests."""


# --- promotion and rollback --------------------------------------------------------------


@transaction.atomic
def calibration_promote(
    *,
    version: CalibrationVersion,
    acting_user: AbstractBaseUser | None = None,
    reason: str = "promote",
) -> CalibrationVersion:
    """Make ``version`` the one its profile's requests run (certified versions only).

    Audited as ``calibration.<reason>`` (``promote``, ``rollback``)."""
    if not version.certified:
        raise CalibrationNotCertified(f"Version {version.version} is not certified.")
    state, _ = ProfileLearning.objects.select_for_update().get_or_create(
        tenant_id=version.tenant_id, profile=version.profile
    )
    previous = (
        CalibrationVersion.objects.filter(pk=state.active_version_id)
        .values_list("version", flat=True)
        .first()
    )
    now = timezone.now()
    # Deactivate first: the database holds at most one active version per profile.
    CalibrationVersion.objects.filter(
        tenant_id=version.tenant_id, profile=version.profile, active=True
    ).exclude(pk=version.pk).update(active=False)
    CalibrationVersion.objects.filter(pk=version.pk).update(active=True, promoted_at=now)
    version.active, version.promoted_at = True, now
    state.active_version = version
    state.save(update_fields=["active_version", "updated_at"])
    evidence = version.evidence or {}
    audit_record(
        tenant=Tenant(pk=version.tenant_id),
        action=f"calibration.{reason}",
        target=version.profile,
        acting_user=acting_user,
        data={
            "version": version.version,
            "previous": previous,
            "threshold": evidence.get("threshold"),
            "retention_lower_bound": evidence.get("retention_lower_bound"),
        },
    )
    return version


def calibration_rollback(
    *,
    tenant: Tenant,
    profile: str,
    version: int,
    acting_user: AbstractBaseUser | None = None,
) -> CalibrationVersion:
    """Serve an earlier certified version again (until the next certified refit replaces it).

    Raises ``CalibrationVersion.DoesNotExist`` for a version the tenant's profile does not
    have, ``CalibrationNotCertified`` for one that never was.
    """
    found = CalibrationVersion.objects.get(
        tenant_id=tenant.pk, profile=profile_full_name(profile), version=version
    )
    if found.active:
        return found
    return calibration_promote(version=found, acting_user=acting_user, reason="rollback")


# --- refitting ---------------------------------------------------------------------------


def _preset(tenant_id: int, profile: str) -> str | None:
    short = profile.removeprefix(PROFILE_PREFIX)
    row = RoutingProfile.objects.filter(tenant_id=tenant_id, name=short).first()
    preset = row.preset if row is not None else short
    return preset if preset in PRESETS else None


def profile_observations(*, tenant_id: int, profile: str, key: str) -> list[learning.Observation]:
    """The profile's labels of one chain: its latest uniform and non-uniform ones."""
    done = Audit.objects.filter(
        tenant_id=tenant_id, profile=profile, chain_key=key, status=AuditStatus.DONE
    ).exclude(observation=None)
    rows = [
        *done.filter(kind=AuditKind.AUDIT)
        .order_by("-id")
        .values_list("observation", flat=True)[:MAX_UNIFORM],
        *done.exclude(kind=AuditKind.AUDIT)
        .order_by("-id")
        .values_list("observation", flat=True)[:MAX_NONUNIFORM],
    ]
    return [learning.observation_from_json(row) for row in rows]


def _held_out_scores(rule: learning.Rule, observations: list[learning.Observation]) -> list[float]:
    """The first draft's scores on the held-out labels the rule was tested on (what recent
    requests' scores are compared with to detect drift)."""
    scores = []
    for obs in observations:
        if not obs.held_out or not obs.steps:
            continue
        if rule.router is not None and rule.router.skips(dict(obs.pre)):
            continue
        first = obs.steps[0]
        if first.hard_fail or not first.features:
            continue
        scores.append(round(rule.scorers[0].probability(dict(first.features)), 4))
    return scores[:SCORE_SAMPLE]


def _refit(state: ProfileLearning, now: datetime) -> CalibrationVersion | None:
    preset = _preset(state.tenant_id, state.profile)
    chain = (
        Audit.objects.filter(
            tenant_id=state.tenant_id, profile=state.profile, chain_key=state.chain_key
        )
        .order_by("-id")
        .values_list("chain", flat=True)
        .first()
    )
    if preset is None or not chain or len(chain) < 2:
        return None
    observations = profile_observations(
        tenant_id=state.tenant_id, profile=state.profile, key=state.chain_key
    )
    uniform = sum(o.uniform for o in observations)
    result = learning.refit(
        observations,
        chain_length=len(chain),
        target_retention=PRESETS[preset].target_retention,
        confidence=CONFIDENCE,
        economics=audit_economics(tenant_id=state.tenant_id, profile=state.profile, now=now),
    )
    evidence: dict[str, Any] = {
        **result.evidence,
        "score_reference": _held_out_scores(result.rule, observations),
    }
    # A certified policy that serves no draft is the cold start again: nothing to promote.
    promote = result.certified and bool(result.evidence.get("held_out_acceptance"))
    if result.certified and not promote:
        evidence["not_promoted"] = "the certified policy serves no draft"
    with transaction.atomic():
        ProfileLearning.objects.select_for_update().get(pk=state.pk)
        latest = CalibrationVersion.objects.filter(
            tenant_id=state.tenant_id, profile=state.profile
        ).aggregate(n=Max("version"))["n"]
        version = CalibrationVersion.objects.create(
            tenant_id=state.tenant_id,
            profile=state.profile,
            version=(latest or 0) + 1,
            chain=list(chain),
            calibration=result.rule.calibration(result.evidence).to_json(),
            evidence=evidence,
            uniform_labels=uniform,
            nonuniform_labels=sum(not o.uniform and learning.labelled(o) for o in observations),
            certified=result.certified,
            created_at=now,
        )
        if promote:
            calibration_promote(version=version, reason="promote")
    return version


def profile_refit(
    *, tenant_id: int, profile: str, now: datetime | None = None
) -> CalibrationVersion | None:
    """Refit a profile that has new labels (promoting what is certified), then check the
    active version still holds. Returns the new version, if one was made.

    One refit of a profile at a time (a lease on its learning row); another asked
    meanwhile returns at once, and the labels it would have used wait for the next.
    """
    now = now or timezone.now()
    rows = ProfileLearning.objects.filter(tenant_id=tenant_id, profile=profile)
    if not rows.filter(Q(refitting_until__isnull=True) | Q(refitting_until__lt=now)).update(
        refitting_until=now + REFIT_LEASE
    ):
        return None
    version = None
    try:
        state = rows.get()
        consumed = state.labels_since_refit
        if consumed > 0:
            version = _refit(state, now)
            rows.update(
                labels_since_refit=F("labels_since_refit") - consumed,
                labels_at_refit=state.uniform_labels,
                last_refit_at=now,
            )
        quality_check(tenant_id=tenant_id, profile=profile)
    finally:
        rows.update(refitting_until=None)
    return version


def profiles_to_refit(*, now: datetime, limit: int = 1000) -> list[tuple[int, str]]:
    """Profiles the sweep refits or checks: new labels and no refit for a while, or an
    active version to watch."""
    stale = Q(last_refit_at__isnull=True) | Q(last_refit_at__lt=now - SWEEP_REFIT_AFTER)
    return list(
        ProfileLearning.objects.filter(
            (Q(labels_since_refit__gt=0) & stale) | Q(active_version__isnull=False)
        )
        .filter(Q(refitting_until__isnull=True) | Q(refitting_until__lt=now))
        .order_by("pk")
        .values_list("tenant_id", "profile")[:limit]
    )


# --- watching: measured retention and drift ----------------------------------------------


@dataclass(frozen=True)
class QualityFindings:
    measured: learning.Measured | None
    target_retention: float | None
    psi: float
    accepted_share: float | None
    reference_accepted_share: float | None
    recent_requests: int

    @property
    def retention_fails(self) -> bool:
        return (
            self.measured is not None
            and self.target_retention is not None
            and self.measured.upper < self.target_retention
        )

    @property
    def drifted(self) -> bool:
        shift = (
            abs(self.accepted_share - self.reference_accepted_share)
            if self.accepted_share is not None
            and self.reference_accepted_share is not None
            and self.recent_requests >= MIN_RECENT
            else 0.0
        )
        return self.psi >= PSI_ALERT or shift > ACCEPTED_SHIFT


def quality_findings(*, version: CalibrationVersion) -> QualityFindings:
    evidence = version.evidence or {}
    measured = learning.measured_retention(
        served_losses(tenant_id=version.tenant_id, profile=version.profile, version_id=version.pk),
        CONFIDENCE,
    )
    recent = recent_drafts(
        tenant_id=version.tenant_id,
        profile=version.profile,
        first_model=version.chain[0] if version.chain else "",
        since=version.promoted_at or version.created_at,
    )
    return QualityFindings(
        measured=measured,
        target_retention=evidence.get("target_retention"),
        psi=round(
            learning.population_stability(evidence.get("score_reference") or [], recent.scores), 4
        ),
        accepted_share=recent.accepted_share,
        reference_accepted_share=evidence.get("held_out_acceptance"),
        recent_requests=recent.requests,
    )


def quality_check(*, tenant_id: int, profile: str) -> list[QualityAlert]:
    """Raise the alerts the profile's active version deserves (each once); the new ones."""
    state = (
        ProfileLearning.objects.filter(tenant_id=tenant_id, profile=profile)
        .select_related("active_version")
        .first()
    )
    if state is None or state.active_version is None:
        return []
    version = state.active_version
    found = quality_findings(version=version)
    raised = []
    if found.retention_fails:
        assert found.measured is not None
        raised.append(
            _alert(
                version,
                QualityAlertKind.RETENTION,
                {
                    "target_retention": found.target_retention,
                    "measured_retention": round(found.measured.retention, 4),
                    "lower": round(found.measured.lower, 4),
                    "upper": round(found.measured.upper, 4),
                    "audits": found.measured.n,
                },
            )
        )
    if found.drifted:
        raised.append(
            _alert(
                version,
                QualityAlertKind.DRIFT,
                {
                    "psi": found.psi,
                    "accepted_share": found.accepted_share,
                    "reference_accepted_share": found.reference_accepted_share,
                    "recent_requests": found.recent_requests,
                },
            )
        )
    return [alert for alert in raised if alert is not None]


def _alert(version: CalibrationVersion, kind: str, details: dict[str, Any]) -> QualityAlert | None:
    from routing.tasks import quality_alerts_deliver  # noqa: PLC0415 - routing.tasks imports this module

    with transaction.atomic():
        alert, created = QualityAlert.objects.get_or_create(
            version=version,
            kind=kind,
            defaults={
                "tenant_id": version.tenant_id,
                "profile": version.profile,
                "details": details,
            },
        )
        if created:
            transaction.on_commit(lambda: outbox.send_soon(quality_alerts_deliver, [alert.pk]))
    return alert if created else None


def quality_alert_text(alert: QualityAlert) -> tuple[str, str]:
    version = alert.version
    subject = f"[CascadeFlow] {alert.tenant.name}: {alert.profile} quality ({alert.kind})"
    if alert.kind == QualityAlertKind.RETENTION:
        d = alert.details
        what = (
            f"Audits measured a retention of {d.get('measured_retention')} "
            f"(at most {d.get('upper')}, from {d.get('audits')} audits) for calibration "
            f"version {version.version}, below its target of {d.get('target_retention')}."
        )
    else:
        d = alert.details
        what = (
            f"Requests to {alert.profile} no longer look like those calibration version "
            f"{version.version} was certified on: score shift (PSI) {d.get('psi')}, "
            f"drafts accepted {d.get('accepted_share')} against "
            f"{d.get('reference_accepted_share')} when it was certified."
        )
    body = (
        f"{what}\n\nCascadeFlow keeps auditing and refitting; roll back to an earlier "
        f"version with POST /api/v1/profiles/<name>/calibrations/<version>/rollback/.\n"
    )
    return subject, body


def quality_alert_payload(alert: QualityAlert) -> dict[str, Any]:
    return {
        "type": f"quality.{alert.kind}",
        "alert_id": alert.pk,
        "tenant": alert.tenant.slug,
        "profile": alert.profile,
        "version": alert.version.version,
        "details": alert.details,
        "created_at": alert.created_at.isoformat(),
    }


QUALITY_ALERTS = AlertKind(
    QualityAlert, quality_alert_text, quality_alert_payload, "Quality alert", ("tenant", "version")
)
