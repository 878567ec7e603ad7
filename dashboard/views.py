from django.contrib.auth.decorators import login_required
from django.http import JsonResponse
from django.shortcuts import redirect, render

from dashboard.access import SESSION_TENANT_KEY, memberships_for_user, tenant_view


@login_required
def home(request):
    """Send the user to the tenant they last looked at, or their first one."""
    memberships = memberships_for_user(user=request.user)
    if not memberships:
        return render(request, "dashboard/no_tenant.html")
    last = request.session.get(SESSION_TENANT_KEY)
    slugs = [m.tenant.slug for m in memberships]
    return redirect("dashboard:overview", last if last in slugs else slugs[0])


@tenant_view()
def overview(request):
    return render(request, "dashboard/overview.html", {"access": request.access, "tab": "overview"})


@tenant_view()
def overview_data(request):
    return JsonResponse({})


@tenant_view()
def models_page(request):
    return render(request, "dashboard/models.html", {"access": request.access, "tab": "models"})


@tenant_view()
def end_users(request):
    return render(
        request, "dashboard/end_users.html", {"access": request.access, "tab": "end_users"}
    )
