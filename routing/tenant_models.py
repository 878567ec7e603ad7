"""Tenants' own provider models (bring your own key): saved, validated, resolved per request.

A tenant adds a model under a name of its own (``acme/gpt-4o``), the LiteLLM model
it is (``openai/gpt-4o``, ``azure/<deployment>``, ``anthropic/claude-…``,
``bedrock/…``, ``vertex_ai/…``, ``groq/…``, ``together_ai/…``, or ``openai/<name>``
with an ``api_base`` for an OpenAI-compatible server such as vLLM or Ollama), its
credentials and its prices. Saving makes one cheap call (one output token) with
them (an embedding model, ``mode: "embedding"``: one embedding of a short text) and
refuses what the provider refuses. Credentials are encrypted at rest
with the rotating keys of ``core.crypto`` and never shown again: the
API returns a mask. An ``api_base`` follows the rules of callback URLs (no
loopback, private or metadata addresses outside development), at save time and
again before each call. A key is rotated in place (:func:`provider_model_rotate`):
the new credentials pass the same cheap call before they replace the stored ones.
The management API (``routing.api``) and the dashboard's "Provider keys" page
(``dashboard.manage_views``) both go through these functions.

The gateway resolves a tenant's models from ``TokenContext.models_version`` (read
with the token, no extra query): specs are built once per version and process,
and only this tenant's requests ever see them. The ledger's ``byok_cost_nanos``
is the part of a request's cost paid with the tenant's keys.
"""

from __future__ import annotations

import json
import re
import threading
from collections import OrderedDict
from decimal import Decimal, InvalidOperation
from typing import Any

import httpx
from asgiref.sync import async_to_sync
from django.db import IntegrityError, transaction
from django.db.models import F
from django.utils import timezone

from core import crypto, netguard
from routing.engine.pricing import ModelPrice, litellm_price
from routing.engine.resilience import Caller, Failure, UpstreamError
from routing.engine.types import EMBEDDING, Deployment, ModelSpec
from routing.enums import ModelMode
from routing.models import TenantProviderModel
from routing.platform_models import model_catalog
from tenants.models import Tenant
from tenants.services import audit_record

OWNED_BY = "tenant"
NAME_RE = re.compile(r"^[a-z0-9][a-z0-9._-]{0,48}(/[a-z0-9][a-z0-9._:-]{0,48})?$")
LITELLM_MODEL_RE = re.compile(r"^[A-Za-z0-9_.-]+/[A-Za-z0-9_.:@/+-]{1,150}$")
# The credentials a tenant may give, as LiteLLM names them; nothing else reaches a call.
CREDENTIAL_KEYS = frozenset(
    {
        "api_key",
        "aws_access_key_id",
        "aws_secret_access_key",
        "aws_session_token",
        "aws_region_name",
        "vertex_credentials",
        "vertex_project",
        "vertex_location",
    }
)
# Shown in full in the mask (they locate the account; they are not secrets).
PUBLIC_KEYS = frozenset({"aws_region_name", "vertex_project", "vertex_location"})
MAX_PRICE = Decimal("10000")
MAX_CREDENTIAL = 20_000  # characters of one credential (a Vertex service-account JSON fits)
VALIDATION_TIMEOUT_S = 15.0


class ProviderModelInvalid(ValueError):
    """The model cannot be saved; ``field`` names what is wrong."""

    def __init__(self, message: str, field: str = ""):
        super().__init__(message)
        self.field = field


# --- saving -------------------------------------------------------------------------------


def mask(credentials: dict[str, str]) -> dict[str, str]:
    """What the API shows of credentials: the last four characters of each secret."""
    shown = {}
    for key, value in sorted(credentials.items()):
        if key in PUBLIC_KEYS:
            shown[key] = value
        else:
            shown[key] = f"…{value[-4:]}" if len(value) >= 12 else "…"
    return shown


def _check(
    *,
    tenant: Tenant,
    name: str,
    litellm_model: str,
    api_base: str,
    api_version: str,
    credentials: dict[str, Any],
    input_usd_per_mtok: Any,
    output_usd_per_mtok: Any,
    mode: str = ModelMode.CHAT,
) -> tuple[dict[str, str], Decimal, Decimal]:
    if mode not in ModelMode.values:
        raise ProviderModelInvalid(f"mode is one of {', '.join(ModelMode.values)}.", "mode")
    if not NAME_RE.match(name or ""):
        raise ProviderModelInvalid(
            "A name is lowercase letters, digits, '.', '_' or '-', with at most one '/' "
            "(for example 'acme/gpt-4o').",
            "name",
        )
    if name.startswith("cascade/") or name in model_catalog():
        raise ProviderModelInvalid(f"'{name}' is taken by a CascadeFlow model or profile.", "name")
    if not LITELLM_MODEL_RE.match(litellm_model or ""):
        raise ProviderModelInvalid(
            "litellm_model is '<provider>/<model>', for example 'openai/gpt-4o-mini'.",
            "litellm_model",
        )
    if api_base:
        try:
            netguard.validate_public_url(api_base)
        except netguard.UnsafeURLError as exc:
            raise ProviderModelInvalid(str(exc), "api_base") from None
    credentials = _check_credentials(credentials)
    prices = []
    if mode == ModelMode.EMBEDDING and output_usd_per_mtok is None:
        output_usd_per_mtok = 0  # an embedding model bills input tokens only
    for field, value in (
        ("input_usd_per_mtok", input_usd_per_mtok),
        ("output_usd_per_mtok", output_usd_per_mtok),
    ):
        if value is None:
            known = litellm_price(litellm_model)
            if known is None:
                raise ProviderModelInvalid(
                    f"LiteLLM has no price for '{litellm_model}': give {field}.", field
                )
            per_token = (
                known.input_nanos_per_token
                if field.startswith("input")
                else known.output_nanos_per_token
            )
            prices.append(Decimal(per_token) / 1000)  # nanos per token -> USD per million
            continue
        try:
            price = Decimal(str(value))
        except (InvalidOperation, ValueError):
            raise ProviderModelInvalid(f"{field} is a decimal number of dollars.", field) from None
        if not price.is_finite() or not 0 <= price <= MAX_PRICE:
            raise ProviderModelInvalid(f"{field} is between 0 and {MAX_PRICE}.", field)
        prices.append(price)
    return credentials, prices[0], prices[1]


def _check_credentials(credentials: Any) -> dict[str, str]:
    if not isinstance(credentials, dict) or not credentials:
        raise ProviderModelInvalid(
            'credentials is an object, for example {"api_key": "sk-…"}.', "credentials"
        )
    unknown = sorted(set(credentials) - CREDENTIAL_KEYS)
    if unknown:
        raise ProviderModelInvalid(
            f"Unknown credential fields: {', '.join(unknown)} (allowed: "
            f"{', '.join(sorted(CREDENTIAL_KEYS))}).",
            "credentials",
        )
    if not all(isinstance(v, str) and v and len(v) <= MAX_CREDENTIAL for v in credentials.values()):
        raise ProviderModelInvalid("Each credential is a non-empty string.", "credentials")
    return {k: str(v) for k, v in credentials.items()}


def provider_model_create(
    *,
    tenant: Tenant,
    name: str,
    litellm_model: str,
    credentials: dict[str, Any],
    api_base: str = "",
    api_version: str = "",
    input_usd_per_mtok: Any = None,
    output_usd_per_mtok: Any = None,
    mode: str = ModelMode.CHAT,
    acting_user: Any = None,
) -> TenantProviderModel:
    """Validate (one cheap call with the credentials), encrypt and save a tenant's model."""
    credentials, input_price, output_price = _check(
        tenant=tenant,
        name=name,
        litellm_model=litellm_model,
        api_base=api_base,
        api_version=api_version,
        credentials=credentials,
        input_usd_per_mtok=input_usd_per_mtok,
        output_usd_per_mtok=output_usd_per_mtok,
        mode=mode,
    )
    if TenantProviderModel.objects.filter(tenant=tenant, name=name).exists():
        raise ProviderModelInvalid(f"You already have a model named '{name}'.", "name")
    row = TenantProviderModel(
        tenant=tenant,
        name=name,
        litellm_model=litellm_model,
        api_base=api_base,
        api_version=api_version,
        credentials_encrypted=crypto.encrypt(json.dumps(credentials)),
        credentials_mask=mask(credentials),
        input_usd_per_mtok=input_price,
        output_usd_per_mtok=output_price,
        mode=mode,
        validated_at=timezone.now(),
    )
    validate_call(spec_of(row, credentials))

    try:
        with transaction.atomic():
            row.save()
            Tenant.objects.filter(pk=tenant.pk).update(models_version=F("models_version") + 1)
            audit_record(
                tenant=tenant,
                action="provider_model.create",
                target=name,
                acting_user=acting_user,
                data={"litellm_model": litellm_model, "api_base": api_base, "mode": mode},
            )
    except IntegrityError:  # the same name saved meanwhile (the check above raced)
        raise ProviderModelInvalid(f"You already have a model named '{name}'.", "name") from None
    return row


def provider_model_rotate(
    *, row: TenantProviderModel, credentials: dict[str, Any], acting_user: Any = None
) -> TenantProviderModel:
    """Replace the model's credentials in place: ``credentials`` (say, a new ``api_key``)
    are laid over the stored ones, validated with one cheap call, then swapped in.

    Until the new ones pass, the stored credentials stay in force and keep serving; a
    refused key changes nothing. The swap bumps the tenant's ``models_version``, so the
    next request is built with the new key. The model's name, upstream model, address
    and prices do not change (add another model for that).
    """
    given = _check_credentials(credentials)
    if row.api_base:
        try:
            netguard.validate_public_url(row.api_base)
        except netguard.UnsafeURLError as exc:
            raise ProviderModelInvalid(str(exc), "api_base") from None
    merged = {**json.loads(crypto.decrypt(row.credentials_encrypted)), **given}
    validate_call(spec_of(row, merged))

    with transaction.atomic():
        # Locked and re-read: deleted meanwhile is DoesNotExist (the caller's 404).
        current = TenantProviderModel.objects.select_for_update().get(
            pk=row.pk, tenant_id=row.tenant_id
        )
        if current.credentials_encrypted != row.credentials_encrypted:
            # Rotated by someone else during the call: what was validated is not what
            # would be stored (their change and this one merged). Nothing is written.
            raise ProviderModelInvalid(
                "These credentials were changed meanwhile; reload and try again.", "credentials"
            )
        current.credentials_encrypted = crypto.encrypt(json.dumps(merged))
        current.credentials_mask = mask(merged)
        current.validated_at = timezone.now()
        current.save(update_fields=["credentials_encrypted", "credentials_mask", "validated_at"])
        Tenant.objects.filter(pk=row.tenant_id).update(models_version=F("models_version") + 1)
        audit_record(
            tenant=current.tenant,
            action="provider_model.rotate",
            target=current.name,
            acting_user=acting_user,
            data={"fields": sorted(given)},
        )
    return current


def provider_model_delete(*, row: TenantProviderModel, acting_user: Any = None) -> None:

    with transaction.atomic():
        row.delete()
        Tenant.objects.filter(pk=row.tenant_id).update(models_version=F("models_version") + 1)
        audit_record(
            tenant=row.tenant,
            action="provider_model.delete",
            target=row.name,
            acting_user=acting_user,
        )


def validate_call(spec: ModelSpec) -> None:
    """One call of one output token (an embedding model: one embedding of a short text)
    with the new credentials; refuse what the provider refuses (a bad key, an unknown
    model or deployment, an unreachable server)."""
    caller = Caller(breaker=None, retries=0, timeout_s=VALIDATION_TIMEOUT_S, vet=vet)
    messages = [{"role": "user", "content": "Reply with OK."}]
    try:
        async_to_sync(_vetted_call)(caller, spec, messages)
    except UpstreamError as exc:
        failure = exc.failure
        status = failure.provider_status
        if status in (401, 403) or failure.code == "upstream_address_refused":
            reason = "refused these credentials" if status else "cannot be called here"
        elif status == 404:
            reason = "does not know this model or deployment"
        else:
            reason = f"could not be reached ({status or failure.code})"
        said = _scrub(failure.message, spec)[:300]
        raise ProviderModelInvalid(f"The provider {reason}: {said}", "credentials") from None


def _scrub(text: str, spec: ModelSpec) -> str:
    """The provider's message without the secrets just sent (some providers echo a key)."""
    for deployment in spec.deployments:
        for key, value in deployment.params.items():
            if key in CREDENTIAL_KEYS and key not in PUBLIC_KEYS and len(str(value)) >= 4:
                text = text.replace(str(value), "…")
    return text


async def _vetted_call(caller: Caller, spec: ModelSpec, messages: list[dict]) -> None:
    if spec.mode == EMBEDDING:
        await caller.embed(spec, {"input": ["OK"]}, [], role="validate")
        return
    await caller.complete(spec, {"messages": messages, "max_tokens": 1}, [], role="validate")


# --- resolving ----------------------------------------------------------------------------


def spec_of(row: TenantProviderModel, credentials: dict[str, str] | None = None) -> ModelSpec:
    if credentials is None:
        credentials = json.loads(crypto.decrypt(row.credentials_encrypted))
    params: dict[str, Any] = dict(credentials)
    if row.api_base:
        params["api_base"] = row.api_base
    if row.api_version:
        params["api_version"] = row.api_version
    return ModelSpec(
        name=row.name,
        deployments=(Deployment(row.litellm_model, params, owner=f"tenant:{row.tenant_id}"),),
        price=ModelPrice.per_million_usd(str(row.input_usd_per_mtok), str(row.output_usd_per_mtok)),
        owned_by=OWNED_BY,
        supports_logprobs=False,
        mode=row.mode,
        # The provider decides which sizes its model takes (and refuses the others).
        supports_dimensions=row.mode == EMBEDDING,
    )


_cache: OrderedDict[tuple[int, int], dict[str, ModelSpec]] = OrderedDict()
_lock = threading.Lock()
_CACHE_SIZE = 512


def tenant_specs(tenant_id: int, version: int) -> dict[str, ModelSpec]:
    """The tenant's own models by name, built once per (tenant, version) and process."""
    if not version:
        return {}
    key = (tenant_id, version)
    with _lock:
        found = _cache.get(key)
        if found is not None:
            _cache.move_to_end(key)
            return found
    specs = {
        row.name: spec_of(row)
        for row in TenantProviderModel.objects.filter(tenant_id=tenant_id).order_by("name")
    }
    with _lock:
        for stale in [k for k in _cache if k[0] == tenant_id]:
            del _cache[stale]
        _cache[key] = specs
        while len(_cache) > _CACHE_SIZE:
            _cache.popitem(last=False)
    return specs


def is_tenant_model(spec: ModelSpec) -> bool:
    return spec.owned_by == OWNED_BY


async def vet(spec: ModelSpec) -> None:
    """Before calling a tenant's server: its address must still be public (DNS can change
    after it was saved). Platform models are the operator's and are not checked."""
    if not is_tenant_model(spec) or netguard.private_allowed():
        return
    for deployment in spec.deployments:
        base = deployment.params.get("api_base")
        if not base:
            continue
        url = httpx.URL(base)
        try:
            await netguard.aresolve_public(
                url.host, url.port or (443 if url.scheme == "https" else 80)
            )
        except netguard.UnsafeURLError as exc:
            raise UpstreamError(
                spec.name,
                Failure(False, 403, "upstream_address_refused", f"{exc} (the model's api_base)"),
            ) from None
