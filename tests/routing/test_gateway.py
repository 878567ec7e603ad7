"""The OpenAI-compatible gateway, in process (Django's async test client)."""

import json
import os
from datetime import timedelta

import pytest
from asgiref.sync import sync_to_async
from django.test import AsyncClient
from django.utils import timezone

from routing.enums import UsageStatus
from routing.models import UsageEvent
from tenants.enums import Scope
from tenants.models import EndUser
from tenants.services import token_create, token_revoke
from tests.support.fake_upstream import Behaviour

pytestmark = pytest.mark.django_db(transaction=True)

CHAT = "/v1/chat/completions"


def body(model="demo/small", content="What is 2 + 2?", **extra):
    return json.dumps({"model": model, "messages": [{"role": "user", "content": content}], **extra})


async def post(token, data, **headers):
    client = AsyncClient()
    if token is not None:
        headers["Authorization"] = f"Bearer {token}"
    return await client.post(CHAT, data=data, content_type="application/json", headers=headers)


def error_of(response):
    payload = json.loads(response.content)
    assert set(payload) == {"error"}
    assert set(payload["error"]) == {"message", "type", "param", "code"}
    return payload["error"]


@sync_to_async
def events(**filters):
    return list(UsageEvent.objects.filter(**filters).order_by("id"))


async def test_demo_completion_answers_and_writes_ledger(api_token):
    response = await post(api_token.raw, body(content="What is 12 * (3 + 4)?", user="alice"))

    assert response.status_code == 200
    data = json.loads(response.content)
    assert data["object"] == "chat.completion"
    assert data["model"] == "demo/small"
    assert "84" in data["choices"][0]["message"]["content"]
    assert response["x-request-id"].startswith("req_")
    assert response["x-cascade-model"] == "demo/small"
    assert response["x-cascade-escalated"] == "false"
    [event] = await events()
    assert event.request_id == response["x-request-id"]
    assert event.tenant_id == api_token.token.tenant_id
    assert event.token_id == api_token.token.pk
    assert event.status == UsageStatus.OK
    assert event.prompt_tokens == data["usage"]["prompt_tokens"]
    assert event.completion_tokens == data["usage"]["completion_tokens"]
    # demo/small: $0.15 / $0.60 per million tokens = 150 / 600 nano-dollars a token
    expected = event.prompt_tokens * 150 + event.completion_tokens * 600
    assert event.cost_nanos == expected
    assert response["x-cascade-cost-usd"] == f"{expected / 1e9:.9f}"
    assert event.models_called == ["demo/small"]
    end_user = await EndUser.objects.aget(pk=event.end_user_id)
    assert end_user.external_id == "alice"


async def test_end_users_are_created_once_per_tenant(api_token, other_api_token):
    await post(api_token.raw, body(user="alice"))
    await post(api_token.raw, body(user="alice"))
    await post(other_api_token.raw, body(user="alice"))

    rows = await sync_to_async(list)(EndUser.objects.values_list("tenant__slug", "external_id"))
    assert sorted(rows) == [("acme", "alice"), ("globex", "alice")]


@pytest.mark.parametrize(
    ("authorization", "message"),
    [
        (None, "Missing API key"),
        ("Bearer cf_not-a-real-token", "Incorrect API key"),
        ("Basic dXNlcjpwYXNz", "Missing API key"),
    ],
)
async def test_bad_credentials_get_401_in_openai_shape(db, authorization, message):
    client = AsyncClient()
    headers = {"Authorization": authorization} if authorization else {}
    response = await client.post(
        CHAT, data=body(), content_type="application/json", headers=headers
    )

    assert response.status_code == 401
    error = error_of(response)
    assert error["type"] == "authentication_error"
    assert error["code"] == "invalid_api_key"
    assert message in error["message"]
    assert response["x-request-id"].startswith("req_")
    assert await events() == []


async def test_revoked_token_is_refused(api_token):
    await sync_to_async(token_revoke)(tenant=api_token.token.tenant, token=api_token.token)

    response = await post(api_token.raw, body())

    assert response.status_code == 401
    assert "revoked" in error_of(response)["message"]


async def test_expired_token_is_refused(tenant):
    issued = await sync_to_async(token_create)(
        tenant=tenant, name="old", expires_at=timezone.now() - timedelta(seconds=1)
    )

    response = await post(issued.raw, body())

    assert response.status_code == 401
    assert "expired" in error_of(response)["message"]


async def test_inactive_tenant_token_is_refused(api_token, tenant):
    tenant.is_active = False
    await tenant.asave(update_fields=["is_active"])

    response = await post(api_token.raw, body())

    assert response.status_code == 401


async def test_token_without_completions_scope_gets_403(tenant):
    issued = await sync_to_async(token_create)(tenant=tenant, name="ro", scopes=[Scope.USAGE_READ])

    response = await post(issued.raw, body())

    assert response.status_code == 403
    assert error_of(response)["code"] == "insufficient_scope"


async def test_auth_is_checked_before_the_body(db):
    response = await post("cf_wrong", b"{not json")

    assert response.status_code == 401


@pytest.mark.parametrize(
    ("payload", "param", "code"),
    [
        (b"{not json", None, "invalid_json"),
        (b"[1, 2]", None, "invalid_json"),
        (json.dumps({"messages": [{"role": "user", "content": "hi"}]}), "model", "invalid_request"),
        (json.dumps({"model": "demo/small", "messages": []}), "messages", "invalid_request"),
        (
            json.dumps({"model": "demo/small", "messages": [{"role": "wizard", "content": "x"}]}),
            "messages[0].role",
            "invalid_request",
        ),
        (body(temperature=3), "temperature", "invalid_request"),
        (body(max_tokens=0), "max_tokens", "invalid_request"),
        (body(stream="yes"), "stream", "invalid_request"),
        (body(top_logprobs=3), "top_logprobs", "invalid_request"),
        (body(tools=[{"type": "function"}]), "tools", "invalid_request"),
        (body(response_format={"type": "yaml"}), "response_format", "invalid_request"),
        (body(user="x" * 300), "user", "invalid_request"),
    ],
)
async def test_bad_requests_get_400_with_the_param(api_token, payload, param, code):
    response = await post(api_token.raw, payload)

    assert response.status_code == 400
    error = error_of(response)
    assert error["type"] == "invalid_request_error"
    assert error["param"] == param
    assert error["code"] == code
    assert await events() == []


async def test_unknown_model_is_404_and_disallowed_model_is_403(api_token, tenant, fake_models):
    response = await post(api_token.raw, body(model="nope/never"))
    assert response.status_code == 404
    assert error_of(response)["code"] == "model_not_found"

    tenant.allowed_models = ["fake/fallback"]
    await tenant.asave(update_fields=["allowed_models"])
    response = await post(api_token.raw, body(model="fake/gpt"))
    assert response.status_code == 403
    assert error_of(response)["code"] == "model_not_allowed"


async def test_body_over_the_limit_is_413(api_token, settings):
    settings.CASCADEFLOW_MAX_REQUEST_BYTES = 1000
    settings.DATA_UPLOAD_MAX_MEMORY_SIZE = 1000

    response = await post(api_token.raw, body(content="x" * 2000))

    assert response.status_code == 413
    assert error_of(response)["code"] == "request_too_large"


async def test_wrong_method_and_unknown_path_are_openai_errors(api_token):
    client = AsyncClient()
    auth = {"Authorization": f"Bearer {api_token.raw}"}

    response = await client.get(CHAT, headers=auth)
    assert response.status_code == 405
    assert error_of(response)["code"] == "method_not_allowed"

    response = await client.get("/v1/embeddings-nope", headers=auth)
    assert response.status_code == 404
    assert error_of(response)["code"] == "unknown_url"
    assert response["x-request-id"].startswith("req_")


async def test_models_lists_profiles_demo_and_allowed_models(api_token, tenant, fake_models):
    client = AsyncClient()
    auth = {"Authorization": f"Bearer {api_token.raw}"}
    presets = [
        "cascade/cost_optimized",
        "cascade/balanced",
        "cascade/quality_first",
        "cascade/fast",
    ]
    demo_models = ["demo/small", "demo/medium", "demo/large", "demo/embed"]

    async def ids():
        response = await client.get("/v1/models", headers=auth)
        return [m["id"] for m in json.loads(response.content)["data"]]

    listed = await ids()
    assert listed[:8] == presets + demo_models
    assert {"fake/gpt", "fake/fallback", "fake/embed"} <= set(listed)

    tenant.allowed_models = ["fake/gpt"]
    await tenant.asave(update_fields=["allowed_models"])
    assert await ids() == [*presets, *demo_models, "fake/gpt"]

    response = await client.get("/v1/models", headers={"Authorization": "Bearer cf_bad"})
    assert response.status_code == 401


# --- through LiteLLM's OpenAI client to the fake upstream ---------------------------


async def test_parameters_pass_through_and_litellm_only_keys_are_dropped(api_token, fake_models):
    tools = [
        {
            "type": "function",
            "function": {
                "name": "get_weather",
                "parameters": {"type": "object", "properties": {"city": {"type": "string"}}},
            },
        }
    ]
    fmt = {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "object"}}}
    payload = json.loads(
        body(
            model="fake/gpt",
            tools=tools,
            tool_choice="auto",
            response_format=fmt,
            logprobs=True,
            top_logprobs=2,
            temperature=0.2,
            seed=7,
            user="bob",
        )
    )
    payload["api_base"] = "http://attacker.invalid/v1"
    payload["api_key"] = "sk-stolen"
    payload["mock_response"] = "pwned"

    response = await post(api_token.raw, json.dumps(payload))

    assert response.status_code == 200, response.content
    [sent] = fake_models.requests
    assert sent["model"] == "gpt-fake"
    assert sent["tools"] == tools
    assert sent["tool_choice"] == "auto"
    assert sent["response_format"] == fmt
    assert sent["logprobs"] is True
    assert sent["top_logprobs"] == 2
    assert sent["seed"] == 7
    assert "user" not in sent  # end-user ids stay with CascadeFlow, not the provider
    assert "api_base" not in sent and "mock_response" not in sent
    data = json.loads(response.content)
    assert data["choices"][0]["logprobs"]["content"][0]["logprob"] == pytest.approx(-0.05)
    # Every entry as the upstream sent it, on both transports.
    assert data["choices"][0]["logprobs"]["content"] == [
        {"token": w, "logprob": -0.05, "bytes": list(w.encode()), "top_logprobs": []}
        for w in "Hello from the fake upstream.".split(" ")
    ]
    assert data["choices"][0]["message"]["content"] == "Hello from the fake upstream."


async def test_tool_calls_come_back(api_token, fake_models):
    call = {
        "id": "call_1",
        "type": "function",
        "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'},
    }
    fake_models.behaviours["gpt-fake"] = Behaviour(tool_calls=[call])
    tools = [{"type": "function", "function": {"name": "get_weather", "parameters": {}}}]

    response = await post(api_token.raw, body(model="fake/gpt", tools=tools))

    choice = json.loads(response.content)["choices"][0]
    assert choice["finish_reason"] == "tool_calls"
    assert choice["message"]["tool_calls"][0]["function"] == call["function"]


async def test_upstream_cost_uses_catalog_price(api_token, fake_models):
    fake_models.behaviours["gpt-fake"] = Behaviour(prompt_tokens=1000, completion_tokens=500)

    response = await post(api_token.raw, body(model="fake/gpt"))

    [event] = await events()
    # $1 / $2 per million tokens: 1000 * 1000n + 500 * 2000n
    assert event.cost_nanos == 2_000_000
    assert response["x-cascade-cost-usd"] == "0.002000000"


# Usage a provider (a tenant's own server) reports that cannot be counts of tokens: once a
# negative cost or an overflow, and a ledger row that the database refused. LiteLLM's own
# client may refuse an answer whose counts are not numbers (the call's error, a 502).
HOSTILE_USAGE = {
    "negative": {"prompt_tokens": -1000, "completion_tokens": -500, "total_tokens": -1500},
    "beyond any call": {"prompt_tokens": 10**12, "completion_tokens": 3 * 10**9},
    "numbers as text": {"prompt_tokens": "1000", "completion_tokens": "many"},
    "not an object": "lots",
}
LITELLM_MAY_REFUSE = {"numbers as text", "not an object"}


@pytest.mark.parametrize("stream", [False, True], ids=["complete", "stream"])
@pytest.mark.parametrize("case", HOSTILE_USAGE)
async def test_usage_that_cannot_be_counts_is_counted_by_the_gateway(
    api_token, fake_models, case, stream
):
    fake_models.behaviours["gpt-fake"] = Behaviour(
        content="one two three", usage=HOSTILE_USAGE[case]
    )
    may_refuse = (
        case in LITELLM_MAY_REFUSE and os.environ["CASCADEFLOW_OPENAI_FAST_PATH"] == "false"
    )

    response = await post(api_token.raw, body(model="fake/gpt", stream=stream))

    if stream:
        assert response.status_code == 200  # the stream had begun
        answered = (await read_stream(response))[-1] == "data: [DONE]"
    else:
        assert response.status_code in ({200, 502} if may_refuse else {200})
        answered = response.status_code == 200
    [event] = await events()  # written either way
    assert event.cost_nanos >= 0 and event.prompt_tokens >= 0 and event.completion_tokens >= 0
    assert answered or may_refuse
    if answered:
        assert event.status == UsageStatus.OK
        assert 5 <= event.prompt_tokens <= 40 and 1 <= event.completion_tokens <= 10
        # $1 / $2 per million tokens, on the gateway's own count
        assert event.cost_nanos == event.prompt_tokens * 1000 + event.completion_tokens * 2000


@pytest.mark.parametrize(
    ("status", "expected_status", "code"),
    [
        (500, 502, "upstream_error"),
        (503, 503, "upstream_unavailable"),
        (429, 503, "upstream_rate_limited"),
        (401, 502, "upstream_error"),
    ],
)
async def test_upstream_failure_is_recorded_and_mapped(
    api_token, fake_models, status, expected_status, code
):
    fake_models.behaviours["failing"] = Behaviour(fail_status=status)

    response = await post(api_token.raw, body(model="fake/failing", user="carol"))

    assert response.status_code == expected_status
    error = error_of(response)
    assert error["code"] == code
    assert error["type"] == "api_error"
    [event] = await events()
    assert event.status == UsageStatus.UPSTREAM_ERROR
    assert event.http_status == expected_status
    assert event.error_code == code
    assert event.cost_nanos == 0
    assert event.end_user_id is not None
    # one retry of the only deployment, then the error
    assert [a["status"] for a in event.expanded_attempts] == ["error", "error"]
    assert event.request_id == response["x-request-id"]


async def test_upstream_400_is_the_clients_error(api_token, fake_models):
    fake_models.behaviours["failing"] = Behaviour(fail_status=400)

    response = await post(api_token.raw, body(model="fake/failing"))

    assert response.status_code == 400
    assert error_of(response)["code"] == "upstream_bad_request"
    [event] = await events()
    assert event.http_status == 400


async def test_malformed_upstream_answer_is_a_502(api_token, fake_models):
    fake_models.behaviours["failing"] = Behaviour(malformed=True)

    response = await post(api_token.raw, body(model="fake/failing"))

    assert response.status_code == 502
    [event] = await events()
    assert event.status == UsageStatus.UPSTREAM_ERROR


async def test_failed_deployment_falls_back_to_the_next(api_token, fake_models):
    fake_models.behaviours["primary"] = Behaviour(fail_status=500)
    fake_models.behaviours["secondary"] = Behaviour(content="from secondary")

    response = await post(api_token.raw, body(model="fake/fallback"))

    assert response.status_code == 200
    assert json.loads(response.content)["choices"][0]["message"]["content"] == "from secondary"
    # the primary is tried, retried once, then the secondary answers
    assert [r["model"] for r in fake_models.requests] == ["primary", "primary", "secondary"]
    [event] = await events()
    assert [a["status"] for a in event.expanded_attempts] == ["error", "error", "ok"]
    assert event.status == UsageStatus.OK


# --- streaming ---------------------------------------------------------------------------


async def read_stream(response) -> list[str]:
    chunks = [c async for c in response.streaming_content]
    text = b"".join(chunks).decode()
    return [block for block in text.split("\n\n") if block]


async def test_stream_relays_chunks_then_done_and_records(api_token, fake_models):
    fake_models.behaviours["gpt-fake"] = Behaviour(content="one two three", prompt_tokens=9)

    response = await post(api_token.raw, body(model="fake/gpt", stream=True))

    assert response.status_code == 200
    assert response["content-type"] == "text/event-stream"
    blocks = await read_stream(response)
    assert blocks[-1] == "data: [DONE]"
    datas = [json.loads(b[6:]) for b in blocks if b.startswith("data: {")]
    text = "".join(c["choices"][0]["delta"].get("content") or "" for c in datas if c["choices"])
    assert text == "one two three"
    assert all("usage" not in c for c in datas)  # the client did not ask for usage
    assert all(c["model"] == "fake/gpt" for c in datas)
    [event] = await events()
    assert event.stream is True
    assert (event.prompt_tokens, event.completion_tokens) == (9, 3)
    assert event.cost_nanos == 9 * 1000 + 3 * 2000


async def test_stream_include_usage_is_honoured(api_token, fake_models):
    response = await post(
        api_token.raw, body(model="fake/gpt", stream=True, stream_options={"include_usage": True})
    )

    blocks = await read_stream(response)
    datas = [json.loads(b[6:]) for b in blocks if b.startswith("data: {")]
    assert datas[-1]["usage"]["completion_tokens"] == 5


async def test_stream_error_before_first_chunk_is_an_http_error(api_token, fake_models):
    fake_models.behaviours["failing"] = Behaviour(fail_status=500)

    response = await post(api_token.raw, body(model="fake/failing", stream=True))

    assert response.status_code == 502
    assert error_of(response)["code"] == "upstream_error"
    [event] = await events()
    assert event.status == UsageStatus.UPSTREAM_ERROR


async def test_stream_dying_midway_sends_an_error_event_and_records(api_token, fake_models):
    fake_models.behaviours["failing"] = Behaviour(content="a b c", die_mid_stream=True)

    response = await post(api_token.raw, body(model="fake/failing", stream=True))

    blocks = await read_stream(response)
    assert "data: [DONE]" not in blocks
    assert '"error"' in blocks[-1]
    [event] = await events()
    assert event.status == UsageStatus.UPSTREAM_ERROR


async def test_demo_stream_ledger_matches_usage(api_token):
    response = await post(
        api_token.raw,
        body(
            model="demo/medium",
            content="Tell me about rivers",
            stream=True,
            stream_options={"include_usage": True},
        ),
    )

    blocks = await read_stream(response)
    usage = json.loads(blocks[-3][6:])["usage"]
    [event] = await events()
    assert (event.prompt_tokens, event.completion_tokens) == (
        usage["prompt_tokens"],
        usage["completion_tokens"],
    )
    assert blocks[-2].startswith(": cascade ")
    assert (
        json.loads(blocks[-2][len(": cascade ") :])["cost_usd"] == f"{event.cost_nanos / 1e9:.9f}"
    )


async def test_token_last_used_is_touched(api_token):
    assert api_token.token.last_used_at is None

    await post(api_token.raw, body())

    await api_token.token.arefresh_from_db()
    assert api_token.token.last_used_at is not None
