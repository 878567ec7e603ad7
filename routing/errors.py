"""Errors of the OpenAI-compatible API, in OpenAI's shape.

``{"error": {"message", "type", "param", "code"}}`` with the status codes
clients (and the official SDKs' retry logic) expect.
"""

from __future__ import annotations

import json

from django.http import HttpResponse


class GatewayError(Exception):
    def __init__(
        self,
        status: int,
        message: str,
        *,
        type: str = "invalid_request_error",
        code: str | None = None,
        param: str | None = None,
        headers: dict[str, str] | None = None,
    ):
        super().__init__(message)
        self.status = status
        self.message = message
        self.type = type
        self.code = code
        self.param = param
        self.headers = headers or {}

    def payload(self) -> dict:
        return {
            "error": {
                "message": self.message,
                "type": self.type,
                "param": self.param,
                "code": self.code,
            }
        }

    def response(self) -> HttpResponse:
        response = HttpResponse(
            json.dumps(self.payload()), status=self.status, content_type="application/json"
        )
        for name, value in self.headers.items():
            response[name] = value
        return response


def bad_request(
    message: str, *, param: str | None = None, code: str = "invalid_request"
) -> GatewayError:
    return GatewayError(400, message, param=param, code=code)


def unauthorized(message: str) -> GatewayError:
    return GatewayError(401, message, type="authentication_error", code="invalid_api_key")


def forbidden(message: str, *, code: str) -> GatewayError:
    return GatewayError(403, message, type="permission_error", code=code)


def too_large(limit: int) -> GatewayError:
    return GatewayError(
        413, f"Request body is larger than the limit of {limit} bytes.", code="request_too_large"
    )
