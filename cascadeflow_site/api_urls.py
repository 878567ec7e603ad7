"""The management API, /api/v1/."""

from django.urls import path, re_path, register_converter
from drf_spectacular.views import SpectacularAPIView, SpectacularSwaggerView

from billing.api import (
    ExportJobCreateApi,
    ExportJobDetailApi,
    ExportJobDownloadApi,
    UsageExportCsvApi,
)
from routing.api import (
    AuditListApi,
    CalibrationListApi,
    CalibrationRollbackApi,
    ProfileDetailApi,
    ProfileListCreateApi,
    ProfileNameConverter,
    ProfileQualityApi,
    ProviderModelDetailApi,
    ProviderModelListCreateApi,
    UsageListApi,
    UsageSummaryApi,
)
from tenants.api import (
    AlertListApi,
    BudgetDetailApi,
    BudgetListCreateApi,
    EndUserDetailApi,
    EndUserListApi,
    TenantSettingsApi,
    TokenListCreateApi,
    TokenRevokeApi,
)
from tenants.api_base import not_found

# A profile named as requests name it: a preset or a tenant's profile, ``cascade/`` optional.
register_converter(ProfileNameConverter, "profile")

urlpatterns = [
    path("settings/", TenantSettingsApi.as_view(), name="api-settings"),
    path("tokens/", TokenListCreateApi.as_view(), name="api-tokens"),
    path("tokens/<int:pk>/revoke/", TokenRevokeApi.as_view(), name="api-token-revoke"),
    path("budgets/", BudgetListCreateApi.as_view(), name="api-budgets"),
    path("budgets/<int:pk>/", BudgetDetailApi.as_view(), name="api-budget"),
    path("end-users/", EndUserListApi.as_view(), name="api-end-users"),
    path("end-users/<int:pk>/", EndUserDetailApi.as_view(), name="api-end-user"),
    path("profiles/", ProfileListCreateApi.as_view(), name="api-profiles"),
    path("provider-models/", ProviderModelListCreateApi.as_view(), name="api-provider-models"),
    path(
        "provider-models/<int:pk>/",
        ProviderModelDetailApi.as_view(),
        name="api-provider-model",
    ),
    path("profiles/<int:pk>/", ProfileDetailApi.as_view(), name="api-profile"),
    path(
        "profiles/<profile:name>/quality/", ProfileQualityApi.as_view(), name="api-profile-quality"
    ),
    path(
        "profiles/<profile:name>/calibrations/",
        CalibrationListApi.as_view(),
        name="api-profile-calibrations",
    ),
    path(
        "profiles/<profile:name>/calibrations/<int:version>/rollback/",
        CalibrationRollbackApi.as_view(),
        name="api-profile-calibration-rollback",
    ),
    path("audits/", AuditListApi.as_view(), name="api-audits"),
    path("usage/", UsageListApi.as_view(), name="api-usage"),
    path("usage/summary/", UsageSummaryApi.as_view(), name="api-usage-summary"),
    path("usage/export.csv", UsageExportCsvApi.as_view(), name="api-usage-export"),
    path("usage/exports/", ExportJobCreateApi.as_view(), name="api-export-jobs"),
    path("usage/exports/<int:pk>/", ExportJobDetailApi.as_view(), name="api-export-job"),
    path(
        "usage/exports/<int:pk>/download/",
        ExportJobDownloadApi.as_view(),
        name="api-export-download",
    ),
    path("alerts/", AlertListApi.as_view(), name="api-alerts"),
    path("schema/", SpectacularAPIView.as_view(), name="api-schema"),
    path("docs/", SpectacularSwaggerView.as_view(url_name="api-schema"), name="api-docs"),
    # Last: any other path under /api/v1/ is a JSON 404, not Django's HTML page.
    re_path(r"^(?P<unknown>.*)$", not_found, name="api-not-found"),
]
