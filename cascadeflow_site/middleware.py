"""Request id on every response, database outages as 503s, an ASGI guard for oversized bodies."""

import json
import logging
import uuid

from asgiref.sync import iscoroutinefunction, markcoroutinefunction
from django.conf import settings
from django.db import InterfaceError, OperationalError
from django.http import HttpResponse, JsonResponse
from django.middleware.security import SecurityMiddleware

logger = logging.getLogger(__name__)

REQUEST_ID_HEADER = "x-request-id"


def new_request_id() -> str:
    return f"req_{uuid.uuid4().hex}"


class RequestIdMiddleware:
    """Gives each request an id (``request.request_id``) and returns it.

    The id is always generated here: it keys the ledger, so a client-chosen
    value could collide. A client's own id is echoed as ``x-client-request-id``.
    """

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
        request.request_id = new_request_id()
        return self._stamp(request, self.get_response(request))

    async def _acall(self, request):
        request.request_id = new_request_id()
        return self._stamp(request, await self.get_response(request))

    @staticmethod
    def _stamp(request, response):
        response[REQUEST_ID_HEADER] = request.request_id
        client_id = request.headers.get(REQUEST_ID_HEADER)
        if client_id and len(client_id) <= 128 and client_id.isprintable():
            response["x-client-request-id"] = client_id
        return response


class GatewaySecurityMiddleware(SecurityMiddleware):
    """Django's ``SecurityMiddleware`` (HTTPS redirect, HSTS, nosniff, referrer and opener
    policies), run on the event loop on the gateway's stack.

    Django runs an old-style middleware's ``process_request`` and ``process_response`` in
    asgiref's thread for sync code, one hop there and back each, because they might touch
    the ORM. These only read the request and set headers: run inline, they do exactly the
    same at no thread switch (two fewer per request, both before a stream's first token).
    """

    async def __acall__(self, request):
        response = self.process_request(request)
        response = response or await self.get_response(request)
        return self.process_response(request, response)


class DatabaseUnavailableMiddleware:
    """A view that cannot reach the database answers 503 with ``Retry-After``, never a 500 page.

    In each caller's own language: OpenAI's error shape on ``/v1/``, the
    management API's on ``/api/``, a short page elsewhere. (The gateway's
    chat path and the management API's views turn the outage into the same
    answers themselves; this catches every other view.)
    """

    async_capable = True
    sync_capable = True

    def __init__(self, get_response):
        self.get_response = get_response
        if iscoroutinefunction(get_response):
            markcoroutinefunction(self)

    def __call__(self, request):
        return self.get_response(request)

    def process_exception(self, request, exception):
        if not isinstance(exception, OperationalError | InterfaceError):
            return None
        logger.warning("Database unreachable serving %s", request.path)
        message = "CascadeFlow cannot reach its database right now; retry shortly."
        if request.path.startswith("/v1/"):
            error = {"message": message, "type": "api_error", "param": None}
            response = JsonResponse({"error": {**error, "code": "service_unavailable"}}, status=503)
        elif request.path.startswith("/api/"):
            response = JsonResponse(
                {"error": {"code": "service_unavailable", "message": message}}, status=503
            )
        else:
            response = HttpResponse(
                f"<!doctype html><title>Unavailable</title><h1>Back shortly</h1><p>{message}</p>",
                status=503,
            )
        response["Retry-After"] = str(settings.CASCADEFLOW_RETRY_AFTER_SECONDS)
        return response


class BodySizeLimitMiddleware:
    """ASGI middleware: refuse request bodies over the limit before Django buffers them.

    Django's ASGI handler reads the whole body before a view runs, so the
    limit is enforced here on ``Content-Length`` and, for chunked uploads, on
    the bytes actually received. The answer is OpenAI's error shape (413).
    """

    def __init__(self, app, max_bytes: int | None = None):
        self.app = app
        self.max_bytes = max_bytes

    @property
    def limit(self) -> int:
        return self.max_bytes or settings.CASCADEFLOW_MAX_REQUEST_BYTES

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        limit = self.limit
        for name, value in scope.get("headers", []):
            if name == b"content-length":
                if not value.isdigit():  # a server in front would have refused it; say so
                    return await self._send_error(
                        send, 400, "Content-Length is not a number of bytes.", "invalid_request"
                    )
                if int(value) > limit:
                    return await self._reject(receive, send, limit)
        received = 0
        too_large = False

        async def limited_receive():
            nonlocal received, too_large
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > limit:
                    too_large = True
                    raise _BodyTooLarge
            return message

        try:
            return await self.app(scope, limited_receive, send)
        except _BodyTooLarge:
            return await self._send_413(send, limit)

    async def _reject(self, receive, send, limit):
        return await self._send_413(send, limit)

    @classmethod
    async def _send_413(cls, send, limit):
        await cls._send_error(
            send,
            413,
            f"Request body is larger than the limit of {limit} bytes.",
            "request_too_large",
        )

    @staticmethod
    async def _send_error(send, status: int, message: str, code: str):
        body = json.dumps(
            {
                "error": {
                    "message": message,
                    "type": "invalid_request_error",
                    "param": None,
                    "code": code,
                }
            }
        ).encode()
        await send(
            {
                "type": "http.response.start",
                "status": status,
                "headers": [
                    (b"content-type", b"application/json"),
                    (b"content-length", str(len(body)).encode()),
                    (REQUEST_ID_HEADER.encode(), new_request_id().encode()),
                    (b"connection", b"close"),
                ],
            }
        )
        await send({"type": "http.response.body", "body": body})


class _BodyTooLarge(Exception):
    pass
