"""The OpenAI-compatible surface where CascadeFlow differs from one model behind one key.

- ``GET /v1/models/{id}``: every id ``GET /v1/models`` lists for the token's tenant,
  and nothing else (ids hold slashes, sent raw or as %2F).
- ``n``: several choices from one model, billed for all of them; refused, with the
  reason, where a cascade or a stream cannot serve them.
- Streams: one chunk frame on every path, and with ``stream_options.include_usage``
  a last chunk in OpenAI's shape plus the ledger row's cost in ``cascadeflow``;
  headers sent before the cost is known never claim one.

In process (Django's async client) first, then the official SDK against a live server.
"""

import json
from urllib.parse import quote

import openai
import pytest
from asgiref.sync import sync_to_async
from django.test import AsyncClient

from routing.models import RoutingProfile, UsageEvent
from routing.schemas import MAX_N
from tenants.enums import Scope
from tenants.models import Tenant
from tenants.services import token_create
from tests.routing.test_gateway import body, error_of, post, read_stream
from tests.support.fake_upstream import fake_models_config

PRESETS = ["cascade/cost_optimized", "cascade/balanced", "cascade/quality_first", "cascade/fast"]
SUMMARY_KEYS = {"model", "escalated", "cost_usd", "savings_usd"}
USAGE_KEYS = {"prompt_tokens", "completion_tokens", "total_tokens"}
DETAILS = {"prompt_tokens_details", "completion_tokens_details"}  # where the provider sent them
# Per-token prices in nano-dollars: (prompt, completion).
PRICES = {"demo/small": (150, 600), "demo/large": (5_000, 15_000), "fake/gpt": (1_000, 2_000)}


def usd(nanos: int) -> str:
    return f"{nanos / 1e9:.9f}"


@pytest.fixture
def catalog(upstream, settings):
    """The fake upstream's models in the catalog (one transport: retrieving does not call)."""
    settings.CASCADEFLOW_MODELS = fake_models_config(upstream.api_base)
    return upstream


@sync_to_async
def events(**filters):
    return list(UsageEvent.objects.filter(**filters).order_by("id"))


async def get(path, token):
    headers = {"Authorization": f"Bearer {token}"} if token is not None else {}
    return await AsyncClient().get(path, headers=headers)


async def listed(token) -> list[dict]:
    response = await get("/v1/models", token)
    assert response.status_code == 200
    return json.loads(response.content)["data"]


# --- GET /v1/models/{id} ------------------------------------------------------------


@pytest.mark.django_db(transaction=True)
@pytest.mark.parametrize("encode", [False, True], ids=["raw", "percent-encoded"])
async def test_every_listed_id_is_retrieved_as_listed(api_token, tenant, catalog, encode):
    await RoutingProfile.objects.acreate(
        tenant=tenant, name="support", chain=["demo/small", "demo/large"]
    )
    tenant.allowed_models = ["fake/gpt"]
    await tenant.asave(update_fields=["allowed_models"])
    entries = await listed(api_token.raw)
    ids = [e["id"] for e in entries]
    assert {"cascade/balanced", "cascade/support", "demo/small", "fake/gpt"} <= set(ids)

    for entry in entries:
        model_id = quote(entry["id"], safe="") if encode else entry["id"]
        response = await get(f"/v1/models/{model_id}", api_token.raw)

        assert response.status_code == 200, (entry, response.content)
        assert json.loads(response.content) == entry
        assert set(entry) == {"id", "object", "created", "owned_by"}
        assert entry["object"] == "model"
        assert response["x-request-id"].startswith("req_")


@pytest.mark.django_db(transaction=True)
@pytest.mark.parametrize(
    ("model_id", "owner"),
    [
        ("cascade/balanced", "cascadeflow"),
        ("cascade/support", "tenant"),
        ("demo/small", "cascadeflow-demo"),
        ("fake/gpt", "openai"),
    ],
)
async def test_retrieve_names_the_owner(api_token, tenant, catalog, model_id, owner):
    await RoutingProfile.objects.acreate(tenant=tenant, name="support", chain=["demo/small"])

    response = await get(f"/v1/models/{model_id}", api_token.raw)

    assert json.loads(response.content) == {
        "id": model_id,
        "object": "model",
        "created": 1_700_000_000,
        "owned_by": owner,
    }


@pytest.mark.django_db(transaction=True)
@pytest.mark.parametrize(
    "model_id",
    [
        "nope/unknown",  # exists nowhere
        "fake/fallback",  # in the catalog, not allowed for this tenant
        "cascade/theirs",  # another tenant's profile
        "cascade/nope",  # neither a preset nor a profile
        "demo",  # a prefix of ids
        "demo/small/extra",
        "DEMO/SMALL",
    ],
)
async def test_unknown_or_not_allowed_ids_are_the_same_404(
    api_token, tenant, other_tenant, catalog, model_id
):
    tenant.allowed_models = ["fake/gpt"]
    await tenant.asave(update_fields=["allowed_models"])
    await RoutingProfile.objects.acreate(tenant=other_tenant, name="theirs", chain=["demo/small"])

    response = await get(f"/v1/models/{quote(model_id, safe='')}", api_token.raw)

    assert response.status_code == 404
    error = error_of(response)
    assert error["code"] == "model_not_found"
    assert error["type"] == "invalid_request_error"
    assert error["message"] == (
        f"The model '{model_id}' does not exist or you do not have access to it. "
        "GET /v1/models lists the models you can use."
    )


@pytest.mark.django_db(transaction=True)
@pytest.mark.parametrize("model_id", ["demo/small", "nope/unknown"])
@pytest.mark.parametrize("token", [None, "cf_not-a-real-token"])
async def test_retrieve_authenticates_first(model_id, token):
    response = await get(f"/v1/models/{model_id}", token)

    assert response.status_code == 401
    assert error_of(response)["code"] == "invalid_api_key"


@pytest.mark.django_db(transaction=True)
@pytest.mark.parametrize("path", ["/v1/models", "/v1/models/demo/small", "/v1/models/nope/x"])
async def test_retrieve_needs_the_scope_models_needs(tenant, path):
    issued = await sync_to_async(token_create)(tenant=tenant, name="ro", scopes=[Scope.USAGE_READ])

    response = await get(path, issued.raw)

    assert response.status_code == 403
    assert error_of(response)["code"] == "insufficient_scope"


@pytest.mark.django_db(transaction=True)
async def test_retrieve_is_get_only(api_token):
    response = await AsyncClient().delete(
        "/v1/models/demo/small", headers={"Authorization": f"Bearer {api_token.raw}"}
    )

    assert response.status_code == 405
    assert response["Allow"] == "GET"
    assert error_of(response)["code"] == "method_not_allowed"


# --- n ----------------------------------------------------------------------------------


@pytest.mark.django_db(transaction=True)
@pytest.mark.parametrize("model", ["demo/small", "fake/gpt"])
async def test_n_choices_from_one_model_are_returned_and_billed(api_token, fake_models, model):
    response = await post(api_token.raw, body(model=model, n=3))

    assert response.status_code == 200, response.content
    data = json.loads(response.content)
    assert [c["index"] for c in data["choices"]] == [0, 1, 2]
    assert all(c["message"]["content"] for c in data["choices"])
    [event] = await events()
    usage = data["usage"]
    assert (event.prompt_tokens, event.completion_tokens) == (
        usage["prompt_tokens"],
        usage["completion_tokens"],
    )
    assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"]
    prompt_price, completion_price = PRICES[model]
    assert event.cost_nanos == (
        event.prompt_tokens * prompt_price + event.completion_tokens * completion_price
    )
    assert response["x-cascade-cost-usd"] == usd(event.cost_nanos)
    if model == "fake/gpt":
        [sent] = fake_models.requests
        assert sent["n"] == 3
        assert usage["completion_tokens"] == 3 * 5  # every choice's tokens: 5 words each


@pytest.mark.django_db(transaction=True)
async def test_n_bills_every_choice(api_token):
    one = await post(api_token.raw, body(model="demo/small", n=1))
    three = await post(api_token.raw, body(model="demo/small", n=3))

    first, second = await events()
    assert len(json.loads(one.content)["choices"]) == 1
    assert len(json.loads(three.content)["choices"]) == 3
    assert second.prompt_tokens == first.prompt_tokens  # the prompt is counted once
    assert second.completion_tokens == 3 * first.completion_tokens
    assert second.cost_nanos > first.cost_nanos


@pytest.mark.django_db(transaction=True)
async def test_n_of_a_single_model_profile_is_served(api_token, tenant):
    await RoutingProfile.objects.acreate(tenant=tenant, name="solo", chain=["demo/medium"])

    response = await post(api_token.raw, body(model="cascade/solo", n=2))

    assert response.status_code == 200, response.content
    assert [c["index"] for c in json.loads(response.content)["choices"]] == [0, 1]


@pytest.mark.django_db(transaction=True)
@pytest.mark.parametrize(
    ("model", "profile", "stream"),
    [
        *((preset, None, False) for preset in PRESETS),
        ("cascade/balanced", None, True),
        ("cascade/pair", {"chain": ["demo/small", "demo/large"]}, False),
        (
            "cascade/routed",
            {"chain": ["demo/large"], "domain_routes": {"code": {"chain": ["demo/medium"]}}},
            False,
        ),
    ],
)
async def test_n_on_a_cascade_is_refused_with_the_reason(api_token, tenant, model, profile, stream):
    if profile is not None:
        await RoutingProfile.objects.acreate(
            tenant=tenant, name=model.removeprefix("cascade/"), **profile
        )

    response = await post(api_token.raw, body(model=model, n=2, stream=stream))

    assert response.status_code == 400
    error = error_of(response)
    assert (error["param"], error["code"]) == ("n", "unsupported_parameter")
    assert "a cascade judges one draft" in error["message"]
    assert model in error["message"]
    assert await events() == []  # refused before admission: nothing called, nothing billed


@pytest.mark.django_db(transaction=True)
@pytest.mark.parametrize("model", ["demo/small", "fake/gpt"])
async def test_n_on_a_direct_stream_is_refused_with_the_reason(api_token, fake_models, model):
    response = await post(api_token.raw, body(model=model, n=2, stream=True))

    assert response.status_code == 400
    error = error_of(response)
    assert (error["param"], error["code"]) == ("n", "unsupported_parameter")
    assert "'stream' is true" in error["message"]
    assert fake_models.requests == []


@pytest.mark.django_db(transaction=True)
@pytest.mark.parametrize("n", [0, -1, MAX_N + 1, 2**63, 1.5, 2.0, "3", True, False, [2], {"n": 2}])
async def test_n_out_of_range_is_a_400(api_token, n):
    response = await post(api_token.raw, body(model="demo/small", n=n))

    assert response.status_code == 400
    error = error_of(response)
    assert error["param"] == "n"
    assert error["message"] == f"'n' must be an integer between 1 and {MAX_N}."
    assert await events() == []


@pytest.mark.django_db(transaction=True)
@pytest.mark.parametrize("n", [None, 1])
@pytest.mark.parametrize("model", ["demo/small", "cascade/balanced"])
async def test_n_of_one_or_absent_is_unchanged(api_token, n, model):
    extra = {} if n is None else {"n": n}

    response = await post(api_token.raw, body(model=model, **extra))

    assert response.status_code == 200
    assert len(json.loads(response.content)["choices"]) == 1


@pytest.mark.django_db(transaction=True)
async def test_n_up_to_the_bound_is_served(api_token, fake_models):
    response = await post(api_token.raw, body(model="fake/gpt", n=MAX_N))

    assert response.status_code == 200
    assert len(json.loads(response.content)["choices"]) == MAX_N


# --- streams ------------------------------------------------------------------------------

# How each path is reached: (model, prompt, OpenAI-wire fast path, tenant audits on,
# escalated). demo: LiteLLM's custom provider; fake: the fake upstream through LiteLLM's
# OpenAI client and through CascadeFlow's OpenAI-wire client; a cascade whose draft is
# accepted (replayed from the buffer) and one that escalates (the strongest model
# relayed: a tenant that audits starts cold and serves no draft).
STREAM_PATHS = {
    "demo": ("demo/small", "Tell me about rivers", False, False, False),
    "fake-litellm": ("fake/gpt", "hi", False, False, False),
    "fake-openai-wire": ("fake/gpt", "hi", True, False, False),
    "cascade-accepted": ("cascade/balanced", "What is 12 + 30?", False, False, False),
    "cascade-escalated": ("cascade/balanced", "What is 12 + 30?", False, True, True),
}


def parse_sse(blocks: list[str]) -> tuple[list[dict], list[str]]:
    datas = [json.loads(b[len("data: ") :]) for b in blocks if b.startswith("data: {")]
    comments = [b for b in blocks if b.startswith(":")]
    return datas, comments


@pytest.fixture
def stream_on(api_token, tenant, catalog, monkeypatch):
    async def run(path: str, *, include_usage: bool):
        model, prompt, wire, audits, _ = STREAM_PATHS[path]
        monkeypatch.setenv("CASCADEFLOW_OPENAI_FAST_PATH", "true" if wire else "false")
        await Tenant.objects.filter(pk=tenant.pk).aupdate(audits_enabled=audits)
        extra = {"stream_options": {"include_usage": True}} if include_usage else {}
        response = await post(
            api_token.raw, body(model=model, content=prompt, stream=True, **extra)
        )
        assert response.status_code == 200, response.content
        blocks = await read_stream(response)
        [event] = await events()
        # Sent before the answer ended: the cost is not known, and no header claims one.
        assert response["x-cascade-cost-usd"] == "unknown"
        assert response["x-cascade-savings-usd"] == "unknown"
        assert response["x-cascade-model"] == event.model
        assert response["x-cascade-escalated"] == ("true" if event.escalated else "false")
        assert event.escalated is STREAM_PATHS[path][4]
        assert event.cost_nanos > 0
        return blocks, event

    return run


def assert_one_frame(datas: list[dict], model: str) -> None:
    assert len({c["id"] for c in datas}) == 1
    assert datas[0]["id"].startswith("chatcmpl-")
    assert len({c["created"] for c in datas}) == 1
    assert {c["object"] for c in datas} == {"chat.completion.chunk"}
    assert {c["model"] for c in datas} == {model}


@pytest.mark.django_db(transaction=True)
@pytest.mark.parametrize("path", list(STREAM_PATHS))
async def test_stream_ends_with_openais_usage_chunk_and_the_ledgers_cost(stream_on, path):
    blocks, event = await stream_on(path, include_usage=True)

    datas, comments = parse_sse(blocks)
    assert blocks[-1] == "data: [DONE]"
    *content, last = datas
    assert_one_frame(datas, event.model)
    assert all(c["choices"] and "usage" not in c and "cascadeflow" not in c for c in content)
    assert all("finish_reason" in choice for c in content for choice in c["choices"])
    assert set(last) == {"id", "object", "created", "model", "choices", "usage", "cascadeflow"}
    assert last["choices"] == []
    usage = last["usage"]
    assert USAGE_KEYS <= set(usage) <= USAGE_KEYS | DETAILS  # OpenAI's keys, and no "cost"
    assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"]
    # usage: the answer's call, as in the body of an answer that is not streamed
    [answer] = [
        a for a in event.expanded_attempts if a["model"] == event.model and a["status"] == "ok"
    ]
    assert (usage["prompt_tokens"], usage["completion_tokens"]) == (
        answer["prompt_tokens"],
        answer["completion_tokens"],
    )
    if not event.escalated:  # one call: the ledger row counts exactly that
        assert (event.prompt_tokens, event.completion_tokens) == (
            usage["prompt_tokens"],
            usage["completion_tokens"],
        )
    assert last["cascadeflow"] == {
        "model": event.model,
        "escalated": event.escalated,
        "cost_usd": usd(event.cost_nanos),
        "savings_usd": usd(event.baseline_cost_nanos - event.cost_nanos),
    }
    assert comments == [f": cascade {json.dumps(last['cascadeflow'], separators=(',', ':'))}"]


@pytest.mark.django_db(transaction=True)
@pytest.mark.parametrize("path", list(STREAM_PATHS))
async def test_stream_without_include_usage_has_no_usage_chunk(stream_on, path):
    blocks, event = await stream_on(path, include_usage=False)

    datas, _ = parse_sse(blocks)
    assert_one_frame(datas, event.model)
    assert all(c["choices"] for c in datas)
    assert all("usage" not in c and "cascadeflow" not in c for c in datas)
    assert datas[-1]["choices"][0]["finish_reason"] == "stop"
    assert blocks[-1] == "data: [DONE]"


# --- the official SDK against a live server -------------------------------------------------


@pytest.fixture
def client(cascadeflow_server):
    return openai.OpenAI(
        base_url=f"{cascadeflow_server.base_url}/v1",
        api_key=cascadeflow_server.token,
        max_retries=0,
        timeout=30,
    )


def ledger_row(server, request_id) -> dict:
    columns = (
        "status",
        "prompt_tokens",
        "completion_tokens",
        "cost_nanos",
        "baseline_cost_nanos",
        "model",
        "escalated",
    )
    rows = server.query(
        f"SELECT {', '.join(columns)} FROM routing_usageevent WHERE request_id = %s",
        (request_id,),
    )
    assert len(rows) == 1, rows
    return dict(zip(columns, rows[0], strict=True))


@pytest.mark.parametrize(
    ("model_id", "owner"),
    [
        ("cascade/balanced", "cascadeflow"),
        ("demo/small", "cascadeflow-demo"),
        ("fake/gpt", "openai"),
    ],
)
def test_sdk_retrieves_a_listed_model(client, model_id, owner):
    model = client.models.retrieve(model_id)

    assert (model.id, model.object, model.owned_by) == (model_id, "model", owner)
    assert model in list(client.models.list())


def test_sdk_unknown_model_is_not_found(client):
    with pytest.raises(openai.NotFoundError) as caught:
        client.models.retrieve("nope/unknown")

    assert caught.value.status_code == 404
    assert caught.value.code == "model_not_found"


def test_sdk_n_choices_from_one_model_are_billed(cascadeflow_server, client):
    raw = client.chat.completions.with_raw_response.create(
        model="demo/small", messages=[{"role": "user", "content": "What is 7 * 6?"}], n=3
    )
    completion = raw.parse()

    assert sorted(c.index for c in completion.choices) == [0, 1, 2]
    row = ledger_row(cascadeflow_server, raw.headers["x-request-id"])
    assert (row["prompt_tokens"], row["completion_tokens"]) == (
        completion.usage.prompt_tokens,
        completion.usage.completion_tokens,
    )
    assert row["cost_nanos"] == row["prompt_tokens"] * 150 + row["completion_tokens"] * 600
    assert raw.headers["x-cascade-cost-usd"] == usd(row["cost_nanos"])


def test_sdk_n_on_a_cascade_is_a_bad_request_that_says_why(client):
    with pytest.raises(openai.BadRequestError) as caught:
        client.chat.completions.create(
            model="cascade/balanced", messages=[{"role": "user", "content": "hi"}], n=2
        )

    assert caught.value.param == "n"
    assert caught.value.code == "unsupported_parameter"
    assert "a cascade judges one draft" in caught.value.message


@pytest.mark.parametrize(
    ("model", "prompt"),
    [
        ("demo/small", "Tell me about lighthouses"),
        ("fake/gpt", "hi"),
        ("cascade/balanced", "What is 12 + 30?"),
    ],
)
def test_sdk_stream_ends_with_usage_and_the_ledgers_cost(cascadeflow_server, client, model, prompt):
    with client.chat.completions.with_streaming_response.create(
        model=model,
        messages=[{"role": "user", "content": prompt}],
        stream=True,
        stream_options={"include_usage": True},
    ) as response:
        headers = response.headers
        chunks = list(response.parse())

    *content, last = chunks
    assert headers["x-cascade-cost-usd"] == "unknown"
    assert all(c.choices for c in content)
    assert len({c.id for c in chunks}) == 1
    assert last.choices == []
    row = ledger_row(cascadeflow_server, headers["x-request-id"])
    assert last.usage.total_tokens == last.usage.prompt_tokens + last.usage.completion_tokens
    if not row["escalated"]:
        assert (last.usage.prompt_tokens, last.usage.completion_tokens) == (
            row["prompt_tokens"],
            row["completion_tokens"],
        )
    assert last.model_extra["cascadeflow"] == {
        "model": row["model"],
        "escalated": bool(row["escalated"]),
        "cost_usd": usd(row["cost_nanos"]),
        "savings_usd": usd(row["baseline_cost_nanos"] - row["cost_nanos"]),
    }
