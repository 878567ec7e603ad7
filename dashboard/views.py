from django.contrib.auth.decorators import login_required
from django.http import Http404, JsonResponse
from django.shortcuts import redirect, render
from django.templatetags.static import static
from django.utils import timezone
from django.views.decorators.cache import cache_control

from dashboard import pages, selectors
from dashboard.access import SESSION_TENANT_KEY, render_page, tenant_view
from routing import selectors as routing_selectors
from tenants.models import EndUserTier
from tenants.selectors import memberships_of


@cache_control(max_age=86400, public=True)
def favicon(request):
    """Browsers ask for /favicon.ico on pages that name no icon (JSON, the admin)."""
    return redirect(static("dashboard/favicon.svg"), permanent=True)


@login_required
def home(request):
    """Send the user to the tenant they last looked at, or their first one."""
    memberships = memberships_of(user=request.user)
    if not memberships:
        return render(request, "dashboard/no_tenant.html")
    last = request.session.get(SESSION_TENANT_KEY)
    slugs = [m.tenant.slug for m in memberships]
    return redirect("dashboard:overview", last if last in slugs else slugs[0])


@tenant_view()
def overview(request):
    page = pages.overview(request.access.tenant, timezone.now())
    return render_page(request, "overview.html", "overview", {"page": page})


@tenant_view()
def overview_data(request):
    """The overview's numbers and figures as JSON: the live view's resync after a reconnect."""
    page = pages.overview(request.access.tenant, timezone.now())
    t = page.totals
    return JsonResponse(
        {
            "requests": t.requests,
            "cost_nanos": t.cost_nanos,
            "baseline_cost_nanos": t.baseline_cost_nanos,
            "savings_nanos": t.savings_nanos,
            "escalated": t.escalated,
            "answered": t.answered,
            "errors": t.errors,
            "gauges": [{"limit_nanos": g.limit_nanos} for g in page.gauges],
            "figures": page.figures_json,
        }
    )


@tenant_view()
def models_page(request):
    page = pages.models(request.access.tenant, timezone.now(), request.GET.get("range", "period"))
    return render_page(
        request, "models.html", "models", {"page": page, "ranges": pages.RANGE_CHOICES}
    )


@tenant_view()
def profile_page(request, name: str):
    """A profile's measured quality and its calibration history; admins may roll back."""
    tenant = request.access.tenant
    if not routing_selectors.profile_known(tenant_id=tenant.pk, name=name):
        raise Http404("No such profile.")
    page = pages.profile(tenant, name, timezone.now(), request.GET.get("range", "period"))
    return render_page(
        request, "profile.html", "models", {"page": page, "ranges": pages.RANGE_CHOICES}
    )


@tenant_view()
def end_users(request):
    tenant = request.access.tenant
    lines = selectors.end_user_lines(tenant, timezone.now())
    tiers = EndUserTier.objects.filter(tenant=tenant).order_by("name")
    return render_page(request, "end_users.html", "end_users", {"lines": lines, "tiers": tiers})
