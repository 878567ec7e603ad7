"""The gateway driving the cascade engine: profiles, headers, ledger rows, streaming."""

import json

import pytest
from asgiref.sync import sync_to_async

from routing.models import RoutingProfile, UsageEvent
from tenants.services import tenant_settings_update
from tests.engine.test_agent import HARD
from tests.routing.test_gateway import error_of, post, read_stream

pytestmark = pytest.mark.django_db(transaction=True)


@pytest.fixture(autouse=True)
def _uncalibrated(tenant):
    """The presets as they run with no calibration: a tenant that does not audit (a tenant
    that does runs the learned calibration, or the cold start: tests/routing/test_audits.py)."""
    tenant_settings_update(tenant=tenant, audits_enabled=False)


def chat(model, messages, **extra):
    return json.dumps({"model": model, "messages": messages, **extra})


@sync_to_async
def last_event():
    return UsageEvent.objects.order_by("-id").first()


async def test_easy_query_on_a_preset_is_answered_cheaply_and_explained(api_token):
    response = await post(
        api_token.raw, chat("cascade/balanced", [{"role": "user", "content": "What is 12 + 30?"}])
    )

    assert response.status_code == 200
    assert response["x-cascade-model"] == "demo/small"
    assert response["x-cascade-escalated"] == "false"
    assert response["x-cascade-profile"] == "cascade/balanced"
    assert float(response["x-cascade-savings-usd"]) > 0
    body = json.loads(response.content)
    assert body["model"] == "demo/small"
    assert body["choices"][0].get("logprobs") is None
    event = await last_event()
    assert (event.profile, event.domain, event.baseline_method) == (
        "cascade/balanced",
        "math",
        "estimated",
    )
    assert event.quality_score is not None
    assert event.baseline_cost_nanos > event.cost_nanos
    check = event.expanded_attempts[0]["check"]
    assert check["accepted"] is True
    assert check["features"]["has_logprobs"] == 1.0
    assert any("p(acceptable)" in r for r in check["reasons"])
    assert "p(acceptable)" not in json.dumps(event.attempts)  # stored as numbers, worded on read
    assert f"{event.cost_nanos / 1e9:.9f}" == response["x-cascade-cost-usd"]


async def test_hard_query_escalates_and_the_ledger_says_so(api_token):
    response = await post(api_token.raw, chat("cascade/quality_first", HARD))

    assert response["x-cascade-escalated"] == "true"
    assert response["x-cascade-model"] != "demo/small"
    event = await last_event()
    assert event.escalated
    assert event.models_called[0] == "demo/small"
    assert event.expanded_attempts[0]["decision"] == "escalated"
    assert event.cost_nanos == sum(a["cost_nanos"] for a in event.expanded_attempts)
    assert float(response["x-cascade-savings-usd"]) == pytest.approx(
        (event.baseline_cost_nanos - event.cost_nanos) / 1e9
    )


async def test_tenant_profile_routes_a_domain_to_its_own_chain(api_token, tenant, other_tenant):
    await RoutingProfile.objects.acreate(
        tenant=tenant,
        name="support",
        chain=["demo/small", "demo/large"],
        domain_routes={"code": {"chain": ["demo/medium", "demo/large"]}},
    )
    code = [{"role": "user", "content": "Fix this python function: ```def f(x): return x +```"}]

    await post(api_token.raw, chat("cascade/support", code))
    code_event = await last_event()
    await post(
        api_token.raw, chat("cascade/support", [{"role": "user", "content": "What is 2 + 2?"}])
    )
    math_event = await last_event()

    assert code_event.domain == "code"
    assert code_event.models_called[0] == "demo/medium"
    assert math_event.models_called[0] == "demo/small"


async def test_another_tenants_profile_does_not_exist_for_you(api_token, other_tenant):
    await RoutingProfile.objects.acreate(tenant=other_tenant, name="secret", chain=["demo/small"])

    response = await post(
        api_token.raw, chat("cascade/secret", [{"role": "user", "content": "hi"}])
    )

    assert response.status_code == 404
    assert error_of(response)["code"] == "model_not_found"


async def test_profile_overrides_the_builtin_of_the_same_name(api_token, tenant):
    await RoutingProfile.objects.acreate(tenant=tenant, name="balanced", chain=["demo/large"])

    response = await post(
        api_token.raw, chat("cascade/balanced", [{"role": "user", "content": "What is 1 + 1?"}])
    )

    assert response["x-cascade-model"] == "demo/large"


async def test_profile_with_only_disallowed_models_is_refused(api_token, tenant, fake_models):
    tenant.allowed_models = ["fake/fallback"]
    await tenant.asave(update_fields=["allowed_models"])
    await RoutingProfile.objects.acreate(tenant=tenant, name="gpt", chain=["fake/gpt"])

    response = await post(api_token.raw, chat("cascade/gpt", [{"role": "user", "content": "hi"}]))

    assert response.status_code == 403
    assert error_of(response)["code"] == "model_not_allowed"


async def test_cascade_stream_escalation_streams_the_final_model(api_token):
    response = await post(api_token.raw, chat("cascade/quality_first", HARD, stream=True))

    assert response["x-cascade-escalated"] == "true"
    blocks = await read_stream(response)
    assert blocks[-1] == "data: [DONE]"
    models = {json.loads(b[6:])["model"] for b in blocks if b.startswith("data: {")}
    assert models == {response["x-cascade-model"]}
    event = await last_event()
    assert event.stream and event.escalated
    assert event.expanded_attempts[-1]["completion_tokens"] > 0


async def test_cascade_stream_of_an_accepted_draft(api_token):
    response = await post(
        api_token.raw,
        chat(
            "cascade/balanced",
            [{"role": "user", "content": "What is 6 * 7?"}],
            stream=True,
            stream_options={"include_usage": True},
        ),
    )

    blocks = await read_stream(response)
    datas = [json.loads(b[6:]) for b in blocks if b.startswith("data: {")]
    text = "".join(c["choices"][0]["delta"].get("content", "") for c in datas if c["choices"])
    assert "42" in text
    assert datas[-1]["usage"]["completion_tokens"] > 0
    event = await last_event()
    assert (event.model, event.escalated) == ("demo/small", False)


@pytest.mark.parametrize("stream", [False, True], ids=["complete", "stream"])
@pytest.mark.parametrize(
    ("content", "response_format", "verdict"),
    [
        ("[" * 100_000 + "]" * 100_000, {"type": "json_object"}, "nested too deeply to read"),
        ('{"n": ' + "9" * 5000 + "}", {"type": "json_object"}, "number too long to read"),
        (
            "```python\nx = " + " + ".join(["1"] * 3000) + "\n```\n",
            None,
            "Python code is nested too deeply to parse",
        ),
    ],
    ids=["deep JSON", "long integer", "deep Python"],
)
async def test_a_draft_python_cannot_read_escalates_instead_of_a_500(
    api_token, tenant, fake_models, content, response_format, verdict, stream
):
    # The draft is what the sender asked the model for: answered by the next model, with
    # the paid draft in the ledger, never an internal error.
    from tests.support.fake_upstream import Behaviour

    fake_models.behaviours["gpt-fake"] = Behaviour(content=content, completion_tokens=50)
    await RoutingProfile.objects.acreate(
        tenant=tenant, name="deep", chain=["fake/gpt", "demo/large"]
    )
    extra = {"response_format": response_format} if response_format else {}

    response = await post(
        api_token.raw,
        chat("cascade/deep", [{"role": "user", "content": "Nest it."}], stream=stream, **extra),
    )

    assert response.status_code == 200
    assert (response["x-cascade-escalated"], response["x-cascade-model"]) == ("true", "demo/large")
    if stream:
        assert (await read_stream(response))[-1] == "data: [DONE]"
    event = await last_event()
    assert event.status == "ok" and event.escalated
    draft = event.expanded_attempts[0]
    assert (draft["model"], draft["decision"]) == ("fake/gpt", "escalated")
    assert verdict in draft["check"]["hard_fail"]
    assert draft["cost_nanos"] > 0 and event.cost_nanos >= draft["cost_nanos"]
