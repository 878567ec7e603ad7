import json
from datetime import timedelta

import pytest
from django.utils import timezone

from dashboard.models import SpendForecastSnapshot
from dashboard.rollups import rollup_all
from routing.models import UsageEvent
from tenants.budgets import period_bounds
from tenants.enums import BudgetPeriod, BudgetScope, MemberRole
from tenants.models import Budget, BudgetCounter
from tests.factories import EndUserFactory, MemberFactory, UsageEventFactory, UserFactory

pytestmark = pytest.mark.django_db


@pytest.fixture
def member_client(client, tenant):
    user = UserFactory()
    MemberFactory(tenant=tenant, user=user, role=MemberRole.VIEWER)
    client.force_login(user)
    return client


def seed(tenant, days=10, per_day=6, end_user=None):
    now = timezone.now()
    n = 0
    for d in range(days):
        for i in range(per_day):
            n += 1
            UsageEventFactory(
                tenant=tenant,
                request_id=f"{tenant.slug}-{d}-{i}",
                created_at=now - timedelta(days=d, minutes=7 * i + 1),
                requested_model="cascade/balanced",
                model="demo/large" if i % 3 == 0 else "demo/small",
                models_called=["demo/small", "demo/large"] if i % 3 == 0 else ["demo/small"],
                escalated=i % 3 == 0,
                cost_nanos=2_000_000,
                baseline_cost_nanos=10_000_000,
                profile="balanced",
                domain="code" if i % 2 else "general",
                latency_ms=300,
                quality_score=0.9 if i % 3 else 0.6,
                end_user=end_user,
            )
    return n


def test_overview_shows_totals_figures_and_gauges(member_client, tenant, other_tenant):
    seed(tenant, per_day=12)
    seed(other_tenant, days=2)
    rollup_all()
    budget = Budget.objects.create(
        tenant=tenant, scope=BudgetScope.TENANT, period=BudgetPeriod.MONTH, limit_nanos=10**9
    )
    start, end = period_bounds(BudgetPeriod.MONTH, timezone.now(), tenant.time_zone)
    BudgetCounter.objects.create(
        tenant=tenant, budget=budget, period_start=start, period_end=end, spent_nanos=250_000_000
    )
    in_period = UsageEvent.objects.filter(tenant=tenant, created_at__gte=start)

    response = member_client.get(f"/dashboard/t/{tenant.slug}/")

    assert response.status_code == 200
    page = response.context["page"]
    assert page.totals.requests == in_period.count()
    assert page.totals.cost_nanos == 2_000_000 * in_period.count()
    assert page.totals.savings_nanos == 8_000_000 * in_period.count()
    figures = json.loads(page.figures_json)
    assert {"spend_hourly", "forecast", "escalation", "rpm", "spend_daily", "gauge_0"} <= set(
        figures
    )
    assert figures["gauge_0"]["data"][0]["value"] == 0.25
    assert (
        sum(figures["rpm"]["data"][0]["y"])
        == UsageEvent.objects.filter(
            tenant=tenant, created_at__gte=timezone.now() - timedelta(minutes=60)
        ).count()
    )
    # Quality and escalation pooled over trailing hours: every drawn point lies between
    # the seed's per-request extremes (0.6 and 0.9 quality; a third escalated).
    escalation = {t["name"]: t for t in figures["escalation"]["data"]}
    quality = [q for q in escalation["Estimated quality"]["y"] if q is not None]
    escalated = [e for e in escalation["Escalated"]["y"] if e is not None]
    assert quality and all(60 <= q <= 90 for q in quality)
    assert escalated and all(0 <= e <= 100 for e in escalated)
    assert figures["gauge_0"]["state"] == "ok"
    snap = SpendForecastSnapshot.objects.get(tenant=tenant, end_user_id=0)
    traces = {t.get("name"): t for t in figures["forecast"]["data"]}
    assert traces["Forecast"]["y"][-1] == pytest.approx(snap.expected_nanos / 1e9)
    band = traces["80% interval"]["y"]  # high along the path, then low back
    assert band[len(band) // 2 - 1] == pytest.approx(snap.high_nanos / 1e9)
    assert band[len(band) // 2] == pytest.approx(snap.low_nanos / 1e9)
    body = response.content.decode()
    assert 'data-testid="requests-count"' in body and "vendor/plotly.min.js" in body
    assert other_tenant.name not in body


def test_overview_of_a_new_tenant_has_an_empty_state(member_client, tenant):
    response = member_client.get(f"/dashboard/t/{tenant.slug}/")

    assert response.status_code == 200
    assert b'data-testid="empty-state"' in response.content


def test_models_page_breaks_down_by_model_profile_and_domain(member_client, tenant):
    seed(tenant, days=1)
    rollup_all()

    page = member_client.get(f"/dashboard/t/{tenant.slug}/models/?range=24h").context["page"]

    by_model = dict(page.by_model)
    assert by_model["demo/large"].escalated == by_model["demo/large"].requests == 2
    assert dict(page.by_draft)["demo/small"].acceptance_pct == pytest.approx(100 * 4 / 6)
    assert set(dict(page.by_domain)) == {"code", "general"}
    assert dict(page.by_model)["demo/small"].quality_pct == pytest.approx(90.0)
    assert dict(page.by_profile)["balanced"].quality_pct == pytest.approx(
        100 * (4 * 0.9 + 2 * 0.6) / 6
    )
    assert 300 <= dict(page.by_profile)["balanced"].latency_pct(0.5) < 500  # its bucket


def test_end_users_page_lists_top_spenders_with_forecasts(member_client, tenant):
    user = EndUserFactory(tenant=tenant, external_id="alice")
    seed(tenant, days=8, end_user=user)
    rollup_all()
    from dashboard.services import forecasts_refresh

    forecasts_refresh(tenant)

    response = member_client.get(f"/dashboard/t/{tenant.slug}/end-users/")

    lines = response.context["lines"]
    assert lines[0].end_user == user and lines[0].forecast is not None
    assert b"alice" in response.content


def test_plotly_js_is_served_from_the_installed_package(client):
    from django.contrib.staticfiles import finders

    path = finders.find("vendor/plotly.min.js")

    assert path and path.endswith("plotly/package_data/plotly.min.js")


def test_a_forecast_alert_fires_once_when_the_budget_will_run_out(
    tenant, django_capture_on_commit_callbacks
):
    from dashboard.services import forecasts_refresh
    from tenants.models import BudgetAlert

    seed(tenant, days=20, per_day=6)  # 12 millicents a day
    rollup_all()
    budget = Budget.objects.create(
        tenant=tenant, scope=BudgetScope.TENANT, period=BudgetPeriod.MONTH, limit_nanos=30_000_000
    )

    with django_capture_on_commit_callbacks(execute=True):
        forecasts_refresh(tenant)
        forecasts_refresh(tenant)

    snap = SpendForecastSnapshot.objects.get(tenant=tenant, end_user_id=0)
    assert snap.limit_nanos == 30_000_000 and snap.exceed_probability >= 0.8
    alerts = BudgetAlert.objects.filter(budget=budget, level="forecast")
    assert alerts.count() == 1


def test_no_forecast_alert_when_the_budget_is_ample(tenant):
    from dashboard.services import forecasts_refresh
    from tenants.models import BudgetAlert

    seed(tenant, days=20, per_day=6)
    rollup_all()
    Budget.objects.create(
        tenant=tenant, scope=BudgetScope.TENANT, period=BudgetPeriod.MONTH, limit_nanos=10**12
    )

    forecasts_refresh(tenant)

    assert not BudgetAlert.objects.filter(tenant=tenant, level="forecast").exists()


def test_end_users_show_their_tier_budget_use_and_forecast_limit(member_client, tenant):
    from dashboard.services import forecasts_refresh
    from tenants.models import EndUserTier

    free = EndUserTier.objects.create(tenant=tenant, slug="free", name="Free")
    user = EndUserFactory(tenant=tenant, external_id="bob", tier=free)
    seed(tenant, days=8, end_user=user)
    rollup_all()
    budget = Budget.objects.create(
        tenant=tenant,
        scope=BudgetScope.TIER,
        tier=free,
        period=BudgetPeriod.MONTH,
        limit_nanos=100_000_000,
    )
    start, end = period_bounds(BudgetPeriod.MONTH, timezone.now(), tenant.time_zone)
    BudgetCounter.objects.create(
        tenant=tenant,
        budget=budget,
        subject_id=user.pk,
        period_start=start,
        period_end=end,
        spent_nanos=25_000_000,
    )
    forecasts_refresh(tenant)

    response = member_client.get(f"/dashboard/t/{tenant.slug}/end-users/")

    line = response.context["lines"][0]
    assert (line.budget, line.budget_spent_nanos, line.budget_used_pct) == (
        budget,
        25_000_000,
        25.0,
    )
    assert line.forecast.limit_nanos == 100_000_000
    assert "25% of $0.10" in response.content.decode()


def test_the_page_queues_a_missing_forecast_once_instead_of_fitting_it(
    member_client, tenant, monkeypatch
):
    from dashboard import tasks

    seed(tenant, days=10)
    rollup_all()
    queued = []
    monkeypatch.setattr(
        tasks.tenant_forecast_refresh, "apply_async", lambda args, **kw: queued.append(args)
    )

    first = member_client.get(f"/dashboard/t/{tenant.slug}/")
    second = member_client.get(f"/dashboard/t/{tenant.slug}/")

    assert queued == [(tenant.pk,)]  # once, however many views
    assert not SpendForecastSnapshot.objects.filter(tenant=tenant).exists()
    assert first.context["page"].forecast is None
    assert b"the forecast is being computed" in second.content
