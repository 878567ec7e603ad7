"""Routing profiles: the one check of their shape, and their writes.

A profile is read on every request that names it (``cascade/<name>``), so what
is stored must be runnable. A valid profile has:

- ``chain``: 1 to ``MAX_CHAIN_LENGTH`` distinct names of chat models (of the catalog
  or the tenant's own; an embedding model answers no chat), cheapest first (every
  model of a chain may be called for one request, each with its retries and
  fallbacks, so the length bounds a request's upstream calls);
- ``preset``: one of the engine's presets;
- ``threshold_offset``: a number in ``[-MAX_THRESHOLD_OFFSET, MAX_THRESHOLD_OFFSET]``;
- ``domain_routes``: ``{domain: {"chain": [...], "threshold_offset": 0.05}}`` where
  ``domain`` is one the engine detects (``DOMAINS``), ``chain`` follows the rule
  above, and ``threshold_offset`` (optional) the same bound;
- its audit settings (``routing.audits``): ``audits_enabled`` a boolean,
  ``audit_rate_floor`` a number in ``[0, 1]``, ``judge_model`` empty (the chain's
  last model), ``"none"`` (no judge) or a chat model of the catalog, ``reference_model``
  empty (the chain's last model) or a chat model of the catalog. They never stop a
  request, so only writes check them; an audit whose model the catalog has lost
  is skipped.

``profile_problems`` is that rule. The services below apply it before every
write (and write the audit event in the same transaction); the gateway applies it
again when a request resolves a profile (``routing.targets``), because rows
written before the rule existed, by the admin site or by hand may not follow it,
and the catalog may have lost a model since.
"""

from __future__ import annotations

import math
import re
from collections.abc import Collection, Mapping
from typing import Any

from django.contrib.auth.models import AbstractBaseUser
from django.db import IntegrityError, transaction

from routing.engine.complexity import DOMAINS
from routing.engine.policy import PRESETS
from routing.engine.types import CHAT, EMBEDDING
from routing.models import RoutingProfile, TenantProviderModel
from routing.platform_models import model_catalog
from tenants.models import Tenant
from tenants.services import audit_record

MAX_CHAIN_LENGTH = 8
NAME = re.compile(r"[-a-zA-Z0-9_]{1,64}")
MAX_THRESHOLD_OFFSET = 0.5
ROUTE_KEYS = frozenset({"chain", "threshold_offset"})
EDITABLE = (
    "name",
    "preset",
    "chain",
    "threshold_offset",
    "domain_routes",
    "audits_enabled",
    "audit_rate_floor",
    "judge_model",
    "reference_model",
)
NO_JUDGE = "none"
AUDIT_DEFAULTS = {
    "audits_enabled": True,
    "audit_rate_floor": 0.03,
    "judge_model": "",
    "reference_model": "",
}


class ProfileInvalid(ValueError):
    """A profile that breaks the rule; ``errors`` maps each field to its problems."""

    def __init__(self, errors: dict[str, list[str]]):
        self.errors = errors
        super().__init__(
            "; ".join(f"{field}: {' '.join(problems)}" for field, problems in errors.items())
        )


def _chain_problems(
    chain: Any, known: Collection[str] = (), embedding: Collection[str] = ()
) -> list[str]:
    if not isinstance(chain, list) or not chain or not all(isinstance(m, str) for m in chain):
        return ["A non-empty list of model names, cheapest first."]
    problems = []
    if len(chain) > MAX_CHAIN_LENGTH:
        problems.append(f"At most {MAX_CHAIN_LENGTH} models.")
    if len(set(chain)) != len(chain):
        problems.append("Each model at most once.")
    catalog = model_catalog()
    unknown = [m for m in dict.fromkeys(chain) if catalog.get(m) is None and m not in known]
    if unknown:
        problems.append(f"Unknown models: {', '.join(unknown[:MAX_CHAIN_LENGTH])}.")
    embedders = [
        m
        for m in dict.fromkeys(chain)
        if m in embedding or getattr(catalog.get(m), "mode", CHAT) == EMBEDDING
    ]
    if embedders:
        problems.append(
            f"Embedding models answer no chat: {', '.join(embedders[:MAX_CHAIN_LENGTH])}."
        )
    return problems


def _offset_problems(offset: Any) -> list[str]:
    if (
        isinstance(offset, bool)
        or not isinstance(offset, int | float)
        or not math.isfinite(offset)
        or not -MAX_THRESHOLD_OFFSET <= offset <= MAX_THRESHOLD_OFFSET
    ):
        return [f"A number between -{MAX_THRESHOLD_OFFSET} and {MAX_THRESHOLD_OFFSET}."]
    return []


def _routes_problems(
    routes: Any, known: Collection[str] = (), embedding: Collection[str] = ()
) -> list[str]:
    shape = f"An object of domain ({', '.join(DOMAINS)}) -> {{chain, threshold_offset}}."
    if not isinstance(routes, dict):
        return [shape]
    problems = []
    for domain, route in routes.items():
        if domain not in DOMAINS:
            problems.append(f"Unknown domain '{domain}': one of {', '.join(DOMAINS)}.")
            continue
        if not isinstance(route, dict) or not set(route) <= ROUTE_KEYS:
            problems.append(f'\'{domain}\': {{"chain": [...], "threshold_offset": number}}.')
            continue
        problems += [
            f"'{domain}' chain: {p}" for p in _chain_problems(route.get("chain"), known, embedding)
        ]
        if route.get("threshold_offset") is not None:
            problems += [
                f"'{domain}' threshold_offset: {p}"
                for p in _offset_problems(route["threshold_offset"])
            ]
    return problems


def profile_problems(
    *,
    chain: Any,
    preset: Any,
    threshold_offset: Any,
    domain_routes: Any,
    known: Collection[str] = (),
    embedding: Collection[str] = (),
) -> dict[str, list[str]]:
    """Everything wrong with a profile, by field (empty: it is valid). ``known``: the
    tenant's own model names, valid beside the catalog's; ``embedding``: those of them
    that are embedding models."""
    problems = {
        "chain": _chain_problems(chain, known, embedding),
        "preset": [] if preset in PRESETS else [f"One of {', '.join(PRESETS)}."],
        "threshold_offset": _offset_problems(threshold_offset),
        "domain_routes": _routes_problems(domain_routes, known, embedding),
    }
    return {field: p for field, p in problems.items() if p}


def _model_problems(name: Any, *, no_judge: bool = False) -> list[str]:
    if name == "" or (no_judge and name == NO_JUDGE):
        return []
    spec = model_catalog().get(name) if isinstance(name, str) else None
    if spec is None or spec.mode != CHAT:
        extra = f", '{NO_JUDGE}'" if no_judge else ""
        return [f"Empty (the chain's last model){extra} or a chat model of the catalog."]
    return []


def audit_problems(
    *, audits_enabled: Any, audit_rate_floor: Any, judge_model: Any, reference_model: Any
) -> dict[str, list[str]]:
    """Everything wrong with a profile's audit settings, by field (empty: they are valid)."""
    floor_ok = (
        not isinstance(audit_rate_floor, bool)
        and isinstance(audit_rate_floor, int | float)
        and math.isfinite(audit_rate_floor)
        and 0 <= audit_rate_floor <= 1
    )
    problems = {
        "audits_enabled": [] if isinstance(audits_enabled, bool) else ["true or false."],
        "audit_rate_floor": [] if floor_ok else ["A number between 0 and 1."],
        "judge_model": _model_problems(judge_model, no_judge=True),
        "reference_model": _model_problems(reference_model),
    }
    return {field: p for field, p in problems.items() if p}


def profile_check(values: Mapping[str, Any], own: Mapping[str, str] | None = None) -> None:
    """Raise :class:`ProfileInvalid` unless ``values`` (every field) make a valid profile.
    ``own``: the tenant's own models (name -> mode)."""
    own = own or {}
    problems = profile_problems(
        chain=values.get("chain"),
        preset=values.get("preset"),
        threshold_offset=values.get("threshold_offset"),
        domain_routes=values.get("domain_routes"),
        known=set(own),
        embedding={name for name, mode in own.items() if mode == EMBEDDING},
    )
    problems |= audit_problems(
        **{name: values.get(name, default) for name, default in AUDIT_DEFAULTS.items()}
    )
    name = values.get("name")
    if not isinstance(name, str) or not NAME.fullmatch(name):
        problems["name"] = ["Letters, digits, '-' and '_', at most 64 characters."]
    if problems:
        raise ProfileInvalid(problems)


def _own_models(tenant_id: int) -> dict[str, str]:

    return dict(TenantProviderModel.objects.filter(tenant_id=tenant_id).values_list("name", "mode"))


def _name_taken(tenant_id: int, name: str, exclude: int | None = None) -> bool:
    rows = RoutingProfile.objects.filter(tenant_id=tenant_id, name=name)
    if exclude is not None:
        rows = rows.exclude(pk=exclude)
    return rows.exists()


NAME_TAKEN = {"name": ["A profile with this name exists."]}


@transaction.atomic
def profile_create(
    *,
    tenant: Tenant,
    name: str,
    chain: list[str],
    preset: str = "balanced",
    threshold_offset: float = 0.0,
    domain_routes: dict[str, Any] | None = None,
    audits_enabled: bool = True,
    audit_rate_floor: float = 0.03,
    judge_model: str = "",
    reference_model: str = "",
    acting_user: AbstractBaseUser | None = None,
) -> RoutingProfile:
    values = {
        "name": name,
        "chain": chain,
        "preset": preset,
        "threshold_offset": threshold_offset,
        "domain_routes": domain_routes or {},
        "audits_enabled": audits_enabled,
        "audit_rate_floor": audit_rate_floor,
        "judge_model": judge_model,
        "reference_model": reference_model,
    }
    profile_check(values, _own_models(tenant.pk))
    if _name_taken(tenant.pk, name):
        raise ProfileInvalid(NAME_TAKEN)
    try:
        with transaction.atomic():
            profile = RoutingProfile.objects.create(tenant=tenant, **values)
    except IntegrityError:  # created concurrently under the same name
        raise ProfileInvalid(NAME_TAKEN) from None
    audit_record(
        tenant=tenant,
        action="profile.create",
        target=name,
        acting_user=acting_user,
        data={k: v for k, v in values.items() if k != "name"},
    )
    return profile


@transaction.atomic
def profile_update(
    *, profile: RoutingProfile, acting_user: AbstractBaseUser | None = None, **changes: Any
) -> dict[str, Any]:
    """Change a profile's fields; the result must be valid as a whole. Returns what changed."""
    unknown = set(changes) - set(EDITABLE)
    if unknown:
        raise ProfileInvalid({field: ["Not editable."] for field in sorted(unknown)})
    merged = {f: changes.get(f, getattr(profile, f)) for f in EDITABLE}
    profile_check(merged, _own_models(profile.tenant_id))
    if "name" in changes and _name_taken(profile.tenant_id, changes["name"], exclude=profile.pk):
        raise ProfileInvalid(NAME_TAKEN)
    changed = {f: v for f, v in changes.items() if getattr(profile, f) != v}
    if changed:
        for field, value in changed.items():
            setattr(profile, field, value)
        try:
            with transaction.atomic():
                profile.save(update_fields=[*changed, "updated_at"])
        except IntegrityError:
            raise ProfileInvalid(NAME_TAKEN) from None
        audit_record(
            tenant=profile.tenant,
            action="profile.update",
            target=profile.name,
            acting_user=acting_user,
            data=changed,
        )
    return changed


@transaction.atomic
def profile_delete(*, profile: RoutingProfile, acting_user: AbstractBaseUser | None = None) -> None:
    audit_record(
        tenant=profile.tenant,
        action="profile.delete",
        target=profile.name,
        acting_user=acting_user,
        data={"chain": profile.chain},
    )
    profile.delete()
