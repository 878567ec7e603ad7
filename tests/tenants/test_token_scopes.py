"""Nobody gives more power than they hold: tokens minting tokens, members giving roles.

The rule lives in ``tenants.services`` (``scopes_beyond`` / ``grant_check`` and
``role_grant_check``); the API and the dashboard both go through it.
"""

from itertools import chain, combinations, pairwise

import pytest
from rest_framework.test import APIClient

from tenants import services
from tenants.enums import ALL_SCOPES, MemberRole, Scope
from tenants.models import ApiToken, AuditEvent, Member
from tenants.services import token_create
from tests.factories import MemberFactory, member_login

pytestmark = pytest.mark.django_db


def subsets(items, *, empty: bool = True) -> list[tuple[str, ...]]:
    start = 0 if empty else 1
    return list(chain.from_iterable(combinations(items, n) for n in range(start, len(items) + 1)))


def may_grant(held, requested) -> bool:
    return Scope.ADMIN in held or set(requested) <= set(held)


def may_manage_tokens(held) -> bool:
    return Scope.ADMIN in held or Scope.TOKENS_WRITE in held


def requests_for(held) -> list[tuple[str, ...]]:
    """Each scope alone, what is held, and what is held plus each scope it lacks.

    (Every combination of requested scopes is checked against the service rule below.)
    """
    requested = [(scope,) for scope in ALL_SCOPES]
    if held:
        requested.append(tuple(held))
        requested += [(*held, scope) for scope in ALL_SCOPES if scope not in held]
    return requested


@pytest.mark.parametrize("held", subsets(ALL_SCOPES), ids=lambda h: "+".join(h) or "none")
def test_a_token_mints_only_scopes_it_holds(tenant, held):
    issuer = token_create(tenant=tenant, name="issuer", scopes=held)
    client = APIClient()
    client.credentials(HTTP_AUTHORIZATION=f"Bearer {issuer.raw}")

    for requested in requests_for(held):
        response = client.post(
            "/api/v1/tokens/", {"name": "minted", "scopes": list(requested)}, format="json"
        )

        if may_manage_tokens(held) and may_grant(held, requested):
            assert response.status_code == 201, (held, requested, response.content)
            assert sorted(response.json()["scopes"]) == sorted(requested)
        else:
            assert response.status_code == 403, (held, requested, response.content)
            error = response.json()["error"]
            assert set(error) == {"code", "message"}
            expected = "scope_not_held" if may_manage_tokens(held) else "insufficient_scope"
            assert error["code"] == expected
    minted = ApiToken.objects.filter(tenant=tenant, name="minted")
    assert all(may_grant(held, t.scopes) for t in minted)


def test_a_refused_grant_names_the_missing_scopes_and_writes_nothing(tenant):
    issuer = token_create(tenant=tenant, name="issuer", scopes=[Scope.TOKENS_WRITE])
    client = APIClient()
    client.credentials(HTTP_AUTHORIZATION=f"Bearer {issuer.raw}")

    response = client.post(
        "/api/v1/tokens/",
        {"name": "root", "scopes": [Scope.ADMIN, Scope.TOKENS_WRITE]},
        format="json",
    )

    assert response.status_code == 403
    assert response.json()["error"]["message"].endswith("not held: admin.")
    assert not ApiToken.objects.filter(name="root").exists()
    assert not AuditEvent.objects.filter(action="token.create", data__name="root").exists()


@pytest.mark.parametrize("held", subsets(ALL_SCOPES), ids=lambda h: "+".join(h) or "none")
def test_the_service_rule_over_every_combination(held):
    for requested in subsets(ALL_SCOPES, empty=False):
        beyond = services.scopes_beyond(held=held, requested=requested)
        assert (not beyond) == may_grant(held, requested)
        if beyond:
            assert beyond == set(requested) - set(held)
            with pytest.raises(services.GrantExceedsHolder):
                services.grant_check(held=held, requested=requested)


def test_the_platform_itself_may_issue_any_scope(tenant):
    issued = token_create(tenant=tenant, name="root", scopes=[Scope.ADMIN])

    assert issued.token.scopes == [Scope.ADMIN]


ROLES = list(services.ROLE_ORDER)


@pytest.mark.parametrize("acting", ROLES)
@pytest.mark.parametrize("role", ROLES)
def test_a_member_gives_at_most_their_own_role(acting, role):
    if ROLES.index(role) <= ROLES.index(acting):
        services.role_grant_check(acting_role=acting, role=role)
    else:
        with pytest.raises(services.GrantExceedsHolder):
            services.role_grant_check(acting_role=acting, role=role)


def test_every_role_holds_scopes_and_only_higher_roles_hold_more():
    held = [services.role_scopes(role) for role in ROLES]

    assert set(ROLES) == set(MemberRole.values)
    assert all(lower <= higher for lower, higher in pairwise(held))
    assert services.role_scopes(MemberRole.OWNER) == set(ALL_SCOPES)


def test_the_dashboard_grants_through_the_same_rule(client, tenant, monkeypatch):
    """An admin whose role held only some scopes could not mint more from the tokens page."""
    member_login(client, tenant, MemberRole.ADMIN)
    monkeypatch.setitem(services.ROLE_SCOPES, MemberRole.ADMIN, frozenset({Scope.COMPLETIONS}))

    refused = client.post(
        f"/dashboard/t/{tenant.slug}/tokens/", {"name": "root", "scopes": [Scope.ADMIN]}
    )
    allowed = client.post(
        f"/dashboard/t/{tenant.slug}/tokens/", {"name": "app", "scopes": [Scope.COMPLETIONS]}
    )

    assert refused.status_code == 200
    assert "not held: admin" in refused.content.decode()
    assert not ApiToken.objects.filter(name="root").exists()
    assert allowed.status_code == 302
    assert ApiToken.objects.get(name="app").scopes == [Scope.COMPLETIONS]


@pytest.mark.parametrize("path", ["members/", "members/{member}/role/"])
def test_the_members_page_grants_roles_through_the_same_rule(client, tenant, monkeypatch, path):
    """Were owners ranked below admins, an owner could not give the admin role."""
    member_login(client, tenant, MemberRole.OWNER)
    viewer = MemberFactory(tenant=tenant, role=MemberRole.VIEWER)
    monkeypatch.setattr(
        services, "ROLE_ORDER", (MemberRole.VIEWER, MemberRole.OWNER, MemberRole.ADMIN)
    )

    response = client.post(
        f"/dashboard/t/{tenant.slug}/" + path.format(member=viewer.pk),
        {"email": "new@example.test", "role": MemberRole.ADMIN},
    )

    assert response.status_code == 403
    assert not Member.objects.filter(tenant=tenant, role=MemberRole.ADMIN).exists()
