"""Liveness and readiness.

``/healthz`` answers as long as the process does (a load balancer that restarts
on it must not restart every worker because PostgreSQL is failing over).
``/readyz`` answers 503 while the database, or a configured Redis, cannot be
reached, so traffic is steered away until they are back. Both checks are
bounded by short connect timeouts.
"""

import redis
from django.conf import settings
from django.db import connection
from django.http import HttpRequest, JsonResponse


def healthz(request: HttpRequest) -> JsonResponse:
    return JsonResponse({"status": "ok"})


def readyz(request: HttpRequest) -> JsonResponse:
    checks = {"database": _database(), **({"redis": _redis()} if settings.REDIS_URL else {})}
    ready = all(state == "ok" for state in checks.values())
    response = JsonResponse({"status": "ok" if ready else "unavailable", "checks": checks})
    if not ready:
        response.status_code = 503
        response["Retry-After"] = str(settings.CASCADEFLOW_RETRY_AFTER_SECONDS)
    return response


def _database() -> str:
    try:
        with connection.cursor() as cursor:
            cursor.execute("SELECT 1")
        return "ok"
    except Exception as exc:
        connection.close_if_unusable_or_obsolete()
        return f"unreachable ({exc.__class__.__name__})"


def _redis() -> str:

    try:
        client = redis.Redis.from_url(
            settings.REDIS_URL, socket_connect_timeout=0.5, socket_timeout=0.5
        )
        try:
            client.ping()
        finally:
            client.close()
        return "ok"
    except redis.RedisError as exc:
        return f"unreachable ({exc.__class__.__name__})"
