"""The management API's base: tenant from the bearer token only, scopes declared per view.

Tenancy fails closed: ``TenantAPIView`` resolves the tenant from the token
(never from the URL or the body), every object lookup goes through
``tenant_queryset`` (filtered by that tenant; subclasses declare the model,
they cannot widen the query), and another tenant's object is a 404,
identical to a missing one. Errors are JSON with a stable ``code``.
"""

from __future__ import annotations

from django.http import Http404
from django.utils import timezone
from rest_framework import exceptions, status
from rest_framework.authentication import BaseAuthentication
from rest_framework.permissions import BasePermission
from rest_framework.response import Response
from rest_framework.views import APIView, exception_handler

from tenants.enums import Scope
from tenants.models import Tenant
from tenants.selectors import TokenContext, TokenInvalid, token_context_for_raw


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
        try:
            ctx = token_context_for_raw(raw=raw.strip(), now=timezone.now())
        except TokenInvalid as exc:
            raise exceptions.AuthenticationFailed(exc.reason) from None
        return TokenPrincipal(ctx), ctx

    def authenticate_header(self, request) -> str:
        return 'Bearer realm="cascadeflow"'


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


class TenantAPIView(APIView):
    authentication_classes = [TenantTokenAuthentication]
    permission_classes = [HasScope]
    read_scope: str = Scope.USAGE_READ
    write_scope: str = Scope.ADMIN
    model = None  # the tenant-owned model this view reads

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
    from drf_spectacular.utils import inline_serializer

    return inline_serializer(name=name, fields={**extra, "data": serializer(many=True)})


def api_exception_handler(exc, context):
    """Every error as ``{"error": {"code", "message", "detail"?}}`` with a stable code."""
    response = exception_handler(exc, context)
    if response is None:
        return None
    codes = {
        status.HTTP_400_BAD_REQUEST: "invalid_request",
        status.HTTP_401_UNAUTHORIZED: "invalid_api_key",
        status.HTTP_403_FORBIDDEN: "insufficient_scope",
        status.HTTP_404_NOT_FOUND: "not_found",
        status.HTTP_405_METHOD_NOT_ALLOWED: "method_not_allowed",
        status.HTTP_429_TOO_MANY_REQUESTS: "rate_limit_exceeded",
    }
    detail = response.data
    message = (
        detail.get("detail")
        if isinstance(detail, dict) and "detail" in detail
        else "Invalid request."
    )
    body = {"error": {"code": codes.get(response.status_code, "error"), "message": str(message)}}
    if response.status_code == status.HTTP_400_BAD_REQUEST:
        body["error"]["detail"] = detail
    return Response(body, status=response.status_code, headers=dict(response.items()))


try:
    from drf_spectacular.extensions import OpenApiAuthenticationExtension

    class TenantTokenScheme(OpenApiAuthenticationExtension):
        target_class = "tenants.api_base.TenantTokenAuthentication"
        name = "TenantToken"

        def get_security_definition(self, auto_schema):
            return {"type": "http", "scheme": "bearer", "description": "A tenant API token (cf_…)."}

except ImportError:  # pragma: no cover - the schema generator is optional at runtime
    pass
