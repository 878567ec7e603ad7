"""Tenant isolation, swept over every API route the URL resolver knows.

A new endpoint is covered the day it is added: every route under /api/v1/
is found from the resolver, tenant B gets an object of the route's model, and
tenant A's all-scope token must get 404 on B's object (any method the view
has) and never see it in a list. A route whose model has no maker below fails
this test until one is added.
"""

import re
from datetime import UTC, datetime

import pytest
from django.urls import URLPattern, URLResolver, get_resolver
from rest_framework.test import APIClient

from billing.models import ExportJob
from routing.models import (
    Audit,
    CalibrationVersion,
    RoutingProfile,
    TenantProviderModel,
    UsageEvent,
)
from tenants.api_base import not_found
from tenants.enums import BudgetPeriod, BudgetScope
from tenants.models import ApiToken, Budget, BudgetAlert, EndUser, Tenant
from tenants.services import token_create
from tests.factories import UsageEventFactory

pytestmark = pytest.mark.django_db


def _budget(tenant):
    return Budget.objects.create(
        tenant=tenant, scope=BudgetScope.TENANT, period=BudgetPeriod.MONTH, limit_nanos=1
    )


def _export_job(tenant):
    from billing.models import ExportJob

    return ExportJob.objects.create(
        tenant=tenant,
        start=datetime(2026, 11, 1, tzinfo=UTC),
        end=datetime(2026, 11, 2, tzinfo=UTC),
    )


def _audit(tenant):
    return Audit.objects.create(
        tenant=tenant,
        request_id=f"req_theirs_audit_{tenant.pk}",
        profile="cascade/balanced",
        chain=["demo/small", "demo/large"],
        chain_key="theirs",
        reference_model="demo/large",
    )


def _their_settings(t):
    """Their settings, distinctive: a tenant's own settings view must never show them."""
    Tenant.objects.filter(pk=t.pk).update(audit_monthly_cap_nanos=987_654_321, trace_content=True)
    return t


def _their_provider_model(t):
    return TenantProviderModel.objects.create(
        tenant=t,
        name="theirs/own-model",
        litellm_model="openai/gpt-4o-mini",
        credentials_encrypted="x",
        credentials_mask={"api_key": "…zzzz"},
        input_usd_per_mtok=1,
        output_usd_per_mtok=2,
        validated_at=datetime(2026, 11, 20, tzinfo=UTC),
    )


MAKERS = {
    Tenant: _their_settings,
    TenantProviderModel: _their_provider_model,
    ApiToken: lambda t: token_create(tenant=t, name="theirs").token,
    Budget: _budget,
    EndUser: lambda t: EndUser.objects.create(tenant=t, external_id="their-user"),
    RoutingProfile: lambda t: RoutingProfile.objects.create(
        tenant=t, name="theirs", chain=["demo/small"]
    ),
    UsageEvent: lambda t: UsageEventFactory(
        tenant=t,
        request_id=f"req_theirs_{t.pk}",
        created_at=datetime(2026, 11, 20, tzinfo=UTC),
    ),
    ExportJob: _export_job,
    BudgetAlert: lambda t: BudgetAlert.objects.create(
        tenant=t,
        budget=_budget(t),
        period_start=datetime(2026, 11, 1, tzinfo=UTC),
        level="warn",
        spent_nanos=1,
        limit_nanos=1,
    ),
    # A version of a preset every tenant has: its number means nothing to another tenant.
    CalibrationVersion: lambda t: CalibrationVersion.objects.create(
        tenant=t, profile="cascade/balanced", version=1, chain=["demo/small"], certified=True
    ),
    Audit: _audit,
}


def api_routes():
    routes = []

    def walk(patterns, prefix):
        for p in patterns:
            if isinstance(p, URLResolver):
                walk(p.url_patterns, prefix + str(p.pattern))
            elif isinstance(p, URLPattern):
                routes.append((prefix + str(p.pattern), p.callback))

    walk(get_resolver().url_patterns, "/")
    return [(route, cb) for route, cb in routes if route.startswith("/api/v1/")]


def test_every_api_route_is_known_to_this_sweep():
    for route, callback in api_routes():
        view = getattr(callback, "view_class", None) or getattr(callback, "cls", None)
        model = getattr(view, "model", None)
        if route.endswith(("schema/", "docs/")) or callback is not_found:
            continue
        assert model in MAKERS, f"{route}: add a maker for {model} to the isolation sweep"


def test_another_tenants_objects_are_404_and_never_listed(tenant, other_tenant):
    mine = APIClient()
    mine.credentials(HTTP_AUTHORIZATION=f"Bearer {token_create(tenant=tenant, name='admin').raw}")
    theirs = {model: make(other_tenant) for model, make in MAKERS.items()}
    checked = 0
    for route, callback in api_routes():
        view = getattr(callback, "view_class", None)
        model = getattr(view, "model", None)
        if model is None:
            continue
        obj = theirs[model]
        if "<profile:name>" in route:
            checked += _profile_routes_are_isolated(mine, route, view, theirs)
        elif "<int:pk>" in route:
            url = route.replace("<int:pk>", str(obj.pk))
            for method in ("get", "patch", "delete", "post"):
                if not hasattr(view, method):
                    continue
                response = getattr(mine, method)(url, {}, format="json")
                assert response.status_code == 404, (
                    f"{method.upper()} {url} -> {response.status_code}"
                )
                checked += 1
        elif hasattr(view, "get"):
            url = route + ("?start=2026-11-01&end=2026-11-30" if route.endswith(".csv") else "")
            response = mine.get(url)
            assert response.status_code == 200, f"GET {url} -> {response.status_code}"
            body = b"".join(response.streaming_content) if response.streaming else response.content
            marker = (
                getattr(obj, "request_id", None)
                or getattr(obj, "external_id", None)
                or getattr(obj, "name", None)
            )
            if marker:
                assert str(marker).encode() not in body, (
                    f"GET {url} shows another tenant's {model.__name__}"
                )
            if not response.streaming:
                data = response.json()
                rows = data.get("data") or data.get("results") or []
                assert obj.pk not in {r.get("id") for r in rows}, (
                    f"GET {url} lists another tenant's object"
                )
            checked += 1
    assert checked >= 12
    # ... and B's objects are all still there, untouched.
    for model, obj in theirs.items():
        assert model.objects.filter(pk=obj.pk).exists()
    assert ApiToken.objects.get(pk=theirs[ApiToken].pk).revoked_at is None


def _profile_routes_are_isolated(mine, route, view, theirs) -> int:
    """Routes of a profile by name: another tenant's profile (``theirs``) is a 404, and a
    preset both tenants have (``balanced``) shows only the caller's own rows."""
    checked = 0
    version = str(theirs[CalibrationVersion].version)
    for name in ("theirs", "cascade/theirs", "balanced"):
        url = route.replace("<profile:name>", name).replace("<int:version>", version)
        for method in ("get", "patch", "delete", "post"):
            if not hasattr(view, method):
                continue
            response = getattr(mine, method)(url, {}, format="json")
            if name.endswith("theirs") or method != "get":
                assert response.status_code == 404, (
                    f"{method.upper()} {url} -> {response.status_code}"
                )
            else:
                assert response.status_code == 200, f"GET {url} -> {response.status_code}"
                body = response.json()
                assert theirs[Audit].request_id.encode() not in response.content
                assert theirs[CalibrationVersion].pk not in {
                    r.get("id") for r in body.get("results") or []
                }, f"GET {url} lists another tenant's version"
            checked += 1
    return checked


# Routes outside /api/v1/ and how the sweep treats them. A new route fails
# ``test_every_route_is_classified`` until it is added here, so dashboard pages
# join the sweep the day they are written.
SESSION_TENANT_ROUTES = {
    "/billing/<slug:tenant_slug>/checkout/<slug:tier_slug>/": "post",
    "/billing/<slug:tenant_slug>/portal/": "post",
    "/dashboard/t/<slug:tenant_slug>/": "get",
    "/dashboard/t/<slug:tenant_slug>/overview.json": "get",
    "/dashboard/t/<slug:tenant_slug>/models/": "get",
    "/dashboard/t/<slug:tenant_slug>/profiles/<slug:name>/": "get",
    "/dashboard/t/<slug:tenant_slug>/profiles/<slug:name>/calibrations/<int:version>/rollback/": "post",
    "/dashboard/t/<slug:tenant_slug>/end-users/": "get",
    "/dashboard/t/<slug:tenant_slug>/end-users/<int:end_user_id>/tier/": "post",
    "/dashboard/t/<slug:tenant_slug>/tokens/": "get",
    "/dashboard/t/<slug:tenant_slug>/tokens/<int:token_id>/revoke/": "post",
    "/dashboard/t/<slug:tenant_slug>/provider-keys/": "get",
    "/dashboard/t/<slug:tenant_slug>/provider-keys/<int:model_id>/rotate/": "get",
    "/dashboard/t/<slug:tenant_slug>/provider-keys/<int:model_id>/delete/": "post",
    "/dashboard/t/<slug:tenant_slug>/budgets/": "get",
    "/dashboard/t/<slug:tenant_slug>/budgets/<int:budget_id>/": "get",
    "/dashboard/t/<slug:tenant_slug>/budgets/<int:budget_id>/delete/": "post",
    "/dashboard/t/<slug:tenant_slug>/billing/": "get",
    "/dashboard/t/<slug:tenant_slug>/exports/": "get",
    "/dashboard/t/<slug:tenant_slug>/exports/usage.csv": "get",
    "/dashboard/t/<slug:tenant_slug>/exports/jobs/<int:job_id>/": "get",
    "/dashboard/t/<slug:tenant_slug>/members/": "get",
    "/dashboard/t/<slug:tenant_slug>/members/<int:member_id>/role/": "post",
    "/dashboard/t/<slug:tenant_slug>/members/<int:member_id>/remove/": "post",
}
# The OpenAI-compatible gateway, route by route and matched exactly, so a new /v1/ route
# (a stored object's URL, say) fails ``test_every_route_is_classified`` until it is added.
GATEWAY_ROUTES = {
    "/v1/chat/completions": "token-scoped; writes only the token's tenant's ledger row",
    "/v1/models": "what the token may call (tests/routing/test_gateway.py)",
    # Another tenant's profile is the same 404 as an unknown id.
    "/v1/models/<path:model_id>": "one of /v1/models (tests/routing/test_openai_surface.py)",
    # Stores nothing: previous_response_id is a 400 and GET /v1/responses/<id> the catch-all's
    # 404, the same for every tenant (tests/routing/test_responses.py::test_tenants_are_isolated).
    "/v1/responses": "token-scoped; writes only the token's tenant's ledger row",
    # Stores nothing; another tenant's own embedding model is the same 404 as an unknown one
    # (tests/routing/test_embeddings.py::test_a_tenants_own_embedding_model_is_validated…).
    "/v1/embeddings": "token-scoped; writes only the token's tenant's ledger row",
    "/v1/^(?P<path>.*)$": "the catch-all: an OpenAI-shaped 404",
}
NOT_TENANT_OBJECTS = (
    "/admin/",  # operators only (staff)
    "/accounts/",  # login, logout, password reset
    "/healthz",  # liveness
    "/readyz",  # readiness: reports dependencies, no tenant data
    "/metrics",  # Prometheus: aggregate series, a bearer token or loopback only
    "/billing/stripe/webhook/",  # Stripe's signature, not a tenant's
    "/static/",
    "/favicon.ico",  # a redirect to the static icon
)


def all_routes():
    routes = []

    def walk(patterns, prefix):
        for p in patterns:
            if isinstance(p, URLResolver):
                walk(p.url_patterns, prefix + str(p.pattern))
            elif isinstance(p, URLPattern):
                routes.append(prefix + str(p.pattern))

    walk(get_resolver().url_patterns, "/")
    return routes


def test_every_route_is_classified():
    for route in all_routes():
        if route.startswith("/api/v1/") or route in SESSION_TENANT_ROUTES:
            continue
        if route in GATEWAY_ROUTES:
            continue
        if route == "/dashboard/":  # redirects to one of the member's own tenants
            continue
        assert route.startswith(NOT_TENANT_OBJECTS), f"{route}: add it to the isolation sweep"


def test_session_routes_of_another_tenant_are_404(client, tenant, other_tenant):
    from tenants.enums import MemberRole
    from tests.factories import MemberFactory, UserFactory

    user = UserFactory()
    MemberFactory(tenant=tenant, user=user, role=MemberRole.OWNER)
    client.force_login(user)
    for route, method in SESSION_TENANT_ROUTES.items():
        url = re.sub(
            r"<int:\w+>",
            "1",
            route.replace("<slug:tenant_slug>", other_tenant.slug)
            .replace("<slug:tier_slug>", "free")
            .replace("<slug:name>", "balanced"),
        )
        assert getattr(client, method)(url).status_code == 404, url
