"""Learning from audits: the guarantee holds at its stated rate, and refuses what it cannot prove.

The synthetic world: each draft has one signal ``x``; the chance that it is as
good as the reference rises with ``x``; when it is not, it is worse (70 %) or
better (30 %). The true mean loss of any threshold rule is computed on a large
fresh sample of the same world, so each promotion can be checked against the
truth.
"""

import math
import random

import numpy as np
import pytest

from routing.engine import learning
from routing.engine.calibration import Scorer
from routing.engine.learning import (
    NEVER,
    Observation,
    Rule,
    StepLabel,
    Verdict,
    audit_rate,
    measured_retention,
    net_loss_upper_bound,
    population_stability,
    refit,
)


def world(rng: random.Random, n: int, *, shift: float = 0.0) -> list[Observation]:
    out = []
    for i in range(n):
        x = rng.gauss(shift, 1.0)
        good = 1 / (1 + math.exp(-(1.6 * x + 0.6)))
        u = rng.random()
        if u < good:
            verdict = Verdict.AS_GOOD
        elif u < good + (1 - good) * 0.7:
            verdict = Verdict.WORSE
        else:
            verdict = Verdict.BETTER
        out.append(Observation(f"{rng.random():.12f}-{i}", (StepLabel({"lp_mean": x}, verdict),)))
    return out


def true_loss(rule: Rule, samples: int = 40_000, seed: int = 99) -> float:
    """The rule's mean loss in the world (exact expectation over x, Monte Carlo over x)."""
    x = np.random.default_rng(seed).normal(0.0, 1.0, samples)
    scorer = rule.scorers[0]
    probability = 1 / (1 + np.exp(-(scorer.bias + scorer.weights.get("lp_mean", 0.0) * x)))
    accepted = probability >= rule.threshold
    good = 1 / (1 + np.exp(-(1.6 * x + 0.6)))
    expected = (1 - good) * 0.7 - (1 - good) * 0.3  # P(worse) - P(better) given x
    return float(np.mean(np.where(accepted, expected, 0.0)))


PRIORS = {
    "the public prior": None,
    "a prior that knows the signal": Scorer(weights={"lp_mean": 1.6}, bias=0.6),
    "a prior that has it backwards": Scorer(weights={"lp_mean": -1.6}, bias=0.6),
}


@pytest.mark.parametrize("prior", PRIORS.values(), ids=PRIORS.keys())
def test_a_promoted_rule_keeps_its_loss_within_budget_at_the_stated_rate(prior):
    """Over many independent audit samples, the promoted rule's true loss exceeds the budget
    no more often than 1 - confidence (here 10 %), whichever family (the prior's, tested on
    every label, or the fitted one, on the held-out part) the rule came from."""
    budget, seeds = 0.05, 80  # confidence 0.9: the default
    violations = certified = 0
    families = []
    for seed in range(seeds):
        sample = world(random.Random(seed), 400)
        result = refit(
            sample,
            chain_length=2,
            target_retention=1 - budget,
            route=False,
            priors=None if prior is None else (prior,),
        )
        if not result.certified:
            continue
        certified += 1
        families.append(result.evidence["family"])
        violations += true_loss(result.rule) > budget
    assert certified >= seeds * 0.8  # it does promote: the world allows it
    # 10 % stated; allow Monte Carlo error (binomial sd ~ 3.4 % at 80 runs).
    print(f"\n{violations} of {certified} promotions over budget; families {set(families)}")
    assert violations / certified <= 0.1 + 0.07, (violations, certified)


def test_the_prior_family_is_tested_on_every_uniform_label():
    sample = world(random.Random(6), 400)
    prior = Scorer(weights={"lp_mean": 1.6}, bias=0.6)

    result = refit(sample, chain_length=2, target_retention=0.95, route=False, priors=(prior,))

    assert result.certified and result.evidence["family"] == "prior"
    assert result.evidence["n_tested_on"] == result.evidence["n_uniform"] == 400
    assert result.evidence["n_held_out"] < 400
    assert result.rule.scorers == (prior,)


def test_a_prior_with_the_signal_backwards_is_outdone_by_the_fitted_family():
    sample = world(random.Random(7), 600)
    backwards = Scorer(weights={"lp_mean": -1.6}, bias=0.6)

    result = refit(sample, chain_length=2, target_retention=0.95, route=False, priors=(backwards,))

    assert result.certified and result.evidence["family"] == "fitted"
    assert result.evidence["n_tested_on"] == result.evidence["n_held_out"]
    assert result.rule.scorers[0].weights["lp_mean"] > 0


def test_the_exact_bound_covers_the_true_mean_at_the_stated_rate():
    rng = np.random.default_rng(0)
    for n, worse, better in [(60, 0.05, 0.0), (200, 0.08, 0.03), (500, 0.1, 0.06)]:
        misses = 0
        for _ in range(100):
            draws = rng.choice([1, 0, -1], size=n, p=[worse, 1 - worse - better, better])
            bound = net_loss_upper_bound(
                int((draws == 1).sum()), int((draws == -1).sum()), n, delta=0.1
            )
            misses += bound < worse - better
        assert misses / 100 <= 0.1 + 0.06, (n, misses)


def test_promotion_is_refused_when_no_rule_can_be_proved():
    """Every draft is worse than the reference and the budget is 1 %: even the strictest
    candidate (the most confident 2.5 % of drafts) would exceed it."""
    rng = random.Random(3)
    sample = [
        Observation(f"bad-{i}", (StepLabel({"lp_mean": rng.gauss(0, 1)}, Verdict.WORSE),))
        for i in range(600)
    ]

    result = refit(sample, chain_length=2, target_retention=0.99, route=False)

    assert not result.certified
    assert result.rule.threshold == NEVER  # every request goes to the reference
    assert "bound" in result.evidence["reason"]


def test_too_few_held_out_labels_promote_nothing():
    result = refit(world(random.Random(1), 40), chain_length=2, target_retention=0.95)
    assert not result.certified and result.rule.threshold == NEVER
    assert result.evidence["n_held_out"] < learning.MIN_HELD_OUT


def test_labels_found_outside_the_uniform_sample_only_train():
    rng = random.Random(5)
    free = [
        Observation(o.key, o.steps, uniform=False) for o in world(rng, 300)
    ]  # e.g. requests that escalated anyway
    result = refit(free, chain_length=2, target_retention=0.95, route=False)
    assert result.evidence["n_held_out"] == 0 and result.evidence["n_fit"] == 300
    assert not result.certified


def chain_world(rng: random.Random, n: int) -> list[Observation]:
    """Three models: the first's signal is informative; the middle one's says nothing
    (accepting its drafts is a coin flip between as good and worse)."""
    sample = []
    for i in range(n):
        a, b = rng.gauss(0, 1), rng.gauss(0.5, 1)
        good_a = rng.random() < 1 / (1 + math.exp(-2 * a))
        verdict_a = Verdict.AS_GOOD if good_a else Verdict.WORSE
        verdict_b = rng.choice([Verdict.AS_GOOD, Verdict.WORSE])
        steps = (StepLabel({"lp_mean": a}, verdict_a), StepLabel({"lp_mean": b}, verdict_b))
        sample.append(Observation(f"{rng.random():.12f}-{i}", steps))
    return sample


def test_a_three_model_chain_holds_its_target_on_unseen_requests():
    """The rule is tested on what the whole chain serves: the middle step cannot pass on its
    own and fail as part of the chain. The prior reads the middle model's signal as it reads
    the first's; only the fitted family learns that it means nothing."""
    result = refit(
        chain_world(random.Random(8), 900), chain_length=3, target_retention=0.95, route=False
    )
    unseen = chain_world(random.Random(9), 20_000)

    assert result.certified
    loss = sum(result.rule.loss(o) for o in unseen) / len(unseen)
    assert loss <= 0.05
    served = [result.rule.served_step(o) for o in unseen]
    assert result.evidence["family"] == "fitted"
    assert served.count(0) > 0.15 * len(unseen)  # the informative step is used
    assert served.count(1) < 0.01 * len(unseen)  # the coin flip is not


def test_the_audit_rate_is_full_while_labels_are_few_then_the_floor():
    assert audit_rate(0, floor=0.03) == 1.0
    assert audit_rate(399, floor=0.03, warm=400) == 1.0
    assert audit_rate(400, floor=0.03, warm=400) == 0.03
    assert audit_rate(10_000, floor=0.2, warm=400) == 0.2
    assert audit_rate(120, floor=0.03, warm=400, settled=True) == 0.03


SETTLED = {
    "no verdict (cold start, or no economics given)": ({"cold_start": True}, False),
    "certified, no economics given": ({"loss_budget": 0.05, "held_out_loss": 0.01}, False),
    "a label would win back less than it costs": ({"audits": {"settled": True}}, True),
    "a label still pays": ({"audits": {"settled": False}}, False),
    "garbled verdict": ({"audits": "settled"}, False),
    "garbled flag": ({"audits": {"settled": "yes"}}, False),
}


@pytest.mark.parametrize("case", list(SETTLED))
def test_audits_settle_only_on_a_refits_verdict(case):
    evidence, expected = SETTLED[case]
    assert learning.settled(evidence) is expected


def test_the_economics_verdict_weighs_a_labels_gain_over_the_horizon_against_its_cost():
    economics = learning.Economics(horizon=10_000, label_cost=1.5)

    assert economics.verdict(2e-4)["settled"] is False  # wins back 2 requests' worth
    assert economics.verdict(1e-4)["settled"] is True  # 1 request's worth: less than 1.5
    assert economics.verdict(0.0) == {
        "horizon_requests": 10_000,
        "label_cost_requests": 1.5,
        "gain_per_label_requests": 0.0,
        "settled": True,
    }


# (later rules as (acceptance, #worse, #better) on 200 labels, value per label, working
# towards): the promoted rule accepts 30 % at a measured loss of 0.01, bound 0.04
PER_LABEL = {
    "nothing after the promoted rule": ([], 0.0, None),
    "only rules over the budget": ([(0.5, 12, 1), (0.6, 20, 2)], 0.0, None),
    "one rule within the budget": ([(0.5, 6, 2)], (0.2 / 0.01) * 0.03 / 400, 0.5),
    "the most permissive within the budget, past one over it": (
        [(0.4, 14, 2), (0.6, 10, 2), (0.7, 12, 1)],
        (0.3 / 0.03) * 0.03 / 400,
        0.6,
    ),
    "a later rule no lossier: one label's worth of loss": (
        [(0.45, 2, 0)],
        (0.15 / (1 / 200)) * 0.03 / 400,
        0.45,
    ),
}


@pytest.mark.parametrize("case", list(PER_LABEL))
def test_a_label_is_worth_the_acceptance_it_brings_within_reach(case):
    rules, value, reach = PER_LABEL[case]

    got, towards = learning.acceptance_per_label(
        rules, n=200, acceptance=0.3, loss=0.01, bound=0.04, budget=0.05
    )

    assert got == pytest.approx(value)
    assert towards == reach


def test_a_strict_rule_far_from_what_is_within_reach_keeps_labels_valuable():
    """The trap a one-step look fell into: a rule serving almost nothing, its next rule just
    out of reach, while much more acceptance lies within the budget. Labels stay worth
    buying at a few hundred requests of traffic."""
    rules = [(0.03, 3, 0), (0.2, 6, 2), (0.44, 9, 4)]
    per_label, towards = learning.acceptance_per_label(
        rules, n=126, acceptance=0.01, loss=0.0, bound=0.049, budget=0.05
    )

    assert towards == 0.44
    assert learning.Economics(horizon=225, label_cost=0.19).verdict(per_label)["settled"] is False


def test_a_refit_weighs_one_more_label_when_given_its_economics():
    """The same labels: a profile with little traffic settles to the floor, a busy one keeps
    auditing; the guarantee itself (the promoted rule) does not depend on it."""
    prior = Scorer(weights={"lp_mean": 1.6}, bias=0.6)
    sample = world(random.Random(11), 400)
    args = {"chain_length": 2, "target_retention": 0.95, "route": False, "priors": (prior,)}

    quiet = refit(sample, **args, economics=learning.Economics(horizon=500, label_cost=1.0))
    busy = refit(sample, **args, economics=learning.Economics(horizon=10**7, label_cost=1.0))
    none = refit(sample, **args)

    assert quiet.certified and busy.certified
    assert quiet.rule.threshold == busy.rule.threshold == none.rule.threshold
    assert quiet.evidence["acceptance_per_label"] > 0
    assert quiet.evidence["acceptance_within_reach"] > quiet.evidence["held_out_acceptance"]
    assert learning.settled(quiet.evidence) and not learning.settled(busy.evidence)
    assert "audits" not in none.evidence and not learning.settled(none.evidence)


def test_measured_retention_has_an_interval_around_its_estimate():
    losses = [1.0] * 6 + [-1.0] * 2 + [0.0] * 192
    measured = measured_retention(losses)
    assert measured.retention == pytest.approx(1 - 4 / 200)
    assert measured.lower < measured.retention < measured.upper
    assert measured_retention([]) is None


def test_population_stability_sees_a_shift_and_not_noise():
    rng = random.Random(2)
    reference = [rng.gauss(0, 1) for _ in range(2000)]
    assert population_stability(reference, [rng.gauss(0, 1) for _ in range(2000)]) < 0.05
    assert population_stability(reference, [rng.gauss(1.0, 1) for _ in range(2000)]) > 0.2


def test_a_rule_routes_past_the_draft_and_serves_the_next_model():
    from routing.engine.policy import Router

    skip_all = Router(Scorer(weights={}, bias=-10.0), skip_below=0.5)
    accept_all = Scorer(weights={}, bias=10.0)
    obs = Observation(
        "r",
        (StepLabel({}, Verdict.WORSE), StepLabel({}, Verdict.AS_GOOD)),
        pre={"complexity": 0.5},
    )
    assert Rule((accept_all, accept_all), 0.5).served_step(obs) == 0
    assert Rule((accept_all, accept_all), 0.5, skip_all).served_step(obs) == 1
    assert Rule((accept_all, accept_all), 0.5, skip_all).loss(obs) == 0.0
    calibration = Rule((accept_all, accept_all), 0.5, skip_all).calibration({"n": 1})
    assert calibration.router is skip_all and calibration.meta["learned"] is True


def test_observations_survive_a_round_trip_through_json():
    obs = world(random.Random(4), 3)[0]
    assert learning.observation_from_json(learning.observation_to_json(obs)) == obs


def drafted_traffic(rng: random.Random, n: int, *, served_above: float) -> list[Observation]:
    """Requests whose first draft was produced: ``q`` is known before generation and the
    draft's signal follows it. The current rule serves drafts scoring ``served_above`` or
    more (no label, the next model never asked: a router row) and escalates the rest
    (labelled, the next model's cost known)."""
    scorer = Scorer(weights={"lp_mean": 1.6}, bias=0.6)
    out = []
    for i in range(n):
        q = rng.gauss(0.0, 1.0)
        x = q + rng.gauss(0.0, 0.5)
        served = scorer.probability({"lp_mean": x}) >= served_above
        out.append(
            Observation(
                f"d{i}",
                (StepLabel({"lp_mean": x}, None if served else Verdict.WORSE, cost_nanos=10),),
                pre={"q": q},
                next_cost_nanos=() if served else (100,),
                uniform=False,
            )
        )
    return out


def test_the_router_learns_from_every_drafted_request_not_only_the_escalated_ones():
    """Were the router fitted on the escalated requests alone, every draft it saw would be
    one the current rule rejected: it would route past drafts that pass. Served drafts,
    unlabelled, are rows too; the break-even comes from the requests that priced the next
    model."""
    scorer = Scorer(weights={"lp_mean": 1.6}, bias=0.6)
    rows = drafted_traffic(random.Random(5), 3000, served_above=0.6)
    escalated = [o for o in rows if learning.labelled(o)]
    threshold = 0.57  # the next, slightly more permissive, rule of the test's sequence
    fresh = drafted_traffic(random.Random(6), 4000, served_above=0.6)
    passing = [o for o in fresh if scorer.probability(dict(o.steps[0].features)) >= threshold]

    def lost(router) -> float:  # the share of passing drafts routed past
        return sum(router.skips(o.pre) for o in passing) / len(passing)

    everything = learning.fit_router(rows, (scorer,), threshold)
    biased = learning.fit_router(escalated, (scorer,), threshold)
    assert everything is not None and biased is not None
    assert everything.skip_below == pytest.approx(0.1)  # draft 10 over next 100
    assert lost(everything) < 0.02
    assert lost(biased) > 0.1  # what fitting on the escalated requests alone did
