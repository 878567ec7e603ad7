"""Turning signals into a calibrated probability, and picking thresholds that hold.

``Scorer`` is a logistic model over the named features of ``signals`` (and
the paid signals): ``P(draft acceptable) = sigmoid(bias + sum(w_f * x_f))``.
Every term is kept, so the result and the ledger show how much each signal
moved the decision.

``fit_scorer`` learns the weights from labelled drafts by penalised maximum
likelihood (Newton / IRLS), shrinking towards the prior weights, so a small
calibration set adjusts a sensible default instead of overfitting from zero.

``choose_threshold`` picks the cheapest threshold whose *lower confidence
bound* on quality retention (bootstrap over calibration rows, scored on
out-of-fold probabilities) meets the target. Point estimates on the rows the
model was fitted to overfit; the bound is what makes "95% on train" hold on
unseen traffic.
"""

from __future__ import annotations

import math
import random
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from routing.engine.signals import FEATURES

PAID_FEATURES: tuple[str, ...] = ("has_verify", "verify_p", "has_agree", "agree")
ALL_FEATURES: tuple[str, ...] = (*FEATURES, *PAID_FEATURES)

# Hand-set weights used before any calibration data exists: each says which
# way a signal should push and roughly how hard.
PRIOR_WEIGHTS: dict[str, float] = {
    "lp_mean": 2.5,
    "lp_min": 0.1,
    "hedge": -2.5,
    "self_correction": -1.0,
    "refusal": -3.0,
    "truncated": -3.0,
    "format_ok": 1.0,
    "arith_checked": 0.5,
    "arith_bad": -3.0,
    "answer_found": 0.5,
    "answer_nonint": -2.0,
    "answer_is_last": 0.5,
    "choice_missing": -2.0,
    "q_coverage": 0.5,
    "complexity": -2.5,
    "verify_p": 4.0,
    "agree": 3.0,
}
PRIOR_BIAS = 1.6


def sigmoid(z: float) -> float:
    if z >= 0:
        return 1 / (1 + math.exp(-z))
    e = math.exp(z)
    return e / (1 + e)


def centred(name: str, value: float) -> float:
    """Paid probabilities enter centred on 0.5 so 'no signal' (0) means 'no evidence'."""
    return value - 0.5 if name in {"verify_p", "agree"} and value else value


@dataclass
class Scorer:
    weights: dict[str, float] = field(default_factory=lambda: dict(PRIOR_WEIGHTS))
    bias: float = PRIOR_BIAS

    def contributions(self, features: dict[str, float]) -> dict[str, float]:
        return {
            name: round(w * centred(name, features.get(name, 0.0)), 4)
            for name, w in self.weights.items()
            if w and features.get(name)
        }

    def probability(self, features: dict[str, float]) -> float:
        return self.assess(features)[0]

    def assess(self, features: dict[str, float]) -> tuple[float, dict[str, float]]:
        """``probability(features)`` and the ``contributions(features)`` it sums, at once."""
        contributions = self.contributions(features)
        return sigmoid(self.bias + sum(contributions.values())), contributions

    def to_json(self) -> dict[str, Any]:
        return {
            "bias": round(self.bias, 6),
            "weights": {k: round(v, 6) for k, v in self.weights.items()},
        }

    @classmethod
    def from_json(cls, data: dict[str, Any] | None) -> Scorer:
        if not data:
            return cls()
        return cls(weights=dict(data.get("weights", {})), bias=float(data.get("bias", PRIOR_BIAS)))


def fit_scorer(
    rows: Sequence[dict[str, float]],
    labels: Sequence[float],
    *,
    features: Sequence[str] = ALL_FEATURES,
    prior: Scorer | None = None,
    l2: float = 1.0,
    iterations: int = 50,
) -> Scorer:
    """Penalised logistic regression, shrunk towards ``prior`` (standardised features).

    Newton steps (IRLS) on the penalised likelihood; the penalty pulls each
    standardised weight towards the prior's, and leaves the bias free.
    """
    prior = prior or Scorer()
    names = [f for f in features if any(r.get(f) for r in rows)]
    if not rows or not names:
        return Scorer(weights=dict(prior.weights), bias=prior.bias)
    raw = np.array([[centred(f, r.get(f, 0.0)) for f in names] for r in rows], dtype=float)
    means = raw.mean(axis=0)
    stds = np.maximum(raw.std(axis=0), 1e-3)
    x = np.hstack([np.ones((len(rows), 1)), (raw - means) / stds])
    y = np.asarray(labels, dtype=float)
    prior_w = np.array([prior.weights.get(f, 0.0) for f in names])
    w0 = np.concatenate([[0.0], prior_w * stds])
    w = w0.copy()
    w[0] = prior.bias + float(prior_w @ means)
    penalty = np.full(len(w), l2)
    penalty[0] = 1e-6
    for _ in range(iterations):
        p = 1 / (1 + np.exp(-np.clip(x @ w, -30, 30)))
        grad = x.T @ (p - y) + penalty * (w - w0) * (np.arange(len(w)) > 0)
        hess = (x * (p * (1 - p))[:, None]).T @ x + np.diag(penalty)
        step = np.linalg.solve(hess, grad)
        largest = np.max(np.abs(step))
        if largest > 4.0:  # damped: a start far from the optimum must not overshoot
            step *= 4.0 / largest
        w = w - step
        if np.max(np.abs(step)) < 1e-7:
            break
    weights = {f: 0.0 for f in prior.weights}
    bias = float(w[0])
    for j, f in enumerate(names):
        weights[f] = float(w[j + 1] / stds[j])
        bias -= weights[f] * float(means[j])
    return Scorer(weights=weights, bias=bias)


def out_of_fold(
    rows: Sequence[dict[str, float]],
    labels: Sequence[float],
    *,
    folds: int = 5,
    seed: int = 7,
    **fit_kwargs: Any,
) -> list[float]:
    """Probabilities for each row from a scorer that never saw it."""
    order = list(range(len(rows)))
    random.Random(seed).shuffle(order)  # noqa: S311 - reproducible folds, not crypto
    probs = [0.0] * len(rows)
    for fold in range(folds):
        held = set(order[fold::folds])
        train_idx = [i for i in range(len(rows)) if i not in held]
        scorer = fit_scorer(
            [rows[i] for i in train_idx], [labels[i] for i in train_idx], **fit_kwargs
        )
        for i in held:
            probs[i] = scorer.probability(rows[i])
    return probs


@dataclass(frozen=True)
class Outcome:
    """One calibration row: what accepting the draft vs escalating would give."""

    draft_quality: float
    draft_cost: float  # paid whether or not the draft is accepted
    escalated_quality: float
    escalated_cost: float  # extra cost when escalating
    reference_quality: float  # the strongest model's quality (retention's denominator)
    reference_cost: float  # the strongest model's cost (saving's denominator)


@dataclass(frozen=True)
class ThresholdChoice:
    threshold: float
    retention: float
    retention_lower: float
    saving: float
    escalation_rate: float
    met_target: bool


def evaluate(
    probs: Sequence[float], outcomes: Sequence[Outcome], threshold: float
) -> tuple[float, float, float]:
    """(retention, saving, escalation rate) of accepting drafts with probability >= threshold."""
    quality = cost = ref_q = ref_c = 0.0
    escalated = 0
    for p, o in zip(probs, outcomes, strict=True):
        cost += o.draft_cost
        if p >= threshold:
            quality += o.draft_quality
        else:
            quality += o.escalated_quality
            cost += o.escalated_cost
            escalated += 1
        ref_q += o.reference_quality
        ref_c += o.reference_cost
    n = max(len(outcomes), 1)
    return (
        quality / ref_q if ref_q else 1.0,
        1 - cost / ref_c if ref_c else 0.0,
        escalated / n,
    )


def choose_threshold(
    probs: Sequence[float],
    outcomes: Sequence[Outcome],
    *,
    target_retention: float,
    confidence: float = 0.9,
    resamples: int = 300,
    seed: int = 11,
) -> ThresholdChoice:
    """The cheapest threshold whose bootstrap lower bound on retention meets the target.

    Rows are sorted by probability once; a threshold accepts a prefix of the
    high-probability rows, so every threshold of every resample is scored with
    prefix sums in O(n).
    """
    n = len(outcomes)
    if n == 0:
        return ThresholdChoice(0.5, 1.0, 1.0, 0.0, 0.0, False)
    order = sorted(range(n), key=lambda i: -probs[i])
    cuts = _cut_points([probs[i] for i in order])
    rng = random.Random(seed)  # noqa: S311 - reproducible bootstrap, not crypto
    alpha = 1 - confidence
    # retention_by_cut[c] holds one value per resample.
    samples: list[list[float]] = [[] for _ in cuts]
    for b in range(resamples + 1):
        if b == 0:
            counts = [1] * n
        else:
            counts = [0] * n
            for _ in range(n):
                counts[rng.randrange(n)] += 1
        acc_draft = [0.0]
        esc_quality_total = 0.0
        ref_total = 0.0
        for i in order:
            c = counts[i]
            acc_draft.append(
                acc_draft[-1] + c * (outcomes[i].draft_quality - outcomes[i].escalated_quality)
            )
            esc_quality_total += c * outcomes[i].escalated_quality
            ref_total += c * outcomes[i].reference_quality
        for ci, (_, k) in enumerate(cuts):
            retention = (esc_quality_total + acc_draft[k]) / ref_total if ref_total else 1.0
            if b == 0:
                samples[ci].insert(0, retention)
            else:
                samples[ci].append(retention)
    best: ThresholdChoice | None = None
    for ci, (threshold, _) in enumerate(cuts):
        point = samples[ci][0]
        boot = sorted(samples[ci][1:])
        lower = boot[int(alpha * len(boot))] if boot else point
        retention, saving, esc = evaluate(probs, outcomes, threshold)
        choice = ThresholdChoice(
            threshold, retention, lower, saving, esc, lower >= target_retention
        )
        if choice.met_target and (best is None or choice.saving > best.saving):
            best = choice
    if best is None:
        # Nothing meets the bound: escalate everything (threshold above every probability).
        retention, saving, esc = evaluate(probs, outcomes, 1.01)
        return ThresholdChoice(1.01, retention, retention, saving, esc, False)
    return best


def _cut_points(sorted_desc: list[float]) -> list[tuple[float, int]]:
    """(threshold, accepted count) for every distinct cut of the sorted probabilities."""
    cuts = [(1.01, 0)]
    for k, p in enumerate(sorted_desc, start=1):
        if k == len(sorted_desc) or sorted_desc[k] < p:
            cuts.append((p, k))
    return cuts


def auroc(scores: Sequence[float], positives: Sequence[bool]) -> float | None:
    """Area under the ROC curve (rank statistic, ties counted half)."""
    pairs = sorted(zip(scores, positives, strict=True))
    n_pos = sum(1 for _, y in pairs if y)
    n_neg = len(pairs) - n_pos
    if not n_pos or not n_neg:
        return None
    rank_sum = 0.0
    i = 0
    while i < len(pairs):
        j = i
        while j < len(pairs) and pairs[j][0] == pairs[i][0]:
            j += 1
        avg_rank = (i + j + 1) / 2
        rank_sum += avg_rank * sum(1 for k in range(i, j) if pairs[k][1])
        i = j
    return (rank_sum - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg)
