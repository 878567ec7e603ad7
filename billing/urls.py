from django.urls import path

from billing import views

app_name = "billing"

urlpatterns = [
    path("stripe/webhook/", views.stripe_webhook, name="stripe-webhook"),
    path("<slug:tenant_slug>/checkout/<slug:tier_slug>/", views.checkout, name="checkout"),
    path("<slug:tenant_slug>/portal/", views.portal, name="portal"),
]
