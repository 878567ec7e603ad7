import random

from routing.engine.calibration import (
    Outcome,
    Scorer,
    auroc,
    choose_threshold,
    fit_scorer,
    out_of_fold,
)
from routing.engine.policy import Calibration, StepCalibration


def synthetic(n=400, seed=3):
    rng = random.Random(seed)
    rows, labels = [], []
    for _ in range(n):
        good = rng.random() < 0.6
        rows.append(
            {
                "lp_mean": (-0.1 if good else -1.0) + rng.gauss(0, 0.3),
                "hedge": float(rng.random() < (0.1 if good else 0.4)),
            }
        )
        labels.append(1.0 if good else 0.0)
    return rows, labels


def test_fit_learns_the_direction_and_separates():
    rows, labels = synthetic()

    scorer = fit_scorer(rows, labels)
    probs = [scorer.probability(r) for r in rows]

    assert scorer.weights["lp_mean"] > 0
    assert scorer.weights["hedge"] < 0
    assert auroc(probs, [y > 0.5 for y in labels]) > 0.85


def test_out_of_fold_is_not_better_than_in_sample():
    rows, labels = synthetic(120)
    in_sample = fit_scorer(rows, labels)

    oof = out_of_fold(rows, labels)

    positives = [y > 0.5 for y in labels]
    assert (
        auroc(oof, positives) <= auroc([in_sample.probability(r) for r in rows], positives) + 1e-9
    )


def test_threshold_meets_the_lower_bound_and_is_the_cheapest_that_does():
    rng = random.Random(5)
    probs, outcomes = [], []
    for _ in range(500):
        good = rng.random() < 0.7
        probs.append(min(max((0.75 if good else 0.35) + rng.gauss(0, 0.15), 0), 1))
        outcomes.append(Outcome(1.0 if good else 0.0, 1, 0.95, 20, 0.95, 20))

    choice = choose_threshold(probs, outcomes, target_retention=0.95, confidence=0.9)
    loose = choose_threshold(probs, outcomes, target_retention=0.95, confidence=0.5)

    assert choice.met_target
    assert choice.retention_lower >= 0.95
    assert choice.retention >= choice.retention_lower
    assert loose.saving >= choice.saving  # a weaker guarantee never costs more


def test_when_no_draft_can_be_kept_everything_escalates():
    outcomes = [Outcome(0.0, 1, 1.0, 10, 1.0, 10)] * 50

    choice = choose_threshold([0.9] * 50, outcomes, target_retention=0.99)

    assert choice.met_target
    assert choice.threshold > 1
    assert choice.escalation_rate == 1.0


def test_auroc_edge_cases():
    assert auroc([0.1, 0.9], [False, True]) == 1.0
    assert auroc([0.5, 0.5], [False, True]) == 0.5
    assert auroc([0.5], [True]) is None


def test_calibration_round_trips_through_json():
    calibration = Calibration(
        steps=[
            StepCalibration(
                scorer=Scorer(weights={"lp_mean": 2.0}, bias=0.3),
                threshold=0.71,
                paid_mode="always",
                paid_kinds=("self_verify",),
                paid_scorer=Scorer(),
                paid_threshold=0.6,
                stats={"n": 10},
            )
        ],
        meta={"target_retention": 0.95},
    )

    again = Calibration.from_json(calibration.to_json())

    assert again.to_json() == calibration.to_json()
    assert again.steps[0].scorer.probability({"lp_mean": -0.5}) == calibration.steps[
        0
    ].scorer.probability({"lp_mean": -0.5})
