"""A tenant's own budget decision, asked over HTTPS with signed requests and answers.

Request: ``POST`` the budget context as JSON with headers
``X-CascadeFlow-Timestamp: <unix seconds>`` and
``X-CascadeFlow-Signature: v1=<hex HMAC-SHA256(secret, "<timestamp>.<body>")>``.
Answer: ``{"decision": "allow" | "degrade" | "block", "message": "..."}``,
signed the same way over the answer's body. An answer that is late (past the
tenant's timeout), unsigned, forged, stale (more than five minutes apart) or
malformed is ignored and the tenant's configured fallback applies: the gateway
never waits longer than the timeout on a tenant's server.

A callback can make a decision stricter, never looser: budgets that are
exhausted block whatever it answers. Decisions are cached per end user and
CascadeFlow's own decision for the tenant's cache period.

One tenant's slow server never slows another tenant: the call is made on the
event loop (an async client, not the database thread pool), under one total
deadline (the tenant's ``timeout_ms``, capped by
``CASCADEFLOW_CALLBACK_MAX_TIMEOUT_MS``) that covers connecting, sending and a
server that drips its answer byte by byte; and at most
``CASCADEFLOW_CALLBACK_MAX_IN_FLIGHT`` calls per tenant are in flight in a
process — past that the fallback applies at once. Connections go to public
addresses only (``core.netguard``).
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
import logging
import time
import weakref
from collections import defaultdict
from dataclasses import dataclass

import httpx
from asgiref.sync import sync_to_async
from django.conf import settings
from django.core.cache import cache

from core.netguard import async_guarded_client
from tenants.enums import BudgetDecision

logger = logging.getLogger(__name__)

DECISIONS = (BudgetDecision.ALLOW, BudgetDecision.DEGRADE, BudgetDecision.BLOCK)
MAX_SKEW_S = 300
SIGNATURE_HEADER = "X-CascadeFlow-Signature"
TIMESTAMP_HEADER = "X-CascadeFlow-Timestamp"


def url_allowed(url: str) -> bool:
    """HTTPS only, unless plain HTTP is allowed (local development and tests)."""
    return url.startswith("https://") or (
        settings.CASCADEFLOW_ALLOW_HTTP_CALLBACKS and url.startswith("http://")
    )


def sign(secret: str, timestamp: str, body: bytes) -> str:
    digest = hmac.new(secret.encode(), timestamp.encode() + b"." + body, hashlib.sha256).hexdigest()
    return f"v1={digest}"


def verify(
    secret: str, timestamp: str | None, signature: str | None, body: bytes, now: float
) -> bool:
    if not timestamp or not signature:
        return False
    try:
        if abs(now - int(timestamp)) > MAX_SKEW_S:
            return False
    except ValueError:
        return False
    return hmac.compare_digest(sign(secret, timestamp, body), signature)


@dataclass(frozen=True)
class CallbackDecision:
    decision: str
    message: str
    source: str  # "callback" | "cache" | "fallback"
    detail: str = ""


@dataclass(frozen=True)
class CallbackQuestion:
    """One call to a tenant's callback, prepared (and its cache looked up) off the event loop."""

    tenant_id: int
    url: str
    secret: str
    timeout_ms: int
    fallback: str
    cache_seconds: int
    cache_key: str
    context: dict


# A cache outage costs a callback, never the request: after a cache error the cache
# is left alone for CACHE_PAUSE_S, so a silent Redis costs one timeout per pause.
CACHE_PAUSE_S = 5.0
_cache_paused_until = 0.0


def _cache_call(fn, *args):
    global _cache_paused_until
    if time.monotonic() < _cache_paused_until:
        return None
    try:
        return fn(*args)
    except Exception:
        _cache_paused_until = time.monotonic() + CACHE_PAUSE_S
        logger.warning("Budget callback cache unavailable", exc_info=True)
        return None


def cached_decision(cache_key: str) -> CallbackDecision | None:
    cached = _cache_call(cache.get, cache_key)
    if cached:
        return CallbackDecision(cached["decision"], cached["message"], "cache")
    return None


def _remember(question: CallbackQuestion, decision: CallbackDecision) -> None:
    value = {"decision": decision.decision, "message": decision.message}
    _cache_call(cache.set, question.cache_key, value, question.cache_seconds)


_in_flight: dict[int, int] = defaultdict(int)
_clients: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _client() -> httpx.AsyncClient:
    """One pooled client per event loop (connections are bound to their loop)."""
    loop = asyncio.get_running_loop()
    client = _clients.get(loop)
    if client is None:
        client = _clients[loop] = async_guarded_client()
    return client


def deadline_s(timeout_ms: int) -> float:
    return max(1, min(timeout_ms, settings.CASCADEFLOW_CALLBACK_MAX_TIMEOUT_MS)) / 1000


async def ask(question: CallbackQuestion) -> CallbackDecision:
    """The tenant's decision, or its fallback; returns within ``deadline_s`` whatever happens."""
    fallback = question.fallback
    if not url_allowed(question.url):
        return CallbackDecision(fallback, "", "fallback", "callback URL must be HTTPS")
    limit = settings.CASCADEFLOW_CALLBACK_MAX_IN_FLIGHT
    if _in_flight[question.tenant_id] >= limit:
        return CallbackDecision(
            fallback, "", "fallback", f"{limit} callbacks already in flight for this tenant"
        )
    _in_flight[question.tenant_id] += 1
    try:
        decision = await _call(question)
    finally:
        _in_flight[question.tenant_id] -= 1
        if not _in_flight[question.tenant_id]:
            del _in_flight[question.tenant_id]
    if decision.source == "callback" and question.cache_seconds:
        await sync_to_async(_remember, thread_sensitive=False)(question, decision)
    return decision


async def _call(question: CallbackQuestion) -> CallbackDecision:
    fallback, secret = question.fallback, question.secret
    body = json.dumps(question.context, separators=(",", ":"), sort_keys=True).encode()
    timestamp = str(int(time.time()))
    headers = {
        "Content-Type": "application/json",
        TIMESTAMP_HEADER: timestamp,
        SIGNATURE_HEADER: sign(secret, timestamp, body),
    }
    deadline = deadline_s(question.timeout_ms)
    try:
        async with asyncio.timeout(deadline):
            response = await _client().post(question.url, content=body, headers=headers)
    except TimeoutError:
        return CallbackDecision(
            fallback, "", "fallback", f"callback took longer than {deadline * 1000:.0f} ms"
        )
    except httpx.HTTPError as exc:
        return CallbackDecision(
            fallback, "", "fallback", f"callback unreachable: {exc.__class__.__name__}"
        )
    raw = response.content
    if response.status_code != 200:
        return CallbackDecision(
            fallback, "", "fallback", f"callback answered {response.status_code}"
        )
    if not verify(
        secret,
        response.headers.get(TIMESTAMP_HEADER),
        response.headers.get(SIGNATURE_HEADER),
        raw,
        time.time(),
    ):
        return CallbackDecision(fallback, "", "fallback", "callback answer signature invalid")
    try:
        answer = json.loads(raw)
        decision = answer["decision"]
        message = str(answer.get("message") or "")[:500]
    except (ValueError, KeyError, TypeError, RecursionError):
        return CallbackDecision(fallback, "", "fallback", "callback answer malformed")
    if decision not in DECISIONS:
        return CallbackDecision(
            fallback, "", "fallback", f"callback answered unknown decision {decision!r}"
        )
    return CallbackDecision(decision, message, "callback")
