"""A ledger row's attempts: stored compactly, read back whole, old rows as they were."""

import copy
import math
from datetime import timedelta

import pytest
from django.utils import timezone

from routing.engine.calibration import Scorer
from routing.engine.types import Attempt, Check, PaidCheck, check_reasons
from routing.enums import UsageKind
from routing.ledger_attempts import attempts_read, attempts_stored, rounded
from routing.selectors import recent_drafts
from tests.factories import UsageEventFactory

DOMAIN, COMPLEXITY = "math", 0.4123
FEATURES = {
    "complexity": 0.4123,
    "q_len": 2.4849,
    "lp_mean": -0.0392,
    "lp_min": -0.0597,
    "hedge": 0.3333,
    "log_len": 4.2767,
    "len_gap": -0.7907,
    "has_logprobs": 1.0,
}
CONTRIBUTIONS = {
    "complexity": -0.86091234567891,
    "lp_mean": -0.0979812345678,
    "hedge": -0.3333333333333333,
    "lp_min": -0.00601,
}


def made_check(**overrides) -> Check:
    """A check as the engine makes it (``CascadeAgent._judge``)."""
    given = {
        "probability": 0.5749,
        "threshold": 0.6,
        "accepted": False,
        "features": dict(FEATURES),
        "contributions": dict(CONTRIBUTIONS),
        "hard_fail": None,
        "paid": [],
        "notes": ["mean token log-probability -0.039", "hedging: maybe, perhaps"],
    } | overrides
    notes = given.pop("notes")
    reasons = check_reasons(
        probability=given["probability"],
        threshold=given["threshold"],
        accepted=given["accepted"],
        contributions=given["contributions"],
        hard_fail=given["hard_fail"],
        notes=notes,
        domain=DOMAIN,
        complexity=COMPLEXITY,
    )
    return Check(reasons=reasons, **given)


def made_attempts(check: Check | None = None) -> list[dict]:
    """``Attempt.as_dict()`` of an escalated request: what rows stored before compaction."""
    return [
        Attempt(
            "demo/small",
            "demo/small",
            "draft",
            "ok",
            37,
            71,
            48_150,
            440,
            decision="escalated",
            check=check or made_check(),
        ).as_dict(),
        Attempt(
            "demo/large",
            "openai/gpt-x@https://eu.example",
            "final",
            "error",
            0,
            0,
            0,
            30,
            error_code="timeout",
            error_message="upstream timed out",
        ).as_dict(),
        Attempt(
            "demo/large",
            "demo/large",
            "final",
            "ok",
            37,
            90,
            1_250_000_123,
            1472,
            decision="returned",
        ).as_dict(),
    ]


def stored_and_read(attempts: list[dict]) -> tuple[list[dict], list[dict]]:
    stored = attempts_stored(attempts, domain=DOMAIN, complexity=COMPLEXITY)
    return stored, attempts_read(stored, domain=DOMAIN, complexity=COMPLEXITY)


def with_floats_rounded(attempts: list[dict]) -> list[dict]:
    expected = copy.deepcopy(attempts)
    for a in expected:
        if a.get("check"):
            for key in ("features", "contributions"):
                a["check"][key] = {k: rounded(v) for k, v in a["check"][key].items()}
    return expected


def test_a_stored_attempt_leaves_out_defaults_and_the_reasons_and_reads_back_whole():
    made = made_attempts()

    stored, read = stored_and_read(made)

    assert stored == [
        {
            "m": "demo/small",
            "r": "draft",
            "s": "ok",
            "pt": 37,
            "ct": 71,
            "c": 48_150,
            "ms": 440,
            "dc": "escalated",
            "k": {
                "p": 0.5749,
                "t": 0.6,
                "a": False,
                "f": FEATURES,
                "w": {
                    "complexity": -0.860912,
                    "lp_mean": -0.0979812,
                    "hedge": -0.333333,
                    "lp_min": -0.00601,
                },
                "n": ["hedging: maybe, perhaps"],  # the log-probability's note is derived
            },
        },
        {
            "m": "demo/large",
            "d": "openai/gpt-x@https://eu.example",
            "r": "final",
            "s": "error",
            "ms": 30,
            "ec": "timeout",
            "em": "upstream timed out",
        },
        {
            "m": "demo/large",
            "r": "final",
            "s": "ok",
            "pt": 37,
            "ct": 90,
            "c": 1_250_000_123,  # money is never rounded
            "ms": 1472,
            "dc": "returned",
        },
    ]
    assert read == with_floats_rounded(made)
    assert (
        read[0]["check"]["reasons"]
        == made[0]["check"]["reasons"]
        == [
            "mean token log-probability -0.039",
            "hedging: maybe, perhaps",
            "p(acceptable)=0.575 < threshold 0.600 (math, complexity 0.41)",
            "main signals: complexity -0.86, hedge -0.33, lp_mean -0.10, lp_min -0.01",
        ]
    )


@pytest.mark.parametrize(
    "check",
    [
        made_check(),
        made_check(accepted=True, probability=0.91, features={"complexity": 0.4123}, notes=[]),
        made_check(
            hard_fail="the draft refuses to answer",
            notes=["mean token log-probability -0.039", "arithmetic error: 2 + 2 is 4, not 5"],
        ),
        made_check(contributions={}, features={}, notes=[]),
        made_check(contributions={"a": 0.5, "b": -0.5, "c": 0.5, "d": 0.1, "e": 0.5}),
        made_check(
            paid=[PaidCheck("self_verify", "demo/medium", 0.8123456789, 1_234, 90, 2)],
            features={**FEATURES, "has_verify": 1.0, "verify_p": 0.8123},
        ),
        made_check(paid=[PaidCheck("agreement", "demo/small", None, 0)]),
    ],
    ids=["escalated", "accepted", "hard-fail", "no-signals", "ties", "paid", "paid-none"],
)
def test_every_kind_of_check_reads_back_as_the_engine_made_it(check):
    made = made_attempts(check)

    stored, read = stored_and_read(made)

    assert "rs" not in stored[0]["k"]
    expected = with_floats_rounded(made)
    for paid in expected[0]["check"]["paid"]:
        paid["value"] = rounded(paid["value"])
    assert read == expected


def test_reasons_the_numbers_do_not_give_back_are_stored_as_they_are():
    made = made_attempts(made_check())
    made[0]["check"]["reasons"] = ["p(acceptable)=0.57 worded by an older engine", "main signals"]

    stored, read = stored_and_read(made)

    assert stored[0]["k"]["rs"] == made[0]["check"]["reasons"]
    assert read[0]["check"]["reasons"] == made[0]["check"]["reasons"]


def test_rows_stored_whole_before_compaction_read_as_they_are():
    old = made_attempts()  # the old shape: every field, the reasons in words

    assert attempts_read(old, domain=DOMAIN, complexity=COMPLEXITY) == old
    assert attempts_read(old, domain="", complexity=None) == old  # reasons are not re-derived


def test_six_significant_digits_change_no_decision_and_no_refit():
    """Probabilities, thresholds and features keep every digit the engine gives them (4
    decimals); contributions move by less than a millionth of themselves; a scorer refit on
    the stored features scores exactly as on the features the engine had."""
    made = made_attempts()
    made_check_ = made[0]["check"]

    read = stored_and_read(made)[1][0]["check"]

    for key in ("probability", "threshold", "accepted", "features", "hard_fail"):
        assert read[key] == made_check_[key]
    for name, value in made_check_["contributions"].items():
        assert math.isclose(read["contributions"][name], value, rel_tol=1e-6)
        assert read["contributions"][name] != value or value == rounded(value)
    scorer = Scorer(weights={"complexity": -2.1, "lp_mean": 2.5, "hedge": -1.0}, bias=1.2)
    assert scorer.probability(read["features"]) == scorer.probability(made_check_["features"])


@pytest.mark.parametrize(
    "stored",
    [
        None,
        "not a list",
        {"model": "demo/small"},
        [None, 3, "x", []],
        [{}],
        [{"model": "demo/small", "check": "not a dict"}],
        [{"model": "demo/small", "check": {}}],
        [{"model": 7, "check": {"probability": "high", "threshold": None, "features": [1]}}],
        [{"model": "m", "check": {"probability": 0.5, "threshold": 0.6, "notes": "a string"}}],
        [{"model": "m", "check": {"probability": 0.5, "threshold": 0.6, "paid": "x"}}],
        [{"model": "m", "check": {"probability": 0.5, "threshold": 0.6, "paid": [1, {}]}}],
        [{"model": "m", "check": {"probability": 1e400, "threshold": True, "contributions": 5}}],
        [{"model": "m", "check": {"probability": 0.5, "threshold": 0.6, "hard_fail": 3}}],
        [
            {
                "model": "m",
                "check": {
                    "probability": 0.5,
                    "threshold": 0.6,
                    "contributions": {"a": "x", "b": None, "c": 0.2},
                },
            }
        ],
    ],
)
def test_odd_stored_shapes_read_without_failing(stored):
    read = attempts_read(stored, domain=None, complexity="x")

    assert isinstance(read, list)
    for attempt in read:
        assert {"model", "role", "status", "cost_nanos", "decision"} <= set(attempt)
        if "check" in attempt:
            assert isinstance(attempt["check"]["reasons"], list)
            assert isinstance(attempt["check"]["paid"], list)


def test_a_row_written_whole_and_a_compact_one_read_alike():
    made = made_attempts()
    stored = attempts_stored(made, domain=DOMAIN, complexity=COMPLEXITY)

    assert attempts_read(stored, domain=DOMAIN, complexity=COMPLEXITY) == with_floats_rounded(
        attempts_read(made, domain=DOMAIN, complexity=COMPLEXITY)
    )


def test_unknown_keys_are_kept():
    stored = [
        {
            "model": "m",
            "role": "draft",
            "status": "ok",
            "tier": "gold",
            "check": {"probability": 0.7, "threshold": 0.6, "accepted": True, "x": 1},
        }
    ]

    [read] = attempts_read(stored, domain="code", complexity=0.2)

    assert (read["tier"], read["check"]["x"], read["deployment"]) == ("gold", 1, "m")
    assert read["check"]["reasons"] == [
        "p(acceptable)=0.700 >= threshold 0.600 (code, complexity 0.20)"
    ]


@pytest.mark.django_db
@pytest.mark.parametrize("compact", [False, True], ids=["old-rows", "new-rows"])
def test_drift_reads_the_same_scores_from_either_shape(tenant, compact):
    now = timezone.now()
    for i, probability in enumerate([0.91, 0.5749, 0.33]):
        made = made_attempts(made_check(probability=probability, accepted=probability > 0.6))
        made[0]["decision"] = "accepted" if probability > 0.6 else "escalated"
        stored = attempts_stored(made, domain=DOMAIN, complexity=COMPLEXITY) if compact else made
        UsageEventFactory(
            tenant=tenant,
            profile="cascade/balanced",
            kind=UsageKind.REQUEST,
            attempts=stored,
            domain=DOMAIN,
            complexity=COMPLEXITY,
            created_at=now - timedelta(minutes=i),
        )
    UsageEventFactory(tenant=tenant, profile="cascade/balanced", attempts={"odd": "shape"})

    drafts = recent_drafts(
        tenant_id=tenant.pk,
        profile="cascade/balanced",
        first_model="demo/small",
        since=now - timedelta(hours=1),
    )

    assert drafts.scores == [0.91, 0.5749, 0.33]
    assert (drafts.requests, drafts.accepted_share) == (4, 0.25)


@pytest.mark.django_db
@pytest.mark.parametrize(
    "stored",
    [made_attempts(), "odd", [{"k": {"p": "high"}}], [1, {"m": "x", "extra": [1]}]],
    ids=["old-rows", "not-a-list", "odd-check", "odd-items"],
)
def test_the_admin_shows_a_rows_attempts_whatever_it_stores(admin_client, tenant, stored):
    compact = UsageEventFactory(
        tenant=tenant,
        attempts=attempts_stored(made_attempts(), domain=DOMAIN, complexity=COMPLEXITY),
        domain=DOMAIN,
        complexity=COMPLEXITY,
    )
    odd = UsageEventFactory(tenant=tenant, attempts=stored)

    for event in (compact, odd):
        response = admin_client.get(f"/admin/routing/usageevent/{event.pk}/change/")
        assert response.status_code == 200
    page = admin_client.get(f"/admin/routing/usageevent/{compact.pk}/change/").content.decode()
    assert "p(acceptable)=0.575 &lt; threshold 0.600 (math, complexity 0.41)" in page
