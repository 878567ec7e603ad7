"""``POST /v1/embeddings``: the offline ``demo/embed``, catalog and tenants' own embedding
models through the fake upstream, the ledger and its price, budgets, rate limits, scopes,
hostile input, tenant isolation, traces, and the official OpenAI SDK over HTTP.

In process (Django's async test client) for the gateway's behaviour, and through the
official OpenAI SDK against CascadeFlow under uvicorn (SQLite and PostgreSQL) for the
wire shapes the SDK sends and parses.
"""

import base64
import json
import math
import struct
import threading

import openai
import pytest
from asgiref.sync import sync_to_async
from django.test import AsyncClient
from opentelemetry.trace import SpanKind
from rest_framework.test import APIClient

from routing.embeddings import MAX_INPUTS, parse_embedding_request
from routing.engine.embeddings import embeddings_of
from routing.engine.openai_wire import ProviderHTTPError
from routing.enums import UsageStatus
from routing.errors import GatewayError
from routing.models import RoutingProfile, UsageEvent
from routing.profiles import ProfileInvalid, profile_create
from routing.providers import demo
from routing.providers.catalog import CatalogError, ModelCatalog
from tenants.enums import Scope
from tenants.models import EndUser, EndUserTier
from tenants.services import token_create
from tests.api.test_hostile_inputs import UNREADABLE, breaker_is_closed, openai_error
from tests.support.fake_upstream import Behaviour, fake_vector
from tests.tenants.test_budgets import USD, spend, tenant_budget

EMBEDDINGS = "/v1/embeddings"
CHAT = "/v1/chat/completions"
DEMO_PRICE = 20  # nano-dollars a token: demo/embed costs $0.02 per million tokens
FAKE_PRICE = 100  # fake/embed: $0.10 per million
db = pytest.mark.django_db(transaction=True)


def body(input="The quick brown fox", model="demo/embed", **extra) -> str:
    return json.dumps({"model": model, "input": input, **extra})


async def post(token, data, url=EMBEDDINGS, **headers):
    if token is not None:
        headers["Authorization"] = f"Bearer {token}"
    return await AsyncClient().post(
        url, data=data, content_type="application/json", headers=headers
    )


def answer(response) -> dict:
    assert response.status_code == 200, response.content
    assert response["content-type"] == "application/json"
    return json.loads(response.content)


@sync_to_async
def events(**filters):
    return list(UsageEvent.objects.filter(**filters).order_by("id"))


def norm(vector) -> float:
    return math.sqrt(sum(x * x for x in vector))


def cosine(a, b) -> float:
    return sum(x * y for x, y in zip(a, b, strict=True)) / (norm(a) * norm(b))


def floats_of(encoded: str) -> list[float]:
    raw = base64.b64decode(encoded)
    return list(struct.unpack(f"<{len(raw) // 4}f", raw))


def float32(vector) -> list[float]:
    return list(struct.unpack(f"<{len(vector)}f", struct.pack(f"<{len(vector)}f", *vector)))


# --- demo/embed: the answer, the ledger row, the headers ------------------------------------


@db
async def test_a_string_is_one_unit_vector_priced_and_recorded_like_a_direct_chat(api_token):
    response = await post(api_token.raw, body("The quick brown fox", user="alice"))

    data = answer(response)
    assert set(data) == {"object", "data", "model", "usage"}
    assert (data["object"], data["model"]) == ("list", "demo/embed")
    [item] = data["data"]
    assert (item["object"], item["index"]) == ("embedding", 0)
    assert len(item["embedding"]) == 256
    assert norm(item["embedding"]) == pytest.approx(1.0, abs=1e-6)
    tokens = data["usage"]["prompt_tokens"]
    assert data["usage"] == {"prompt_tokens": tokens, "total_tokens": tokens}
    assert tokens == 4

    [event] = await events()
    assert event.request_id == response["x-request-id"]
    assert (event.status, event.http_status, event.stream) == (UsageStatus.OK, 200, False)
    assert (event.requested_model, event.model, event.models_called) == (
        "demo/embed",
        "demo/embed",
        ["demo/embed"],
    )
    assert (event.prompt_tokens, event.completion_tokens) == (tokens, 0)
    assert event.cost_nanos == tokens * DEMO_PRICE
    assert event.baseline_cost_nanos == event.cost_nanos  # one model: no saving
    assert (event.baseline_method, event.escalated, event.profile) == ("actual", False, "")
    assert event.byok_cost_nanos == 0
    [attempt] = event.expanded_attempts
    assert (attempt["role"], attempt["decision"], attempt["status"]) == ("final", "returned", "ok")
    end_user = await EndUser.objects.aget(pk=event.end_user_id)
    assert end_user.external_id == "alice"

    assert response["x-cascade-model"] == "demo/embed"
    assert response["x-cascade-escalated"] == "false"
    assert response["x-cascade-cost-usd"] == f"{event.cost_nanos / 1e9:.9f}"
    assert response["x-cascade-savings-usd"] == "0.000000000"
    assert response["x-request-id"].startswith("req_")


@db
async def test_vectors_are_deterministic_and_texts_sharing_words_are_close(api_token):
    texts = [
        "the cat sat on the mat",
        "the cat sat on the mat",
        "a cat sat on a mat today",
        "quarterly revenue grew by nine percent",
    ]
    data = answer(await post(api_token.raw, body(texts)))

    vectors = [item["embedding"] for item in data["data"]]
    assert [item["index"] for item in data["data"]] == [0, 1, 2, 3]
    assert vectors[0] == vectors[1]
    assert cosine(vectors[0], vectors[2]) > 0.5 > abs(cosine(vectors[0], vectors[3]))
    assert vectors[0] == demo.demo_vector(texts[0], 256)
    [event] = await events()
    assert event.prompt_tokens == data["usage"]["prompt_tokens"]


@db
async def test_token_ids_and_lists_of_token_ids_are_inputs(api_token):
    one = answer(await post(api_token.raw, body([1, 2, 3])))
    several = answer(await post(api_token.raw, body([[1, 2, 3], [4, 5]])))

    assert len(one["data"]) == 1 and one["usage"]["prompt_tokens"] == 3
    assert [len(i["embedding"]) for i in several["data"]] == [256, 256]
    assert several["usage"]["prompt_tokens"] == 5
    assert one["data"][0]["embedding"] == several["data"][0]["embedding"]
    assert [e.cost_nanos for e in await events()] == [3 * DEMO_PRICE, 5 * DEMO_PRICE]


@db
async def test_base64_is_the_little_endian_float32_bytes_of_the_float_answer(api_token):
    texts = ["first text", "second text"]
    floats = answer(await post(api_token.raw, body(texts)))
    packed = answer(await post(api_token.raw, body(texts, encoding_format="base64")))

    for as_float, as_base64 in zip(floats["data"], packed["data"], strict=True):
        assert isinstance(as_base64["embedding"], str)
        assert floats_of(as_base64["embedding"]) == float32(as_float["embedding"])
    assert packed["usage"] == floats["usage"]


@db
async def test_dimensions_shorten_the_demo_vectors_up_to_their_size(api_token):
    data = answer(await post(api_token.raw, body("Short please", dimensions=32)))
    too_many = await post(api_token.raw, body("Long please", dimensions=257))

    assert len(data["data"][0]["embedding"]) == 32
    assert norm(data["data"][0]["embedding"]) == pytest.approx(1.0, abs=1e-6)
    error = openai_error(too_many)
    assert (too_many.status_code, error["param"], error["code"]) == (
        400,
        "dimensions",
        "invalid_value",
    )
    assert "256" in error["message"]
    assert len(await events()) == 1  # refused before admission


@db
async def test_a_large_batch_is_served_and_the_demo_model_works_off_the_event_loop(
    api_token, monkeypatch
):
    threaded = []
    original = demo._embed

    def spy(*args):
        threaded.append(threading.current_thread() is not threading.main_thread())
        return original(*args)

    monkeypatch.setattr(demo, "_embed", spy)
    texts = [f"document number {i} about lighthouses and harbours" for i in range(MAX_INPUTS)]

    data = answer(await post(api_token.raw, body(texts, encoding_format="base64")))

    assert len(data["data"]) == MAX_INPUTS
    assert [item["index"] for item in data["data"]] == list(range(MAX_INPUTS))
    assert threaded == [True]
    [event] = await events()
    assert event.prompt_tokens == data["usage"]["prompt_tokens"] > MAX_INPUTS


@db
async def test_models_lists_the_embedding_models(api_token):
    response = await AsyncClient().get(
        "/v1/models", headers={"Authorization": f"Bearer {api_token.raw}"}
    )
    one = await AsyncClient().get(
        "/v1/models/demo/embed", headers={"Authorization": f"Bearer {api_token.raw}"}
    )

    listed = {m["id"]: m["owned_by"] for m in json.loads(response.content)["data"]}
    assert listed["demo/embed"] == "cascadeflow-demo"
    assert json.loads(one.content)["id"] == "demo/embed"


# --- what a model is for -----------------------------------------------------------------


@db
@pytest.mark.parametrize(
    ("model", "status", "code", "said"),
    [
        ("demo/small", 400, "model_not_supported", "is a chat model, not an embedding model"),
        ("cascade/balanced", 400, "model_not_supported", "is a routing profile"),
        ("cascade/support", 400, "model_not_supported", "is a routing profile"),
        ("cascade/one", 400, "model_not_supported", "is a routing profile"),
        ("nope/nothing", 404, "model_not_found", "does not exist"),
    ],
)
async def test_only_an_embedding_model_embeds(api_token, tenant, model, status, code, said):
    await RoutingProfile.objects.acreate(
        tenant=tenant, name="support", chain=["demo/small", "demo/large"]
    )
    await RoutingProfile.objects.acreate(tenant=tenant, name="one", chain=["demo/small"])

    response = await post(api_token.raw, body(model=model))

    error = openai_error(response)
    assert (response.status_code, error["param"], error["code"]) == (status, "model", code)
    assert said in error["message"]
    if status == 400:
        assert "Embedding models you can use: demo/embed." in error["message"]
    assert await events() == []
    assert response["x-cascade-model"] == "none"


@db
@pytest.mark.parametrize("url", [CHAT, "/v1/responses"])
async def test_an_embedding_model_answers_no_chat_and_its_breaker_stays_closed(
    api_token, settings, url
):
    settings.CASCADEFLOW_BREAKER_FAILURES = 1
    data = (
        json.dumps({"model": "demo/embed", "messages": [{"role": "user", "content": "hi"}]})
        if url == CHAT
        else json.dumps({"model": "demo/embed", "input": "hi"})
    )

    response = await post(api_token.raw, data, url=url)

    error = openai_error(response)
    assert (response.status_code, error["param"], error["code"]) == (
        400,
        "model",
        "model_not_supported",
    )
    assert "POST /v1/embeddings" in error["message"]
    assert await events() == []
    assert await breaker_is_closed("demo/embed")
    assert answer(await post(api_token.raw, body()))["model"] == "demo/embed"


@db
async def test_profiles_and_the_default_chain_never_hold_an_embedding_model(
    api_token, tenant, settings
):
    with pytest.raises(ProfileInvalid) as caught:
        await sync_to_async(profile_create)(
            tenant=tenant, name="bad", chain=["demo/small", "demo/embed"]
        )
    assert "Embedding models answer no chat: demo/embed." in str(caught.value)
    with pytest.raises(ProfileInvalid) as caught:
        await sync_to_async(profile_create)(
            tenant=tenant, name="bad", chain=["demo/small"], judge_model="demo/embed"
        )
    assert "judge_model" in caught.value.errors

    # A stored profile written before the rule is refused when used, not sent upstream.
    await RoutingProfile.objects.acreate(
        tenant=tenant, name="old", chain=["demo/small", "demo/embed"]
    )
    stored = await post(
        api_token.raw,
        json.dumps({"model": "cascade/old", "messages": [{"role": "user", "content": "hi"}]}),
        url=CHAT,
    )
    assert openai_error(stored)["code"] == "profile_misconfigured"

    settings.CASCADEFLOW_DEFAULT_CHAIN = ["demo/small", "demo/embed"]
    preset = await post(
        api_token.raw,
        json.dumps({"model": "cascade/fast", "messages": [{"role": "user", "content": "hi"}]}),
        url=CHAT,
    )
    assert preset.status_code == 500
    assert json.loads(preset.content)["error"]["code"] == "profile_misconfigured"


# --- hostile input ---------------------------------------------------------------------------


def raw(data) -> bytes:
    return json.dumps(data).encode()


def req(**fields) -> bytes:
    return raw({"model": "demo/embed", "input": "hello", **fields})


# (request body, the param the error names; None: the body as a whole)
HOSTILE = {
    "no input": (raw({"model": "demo/embed"}), "input"),
    "null input": (req(input=None), "input"),
    "empty string": (req(input=""), "input"),
    "empty array": (req(input=[]), "input"),
    "empty string in an array": (req(input=["a", ""]), "input[1]"),
    "a number among strings": (req(input=["a", 1]), "input[1]"),
    "a string among token ids": (req(input=[1, "a"]), "input[1]"),
    "an array among strings": (req(input=["a", ["b"]]), "input[1]"),
    "an empty token array": (req(input=[[1], []]), "input[1]"),
    "a string in a token array": (req(input=[[1, "a"]]), "input[0][1]"),
    "a float token": (req(input=[1.5]), "input[0]"),
    "a boolean token": (req(input=[True]), "input[0]"),
    "a negative token": (req(input=[-1]), "input[0]"),
    "a token id too large": (req(input=[2**31]), "input[0]"),
    "tokens nested too deep": (req(input=[[[1]]]), "input[0][0]"),
    "an object": (req(input={"text": "hi"}), "input"),
    "a number": (req(input=7), "input"),
    "an array of objects": (req(input=[{"text": "hi"}]), "input"),
    "too many inputs": (req(input=["x"] * (MAX_INPUTS + 1)), "input"),
    "too many token arrays": (req(input=[[1]] * (MAX_INPUTS + 1)), "input"),
    "no model": (raw({"input": "hi"}), "model"),
    "an empty model": (req(model=""), "model"),
    "a model of 201 characters": (req(model="m" * 201), "model"),
    "a model that is a list": (req(model=["demo/embed"]), "model"),
    "an unknown encoding": (req(encoding_format="binary"), "encoding_format"),
    "an encoding that is a list": (req(encoding_format=["float"]), "encoding_format"),
    "zero dimensions": (req(dimensions=0), "dimensions"),
    "negative dimensions": (req(dimensions=-8), "dimensions"),
    "fractional dimensions": (req(dimensions=8.5), "dimensions"),
    "dimensions as a string": (req(dimensions="8"), "dimensions"),
    "dimensions as a boolean": (req(dimensions=True), "dimensions"),
    "huge dimensions": (req(dimensions=2**63), "dimensions"),
    "a user that is a number": (req(user=5), "user"),
    "a user too long": (req(user="u" * 257), "user"),
    "a lone surrogate in the input": (b'{"model": "demo/embed", "input": "a\\ud800"}', "input"),
    "NUL in an input": (b'{"model": "demo/embed", "input": ["ok", "a\\u0000b"]}', "input[1]"),
    "body an array": (b"[1, 2]", None),
    "body a string": (b'"hi"', None),
    "empty body": (b"", None),
    **{name: (data, "*") for name, data in UNREADABLE.items()},
}


@pytest.mark.parametrize("case", list(HOSTILE))
def test_hostile_requests_are_refused_naming_the_input(case):
    data, param = HOSTILE[case]

    with pytest.raises(GatewayError) as caught:
        parse_embedding_request(data)

    error = caught.value.payload()["error"]
    assert caught.value.status == 400
    assert error["type"] == "invalid_request_error"
    assert error["message"]
    if param is None:
        assert error["code"] == "invalid_json"
    elif param != "*":
        assert error["param"] == param, error


@db
async def test_hostile_requests_are_400s_over_http_and_trip_nothing(
    api_token, other_api_token, settings
):
    settings.CASCADEFLOW_BREAKER_FAILURES = 1

    for case, (data, param) in HOSTILE.items():
        response = await post(api_token.raw, data)
        error = openai_error(response)
        assert response.status_code == 400, case
        if param not in (None, "*"):
            assert error["param"] == param, case
        assert response["x-request-id"].startswith("req_")

    assert await events() == []  # refused before admission
    assert await breaker_is_closed("demo/embed")
    assert answer(await post(other_api_token.raw, body()))["model"] == "demo/embed"


@db
async def test_auth_comes_before_the_body_and_methods_are_checked(api_token):
    unauthenticated = await post(None, b"{not json")
    bad_token = await post("cf_nope", body())
    wrong_method = await AsyncClient().get(
        EMBEDDINGS, headers={"Authorization": f"Bearer {api_token.raw}"}
    )

    assert (unauthenticated.status_code, openai_error(unauthenticated)["code"]) == (
        401,
        "invalid_api_key",
    )
    assert bad_token.status_code == 401
    assert wrong_method.status_code == 405
    assert wrong_method["Allow"] == "POST"
    assert await events() == []


@db
async def test_a_token_without_the_completions_scope_is_refused(tenant):
    reader = await sync_to_async(token_create)(tenant=tenant, name="ro", scopes=[Scope.USAGE_READ])
    caller = await sync_to_async(token_create)(
        tenant=tenant, name="app", scopes=[Scope.COMPLETIONS]
    )

    refused = await post(reader.raw, body())
    served = await post(caller.raw, body())

    error = openai_error(refused)
    assert (refused.status_code, error["code"]) == (403, "insufficient_scope")
    assert "'completions'" in error["message"]
    assert answer(served)["model"] == "demo/embed"
    assert [e.token_id for e in await events()] == [caller.token.pk]


# --- budgets and rate limits ----------------------------------------------------------------


@db
async def test_a_blocking_budget_refuses_with_402_and_records_it(api_token, tenant):
    budget = await tenant_budget(tenant, limit=USD)
    await spend(budget, USD)

    response = await post(api_token.raw, body())

    assert response.status_code == 402
    error = openai_error(response)
    assert (error["code"], error["type"]) == ("budget_exceeded", "insufficient_quota")
    assert "the tenant" in error["message"]
    [event] = await events()
    assert (event.status, event.http_status, event.cost_nanos) == (UsageStatus.BLOCKED, 402, 0)
    assert event.request_id == response["x-request-id"]


@db
async def test_the_worst_case_is_the_input_tokens_at_the_input_price(api_token, tenant):
    """A budget with room for 100 tokens of demo/embed admits 100 tokens and refuses 101:
    the reservation is the input alone (no completion tokens, no cascade)."""
    from tenants.models import BudgetCounter

    budget = await tenant_budget(tenant, limit=10 * USD)
    room = 100 * DEMO_PRICE + 1  # the worst case is rounded up by one nano-dollar per call
    await spend(budget, 10 * USD - room)

    fits = await post(api_token.raw, body([list(range(100))]))
    counter = await BudgetCounter.objects.aget(budget=budget)
    assert fits.status_code == 200, fits.content
    assert counter.spent_nanos == 10 * USD - room + 100 * DEMO_PRICE
    assert counter.reserved_nanos == 0

    await spend(budget, 10 * USD - room)
    too_big = await post(api_token.raw, body([list(range(101))]))
    assert too_big.status_code == 402
    assert openai_error(too_big)["code"] == "budget_exceeded"


@db
async def test_a_budget_is_settled_to_the_ledger(api_token, tenant):
    from tenants.models import BudgetCounter

    budget = await tenant_budget(tenant, limit=USD)

    response = await post(api_token.raw, body(["one text", "two texts"]))

    assert response.status_code == 200
    assert "x-cascade-budget" not in response
    [event] = await events()
    counter = await BudgetCounter.objects.aget(budget=budget)
    assert counter.spent_nanos == event.cost_nanos > 0
    assert counter.reserved_nanos == 0


@db
async def test_the_token_rate_limit_applies_and_records_the_refusal(api_token):
    api_token.token.requests_per_minute = 1
    await api_token.token.asave(update_fields=["requests_per_minute"])

    first = await post(api_token.raw, body())
    second = await post(api_token.raw, body())

    assert (first.status_code, second.status_code) == (200, 429)
    error = openai_error(second)
    assert (error["code"], error["type"]) == ("rate_limit_exceeded", "rate_limit_error")
    assert 1 <= int(second["Retry-After"]) <= 60
    event = await UsageEvent.objects.aget(request_id=second["x-request-id"])
    assert (event.status, event.http_status, event.requested_model) == (
        UsageStatus.RATE_LIMITED,
        429,
        "demo/embed",
    )


@db
async def test_tokens_per_minute_count_the_inputs_tokens(api_token, tenant):
    await EndUserTier.objects.acreate(
        tenant=tenant, slug="free", name="Free", is_default=True, tokens_per_minute=10
    )

    served = await post(api_token.raw, body([list(range(8))], user="alice"))
    refused = await post(api_token.raw, body([list(range(8))], user="alice"))
    other = await post(api_token.raw, body([list(range(8))], user="bob"))

    assert (served.status_code, refused.status_code, other.status_code) == (200, 429, 200)
    assert "end user 'alice' (tier 'free')" in openai_error(refused)["message"]


# --- catalog models through the fake upstream (both transports) ------------------------------


@db
async def test_a_catalog_model_is_called_with_only_what_the_provider_needs(api_token, fake_models):
    fake_models.behaviours["embed-fake"] = Behaviour(prompt_tokens=7)

    response = await post(
        api_token.raw,
        body(["alpha", "beta"], model="fake/embed", dimensions=4, user="alice", api_base="x"),
    )

    data = answer(response)
    [call] = fake_models.calls_for("embed-fake")
    assert call["input"] == ["alpha", "beta"]
    assert call["dimensions"] == 4
    assert call.get("encoding_format") in (None, "float")  # vectors come back as floats
    assert not {"user", "api_base", "api_key"} & set(call)  # the end user is never sent
    assert fake_models.keys == ["sk-fake"]
    assert [i["embedding"] for i in data["data"]] == [
        fake_vector("alpha", 4),
        fake_vector("beta", 4),
    ]
    assert (data["model"], data["usage"]["prompt_tokens"]) == ("fake/embed", 7)
    [event] = await events()
    assert (event.model, event.prompt_tokens, event.completion_tokens) == ("fake/embed", 7, 0)
    assert event.cost_nanos == 7 * FAKE_PRICE
    assert response["x-cascade-cost-usd"] == f"{7 * FAKE_PRICE / 1e9:.9f}"


@db
async def test_base64_from_a_catalog_model_is_encoded_by_the_gateway(api_token, fake_models):
    data = answer(
        await post(api_token.raw, body("alpha", model="fake/embed", encoding_format="base64"))
    )

    [call] = fake_models.calls_for("embed-fake")
    assert call.get("encoding_format") in (None, "float")
    assert floats_of(data["data"][0]["embedding"]) == float32(fake_vector("alpha", 8))


@db
async def test_a_provider_without_usage_is_billed_on_the_gateways_count(api_token, fake_models):
    fake_models.behaviours["embed-fake"] = Behaviour(report_usage=False)

    data = answer(await post(api_token.raw, body([[1, 2, 3, 4, 5]], model="fake/embed")))

    assert data["usage"]["prompt_tokens"] == 5
    [event] = await events()
    assert event.cost_nanos == 5 * FAKE_PRICE


@db
async def test_a_failing_deployment_falls_back_to_the_next(api_token, fake_models):
    fake_models.behaviours["embed-primary"] = Behaviour(fail_status=503)

    data = answer(await post(api_token.raw, body("alpha", model="fake/embed-fallback")))

    assert data["model"] == "fake/embed-fallback"
    assert len(fake_models.calls_for("embed-secondary")) == 1
    [event] = await events()
    assert [a["status"] for a in event.expanded_attempts] == ["error", "error", "ok"]
    assert event.status == UsageStatus.OK


@db
async def test_every_deployment_failing_is_a_502_recorded(api_token, fake_models):
    for name in ("embed-primary", "embed-secondary"):
        fake_models.behaviours[name] = Behaviour(fail_status=500)

    response = await post(api_token.raw, body("alpha", model="fake/embed-fallback"))

    assert response.status_code == 502
    assert json.loads(response.content)["error"]["code"] == "upstream_error"
    assert response["x-cascade-model"] == "none"
    [event] = await events()
    assert (event.status, event.http_status, event.cost_nanos) == (
        UsageStatus.UPSTREAM_ERROR,
        502,
        0,
    )


@db
@pytest.mark.parametrize(
    "behaviour", [Behaviour(malformed=True), Behaviour(embeddings_missing=1)], ids=str
)
async def test_a_malformed_answer_is_a_502_not_a_crash(api_token, fake_models, behaviour):
    fake_models.behaviours["embed-fake"] = behaviour

    response = await post(api_token.raw, body(["a", "b"], model="fake/embed"))

    assert response.status_code == 502
    assert "Malformed response" in json.loads(response.content)["error"]["message"]
    # Each failed call is charged what its usage says it cost (12 prompt tokens at $0.10
    # a million), nothing when it says nothing.
    [event] = await events()
    calls = event.expanded_attempts
    assert calls and all(a["status"] == "error" for a in calls)
    per_call = 0 if behaviour.malformed else 1_200
    assert [a["cost_nanos"] for a in calls] == [per_call] * len(calls)
    assert event.cost_nanos == per_call * len(calls)


@db
async def test_a_provider_refusing_the_request_is_a_400_that_trips_nothing(
    api_token, fake_models, settings
):
    settings.CASCADEFLOW_BREAKER_FAILURES = 1
    fake_models.behaviours["embed-fake"] = Behaviour(fail_status=400)

    for _ in range(2):
        response = await post(api_token.raw, body("alpha", model="fake/embed"))
        assert openai_error(response)["code"] == "upstream_bad_request"

    assert len(fake_models.calls_for("embed-fake")) == 2  # never retried
    assert await breaker_is_closed("fake/embed")


def test_malformed_vectors_are_refused():
    def response(*vectors):
        return {"data": [{"index": i, "embedding": v} for i, v in enumerate(vectors)]}

    for bad in (
        response([0.1, "x"]),
        response([0.1, True]),
        response([]),
        response([0.1, 0.2], [0.3]),
        response([float("nan")]),
        {"data": [{"index": 1, "embedding": [0.1]}]},
        {"data": "nope"},
    ):
        with pytest.raises(ProviderHTTPError):
            embeddings_of(bad, len(bad["data"]) if isinstance(bad["data"], list) else 1)
    packed = base64.b64encode(struct.pack("<2f", 0.5, -0.25)).decode()
    assert embeddings_of(response(packed), 1).vectors == [[0.5, -0.25]]


def test_the_catalog_reads_an_embedding_models_mode_size_and_price():
    catalog = ModelCatalog.build(
        {
            "small": {"model": "openai/text-embedding-3-small", "api_key": "k"},
            "sized": {
                "model": "openai/text-embedding-3-large",
                "api_key": "k",
                "mode": "embedding",
                "dimensions": 3072,
                "supports_dimensions": True,
                "input_usd_per_mtok": 0.13,
            },
            "chatty": {"model": "openai/gpt-4o-mini", "api_key": "k"},
        }
    )

    small, sized, chatty = catalog.get("small"), catalog.get("sized"), catalog.get("chatty")
    assert (small.mode, small.dimensions, small.supports_dimensions) == ("embedding", 1536, False)
    assert small.price.cost_nanos(1_000_000, 0) == 20_000_000  # LiteLLM's $0.02 per million
    assert (sized.mode, sized.dimensions, sized.supports_dimensions) == ("embedding", 3072, True)
    assert sized.price.cost_nanos(1_000_000, 0) == 130_000_000
    assert (chatty.mode, chatty.dimensions) == ("chat", None)
    assert catalog.get("demo/embed").mode == "embedding"
    for bad in ({"mode": "image"}, {"mode": "embedding", "dimensions": 0}):
        with pytest.raises(CatalogError):
            ModelCatalog.build({"x": {"model": "openai/x", "api_key": "k", **bad}})


# --- tenants' own embedding models ------------------------------------------------------------

KEY_A = "sk-tenant-a-0123456789abcdef"


def api(tenant):
    client = APIClient()
    raw_token = token_create(tenant=tenant, name="byok", scopes=[Scope.ADMIN]).raw
    client.credentials(HTTP_AUTHORIZATION=f"Bearer {raw_token}")
    return client


@pytest.fixture
def own_embedder(tenant, upstream):
    upstream.keys_accepted = {KEY_A}
    response = api(tenant).post(
        "/api/v1/provider-models/",
        {
            "name": "acme/embedder",
            "litellm_model": "openai/own-embedder",
            "api_base": upstream.api_base,
            "credentials": {"api_key": KEY_A},
            "input_usd_per_mtok": "0.5",
            "mode": "embedding",
        },
        format="json",
    )
    assert response.status_code == 201, response.content
    assert response.json()["mode"] == "embedding"
    assert response.json()["output_usd_per_mtok"] == "0.000000"
    return response.json()


@db
async def test_a_tenants_own_embedding_model_is_validated_billed_and_theirs_alone(
    tenant, other_tenant, upstream, own_embedder, api_token, other_api_token
):
    [validation] = upstream.requests
    assert validation["model"] == "own-embedder" and validation["input"] == ["OK"]
    upstream.behaviours["own-embedder"] = Behaviour(prompt_tokens=10)

    response = await post(api_token.raw, body("alpha", model="acme/embedder", dimensions=4))

    data = answer(response)
    assert len(data["data"][0]["embedding"]) == 4  # its provider decides its sizes
    assert upstream.keys[-1] == KEY_A
    [event] = await events()
    assert event.model == "acme/embedder"
    assert event.cost_nanos == event.byok_cost_nanos == 10 * 500

    calls = len(upstream.requests)
    theirs = await post(other_api_token.raw, body("alpha", model="acme/embedder"))
    assert (theirs.status_code, openai_error(theirs)["code"]) == (404, "model_not_found")
    assert len(upstream.requests) == calls
    chat = await post(
        api_token.raw,
        json.dumps({"model": "acme/embedder", "messages": [{"role": "user", "content": "hi"}]}),
        url=CHAT,
    )
    assert openai_error(chat)["code"] == "model_not_supported"
    profile = await sync_to_async(
        lambda: api(tenant).post(
            "/api/v1/profiles/",
            {"name": "mine", "chain": ["demo/small", "acme/embedder"]},
            format="json",
        )
    )()
    assert profile.status_code == 400
    assert "Embedding models answer no chat: acme/embedder." in json.dumps(profile.json())


# --- traces ---------------------------------------------------------------------------------


@db
async def test_an_embeddings_request_is_one_trace_with_the_genai_attributes(spans, api_token):
    secret = "the launch code is 0000"

    response = await post(api_token.raw, body(["hello", secret], dimensions=16))

    assert response.status_code == 200
    finished = {span.name: span for span in spans.get_finished_spans()}
    server, client = finished["embeddings"], finished["embeddings demo/embed"]
    assert (server.kind, client.kind) == (SpanKind.SERVER, SpanKind.CLIENT)
    assert {"admission", "ledger write"} <= set(finished)
    assert server.attributes["gen_ai.operation.name"] == "embeddings"
    assert server.attributes["gen_ai.request.model"] == "demo/embed"
    assert server.attributes["gen_ai.response.model"] == "demo/embed"
    assert server.attributes["gen_ai.embeddings.dimension.count"] == 16
    assert server.attributes["cascadeflow.inputs"] == 2
    [event] = await events()
    assert server.attributes["gen_ai.usage.input_tokens"] == event.prompt_tokens
    assert server.attributes["cascadeflow.cost_usd"] == pytest.approx(event.cost_nanos / 1e9)
    assert client.attributes["gen_ai.operation.name"] == "embeddings"
    assert client.attributes["gen_ai.system"] == "demo"
    assert client.attributes["gen_ai.usage.input_tokens"] == event.prompt_tokens
    assert client.attributes["gen_ai.embeddings.dimension.count"] == 16
    exported = "".join(f"{s.name}{dict(s.attributes)}" for s in finished.values())
    assert secret not in exported  # inputs are exported only when the tenant asks


# --- the official SDK against CascadeFlow under uvicorn ---------------------------------------


@pytest.fixture
def client(cascadeflow_server):
    return cascadeflow_server.openai_client()


def ledger_row(server, request_id):
    rows = server.query(
        "SELECT status, model, prompt_tokens, completion_tokens, cost_nanos "
        "FROM routing_usageevent WHERE request_id = %s",
        (request_id,),
    )
    assert len(rows) == 1, rows
    return rows[0]


def test_sdk_one_text(cascadeflow_server, client):
    raw_response = client.embeddings.with_raw_response.create(
        model="demo/embed", input="What is a lighthouse?", user="sdk-user"
    )
    result = raw_response.parse()

    # The SDK asks for base64 and decodes it: the vector is the float answer's, float32.
    assert result.object == "list" and result.model == "demo/embed"
    [item] = result.data
    assert item.index == 0
    assert item.embedding == float32(demo.demo_vector("What is a lighthouse?", 256))
    status, model, prompt, completion, cost = ledger_row(
        cascadeflow_server, raw_response.headers["x-request-id"]
    )
    assert (status, model, completion) == ("ok", "demo/embed", 0)
    assert prompt == result.usage.prompt_tokens == result.usage.total_tokens
    assert cost == prompt * DEMO_PRICE
    assert raw_response.headers["x-cascade-model"] == "demo/embed"


def test_sdk_a_batch_in_order(cascadeflow_server, client):
    texts = ["first", "second text", "the third text here"]

    result = client.embeddings.create(model="demo/embed", input=texts, encoding_format="float")

    assert [item.index for item in result.data] == [0, 1, 2]
    assert [item.embedding for item in result.data] == [demo.demo_vector(t, 256) for t in texts]


def test_sdk_base64_and_dimensions(cascadeflow_server, client):
    result = client.embeddings.create(
        model="demo/embed", input=["alpha", "beta"], encoding_format="base64", dimensions=64
    )

    for item, text in zip(result.data, ["alpha", "beta"], strict=True):
        assert isinstance(item.embedding, str)  # asked for explicitly: the SDK leaves it as is
        assert floats_of(item.embedding) == float32(demo.demo_vector(text, 64))


def test_sdk_a_catalog_model_through_the_fake_upstream(cascadeflow_server, client, upstream):
    upstream.behaviours["embed-fake"] = Behaviour(prompt_tokens=9)

    raw_response = client.embeddings.with_raw_response.create(
        model="fake/embed", input=["alpha"], dimensions=4
    )
    result = raw_response.parse()

    [call] = upstream.calls_for("embed-fake")
    assert (call["input"], call["dimensions"]) == (["alpha"], 4)
    assert result.data[0].embedding == float32(fake_vector("alpha", 4))
    _, model, prompt, _, cost = ledger_row(cascadeflow_server, raw_response.headers["x-request-id"])
    assert (model, prompt, cost) == ("fake/embed", 9, 9 * FAKE_PRICE)


def test_sdk_refusals_are_typed_errors(client):
    with pytest.raises(openai.BadRequestError) as chat_model:
        client.embeddings.create(model="demo/small", input="hi")
    with pytest.raises(openai.BadRequestError) as empty:
        client.embeddings.create(model="demo/embed", input="")
    with pytest.raises(openai.NotFoundError) as unknown:
        client.embeddings.create(model="nope/nothing", input="hi")

    assert chat_model.value.code == "model_not_supported"
    assert empty.value.body["param"] == "input"
    assert unknown.value.code == "model_not_found"
