"""Prometheus metrics: ``cascadeflow_*`` series, added up across every worker process.

``prometheus-client`` in multi-process mode: each process writes its samples
to memory-mapped files under ``PROMETHEUS_MULTIPROC_DIR`` (set by the
settings, ``var/prometheus`` by default; empty it when the server fleet
starts), and a scrape of ``/metrics`` on any worker reads them all. Money is
counted in integer nano-dollars, like the ledger.

``CASCADEFLOW_METRICS=false`` turns collection off (no middleware, every
recording function returns at once, ``/metrics`` is a 404).

``/metrics`` answers a bearer token equal to ``CASCADEFLOW_METRICS_TOKEN``;
with none configured it answers loopback clients only. Labels never carry a
tenant, a user or a prompt: their values are routes, statuses, catalog model
names, profile names and decisions.
"""

from __future__ import annotations

import hmac
import os
import time
from pathlib import Path
from typing import Any

import redis
from asgiref.sync import iscoroutinefunction, markcoroutinefunction
from django.conf import settings
from django.http import Http404, HttpRequest, HttpResponse
from prometheus_client import (
    CONTENT_TYPE_LATEST,
    REGISTRY,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
    multiprocess,
)
from prometheus_client.core import GaugeMetricFamily

SECONDS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)

HTTP_REQUESTS = Counter(
    "cascadeflow_http_requests_total", "HTTP requests answered", ["route", "status"]
)
HTTP_DURATION = Histogram(
    "cascadeflow_http_request_duration_seconds",
    "Time to answer (to the last byte for streams)",
    ["route"],
    buckets=SECONDS,
)
ERRORS = Counter("cascadeflow_errors_total", "Error answers by code", ["route", "code"])
COMPLETIONS = Counter(
    "cascadeflow_completions_total",
    "Completion requests recorded in the ledger",
    ["model", "profile", "status"],
)
FIRST_TOKEN = Histogram(
    "cascadeflow_time_to_first_token_seconds",
    "From the request to the first streamed chunk",
    ["model"],
    buckets=SECONDS,
)
UPSTREAM = Histogram(
    "cascadeflow_upstream_duration_seconds",
    "One upstream call",
    ["model", "status"],
    buckets=SECONDS,
)
TOKENS = Counter("cascadeflow_tokens_total", "Tokens billed by upstreams", ["model", "kind"])
COST = Counter("cascadeflow_cost_nanodollars_total", "What requests cost", ["model", "profile"])
SAVING = Counter(
    "cascadeflow_saving_nanodollars_total",
    "Baseline (the strongest model alone) minus cost",
    ["profile"],
)
ESCALATIONS = Counter("cascadeflow_escalations_total", "Drafts escalated", ["profile"])
BUDGET_DECISIONS = Counter(
    "cascadeflow_budget_decisions_total", "Admission decisions of budgets", ["decision"]
)
RATE_LIMITED = Counter(
    "cascadeflow_rate_limited_total", "Requests refused by a rate limit", ["scope"]
)
BREAKER_OPEN = Gauge(
    "cascadeflow_breaker_open",
    "1 while a deployment's circuit breaker is open",
    ["deployment"],
    multiprocess_mode="max",
)


class HttpMetricsMiddleware:
    """Every answer counted by route (the URL pattern's name) and status, and timed; a
    stream is timed to its last byte."""

    async_capable = True
    sync_capable = True

    def __init__(self, get_response):
        self.get_response = get_response
        self.is_async = iscoroutinefunction(get_response)
        if self.is_async:
            markcoroutinefunction(self)

    def __call__(self, request):
        if self.is_async:
            return self._acall(request)
        started = time.perf_counter()
        return self._observe(request, self.get_response(request), started)

    async def _acall(self, request):
        started = time.perf_counter()
        return self._observe(request, await self.get_response(request), started)

    @staticmethod
    def _observe(request, response, started: float):
        match = getattr(request, "resolver_match", None)
        route = (match.url_name or match.route) if match else "unmatched"
        HTTP_REQUESTS.labels(route, str(response.status_code)).inc()
        if not response.streaming:  # a stream is timed by whoever writes its last byte
            HTTP_DURATION.labels(route).observe(time.perf_counter() - started)
        return response


def on() -> bool:
    return settings.CASCADEFLOW_METRICS


def breaker_observed(deployment: str, is_open: bool) -> None:
    if on():
        BREAKER_OPEN.labels(deployment).set(1 if is_open else 0)


def error(route: str, code: str) -> None:
    if on():
        ERRORS.labels(route, code).inc()


def rate_limited(scope: str) -> None:
    if on():
        RATE_LIMITED.labels(scope).inc()


def first_token(model: str, seconds: float) -> None:
    if on():
        FIRST_TOKEN.labels(model).observe(seconds)


def stream_finished(route: str, seconds: float) -> None:
    """A stream's duration, to its last byte (the middleware saw only its headers)."""
    if on():
        HTTP_DURATION.labels(route).observe(seconds)


def ledger_recorded(entry: Any) -> None:
    """Everything a ledger entry says about one request."""
    if not on():
        return
    profile = entry.profile or "-"
    model = entry.model or "-"
    COMPLETIONS.labels(model, profile, entry.status).inc()
    if entry.budget_status:
        BUDGET_DECISIONS.labels(entry.budget_status).inc()
    for attempt in entry.attempts:
        UPSTREAM.labels(attempt.model, attempt.status).observe(attempt.latency_ms / 1000)
        if attempt.prompt_tokens:
            TOKENS.labels(attempt.model, "prompt").inc(attempt.prompt_tokens)
        if attempt.completion_tokens:
            TOKENS.labels(attempt.model, "completion").inc(attempt.completion_tokens)
    cost = entry.cost_nanos
    if cost:
        COST.labels(model, profile).inc(cost)
    if entry.baseline_cost_nanos and entry.status == "ok":
        saving = entry.baseline_cost_nanos - cost
        if saving > 0:
            SAVING.labels(profile).inc(saving)
    if entry.escalated:
        ESCALATIONS.labels(profile).inc()


class QueueDepth:
    """Celery's queue depth, read from the broker at scrape time."""

    def describe(self):
        return []

    def collect(self):
        family = GaugeMetricFamily(
            "cascadeflow_celery_queue_depth",
            "Messages waiting in the Celery queue",
            labels=["queue"],
        )
        depth = _queue_depth()
        if depth is not None:
            family.add_metric(["celery"], depth)
        yield family


def _queue_depth() -> int | None:
    url = settings.CELERY_BROKER_URL
    try:
        if url.startswith(("redis://", "rediss://")):
            client = redis.Redis.from_url(url, socket_connect_timeout=0.5, socket_timeout=0.5)
            try:
                return int(client.llen("celery"))
            finally:
                client.close()
        if url.startswith("filesystem://"):
            folder = Path(settings.CELERY_BROKER_TRANSPORT_OPTIONS["data_folder_in"])
            return sum(1 for _ in folder.glob("*.msg"))
    except Exception:
        return None
    return None


def exposition() -> bytes:
    registry = CollectorRegistry()
    if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        multiprocess.MultiProcessCollector(registry)
    else:  # one process: its own registry
        registry = REGISTRY
    scrape = CollectorRegistry()
    scrape.register(QueueDepth())
    return generate_latest(registry) + generate_latest(scrape)


def allowed(request: HttpRequest) -> bool:
    token = settings.CASCADEFLOW_METRICS_TOKEN
    if token:
        scheme, _, given = request.headers.get("Authorization", "").partition(" ")
        return scheme.lower() == "bearer" and hmac.compare_digest(given.strip(), token)
    # A request relayed by a proxy on this host arrives from loopback too: it is not a
    # loopback client (set a token to scrape through a proxy).
    if any(h in request.headers for h in ("X-Forwarded-For", "Forwarded", "X-Real-Ip")):
        return False
    return request.META.get("REMOTE_ADDR") in {"127.0.0.1", "::1"}


def metrics_view(request: HttpRequest) -> HttpResponse:
    if not on():
        raise Http404
    if not allowed(request):
        response = HttpResponse("Forbidden: a metrics token is required.\n", status=403)
        response["Content-Type"] = "text/plain"
        return response
    return HttpResponse(exposition(), content_type=CONTENT_TYPE_LATEST)
