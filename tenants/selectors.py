"""Reads for tenants and API tokens."""

from dataclasses import dataclass
from datetime import datetime

from tenants.models import ApiToken, Tenant
from tenants.services import token_hash


@dataclass(frozen=True)
class TokenContext:
    """Who is calling: resolved from the bearer token, never from the request body."""

    token_id: int
    tenant_id: int
    tenant_slug: str
    scopes: frozenset[str]
    tenant_allowed_models: tuple[str, ...]
    tier_allowed_models: tuple[str, ...]
    last_used_at: datetime | None

    def has_scope(self, scope: str) -> bool:
        return "admin" in self.scopes or scope in self.scopes


class TokenInvalid(Exception):
    def __init__(self, reason: str):
        super().__init__(reason)
        self.reason = reason


def token_context_for_raw(*, raw: str, now: datetime) -> TokenContext:
    """Resolve a raw bearer token; raise ``TokenInvalid`` with a user-facing reason.

    Unknown, revoked and expired tokens, and tokens of inactive tenants, are all
    refused; the reason never reveals whether another tenant's token exists.
    """
    if not raw:
        raise TokenInvalid("Missing API key. Send it as 'Authorization: Bearer <token>'.")
    try:
        token = ApiToken.objects.select_related("tenant", "tenant__tier").get(
            token_hash=token_hash(raw)
        )
    except ApiToken.DoesNotExist:
        raise TokenInvalid("Incorrect API key provided.") from None
    if token.revoked_at is not None:
        raise TokenInvalid("This API key has been revoked.")
    if token.expires_at is not None and token.expires_at <= now:
        raise TokenInvalid("This API key has expired.")
    tenant: Tenant = token.tenant
    if not tenant.is_active:
        raise TokenInvalid("This API key belongs to a deactivated account.")
    tier = tenant.tier
    return TokenContext(
        token_id=token.pk,
        tenant_id=tenant.pk,
        tenant_slug=tenant.slug,
        scopes=frozenset(token.scopes),
        tenant_allowed_models=tuple(tenant.allowed_models or ()),
        tier_allowed_models=tuple(tier.allowed_models or ()) if tier else (),
        last_used_at=token.last_used_at,
    )


def token_list(*, tenant: Tenant):
    return ApiToken.objects.filter(tenant=tenant).order_by("-created_at")
