"""Calibrating a whole chain from labelled drafts.

Input: for each calibration query, what every model of the chain answered
(its quality in [0, 1], its cost, the engine's signals on it). Output: a
``Calibration`` with one decision rule per escalation step.

Steps are calibrated from the strongest end backwards: the outcome of
escalating from step ``i`` is the (already calibrated) cascade from ``i + 1``.
Each step's threshold is the cheapest whose bootstrap lower bound on
retention (quality kept as a share of the strongest model's) meets the
target, scored on out-of-fold probabilities. For chains of three or more
models the last step may be held to a stricter target, leaving the earlier
steps room; the combination that saves most while meeting the target wins.

Paid checks are used only where calibration shows they pay for themselves:
a step compares "free signals only" with "every draft gets the paid checks
(their cost counted)" and keeps the cheaper one that meets the target.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

from routing.engine.calibration import (
    Outcome,
    Scorer,
    ThresholdChoice,
    auroc,
    choose_threshold,
    fit_scorer,
    out_of_fold,
)
from routing.engine.policy import Calibration, StepCalibration


@dataclass
class StepObservation:
    quality: float
    cost_nanos: int  # the answer's cost (paid checks excluded)
    features: dict[str, float] = field(default_factory=dict)  # free signals
    paid_features: dict[str, float] | None = None  # free + paid signals, when paid checks ran
    paid_cost_nanos: int = 0
    hard_fail: bool = False
    margin: float = 0.0  # the policy's domain margin for this query


@dataclass
class RowObservation:
    steps: list[StepObservation]  # one per chain model; the last is the strongest


@dataclass
class StepReport:
    mode: str
    choice: ThresholdChoice
    auroc: float | None
    n: int


def acceptable(draft: float, reference: float, graded: bool) -> float:
    """Label: is the draft as good as the strongest model's answer?"""
    if graded:
        return 1.0 if draft >= reference - 0.05 else 0.0
    return 1.0 if draft >= 0.5 else 0.0


def _scores(
    rows: Sequence[RowObservation], index: int, paid: bool, graded: bool
) -> tuple[list[float], Scorer]:
    """Out-of-fold scores (probability - margin; hard fails -1) and a scorer fitted on all."""
    usable = [i for i, r in enumerate(rows) if not r.steps[index].hard_fail]
    feats = [
        (rows[i].steps[index].paid_features if paid else rows[i].steps[index].features) or {}
        for i in usable
    ]
    labels = [
        acceptable(rows[i].steps[index].quality, rows[i].steps[-1].quality, graded) for i in usable
    ]
    scores = [-1.0] * len(rows)
    if len(set(labels)) < 2 or len(usable) < 10:
        scorer = Scorer()
        for i, f in zip(usable, feats, strict=True):
            scores[i] = scorer.probability(f) - rows[i].steps[index].margin
        return scores, scorer
    oof = out_of_fold(feats, labels)
    for i, p in zip(usable, oof, strict=True):
        scores[i] = p - rows[i].steps[index].margin
    return scores, fit_scorer(feats, labels)


def _outcomes(
    rows: Sequence[RowObservation], index: int, sub: list[tuple[float, int]], paid: bool
) -> list[Outcome]:
    out = []
    for row, (sub_quality, sub_cost) in zip(rows, sub, strict=True):
        step = row.steps[index]
        out.append(
            Outcome(
                draft_quality=step.quality,
                draft_cost=step.cost_nanos + (step.paid_cost_nanos if paid else 0),
                escalated_quality=sub_quality,
                escalated_cost=sub_cost,
                reference_quality=row.steps[-1].quality,
                reference_cost=row.steps[-1].cost_nanos,
            )
        )
    return out


def _calibrate_step(
    rows: Sequence[RowObservation],
    index: int,
    sub: list[tuple[float, int]],
    *,
    target: float,
    confidence: float,
    graded: bool,
    allow_paid: bool,
) -> tuple[StepCalibration, list[tuple[float, int]], StepReport]:
    options = []
    modes = ["free"]
    if allow_paid and rows and all(r.steps[index].paid_features is not None for r in rows):
        modes.append("always")
    for mode in modes:
        paid = mode == "always"
        scores, scorer = _scores(rows, index, paid, graded)
        outcomes = _outcomes(rows, index, sub, paid)
        choice = choose_threshold(scores, outcomes, target_retention=target, confidence=confidence)
        positives = [
            acceptable(r.steps[index].quality, r.steps[-1].quality, graded) > 0.5 for r in rows
        ]
        options.append((mode, scores, scorer, outcomes, choice, auroc(scores, positives)))
    met = [o for o in options if o[4].met_target] or options[:1]
    mode, scores, scorer, outcomes, choice, area = max(met, key=lambda o: o[4].saving)
    paid = mode == "always"
    step = StepCalibration(
        scorer=Scorer() if paid else scorer,
        threshold=choice.threshold,
        paid_mode=mode,
        paid_kinds=("self_verify",) if paid else (),
        paid_scorer=scorer if paid else None,
        paid_threshold=choice.threshold if paid else None,
        stats={
            "n": len(rows),
            "target_retention": target,
            "confidence": confidence,
            "train_retention": round(choice.retention, 4),
            "train_retention_lower_bound": round(choice.retention_lower, 4),
            "train_saving": round(choice.saving, 4),
            "train_escalation_rate": round(choice.escalation_rate, 4),
            "met_target": choice.met_target,
            "auroc": round(area, 4) if area is not None else None,
        },
    )
    new_sub = []
    for s, o in zip(scores, outcomes, strict=True):
        if s >= choice.threshold:
            new_sub.append((o.draft_quality, int(o.draft_cost)))
        else:
            new_sub.append((o.escalated_quality, int(o.draft_cost + o.escalated_cost)))
    return step, new_sub, StepReport(mode, choice, area, len(rows))


def calibrate_chain(
    rows: Sequence[RowObservation],
    *,
    target_retention: float,
    graded: bool,
    confidence: float = 0.9,
    allow_paid: bool = True,
) -> Calibration:
    if not rows:
        return Calibration()
    length = len(rows[0].steps)
    if length < 2:
        return Calibration(meta={"target_retention": target_retention})
    last_targets = [target_retention]
    if length >= 3:
        last_targets = [
            min(1.0, round(target_retention + k * 0.01, 4))
            for k in range(0, int((1 - target_retention) * 100) + 2)
        ]
    best: tuple[float, list[StepCalibration]] | None = None
    for last_target in last_targets:
        sub = [(r.steps[-1].quality, r.steps[-1].cost_nanos) for r in rows]
        steps: list[StepCalibration] = []
        for index in range(length - 2, -1, -1):
            target = last_target if index == length - 2 else target_retention
            step, sub, _ = _calibrate_step(
                rows,
                index,
                sub,
                target=target,
                confidence=confidence,
                graded=graded,
                allow_paid=allow_paid,
            )
            steps.insert(0, step)
        reference_cost = sum(r.steps[-1].cost_nanos for r in rows)
        saving = 1 - sum(c for _, c in sub) / reference_cost if reference_cost else 0.0
        meets = all(s.stats["met_target"] for s in steps)
        key = saving if meets else saving - 10
        if best is None or key > best[0]:
            best = (key, steps)
    assert best is not None
    return Calibration(
        steps=best[1],
        meta={
            "target_retention": target_retention,
            "confidence": confidence,
            "graded": graded,
            "n": len(rows),
            "chain_length": length,
        },
    )
