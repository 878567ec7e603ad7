"""Shared set-up of the audit and calibration tests: fake-upstream models, profiles, labels."""

from __future__ import annotations

import json
from datetime import UTC, datetime

from routing.calibrations import calibration_promote
from routing.engine.calibration import Scorer
from routing.engine.learning import (
    Observation,
    Rule,
    StepLabel,
    Verdict,
    observation_to_json,
)
from routing.engine.types import Attempt, Check
from routing.models import Audit, CalibrationVersion, RoutingProfile
from routing.targets import chain_key
from tests.support.fake_upstream import Behaviour

CHAIN = ["fake/draft", "fake/ref"]
GEO = "Name the capital of France."
SUM = "What is 6 * 7?"


def learning_models_config(api_base: str) -> dict:
    entry = {"api_key": "sk-fake", "api_base": api_base}
    return {
        "fake/draft": {
            "model": "openai/draft",
            **entry,
            "input_usd_per_mtok": 1.0,
            "output_usd_per_mtok": 2.0,
        },
        "fake/ref": {
            "model": "openai/ref",
            **entry,
            "input_usd_per_mtok": 10.0,
            "output_usd_per_mtok": 20.0,
        },
        "fake/judge": {
            "model": "openai/judge",
            **entry,
            "input_usd_per_mtok": 5.0,
            "output_usd_per_mtok": 5.0,
        },
    }


def answer_a(payload: dict) -> str:
    prompt = payload["messages"][-1]["content"]
    return prompt.split("Answer A:", 1)[1].split("Answer B:", 1)[0]


def judge_preferring(word: str):
    """A judge that prefers whichever answer contains ``word`` (a consistent judge)."""
    return lambda payload: "A" if word in answer_a(payload) else "B"


def judge_always(letter: str):
    """A judge with a position bias: it always prefers the same slot."""
    return lambda payload: letter


def set_answers(upstream, *, draft: str, ref: str, judge=None) -> None:
    upstream.behaviours["draft"] = Behaviour(content=draft)
    upstream.behaviours["ref"] = Behaviour(content=ref)
    upstream.behaviours["judge"] = Behaviour(reply=judge or judge_always("TIE"))


def make_profile(tenant, name="geo", **values) -> RoutingProfile:
    return RoutingProfile.objects.create(
        tenant=tenant, name=name, chain=values.pop("chain", CHAIN), **values
    )


def chat(model: str, content: str, **extra) -> str:
    return json.dumps({"model": model, "messages": [{"role": "user", "content": content}], **extra})


def accepting_version(
    tenant, profile="cascade/geo", chain=CHAIN, number=1, promote=True, settled=None
):
    """A certified version whose threshold accepts every draft (``settled``: its refit's
    verdict on audits, ``learning.Economics.verdict``; None: no verdict)."""
    rule = Rule(tuple(Scorer() for _ in chain[:-1]), 0.0)
    evidence: dict = {"threshold": 0.0}
    if settled is not None:
        evidence["audits"] = {"settled": settled}
    version = CalibrationVersion.objects.create(
        tenant=tenant,
        profile=profile,
        version=number,
        chain=list(chain),
        calibration=rule.calibration(evidence).to_json(),
        evidence={"target_retention": 0.95, "threshold": 0.0, "held_out_acceptance": 1.0},
        certified=True,
    )
    if promote:
        calibration_promote(version=version)
    return version


GOOD = {"has_logprobs": 1.0, "lp_mean": -0.05, "answer_found": 1.0, "format_ok": 1.0}
BAD = {"has_logprobs": 1.0, "lp_mean": -2.5, "hedge": 1.0, "answer_found": 1.0}


def store_observations(
    tenant, profile, chain, verdicts, *, features=None, uniform=True, prefix="obs"
) -> None:
    """One done audit per verdict (for a two-model chain), with its observation."""
    key = chain_key(chain)
    rows = []
    for i, verdict in enumerate(verdicts):
        feats = features[i] if features else (GOOD if verdict != Verdict.WORSE else BAD)
        obs = Observation(
            key=f"{prefix}-{i}",
            steps=(StepLabel(feats, verdict, False, 100),),
            pre={"complexity": 0.2},
            reference_cost_nanos=1000,
            next_cost_nanos=(1000,),
            uniform=uniform,
        )
        rows.append(
            Audit(
                tenant=tenant,
                request_id=f"req_{prefix}_{i}",
                profile=profile,
                kind="audit" if uniform else "agreement",
                status="done",
                chain=list(chain),
                chain_key=key,
                reference_model=chain[-1],
                observation=observation_to_json(obs),
                created_at=datetime(2026, 11, 1, tzinfo=UTC),
            )
        )
    Audit.objects.bulk_create(rows)


def draft_attempt(model: str, features: dict, *, cost=100, decision="escalated") -> Attempt:
    check = Check(
        probability=0.5,
        threshold=1.01,
        accepted=decision == "accepted",
        features=dict(features),
        contributions={},
        reasons=[],
    )
    return Attempt(model, model, "draft", "ok", 10, 5, cost, 1, decision=decision, check=check)
