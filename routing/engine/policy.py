"""Presets and calibrations: how strict the engine is, in one word or in data.

A ``Policy`` is what a preset sets: the retention target calibration aims
for, the default thresholds used before any calibration exists, extra margin
for risky domains, whether paid checks may run, and how much of the chain to
use. A ``Calibration`` holds what was learned from labelled drafts, one
``StepCalibration`` per escalation step of a chain (chain length - 1).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from routing.engine.calibration import Scorer

RISKY_DOMAINS = ("medical", "legal", "finance")


@dataclass(frozen=True)
class Policy:
    name: str
    target_retention: float
    default_threshold: float
    domain_margin: float  # added to the threshold for medical / legal / finance queries
    paid_checks: str  # "never" | "auto" (when calibration shows they pay) | "always"
    first_and_last_only: bool = False  # "fast": skip middle models
    direct_when_hard: bool = False  # "fast": hard queries go straight to the strongest model
    agreement_samples: int = 3

    def margin(self, domain: str) -> float:
        return self.domain_margin if domain in RISKY_DOMAINS else 0.0


PRESETS: dict[str, Policy] = {
    p.name: p
    for p in (
        Policy("cost_optimized", 0.90, 0.40, 0.05, "never"),
        Policy("balanced", 0.95, 0.55, 0.08, "auto"),
        Policy("quality_first", 0.98, 0.70, 0.12, "auto"),
        Policy("fast", 0.93, 0.50, 0.08, "never", first_and_last_only=True, direct_when_hard=True),
    )
}


@dataclass
class StepCalibration:
    """Decision rule for drafts of one chain position.

    ``paid_mode``: "free" (free signals only), "always" (every draft gets the
    paid checks, scored by ``paid_scorer``), or "band" (paid checks only when
    the free probability falls in [band_low, band_high)).
    """

    scorer: Scorer = field(default_factory=Scorer)
    threshold: float | None = None
    paid_mode: str = "free"
    paid_kinds: tuple[str, ...] = ()
    paid_scorer: Scorer | None = None
    paid_threshold: float | None = None
    band_low: float = 0.0
    band_high: float = 1.0
    stats: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return {
            "scorer": self.scorer.to_json(),
            "threshold": self.threshold,
            "paid_mode": self.paid_mode,
            "paid_kinds": list(self.paid_kinds),
            "paid_scorer": self.paid_scorer.to_json() if self.paid_scorer else None,
            "paid_threshold": self.paid_threshold,
            "band_low": self.band_low,
            "band_high": self.band_high,
            "stats": self.stats,
        }

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> StepCalibration:
        return cls(
            scorer=Scorer.from_json(data.get("scorer")),
            threshold=data.get("threshold"),
            paid_mode=data.get("paid_mode", "free"),
            paid_kinds=tuple(data.get("paid_kinds") or ()),
            paid_scorer=Scorer.from_json(data["paid_scorer"]) if data.get("paid_scorer") else None,
            paid_threshold=data.get("paid_threshold"),
            band_low=float(data.get("band_low", 0.0)),
            band_high=float(data.get("band_high", 1.0)),
            stats=dict(data.get("stats") or {}),
        )


@dataclass(frozen=True)
class Router:
    """Route past drafts that would be thrown away.

    ``scorer`` predicts, from features known before generation
    (``learning.pre_features``), the chance that the first model's draft
    passes its check; below ``skip_below`` (the break-even chance) the
    request starts at position ``skip_to`` of the chain instead (the second
    model; the last one while a calibration escalates every draft).
    """

    scorer: Scorer
    skip_below: float
    skip_to: int = 1

    def skips(self, pre: Mapping[str, float]) -> bool:
        return self.scorer.probability(dict(pre)) < self.skip_below

    @classmethod
    def always(cls, skip_to: int) -> Router:
        return cls(Scorer(weights={}, bias=-50.0), 0.5, skip_to)

    def to_json(self) -> dict[str, Any]:
        data = {"scorer": self.scorer.to_json(), "skip_below": self.skip_below}
        return data | ({"skip_to": self.skip_to} if self.skip_to != 1 else {})

    @classmethod
    def from_json(cls, data: dict[str, Any] | None) -> Router | None:
        if not data:
            return None
        return cls(
            Scorer.from_json(data["scorer"]),
            float(data["skip_below"]),
            int(data.get("skip_to", 1)),
        )


@dataclass
class Calibration:
    steps: list[StepCalibration] = field(default_factory=list)
    meta: dict[str, Any] = field(default_factory=dict)
    router: Router | None = None

    def step(self, index: int) -> StepCalibration:
        if index < len(self.steps):
            return self.steps[index]
        return StepCalibration()

    def to_json(self) -> dict[str, Any]:
        data: dict[str, Any] = {
            "version": 1,
            "steps": [s.to_json() for s in self.steps],
            "meta": self.meta,
        }
        if self.router is not None:
            data["router"] = self.router.to_json()
        return data

    @classmethod
    def from_json(cls, data: dict[str, Any] | None) -> Calibration:
        if not data:
            return cls()
        return cls(
            steps=[StepCalibration.from_json(s) for s in data.get("steps", [])],
            meta=dict(data.get("meta") or {}),
            router=Router.from_json(data.get("router")),
        )
