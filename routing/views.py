"""The OpenAI-compatible API: HTTP in, ``routing.gateway`` calls, HTTP out."""

import logging
from collections.abc import Callable
from typing import TypeVar

from django.conf import settings
from django.core.exceptions import RequestDataTooBig
from django.http import HttpRequest, HttpResponse, JsonResponse, StreamingHttpResponse
from django.views.decorators.csrf import csrf_exempt

from routing import embeddings, gateway, metrics, responses, telemetry
from routing.errors import GatewayError, too_large
from routing.schemas import parse_chat_request

logger = logging.getLogger(__name__)
T = TypeVar("T")


def _with_headers(response: HttpResponse, headers: dict[str, str]) -> HttpResponse:
    for name, value in headers.items():
        response[name] = value
    return response


def _error(exc: GatewayError, route: str = "") -> HttpResponse:
    if route:
        metrics.error(route, exc.code or str(exc.status))
    response = exc.response()
    for name, value in gateway.EMPTY_CASCADE_HEADERS.items():
        if name not in response:
            response[name] = value
    return response


def _method_not_allowed(allowed: str) -> HttpResponse:
    error = GatewayError(405, f"Use {allowed} for this endpoint.", code="method_not_allowed")
    response = _error(error)
    response["Allow"] = allowed
    return response


AUDIT_HEADER = "X-CascadeFlow-Audit"


def audit_opted_out(request: HttpRequest) -> bool:
    """``X-CascadeFlow-Audit: off``: this request is never audited (routing.audits)."""
    return request.headers.get(AUDIT_HEADER, "").strip().lower() == "off"


def _parse(
    parse: Callable[[bytes], T], request: HttpRequest
) -> tuple[T | None, GatewayError | None]:
    """The body parsed, or the error it gets once the token is checked (401 beats 400)."""
    try:
        return parse(request.body), None
    except RequestDataTooBig:
        return None, too_large(settings.CASCADEFLOW_MAX_REQUEST_BYTES)
    except GatewayError as exc:
        return None, exc


async def _prepare(request: HttpRequest, parsed, parse_error, span) -> gateway.GatewayRequest:
    return await gateway.prepare(
        request_id=request.request_id,
        authorization=request.headers.get("Authorization"),
        request=parsed,
        parse_error=parse_error,
        audit_opt_out=audit_opted_out(request),
        span=span,
    )


def _event_stream(events, headers: dict[str, str]) -> HttpResponse:
    response = StreamingHttpResponse(events, content_type="text/event-stream")
    response["Cache-Control"] = "no-cache"
    response["X-Accel-Buffering"] = "no"
    return _with_headers(response, headers)


def _failed(exc: Exception, request: HttpRequest, span, route: str) -> HttpResponse:
    """The answer to a request that ended in an error: its span ended, the error counted."""
    if not isinstance(exc, GatewayError):
        logger.exception("Unhandled error in %s %s", route, request.request_id, exc_info=exc)
        exc = gateway.internal_error(request.request_id)
    span.finish({"http.response.status_code": exc.status}, error=exc.code or "error")
    return _error(exc, route)


@csrf_exempt
async def chat_completions(request: HttpRequest) -> HttpResponse:
    if request.method != "POST":
        return _method_not_allowed("POST")
    span = telemetry.request_span(
        "chat", request.headers, {"cascadeflow.request_id": request.request_id}
    )
    try:
        with span.activate():
            chat, parse_error = _parse(parse_chat_request, request)
            gw = await _prepare(request, chat, parse_error, span)
            if gw.chat.stream:
                outcome = await gateway.stream(gw)
                return _event_stream(outcome.events, outcome.headers)
            result = await gateway.complete(gw)
            return _with_headers(JsonResponse(result.body), result.headers)
    except Exception as exc:
        return _failed(exc, request, span, "chat-completions")


@csrf_exempt
async def create_response(request: HttpRequest) -> HttpResponse:
    """``POST /v1/responses``: the Responses API on the chat path (``routing.responses``)."""
    if request.method != "POST":
        return _method_not_allowed("POST")
    span = telemetry.request_span(
        "responses", request.headers, {"cascadeflow.request_id": request.request_id}
    )
    try:
        with span.activate():
            parsed, parse_error = _parse(responses.parse_responses_request, request)
            gw = await _prepare(request, parsed.chat if parsed else None, parse_error, span)
            assert parsed is not None
            gw.route = "responses"
            if gw.chat.stream:
                outcome = await gateway.stream(gw)
                events = responses.stream_events(
                    parsed,
                    outcome.events,
                    request_id=request.request_id,
                    model=outcome.headers.get("x-cascade-model", gw.chat.model),
                    tokens=lambda: responses.ledger_tokens(gw.ledger),
                )
                return _event_stream(events, outcome.headers)
            result = await gateway.complete(gw)
            body = responses.response_from_completion(
                parsed,
                result.body,
                request_id=request.request_id,
                tokens=responses.ledger_tokens(gw.ledger),
            )
            return _with_headers(JsonResponse(body), result.headers)
    except Exception as exc:
        return _failed(exc, request, span, "responses")


@csrf_exempt
async def create_embeddings(request: HttpRequest) -> HttpResponse:
    """``POST /v1/embeddings``: one embedding model, on the chat path's gateway steps
    (``routing.embeddings``)."""
    if request.method != "POST":
        return _method_not_allowed("POST")
    span = telemetry.request_span(
        "embeddings", request.headers, {"cascadeflow.request_id": request.request_id}
    )
    try:
        with span.activate():
            parsed, parse_error = _parse(embeddings.parse_embedding_request, request)
            gw = await _prepare(request, parsed, parse_error, span)
            gw.route = "embeddings"
            outcome = await gateway.embed(gw)
            response = HttpResponse(outcome.content, content_type="application/json")
            return _with_headers(response, outcome.headers)
    except Exception as exc:
        return _failed(exc, request, span, "embeddings")


@csrf_exempt
async def models(request: HttpRequest) -> HttpResponse:
    if request.method != "GET":
        return _method_not_allowed("GET")
    try:
        ctx = await gateway.authenticate(request.headers.get("Authorization"))
    except GatewayError as exc:
        return _error(exc, "models")
    return _with_headers(
        JsonResponse(await gateway.list_models(ctx)), gateway.EMPTY_CASCADE_HEADERS
    )


@csrf_exempt
async def model(request: HttpRequest, model_id: str) -> HttpResponse:
    """``GET /v1/models/{id}``: ids hold slashes (``cascade/balanced``), sent raw or as %2F."""
    if request.method != "GET":
        return _method_not_allowed("GET")
    try:
        ctx = await gateway.authenticate(request.headers.get("Authorization"))
        found = await gateway.retrieve_model(ctx, model_id)
    except GatewayError as exc:
        return _error(exc, "models")
    return _with_headers(JsonResponse(found), gateway.EMPTY_CASCADE_HEADERS)


@csrf_exempt
async def not_found(request: HttpRequest, path: str = "") -> HttpResponse:
    return _error(
        GatewayError(404, f"Unknown endpoint: {request.method} {request.path}", code="unknown_url")
    )
