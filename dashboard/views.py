from django.contrib.auth.decorators import login_required
from django.shortcuts import render

from dashboard.selectors import memberships_for_user, tenant_summary


@login_required
def overview(request):
    summaries = [tenant_summary(member=m) for m in memberships_for_user(user=request.user)]
    return render(request, "dashboard/overview.html", {"summaries": summaries})
