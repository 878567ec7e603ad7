"""What a request's ``model`` names: one model, a built-in preset, or a tenant's profile.

``cascade/<preset>`` (``cost_optimized``, ``balanced``, ``quality_first``,
``fast``) runs the default chain (``CASCADEFLOW_DEFAULT_CHAIN``) with that
preset; ``cascade/<name>`` runs the tenant's ``RoutingProfile`` of that name
(which wins over a built-in of the same name); anything else is a model of
the catalog, called alone (a one-model chain: no judging, same resilience
and accounting).

A stored profile is checked against ``routing.profiles``' rule each time it is
resolved: one that breaks it (written before the rule, or naming a model the
catalog has lost) is a 400 ``profile_misconfigured``, never a server error.
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
from routing.profiles import profile_problems
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
    if unknown:  # the operator's default chain (tenant profiles are checked before)
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


def _misconfigured(profile: str, problem: str) -> GatewayError:
    """A stored profile that cannot run: the tenant's to fix (a 400), not a server error."""
    return GatewayError(
        400,
        f"The routing profile '{profile}' cannot be used: {problem}. "
        "Fix it with PATCH /api/v1/profiles/<id>/.",
        param="model",
        code="profile_misconfigured",
    )


def _profile_target(profile: RoutingProfile, allowed: dict[str, ModelSpec], name: str) -> Target:
    problems = profile_problems(
        chain=profile.chain,
        preset=profile.preset,
        threshold_offset=profile.threshold_offset,
        domain_routes=profile.domain_routes or {},
    )
    if problems:
        field, messages = next(iter(problems.items()))
        raise _misconfigured(name, f"{field}: {messages[0]}")
    routes = {
        domain: Route(
            chain=_chain(route["chain"], allowed, name),
            threshold_offset=float(route.get("threshold_offset") or 0.0),
        )
        for domain, route in (profile.domain_routes or {}).items()
    }
    return Target(
        name=name,
        chain=_chain(list(profile.chain), allowed, name),
        preset=profile.preset,
        calibration=Calibration.from_json(profile.calibration),
        threshold_offset=profile.threshold_offset,
        domain_routes=routes,
        profile=name,
    )


def resolve_target(ctx: TokenContext, name: str) -> Target:
    allowed = _allowed(ctx)
    if name.startswith(PROFILE_PREFIX):
        short = name.removeprefix(PROFILE_PREFIX)
        if short_profile := RoutingProfile.objects.filter(
            tenant_id=ctx.tenant_id, name=short
        ).first():
            return _profile_target(short_profile, allowed, name)
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
