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

A cascade learns from audits (``routing.audits``) when both the tenant and the
profile (presets: always) have audits on: it runs the profile's active learned
calibration (``CalibrationVersion``) for its current chain, and until one is
certified the cold start (``learning.cold_start_calibration``: no draft is
served, so quality is the reference's). Labels and versions are those of the
profile's current chain: a profile whose chain changed starts over. Otherwise
it runs as it always did: the profile's uploaded calibration, or the preset's
defaults. Domain routes to other chains keep the uploaded calibration: they are
not learned (their requests are not audited).

The profile's row and its learning state are read by one query; the learned
calibration of a version is parsed once per process (versions never change).
"""

from __future__ import annotations

import dataclasses
import hashlib
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Any

from django.conf import settings
from django.db import connection

from core.db import as_datetime, as_json, fetch_one
from routing.engine import learning
from routing.engine.agent import Route
from routing.engine.policy import PRESETS, Calibration
from routing.engine.types import CHAT, ModelSpec
from routing.errors import GatewayError, forbidden
from routing.models import CalibrationVersion, ProfileLearning, RoutingProfile
from routing.platform_models import model_catalog, models_allowed
from routing.profiles import AUDIT_DEFAULTS, NO_JUDGE, profile_problems
from routing.tenant_models import is_tenant_model, tenant_specs
from tenants.selectors import TokenContext

PROFILE_PREFIX = "cascade/"


@dataclass(frozen=True)
class Learning:
    """A cascade that learns from audits: what sampling its requests needs, read with it."""

    profile: str  # cascade/<name>: the key of its learning state
    chain: tuple[str, ...]  # the model names its calibration is for
    reference_model: str
    judge_model: str  # "" : no judge
    floor: float
    uniform_labels: int = 0
    nonuniform_labels: int = 0
    router_rows: int = 0
    version_id: int | None = None  # the learned calibration serving it (None: cold start)
    settled: bool = False  # its refit found one more label no longer pays: audit at the floor


def chain_key(chain: tuple[str, ...] | list[str]) -> str:
    """A short, stable key of a chain (audits and versions are filtered by it)."""
    return hashlib.sha256("\x1f".join(chain).encode()).hexdigest()[:16]


@dataclass(frozen=True)
class Target:
    name: str
    chain: tuple[ModelSpec, ...]
    preset: str = "balanced"
    calibration: Calibration = field(default_factory=Calibration)
    threshold_offset: float = 0.0
    domain_routes: dict[str, Route] = field(default_factory=dict)
    profile: str = ""  # "" when a single model was requested
    learning: Learning | None = None  # set when this cascade learns from audits

    @property
    def is_cascade(self) -> bool:
        """More than one model may answer: a chain to judge, or domain routes to other chains.

        A single-model profile is not one: it answers exactly as that model named directly.
        """
        return len(self.chain) > 1 or bool(self.domain_routes)


def allowed_specs(ctx: TokenContext) -> dict[str, ModelSpec]:
    allowed = allowed_models(
        tenant_allowed=ctx.tenant_allowed_models, tier_allowed=ctx.tier_allowed_models
    )
    # The tenant's own models: its allow-list and its end users' tier may restrict them too.
    for name, spec in tenant_specs(ctx.tenant_id, ctx.models_version).items():
        if (not ctx.tenant_allowed_models or name in ctx.tenant_allowed_models) and (
            not ctx.tier_allowed_models or name in ctx.tier_allowed_models
        ):
            allowed[name] = spec
    return allowed


def allowed_models(
    *, tenant_allowed: tuple[str, ...], tier_allowed: tuple[str, ...]
) -> dict[str, ModelSpec]:
    return {
        m.name: m for m in models_allowed(tenant_allowed=tenant_allowed, tier_allowed=tier_allowed)
    }


def _chain(names: list[str], allowed: dict[str, ModelSpec], profile: str) -> tuple[ModelSpec, ...]:
    catalog = model_catalog()
    unknown = [n for n in names if catalog.get(n) is None and not _own(allowed.get(n))]
    if unknown:  # the operator's default chain (tenant profiles are checked before)
        raise GatewayError(
            500,
            f"Profile '{profile}' names unknown models: {', '.join(unknown)}.",
            type="api_error",
            code="profile_misconfigured",
        )
    embedders = [n for n in names if getattr(catalog.get(n), "mode", CHAT) != CHAT]
    if embedders:  # the operator's default chain, again (tenant profiles are checked before)
        raise GatewayError(
            500,
            f"Profile '{profile}' names embedding models: {', '.join(embedders)}.",
            type="api_error",
            code="profile_misconfigured",
        )
    chain = tuple(allowed[n] for n in names if n in allowed)
    if not chain:
        raise forbidden(
            f"Your plan allows none of the models of '{profile}'.", code="model_not_allowed"
        )
    return chain


def _own(spec: ModelSpec | None) -> bool:
    return spec is not None and is_tenant_model(spec)


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
        known={n for n, spec in allowed.items() if is_tenant_model(spec)},
        embedding={n for n, spec in allowed.items() if is_tenant_model(spec) and spec.mode != CHAT},
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


# --- one query: the tenant's profile of that name (if any) and its learning state -------

_PROFILE_COLUMNS = (
    "id",
    "preset",
    "chain",
    "threshold_offset",
    "domain_routes",
    "calibration",
    "audits_enabled",
    "audit_rate_floor",
    "judge_model",
    "reference_model",
)
_LEARNING_COLUMNS = (
    "uniform_labels",
    "nonuniform_labels",
    "router_rows",
    "chain_key",
    "active_version",
)


@lru_cache(maxsize=4)
def _lookup_sql(vendor: str) -> str:
    quote = connection.ops.quote_name

    def columns(model, alias: str, names: tuple[str, ...]) -> str:
        return ", ".join(f"{alias}.{quote(model._meta.get_field(n).column)}" for n in names)

    versions = quote(CalibrationVersion._meta.db_table)
    active = quote(ProfileLearning._meta.get_field("active_version").column)
    return (
        f"SELECT {columns(RoutingProfile, 'p', _PROFILE_COLUMNS)}, "  # noqa: S608 - identifiers from model metadata
        f"{columns(ProfileLearning, 'l', _LEARNING_COLUMNS)}, v.created_at "
        f"FROM (SELECT 1 AS one) AS x "
        f"LEFT JOIN {quote(RoutingProfile._meta.db_table)} p ON p.tenant_id = %s AND p.name = %s "
        f"LEFT JOIN {quote(ProfileLearning._meta.db_table)} l "
        f"ON l.tenant_id = %s AND l.profile = %s "
        f"LEFT JOIN {versions} v ON v.id = l.{active}"
    )


@dataclass(frozen=True)
class _Found:
    profile: RoutingProfile | None
    uniform_labels: int
    nonuniform_labels: int
    router_rows: int
    chain_key: str
    version_id: int | None
    version_created: Any


def _lookup(tenant_id: int, short: str, name: str) -> _Found:
    row = fetch_one(_lookup_sql(connection.vendor), [tenant_id, short, tenant_id, name])
    assert row is not None  # the query always returns its one row
    p = dict(zip(_PROFILE_COLUMNS, row[: len(_PROFILE_COLUMNS)], strict=True))
    uniform, nonuniform, router, key, version_id, version_created = row[len(_PROFILE_COLUMNS) :]
    profile = None
    if p["id"] is not None:
        profile = RoutingProfile(
            id=p["id"],
            tenant_id=tenant_id,
            name=short,
            preset=p["preset"],
            chain=as_json(p["chain"]),
            threshold_offset=p["threshold_offset"],
            domain_routes=as_json(p["domain_routes"]),
            calibration=as_json(p["calibration"]),
            audits_enabled=bool(p["audits_enabled"]),
            audit_rate_floor=float(p["audit_rate_floor"]),
            judge_model=p["judge_model"],
            reference_model=p["reference_model"],
        )
    return _Found(
        profile,
        int(uniform or 0),
        int(nonuniform or 0),
        int(router or 0),
        key or "",
        version_id,
        version_created,
    )


@dataclass(frozen=True)
class LearnedCalibration:
    chain: tuple[str, ...]
    calibration: Calibration


@lru_cache(maxsize=512)
def learned_calibration(version_id: int, created_at: Any = None) -> LearnedCalibration | None:
    """A version's calibration, parsed once per process (versions are never edited; the
    creation time in the key tells a version from another that reused its id)."""
    row = CalibrationVersion.objects.filter(pk=version_id).values_list("chain", "calibration")
    found = row.first()
    if found is None:
        return None
    chain, data = found
    return LearnedCalibration(tuple(chain), Calibration.from_json(data))


@lru_cache(maxsize=16)
def _cold_start(chain_length: int) -> Calibration:
    return learning.cold_start_calibration(chain_length)


def _learning(target: Target, ctx: TokenContext, found: _Found) -> Target:
    """The target as it runs when it learns from audits (unchanged when it does not)."""
    profile = found.profile
    if not ctx.audits_enabled or (profile is not None and not profile.audits_enabled):
        return target
    if len(target.chain) < 2:
        return target
    chain = tuple(m.name for m in target.chain)
    calibration, version_id = _cold_start(len(chain)), None
    if found.version_id is not None:
        learned = learned_calibration(found.version_id, as_datetime(found.version_created))
        if learned is not None and learned.chain == chain:
            calibration, version_id = learned.calibration, found.version_id
    same_chain = found.chain_key == chain_key(chain)  # else: labels of another chain
    reference = (profile.reference_model if profile else "") or chain[-1]
    judge = (profile.judge_model if profile else "") or chain[-1]
    routes = {
        domain: dataclasses.replace(route, calibration=target.calibration)
        for domain, route in target.domain_routes.items()
    }
    return dataclasses.replace(
        target,
        calibration=calibration,
        domain_routes=routes,
        learning=Learning(
            profile=target.profile,
            chain=chain,
            reference_model=reference,
            judge_model="" if judge == NO_JUDGE else judge,
            floor=profile.audit_rate_floor if profile else AUDIT_DEFAULTS["audit_rate_floor"],
            uniform_labels=found.uniform_labels if same_chain else 0,
            nonuniform_labels=found.nonuniform_labels if same_chain else 0,
            router_rows=found.router_rows if same_chain else 0,
            version_id=version_id,
            settled=version_id is not None and learning.settled(calibration.meta),
        ),
    )


def resolve_target(ctx: TokenContext, name: str) -> Target:
    allowed = allowed_specs(ctx)
    if name.startswith(PROFILE_PREFIX):
        short = name.removeprefix(PROFILE_PREFIX)
        found = _lookup(ctx.tenant_id, short, name)
        if found.profile is not None:
            target = _profile_target(found.profile, allowed, name)
            return _learning(target, ctx, found)
        if short in PRESETS:
            target = Target(
                name=name,
                chain=_chain(list(settings.CASCADEFLOW_DEFAULT_CHAIN), allowed, name),
                preset=short,
                profile=name,
            )
            return _learning(target, ctx, found)
    model = model_catalog().get(name)
    if model is None and _own(allowed.get(name)):
        return Target(name=name, chain=(allowed[name],))
    if model is None and name in tenant_specs(ctx.tenant_id, ctx.models_version):
        raise forbidden(f"Your plan does not allow the model '{name}'.", code="model_not_allowed")
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
    names.extend((m.name, m.owned_by) for m in allowed_specs(ctx).values())
    return names
