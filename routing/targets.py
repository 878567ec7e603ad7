"""What a request's ``model`` names: one model, a built-in preset, or a tenant's profile.

``cascade/<preset>`` (``cost_optimized``, ``balanced``, ``quality_first``,
``fast``) runs the default chain (``CASCADEFLOW_DEFAULT_CHAIN``) with that
preset; ``cascade/<name>`` runs the tenant's ``RoutingProfile`` of that name
(which wins over a built-in of the same name); anything else is a model of
the catalog, called alone (a one-model chain: no judging, same resilience
and accounting).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from django.conf import settings

from routing.catalog import model_catalog, models_allowed
from routing.engine.agent import Route
from routing.engine.policy import PRESETS, Calibration
from routing.engine.types import ModelSpec
from routing.errors import GatewayError, forbidden
from routing.models import RoutingProfile
from tenants.selectors import TokenContext

PROFILE_PREFIX = "cascade/"


@dataclass(frozen=True)
class Target:
    name: str
    chain: tuple[ModelSpec, ...]
    preset: str = "balanced"
    calibration: Calibration = field(default_factory=Calibration)
    threshold_offset: float = 0.0
    domain_routes: dict[str, Route] = field(default_factory=dict)
    profile: str = ""  # "" when a single model was requested


def _allowed(ctx: TokenContext) -> dict[str, ModelSpec]:
    return {
        m.name: m
        for m in models_allowed(
            tenant_allowed=ctx.tenant_allowed_models, tier_allowed=ctx.tier_allowed_models
        )
    }


def _chain(names: list[str], allowed: dict[str, ModelSpec], profile: str) -> tuple[ModelSpec, ...]:
    catalog = model_catalog()
    unknown = [n for n in names if catalog.get(n) is None]
    if unknown:
        raise GatewayError(
            500,
            f"Profile '{profile}' names unknown models: {', '.join(unknown)}.",
            type="api_error",
            code="profile_misconfigured",
        )
    chain = tuple(allowed[n] for n in names if n in allowed)
    if not chain:
        raise forbidden(
            f"Your plan allows none of the models of '{profile}'.", code="model_not_allowed"
        )
    return chain


def resolve_target(ctx: TokenContext, name: str) -> Target:
    allowed = _allowed(ctx)
    if name.startswith(PROFILE_PREFIX):
        short = name.removeprefix(PROFILE_PREFIX)
        if short_profile := RoutingProfile.objects.filter(
            tenant_id=ctx.tenant_id, name=short
        ).first():
            routes = {
                domain: Route(
                    chain=_chain(list(route.get("chain") or []), allowed, name),
                    threshold_offset=float(route.get("threshold_offset", 0.0)),
                )
                for domain, route in (short_profile.domain_routes or {}).items()
                if route.get("chain")
            }
            return Target(
                name=name,
                chain=_chain(list(short_profile.chain), allowed, name),
                preset=short_profile.preset,
                calibration=Calibration.from_json(short_profile.calibration),
                threshold_offset=short_profile.threshold_offset,
                domain_routes=routes,
                profile=name,
            )
        if short in PRESETS:
            return Target(
                name=name,
                chain=_chain(list(settings.CASCADEFLOW_DEFAULT_CHAIN), allowed, name),
                preset=short,
                profile=name,
            )
    model = model_catalog().get(name)
    if model is None:
        raise GatewayError(
            404,
            f"The model '{name}' does not exist. GET /v1/models lists the models you can use.",
            param="model",
            code="model_not_found",
        )
    if name not in allowed:
        raise forbidden(f"Your plan does not allow the model '{name}'.", code="model_not_allowed")
    return Target(name=name, chain=(model,))


def target_names(ctx: TokenContext) -> list[tuple[str, str]]:
    """(id, owner) of everything ``ctx`` may request: profiles first, then models."""
    names: list[tuple[str, str]] = []
    tenant_profiles = list(
        RoutingProfile.objects.filter(tenant_id=ctx.tenant_id)
        .order_by("name")
        .values_list("name", flat=True)
    )
    for preset in PRESETS:
        if preset not in tenant_profiles:
            names.append((f"{PROFILE_PREFIX}{preset}", "cascadeflow"))
    names.extend((f"{PROFILE_PREFIX}{p}", "tenant") for p in tenant_profiles)
    names.extend((m.name, m.owned_by) for m in _allowed(ctx).values())
    return names
