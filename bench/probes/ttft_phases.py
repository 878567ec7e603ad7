"""CascadeFlow's ASGI application, with the phases of each chat request timed (``bench/ttft.py
--phases``): where the time before a stream's first token goes.

Stamps (``time.perf_counter``), per ``POST /v1/chat/completions``:

- ``in``: the request reaches the application (uvicorn has parsed it);
- ``view``: ``routing.gateway.prepare`` starts (Django's handler has read the body, sent
  ``request_started``, run the middleware; the view has parsed the body);
- ``admitted``: ``prepare`` returns (token, target, end user, rate limits and budgets, on
  the database pool);
- ``opened``: ``routing.gateway.stream`` returns (the engine's plan, the upstream called,
  its first chunk in hand);
- ``headers``: the response's status line and headers are handed to the server;
- ``first``: the first body chunk (the first token) is handed to the server.

Every 100 requests the medians of the last 2,000 are written as JSON to the file named by
``CF_TTFT_PHASES_OUT``. Each request's stamps live in a context variable: Django's tasks
for the request inherit it, and a request still closing does not mix with the next one.
"""

import contextvars
import itertools
import json
import os
import statistics
import time

from cascadeflow_site import asgi
from routing import gateway

STAMPS = ("in", "view", "admitted", "opened", "headers", "first")
_now = time.perf_counter
_current: contextvars.ContextVar[dict[str, float]] = contextvars.ContextVar("stamps")
_done: list[dict[str, float]] = []
_prepare, _stream = gateway.prepare, gateway.stream


async def _timed_prepare(**kwargs):
    stamps = _current.get({})
    stamps["view"] = _now()
    try:
        return await _prepare(**kwargs)
    finally:
        stamps["admitted"] = _now()


async def _timed_stream(gw):
    try:
        return await _stream(gw)
    finally:
        _current.get({})["opened"] = _now()


gateway.prepare, gateway.stream = _timed_prepare, _timed_stream


def _write() -> None:
    rows = [r for r in _done[-2000:] if all(k in r for k in STAMPS)]
    if not rows:
        return
    phases = {
        f"{a}->{b}": statistics.median((r[b] - r[a]) * 1000 for r in rows)
        for a, b in itertools.pairwise(STAMPS)
    }
    phases["in->first"] = statistics.median((r["first"] - r["in"]) * 1000 for r in rows)
    phases["requests"] = len(rows)
    with open(os.environ["CF_TTFT_PHASES_OUT"], "w") as out:
        json.dump(phases, out)


async def application(scope, receive, send):
    if scope["type"] != "http" or scope["path"] != "/v1/chat/completions":
        return await asgi.application(scope, receive, send)
    stamps = {"in": _now()}
    _current.set(stamps)

    async def timed_send(message):
        if message["type"] == "http.response.start":
            stamps["headers"] = _now()
        elif message.get("body") and "first" not in stamps:
            stamps["first"] = _now()
        await send(message)

    await asgi.application(scope, receive, timed_send)
    _done.append(stamps)
    if len(_done) % 100 == 0:
        _write()
