from django.contrib import admin
from django.urls import include, path

from cascadeflow_site.health import healthz, readyz
from dashboard import accounts
from dashboard.views import favicon
from routing.metrics import metrics_view

urlpatterns = [
    path("v1/", include("routing.urls")),
    path("dashboard/", include("dashboard.urls")),
    path("billing/", include("billing.urls")),
    path("api/v1/", include("cascadeflow_site.api_urls")),
    path("accounts/signup/", accounts.signup, name="signup"),
    path("accounts/verify/", accounts.verify_pending, name="verify_pending"),
    path("accounts/verify/<str:token>/", accounts.verify_email, name="verify_email"),
    path("accounts/", include("django.contrib.auth.urls")),
    path("admin/", admin.site.urls),
    path("healthz", healthz, name="healthz"),
    path("readyz", readyz, name="readyz"),
    path("metrics", metrics_view, name="metrics"),
    path("favicon.ico", favicon, name="favicon"),
]
