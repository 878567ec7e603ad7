"""The gateway's security middleware answers exactly as Django's, without a thread hop."""

import threading

import pytest
from django.http import HttpResponse
from django.middleware.security import SecurityMiddleware
from django.test import RequestFactory, override_settings

from cascadeflow_site.middleware import GatewaySecurityMiddleware

SECURE = {
    "SECURE_SSL_REDIRECT": True,
    "SECURE_HSTS_SECONDS": 31536000,
    "SECURE_HSTS_INCLUDE_SUBDOMAINS": True,
    "SECURE_HSTS_PRELOAD": True,
    "SECURE_CONTENT_TYPE_NOSNIFF": True,
    "SECURE_REFERRER_POLICY": "same-origin",
    "SECURE_CROSS_ORIGIN_OPENER_POLICY": "same-origin",
    "SECURE_REDIRECT_EXEMPT": [r"^healthz$"],
    "ALLOWED_HOSTS": ["gateway.example"],
}


def answer(request):
    response = HttpResponse("{}", content_type="application/json")
    response["x-request-id"] = "req_1"
    return response


def request(path: str, secure: bool):
    factory = RequestFactory()
    return factory.post(
        path,
        data=b"{}",
        content_type="application/json",
        secure=secure,
        HTTP_HOST="gateway.example",
    )


@pytest.mark.parametrize("path", ["/v1/chat/completions?x=1", "/healthz"])
@pytest.mark.parametrize("secure", [True, False])
@pytest.mark.parametrize("config", [SECURE, {"SECURE_SSL_REDIRECT": False}])
async def test_same_answer_as_djangos_security_middleware(path, secure, config):
    async def view(req):
        return answer(req)

    with override_settings(**config):
        expected = SecurityMiddleware(answer)(request(path, secure))
        got = await GatewaySecurityMiddleware(view)(request(path, secure))
    assert got.status_code == expected.status_code
    assert dict(got.items()) == dict(expected.items())
    assert got.content == expected.content


async def test_runs_on_the_event_loop():
    seen: list[str] = []

    def on(name):
        def record(self, *args):
            seen.append(threading.current_thread().name)
            return getattr(SecurityMiddleware, name)(self, *args)

        return record

    class Watched(GatewaySecurityMiddleware):
        process_request = on("process_request")
        process_response = on("process_response")

    async def view(req):
        return answer(req)

    with override_settings(SECURE_SSL_REDIRECT=False):
        await Watched(view)(request("/v1/models", secure=True))
    assert seen == [threading.current_thread().name] * 2
