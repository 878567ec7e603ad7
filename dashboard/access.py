"""Who may see which tenant's dashboard, and do what there.

Every per-tenant page lives under ``/dashboard/t/<slug>/`` and goes through
:func:`tenant_view`: a user who is not a member of the tenant gets a 404 (the
tenant's existence is not disclosed); a member whose role is too low gets a 403.
"""

from collections.abc import Callable
from dataclasses import dataclass
from functools import wraps

from django.contrib.auth.decorators import login_required
from django.http import Http404, HttpRequest, HttpResponse
from django.shortcuts import render

from tenants.enums import MemberRole
from tenants.models import Member, Tenant
from tenants.selectors import memberships_of
from tenants.services import ROLE_ORDER

ROLE_RANK = {role: rank for rank, role in enumerate(ROLE_ORDER)}
SESSION_TENANT_KEY = "dashboard_tenant"


@dataclass(frozen=True)
class TenantAccess:
    tenant: Tenant
    role: str
    memberships: tuple[Member, ...]  # every tenant the user belongs to, for the switcher

    @property
    def can_manage(self) -> bool:
        """Admins and owners manage keys, budgets, end users and routing."""
        return ROLE_RANK[self.role] >= ROLE_RANK[MemberRole.ADMIN]

    @property
    def is_owner(self) -> bool:
        """Owners also manage billing and members."""
        return self.role == MemberRole.OWNER


def tenant_access(*, user, slug: str) -> TenantAccess:
    memberships = memberships_of(user=user)
    for member in memberships:
        if member.tenant.slug == slug:
            return TenantAccess(tenant=member.tenant, role=member.role, memberships=memberships)
    raise Http404("No such tenant.")


def tenant_view(min_role: str = MemberRole.VIEWER) -> Callable:
    """Resolve ``tenant_slug`` to ``request.access``: 404 for non-members, 403 below min_role."""

    def decorator(view):
        @login_required
        @wraps(view)
        def wrapper(request: HttpRequest, tenant_slug: str, *args, **kwargs) -> HttpResponse:
            access = tenant_access(user=request.user, slug=tenant_slug)
            request.access = access
            if request.session.get(SESSION_TENANT_KEY) != access.tenant.slug:
                request.session[SESSION_TENANT_KEY] = access.tenant.slug
            if ROLE_RANK[access.role] < ROLE_RANK[min_role]:
                return forbidden(request, min_role)
            return view(request, *args, **kwargs)

        return wrapper

    return decorator


def render_page(
    request: HttpRequest, template: str, tab: str, context: dict | None = None, status: int = 200
) -> HttpResponse:
    """A per-tenant page: ``dashboard/<template>`` with the tenant access and the active tab."""
    return render(
        request,
        f"dashboard/{template}",
        {"access": request.access, "tab": tab, **(context or {})},
        status=status,
    )


def forbidden(request: HttpRequest, needed: str) -> HttpResponse:
    """The 403 page for a member whose role is below ``needed``."""
    return render(
        request,
        "dashboard/forbidden.html",
        {"access": request.access, "needed": MemberRole(needed).label},
        status=403,
    )
