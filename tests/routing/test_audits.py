"""Audits: which requests are sampled, and what an audit asks, labels, costs and keeps.

Requests go through the gateway (tasks run in process, so a sampled request's
audit has run when the response is back) against the fake upstream's models and
the offline demo models; the sampling decision is also driven directly with a
coin the test controls.
"""

import json
import random
from datetime import timedelta

import pytest
from asgiref.sync import sync_to_async
from django.db import OperationalError
from django.utils import timezone

from core import outbox
from routing import audits
from routing.audits import AuditCandidate, Sampling, audit_consider
from routing.engine.learning import Verdict, observation_from_json
from routing.engine.signals import Draft
from routing.engine.types import Attempt
from routing.enums import AuditKind, AuditSkip, AuditStatus, UsageKind
from routing.models import Audit, ProfileLearning, UsageEvent
from routing.targets import Learning
from routing.tasks import audit_run, audits_sweep
from tenants.enums import BudgetPeriod, BudgetScope
from tenants.models import Budget, BudgetCounter, BudgetReservation, EndUser
from tenants.services import end_user_audit_exclusion_set, tenant_settings_update
from tests.routing.learning_fixtures import (
    GEO,
    SUM,
    accepting_version,
    chat,
    draft_attempt,
    judge_always,
    judge_preferring,
    learning_models_config,
    make_profile,
    set_answers,
)
from tests.routing.test_gateway import post
from tests.support.broker import broker_down
from tests.support.fake_upstream import Behaviour

pytestmark = pytest.mark.django_db(transaction=True)


@pytest.fixture
def models(upstream, settings):
    settings.CASCADEFLOW_MODELS = learning_models_config(upstream.api_base)
    return upstream


@sync_to_async
def only_audit() -> Audit:
    [audit] = Audit.objects.all()
    return audit


@sync_to_async
def audit_rows() -> list[UsageEvent]:
    return list(UsageEvent.objects.filter(kind=UsageKind.AUDIT).order_by("id"))


@sync_to_async
def learning_row(tenant, profile="cascade/geo") -> ProfileLearning:
    return ProfileLearning.objects.get(tenant=tenant, profile=profile)


# --- sampling, decided directly -------------------------------------------------------------

DEMO = ("demo/small", "demo/medium", "demo/large")


def candidate(tenant, request_id="req_1", served="demo/large", **overrides) -> AuditCandidate:
    state = overrides.pop("learning", {})
    learning = Learning(
        profile="cascade/balanced",
        chain=DEMO,
        reference_model="demo/large",
        judge_model="demo/large",
        floor=state.get("floor", 0.03),
        uniform_labels=state.get("uniform_labels", 0),
        nonuniform_labels=state.get("nonuniform_labels", 0),
        router_rows=state.get("router_rows", 0),
        settled=state.get("settled", False),
    )
    drafts = DEMO[: DEMO.index(served) + 1] if served in DEMO[:-1] else DEMO[:-1]
    attempts = [draft_attempt(m, {"lp_mean": -0.1}) for m in drafts]
    if served in DEMO[:-1]:
        attempts[-1].decision = "accepted"
    else:
        attempts.append(Attempt(served, served, "final", "ok", 10, 5, 900, 1))
    values = dict(
        tenant_id=tenant.pk,
        request_id=request_id,
        learning=learning,
        messages=[{"role": "user", "content": SUM}],
        params={},
        responses={m: Draft("The answer is 42.") for m in {*drafts, served}},
        attempts=attempts,
        served_model=served,
        domain="math",
        status="ok",
        audit_cap_nanos=5 * 10**9,
    )
    values.update(overrides)
    return AuditCandidate(**values)


def coins(*values):
    return iter(values).__next__


# (overrides, coin flips, decision, uniform audits, non-uniform rows: labels and router rows)
SAMPLING = {
    "warming up: every request": ({}, coins(0.99), Sampling.SAMPLED, 1, 0),
    "at the floor: coin under it": (
        {"learning": {"uniform_labels": 400, "floor": 0.03}},
        coins(0.029),
        Sampling.SAMPLED,
        1,
        0,
    ),
    "at the floor: coin over it, escalated anyway": (
        {"learning": {"uniform_labels": 400, "floor": 0.03}},
        coins(0.031),
        Sampling.LABELLED,
        0,
        1,
    ),
    "at the floor: coin over it, a draft served: kept for the router": (
        {"learning": {"uniform_labels": 400}, "served": "demo/small"},
        coins(0.5),
        Sampling.ROUTER_ROW,
        0,
        1,
    ),
    "at the floor: coin over it, the first model routed past": (
        {
            "learning": {"uniform_labels": 400},
            "served": "demo/medium",
            "attempts": [draft_attempt("demo/medium", {"lp_mean": -0.1}, decision="accepted")],
            "responses": {"demo/medium": Draft("The answer is 42.")},
        },
        coins(0.5),
        Sampling.NOT_SAMPLED,
        0,
        0,
    ),
    "2,000 labels and router rows in all: one in ten, coin over": (
        {
            "learning": {"uniform_labels": 400, "nonuniform_labels": 500, "router_rows": 1500},
            "served": "demo/small",
        },
        coins(0.5, 0.11),
        Sampling.NOT_SAMPLED,
        0,
        0,
    ),
    "2,000 labels and router rows in all: one in ten, coin under": (
        {
            "learning": {"uniform_labels": 400, "nonuniform_labels": 500, "router_rows": 1500},
            "served": "demo/small",
        },
        coins(0.5, 0.09),
        Sampling.ROUTER_ROW,
        0,
        1,
    ),
    "settled guarantee, few labels: coin under the floor": (
        {"learning": {"uniform_labels": 120, "settled": True}, "served": "demo/small"},
        coins(0.029),
        Sampling.SAMPLED,
        1,
        0,
    ),
    "settled guarantee, few labels: coin over the floor": (
        {"learning": {"uniform_labels": 120, "settled": True}, "served": "demo/small"},
        coins(0.031),
        Sampling.ROUTER_ROW,
        0,
        1,
    ),
    "floor 0: never sampled once warm": (
        {"learning": {"uniform_labels": 400, "floor": 0.0}, "served": "demo/medium"},
        coins(0.0),
        Sampling.ROUTER_ROW,
        0,
        1,
    ),
    "2,000 non-uniform labels: one in ten, coin over": (
        {"learning": {"uniform_labels": 400, "nonuniform_labels": 2000}},
        coins(0.5, 0.11),
        Sampling.NOT_SAMPLED,
        0,
        0,
    ),
    "2,000 non-uniform labels: one in ten, coin under": (
        {"learning": {"uniform_labels": 400, "nonuniform_labels": 2000}},
        coins(0.5, 0.09),
        Sampling.LABELLED,
        0,
        1,
    ),
    "header opt-out": ({"opted_out": True}, coins(0.0), Sampling.OPTED_OUT, 0, 0),
    "end user excluded": (
        {"end_user_excluded": True},
        coins(0.0),
        Sampling.END_USER_EXCLUDED,
        0,
        0,
    ),
    "failed request": ({"status": "upstream_error"}, coins(0.0), Sampling.NOT_AUDITABLE, 0, 0),
    "degraded answer": ({"degraded": True}, coins(0.0), Sampling.NOT_AUDITABLE, 0, 0),
    "several choices": ({"params": {"n": 2}}, coins(0.0), Sampling.NOT_AUDITABLE, 0, 0),
    "routed to a domain's chain": (
        {"domain_routed": True},
        coins(0.0),
        Sampling.NOT_AUDITABLE,
        0,
        0,
    ),
    "served by a model outside the chain": (
        {"served": "demo/other"},
        coins(0.0),
        Sampling.NOT_AUDITABLE,
        0,
        0,
    ),
    "cap reached (0), a draft served: kept for the router all the same": (
        {"audit_cap_nanos": 0, "served": "demo/small"},
        coins(0.0),
        Sampling.ROUTER_ROW,
        0,
        1,
    ),
    "cap reached (0), escalated: labelled for free": (
        {"audit_cap_nanos": 0},
        coins(0.0),
        Sampling.LABELLED,
        0,
        1,
    ),
}


@pytest.mark.parametrize("case", list(SAMPLING))
def test_sampling_decisions(tenant, case):
    overrides, coin, decision, uniform, nonuniform = SAMPLING[case]

    with broker_down():
        assert audit_consider(candidate=candidate(tenant, **overrides), coin=coin) == decision

    assert Audit.objects.filter(kind=AuditKind.AUDIT, status=AuditStatus.PENDING).count() == uniform
    assert (
        Audit.objects.exclude(kind=AuditKind.AUDIT).filter(status=AuditStatus.DONE).count()
        == nonuniform
    )
    assert UsageEvent.objects.count() == 0  # sampling never calls a model
    kinds = {
        Sampling.SAMPLED: AuditKind.AUDIT,
        Sampling.LABELLED: AuditKind.AGREEMENT,
        Sampling.ROUTER_ROW: AuditKind.ROUTER,
    }
    assert list(Audit.objects.values_list("kind", flat=True)) == (
        [kinds[decision]] if decision in kinds else []
    )


def test_a_served_draft_keeps_its_checks_unlabelled_for_the_router(tenant):
    given = candidate(tenant, learning={"uniform_labels": 400}, served="demo/medium")

    assert audit_consider(candidate=given, coin=coins(0.5)) == Sampling.ROUTER_ROW

    [audit] = Audit.objects.all()
    observation = observation_from_json(audit.observation)
    assert (audit.uniform, audit.status, audit.payload) == (False, AuditStatus.DONE, {})
    assert [s.verdict for s in observation.steps] == [None, None]
    assert [dict(s.features) for s in observation.steps] == [{"lp_mean": -0.1}] * 2
    # The reference was never asked: its cost is unknown, and the router ignores it.
    assert observation.next_cost_nanos == (100, 0)
    assert observation.pre["complexity"] >= 0 and not observation.uniform
    state = ProfileLearning.objects.get()
    assert (state.router_rows, state.nonuniform_labels, state.uniform_labels) == (1, 0, 0)


def test_a_request_keeps_one_router_row_at_most(tenant):
    given = candidate(tenant, learning={"uniform_labels": 400}, served="demo/small")

    first = audit_consider(candidate=given, coin=coins(0.5))
    again = audit_consider(candidate=given, coin=coins(0.5))

    assert (first, again) == (Sampling.ROUTER_ROW, Sampling.NOT_SAMPLED)
    assert Audit.objects.count() == 1
    assert ProfileLearning.objects.get().router_rows == 1


def test_an_escalated_request_with_nothing_to_compare_is_a_router_row(tenant):
    given = candidate(
        tenant,
        learning={"uniform_labels": 400},
        responses={m: Draft("") for m in DEMO},
    )

    assert audit_consider(candidate=given, coin=coins(0.5)) == Sampling.ROUTER_ROW

    assert ProfileLearning.objects.get().router_rows == 1


def test_a_request_is_sampled_at_most_once(tenant):
    with broker_down():
        first = audit_consider(candidate=candidate(tenant), coin=coins(0.0))
        again = audit_consider(candidate=candidate(tenant), coin=coins(0.0))

    assert (first, again) == (Sampling.SAMPLED, Sampling.SAMPLED)
    assert Audit.objects.count() == 1


@pytest.mark.parametrize(
    ("labels", "floor", "low", "high"), [(400, 0.2, 90, 150), (0, 0.03, 600, 600)]
)
def test_the_sampled_share_is_the_audit_rate(tenant, labels, floor, low, high):
    rng = random.Random(3)
    state = {"uniform_labels": labels, "floor": floor}
    with broker_down():
        decisions = [
            audit_consider(
                candidate=candidate(tenant, f"req_{i}", served="demo/small", learning=state),
                coin=rng.random,
            )
            for i in range(600)
        ]

    sampled = decisions.count(Sampling.SAMPLED)
    assert low <= sampled <= high
    assert Audit.objects.filter(kind=AuditKind.AUDIT).count() == sampled
    # Every other request's served draft is kept for the router (fewer than 2,000 so far).
    assert decisions.count(Sampling.ROUTER_ROW) == 600 - sampled
    assert Audit.objects.exclude(kind=AuditKind.AUDIT).count() == 600 - sampled


def test_a_non_uniform_label_is_agreement_only(tenant):
    drafts = {"demo/small": "The answer is 41.", "demo/medium": "The answer is 42."}
    given = candidate(
        tenant,
        learning={"uniform_labels": 400},
        responses={
            **{m: Draft(text) for m, text in drafts.items()},
            "demo/large": Draft("The answer is 42."),
        },
    )

    assert audit_consider(candidate=given, coin=coins(0.5)) == Sampling.LABELLED

    [audit] = Audit.objects.all()
    observation = observation_from_json(audit.observation)
    assert (audit.uniform, audit.payload, observation.uniform) == (False, {}, False)
    assert [s.verdict for s in observation.steps] == [Verdict.WORSE, Verdict.AS_GOOD]
    assert [dict(s.features) for s in observation.steps] == [{"lp_mean": -0.1}] * 2
    assert observation.next_cost_nanos == (100, 900)
    assert ProfileLearning.objects.get().nonuniform_labels == 1


# --- sampling at the gateway: every exclusion -------------------------------------------


def _tenant_off(tenant, token):
    tenant_settings_update(tenant=tenant, audits_enabled=False)


def _profile_off(tenant, token):
    make_profile(tenant, judge_model="fake/judge", audits_enabled=False)


def _end_user_excluded(tenant, token):
    end_user = EndUser.objects.create(tenant=tenant, external_id="alice")
    end_user_audit_exclusion_set(end_user=end_user, excluded=True)


def _cap_reached(tenant, token):
    tenant_settings_update(tenant=tenant, audit_monthly_cap_nanos=0)


def _nothing(tenant, token):
    pass


# (set-up, model, headers, uniform audits)
GATEWAY_EXCLUSIONS = {
    "audits on (control)": (_nothing, "cascade/geo", {}, 1),
    "tenant off": (_tenant_off, "cascade/geo", {}, 0),
    "profile off": (_profile_off, "cascade/geo", {}, 0),
    "end user excluded": (_end_user_excluded, "cascade/geo", {}, 0),
    "header opt-out": (_nothing, "cascade/geo", {"X-CascadeFlow-Audit": "off"}, 0),
    "header opt-out, any case": (_nothing, "cascade/geo", {"X-CascadeFlow-Audit": " OFF "}, 0),
    "header set to something else": (_nothing, "cascade/geo", {"X-CascadeFlow-Audit": "on"}, 1),
    "monthly cap reached": (_cap_reached, "cascade/geo", {}, 0),
    "single-model request": (_nothing, "fake/draft", {}, 0),
}


@pytest.mark.parametrize("case", list(GATEWAY_EXCLUSIONS))
async def test_exclusions_at_the_gateway(api_token, tenant, models, case):
    setup, model, headers, expected = GATEWAY_EXCLUSIONS[case]
    set_answers(models, draft="Lyon.", ref="Paris.", judge=judge_preferring("Paris"))
    if setup is not _profile_off:
        await sync_to_async(make_profile)(tenant, judge_model="fake/judge")
    await sync_to_async(setup)(tenant, api_token)

    response = await post(api_token.raw, chat(model, GEO, user="alice"), **headers)

    assert response.status_code == 200
    assert await Audit.objects.filter(kind=AuditKind.AUDIT).acount() == expected
    assert await UsageEvent.objects.filter(kind=UsageKind.REQUEST).acount() == 1
    if expected == 0:
        assert len(models.calls_for("judge")) == 0
        assert await UsageEvent.objects.filter(kind=UsageKind.AUDIT).acount() == 0


# --- router rows at the gateway: a served draft, never sampled ------------------------------


def _store_fails(monkeypatch):
    def down(*args, **kwargs):
        raise OperationalError("the database is down")

    monkeypatch.setattr(audits, "_store_nonuniform", down)


# (headers, end user excluded, the row store fails, router rows kept)
GATEWAY_ROUTER_ROWS = {
    "a served draft (control)": ({}, False, False, 1),
    "header opt-out": ({"X-CascadeFlow-Audit": "off"}, False, False, 0),
    "end user excluded": ({}, True, False, 0),
    "the database fails the row: the answer and its ledger row stand": ({}, False, True, 0),
}


@pytest.mark.parametrize("case", list(GATEWAY_ROUTER_ROWS))
async def test_router_rows_at_the_gateway(api_token, tenant, models, monkeypatch, case):
    headers, excluded, fails, expected = GATEWAY_ROUTER_ROWS[case]
    # Floor 0 and a settled version: no uniform audit, so the served draft is a router row.
    await sync_to_async(make_profile)(tenant, judge_model="fake/judge", audit_rate_floor=0.0)
    await sync_to_async(accepting_version)(tenant, settled=True)
    if excluded:
        await sync_to_async(_end_user_excluded)(tenant, api_token)
    if fails:
        _store_fails(monkeypatch)
    set_answers(models, draft="Paris.", ref="Paris.")

    response = await post(api_token.raw, chat("cascade/geo", GEO, user="alice"), **headers)

    assert response.status_code == 200
    assert response["x-cascade-model"] == "fake/draft"
    assert await UsageEvent.objects.filter(kind=UsageKind.REQUEST).acount() == 1
    assert await Audit.objects.filter(kind=AuditKind.AUDIT).acount() == 0
    assert await Audit.objects.filter(kind=AuditKind.ROUTER).acount() == expected
    assert len(models.calls_for("ref")) == 0  # a router row never asks a model
    if expected:
        row = await Audit.objects.aget(kind=AuditKind.ROUTER)
        [step] = observation_from_json(row.observation).steps
        assert step.verdict is None and step.features


@pytest.mark.parametrize("stream", [False, True], ids=["complete", "stream"])
async def test_the_request_path_profiles_the_query_once(
    api_token, tenant, models, monkeypatch, stream
):
    # The cascade's profile of the query is the one the router row keeps: profiling a long
    # query costs up to a millisecond, and it was done again when the row was stored.
    from routing.engine import agent as engine_agent
    from routing.engine.complexity import profile_query, query_text
    from routing.engine.learning import pre_features

    await sync_to_async(make_profile)(tenant, judge_model="fake/judge", audit_rate_floor=0.0)
    await sync_to_async(accepting_version)(tenant, settled=True)
    set_answers(models, draft="Paris.", ref="Paris.")
    calls = []

    def counted(text):
        calls.append(text)
        return profile_query(text)

    monkeypatch.setattr(engine_agent, "profile_query", counted)
    monkeypatch.setattr(audits, "profile_query", counted)

    response = await post(api_token.raw, chat("cascade/geo", GEO, stream=stream))
    if stream:
        [chunk async for chunk in response.streaming_content]

    assert response.status_code == 200
    assert len(calls) == 1
    row = await Audit.objects.aget(kind=AuditKind.ROUTER)
    messages = json.loads(chat("cascade/geo", GEO))["messages"]
    expected = pre_features(profile_query(query_text(messages)))
    assert dict(observation_from_json(row.observation).pre) == pytest.approx(expected)


# --- the audit task, end to end -------------------------------------------------------------


async def test_a_cold_start_request_is_audited_with_the_judge_and_its_texts_dropped(
    api_token, tenant, models
):
    await sync_to_async(make_profile)(tenant, judge_model="fake/judge")
    set_answers(models, draft="Lyon is the capital.", ref="Paris.", judge=judge_preferring("Paris"))

    response = await post(api_token.raw, chat("cascade/geo", GEO))

    assert response["x-cascade-model"] == "fake/ref"  # cold start: the draft escalated
    audit = await only_audit()
    assert (audit.status, audit.uniform, audit.payload) == (AuditStatus.DONE, True, {})
    observation = observation_from_json(audit.observation)
    assert [s.verdict for s in observation.steps] == [Verdict.WORSE]
    assert observation.steps[0].features["has_logprobs"] == 1.0  # as the request judged it
    assert (audit.served_model, audit.served_verdict, audit.served_loss) == ("fake/ref", None, 0)
    # Asked twice, the answers swapped (the two calls run at once: in either order).
    judged = models.calls_for("judge")
    assert sorted(answer_a_of(call) for call in judged) == ["Lyon is the capital.", "Paris."]
    assert len(models.calls_for("ref")) == 1 and len(models.calls_for("draft")) == 1  # no re-ask
    [row] = await audit_rows()
    assert row.request_id == f"audit_{audit.pk}"
    assert (row.profile, row.models_called, row.token_id, row.end_user_id) == (
        "cascade/geo",
        ["fake/judge"],
        None,
        None,
    )
    assert [a["role"] for a in row.expanded_attempts] == ["judge", "judge"]
    assert (
        row.cost_nanos
        == sum(a["cost_nanos"] for a in row.expanded_attempts)
        == audit.cost_nanos
        > 0
    )
    assert (row.baseline_cost_nanos, row.baseline_method) == (0, "none")
    assert (await learning_row(tenant)).uniform_labels == 1


def answer_a_of(call: dict) -> str:
    prompt = call["messages"][-1]["content"]
    return prompt.split("Answer A:\n", 1)[1].split("\n\nAnswer B:", 1)[0]


async def test_a_served_draft_is_labelled_against_the_reference_asked_now(
    api_token, tenant, models
):
    await sync_to_async(make_profile)(tenant, judge_model="fake/judge")
    version = await sync_to_async(accepting_version)(tenant)
    set_answers(models, draft="Lyon.", ref="Paris.", judge=judge_preferring("Paris"))

    response = await post(api_token.raw, chat("cascade/geo", GEO))

    assert response["x-cascade-model"] == "fake/draft"
    audit = await only_audit()
    assert audit.calibration_version_id == version.pk
    assert (audit.served_model, audit.served_verdict, audit.served_loss) == (
        "fake/draft",
        Verdict.WORSE,
        1.0,
    )
    assert len(models.calls_for("ref")) == 1  # asked by the audit
    [row] = await audit_rows()
    assert row.models_called == ["fake/ref", "fake/judge"]
    assert [a["role"] for a in row.expanded_attempts] == ["audit", "judge", "judge"]
    observation = observation_from_json(audit.observation)
    assert observation.reference_cost_nanos == observation.next_cost_nanos[0] > 0
    assert observation.reference_cost_nanos == row.expanded_attempts[0]["cost_nanos"]


# (draft, reference, judge, verdict, judge calls)
LABELS = {
    "same number": (
        "The answer is 42.",
        "The answer is 42.",
        judge_always("A"),
        Verdict.AS_GOOD,
        0,
    ),
    "other number, no judge": ("The answer is 41.", "The answer is 42.", None, Verdict.WORSE, 0),
    "other number, judge for the reference": (
        "The answer is 41.",
        "The answer is 42.",
        judge_preferring("42"),
        Verdict.WORSE,
        2,
    ),
    "other number, judge for the draft": (
        "The answer is 41.",
        "The answer is 42.",
        judge_preferring("41"),
        Verdict.BETTER,
        2,
    ),
    "position-biased judge": (
        "The answer is 41.",
        "The answer is 42.",
        judge_always("A"),
        Verdict.AS_GOOD,
        2,
    ),
    "a judge that says nothing usable": (
        "The answer is 41.",
        "The answer is 42.",
        lambda payload: "maybe",
        None,
        2,
    ),
}


@pytest.mark.parametrize("case", list(LABELS))
async def test_labels_by_extraction_then_judge(api_token, tenant, models, case):
    draft, reference, judge, verdict, calls = LABELS[case]
    await sync_to_async(make_profile)(tenant, judge_model="fake/judge" if judge else "none")
    set_answers(models, draft=draft, ref=reference, judge=judge)

    await post(api_token.raw, chat("cascade/geo", SUM))

    audit = await only_audit()
    assert [s.verdict for s in observation_from_json(audit.observation).steps] == [verdict]
    assert len(models.calls_for("judge")) == calls
    assert len(await audit_rows()) == (1 if calls else 0)  # nothing was called: no spend


async def test_free_text_with_no_judge_is_left_unlabelled(api_token, tenant, models):
    await sync_to_async(make_profile)(tenant, judge_model="none")
    set_answers(models, draft="Lyon.", ref="Paris.")

    await post(api_token.raw, chat("cascade/geo", GEO))

    audit = await only_audit()
    assert [s.verdict for s in observation_from_json(audit.observation).steps] == [None]


async def test_demo_models_cold_start_audit_labels_the_whole_chain(api_token, tenant):
    response = await post(api_token.raw, chat("cascade/balanced", SUM))

    assert response["x-cascade-model"] == "demo/large"
    audit = await only_audit()
    assert audit.chain == ["demo/small", "demo/medium", "demo/large"]
    observation = observation_from_json(audit.observation)
    assert [s.verdict for s in observation.steps] == [Verdict.AS_GOOD, Verdict.AS_GOOD]
    assert all(s.cost_nanos > 0 for s in observation.steps)
    assert audit.payload == {}


async def test_a_streamed_answer_is_audited_from_what_was_streamed(api_token, tenant, models):
    await sync_to_async(make_profile)(tenant, judge_model="none")
    set_answers(models, draft="The answer is 41.", ref="The answer is 42.")

    response = await post(api_token.raw, chat("cascade/geo", SUM, stream=True))
    b"".join([chunk async for chunk in response.streaming_content])

    audit = await only_audit()
    assert [s.verdict for s in observation_from_json(audit.observation).steps] == [Verdict.WORSE]
    assert len(models.calls_for("ref")) == 1  # the streamed reference answer was kept


# --- money: the ledger, budgets and the cap --------------------------------------------------


@sync_to_async
def pending_audit_of_a_request(api_token_raw, tenant):
    """A served draft whose audit message was lost: its audit is pending."""
    make_profile(tenant, judge_model="fake/judge")
    accepting_version(tenant)


async def _pending(api_token, tenant, models):
    await pending_audit_of_a_request(api_token.raw, tenant)
    set_answers(models, draft="Lyon.", ref="Paris.", judge=judge_preferring("Paris"))
    with broker_down() as refused:
        response = await post(api_token.raw, chat("cascade/geo", GEO))
    assert response.status_code == 200
    assert refused == ["routing.tasks.audit_run"]
    audit = await only_audit()
    assert audit.status == AuditStatus.PENDING
    assert audit.payload["messages"] == [{"role": "user", "content": GEO}]
    assert audit.payload["answers"]["fake/draft"]["content"] == "Lyon."
    return audit


def _budget(tenant, limit, **thresholds):
    return Budget.objects.create(
        tenant=tenant,
        scope=BudgetScope.TENANT,
        period=BudgetPeriod.MONTH,
        limit_nanos=limit,
        **thresholds,
    )


USD = 10**9
# (budget, outcome, audit ledger rows)
BUDGETS = {
    "no budget": (None, AuditStatus.DONE, 1),
    "a budget with room": ({"limit": 10 * USD}, AuditStatus.DONE, 1),
    "a budget that would block": ({"limit": 1}, AuditSkip.BUDGET, 0),
    "a budget past its degrade threshold": (
        {"limit": 10 * USD, "warn_pct": 0, "degrade_pct": 0},
        AuditSkip.BUDGET,
        0,
    ),
}


@pytest.mark.parametrize("case", list(BUDGETS))
async def test_an_audit_is_admitted_and_charged_like_a_request(api_token, tenant, models, case):
    budget, outcome, rows = BUDGETS[case]
    audit = await _pending(api_token, tenant, models)
    if budget:
        limit = budget.pop("limit")
        budget = await sync_to_async(_budget)(tenant, limit, **budget)

    await sync_to_async(audit_run.delay)(audit.pk)

    await audit.arefresh_from_db()
    assert audit.payload == {}
    if outcome == AuditStatus.DONE:
        assert audit.status == AuditStatus.DONE
    else:
        assert (audit.status, audit.skip_reason) == (AuditStatus.SKIPPED, outcome)
        assert len(models.calls_for("ref")) == 0  # skipped, not run
    ledger = await audit_rows()
    assert len(ledger) == rows
    if budget:
        counter = await BudgetCounter.objects.aget(budget=budget)
        assert counter.reserved_nanos == 0
        assert counter.spent_nanos == sum(r.cost_nanos for r in ledger)
        assert not await BudgetReservation.objects.filter(state="held").aexists()


async def test_the_monthly_cap_is_checked_again_from_the_ledger_before_spending(
    api_token, tenant, models
):
    audit = await _pending(api_token, tenant, models)
    await sync_to_async(tenant_settings_update)(tenant=tenant, audit_monthly_cap_nanos=1000)

    await sync_to_async(audit_run.delay)(audit.pk)

    await audit.arefresh_from_db()
    assert (audit.status, audit.skip_reason, audit.payload) == (
        AuditStatus.SKIPPED,
        AuditSkip.CAP_REACHED,
        {},
    )
    assert len(models.calls_for("ref")) == 0


async def test_audits_turned_off_meanwhile_are_skipped(api_token, tenant, models):
    audit = await _pending(api_token, tenant, models)
    await sync_to_async(tenant_settings_update)(tenant=tenant, audits_enabled=False)

    await sync_to_async(audit_run.delay)(audit.pk)

    await audit.arefresh_from_db()
    assert (audit.status, audit.skip_reason) == (AuditStatus.SKIPPED, AuditSkip.AUDITS_OFF)


async def test_an_audit_run_twice_labels_once(api_token, tenant, models):
    audit = await _pending(api_token, tenant, models)

    first = await sync_to_async(audit_run.delay)(audit.pk)
    second = await sync_to_async(audit_run.delay)(audit.pk)

    assert (first.get(), second.get()) == ("done", "not claimed")
    assert len(await audit_rows()) == 1
    assert len(models.calls_for("ref")) == 1
    assert (await learning_row(tenant)).uniform_labels == 1


async def test_a_run_that_died_is_taken_over_once_its_lease_ends(api_token, tenant, models):
    audit = await _pending(api_token, tenant, models)
    await Audit.objects.filter(pk=audit.pk).aupdate(
        status=AuditStatus.RUNNING, runs=1, running_until=timezone.now() + timedelta(minutes=1)
    )

    held = await sync_to_async(audits.audit_run)(audit_id=audit.pk, caller=None)
    await Audit.objects.filter(pk=audit.pk).aupdate(
        running_until=timezone.now() - timedelta(seconds=1)
    )
    taken = await sync_to_async(audit_run.delay)(audit.pk)

    assert (held, taken.get()) == ("not claimed", "done")
    await audit.arefresh_from_db()
    assert audit.runs == 2


async def test_a_reference_that_fails_sends_it_back_with_backoff_then_fails_it_for_good(
    api_token, tenant, models
):
    audit = await _pending(api_token, tenant, models)
    models.behaviours["ref"] = Behaviour(fail_status=503)
    await sync_to_async(_budget)(tenant, 10 * USD)

    outcomes = [(await sync_to_async(audit_run.delay)(audit.pk)).get() for _ in range(4)]

    assert outcomes == ["retry", "retry", "retry", "failed"]
    await audit.arefresh_from_db()
    assert (audit.status, audit.runs, audit.payload) == (AuditStatus.FAILED, 4, {})
    assert "503" in audit.last_error or audit.last_error
    assert await audit_rows() == []
    assert not await BudgetReservation.objects.filter(state="held").aexists()


async def test_a_pending_audit_backs_off_before_the_sweeper_sends_it_again(
    api_token, tenant, models
):
    audit = await _pending(api_token, tenant, models)
    models.behaviours["ref"] = Behaviour(fail_status=503)
    await sync_to_async(audit_run.delay)(audit.pk)
    await Audit.objects.filter(pk=audit.pk).aupdate(
        created_at=timezone.now() - outbox.GRACE - timedelta(minutes=1)
    )

    assert await sync_to_async(audits_sweep)() == 0  # its next attempt is not due yet

    await audit.arefresh_from_db()
    assert audit.next_attempt_at > timezone.now()


# --- the outbox -----------------------------------------------------------------------------


async def test_the_sweeper_runs_an_audit_whose_message_the_broker_refused_once(
    api_token, tenant, models
):
    audit = await _pending(api_token, tenant, models)

    assert await sync_to_async(audits_sweep)() == 0  # its message may still be queued
    await Audit.objects.filter(pk=audit.pk).aupdate(
        created_at=timezone.now() - outbox.GRACE - timedelta(minutes=1)
    )
    with broker_down() as refused:
        assert await sync_to_async(audits_sweep)() == 1  # the broker is still down
    assert refused == ["routing.tasks.audit_run"]
    await Audit.objects.filter(pk=audit.pk).aupdate(next_attempt_at=timezone.now())
    assert await sync_to_async(audits_sweep)() == 1
    assert await sync_to_async(audits_sweep)() == 0
    await sync_to_async(lambda: audit_run.delay(audit.pk))()  # a late duplicate

    await audit.arefresh_from_db()
    assert (audit.status, audit.attempts, audit.payload) == (AuditStatus.DONE, 2, {})
    assert len(await audit_rows()) == 1


async def test_the_sweeper_gives_up_on_day_old_audits_and_drops_their_texts(
    api_token, tenant, models
):
    audit = await _pending(api_token, tenant, models)
    await Audit.objects.filter(pk=audit.pk).aupdate(
        created_at=timezone.now() - timedelta(days=1, minutes=1)
    )

    assert await sync_to_async(audits_sweep)() == 0

    await audit.arefresh_from_db()
    assert (audit.status, audit.skip_reason, audit.payload) == (
        AuditStatus.SKIPPED,
        AuditSkip.EXPIRED,
        {},
    )
