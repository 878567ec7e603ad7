"""Admin pages of the dashboard: tokens, budgets and alerts, end-user tiers, billing, exports."""

from django.http import Http404

from dashboard.access import tenant_view
from tenants.enums import MemberRole


def _todo(request, *args, **kwargs):
    raise Http404


tokens = tenant_view(MemberRole.ADMIN)(_todo)
token_revoke = tenant_view(MemberRole.ADMIN)(_todo)
budgets = tenant_view()(_todo)
budget_edit = tenant_view(MemberRole.ADMIN)(_todo)
budget_delete = tenant_view(MemberRole.ADMIN)(_todo)
billing = tenant_view(MemberRole.OWNER)(_todo)
exports = tenant_view()(_todo)
export_csv = tenant_view()(_todo)
export_job = tenant_view()(_todo)
end_user_set_tier = tenant_view(MemberRole.ADMIN)(_todo)
