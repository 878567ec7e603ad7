from django.urls import include, path

from dashboard import manage_views, members, views

app_name = "dashboard"

tenant_patterns = [
    path("", views.overview, name="overview"),
    path("overview.json", views.overview_data, name="overview_data"),
    path("models/", views.models_page, name="models"),
    path("profiles/<slug:name>/", views.profile_page, name="profile"),
    path(
        "profiles/<slug:name>/calibrations/<int:version>/rollback/",
        manage_views.calibration_rollback,
        name="calibration_rollback",
    ),
    path("end-users/", views.end_users, name="end_users"),
    path("end-users/<int:end_user_id>/tier/", manage_views.end_user_set_tier, name="end_user_tier"),
    path("tokens/", manage_views.tokens, name="tokens"),
    path("tokens/<int:token_id>/revoke/", manage_views.token_revoke, name="token_revoke"),
    path("provider-keys/", manage_views.provider_keys, name="provider_keys"),
    path(
        "provider-keys/<int:model_id>/rotate/",
        manage_views.provider_key_rotate,
        name="provider_key_rotate",
    ),
    path(
        "provider-keys/<int:model_id>/delete/",
        manage_views.provider_key_delete,
        name="provider_key_delete",
    ),
    path("budgets/", manage_views.budgets, name="budgets"),
    path("budgets/<int:budget_id>/", manage_views.budget_edit, name="budget_edit"),
    path("budgets/<int:budget_id>/delete/", manage_views.budget_delete, name="budget_delete"),
    path("billing/", manage_views.billing, name="billing"),
    path("exports/", manage_views.exports, name="exports"),
    path("exports/usage.csv", manage_views.export_csv, name="export_csv"),
    path("exports/jobs/<int:job_id>/", manage_views.export_job, name="export_job"),
    path("members/", members.members, name="members"),
    path("members/<int:member_id>/role/", members.member_role, name="member_role"),
    path("members/<int:member_id>/remove/", members.member_remove, name="member_remove"),
]

urlpatterns = [
    path("", views.home, name="home"),
    path("t/<slug:tenant_slug>/", include(tenant_patterns)),
]
