"""Dependencies unreachable: 503s with Retry-After in each API's shape, bounded in time.

A server process is pointed at a database address that refuses connections,
and at one that accepts the TCP connection and then never answers (a host
gone silent, the worst case: only the connect timeout ends the wait).
/healthz stays a liveness check; /readyz reports the outage. With Redis
unreachable, requests are still served (rate limits fail open per process).
"""

import json
import socket
import time

import httpx
import pytest

from tests.support.fake_upstream import fake_models_config
from tests.support.live_server import LiveServer, free_port, postgres_available
from tests.support.services import skip_or_fail

pytestmark = [pytest.mark.services, pytest.mark.slow]

CONNECT_TIMEOUT_S = 2
CHAT = {"model": "demo/small", "messages": [{"role": "user", "content": "What is 2 + 2?"}]}


@pytest.fixture(scope="module")
def outage_servers(fake_upstream):
    if not postgres_available():
        skip_or_fail("PostgreSQL is not reachable for the database outage test")
    server = LiveServer(backend="postgresql", models=fake_models_config(fake_upstream.api_base))
    server.start()
    silent = socket.socket()
    silent.bind(("127.0.0.1", 0))
    silent.listen(128)  # accepts into the backlog, never answers
    refused_url = f"postgres://postgres@127.0.0.1:{free_port()}/cascadeflow"
    silent_url = f"postgres://postgres@127.0.0.1:{silent.getsockname()[1]}/cascadeflow"
    env = {"DJANGO_DB_CONNECT_TIMEOUT": str(CONNECT_TIMEOUT_S), "REDIS_URL": ""}
    bases = dict(
        zip(
            ["refused", "silent", "redis-down"],
            server.other_processes(
                {**env, "DATABASE_URL": refused_url},
                {**env, "DATABASE_URL": silent_url},
                {"REDIS_URL": f"redis://127.0.0.1:{free_port()}/0"},
            ),
            strict=True,
        )
    )
    # Rate limits on the token, so requests go through the (unreachable) Redis limiter.
    server.execute(
        "UPDATE tenants_apitoken SET requests_per_minute = 1000, tokens_per_minute = %s", (10**6,)
    )
    yield server, bases
    server.stop()
    silent.close()


def openai_shape(body: dict) -> str:
    assert set(body) == {"error"} and set(body["error"]) == {"message", "type", "param", "code"}
    return body["error"]["code"]


def api_shape(body: dict) -> str:
    assert set(body) == {"error"} and {"code", "message"} <= set(body["error"])
    return body["error"]["code"]


CASES = [
    ("POST", "/v1/chat/completions", 503, openai_shape),
    ("GET", "/v1/models", 503, openai_shape),
    ("GET", "/api/v1/usage/", 503, api_shape),
    ("GET", "/api/v1/budgets/", 503, api_shape),
    ("GET", "/readyz", 503, None),
    ("GET", "/healthz", 200, None),
]


@pytest.mark.parametrize("outage", ["refused", "silent"])
@pytest.mark.parametrize(("method", "path", "status", "shape"), CASES)
def test_database_unreachable_is_a_bounded_503_in_each_apis_shape(
    outage_servers, outage, method, path, status, shape
):
    server, bases = outage_servers
    started = time.perf_counter()
    response = httpx.request(
        method,
        bases[outage] + path,
        headers={"Authorization": f"Bearer {server.token}"},
        json=CHAT if method == "POST" else None,
        timeout=30,
    )
    elapsed = time.perf_counter() - started

    assert response.status_code == status, response.text
    assert elapsed < CONNECT_TIMEOUT_S * 2 + 1.5, elapsed  # a connect (and its retry) at most
    assert "Traceback" not in response.text and "/work/" not in response.text
    if status == 503:
        assert response.headers["content-type"].startswith("application/json")
        assert int(response.headers["retry-after"]) > 0
        if shape is not None:
            assert shape(response.json()) == "service_unavailable"
    if path == "/readyz":
        assert response.json()["checks"]["database"].startswith("unreachable")


def test_redis_unreachable_serves_requests_and_readyz_says_why(outage_servers):
    server, bases = outage_servers
    headers = {"Authorization": f"Bearer {server.token}"}
    for _ in range(3):
        answer = httpx.post(
            bases["redis-down"] + "/v1/chat/completions", json=CHAT, headers=headers, timeout=30
        )
        assert answer.status_code == 200, answer.text
    ready = httpx.get(bases["redis-down"] + "/readyz", timeout=10)
    assert ready.status_code == 503
    assert ready.json()["checks"]["redis"].startswith("unreachable")
    assert ready.json()["checks"]["database"] == "ok"
    assert "Redis unreachable" in server.log()


def test_readyz_is_ok_when_everything_answers(outage_servers):
    server, _ = outage_servers
    response = httpx.get(server.base_url + "/readyz", timeout=10)
    assert response.status_code == 200
    assert response.json()["checks"]["database"] == "ok"
    assert json.loads(response.text)["status"] == "ok"
