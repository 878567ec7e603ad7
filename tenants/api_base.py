"""The management API's base: tenant from the bearer token only, scopes declared per view.

Tenancy fails closed: ``TenantAPIView`` resolves the tenant from the token
(never from the URL or the body), every object lookup goes through
``tenant_queryset`` (filtered by that tenant; subclasses declare the model,
they cannot widen the query), and another tenant's object is a 404,
identical to a missing one.

Bad input is the client's error, never ours: every error is JSON
``{"error": {"code", "message", "detail"?}}`` with a stable ``code``, never an
HTML page, a traceback or a database's constraint text. Bodies are parsed
strictly (``core.strictjson``) before the view runs, query strings
may not carry NUL, and a database that cannot be reached is a 503 with
``Retry-After``.
"""

from __future__ import annotations

import logging
from datetime import timedelta

from django.conf import settings
from django.db import DatabaseError, DataError, IntegrityError, InterfaceError, OperationalError
from django.http import Http404, HttpRequest, HttpResponse, JsonResponse
from django.http.response import HttpResponsePermanentRedirect
from django.urls import Resolver404, resolve
from django.utils import timezone
from django.views.decorators.csrf import csrf_exempt
from drf_spectacular.utils import inline_serializer
from rest_framework import exceptions, status
from rest_framework.authentication import BaseAuthentication
from rest_framework.parsers import FormParser, JSONParser, MultiPartParser, get_encoding
from rest_framework.permissions import BasePermission
from rest_framework.renderers import JSONRenderer
from rest_framework.response import Response
from rest_framework.views import APIView, exception_handler, set_rollback

from core import strictjson
from tenants.enums import Scope
from tenants.models import Tenant
from tenants.selectors import TokenContext, TokenInvalid, token_context_for_raw, token_used
from tenants.services import token_touch

logger = logging.getLogger(__name__)


class TokenPrincipal:
    """The caller: a tenant API token (not a Django user)."""

    is_authenticated = True

    def __init__(self, ctx: TokenContext):
        self.ctx = ctx


class TenantTokenAuthentication(BaseAuthentication):
    def authenticate(self, request):
        header = request.headers.get("Authorization", "")
        scheme, _, raw = header.partition(" ")
        if scheme.lower() != "bearer" or not raw.strip():
            return None
        now = timezone.now()
        try:
            ctx = token_context_for_raw(raw=raw.strip(), now=now)
        except TokenInvalid as exc:
            raise exceptions.AuthenticationFailed(exc.reason) from None
        touch_last_used(ctx, now)
        return TokenPrincipal(ctx), ctx

    def authenticate_header(self, request) -> str:
        return 'Bearer realm="cascadeflow"'


def touch_last_used(ctx: TokenContext, now) -> None:
    """Record the token's use (at most one write per staleness window), as the gateway
    does: a key used only on the management API is in use too."""
    stale_before = now - timedelta(seconds=settings.CASCADEFLOW_TOKEN_TOUCH_SECONDS)
    if ctx.last_used_at is not None and ctx.last_used_at >= stale_before:
        return
    try:
        token_touch(token_id=ctx.token_id, now=now, stale_before=stale_before)
        token_used(token_id=ctx.token_id, at=now)
    except DatabaseError:  # bookkeeping: never the reason a request fails
        logger.warning("Could not record the last use of token %s", ctx.token_id)


class HasScope(BasePermission):
    """Reads need ``read_scope``, writes ``write_scope`` (``admin`` implies both)."""

    message = "This API key lacks the scope this endpoint needs."

    def has_permission(self, request, view) -> bool:
        ctx: TokenContext | None = request.auth
        if ctx is None:
            return False
        scope = (
            view.read_scope if request.method in ("GET", "HEAD", "OPTIONS") else view.write_scope
        )
        return ctx.has_scope(scope)


# The largest value a BigIntegerField (and a BigAutoField id) holds.
BIGINT_MAX = 2**63 - 1


class ApiError(exceptions.APIException):
    """An API error with its own stable ``code`` (kept by the exception handler)."""

    def __init__(
        self,
        message: str,
        *,
        code: str,
        status_code: int = status.HTTP_400_BAD_REQUEST,
        headers: dict[str, str] | None = None,
    ):
        super().__init__(detail=message, code=code)
        self.status_code = status_code
        self.error_code = code
        self.headers = headers or {}


class StrictJSONParser(JSONParser):
    """JSON bodies, refused (400 ``invalid_json``) when nothing downstream could use them."""

    def parse(self, stream, media_type=None, parser_context=None):
        encoding = get_encoding(parser_context or {})
        try:
            text = stream.read().decode(encoding)
        except UnicodeDecodeError:
            raise exceptions.ParseError(f"The body is not valid {encoding}.") from None
        try:
            return strictjson.loads(text)
        except strictjson.InvalidJSON as exc:
            raise exceptions.ParseError(exc.message) from None


class TenantAPIView(APIView):
    authentication_classes = [TenantTokenAuthentication]
    permission_classes = [HasScope]
    parser_classes = [StrictJSONParser, FormParser, MultiPartParser]
    read_scope: str = Scope.USAGE_READ
    write_scope: str = Scope.ADMIN
    model = None  # the tenant-owned model this view reads

    def initial(self, request, *args, **kwargs):
        """After authentication (401 beats 400): refuse unusable query strings and bodies."""
        super().initial(request, *args, **kwargs)
        for name, values in request.query_params.lists():
            if strictjson.text_problem(name) or any(strictjson.text_problem(v) for v in values):
                raise exceptions.ValidationError({name: ["Null characters are not allowed."]})
        if request.method in ("POST", "PUT", "PATCH"):
            request.data  # noqa: B018 - parsed now, so a body no one can read is a 400 everywhere

    @property
    def tenant(self) -> Tenant:
        return Tenant(pk=self.request.auth.tenant_id, slug=self.request.auth.tenant_slug)

    def tenant_queryset(self):
        """The only way to read rows: this tenant's. Not meant to be overridden."""
        return self.model._default_manager.filter(tenant_id=self.request.auth.tenant_id)

    def tenant_object(self, pk):
        try:
            return self.tenant_queryset().get(pk=pk)
        except (self.model.DoesNotExist, ValueError, TypeError):
            raise Http404 from None


def envelope(name: str, serializer, **extra):
    """The schema of ``{"data": [...]}`` list responses (and any extra top-level fields)."""

    return inline_serializer(name=name, fields={**extra, "data": serializer(many=True)})


_CODES = {
    status.HTTP_400_BAD_REQUEST: "invalid_request",
    status.HTTP_401_UNAUTHORIZED: "invalid_api_key",
    status.HTTP_403_FORBIDDEN: "insufficient_scope",
    status.HTTP_404_NOT_FOUND: "not_found",
    status.HTTP_405_METHOD_NOT_ALLOWED: "method_not_allowed",
    status.HTTP_415_UNSUPPORTED_MEDIA_TYPE: "unsupported_media_type",
    status.HTTP_429_TOO_MANY_REQUESTS: "rate_limit_exceeded",
}


def _is_unique_violation(exc: IntegrityError) -> bool:
    cause = exc.__cause__
    sqlstate = getattr(cause, "sqlstate", None) or getattr(cause, "pgcode", None)
    return sqlstate == "23505" or "unique constraint" in str(exc).lower()


def _database_error(exc: Exception) -> ApiError | None:
    """A database error as the client's (400/409) or a passing outage (503); texts not echoed."""
    if isinstance(exc, OperationalError | InterfaceError):
        logger.warning("Database unavailable: %s", exc.__class__.__name__)
        return ApiError(
            "The service is briefly unavailable; retry shortly.",
            code="service_unavailable",
            status_code=status.HTTP_503_SERVICE_UNAVAILABLE,
            headers={"Retry-After": str(settings.CASCADEFLOW_RETRY_AFTER_SECONDS)},
        )
    if isinstance(exc, IntegrityError):
        if _is_unique_violation(exc):
            return ApiError(
                "This conflicts with an existing object.",
                code="conflict",
                status_code=status.HTTP_409_CONFLICT,
            )
        return ApiError("These values break a rule of this object.", code="constraint_violation")
    if isinstance(exc, DataError):
        return ApiError("A value is out of range or of the wrong type.", code="invalid_value")
    return None


def api_exception_handler(exc, context):
    """Every error as ``{"error": {"code", "message", "detail"?}}`` with a stable code.

    Errors DRF does not know (a bug) are logged and answered as a JSON 500 with
    no detail: the management API never answers with an HTML page or a traceback.
    """
    exc = _database_error(exc) or exc
    request = context.get("request")
    if request is not None:  # errors are JSON whatever the endpoint renders (YAML, CSV, HTML)
        request.accepted_renderer = JSONRenderer()
        request.accepted_media_type = JSONRenderer.media_type
    response = exception_handler(exc, context)
    if response is None:
        request_id = getattr(request, "request_id", "") if request is not None else ""
        logger.error("Unhandled error in API request %s", request_id, exc_info=exc)
        set_rollback()
        message = "CascadeFlow failed to handle this request."
        if request_id:
            message = f"CascadeFlow failed to handle request {request_id}."
        body = {"error": {"code": "internal_error", "message": message}}
        return Response(body, status=status.HTTP_500_INTERNAL_SERVER_ERROR)
    if isinstance(exc, ApiError):
        code = exc.error_code
        for name, value in exc.headers.items():
            response[name] = value
    elif isinstance(exc, exceptions.ParseError):
        code = "invalid_json"
    else:
        code = _CODES.get(response.status_code, "error")
    detail = response.data
    message = (
        detail.get("detail")
        if isinstance(detail, dict) and "detail" in detail
        else "Invalid request."
    )
    body = {"error": {"code": code, "message": str(message)}}
    if response.status_code == status.HTTP_400_BAD_REQUEST and detail != {"detail": message}:
        body["error"]["detail"] = detail
    return Response(body, status=response.status_code, headers=dict(response.items()))


@csrf_exempt
def not_found(request: HttpRequest, unknown: str = "") -> HttpResponse:
    """Unknown paths under /api/v1/: a JSON 404 like every other API error.

    As Django's ``APPEND_SLASH`` would, a GET of a known path without its
    slash is redirected to it.
    """
    if request.method in ("GET", "HEAD") and not request.path.endswith("/"):
        try:
            match = resolve(request.path + "/")
        except Resolver404:
            match = None
        if match is not None and match.func is not not_found:
            return HttpResponsePermanentRedirect(request.get_full_path(force_append_slash=True))
    return JsonResponse(
        {
            "error": {
                "code": "not_found",
                "message": f"Unknown endpoint: {request.method} {request.path}",
            }
        },
        status=status.HTTP_404_NOT_FOUND,
    )


try:
    from drf_spectacular.extensions import OpenApiAuthenticationExtension

    class TenantTokenScheme(OpenApiAuthenticationExtension):
        target_class = "tenants.api_base.TenantTokenAuthentication"
        name = "TenantToken"

        def get_security_definition(self, auto_schema):
            return {"type": "http", "scheme": "bearer", "description": "A tenant API token (cf_…)."}

except ImportError:  # pragma: no cover - the schema generator is optional at runtime
    pass
