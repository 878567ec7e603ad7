from django.conf import settings
from django.db import migrations, models
from django.db.models import F


def verify_existing_tenants(apps, schema_editor):
    """Tenants from before email verification keep working: they count as verified."""
    Tenant = apps.get_model("tenants", "Tenant")
    Tenant.objects.filter(email_verified_at__isnull=True).update(email_verified_at=F("created_at"))


def limit_an_open_free_tier(apps, schema_editor):
    """A free tier with no limit at all, not managed by Stripe, gets the settings' free-tier
    limits, and its tenants the monthly budget that comes with it (as plan_apply does).

    A free tier an operator or Stripe gave any limit is left as it is.
    """
    Tier = apps.get_model("tenants", "Tier")
    Budget = apps.get_model("tenants", "Budget")
    Tenant = apps.get_model("tenants", "Tenant")
    free = Tier.objects.filter(
        slug="free",
        stripe_product_id="",
        monthly_budget_nanos__isnull=True,
        requests_per_minute__isnull=True,
        tokens_per_minute__isnull=True,
    ).first()
    if free is None or free.allowed_models:
        return
    free.monthly_budget_nanos = settings.CASCADEFLOW_FREE_TIER_MONTHLY_BUDGET_NANOS
    free.requests_per_minute = settings.CASCADEFLOW_FREE_TIER_RPM
    free.allowed_models = list(settings.CASCADEFLOW_FREE_TIER_MODELS)
    free.save(update_fields=["monthly_budget_nanos", "requests_per_minute", "allowed_models"])
    if free.monthly_budget_nanos is None:
        return
    for tenant_id in Tenant.objects.filter(tier=free).values_list("pk", flat=True):
        Budget.objects.get_or_create(
            tenant_id=tenant_id,
            from_plan=True,
            defaults={"scope": "tenant", "period": "month", "limit_nanos": free.monthly_budget_nanos},
        )


class Migration(migrations.Migration):
    dependencies = [
        ("tenants", "0007_outbox"),
    ]

    operations = [
        migrations.AddField(
            model_name="tenant",
            name="email_verified_at",
            field=models.DateTimeField(blank=True, null=True),
        ),
        migrations.RunPython(verify_existing_tenants, migrations.RunPython.noop),
        migrations.RunPython(limit_an_open_free_tier, migrations.RunPython.noop),
    ]
