"""The Responses API (``POST /v1/responses``) on the chat path: translation, the ledger,
budgets, streaming events, hostile input and tenant isolation.

In process (Django's async test client) for the gateway's behaviour, and through the
official OpenAI SDK against CascadeFlow under uvicorn (SQLite and PostgreSQL) for the
wire shapes the SDK parses.
"""

import json

import openai
import pytest
from asgiref.sync import sync_to_async
from django.test import AsyncClient
from pydantic import BaseModel

from routing.enums import UsageKind, UsageStatus
from routing.errors import GatewayError
from routing.models import UsageEvent
from routing.responses import parse_responses_request
from routing.schemas import MAX_OUTPUT_TOKENS
from tenants.models import EndUser
from tenants.services import tenant_settings_update
from tests.api.test_hostile_inputs import (
    UNREADABLE,
    breaker_is_closed,
    openai_error,
    others_are_still_served,
)
from tests.engine.test_agent import HARD
from tests.support.fake_upstream import Behaviour
from tests.tenants.test_budgets import USD, spend, tenant_budget

RESPONSES = "/v1/responses"
db = pytest.mark.django_db(transaction=True)


def body(model="demo/small", input="What is 2 + 2?", **extra) -> str:
    return json.dumps({"model": model, "input": input, **extra})


async def post(token, data, **headers):
    if token is not None:
        headers["Authorization"] = f"Bearer {token}"
    return await AsyncClient().post(
        RESPONSES, data=data, content_type="application/json", headers=headers
    )


@sync_to_async
def events(**filters):
    """The requests' ledger rows (a cascade that learns may add its audits' rows)."""
    return list(UsageEvent.objects.filter(kind=UsageKind.REQUEST, **filters).order_by("id"))


def texts_of(response: dict) -> str:
    return "".join(
        part["text"]
        for item in response["output"]
        if item["type"] == "message"
        for part in item["content"]
        if part["type"] == "output_text"
    )


async def read_events(response) -> list[tuple[str, dict]]:
    """The stream's events as (event name, data); comments are skipped."""
    text = b"".join([c async for c in response.streaming_content]).decode()
    found = []
    for block in text.split("\n\n"):
        lines = [line for line in block.split("\n") if line and not line.startswith(":")]
        if not lines:
            continue
        assert lines[0].startswith("event: ") and lines[1].startswith("data: "), block
        name, data = lines[0][7:], json.loads(lines[1][6:])
        assert data["type"] == name
        found.append((name, data))
    assert [d["sequence_number"] for _, d in found] == list(range(len(found)))
    return found


WEATHER_CALL = {
    "id": "call_weather_1",
    "type": "function",
    "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'},
}
WEATHER_TOOL = {
    "type": "function",
    "name": "get_weather",
    "description": "The weather in a city",
    "parameters": {
        "type": "object",
        "properties": {"city": {"type": "string"}},
        "required": ["city"],
        "additionalProperties": False,
    },
    "strict": True,
}


def weather_until_answered(payload: dict) -> list[dict] | None:
    """Call get_weather until its result is in the conversation, then answer."""
    if any(m.get("role") == "tool" for m in payload["messages"]):
        return None
    return [WEATHER_CALL]


# --- translation (what the upstream is asked) --------------------------------------------


@db
async def test_the_upstream_gets_the_chat_request_the_responses_request_means(
    api_token, fake_models
):
    response = await post(
        api_token.raw,
        body(
            "fake/gpt",
            [
                {"role": "developer", "content": "Answer in French."},
                {"type": "message", "role": "user", "content": [
                    {"type": "input_text", "text": "Weather"},
                    {"type": "input_text", "text": " in Paris?"},
                ]},
                {"type": "function_call", "call_id": "call_1", "name": "get_weather",
                 "arguments": '{"city": "Paris"}', "id": "fc_1", "status": "completed"},
                {"type": "function_call", "call_id": "call_2", "name": "get_weather",
                 "arguments": '{"city": "Lyon"}'},
                {"type": "function_call_output", "call_id": "call_1", "output": "18C"},
                {"type": "function_call_output", "call_id": "call_2",
                 "output": [{"type": "input_text", "text": "21C"}]},
            ],
            instructions="You are terse.",
            tools=[WEATHER_TOOL],
            tool_choice={"type": "function", "name": "get_weather"},
            parallel_tool_calls=False,
            text={"format": {"type": "json_schema", "name": "weather", "strict": True,
                             "schema": {"type": "object", "properties": {}}}},
            max_output_tokens=50,
            temperature=0.2,
            top_p=0.9,
            user="alice",
            metadata={"ticket": "T-1"},
            store=True,
            reasoning={"effort": "low"},
            include=[],
            truncation="disabled",
            background=False,
            service_tier="auto",
        ),
    )  # fmt: skip

    assert response.status_code == 200, response.content
    [sent] = fake_models.requests
    developer = sent["messages"][1]
    assert developer["role"] in ("developer", "system")  # LiteLLM sends it as a system message
    assert sent["messages"][3].pop("content", None) is None  # LiteLLM leaves a null out
    assert sent["messages"] == [
        {"role": "system", "content": "You are terse."},
        {"role": developer["role"], "content": "Answer in French."},
        {
            "role": "user",
            "content": [
                {"type": "text", "text": "Weather"},
                {"type": "text", "text": " in Paris?"},
            ],
        },
        {
            "role": "assistant",
            "tool_calls": [
                {
                    "id": "call_1",
                    "type": "function",
                    "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'},
                },
                {
                    "id": "call_2",
                    "type": "function",
                    "function": {"name": "get_weather", "arguments": '{"city": "Lyon"}'},
                },
            ],
        },
        {"role": "tool", "tool_call_id": "call_1", "content": "18C"},
        {"role": "tool", "tool_call_id": "call_2", "content": [{"type": "text", "text": "21C"}]},
    ]
    assert sent["tools"] == [
        {
            "type": "function",
            "function": {k: v for k, v in WEATHER_TOOL.items() if k != "type"},
        }
    ]
    assert sent["tool_choice"] == {"type": "function", "function": {"name": "get_weather"}}
    assert sent["parallel_tool_calls"] is False
    assert sent["response_format"] == {
        "type": "json_schema",
        "json_schema": {
            "name": "weather",
            "strict": True,
            "schema": {"type": "object", "properties": {}},
        },
    }
    assert sent["max_completion_tokens"] == 50
    assert (sent["temperature"], sent["top_p"], sent["reasoning_effort"]) == (0.2, 0.9, "low")
    for private in ("metadata", "store", "instructions", "input", "text", "include", "user"):
        assert private not in sent  # echoed or applied by CascadeFlow, never sent upstream
    data = json.loads(response.content)
    assert data["metadata"] == {"ticket": "T-1"}
    assert data["instructions"] == "You are terse."
    assert data["store"] is False  # accepted, and said: nothing is stored
    assert data["tools"] == [WEATHER_TOOL]
    assert data["tool_choice"] == {"type": "function", "name": "get_weather"}
    assert data["text"] == {
        "format": {
            "type": "json_schema",
            "name": "weather",
            "strict": True,
            "schema": {"type": "object", "properties": {}},
        }
    }
    assert (data["temperature"], data["top_p"], data["max_output_tokens"]) == (0.2, 0.9, 50)
    assert (data["parallel_tool_calls"], data["user"]) == (False, "alice")
    [event] = await events()
    end_user = await EndUser.objects.aget(pk=event.end_user_id)
    assert end_user.external_id == "alice"


def test_a_string_input_is_one_user_message_and_json_object_is_passed():
    parsed = parse_responses_request(
        body(input="hi", text={"format": {"type": "json_object"}, "verbosity": None}).encode()
    )

    assert parsed.chat.messages == [{"role": "user", "content": "hi"}]
    assert parsed.chat.params == {"response_format": {"type": "json_object"}}
    assert parsed.chat.stream is False


def test_assistant_output_items_sent_back_become_assistant_messages():
    parsed = parse_responses_request(
        body(
            input=[
                {"role": "user", "content": "Weather in Paris?"},
                {
                    "type": "message",
                    "id": "msg_1",
                    "status": "completed",
                    "role": "assistant",
                    "content": [
                        {"type": "output_text", "text": "Let me check.", "annotations": []}
                    ],
                },
                {
                    "type": "function_call",
                    "call_id": "c1",
                    "name": "get_weather",
                    "arguments": "{}",
                },
                {"type": "function_call_output", "call_id": "c1", "output": "sunny"},
            ],
            tools=[WEATHER_TOOL],
        ).encode()
    )

    assert parsed.chat.messages[1] == {
        "role": "assistant",
        "content": "Let me check.",
        "tool_calls": [
            {"id": "c1", "type": "function", "function": {"name": "get_weather", "arguments": "{}"}}
        ],
    }
    assert parsed.chat.messages[2] == {"role": "tool", "tool_call_id": "c1", "content": "sunny"}


def test_a_function_tools_no_op_fields_are_accepted():
    tool = {
        **WEATHER_TOOL,
        "defer_loading": False,
        "allowed_callers": ["direct"],
        "output_schema": None,
    }

    parsed = parse_responses_request(body(tools=[tool]).encode())

    assert parsed.chat.params["tools"][0]["function"]["name"] == "get_weather"


def test_tool_choice_and_parallel_calls_are_not_sent_without_tools():
    parsed = parse_responses_request(body(tool_choice="auto", parallel_tool_calls=True).encode())

    assert parsed.chat.params == {}
    assert parsed.echo["tool_choice"] == "auto"


def test_images_and_files_take_the_chat_paths_content_parts():
    parsed = parse_responses_request(
        body(
            input=[
                {
                    "role": "user",
                    "content": [
                        {"type": "input_text", "text": "What is this?"},
                        {"type": "input_image", "image_url": "data:image/png;base64,AA", "detail": "low"},
                        {"type": "input_file", "file_data": "data:application/pdf;base64,AA", "filename": "a.pdf"},
                    ],
                }
            ]
        ).encode()
    )  # fmt: skip

    assert parsed.chat.messages[0]["content"][1:] == [
        {"type": "image_url", "image_url": {"url": "data:image/png;base64,AA", "detail": "low"}},
        {"type": "file", "file": {"file_data": "data:application/pdf;base64,AA", "filename": "a.pdf"}},
    ]  # fmt: skip


# --- answers, the ledger, headers ---------------------------------------------------------


@db
async def test_a_demo_model_answers_and_the_usage_is_the_ledger_rows(api_token):
    response = await post(api_token.raw, body(input="What is 12 * (3 + 4)?", user="bob"))

    assert response.status_code == 200, response.content
    data = json.loads(response.content)
    request_id = response["x-request-id"]
    assert data["id"] == "resp_" + request_id.removeprefix("req_")
    assert (data["object"], data["status"], data["model"]) == (
        "response",
        "completed",
        "demo/small",
    )
    assert data["error"] is None and data["incomplete_details"] is None
    [message] = data["output"]
    assert message["type"] == "message" and message["role"] == "assistant"
    assert message["id"].startswith("msg_") and message["status"] == "completed"
    [part] = message["content"]
    assert part["type"] == "output_text" and part["annotations"] == []
    assert "84" in part["text"]
    assert response["x-cascade-model"] == "demo/small"
    assert response["x-cascade-escalated"] == "false"
    [event] = await events()
    assert event.request_id == request_id
    assert event.status == UsageStatus.OK
    assert event.requested_model == "demo/small"
    assert event.stream is False
    assert data["usage"] == {
        "input_tokens": event.prompt_tokens,
        "input_tokens_details": {"cached_tokens": 0},
        "output_tokens": event.completion_tokens,
        "output_tokens_details": {"reasoning_tokens": 0},
        "total_tokens": event.prompt_tokens + event.completion_tokens,
    }
    assert response["x-cascade-cost-usd"] == f"{event.cost_nanos / 1e9:.9f}"


@db
async def test_an_escalated_cascade_counts_every_model_it_called(api_token, tenant):
    await sync_to_async(tenant_settings_update)(tenant=tenant, audits_enabled=False)

    response = await post(api_token.raw, body("cascade/quality_first", HARD))

    assert response["x-cascade-escalated"] == "true"
    assert response["x-cascade-profile"] == "cascade/quality_first"
    data = json.loads(response.content)
    [event] = await events()
    assert event.models_called[0] == "demo/small" and len(event.models_called) > 1
    assert data["model"] == event.model == response["x-cascade-model"]
    assert data["usage"]["input_tokens"] == event.prompt_tokens
    assert data["usage"]["output_tokens"] == event.completion_tokens
    assert data["usage"]["input_tokens"] == sum(a["prompt_tokens"] for a in event.expanded_attempts)


@db
async def test_max_output_tokens_that_cut_the_answer_make_it_incomplete(api_token):
    response = await post(
        api_token.raw, body(input="Tell me about lighthouses", max_output_tokens=5)
    )

    data = json.loads(response.content)
    assert data["status"] == "incomplete"
    assert data["incomplete_details"] == {"reason": "max_output_tokens"}
    assert data["output"][0]["status"] == "incomplete"
    assert data["usage"]["output_tokens"] == 5
    [event] = await events()
    assert event.completion_tokens == 5


@db
async def test_a_function_call_comes_back_as_a_function_call_item(api_token, fake_models):
    fake_models.behaviours["gpt-fake"] = Behaviour(tool_calls=[WEATHER_CALL])

    response = await post(
        api_token.raw, body("fake/gpt", "Weather in Paris?", tools=[WEATHER_TOOL])
    )

    data = json.loads(response.content)
    [call] = data["output"]
    assert call["type"] == "function_call" and call["id"].startswith("fc_")
    assert (call["call_id"], call["name"], call["arguments"], call["status"]) == (
        "call_weather_1",
        "get_weather",
        '{"city": "Paris"}',
        "completed",
    )


@db
async def test_upstream_failure_is_a_502_and_recorded(api_token, fake_models):
    fake_models.behaviours["failing"] = Behaviour(fail_status=500)

    response = await post(api_token.raw, body("fake/failing"))

    assert response.status_code == 502
    assert openai_error_5xx(response)["code"] == "upstream_error"
    assert response["x-cascade-model"] == "none"
    [event] = await events()
    assert (event.status, event.http_status) == (UsageStatus.UPSTREAM_ERROR, 502)


def openai_error_5xx(response) -> dict:
    payload = json.loads(response.content)
    assert set(payload) == {"error"} and set(payload["error"]) == {
        "message",
        "type",
        "param",
        "code",
    }
    return payload["error"]


@db
async def test_auth_comes_before_the_body_and_methods_are_checked(api_token):
    unauthenticated = await post(None, b"{not json")
    wrong_method = await AsyncClient().get(
        RESPONSES, headers={"Authorization": f"Bearer {api_token.raw}"}
    )

    assert unauthenticated.status_code == 401
    assert openai_error(unauthenticated)["code"] == "invalid_api_key"
    assert wrong_method.status_code == 405
    assert wrong_method["Allow"] == "POST"
    assert await events() == []


# --- budgets ------------------------------------------------------------------------------


@db
@pytest.mark.parametrize("stream", [False, True])
async def test_a_blocking_budget_refuses_with_402_and_records_it(api_token, tenant, stream):
    budget = await tenant_budget(tenant, limit=USD)
    await spend(budget, USD)

    response = await post(api_token.raw, body(stream=stream))

    assert response.status_code == 402
    error = openai_error(response)
    assert error["code"] == "budget_exceeded"
    assert "the tenant" in error["message"]
    [event] = await events()
    assert (event.status, event.http_status) == (UsageStatus.BLOCKED, 402)
    assert event.request_id == response["x-request-id"]


@db
async def test_a_budget_is_settled_to_the_ledger(api_token, tenant):
    from tenants.models import BudgetCounter

    budget = await tenant_budget(tenant, limit=USD)

    response = await post(api_token.raw, body())

    assert response.status_code == 200
    [event] = await events()
    counter = await BudgetCounter.objects.aget(budget=budget)
    assert counter.spent_nanos == event.cost_nanos > 0
    assert counter.reserved_nanos == 0


# --- streaming ----------------------------------------------------------------------------

TEXT_EVENTS = [
    "response.created",
    "response.in_progress",
    "response.output_item.added",
    "response.content_part.added",
    "response.output_text.delta",
    "response.output_text.done",
    "response.content_part.done",
    "response.output_item.done",
    "response.completed",
]


def collapsed(names: list[str]) -> list[str]:
    """Event names with runs of the same delta event collapsed to one."""
    out: list[str] = []
    for name in names:
        if not (out and name == out[-1] and name.endswith(".delta")):
            out.append(name)
    return out


@db
@pytest.mark.parametrize("model", ["demo/medium", "cascade/balanced"])
async def test_a_stream_sends_the_typed_events_in_order_and_its_usage_is_the_ledger_rows(
    api_token, model
):
    response = await post(api_token.raw, body(model, "Tell me about rivers", stream=True))

    assert response.status_code == 200
    assert response["content-type"] == "text/event-stream"
    found = await read_events(response)
    assert collapsed([name for name, _ in found]) == TEXT_EVENTS
    created, final = found[0][1]["response"], found[-1][1]["response"]
    assert created["status"] == "in_progress" and created["output"] == []
    assert created["id"] == final["id"] == "resp_" + response["x-request-id"][4:]
    text = "".join(d["delta"] for name, d in found if name == "response.output_text.delta")
    assert texts_of(final) == text
    by_name = {name: d for name, d in found}
    assert by_name["response.output_text.done"]["text"] == text
    assert by_name["response.content_part.done"]["part"]["text"] == text
    item_id = by_name["response.output_item.added"]["item"]["id"]
    assert by_name["response.output_item.done"]["item"]["id"] == item_id
    assert {d["item_id"] for _, d in found if "item_id" in d} == {item_id}
    [event] = await events()
    assert event.stream is True and event.status == UsageStatus.OK
    assert final["usage"]["input_tokens"] == event.prompt_tokens
    assert final["usage"]["output_tokens"] == event.completion_tokens
    assert final["model"] == event.model == response["x-cascade-model"]


@db
async def test_a_streamed_function_call_sends_its_argument_deltas(api_token, fake_models):
    fake_models.behaviours["gpt-fake"] = Behaviour(tool_calls=[WEATHER_CALL])

    response = await post(
        api_token.raw, body("fake/gpt", "Weather in Paris?", tools=[WEATHER_TOOL], stream=True)
    )

    found = await read_events(response)
    assert collapsed([name for name, _ in found]) == [
        "response.created",
        "response.in_progress",
        "response.output_item.added",
        "response.function_call_arguments.delta",
        "response.function_call_arguments.done",
        "response.output_item.done",
        "response.completed",
    ]
    deltas = [d["delta"] for name, d in found if name == "response.function_call_arguments.delta"]
    assert len(deltas) == 2 and "".join(deltas) == '{"city": "Paris"}'
    [call] = found[-1][1]["response"]["output"]
    assert (call["type"], call["call_id"], call["name"]) == (
        "function_call",
        "call_weather_1",
        "get_weather",
    )
    assert call["arguments"] == '{"city": "Paris"}'
    [event] = await events()
    assert found[-1][1]["response"]["usage"]["input_tokens"] == event.prompt_tokens


@db
async def test_a_stream_cut_by_max_output_tokens_ends_incomplete(api_token):
    response = await post(
        api_token.raw, body(input="Tell me about lighthouses", max_output_tokens=5, stream=True)
    )

    found = await read_events(response)
    name, last = found[-1]
    assert name == "response.incomplete"
    assert last["response"]["status"] == "incomplete"
    assert last["response"]["incomplete_details"] == {"reason": "max_output_tokens"}
    assert last["response"]["output"][0]["status"] == "incomplete"


@db
async def test_a_stream_that_dies_midway_ends_with_response_failed(api_token, fake_models):
    fake_models.behaviours["failing"] = Behaviour(content="a b c", die_mid_stream=True)

    response = await post(api_token.raw, body("fake/failing", stream=True))

    found = await read_events(response)
    name, last = found[-1]
    assert name == "response.failed"
    assert last["response"]["status"] == "failed"
    assert last["response"]["error"]["code"] == "server_error"
    assert "response.completed" not in [n for n, _ in found]
    [event] = await events()
    assert event.status == UsageStatus.UPSTREAM_ERROR
    assert last["response"]["usage"]["input_tokens"] == event.prompt_tokens


@db
async def test_a_stream_failing_before_any_output_is_an_http_error(api_token, fake_models):
    fake_models.behaviours["failing"] = Behaviour(fail_status=500)

    response = await post(api_token.raw, body("fake/failing", stream=True))

    assert response.status_code == 502
    assert openai_error_5xx(response)["code"] == "upstream_error"


@db
async def test_chat_chunks_with_empty_choices_are_read_defensively(api_token, monkeypatch):
    """A usage chunk with ``choices: []`` (or no choices at all), comments and blank data
    lines mid-stream change nothing in the events."""
    from routing import gateway

    real = gateway.stream

    async def noisy(gw):
        outcome = await real(gw)
        relayed = outcome.events

        async def events_():
            async for block in relayed:
                yield block
                if block.startswith("data: {"):
                    yield 'data: {"id":"x","choices":[],"usage":{"prompt_tokens":1}}\n\n'
                    yield 'data: {"id":"x"}\n\n'
                    yield ": keep-alive\n\n"

        outcome.events = events_()
        return outcome

    monkeypatch.setattr(gateway, "stream", noisy)

    response = await post(api_token.raw, body("demo/small", "Tell me about rivers", stream=True))

    found = await read_events(response)
    assert collapsed([name for name, _ in found]) == TEXT_EVENTS
    [event] = await events()
    assert found[-1][1]["response"]["usage"]["input_tokens"] == event.prompt_tokens


def test_interleaved_chunks_make_well_formed_items():
    """Text, a refusal and a tool call's pieces in any order: one message item with its parts
    in order, then the call, whole; a usage chunk of ``choices: []`` adds nothing."""
    from routing.responses import ResponseStream

    out = ResponseStream(parse_responses_request(body().encode()), "resp_1", "demo/small")

    def chunk(finish=None, **delta):
        return {
            "model": "demo/small",
            "choices": [{"index": 0, "delta": delta, "finish_reason": finish}],
        }

    names = [e.split("\n")[0][7:] for e in out.start()]
    for data in (
        chunk(role="assistant", content=""),
        chunk(tool_calls=[{"index": 0, "id": "c1", "function": {"name": "f", "arguments": ""}}]),
        chunk(content="Hel"),
        chunk(tool_calls=[{"index": 0, "function": {"arguments": '{"a":'}}]),
        chunk(content="lo"),
        chunk(refusal="No."),
        chunk(tool_calls=[{"index": 0, "function": {"arguments": " 1}"}}]),
        chunk("tool_calls"),
        {"model": "demo/small", "choices": [], "usage": {"prompt_tokens": 3}},
    ):
        names += [e.split("\n")[0][7:] for e in out.feed(data)]
    events_ = list(out.finish((3, 4)))
    names += [e.split("\n")[0][7:] for e in events_]
    final = json.loads(events_[-1].split("\n")[1][6:])

    assert names == [
        "response.created",
        "response.in_progress",
        "response.output_item.added",
        "response.content_part.added",
        "response.output_text.delta",
        "response.output_text.delta",
        "response.output_text.done",
        "response.content_part.done",
        "response.content_part.added",
        "response.refusal.delta",
        "response.refusal.done",
        "response.content_part.done",
        "response.output_item.done",
        "response.output_item.added",
        "response.function_call_arguments.delta",
        "response.function_call_arguments.delta",
        "response.function_call_arguments.done",
        "response.output_item.done",
        "response.completed",
    ]
    message, call = final["response"]["output"]
    assert [p["type"] for p in message["content"]] == ["output_text", "refusal"]
    assert (message["content"][0]["text"], message["content"][1]["refusal"]) == ("Hello", "No.")
    assert (call["call_id"], call["name"], call["arguments"]) == ("c1", "f", '{"a": 1}')
    assert final["response"]["usage"]["total_tokens"] == 7
    assert final["sequence_number"] == len(names) - 1


# --- hostile input --------------------------------------------------------------------------

BIG = 2**63


def raw(**data) -> bytes:
    return json.dumps(data).encode()


def req(**extra) -> bytes:
    return raw(**{"model": "demo/small", "input": "hi", **extra})


def item(**fields) -> bytes:
    return req(input=[fields])


# (body, the param the error names (None: the body as a whole), its code)
HOSTILE = {
    "no input": (raw(model="demo/small"), "input", "invalid_request"),
    "empty input": (req(input=[]), "input", "invalid_request"),
    "input a number": (req(input=5), "input", "invalid_request"),
    "input item a string": (req(input=["hi"]), "input[0]", "invalid_request"),
    "role wizard": (item(role="wizard", content="x"), "input[0].role", "invalid_request"),
    "role tool": (item(role="tool", content="x"), "input[0].role", "invalid_request"),
    "content a number": (item(role="user", content=5), "input[0].content", "invalid_request"),
    "input_text of an object": (
        item(role="user", content=[{"type": "input_text", "text": {}}]),
        "input[0].content[0].text",
        "invalid_request",
    ),
    "part of unknown type": (
        item(role="user", content=[{"type": "video"}]),
        "input[0].content[0]",
        "unsupported_input",
    ),
    "image by file id": (
        item(role="user", content=[{"type": "input_image", "file_id": "file_1"}]),
        "input[0].content[0].image_url",
        "unsupported_input",
    ),
    "file by URL": (
        item(role="user", content=[{"type": "input_file", "file_url": "https://x/a.pdf"}]),
        "input[0].content[0].file_url",
        "unsupported_input",
    ),
    "image in a system message": (
        item(role="system", content=[{"type": "input_image", "image_url": "https://x/a.png"}]),
        "input[0].content[0]",
        "unsupported_input",
    ),
    "image detail huge": (
        item(
            role="user",
            content=[{"type": "input_image", "image_url": "https://x", "detail": "huge"}],
        ),
        "input[0].content[0].detail",
        "invalid_request",
    ),
    "reasoning item": (item(type="reasoning", summary=[]), "input[0].type", "unsupported_input"),
    "item_reference": (
        item(type="item_reference", id="msg_1"),
        "input[0].type",
        "unsupported_input",
    ),
    "web_search_call item": (item(type="web_search_call"), "input[0].type", "unsupported_input"),
    "function_call without call_id": (
        item(type="function_call", name="f", arguments="{}"),
        "input[0].call_id",
        "invalid_request",
    ),
    "function_call arguments an object": (
        item(type="function_call", call_id="c", name="f", arguments={}),
        "input[0].arguments",
        "invalid_request",
    ),
    "function_call_output for no call": (
        item(type="function_call_output", call_id="c", output="x"),
        "input[0].call_id",
        "invalid_request",
    ),
    "function_call_output of an image": (
        req(
            input=[
                {"type": "function_call", "call_id": "c", "name": "f", "arguments": "{}"},
                {
                    "type": "function_call_output",
                    "call_id": "c",
                    "output": [{"type": "input_image", "image_url": "https://x"}],
                },
            ]
        ),
        "input[1].output[0]",
        "unsupported_input",
    ),
    "function_call_output a number": (
        req(
            input=[
                {"type": "function_call", "call_id": "c", "name": "f", "arguments": "{}"},
                {"type": "function_call_output", "call_id": "c", "output": 5},
            ]
        ),
        "input[1].output",
        "invalid_request",
    ),
    "lone surrogate in input": (req(input="\ud800"), "input", "invalid_request"),
    "NUL in an input part": (
        item(role="user", content=[{"type": "input_text", "text": "a\x00b"}]),
        "input[0].content[0].text",
        "invalid_request",
    ),
    "lone surrogate in instructions": (
        req(instructions="\udfff"),
        "instructions",
        "invalid_request",
    ),
    "instructions a list": (req(instructions=["x"]), "instructions", "invalid_request"),
    "no model": (raw(input="hi"), "model", "invalid_request"),
    "model of 300 characters": (req(model="m" * 300), "model", "invalid_request"),
    "NUL in model": (req(model="demo/small\x00"), "model", "invalid_request"),
    "web_search tool": (req(tools=[{"type": "web_search"}]), "tools[0].type", "unsupported_tool"),
    "file_search tool": (
        req(tools=[{"type": "file_search", "vector_store_ids": ["vs_1"]}]),
        "tools[0].type",
        "unsupported_tool",
    ),
    "code_interpreter tool": (
        req(tools=[{"type": "code_interpreter", "container": {"type": "auto"}}]),
        "tools[0].type",
        "unsupported_tool",
    ),
    "mcp tool": (
        req(tools=[{"type": "mcp", "server_label": "x", "server_url": "https://x"}]),
        "tools[0].type",
        "unsupported_tool",
    ),
    "a tool in chat's nested shape": (
        req(tools=[{"type": "function", "function": {"name": "f"}}]),
        "tools[0].name",
        "invalid_request",
    ),
    "tool parameters a string": (
        req(tools=[{"type": "function", "name": "f", "parameters": "x"}]),
        "tools[0].parameters",
        "invalid_request",
    ),
    "tool strict as text": (
        req(tools=[{"type": "function", "name": "f", "strict": "yes"}]),
        "tools[0].strict",
        "invalid_request",
    ),
    "tool deferred": (
        req(tools=[{"type": "function", "name": "f", "defer_loading": True}]),
        "tools[0].defer_loading",
        "unsupported_parameter",
    ),
    "tool of unknown field": (
        req(tools=[{"type": "function", "name": "f", "api_base": "http://x"}]),
        "tools[0].api_base",
        "unknown_parameter",
    ),
    "two tools of one name": (
        req(tools=[{"type": "function", "name": "f"}, {"type": "function", "name": "f"}]),
        "tools[1].name",
        "invalid_request",
    ),
    "200 tools": (
        req(tools=[{"type": "function", "name": f"f{i}"} for i in range(200)]),
        "tools",
        "invalid_request",
    ),
    "tools an object": (req(tools={"type": "function"}), "tools", "invalid_request"),
    "tool_choice names no tool": (
        req(
            tools=[{"type": "function", "name": "f"}], tool_choice={"type": "function", "name": "g"}
        ),
        "tool_choice.name",
        "invalid_request",
    ),
    "tool_choice required without tools": (
        req(tool_choice="required"),
        "tool_choice",
        "invalid_request",
    ),
    "tool_choice file_search": (
        req(tool_choice={"type": "file_search"}),
        "tool_choice",
        "unsupported_parameter",
    ),
    "tool_choice allowed_tools": (
        req(tool_choice={"type": "allowed_tools", "mode": "auto", "tools": []}),
        "tool_choice",
        "unsupported_parameter",
    ),
    "tool_choice a number": (req(tool_choice=5), "tool_choice", "invalid_request"),
    "text.format yaml": (req(text={"format": {"type": "yaml"}}), "text.format", "invalid_request"),
    "text a string": (req(text="json"), "text", "invalid_request"),
    "json_schema without a name": (
        req(text={"format": {"type": "json_schema", "schema": {}}}),
        "text.format.name",
        "invalid_request",
    ),
    "json_schema of a string": (
        req(text={"format": {"type": "json_schema", "name": "x", "schema": "abc"}}),
        "text.format.schema",
        "invalid_request",
    ),
    "json_schema in chat's shape": (
        req(text={"format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {}}}}),
        "text.format.name",
        "invalid_request",
    ),
    "text.verbosity high": (
        req(text={"verbosity": "high"}),
        "text.verbosity",
        "unsupported_parameter",
    ),
    "max_output_tokens 0": (req(max_output_tokens=0), "max_output_tokens", "invalid_request"),
    "max_output_tokens 2^63": (req(max_output_tokens=BIG), "max_output_tokens", "invalid_request"),
    "max_output_tokens above the bound": (
        req(max_output_tokens=MAX_OUTPUT_TOKENS + 1),
        "max_output_tokens",
        "invalid_request",
    ),
    "max_output_tokens 1.5": (req(max_output_tokens=1.5), "max_output_tokens", "invalid_request"),
    "temperature 3": (req(temperature=3), "temperature", "invalid_request"),
    "temperature as text": (req(temperature="1"), "temperature", "invalid_request"),
    "top_p 2": (req(top_p=2), "top_p", "invalid_request"),
    "user of 300 characters": (req(user="x" * 300), "user", "invalid_request"),
    "NUL in user": (req(user="alice\x00"), "user", "invalid_request"),
    "metadata of 17 keys": (
        req(metadata={f"k{i}": "v" for i in range(17)}),
        "metadata",
        "invalid_request",
    ),
    "metadata of a number": (req(metadata={"k": 1}), "metadata", "invalid_request"),
    "metadata a list": (req(metadata=["k"]), "metadata", "invalid_request"),
    "parallel_tool_calls as text": (
        req(parallel_tool_calls="yes"),
        "parallel_tool_calls",
        "invalid_request",
    ),
    "stream as text": (req(stream="yes"), "stream", "invalid_request"),
    "stream_options without stream": (
        req(stream_options={"include_obfuscation": False}),
        "stream_options",
        "invalid_request",
    ),
    "stream_options of chat": (
        req(stream=True, stream_options={"include_usage": True}),
        "stream_options.include_usage",
        "unknown_parameter",
    ),
    "previous_response_id": (
        req(previous_response_id="resp_123"),
        "previous_response_id",
        "unsupported_parameter",
    ),
    "conversation": (req(conversation="conv_1"), "conversation", "unsupported_parameter"),
    "prompt": (req(prompt={"id": "pmpt_1"}), "prompt", "unsupported_parameter"),
    "background": (req(background=True), "background", "unsupported_parameter"),
    "store as text": (req(store="yes"), "store", "invalid_request"),
    "include logprobs": (
        req(include=["message.output_text.logprobs"]),
        "include",
        "unsupported_parameter",
    ),
    "include a string": (req(include="x"), "include", "invalid_request"),
    "truncation auto": (req(truncation="auto"), "truncation", "unsupported_parameter"),
    "reasoning summary": (
        req(reasoning={"effort": "low", "summary": "auto"}),
        "reasoning.summary",
        "unsupported_parameter",
    ),
    "reasoning effort an object": (
        req(reasoning={"effort": {}}),
        "reasoning.effort",
        "invalid_request",
    ),
    "max_tool_calls": (req(max_tool_calls=3), "max_tool_calls", "unsupported_parameter"),
    "top_logprobs": (req(top_logprobs=5), "top_logprobs", "unsupported_parameter"),
    "service_tier flex": (req(service_tier="flex"), "service_tier", "unsupported_parameter"),
    "safety_identifier": (
        req(safety_identifier="u1"),
        "safety_identifier",
        "unsupported_parameter",
    ),
    "prompt_cache_key": (req(prompt_cache_key="k"), "prompt_cache_key", "unsupported_parameter"),
    "chat's messages": (
        raw(model="demo/small", messages=[{"role": "user", "content": "hi"}]),
        "messages",
        "unknown_parameter",
    ),
    "LiteLLM's api_base": (req(api_base="http://evil.test"), "api_base", "unknown_parameter"),
    "LiteLLM's mock_response": (req(mock_response="x"), "mock_response", "unknown_parameter"),
    "body an array": (b"[1, 2]", None, "invalid_json"),
    "body a string": (b'"hi"', None, "invalid_json"),
    "empty body": (b"", None, "invalid_json"),
    **{name: (data, None, None) for name, data in UNREADABLE.items()},
}


@pytest.mark.parametrize("case", list(HOSTILE))
def test_hostile_requests_are_refused_naming_the_parameter(case):
    data, param, code = HOSTILE[case]

    with pytest.raises(GatewayError) as caught:
        parse_responses_request(data)

    error = caught.value.payload()["error"]
    assert caught.value.status == 400
    assert error["type"] == "invalid_request_error"
    if code is not None:
        assert (error["param"], error["code"]) == (param, code)
    assert error["message"]


@db
async def test_hostile_requests_are_400s_over_http_and_trip_nothing(
    api_token, other_api_token, settings
):
    settings.CASCADEFLOW_BREAKER_FAILURES = 1  # the breaker opens on the first counted failure

    for case, (data, param, code) in HOSTILE.items():
        response = await post(api_token.raw, data)
        error = openai_error(response)
        assert response.status_code == 400, case
        if code is not None:
            assert (error["param"], error["code"]) == (param, code), case
        assert response["x-request-id"].startswith("req_")

    assert await events() == []  # refused before admission
    assert await breaker_is_closed("demo/small", "demo/medium", "demo/large")
    await others_are_still_served(other_api_token)


# --- tenants --------------------------------------------------------------------------------


@db
async def test_tenants_are_isolated(api_token, other_api_token):
    mine = await post(api_token.raw, body(user="alice", metadata={"tenant": "acme"}))
    resp_id = json.loads(mine.content)["id"]
    theirs = await post(other_api_token.raw, body(user="alice"))

    # Nothing is stored, so nothing can be fetched or continued, by anyone: the answer is
    # the same for the tenant that owns the id and for another one.
    answers = set()
    for token in (api_token.raw, other_api_token.raw):
        fetched = await AsyncClient().get(
            f"{RESPONSES}/{resp_id}", headers={"Authorization": f"Bearer {token}"}
        )
        assert openai_error(fetched)["code"] == "unknown_url"
        continued = await post(token, body(previous_response_id=resp_id))
        assert openai_error(continued)["param"] == "previous_response_id"
        answers.add((fetched.status_code, fetched.content, continued.content))
    assert len(answers) == 1
    assert b"acme" not in b"".join(answers.pop()[1:])
    assert json.loads(theirs.content)["metadata"] == {}
    rows = await sync_to_async(list)(
        UsageEvent.objects.filter(kind=UsageKind.REQUEST)
        .order_by("id")
        .values_list("request_id", "tenant__slug", "end_user__tenant__slug")
    )
    assert rows == [
        (mine["x-request-id"], "acme", "acme"),
        (theirs["x-request-id"], "globex", "globex"),
    ]


# --- the official SDK against CascadeFlow under uvicorn ---------------------------------------


@pytest.fixture
def client(cascadeflow_server):
    return cascadeflow_server.openai_client()


def ledger_row(server, request_id):
    rows = server.query(
        "SELECT status, stream, prompt_tokens, completion_tokens, model, profile "
        "FROM routing_usageevent WHERE request_id = %s",
        (request_id,),
    )
    assert len(rows) == 1, rows
    return rows[0]


def request_id_of(response) -> str:
    return "req_" + response.id.removeprefix("resp_")


def test_sdk_plain_text_on_a_demo_model(cascadeflow_server, client):
    raw_response = client.responses.with_raw_response.create(
        model="demo/large", input="What is 7 * 6?", user="sdk-user"
    )
    response = raw_response.parse()

    assert response.output_text.endswith("The answer is 42.")
    assert (response.object, response.status, response.model) == (
        "response",
        "completed",
        "demo/large",
    )
    assert raw_response.headers["x-request-id"] == request_id_of(response)
    assert raw_response.headers["x-cascade-model"] == "demo/large"
    status, stream, prompt, output, model, _ = ledger_row(
        cascadeflow_server, request_id_of(response)
    )
    assert (status, stream, model) == ("ok", False, "demo/large")
    assert (response.usage.input_tokens, response.usage.output_tokens) == (prompt, output)
    assert response.usage.total_tokens == prompt + output


def test_sdk_cascade_with_instructions(cascadeflow_server, client):
    response = client.responses.create(
        model="cascade/balanced",
        instructions="You are a calculator. Answer with the number.",
        input=[{"role": "user", "content": [{"type": "input_text", "text": "What is 12 + 30?"}]}],
        metadata={"ticket": "T-42"},
    )

    assert "42" in response.output_text
    assert response.instructions == "You are a calculator. Answer with the number."
    assert response.metadata == {"ticket": "T-42"}
    *_, model, profile = ledger_row(cascadeflow_server, request_id_of(response))
    assert profile == "cascade/balanced"
    assert model == response.model


def test_sdk_function_tool_round_trip(cascadeflow_server, client, upstream):
    upstream.behaviours["gpt-fake"] = Behaviour(
        content="It is 18C in Paris.", calls=weather_until_answered
    )
    conversation: list = [{"role": "user", "content": "What is the weather in Paris?"}]

    first = client.responses.create(model="fake/gpt", input=conversation, tools=[WEATHER_TOOL])

    [call] = first.output
    assert call.type == "function_call"
    assert (call.name, json.loads(call.arguments)) == ("get_weather", {"city": "Paris"})
    assert first.output_text == ""
    conversation += [item.model_dump(exclude_none=True) for item in first.output]
    conversation.append({"type": "function_call_output", "call_id": call.call_id, "output": "18C"})

    second = client.responses.create(model="fake/gpt", input=conversation, tools=[WEATHER_TOOL])

    assert second.output_text == "It is 18C in Paris."
    sent = upstream.requests[-1]
    assert sent["messages"][1]["tool_calls"][0]["id"] == call.call_id
    assert sent["messages"][2] == {"role": "tool", "tool_call_id": call.call_id, "content": "18C"}
    assert sent["tools"][0]["function"]["name"] == "get_weather"
    for response in (first, second):
        status, *_ = ledger_row(cascadeflow_server, request_id_of(response))
        assert status == "ok"


class Weather(BaseModel):
    city: str
    temperature: int
    sunny: bool


def test_sdk_structured_output_with_a_json_schema(cascadeflow_server, client):
    parsed = client.responses.parse(
        model="demo/large", input="The weather in Paris, as JSON", text_format=Weather
    )

    assert isinstance(parsed.output_parsed, Weather)
    assert json.loads(parsed.output_text) == parsed.output_parsed.model_dump()
    assert parsed.text.format.type == "json_schema"
    status, *_ = ledger_row(cascadeflow_server, request_id_of(parsed))
    assert status == "ok"


def test_sdk_stream_helper_gives_the_events_in_order_and_the_ledgers_usage(
    cascadeflow_server, client
):
    with client.responses.stream(
        model="cascade/balanced", input="Tell me about lighthouses"
    ) as stream:
        names = [event.type for event in stream]
        final = stream.get_final_response()

    assert collapsed(names) == TEXT_EVENTS
    assert "lighthouses" in final.output_text
    status, streamed, prompt, output, model, _ = ledger_row(
        cascadeflow_server, request_id_of(final)
    )
    assert (status, streamed, model) == ("ok", True, final.model)
    assert (final.usage.input_tokens, final.usage.output_tokens) == (prompt, output)


def test_sdk_stream_true_with_a_tool_call(cascadeflow_server, client, upstream):
    upstream.behaviours["gpt-fake"] = Behaviour(tool_calls=[WEATHER_CALL])

    events_ = list(
        client.responses.create(
            model="fake/gpt", input="Weather in Paris?", tools=[WEATHER_TOOL], stream=True
        )
    )

    assert events_[-1].type == "response.completed"
    [call] = events_[-1].response.output
    assert call.arguments == '{"city": "Paris"}'
    done = [e for e in events_ if e.type == "response.function_call_arguments.done"]
    assert done[0].arguments == call.arguments


def test_sdk_refusals_are_bad_request_errors(client):
    with pytest.raises(openai.BadRequestError) as caught:
        client.responses.create(model="demo/small", input="hi", tools=[{"type": "web_search"}])
    assert caught.value.code == "unsupported_tool"
    assert caught.value.param == "tools[0].type"

    with pytest.raises(openai.BadRequestError) as caught:
        client.responses.create(model="demo/small", input="hi", previous_response_id="resp_1")
    assert caught.value.param == "previous_response_id"

    with pytest.raises(openai.NotFoundError):
        client.responses.retrieve("resp_1")
