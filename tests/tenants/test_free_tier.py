"""The free tier self-serve tenants land on has a budget, a request rate and a model list."""

import importlib
import json
import os
import subprocess
import sys

import pytest
from django.apps import apps
from django.test import AsyncClient

from tenants.enums import BudgetPeriod, BudgetScope
from tenants.models import Budget, Tenant, Tier
from tenants.services import tenant_create, tier_ensure_defaults
from tests.factories import TenantFactory
from tests.settings import DEVELOPMENT_ENV
from tests.support.live_server import ROOT

DOLLAR = 10**9
DEMO_MODELS = ["demo/small", "demo/medium", "demo/large"]


@pytest.fixture
def production_free_tier(settings):
    """The production defaults (the suite's own environment lifts them)."""
    settings.CASCADEFLOW_FREE_TIER_MONTHLY_BUDGET_NANOS = 1 * DOLLAR
    settings.CASCADEFLOW_FREE_TIER_RPM = 20
    settings.CASCADEFLOW_FREE_TIER_MODELS = DEMO_MODELS


def test_production_defaults_are_one_dollar_twenty_rpm_and_the_demo_models(tmp_path):
    env = {k: v for k, v in os.environ.items() if k not in DEVELOPMENT_ENV}
    env.update(
        DJANGO_SETTINGS_MODULE="cascadeflow_site.settings",
        DJANGO_SECRET_KEY="k" * 50,
        CASCADEFLOW_VAR_DIR=str(tmp_path),
    )
    code = (
        "import django, json; django.setup(); from django.conf import settings as s; "
        "print(json.dumps([s.CASCADEFLOW_FREE_TIER_MONTHLY_BUDGET_NANOS, "
        "s.CASCADEFLOW_FREE_TIER_RPM, s.CASCADEFLOW_FREE_TIER_MODELS, s.CASCADEFLOW_SIGNUP_RATE]))"
    )

    result = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, check=False
    )

    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout) == [DOLLAR, 20, DEMO_MODELS, "5/hour"]


@pytest.mark.django_db
def test_the_free_tier_is_created_with_its_limits(production_free_tier):
    free = tier_ensure_defaults()

    assert (free.slug, free.is_default) == ("free", True)
    assert free.monthly_budget_nanos == DOLLAR
    assert free.requests_per_minute == 20
    assert free.allowed_models == DEMO_MODELS


@pytest.mark.django_db
def test_a_tenant_on_the_free_tier_gets_its_monthly_budget(production_free_tier):
    tier_ensure_defaults()

    tenant = tenant_create(slug="newcomer", email_verified=False).tenant

    budget = Budget.objects.get(tenant=tenant)
    assert (budget.scope, budget.period, budget.limit_nanos, budget.from_plan) == (
        BudgetScope.TENANT,
        BudgetPeriod.MONTH,
        DOLLAR,
        True,
    )


@pytest.mark.django_db
def test_an_existing_free_tier_is_left_as_stripe_or_an_operator_set_it(production_free_tier):
    Tier.objects.create(slug="free", name="Free", is_default=True, requests_per_minute=100)

    free = tier_ensure_defaults()

    assert (free.requests_per_minute, free.monthly_budget_nanos, free.allowed_models) == (
        100,
        None,
        [],
    )


@pytest.mark.django_db
def test_stripe_plan_sync_still_sets_the_free_tiers_limits(production_free_tier):
    from billing.services import plan_from_product

    tier_ensure_defaults()

    plan_from_product(
        product={
            "id": "prod_free",
            "name": "Free",
            "metadata": {"cascadeflow_tier": "free", "rpm": "60", "monthly_budget_usd": "2"},
        }
    )

    free = Tier.objects.get(slug="free")
    assert (free.requests_per_minute, free.monthly_budget_nanos) == (60, 2 * DOLLAR)


@pytest.mark.django_db(transaction=True)
@pytest.mark.parametrize(("model", "status"), [("demo/small", 200), ("fake/gpt", 403)])
async def test_a_free_tenant_calls_only_the_allowed_models(
    production_free_tier, fake_models, model, status
):
    from asgiref.sync import sync_to_async

    def make():
        tier_ensure_defaults()
        return tenant_create(slug="freebie").issued.raw

    raw = await sync_to_async(make)()

    response = await AsyncClient().post(
        "/v1/chat/completions",
        data=json.dumps({"model": model, "messages": [{"role": "user", "content": "hi"}]}),
        content_type="application/json",
        headers={"Authorization": f"Bearer {raw}"},
    )

    assert response.status_code == status


def migration():
    return importlib.import_module("tenants.migrations.0008_tenant_email_verification")


@pytest.mark.django_db
def test_upgrading_limits_an_open_free_tier_and_budgets_its_tenants(production_free_tier):
    free = Tier.objects.create(slug="free", name="Free", is_default=True)
    on_free = TenantFactory(tier=free)
    elsewhere = TenantFactory()

    migration().limit_an_open_free_tier(apps, None)

    free.refresh_from_db()
    assert (free.monthly_budget_nanos, free.requests_per_minute, free.allowed_models) == (
        DOLLAR,
        20,
        DEMO_MODELS,
    )
    assert Budget.objects.get(tenant=on_free, from_plan=True).limit_nanos == DOLLAR
    assert not Budget.objects.filter(tenant=elsewhere).exists()


@pytest.mark.django_db
def test_upgrading_leaves_a_free_tier_someone_limited(production_free_tier):
    Tier.objects.create(slug="free", name="Free", is_default=True, allowed_models=["x/y"])

    migration().limit_an_open_free_tier(apps, None)

    assert Tier.objects.get(slug="free").monthly_budget_nanos is None


@pytest.mark.django_db
def test_upgrading_counts_existing_tenants_as_verified():
    tenant = TenantFactory(email_verified_at=None)

    migration().verify_existing_tenants(apps, None)

    tenant.refresh_from_db()
    assert tenant.email_verified_at == Tenant.objects.get(pk=tenant.pk).created_at
