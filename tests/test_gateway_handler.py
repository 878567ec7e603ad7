"""The gateway's ASGI handler: Django's, minus the request signals' thread hops.

``cascadeflow_site.handlers.GatewayASGIHandler.handle`` follows Django 5.2's
``ASGIHandler.handle``; these tests pin the Django code it follows, show why
skipping the signals is safe for ``/v1/`` (every view there is async, every
middleware async-capable: nothing runs on the thread the signals' receivers
clean up), and check the handler's behaviour on the paths Django's covers:
an answer, a request refused before the view, a client that goes away.
"""

from __future__ import annotations

import asyncio
import hashlib
import inspect
import json
import threading

import pytest
from asgiref.sync import iscoroutinefunction
from django.conf import settings
from django.core import signals
from django.core.handlers.asgi import ASGIHandler
from django.http import HttpResponse, HttpResponseBase, StreamingHttpResponse
from django.urls import URLPattern, URLResolver, get_resolver
from django.utils.module_loading import import_string

from cascadeflow_site.handlers import GatewayASGIHandler, close_response

# sha256 of the Django source the gateway handler copies (Django 5.2). A Django
# upgrade that changes either fails here: compare, and carry the change over.
DJANGO_HANDLE_SHA256 = "98faeb5bef800331e6a8002fbc96b30e4122a23438ae45a047190a531ea11323"
DJANGO_CLOSE_SHA256 = "84589f5b23acbb23aa9010f3506ef411b72b1053f2fc2764590e2b3bf3470438"


def _sha(fn) -> str:
    return hashlib.sha256(inspect.getsource(fn).encode()).hexdigest()


def test_the_django_code_it_follows_is_the_code_it_was_written_against():
    assert _sha(ASGIHandler.handle) == DJANGO_HANDLE_SHA256
    assert _sha(HttpResponseBase.close) == DJANGO_CLOSE_SHA256


def _views(patterns, prefix=""):
    for pattern in patterns:
        if isinstance(pattern, URLResolver):
            yield from _views(pattern.url_patterns, prefix + str(pattern.pattern))
        elif isinstance(pattern, URLPattern):
            yield prefix + str(pattern.pattern), pattern.callback


def test_every_gateway_view_and_middleware_runs_on_the_event_loop():
    views = [
        (route, view)
        for route, view in _views(get_resolver().url_patterns)
        if route.startswith("v1/")
    ]
    assert len(views) >= 5
    sync = [route for route, view in views if not iscoroutinefunction(view)]
    assert sync == [], f"sync views under /v1/ would need the request signals: {sync}"
    for path in settings.CASCADEFLOW_GATEWAY_MIDDLEWARE:
        assert getattr(import_string(path), "async_capable", False), path


class Client:
    """One ASGI request against an application, by hand: what the server sends back."""

    def __init__(self, app, path: str, body: bytes = b"", method: str = "GET") -> None:
        self.app, self.sent = app, []
        self.scope = {
            "type": "http",
            "asgi": {"version": "3.0"},
            "http_version": "1.1",
            "method": method,
            "scheme": "http",
            "path": path,
            "raw_path": path.encode(),
            "query_string": b"",
            "root_path": "",
            "headers": [(b"host", b"testserver"), (b"content-type", b"application/json")],
            "client": ("127.0.0.1", 5000),
            "server": ("testserver", 80),
        }
        self.incoming: asyncio.Queue = asyncio.Queue()
        self.incoming.put_nowait({"type": "http.request", "body": body, "more_body": False})

    async def receive(self):
        return await self.incoming.get()

    async def send(self, message) -> None:
        self.sent.append(message)

    async def run(self, timeout: float = 10) -> None:
        await asyncio.wait_for(self.app(self.scope, self.receive, self.send), timeout)

    @property
    def status(self) -> int:
        return next(m["status"] for m in self.sent if m["type"] == "http.response.start")

    @property
    def body(self) -> bytes:
        return b"".join(m.get("body", b"") for m in self.sent if m["type"] == "http.response.body")


@pytest.fixture
def signals_seen():
    seen: list[tuple[str, str]] = []

    def started(sender, **kwargs):
        seen.append(("started", threading.current_thread().name))

    def finished(sender, **kwargs):
        seen.append(("finished", threading.current_thread().name))

    signals.request_started.connect(started)
    signals.request_finished.connect(finished)
    yield seen
    signals.request_started.disconnect(started)
    signals.request_finished.disconnect(finished)


async def test_a_gateway_request_is_answered_without_the_request_signals(signals_seen):
    # No token: the view answers 401 in the API's error shape, no database involved.
    client = Client(GatewayASGIHandler(), "/v1/models")
    await client.run()
    assert client.status == 401
    assert b'"error"' in client.body
    assert signals_seen == []


async def test_djangos_handler_still_sends_them_for_the_rest_of_the_site(signals_seen):
    client = Client(ASGIHandler(), "/healthz")
    await client.run()
    assert [name for name, _ in signals_seen] == ["started", "finished"]


async def test_a_request_refused_before_the_view_is_answered_and_closed(signals_seen):
    # A query string that is not UTF-8: Django's create_request refuses it (400).
    client = Client(GatewayASGIHandler(), "/v1/chat/completions", b"{}", "POST")
    client.scope["query_string"] = b"q=\xff"
    await client.run()
    assert client.status == 400
    assert signals_seen == []


async def test_a_client_that_goes_away_cancels_the_view(monkeypatch):
    entered, cancelled = asyncio.Event(), asyncio.Event()

    async def slow(request):
        entered.set()
        try:
            await asyncio.sleep(30)
        except asyncio.CancelledError:
            cancelled.set()
            raise
        return HttpResponse("late")

    handler = GatewayASGIHandler()
    monkeypatch.setattr(handler, "get_response_async", slow)
    client = Client(handler, "/v1/models")
    running = asyncio.create_task(client.run())
    await asyncio.wait_for(entered.wait(), 5)
    client.incoming.put_nowait({"type": "http.disconnect"})
    await asyncio.wait_for(running, 5)  # returns, does not raise
    assert cancelled.is_set()
    assert not any(m["type"] == "http.response.start" for m in client.sent)


async def test_a_streamed_answer_is_sent_whole_and_its_resources_closed(monkeypatch):
    closed: list[bool] = []

    async def parts():
        for word in (b"data: a\n\n", b"data: b\n\n"):
            yield word

    async def stream(request):
        response = StreamingHttpResponse(parts(), content_type="text/event-stream")
        response._resource_closers.append(lambda: closed.append(True))
        return response

    handler = GatewayASGIHandler()
    monkeypatch.setattr(handler, "get_response_async", stream)
    client = Client(handler, "/v1/chat/completions", b"{}", "POST")
    await client.run()
    assert client.status == 200
    assert client.body == b"data: a\n\ndata: b\n\n"
    assert closed == [True]


def test_close_response_runs_every_closer_even_after_one_fails(signals_seen):
    response = HttpResponse("x")
    calls: list[str] = []

    def broken():
        calls.append("broken")
        raise OSError("gone")

    response._resource_closers.extend([broken, lambda: calls.append("ok")])
    close_response(response)
    assert calls == ["broken", "ok"]
    assert response.closed
    assert response._resource_closers == []
    assert signals_seen == []


# The whole ASGI application, as a server hands it requests: the body-size guard in
# front of both handlers answers a malformed or oversized Content-Length itself.
CONTENT_LENGTHS = [
    (b"abc", 400, "invalid_request"),
    (b"-1", 400, "invalid_request"),
    (b"1e3", 400, "invalid_request"),
    (b" 2", 400, "invalid_request"),
    (b"", 400, "invalid_request"),
    (b"\xd9\xa3", 400, "invalid_request"),  # an Arabic-Indic digit: not ASCII
    (b"99999999999999999999999", 413, "request_too_large"),
    (b"2", 401, "invalid_api_key"),  # well formed: the view answers (no token)
]


@pytest.mark.parametrize(("length", "status", "code"), CONTENT_LENGTHS)
@pytest.mark.parametrize("path", ["/v1/chat/completions", "/api/v1/budgets/"])
async def test_a_malformed_content_length_is_a_4xx_in_the_error_shape(path, length, status, code):
    from cascadeflow_site.asgi import application

    client = Client(application, path, b"{}", "POST")
    client.scope["headers"].append((b"content-length", length))
    await client.run()
    assert client.status == status
    error = json.loads(client.body)["error"]
    if status != 401:  # the two APIs name a missing credential each in its own words
        assert error["code"] == code
