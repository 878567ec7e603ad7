"""OpenTelemetry traces: one trace per request, GenAI attributes, the caller's trace honoured,
no prompt text unless the tenant asks, and nothing at all while tracing is off."""

import json

import pytest
from django.test import AsyncClient, RequestFactory
from opentelemetry.trace import SpanKind, StatusCode

from routing import metrics, telemetry
from routing.engine import tracing
from tenants.models import Tenant

pytestmark = pytest.mark.django_db(transaction=True)

CHAT = "/v1/chat/completions"
SECRET = "the launch code is 0000"
CALLER_TRACE = "4bf92f3577b34da6a3ce929d0e0e4736"
CALLER_SPAN = "00f067aa0ba902b7"


async def post(token, payload, **headers):
    headers["Authorization"] = f"Bearer {token}"
    return await AsyncClient().post(
        CHAT, data=json.dumps(payload), content_type="application/json", headers=headers
    )


def chat(model="demo/small", content=f"What is 2 + 2? {SECRET}", **extra):
    return {"model": model, "messages": [{"role": "user", "content": content}], **extra}


def by_name(finished):
    names: dict[str, list] = {}
    for span in finished:
        names.setdefault(span.name, []).append(span)
    return names


def every_value(finished) -> str:
    """Everything the spans would export, as one string to search."""
    parts = []
    for span in finished:
        parts.append(span.name)
        parts.extend(f"{k}={v}" for k, v in (span.attributes or {}).items())
        for event in span.events:
            parts.extend(f"{k}={v}" for k, v in (event.attributes or {}).items())
    return "\n".join(parts)


async def test_a_cascade_is_one_trace_inside_the_callers(spans, api_token):
    traceparent = f"00-{CALLER_TRACE}-{CALLER_SPAN}-01"
    response = await post(
        api_token.raw, chat("cascade/balanced", user="alice"), traceparent=traceparent
    )
    assert response.status_code == 200, response.content
    finished = spans.get_finished_spans()
    names = by_name(finished)
    [server] = names["chat"]
    # Every span belongs to the caller's trace; the gateway's span is the caller's child.
    assert {format(s.context.trace_id, "032x") for s in finished} == {CALLER_TRACE}
    assert format(server.parent.span_id, "016x") == CALLER_SPAN
    assert server.kind == SpanKind.SERVER
    ids = {s.context.span_id: s for s in finished}
    for span in finished:
        if span is not server:  # each child hangs (through its parents) from the server span
            parent = span
            while parent.parent is not None and parent.parent.span_id in ids:
                parent = ids[parent.parent.span_id]
            assert parent is server, span.name

    attributes = server.attributes
    assert attributes["gen_ai.operation.name"] == "chat"
    assert attributes["gen_ai.request.model"] == "cascade/balanced"
    assert attributes["gen_ai.response.model"] == response["x-cascade-model"]
    assert attributes["gen_ai.usage.input_tokens"] > 0
    assert attributes["gen_ai.usage.output_tokens"] > 0
    assert attributes["http.response.status_code"] == 200
    assert attributes["cascadeflow.request_id"] == response["x-request-id"]
    assert attributes["cascadeflow.profile"] == "cascade/balanced"
    assert attributes["cascadeflow.escalated"] == (response["x-cascade-escalated"] == "true")
    assert attributes["cascadeflow.cost_usd"] == pytest.approx(
        float(response["x-cascade-cost-usd"])
    )
    assert "cascadeflow.domain" in attributes

    # Admission, each upstream call, each quality check and the ledger write are spans.
    assert len(names["admission"]) == 1 and len(names["ledger write"]) == 1
    calls = [s for s in finished if s.kind == SpanKind.CLIENT]
    assert [c.attributes["gen_ai.request.model"] for c in calls] == list(
        attributes["cascadeflow.models_called"]
    )
    for call in calls:
        assert call.attributes["gen_ai.system"]
        assert call.attributes["gen_ai.request.model"]
        assert call.attributes["gen_ai.usage.output_tokens"] >= 0
        assert call.attributes["gen_ai.response.finish_reasons"]
    checks = names["quality check"]
    assert checks
    for check in checks:
        assert 0.0 <= check.attributes["cascadeflow.check.score"] <= 1.0
        assert isinstance(check.attributes["cascadeflow.check.accepted"], bool)
    # A draft that was escalated failed its check; one that was served passed it.
    assert (
        checks[-1].attributes["cascadeflow.check.accepted"] != attributes["cascadeflow.escalated"]
    )
    # The prompt is never exported unless the tenant turned content capture on.
    assert SECRET not in every_value(finished)
    # The cold start audits this request (run in process here): its own span, by request id.
    [audit] = names["audit"]
    assert audit.attributes["cascadeflow.request_id"] == response["x-request-id"]
    assert audit.attributes["cascadeflow.audit.outcome"]


async def test_content_is_exported_only_when_the_tenant_turns_it_on(spans, api_token):
    await Tenant.objects.filter(pk=api_token.token.tenant_id).aupdate(trace_content=True)
    response = await post(api_token.raw, chat())
    assert response.status_code == 200
    [server] = by_name(spans.get_finished_spans())["chat"]
    assert SECRET in server.attributes["gen_ai.prompt"]


async def test_a_stream_is_traced_to_its_end(spans, api_token):
    response = await post(api_token.raw, chat("cascade/balanced", stream=True))
    assert response.status_code == 200
    body = b"".join([chunk async for chunk in response.streaming_content])
    assert body.endswith(b"data: [DONE]\n\n")
    finished = spans.get_finished_spans()
    names = by_name(finished)
    [server] = names["chat"]
    assert server.attributes["http.response.status_code"] == 200
    assert server.attributes["gen_ai.usage.output_tokens"] > 0
    assert len(names["ledger write"]) == 1
    assert [s for s in finished if s.kind == SpanKind.CLIENT]
    assert SECRET not in every_value(finished)


@pytest.mark.parametrize(
    ("payload", "token", "status"),
    [
        (chat(), "cf_wrong", 401),
        (chat(model="no/such-model"), None, 404),
        ({"model": "demo/small", "messages": "not a list"}, None, 400),
    ],
)
async def test_refused_requests_end_their_span_with_the_error(
    spans, api_token, payload, token, status
):
    response = await post(token or api_token.raw, payload)
    assert response.status_code == status
    [server] = by_name(spans.get_finished_spans())["chat"]
    assert server.status.status_code == StatusCode.ERROR
    assert server.attributes["http.response.status_code"] == status
    assert server.attributes["error.type"] == json.loads(response.content)["error"]["code"]


async def test_tracing_off_creates_no_span_at_all(api_token, monkeypatch):
    """Off, not even the OpenTelemetry API's no-op spans are made: a request pays nothing."""
    from opentelemetry import trace
    from opentelemetry.sdk import trace as sdk_trace

    made = []
    for owner, name in (
        (sdk_trace.Tracer, "start_span"),
        (sdk_trace.Tracer, "start_as_current_span"),
        (trace.NoOpTracer, "start_span"),
        (trace.NoOpTracer, "start_as_current_span"),
    ):
        original = getattr(owner, name)
        monkeypatch.setattr(
            owner, name, lambda *a, _o=original, _n=name, **k: made.append(_n) or _o(*a, **k)
        )
    assert not tracing.enabled()
    assert tracing.span("x") is tracing.NOTHING and tracing.start("y") is tracing.NOTHING
    assert telemetry.request_span("chat", {}, {}) is telemetry.OFF
    for payload in (chat("cascade/balanced"), chat(stream=True)):
        response = await post(api_token.raw, payload)
        assert response.status_code == 200
        if payload.get("stream"):
            [_ async for _ in response.streaming_content]
    assert made == []


def test_configure_reads_only_the_standard_variables(monkeypatch):
    for name in (
        "OTEL_SDK_DISABLED",
        "OTEL_TRACES_EXPORTER",
        "OTEL_EXPORTER_OTLP_ENDPOINT",
        "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT",
    ):
        monkeypatch.delenv(name, raising=False)
    assert not telemetry.wanted()
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_ENDPOINT", "http://127.0.0.1:4318")
    assert telemetry.wanted()
    monkeypatch.setenv("OTEL_SDK_DISABLED", "true")
    assert not telemetry.wanted()
    monkeypatch.delenv("OTEL_SDK_DISABLED")
    monkeypatch.setenv("OTEL_TRACES_EXPORTER", "none")
    assert not telemetry.wanted()


async def test_metrics_guard_and_switch(api_token, settings):
    """/metrics: loopback only without a token; the token when set; a 404 when metrics are off."""
    client = AsyncClient()
    assert (await client.get("/metrics")).status_code == 200  # the test client is 127.0.0.1
    outside = RequestFactory().get("/metrics", REMOTE_ADDR="203.0.113.9")
    assert metrics.metrics_view(outside).status_code == 403
    for header in ("X-Forwarded-For", "Forwarded", "X-Real-IP"):  # relayed by a local proxy
        relayed = await client.get("/metrics", headers={header: "203.0.113.9"})
        assert relayed.status_code == 403, header
    settings.CASCADEFLOW_METRICS_TOKEN = "t0ken"
    assert (await client.get("/metrics")).status_code == 403
    wrong = await client.get("/metrics", headers={"Authorization": "Bearer t0ke"})
    assert wrong.status_code == 403
    right = await client.get("/metrics", headers={"Authorization": "Bearer t0ken"})
    assert right.status_code == 200
    outside = RequestFactory().get(
        "/metrics", REMOTE_ADDR="203.0.113.9", headers={"Authorization": "Bearer t0ken"}
    )
    assert metrics.metrics_view(outside).status_code == 200
    assert b"cascadeflow_http_requests_total" in right.content
    settings.CASCADEFLOW_METRICS = False
    off = await client.get("/metrics", headers={"Authorization": "Bearer t0ken"})
    assert off.status_code == 404
