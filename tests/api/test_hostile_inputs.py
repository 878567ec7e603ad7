"""Bad input is the client's error, never ours.

Hostile bodies and query strings are sent to every route under /v1/ and
/api/v1/, found from the URL resolver (as the isolation sweep does), so a new
endpoint is probed the day it is added. Every answer must be a 4xx (or, for a
query a route ignores, a success), in OpenAI's error shape on /v1/ and the
management API's on /api/v1/, with no traceback, server path or database text
in it. On /v1/, the shared circuit breaker must stay closed for every demo
deployment (it opens here on the first failure counted against one), and
another tenant must still be served afterwards.
"""

import base64
import json
import re

import pytest
from asgiref.sync import sync_to_async
from django.db import DataError, IntegrityError, OperationalError
from django.test import AsyncClient
from django.urls import URLPattern, URLResolver, get_resolver
from rest_framework.test import APIClient

from routing.enums import UsageStatus
from routing.models import UsageEvent
from routing.platform_models import model_catalog
from routing.schemas import MAX_OUTPUT_TOKENS
from tenants.api_base import TenantAPIView
from tenants.enums import BudgetPeriod, BudgetScope
from tenants.models import Budget, EndUser
from tests.support.fake_upstream import Behaviour

LEAKS = ("Traceback", "/work/", 'File "', "violates", "DETAIL:", "site-packages")
BIG = 2**63
DEEP = '{"a": ' + "[" * 20_000 + "]" * 20_000 + "}"

# Bodies no endpoint can read: every route that takes a body refuses them.
UNREADABLE = {
    "not json": b"{not json",
    "invalid utf-8": b'{"a": "\xff\xfe"}',
    "nested 20,000 deep": DEEP.encode(),
    "nested 65 deep": ('{"a": ' + "[" * 65 + "]" * 65 + "}").encode(),
    "integer of 5,000 digits": b'{"a": ' + b"9" * 5000 + b"}",
    "NaN": b'{"a": NaN}',
    "Infinity": b'{"a": -Infinity}',
    "1e400": b'{"a": 1e400}',
    "lone surrogate": b'{"a": "\\ud800"}',
    "NUL": b'{"a": "x\\u0000y"}',
    "lone surrogate in a key": b'{"\\ud800": 1}',
}


# Where the unreadable text is, for errors that name it.
TEXT_AT = {"lone surrogate": "a", "NUL": "a", "lone surrogate in a key": "\\ud800"}


def routes(prefix: str) -> list[tuple[str, object]]:
    found = []

    def walk(patterns, path):
        for p in patterns:
            if isinstance(p, URLResolver):
                walk(p.url_patterns, path + str(p.pattern))
            elif isinstance(p, URLPattern):
                found.append((path + str(p.pattern), p.callback))

    walk(get_resolver().url_patterns, "/")
    return [(route, cb) for route, cb in found if route.startswith(prefix)]


def concrete(route: str) -> str:
    """A URL for a route: ids are 1, profiles a preset, a catch-all names no endpoint."""
    url = re.sub(r"<int:\w+>", "1", route)
    url = re.sub(r"<profile:\w+>", "balanced", url)
    return re.sub(r"<path:\w+>|\^\(\?P<\w+>\.\*\)\$", "no-such-endpoint", url)


def body_of(response) -> bytes:
    if getattr(response, "streaming", False):
        return b"".join(response.streaming_content)
    return response.content


def assert_no_leak(response):
    text = body_of(response).decode("utf-8", "replace")
    for leak in LEAKS:
        assert leak not in text, f"{leak!r} in {text[:300]}"


def openai_error(response) -> dict:
    assert 400 <= response.status_code < 500, (response.status_code, body_of(response)[:300])
    assert response["content-type"] == "application/json"
    assert_no_leak(response)
    payload = json.loads(body_of(response))
    assert set(payload) == {"error"}
    assert set(payload["error"]) == {"message", "type", "param", "code"}
    assert isinstance(payload["error"]["message"], str) and payload["error"]["code"]
    return payload["error"]


def api_error(response, status_class: int = 4) -> dict:
    assert response.status_code // 100 == status_class, (response.status_code, response.content)
    assert response["content-type"].startswith("application/json")
    assert_no_leak(response)
    payload = json.loads(response.content)
    assert set(payload) == {"error"}
    assert set(payload["error"]) <= {"code", "message", "detail"}
    assert isinstance(payload["error"]["code"], str) and payload["error"]["message"]
    return payload["error"]


# --- /v1/ ------------------------------------------------------------------------------

CHAT = "/v1/chat/completions"


def chat(content="What is 2 + 2?", model="demo/small", **extra) -> dict:
    return {"model": model, "messages": [{"role": "user", "content": content}], **extra}


def raw(text: str) -> bytes:
    return text.encode()


# (request body, the param the error names; None: the body as a whole)
HOSTILE_CHATS = {
    "lone surrogate in content": (raw(json.dumps(chat("\ud800"))), "messages[0].content"),
    "NUL in content": (raw(json.dumps(chat("a\x00b"))), "messages[0].content"),
    "lone surrogate in a content part": (
        raw(json.dumps(chat([{"type": "text", "text": "\udfff"}]))),
        "messages[0].content[0].text",
    ),
    "lone surrogate in user": (raw(json.dumps(chat(user="\ud800"))), "user"),
    "NUL in user": (raw(json.dumps(chat(user="alice\x00"))), "user"),
    "lone surrogate in model": (raw(json.dumps(chat(model="demo/\ud800"))), "model"),
    "NUL in model": (raw(json.dumps(chat(model="demo/small\x00"))), "model"),
    "streamed lone surrogate": (
        raw(json.dumps(chat("\ud800", stream=True))),
        "messages[0].content",
    ),
    "content [1, 2, null]": (raw(json.dumps(chat([1, 2, None]))), "messages[0].content[0]"),
    'content {"text": {}}': (raw(json.dumps(chat({"text": {}}))), "messages[0].content"),
    "text part with an object": (
        raw(json.dumps(chat([{"type": "text", "text": {}}]))),
        "messages[0].content[0].text",
    ),
    "part of unknown type": (
        raw(json.dumps(chat([{"type": "video", "video": {}}]))),
        "messages[0].content[0]",
    ),
    "image_url that is a string": (
        raw(json.dumps(chat([{"type": "image_url", "image_url": "http://x"}]))),
        "messages[0].content[0].image_url",
    ),
    "image_url without a url": (
        raw(json.dumps(chat([{"type": "image_url", "image_url": {"url": 5}}]))),
        "messages[0].content[0].image_url.url",
    ),
    "input_audio without data": (
        raw(json.dumps(chat([{"type": "input_audio", "input_audio": {"format": "wav"}}]))),
        "messages[0].content[0].input_audio",
    ),
    "file with neither data nor id": (
        raw(json.dumps(chat([{"type": "file", "file": {"filename": "a.pdf"}}]))),
        "messages[0].content[0].file",
    ),
    "tool_calls of numbers": (
        raw(
            json.dumps(
                {
                    "model": "demo/small",
                    "messages": [{"role": "assistant", "content": None, "tool_calls": [1]}],
                }
            )
        ),
        "messages[0].tool_calls[0]",
    ),
    "message name that is a number": (
        raw(
            json.dumps(
                {"model": "demo/small", "messages": [{"role": "user", "content": "hi", "name": 5}]}
            )
        ),
        "messages[0].name",
    ),
    "max_tokens 2^63": (raw(json.dumps(chat(max_tokens=BIG))), "max_tokens"),
    "max_completion_tokens 2^63": (
        raw(json.dumps(chat(max_completion_tokens=BIG))),
        "max_completion_tokens",
    ),
    "max_tokens above the bound": (
        raw(json.dumps(chat(max_tokens=MAX_OUTPUT_TOKENS + 1))),
        "max_tokens",
    ),
    "max_tokens 1.5": (raw(json.dumps(chat(max_tokens=1.5))), "max_tokens"),
    "n 2^63": (raw(json.dumps(chat(n=BIG))), "n"),
    "seed 2^64": (raw(json.dumps(chat(seed=2**64))), "seed"),
    "seed as text": (raw(json.dumps(chat(seed="7"))), "seed"),
    "top_logprobs 2^63": (raw(json.dumps(chat(logprobs=True, top_logprobs=BIG))), "top_logprobs"),
    "temperature as text": (raw(json.dumps(chat(temperature="1"))), "temperature"),
    "json_schema.schema a string": (
        raw(
            json.dumps(
                chat(
                    response_format={
                        "type": "json_schema",
                        "json_schema": {"name": "x", "schema": "abc"},
                    }
                )
            )
        ),
        "response_format.json_schema.schema",
    ),
    "json_schema.schema a list": (
        raw(
            json.dumps(
                chat(
                    response_format={
                        "type": "json_schema",
                        "json_schema": {"name": "x", "schema": [1]},
                    }
                )
            )
        ),
        "response_format.json_schema.schema",
    ),
    "json_schema a string": (
        raw(json.dumps(chat(response_format={"type": "json_schema", "json_schema": "x"}))),
        "response_format.json_schema",
    ),
    "json_schema without a name": (
        raw(
            json.dumps(chat(response_format={"type": "json_schema", "json_schema": {"schema": {}}}))
        ),
        "response_format.json_schema.name",
    ),
    "tool parameters a string": (
        raw(
            json.dumps(
                chat(tools=[{"type": "function", "function": {"name": "f", "parameters": "x"}}])
            )
        ),
        "tools[0].function.parameters",
    ),
    "tool name a number": (
        raw(json.dumps(chat(tools=[{"type": "function", "function": {"name": 1}}]))),
        "tools",
    ),
    "200 tools": (
        raw(
            json.dumps(
                chat(
                    tools=[{"type": "function", "function": {"name": f"f{i}"}} for i in range(200)]
                )
            )
        ),
        "tools",
    ),
    "tool_choice a number": (raw(json.dumps(chat(tool_choice=5))), "tool_choice"),
    "logit_bias of words": (raw(json.dumps(chat(logit_bias={"hello": 1}))), "logit_bias"),
    "logit_bias of 1000": (raw(json.dumps(chat(logit_bias={"42": 1000}))), "logit_bias"),
    "parallel_tool_calls as text": (
        raw(json.dumps(chat(parallel_tool_calls="yes"))),
        "parallel_tool_calls",
    ),
    "reasoning_effort an object": (
        raw(json.dumps(chat(reasoning_effort={}))),
        "reasoning_effort",
    ),
    "five stop words": (raw(json.dumps(chat(stop=["a", "b", "c", "d", "e"]))), "stop"),
    "model of 300 characters": (raw(json.dumps(chat(model="m" * 300))), "model"),
    "stream_options a string": (
        raw(json.dumps(chat(stream=True, stream_options="x"))),
        "stream_options",
    ),
    "body an array": (b"[1, 2]", None),
    "body a string": (b'"hi"', None),
    "empty body": (b"", None),
    **{name: (data, TEXT_AT.get(name)) for name, data in UNREADABLE.items()},
}


async def post_chat(token: str, data: bytes):
    return await AsyncClient().post(
        CHAT,
        data=data,
        content_type="application/json",
        headers={"Authorization": f"Bearer {token}"},
    )


async def breaker_is_closed(*model_names: str) -> bool:
    from routing.gateway import caller

    breaker = caller().breaker
    for name in model_names:
        for deployment in model_catalog().get(name).deployments:
            if not await breaker.allow(deployment):
                return False
    return True


async def others_are_still_served(other_api_token) -> None:
    response = await post_chat(other_api_token.raw, raw(json.dumps(chat())))
    assert response.status_code == 200, response.content
    assert await breaker_is_closed("demo/small", "demo/medium", "demo/large")


@pytest.fixture
def trip_wire(settings):
    """The breaker opens on the first failure counted against a deployment."""
    settings.CASCADEFLOW_BREAKER_FAILURES = 1


@pytest.mark.django_db(transaction=True)
@pytest.mark.parametrize("case", list(HOSTILE_CHATS))
async def test_hostile_chat_requests_are_400_and_never_trip_the_breaker(
    api_token, other_api_token, trip_wire, case
):
    data, param = HOSTILE_CHATS[case]

    error = openai_error(await post_chat(api_token.raw, data))

    assert error["type"] == "invalid_request_error"
    assert error["param"] == param
    if param is None:
        assert error["code"] == "invalid_json"
    assert await sync_to_async(UsageEvent.objects.count)() == 0  # refused before admission
    await others_are_still_served(other_api_token)


@pytest.mark.django_db(transaction=True)
@pytest.mark.parametrize("name", list(UNREADABLE))
async def test_unreadable_bodies_on_every_v1_route(api_token, other_api_token, trip_wire, name):
    checked = 0
    for route, _ in routes("/v1/"):
        for method in ("post", "put", "patch"):
            response = await getattr(AsyncClient(), method)(
                concrete(route),
                data=UNREADABLE[name],
                content_type="application/json",
                headers={"Authorization": f"Bearer {api_token.raw}"},
            )
            openai_error(response)
            checked += 1
    assert checked >= 9
    await others_are_still_served(other_api_token)


HOSTILE_QUERIES = [
    "a=%00",
    "%00=1",
    "model=demo%2Fsmall%00",
    "x=" + "9" * 5000,
    "x=%ED%A0%80",  # a surrogate's UTF-8 bytes
    "x=%FF%FE",
]


@pytest.mark.django_db(transaction=True)
@pytest.mark.parametrize("query", HOSTILE_QUERIES)
async def test_hostile_query_strings_on_every_v1_route(api_token, query):
    for route, _ in routes("/v1/"):
        response = await AsyncClient().get(
            f"{concrete(route)}?{query}", headers={"Authorization": f"Bearer {api_token.raw}"}
        )
        assert response.status_code < 500, (route, response.content)
        if response.status_code >= 400:
            openai_error(response)
        assert_no_leak(response)


@pytest.mark.django_db(transaction=True)
@pytest.mark.parametrize("field", ["max_tokens", "max_completion_tokens"])
async def test_a_budgeted_tenant_bounds_max_tokens(api_token, other_api_token, tenant, field):
    await Budget.objects.acreate(
        tenant=tenant, scope=BudgetScope.TENANT, period=BudgetPeriod.MONTH, limit_nanos=10**12
    )

    refused = await post_chat(api_token.raw, raw(json.dumps(chat(**{field: BIG}))))
    largest = await post_chat(
        api_token.raw, raw(json.dumps(chat(n=8, **{field: MAX_OUTPUT_TOKENS})))
    )

    assert openai_error(refused)["param"] == field
    assert largest.status_code == 200, largest.content
    [event] = await sync_to_async(list)(UsageEvent.objects.all())
    assert event.request_id == largest["x-request-id"]
    assert event.status == UsageStatus.OK
    assert event.budget_status == "allow"
    await others_are_still_served(other_api_token)


@pytest.mark.django_db(transaction=True)
@pytest.mark.parametrize("status", [400, 413, 422])
async def test_an_upstream_refusing_the_request_is_recorded_and_trips_nothing(
    api_token, other_api_token, fake_models, trip_wire, status
):
    fake_models.behaviours["failing"] = Behaviour(fail_status=status)

    for _ in range(3):
        response = await post_chat(api_token.raw, raw(json.dumps(chat(model="fake/failing"))))
        error = openai_error(response)
        assert error["type"] == "invalid_request_error"

    events = await sync_to_async(list)(UsageEvent.objects.order_by("id"))
    assert [e.status for e in events] == [UsageStatus.UPSTREAM_ERROR] * 3  # admitted: recorded
    assert {e.http_status for e in events} == {response.status_code}
    assert len(fake_models.calls_for("failing")) == 3  # never retried
    assert await breaker_is_closed("fake/failing")
    await others_are_still_served(other_api_token)


# --- /api/v1/ --------------------------------------------------------------------------


def api(raw_token: str) -> APIClient:
    client = APIClient()
    client.credentials(HTTP_AUTHORIZATION=f"Bearer {raw_token}")
    return client


def view_methods(callback) -> set[str]:
    view = getattr(callback, "view_class", None) or getattr(callback, "cls", None)
    if view is None:  # a plain function: any method
        return {"get", "post", "put", "patch", "delete"}
    return {m for m in ("get", "post", "put", "patch", "delete") if hasattr(view, m)}


def is_tenant_view(callback) -> bool:
    view = getattr(callback, "view_class", None)
    return isinstance(view, type) and issubclass(view, TenantAPIView)


@pytest.mark.django_db
@pytest.mark.parametrize("name", list(UNREADABLE))
def test_unreadable_bodies_on_every_api_route(api_token, name):
    client = api(api_token.raw)
    checked = 0
    for route, _ in routes("/api/v1/"):
        for method in ("post", "put", "patch"):
            response = client.generic(
                method.upper(), concrete(route), UNREADABLE[name], content_type="application/json"
            )
            error = api_error(response)
            assert error["code"] in {"invalid_json", "method_not_allowed", "not_found"}
            checked += 1
    assert checked >= 3 * 18


API_QUERIES = [
    "end=0001-01-05",
    "start=0001-01-01&end=0001-01-02",
    "status=%00",
    "uniform=%00",
    "kind=%00",
    "cursor=garbage",
    "cursor=" + base64.b64encode(b"p=abc").decode(),
    "cursor=" + base64.b64encode(b"p=99999999999999999999999").decode(),
    "cursor=" + base64.b64encode(b"o=99999999999999999999999").decode(),
    "start=9999-12-31T23:59:59-14:00",
    "end=0001-01-01T00:00:00%2B14:00",
    "start=2026-01-01T00:00%2B25:00",
    "start=9999-12-31&end=9999-12-31",
    "start=2026-01-01&end=" + "9" * 5000,
    "model=a%00b",
    "end_user=%00",
    "%00=1",
    "token=abc",
    "token=99999999999999999999999",
    "token=-1",
    "token=" + "9" * 5000,
    "limit=99999999999999999999999",
    "bucket=%00&by=%00",
    "group_by=%00",
    "x=%ED%A0%80",
]


@pytest.mark.django_db
@pytest.mark.parametrize("query", API_QUERIES)
def test_hostile_query_strings_on_every_api_route(api_token, query):
    client = api(api_token.raw)
    for route, callback in routes("/api/v1/"):
        if "get" not in view_methods(callback):
            continue
        response = client.get(f"{concrete(route)}?{query}")
        assert response.status_code < 500, (route, response.status_code, body_of(response)[:300])
        if response.status_code >= 400:
            api_error(response)
        elif "%00" in query and is_tenant_view(callback):
            pytest.fail(f"{route}?{query}: NUL in a query string must be a 400")
        assert_no_leak(response)


# (url, the code of the 400)
READ_ERRORS = [
    ("/api/v1/usage/?cursor=garbage", "invalid_cursor"),
    ("/api/v1/usage/?cursor=" + base64.b64encode(b"p=abc").decode(), "invalid_cursor"),
    (
        "/api/v1/usage/?cursor=" + base64.b64encode(b"p=99999999999999999999999").decode(),
        "invalid_cursor",
    ),
    ("/api/v1/usage/?start=9999-12-31T23:59:59-14:00", "invalid_request"),
    ("/api/v1/usage/?end=0001-01-01T00:00:00%2B14:00", "invalid_request"),
    ("/api/v1/usage/?start=2026-01-01T00:00%2B25:00", "invalid_request"),
    ("/api/v1/usage/?model=a%00b", "invalid_request"),
    ("/api/v1/usage/?end_user=a%00b", "invalid_request"),
    ("/api/v1/usage/?token=abc", "invalid_request"),
    ("/api/v1/usage/?token=99999999999999999999999", "invalid_request"),
    ("/api/v1/usage/summary/?start=0001-01-01T00:00:00%2B14:00", "invalid_request"),
    ("/api/v1/profiles/balanced/quality/?end=0001-01-01T00:00:00%2B14:00", "invalid_request"),
    ("/api/v1/profiles/balanced/quality/?start=2026-13-01", "invalid_request"),
    ("/api/v1/profiles/balanced/calibrations/?cursor=garbage", "invalid_cursor"),
    ("/api/v1/audits/?cursor=garbage", "invalid_cursor"),
    ("/api/v1/audits/?status=%00", "invalid_request"),
    ("/api/v1/audits/?uniform=yes", "invalid_request"),
    ("/api/v1/usage/?kind=refund", "invalid_request"),
    ("/api/v1/usage/export.csv?start=9999-12-31&end=9999-12-31", "invalid_request"),
    ("/api/v1/usage/export.csv?start=2026-01-01&end=2026-01-01%00", "invalid_request"),
]


@pytest.mark.django_db
@pytest.mark.parametrize(("url", "code"), READ_ERRORS)
def test_reads_with_bad_filters_are_400_with_a_stable_code(api_token, url, code):
    assert api_error(api(api_token.raw).get(url))["code"] == code


@pytest.mark.django_db
@pytest.mark.parametrize(
    ("method", "url"),
    [
        ("get", "/api/v1/nope/"),
        ("get", "/api/v1/"),
        ("post", "/api/v1/nope"),
        ("delete", "/api/v1/budgets/abc/"),
        ("get", "/api/v1/budgets/99999999999999999999999/"),
        ("get", "/api/v1/profiles/no-such-profile/quality/"),
        ("get", "/api/v1/profiles/cascade/no-such-profile/calibrations/"),
        ("post", "/api/v1/profiles/balanced/calibrations/99999999999999999999999/rollback/"),
        ("post", "/api/v1/profiles/balanced/calibrations/1/rollback/"),
        ("patch", "/api/v1/budgets/99999999999999999999999/"),
        ("get", "/api/v1/end-users/-1/"),
        ("get", "/api/v1/usage/exports/99999999999999999999/download/?token=x"),
    ],
)
def test_unknown_paths_and_ids_are_a_json_404(api_token, method, url):
    response = getattr(api(api_token.raw), method)(url, {}, format="json")

    assert api_error(response)["code"] == "not_found"
    assert response.status_code == 404


@pytest.mark.django_db
def test_a_known_path_without_its_slash_is_redirected(api_token):
    response = api(api_token.raw).get("/api/v1/budgets?x=1")

    assert response.status_code == 301
    assert response["Location"] == "/api/v1/budgets/?x=1"


# (method, url, body, the field or code the error names)
WRITE_ERRORS = [
    (
        "post",
        "/api/v1/budgets/",
        {"scope": "tenant", "period": "month", "limit_nanos": BIG},
        "limit_nanos",
    ),
    (
        "post",
        "/api/v1/budgets/",
        {"scope": "tenant", "period": "month", "limit_nanos": -1},
        "limit_nanos",
    ),
    (
        "post",
        "/api/v1/budgets/",
        {"scope": "end_user", "period": "month", "limit_nanos": 1},
        "end_user",
    ),
    (
        "post",
        "/api/v1/budgets/",
        {"scope": "tenant", "period": "month", "limit_nanos": 1, "token": 1},
        "token",
    ),
    (
        "post",
        "/api/v1/budgets/",
        {"scope": "end_user", "period": "day", "limit_nanos": 1, "end_user": 2**70},
        "end_user",
    ),
    (
        "post",
        "/api/v1/budgets/",
        {"scope": "end_user", "period": "day", "limit_nanos": 1, "end_user": "abc"},
        "end_user",
    ),
    (
        "post",
        "/api/v1/budgets/",
        {"scope": "tier", "period": "day", "limit_nanos": 1, "tier": 0},
        "tier",
    ),
    ("patch", "/api/v1/budgets/{budget}/", {"limit_nanos": BIG}, "limit_nanos"),
    ("patch", "/api/v1/end-users/{end_user}/", {"tier": 2**70}, "tier"),
    (
        "post",
        "/api/v1/tokens/",
        {"name": "x", "scopes": ["completions"], "expires_at": "9999-12-31T23:59:59-14:00"},
        "expires_at",
    ),
    ("post", "/api/v1/tokens/", {"name": "x", "scopes": ["root"]}, "scopes"),
    ("post", "/api/v1/usage/exports/", {"start": "9999-12-31", "end": "9999-12-31"}, "range"),
    ("post", "/api/v1/profiles/", {"name": "p", "chain": ["demo/small"] * 200}, "chain"),
]


@pytest.mark.django_db
@pytest.mark.parametrize(("method", "url", "data", "field"), WRITE_ERRORS)
def test_writes_with_out_of_range_values_are_400_naming_the_field(
    api_token, tenant, method, url, data, field
):
    budget = Budget.objects.create(
        tenant=tenant, scope=BudgetScope.TENANT, period=BudgetPeriod.MONTH, limit_nanos=5
    )
    end_user = EndUser.objects.create(tenant=tenant, external_id="alice")

    response = getattr(api(api_token.raw), method)(
        url.format(budget=budget.pk, end_user=end_user.pk), data, format="json"
    )

    error = api_error(response)
    assert response.status_code == 400
    assert field in error["detail"]
    budget.refresh_from_db()
    assert budget.limit_nanos == 5


@pytest.mark.django_db
def test_unknown_budget_targets_are_404(api_token):
    response = api(api_token.raw).post(
        "/api/v1/budgets/",
        {"scope": "end_user", "period": "day", "limit_nanos": 1, "end_user": 12345},
        format="json",
    )

    assert response.status_code == 404
    assert api_error(response)["code"] == "not_found"


@pytest.mark.django_db
@pytest.mark.parametrize(
    ("raised", "status", "code"),
    [
        (
            OperationalError("could not connect to server: Connection refused"),
            503,
            "service_unavailable",
        ),
        (
            IntegrityError(
                'duplicate key value violates unique constraint "x"\nDETAIL:  Key (id)=(1)'
            ),
            409,
            "conflict",
        ),
        (
            IntegrityError('new row violates check constraint "y"\nDETAIL:  Failing row'),
            400,
            "constraint_violation",
        ),
        (DataError("bigint out of range"), 400, "invalid_value"),
        (RuntimeError("/work/main/secret.py exploded"), 500, "internal_error"),
    ],
)
def test_database_errors_are_clean_json(api_token, monkeypatch, raised, status, code):
    from tenants import services

    def explode(**kwargs):
        raise raised

    monkeypatch.setattr(services, "budget_create", explode)

    response = api(api_token.raw).post(
        "/api/v1/budgets/", {"scope": "tenant", "period": "month", "limit_nanos": 1}, format="json"
    )

    assert response.status_code == status
    error = api_error(response, status_class=status // 100)
    assert error["code"] == code
    assert not {"bigint", "connect", "secret", "unique", "check"} & set(
        error["message"].lower().replace(".", " ").split()
    )
    if status == 503:
        assert response["Retry-After"].isdigit()


@pytest.mark.django_db
def test_an_unreachable_database_is_a_503_before_anything_else(api_token, monkeypatch):
    import tenants.api_base

    def unreachable(**kwargs):
        raise OperationalError("connection to server at 127.0.0.1 failed")

    monkeypatch.setattr(tenants.api_base, "token_context_for_raw", unreachable)

    response = api(api_token.raw).get("/api/v1/usage/")

    assert response.status_code == 503
    assert api_error(response, status_class=5)["code"] == "service_unavailable"
    assert int(response["Retry-After"]) > 0
