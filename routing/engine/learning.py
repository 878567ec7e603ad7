"""A cascade that learns from its own traffic: audits, a retention guarantee, routing past drafts.

A profile's cascade calibrates itself from **audits**: a uniform random share
of its requests is answered again by the chain's reference model (the
strongest; free when the request escalated to it anyway), every model of the
chain that did not answer is asked too, and each draft is labelled against the
reference's answer (``Verdict``: worse, as good, better; see ``audit.label``).

**What is guaranteed.** Write ``loss`` for a request's served answer compared
with the reference: +1 when it is worse, -1 when better, 0 when as good (or
when the reference answered). A promoted calibration satisfies, with
probability at least ``confidence`` over the audit sample::

    mean loss  <=  1 - target_retention

i.e. the share of requests answered worse than the reference would have
answered them, net of those answered better, stays within the retention
budget. (Against a ground truth, retention is at least ``1 - budget / q`` for a
reference of accuracy ``q``; gains usually make it better than that.)

**How.** Learn then Test (Angelopoulos, Bates et al., 2021) over two families of
candidate policies, ordered from strict to permissive (one acceptance threshold
shared by every step, each with its router):

- the *prior's* family: the scorers of the prior, which no label of this profile
  ever touches, so the family is fixed before any label arrives and every
  uniform label can test it;
- the *fitted* family: scorers (one per escalation step) fitted on a *fit* part of
  the labels (30 % of them, by a hash of the request id, and the non-uniform
  labels), tested on the *held-out* part (70 %). It learns what the prior cannot
  know: a model whose signals mean something else.

Each family is tested in its fixed order; each test rejects "this policy's mean
loss is at least the budget" with an exact, finite-sample test of the net loss
(``net_loss_p_value``); the most permissive policy reached before the first
failure passes. The error is split between the families (``PRIOR_SHARE``), so by
the union bound the promoted policy (the more permissive of the two that passed)
exceeds the budget with probability at most ``1 - confidence``. Fixed-sequence
testing needs no correction for the many thresholds, the test holds at any
sample size, and the policy is evaluated end to end on the whole chain (three
or more models included, the router included), so a step cannot pass on its
own and fail as part of the chain. No label a family is tested on is used to
fit that family.

**Cold start.** Until a policy passes, the calibration escalates every draft
(the threshold is above any probability): retention is the reference's, and
every request is audited at almost no cost (its reference answer exists
already). Scorers start from a prior fitted on public labelled data. The first
certification usually comes after a few hundred requests; the threshold then
loosens as labels accumulate and the bound tightens.

**Routing past the draft.** A draft that will be rejected is paid for and
thrown away. A logistic model of features known before generation (domain,
complexity, length, numbers) predicts the chance that the first model's draft
is accepted under the candidate threshold; below the break-even chance (the
draft's cost over the next model's), the request goes straight to the next
model. The router is part of the tested policy. It learns from every drafted
request outside the test, served or escalated alike (a served draft's row has
no label: whether a draft passes a threshold needs its score only); fitted on
escalated requests alone, it would see only drafts that failed.

No Django here: the gateway's tasks, tests and benchmarks use it alone.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from enum import IntEnum
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np
from scipy.stats import beta, binom

from routing.engine.calibration import Scorer, fit_scorer
from routing.engine.complexity import QueryProfile
from routing.engine.policy import Calibration, Router, StepCalibration

HELD_OUT_SHARE = 0.7
GAMMA = 0.005  # the share of the test's error spent on its nuisance parameter
PRIOR_SHARE = 0.9  # the share of the error spent on the prior's family (the rest: fitted)
MIN_HELD_OUT = 60  # below this, no policy is tested (nothing but escalation is promoted)
NEVER = 1.01  # a threshold above every probability: escalate every draft


class Verdict(IntEnum):
    """A draft compared with the reference model's answer to the same request."""

    WORSE = -1
    AS_GOOD = 0
    BETTER = 1


@dataclass(frozen=True)
class StepLabel:
    """One chain position's draft on an audited request, and its verdict."""

    features: Mapping[str, float]  # the quality check's free signals on the draft
    verdict: Verdict | None  # None: the draft could not be produced or labelled
    hard_fail: bool = False
    cost_nanos: int = 0


@dataclass(frozen=True)
class Observation:
    """One audited request: every draft of the chain labelled against the reference."""

    key: str  # the request id; decides fit / held-out
    steps: tuple[StepLabel, ...]  # one per non-final chain position
    pre: Mapping[str, float] = field(default_factory=dict)  # known before generation
    reference_cost_nanos: int = 0
    next_cost_nanos: tuple[int, ...] = ()  # per step: the cost of the model after it
    # Drawn by the uniform audit sample. Rows found otherwise (a request that escalated
    # anyway, labelled by agreement alone; a served draft, unlabelled) only ever train.
    uniform: bool = True

    @property
    def held_out(self) -> bool:
        return self.uniform and held_out(self.key)


def observation_to_json(obs: Observation) -> dict[str, Any]:
    return {
        "key": obs.key,
        "steps": [
            {
                "features": dict(s.features),
                "verdict": None if s.verdict is None else int(s.verdict),
                "hard_fail": s.hard_fail,
                "cost_nanos": s.cost_nanos,
            }
            for s in obs.steps
        ],
        "pre": dict(obs.pre),
        "reference_cost_nanos": obs.reference_cost_nanos,
        "next_cost_nanos": list(obs.next_cost_nanos),
        "uniform": obs.uniform,
    }


def observation_from_json(data: Mapping[str, Any]) -> Observation:
    return Observation(
        key=data["key"],
        steps=tuple(
            StepLabel(
                s.get("features") or {},
                None if s.get("verdict") is None else Verdict(int(s["verdict"])),
                bool(s.get("hard_fail")),
                int(s.get("cost_nanos") or 0),
            )
            for s in data.get("steps") or ()
        ),
        pre=data.get("pre") or {},
        reference_cost_nanos=int(data.get("reference_cost_nanos") or 0),
        next_cost_nanos=tuple(data.get("next_cost_nanos") or ()),
        uniform=bool(data.get("uniform", True)),
    )


def labelled(obs: Observation) -> bool:
    """Whether any draft of the observation has a verdict (a router row has none)."""
    return any(step.verdict is not None for step in obs.steps)


def held_out(key: str, share: float = HELD_OUT_SHARE) -> bool:
    digest = int(hashlib.sha256(key.encode()).hexdigest()[:8], 16)
    return digest % 1000 < share * 1000


def pre_features(query: QueryProfile) -> dict[str, float]:
    """What the router may use: known before any model answers."""
    out = {
        "complexity": query.complexity,
        "log_words": query.log_words,
        "q_numbers": min(len(query.numbers), 12) / 12,
        "expects_integer": float(query.expects_integer),
        "choices": float(bool(query.choices)),
    }
    if query.domain:
        out[f"domain_{query.domain}"] = 1.0
    return out


@dataclass(frozen=True)
class Economics:
    """What a label costs and how much traffic a calibration serves, in reference requests.

    ``horizon``: the requests the next calibrations will serve (a month of the
    profile's traffic: 30 times its last day's); ``label_cost``: what one uniform
    audit costs (its reference call when a draft was served, its judge calls), over
    what the reference costs on an average request, which is also about what an
    accepted draft saves.
    """

    horizon: float
    label_cost: float

    def verdict(self, per_label: float) -> dict[str, Any]:
        """Whether auditing at the full rate still pays: ``settled`` once one more label is
        expected to win back less than it costs over the horizon."""
        gain = per_label * self.horizon
        return {
            "horizon_requests": round(self.horizon),
            "label_cost_requests": round(self.label_cost, 4),
            "gain_per_label_requests": round(gain, 4),
            "settled": gain < self.label_cost,
        }


def acceptance_per_label(
    rules: Sequence[tuple[float, int, int]],
    *,
    n: int,
    acceptance: float,
    loss: float,
    bound: float,
    budget: float,
) -> tuple[float, float | None]:
    """The share of requests one more uniform label is expected to let the cascade accept,
    and the acceptance it is working towards (None: nothing more to win).

    ``rules``: the rules after the promoted one in the tested sequence, each as
    (acceptance, #worse, #better) on the ``n`` labels the promoted rule was tested
    on (its acceptance, measured loss and bound given). The bound lies
    ``bound - loss`` above the measured loss and shrinks as one over the square
    root of the labels, so one more label narrows it by about
    ``(bound - loss) / (2 n)``, which the cascade can spend on loss. What a unit
    of loss buys is read off the sequence: from the promoted rule to the most
    permissive later rule whose measured loss is within the budget (what the
    labels are working towards), its extra acceptance over its extra loss, the
    loss floored at one label's worth. A chord over the whole reachable stretch,
    not the step to the next rule: that step is always just out of reach and says
    little (it failed by a label or two, or by chance), while the acceptance at
    stake, which is what labels buy, can be much larger. An estimate for spending
    audits, not part of the guarantee, which the exact test alone gives.
    """
    reach = None
    for accepted, worse, better in rules:
        if accepted > acceptance and (worse - better) / n < budget:
            reach = (accepted, (worse - better) / n)
    if reach is None or n <= 0:
        return 0.0, None
    slope = (reach[0] - acceptance) / max(reach[1] - loss, 1.0 / n)
    return slope * max(bound - loss, 0.0) / (2.0 * n), reach[0]


def settled(evidence: Mapping[str, Any]) -> bool:
    """Whether a certified calibration's audits have settled to the floor: its refit found
    that one more label would win back less than it costs (``Economics.verdict``).
    Evidence without that verdict (no economics given, or not certified) is not settled."""
    audits = evidence.get("audits")
    return isinstance(audits, Mapping) and audits.get("settled") is True


def audit_rate(labels: int, *, floor: float, warm: int = 400, settled: bool = False) -> float:
    """The share of requests to audit: every one until ``warm`` labels are in, or until a
    refit finds that one more label no longer pays (``settled``), then ``floor``.

    Early audits are nearly free (the calibration escalates every draft, so the
    reference answer exists) and they are what the first certified thresholds
    rest on; once drafts are served, an audit costs a reference call, and the
    floor keeps the labels (and the drift checks) flowing at a small cost. A
    later refit that finds labels worth buying again brings the full rate back.
    """
    return floor if settled or labels >= warm else 1.0


# --- the guarantee -----------------------------------------------------------------------


def _tail(n: int, d: int, worse: float, better: float) -> float:
    """P(#worse - #better <= d) for n requests with those two probabilities (exact)."""
    j = np.arange(n + 1)
    p_better = binom.pmf(j, n, better)
    rest = np.maximum(1 - better, 1e-300)
    return float(np.sum(p_better * binom.cdf(d + j, n - j, min(1.0, worse / rest))))


@lru_cache(maxsize=65536)
def net_loss_p_value(worse: int, better: int, n: int, budget: float, gamma: float) -> float:
    """Exact p-value of "the mean loss is at least ``budget``" (losses +1 / 0 / -1).

    The statistic is ``#worse - #better``; under the null its tail is largest
    on the boundary ``P(worse) - P(better) = budget``, where one nuisance
    parameter (``P(better)``) remains. Berger & Boos (1994): take the supremum
    over a ``1 - gamma`` Clopper-Pearson interval of it and add ``gamma``. Valid
    at every sample size, and nearly as tight as a normal approximation.
    """
    if n == 0:
        return 1.0
    lo = beta.ppf(gamma / 2, better, n - better + 1) if better > 0 else 0.0
    hi = beta.ppf(1 - gamma / 2, better + 1, n - better) if better < n else 1.0
    lo, hi = max(lo, -budget, 0.0), min(hi, (1 - budget) / 2)
    if lo > hi:
        return gamma
    observed = worse - better
    grid = np.linspace(lo, hi, 24)
    return min(1.0, max(_tail(n, observed, budget + t, t) for t in grid) + gamma)


def net_loss_upper_bound(
    worse: int, better: int, n: int, *, delta: float, gamma: float = 0.005
) -> float:
    """The smallest budget the exact test would certify (bisection on ``budget``)."""
    if n == 0:
        return 1.0
    low, high = (worse - better) / n, 1.0
    if net_loss_p_value(worse, better, n, high - 1e-9, gamma) > delta:
        return 1.0
    while high - low > 1e-4:
        middle = (low + high) / 2
        if net_loss_p_value(worse, better, n, middle, gamma) <= delta:
            high = middle
        else:
            low = middle
    return high


# --- policies ----------------------------------------------------------------------------


@dataclass(frozen=True)
class Rule:
    """Step scorers, one shared threshold, an optional router: what a request is decided by."""

    scorers: tuple[Scorer, ...]
    threshold: float
    router: Router | None = None

    def served_step(self, obs: Observation) -> int | None:
        """The chain position whose draft this policy serves (None: the reference answers)."""
        routed = self.router is not None and self.router.skips(obs.pre)
        start = self.router.skip_to if routed and self.router else 0
        for index in range(start, len(obs.steps)):
            step = obs.steps[index]
            if step.hard_fail:
                continue
            if self.scorers[index].probability(dict(step.features)) >= self.threshold:
                return index
        return None

    def calibration(self, evidence: Mapping[str, Any]) -> Calibration:
        """The engine's calibration for this rule (free signals only, learned: no margins)."""
        return Calibration(
            steps=[StepCalibration(scorer=s, threshold=self.threshold) for s in self.scorers],
            meta={"learned": True, **evidence},
            router=self.router,
        )

    def loss(self, obs: Observation) -> float:
        index = self.served_step(obs)
        if index is None:
            return 0.0
        verdict = obs.steps[index].verdict
        return 1.0 if verdict is None else float(-verdict)  # unlabelled: counted as worse


def _acceptable(verdict: Verdict | None) -> float:
    return 1.0 if verdict is not None and verdict >= Verdict.AS_GOOD else 0.0


def fit_scorers(
    observations: Sequence[Observation], steps: int, priors: Sequence[Scorer] | None = None
) -> tuple[Scorer, ...]:
    """One scorer per escalation step: P(draft as good as the reference), shrunk to the prior."""
    scorers = []
    for index in range(steps):
        prior = priors[index] if priors and index < len(priors) else Scorer()
        rows = [
            o.steps[index]
            for o in observations
            if index < len(o.steps)
            and o.steps[index].verdict is not None
            and not o.steps[index].hard_fail
        ]
        labels = [_acceptable(s.verdict) for s in rows]
        if len(rows) < 20 or len(set(labels)) < 2:
            scorers.append(prior)
            continue
        scorers.append(fit_scorer([dict(s.features) for s in rows], labels, prior=prior))
    return tuple(scorers)


def fit_router(
    observations: Sequence[Observation], scorers: Sequence[Scorer], threshold: float
) -> Router | None:
    """Predict, before generation, whether the first draft would be accepted at ``threshold``.

    Skips below the break-even chance: drafting pays ``draft cost`` always and
    saves ``next model's cost`` only when accepted. Learns from every observation
    whose first draft was produced, labelled or not: the target is the draft's
    score against ``threshold``, which needs no verdict, and drafts that were served
    (unlabelled) must be there beside the ones that escalated, or every draft the
    router sees is one that failed.
    """
    rows = [o for o in observations if o.pre and o.steps and _drafted(o.steps[0])]
    if len(rows) < 50:
        return None
    labels = [
        0.0
        if o.steps[0].hard_fail
        else float(scorers[0].probability(dict(o.steps[0].features)) >= threshold)
        for o in rows
    ]
    if len(set(labels)) < 2:
        return None
    names = sorted({name for o in rows for name in o.pre})
    scorer = fit_scorer(
        [dict(o.pre) for o in rows],
        labels,
        features=names,
        prior=Scorer(weights={}, bias=0.0),
        l2=3.0,
    )
    # The break-even from requests whose next model answered too (a served draft's request
    # never asked it, so its cost is unknown there).
    priced = [o for o in rows if o.next_cost_nanos and o.next_cost_nanos[0]]
    draft = sum(o.steps[0].cost_nanos for o in priced)
    saved = sum(o.next_cost_nanos[0] for o in priced)
    if not saved:
        return None
    return Router(scorer, skip_below=min(0.5, draft / saved))


def _drafted(step: StepLabel) -> bool:
    """Whether the step's draft was produced and checked (labelled or not)."""
    return step.hard_fail or bool(step.features)


PRIOR_PATH = Path(__file__).with_name("prior.json")


@lru_cache(maxsize=1)
def public_prior() -> tuple[Scorer, tuple[str, ...]]:
    """The scorer fitted on public labelled answers (``bench/fit_prior.py``) and its sources;
    the hand-set weights when none is shipped."""
    try:
        data = json.loads(PRIOR_PATH.read_text())
    except (OSError, ValueError):
        return Scorer(), ()
    sources = tuple(s["file"].split(":", 1)[0] for s in data.get("sources", ()))
    return Scorer.from_json(data["scorer"]), sources


def prior_scorers(chain_length: int) -> tuple[Scorer, ...]:
    prior, _ = public_prior()
    return tuple(prior for _ in range(chain_length - 1))


def cold_start_calibration(
    chain_length: int, priors: Sequence[Scorer] | None = None
) -> Calibration:
    """What a profile runs before its first certified calibration (``escalate_all``)."""
    return escalate_all(chain_length, priors).calibration({"cold_start": True})


def escalate_all(chain_length: int, priors: Sequence[Scorer] | None = None) -> Rule:
    """The rule before any certification: every draft escalates, so the reference answers
    every request. The drafts are not wasted: each one, with the reference's answer beside
    it, is a label for the scorers at no further cost (an audit then only pays its judge)."""
    priors = priors or prior_scorers(chain_length)
    scorers = tuple((priors[i] if i < len(priors) else Scorer()) for i in range(chain_length - 1))
    return Rule(scorers, NEVER)


# --- refitting ---------------------------------------------------------------------------


@dataclass
class Refit:
    """A candidate calibration and the evidence for (or against) promoting it."""

    rule: Rule
    certified: bool  # a permissive policy passed; otherwise ``policy`` escalates every draft
    evidence: dict[str, Any]


def candidate_thresholds(
    scorers: Sequence[Scorer], observations: Sequence[Observation], count: int = 40
) -> list[float]:
    """Thresholds from strict to permissive: quantiles of the drafts' probabilities."""
    probabilities = sorted(
        {
            # Rounded down, so that the strictest candidate still accepts its draft.
            math.floor(scorers[i].probability(dict(s.features)) * 1e6) / 1e6
            for o in observations
            for i, s in enumerate(o.steps)
            if not s.hard_fail and s.features
        },
        reverse=True,
    )
    if not probabilities:
        return []
    picks = np.unique(
        np.quantile(probabilities, np.linspace(0, 1, min(count, len(probabilities))))
    )[::-1]
    return [float(p) for p in picks]


def _tally(rule: Rule, observations: Sequence[Observation]) -> tuple[float, int, int]:
    """A rule's acceptance, #worse and #better on labelled observations."""
    losses = [rule.loss(o) for o in observations]
    accepted = sum(rule.served_step(o) is not None for o in observations)
    return accepted / len(observations), losses.count(1.0), losses.count(-1.0)


@dataclass(frozen=True)
class Family:
    """One fixed sequence of rules: its scorers, the labels it is tested on, the rows its
    router learns from (never a test label), and its share of the error."""

    name: str
    scorers: tuple[Scorer, ...]
    test: Sequence[Observation]
    router_rows: Sequence[Observation]
    level: float


def _tested(
    family: Family, *, budget: float, route: bool
) -> Iterator[tuple[Rule, int, int, float]]:
    """Each candidate of ``family`` in its testing order, strict to permissive (its router
    fitted for it): the rule, its #worse and #better on the test labels, and the exact
    p-value of "its mean loss is at least ``budget``"."""
    n = len(family.test)
    for threshold in candidate_thresholds(family.scorers, family.test):
        router = fit_router(family.router_rows, family.scorers, threshold) if route else None
        rule = Rule(family.scorers, threshold, router)
        losses = [rule.loss(o) for o in family.test]
        worse, better = losses.count(1.0), losses.count(-1.0)
        yield rule, worse, better, net_loss_p_value(worse, better, n, budget, GAMMA)


def _most_permissive(family: Family, *, budget: float, route: bool) -> tuple[Rule, int] | None:
    """Fixed-sequence test of one family on its test labels, at its level: its most
    permissive rule reached before the first failure (None: not even the strictest
    passed), and the count tested."""
    best: Rule | None = None
    tested = 0
    for rule, _, _, p_value in _tested(family, budget=budget, route=route):
        tested += 1
        if p_value > family.level:
            break
        best = rule
    return None if best is None else (best, tested)


def families(
    observations: Sequence[Observation],
    *,
    chain_length: int,
    confidence: float,
    priors: Sequence[Scorer] | None = None,
) -> tuple[Family, Family]:
    """The prior's family (every uniform label tests it; its router learns from the
    non-uniform rows) and the fitted one (fitted on the fit part and the non-uniform
    labels, tested on the held-out part), each at its share of ``1 - confidence``."""
    steps = chain_length - 1
    priors = priors or prior_scorers(chain_length)
    usable = [o for o in observations if len(o.steps) == steps]
    fit = [o for o in usable if not o.held_out]
    fixed = tuple((priors[i] if i < len(priors) else Scorer()) for i in range(steps))
    delta = 1 - confidence
    return (
        Family(
            "prior",
            fixed,
            [o for o in usable if o.uniform],
            [o for o in usable if not o.uniform],
            PRIOR_SHARE * delta,
        ),
        Family(
            "fitted",
            fit_scorers(fit, steps, priors),
            [o for o in usable if o.held_out],
            fit,
            (1 - PRIOR_SHARE) * delta,
        ),
    )


def sequence(family: Family, *, budget: float, route: bool = True) -> list[dict[str, Any]]:
    """Every candidate of ``family`` in its testing order, as the test sees it, past the
    first failure too (``reached``: tested before any failure, the refit stops at the first
    one): what a refit's evidence rests on, for reading (``bench/cascade_online.py
    --explain``)."""
    rows = []
    reached = True
    n = len(family.test)
    for rule, worse, better, p_value in _tested(family, budget=budget, route=route):
        passes = p_value <= family.level
        rows.append(
            {
                "threshold": rule.threshold,
                "acceptance": sum(rule.served_step(o) is not None for o in family.test) / n,
                "worse": worse,
                "better": better,
                "loss": (worse - better) / n,
                "p_value": p_value,
                "passes": passes,
                "reached": reached,
            }
        )
        reached = reached and passes
    return rows


def refit(
    observations: Sequence[Observation],
    *,
    chain_length: int,
    target_retention: float,
    confidence: float = 0.9,
    priors: Sequence[Scorer] | None = None,
    route: bool = True,
    economics: Economics | None = None,
) -> Refit:
    """Test two families of rules, the error split between them; promote the more permissive.

    - *prior* (``PRIOR_SHARE`` of the error): the prior's scorers, which no label of
      this profile ever touches, so every uniform label tests them;
    - *fitted* (the rest): scorers fitted on the fit part (and the non-uniform labels),
      tested on the held-out part.

    Each family is a fixed sequence tested at its share of ``delta``: by the union
    bound, the chance that either family's rule exceeds the budget is at most
    ``delta``, whichever is kept. The prior's family spends every label on the test;
    the fitted one is the fallback that learns what the prior cannot know (a model
    whose signals mean something else), at a stricter level.
    """
    steps = chain_length - 1
    prior, fitted = families(
        observations, chain_length=chain_length, confidence=confidence, priors=priors
    )
    uniform, held, fit = prior.test, fitted.test, fitted.router_rows
    budget = 1 - target_retention
    strict = escalate_all(chain_length, fitted.scorers)
    evidence: dict[str, Any] = {
        "method": "learn-then-test, two fixed sequences (prior: every label; fitted: "
        "held-out), the error split, exact test of the net loss",
        "target_retention": target_retention,
        "confidence": confidence,
        "n_fit": len(fit),
        "n_held_out": len(held),
        "n_uniform": len(uniform),
        "loss_budget": round(budget, 4),
    }
    if steps < 1 or len(uniform) < MIN_HELD_OUT:
        evidence["reason"] = f"{len(uniform)} uniform labels; {MIN_HELD_OUT} needed to test"
        return Refit(strict, False, evidence)
    passed: dict[str, tuple[Rule, Sequence[Observation], float]] = {}
    tested = 0
    for family in (prior, fitted):
        if len(family.test) < MIN_HELD_OUT:  # each family needs as many labels to be tested on
            continue
        found = _most_permissive(family, budget=budget, route=route)
        if found:
            passed[family.name] = (found[0], family.test, family.level)
            tested += found[1]
    evidence["candidates_tested"] = tested
    if not passed:
        evidence["reason"] = "no permissive policy met the bound yet"
        return Refit(strict, False, evidence)

    def acceptance(rule: Rule) -> float:  # on every uniform label (held may be few)
        return sum(rule.served_step(o) is not None for o in uniform) / len(uniform)

    name = max(passed, key=lambda n: acceptance(passed[n][0]))
    policy, tested_on, level = passed[name]
    losses = [policy.loss(o) for o in tested_on]
    bound = net_loss_upper_bound(
        losses.count(1.0), losses.count(-1.0), len(tested_on), delta=level, gamma=GAMMA
    )
    n = len(tested_on)
    accepted = sum(s is not None for s in (policy.served_step(o) for o in tested_on)) / n
    # What one more label would win: the rules after the promoted one, as the test saw them
    # (without their routers, which only ever serve fewer drafts).
    later = [
        Rule(policy.scorers, t)
        for t in candidate_thresholds(policy.scorers, tested_on)
        if t < policy.threshold
    ]
    per_label, working_towards = acceptance_per_label(
        [_tally(rule, tested_on) for rule in later],
        n=n,
        acceptance=_tally(Rule(policy.scorers, policy.threshold), tested_on)[0],
        loss=sum(losses) / n,
        bound=bound,
        budget=budget,
    )
    evidence.update(
        {
            "family": name,
            "tested_at": round(level, 4),
            "n_tested_on": n,
            "threshold": round(policy.threshold, 6),
            "held_out_loss": round(sum(losses) / n, 4),
            "held_out_loss_upper_bound": round(bound, 4),
            "acceptance_per_label": round(per_label, 8),
            "acceptance_within_reach": None
            if working_towards is None
            else round(working_towards, 4),
            "retention_lower_bound": round(1 - bound, 4),
            "held_out_acceptance": round(accepted, 4),
            "held_out_routed_past_draft": round(
                sum(1 for o in tested_on if policy.router and policy.router.skips(o.pre)) / n,
                4,
            ),
        }
    )
    if economics is not None:
        evidence["audits"] = economics.verdict(per_label)
    return Refit(policy, True, evidence)


# --- measuring ---------------------------------------------------------------------------


@dataclass(frozen=True)
class Measured:
    """Audited retention of what was served: 1 - mean loss, with a two-sided interval."""

    retention: float
    lower: float
    upper: float
    n: int


def measured_retention(losses: Sequence[float], confidence: float = 0.9) -> Measured | None:
    """From the losses of the *served* answers of uniformly audited requests."""
    if not losses:
        return None
    n, worse, better = len(losses), losses.count(1.0), losses.count(-1.0)
    delta = (1 - confidence) / 2
    upper_loss = net_loss_upper_bound(worse, better, n, delta=delta)
    lower_loss = -net_loss_upper_bound(better, worse, n, delta=delta)
    return Measured(1 - (worse - better) / n, 1 - upper_loss, 1 - lower_loss, n)


def population_stability(reference: Sequence[float], recent: Sequence[float]) -> float:
    """PSI of two score samples over the reference's deciles (0.2 and above: a shift)."""
    if len(reference) < 20 or len(recent) < 20:
        return 0.0
    edges = np.quantile(np.asarray(reference), np.linspace(0, 1, 11))
    edges[0], edges[-1] = -np.inf, np.inf
    ref = np.histogram(reference, edges)[0] / len(reference)
    now = np.histogram(recent, edges)[0] / len(recent)
    ref, now = np.clip(ref, 1e-4, None), np.clip(now, 1e-4, None)
    return float(np.sum((now - ref) * np.log(now / ref)))
