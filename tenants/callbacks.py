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
"""

from __future__ import annotations

import hashlib
import hmac
import json
import time
from dataclasses import dataclass

import httpx
from django.core.cache import cache

from cascadeflow_site.crypto import decrypt

DECISIONS = ("allow", "degrade", "block")
MAX_SKEW_S = 300
SIGNATURE_HEADER = "X-CascadeFlow-Signature"
TIMESTAMP_HEADER = "X-CascadeFlow-Timestamp"


def url_allowed(url: str) -> bool:
    """HTTPS only, unless plain HTTP is allowed (local development and tests)."""
    from django.conf import settings

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


def ask(
    *,
    url: str,
    encrypted_secret: str,
    timeout_ms: int,
    fallback: str,
    cache_seconds: int,
    cache_key: str,
    context: dict,
) -> CallbackDecision:
    if not url_allowed(url):
        return CallbackDecision(fallback, "", "fallback", "callback URL must be HTTPS")
    cached = cache.get(cache_key)
    if cached:
        return CallbackDecision(cached["decision"], cached["message"], "cache")
    secret = decrypt(encrypted_secret)
    body = json.dumps(context, separators=(",", ":"), sort_keys=True).encode()
    timestamp = str(int(time.time()))
    headers = {
        "Content-Type": "application/json",
        TIMESTAMP_HEADER: timestamp,
        SIGNATURE_HEADER: sign(secret, timestamp, body),
    }
    try:
        response = httpx.post(url, content=body, headers=headers, timeout=timeout_ms / 1000)
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
    except (ValueError, KeyError, TypeError):
        return CallbackDecision(fallback, "", "fallback", "callback answer malformed")
    if decision not in DECISIONS:
        return CallbackDecision(
            fallback, "", "fallback", f"callback answered unknown decision {decision!r}"
        )
    if cache_seconds:
        cache.set(cache_key, {"decision": decision, "message": message}, cache_seconds)
    return CallbackDecision(decision, message, "callback")
