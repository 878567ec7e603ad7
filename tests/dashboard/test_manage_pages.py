"""Admin pages of the dashboard: tokens, budgets and alerts, end-user tiers, billing, exports."""

import csv
import io
from datetime import UTC, datetime

import pytest
from django.utils import timezone

from billing.models import ExportJob
from tenants.budgets import period_bounds
from tenants.enums import BudgetPeriod, BudgetScope, MemberRole, Scope
from tenants.models import (
    ApiToken,
    AuditEvent,
    Budget,
    BudgetAlert,
    BudgetCounter,
    EndUserTier,
)
from tenants.services import budget_create, token_create, token_hash
from tests.factories import EndUserFactory, TierFactory, UsageEventFactory
from tests.factories import member_login as login

pytestmark = pytest.mark.django_db


def url(tenant, path=""):
    return f"/dashboard/t/{tenant.slug}/{path}"


def budget(tenant, limit_nanos=10 * 10**9, **kwargs):
    return budget_create(
        tenant=tenant,
        scope=kwargs.pop("scope", BudgetScope.TENANT),
        period=kwargs.pop("period", BudgetPeriod.MONTH),
        limit_nanos=limit_nanos,
        **kwargs,
    )


def usage(tenant, request_id, created_at, cost_nanos=1_000_000):
    return UsageEventFactory(
        tenant=tenant,
        request_id=request_id,
        created_at=created_at,
        cost_nanos=cost_nanos,
        baseline_cost_nanos=0,
    )


def csv_rows(response):
    body = b"".join(response.streaming_content).decode()
    return list(csv.reader(io.StringIO(body)))


# --- tokens ----------------------------------------------------------------------------


def test_a_new_token_is_shown_once_and_hashes_to_the_stored_token(client, tenant):
    user = login(client, tenant, MemberRole.ADMIN)

    created = client.post(
        url(tenant, "tokens/"),
        {"name": "ci", "scopes": [Scope.COMPLETIONS, Scope.USAGE_READ], "expires_on": ""},
    )

    assert created.status_code == 302
    assert created["Location"] == url(tenant, "tokens/")
    token = ApiToken.objects.get(tenant=tenant, name="ci")
    assert token.scopes == [Scope.COMPLETIONS, Scope.USAGE_READ]
    assert token.created_by == user
    page = client.get(url(tenant, "tokens/"))
    raw = page.context["new_token"]["raw"]
    assert raw.startswith("cf_")
    assert token_hash(raw) == token.token_hash
    assert raw.encode() in page.content
    assert "no-store" in page["Cache-Control"]
    assert AuditEvent.objects.filter(tenant=tenant, action="token.create", actor=user).exists()

    reloaded = client.get(url(tenant, "tokens/"))

    assert reloaded.status_code == 200
    assert raw.encode() not in reloaded.content
    assert token.mask.encode() in reloaded.content


def test_token_create_validates_and_saves_nothing_when_invalid(client, tenant):
    login(client, tenant, MemberRole.ADMIN)

    page = client.post(url(tenant, "tokens/"), {"name": "ci", "expires_on": "2001-01-01"})

    assert page.status_code == 200
    assert page.context["form"].errors.keys() == {"scopes", "expires_on"}
    assert not ApiToken.objects.filter(tenant=tenant).exists()


def test_token_expiry_is_the_end_of_the_day_in_the_tenant_time_zone(client, tenant):
    tenant.time_zone = "Europe/Paris"
    tenant.save()
    login(client, tenant, MemberRole.OWNER)

    client.post(
        url(tenant, "tokens/"),
        {"name": "temp", "scopes": [Scope.COMPLETIONS], "expires_on": "2099-07-01"},
    )

    token = ApiToken.objects.get(tenant=tenant, name="temp")
    assert token.expires_at == datetime(2099, 7, 1, 22, 0, tzinfo=UTC)  # midnight CEST


def test_revoke_a_token_and_another_tenants_token_is_404(client, tenant, other_tenant):
    login(client, tenant, MemberRole.ADMIN)
    mine = token_create(tenant=tenant, name="mine").token
    theirs = token_create(tenant=other_tenant, name="theirs").token

    revoked = client.post(url(tenant, f"tokens/{mine.pk}/revoke/"))
    cross = client.post(url(tenant, f"tokens/{theirs.pk}/revoke/"))

    assert revoked.status_code == 302
    mine.refresh_from_db()
    assert mine.revoked_at is not None
    assert AuditEvent.objects.filter(tenant=tenant, action="token.revoke").count() == 1
    assert cross.status_code == 404
    theirs.refresh_from_db()
    assert theirs.revoked_at is None
    assert client.get(url(tenant, f"tokens/{mine.pk}/revoke/")).status_code == 405
    assert b"revoked" in client.get(url(tenant, "tokens/")).content


def test_viewers_may_not_see_or_create_tokens(client, tenant):
    login(client, tenant, MemberRole.VIEWER)
    token = token_create(tenant=tenant, name="mine").token

    assert client.get(url(tenant, "tokens/")).status_code == 403
    assert (
        client.post(url(tenant, "tokens/"), {"name": "x", "scopes": ["admin"]}).status_code == 403
    )
    assert client.post(url(tenant, f"tokens/{token.pk}/revoke/")).status_code == 403
    assert list(ApiToken.objects.filter(tenant=tenant)) == [token]
    token.refresh_from_db()
    assert token.revoked_at is None


def test_token_list_has_an_empty_state(client, tenant):
    login(client, tenant, MemberRole.ADMIN)

    assert b"No API tokens yet" in client.get(url(tenant, "tokens/")).content


# --- budgets ---------------------------------------------------------------------------


def test_admin_creates_a_budget_in_dollars_stored_as_nanos(client, tenant):
    user = login(client, tenant, MemberRole.ADMIN)

    response = client.post(
        url(tenant, "budgets/"),
        {
            "scope": BudgetScope.TENANT,
            "period": BudgetPeriod.DAY,
            "limit_usd": "12.50",
            "warn_pct": "50",
            "block_pct": "120",
        },
    )

    assert response.status_code == 302
    created = Budget.objects.get(tenant=tenant)
    assert (created.limit_nanos, created.period) == (12_500_000_000, BudgetPeriod.DAY)
    assert (created.warn_pct, created.degrade_pct, created.block_pct) == (50, None, 120)
    assert AuditEvent.objects.filter(tenant=tenant, action="budget.create", actor=user).exists()


@pytest.mark.parametrize(
    ("data", "field"),
    [
        ({"limit_usd": "-1"}, "limit_usd"),
        ({"limit_usd": "lots"}, "limit_usd"),
        ({"limit_usd": "5", "warn_pct": "95", "degrade_pct": "90"}, "__all__"),
        ({"limit_usd": "5", "block_pct": "0"}, "block_pct"),
        ({"limit_usd": "5", "scope": BudgetScope.END_USER, "end_user": "nobody"}, "end_user"),
        ({"limit_usd": "5", "scope": BudgetScope.TIER}, "tier"),
    ],
)
def test_budget_create_validates_and_saves_nothing(client, tenant, data, field):
    login(client, tenant, MemberRole.ADMIN)

    page = client.post(
        url(tenant, "budgets/"),
        {"scope": BudgetScope.TENANT, "period": BudgetPeriod.MONTH, **data},
    )

    assert page.status_code == 200
    assert field in page.context["form"].errors
    assert not Budget.objects.filter(tenant=tenant).exists()


def test_a_budget_cannot_target_another_tenants_token(client, tenant, other_tenant):
    login(client, tenant, MemberRole.ADMIN)
    theirs = token_create(tenant=other_tenant, name="theirs").token

    page = client.post(
        url(tenant, "budgets/"),
        {"scope": BudgetScope.TOKEN, "period": "month", "limit_usd": "1", "token": theirs.pk},
    )

    assert "token" in page.context["form"].errors
    assert not Budget.objects.exists()


def test_budget_for_an_end_user_by_their_id(client, tenant):
    login(client, tenant, MemberRole.ADMIN)
    end_user = EndUserFactory(tenant=tenant, external_id="alice")

    client.post(
        url(tenant, "budgets/"),
        {"scope": BudgetScope.END_USER, "period": "week", "limit_usd": "3", "end_user": "alice"},
    )

    assert Budget.objects.get(tenant=tenant).end_user == end_user


def test_the_budget_form_names_its_choices_and_ties_each_target_to_its_scope(client, tenant):
    login(client, tenant, MemberRole.ADMIN)

    body = client.get(url(tenant, "budgets/")).content.decode()

    assert "---------" not in body and "`" not in body
    assert "Choose a tier…" in body and "Choose an API token…" in body
    assert "<code>user</code>" in body
    assert "data-scope-select" in body
    for scope, field in (("tier", "tier"), ("end_user", "end_user"), ("token", "token")):
        assert f'data-scope-field="{scope}"' in body and f'id="id_{field}"' in body
    assert "dashboard/forms.js" in body
    assert "Scope:" not in body  # labels without a trailing colon


def test_dates_in_tables_never_break_inside_a_value(client, tenant):
    login(client, tenant, MemberRole.ADMIN)
    token_create(tenant=tenant, name="ci")

    body = client.get(url(tenant, "tokens/")).content.decode()

    assert '<time datetime="' in body and '<span class="nowrap">' in body


def test_viewer_reads_budgets_but_cannot_change_them(client, tenant):
    login(client, tenant, MemberRole.VIEWER)
    existing = budget(tenant)

    page = client.get(url(tenant, "budgets/"))
    create = client.post(
        url(tenant, "budgets/"), {"scope": "tenant", "period": "month", "limit_usd": "1"}
    )
    edit = client.post(url(tenant, f"budgets/{existing.pk}/"), {"limit_usd": "999"})
    delete = client.post(url(tenant, f"budgets/{existing.pk}/delete/"))

    assert page.status_code == 200
    assert page.context["form"] is None
    assert b"Add a budget" not in page.content
    assert b"$10.00" in page.content
    assert (create.status_code, edit.status_code, delete.status_code) == (403, 403, 403)
    assert list(Budget.objects.filter(tenant=tenant)) == [existing]
    existing.refresh_from_db()
    assert existing.limit_nanos == 10 * 10**9


def test_edit_a_budget_and_audit_the_change(client, tenant):
    user = login(client, tenant, MemberRole.ADMIN)
    existing = budget(tenant, warn_pct=80)

    form = client.get(url(tenant, f"budgets/{existing.pk}/"))
    saved = client.post(
        url(tenant, f"budgets/{existing.pk}/"),
        {"limit_usd": "25", "warn_pct": "70", "degrade_pct": "", "block_pct": "110"},
    )

    assert form.status_code == 200
    assert form.context["form"].initial["limit_usd"] == "10"
    assert saved.status_code == 302
    existing.refresh_from_db()
    assert (existing.limit_nanos, existing.warn_pct, existing.block_pct) == (25 * 10**9, 70, 110)
    event = AuditEvent.objects.get(tenant=tenant, action="budget.update")
    assert event.actor == user
    assert event.data == {"limit_nanos": 25 * 10**9, "warn_pct": 70, "block_pct": 110}


@pytest.mark.parametrize(
    "data",
    [
        {"limit_usd": "-5"},
        {"limit_usd": ""},
        {"limit_usd": "5", "warn_pct": "100", "block_pct": "90"},
        {"limit_usd": "5", "degrade_pct": "1001"},
    ],
)
def test_budget_edit_validates_and_changes_nothing(client, tenant, data):
    login(client, tenant, MemberRole.ADMIN)
    existing = budget(tenant)

    page = client.post(url(tenant, f"budgets/{existing.pk}/"), data)

    assert page.status_code == 200
    assert page.context["form"].errors
    existing.refresh_from_db()
    assert (existing.limit_nanos, existing.warn_pct, existing.block_pct) == (10 * 10**9, None, None)
    assert not AuditEvent.objects.filter(action="budget.update").exists()


def test_delete_a_budget_and_another_tenants_budget_is_404(client, tenant, other_tenant):
    login(client, tenant, MemberRole.ADMIN)
    mine, theirs = budget(tenant), budget(other_tenant)

    assert client.get(url(tenant, f"budgets/{theirs.pk}/")).status_code == 404
    assert client.post(url(tenant, f"budgets/{theirs.pk}/"), {"limit_usd": "1"}).status_code == 404
    assert client.post(url(tenant, f"budgets/{theirs.pk}/delete/")).status_code == 404
    assert client.post(url(tenant, f"budgets/{mine.pk}/delete/")).status_code == 302

    assert not Budget.objects.filter(pk=mine.pk).exists()
    assert Budget.objects.filter(pk=theirs.pk, limit_nanos=10 * 10**9).exists()
    assert AuditEvent.objects.filter(tenant=tenant, action="budget.delete").count() == 1


def test_the_plan_budget_is_read_only_here(client, tenant):
    login(client, tenant, MemberRole.ADMIN)
    plan = Budget.objects.create(
        tenant=tenant, scope="tenant", period="month", limit_nanos=5 * 10**9, from_plan=True
    )

    client.post(url(tenant, f"budgets/{plan.pk}/"), {"limit_usd": "5000"})
    client.post(url(tenant, f"budgets/{plan.pk}/delete/"))

    plan.refresh_from_db()
    assert plan.limit_nanos == 5 * 10**9


def test_budgets_show_this_periods_spend_and_the_alert_history(client, tenant, other_tenant):
    login(client, tenant, MemberRole.VIEWER)
    monthly = budget(tenant, limit_nanos=10 * 10**9)
    start, end = period_bounds("month", timezone.now(), tenant.time_zone)
    BudgetCounter.objects.create(
        tenant=tenant, budget=monthly, period_start=start, period_end=end, spent_nanos=4 * 10**9
    )
    BudgetCounter.objects.create(  # last month's counter is not this period's spend
        tenant=tenant,
        budget=monthly,
        period_start=datetime(2001, 1, 1, tzinfo=UTC),
        spent_nanos=9 * 10**9,
    )
    older = BudgetAlert.objects.create(
        tenant=tenant,
        budget=monthly,
        period_start=start,
        level="warn",
        spent_nanos=8 * 10**9,
        limit_nanos=10 * 10**9,
    )
    newer = BudgetAlert.objects.create(
        tenant=tenant,
        budget=monthly,
        period_start=start,
        level="block",
        spent_nanos=10 * 10**9,
        limit_nanos=10 * 10**9,
    )
    BudgetAlert.objects.create(
        tenant=other_tenant,
        budget=budget(other_tenant),
        period_start=start,
        level="degrade",
        spent_nanos=123_456 * 10**9,
        limit_nanos=1,
    )

    page = client.get(url(tenant, "budgets/"))

    (row,) = page.context["rows"]
    assert (row.status.spent_nanos, row.status.used_pct, row.status.state) == (4 * 10**9, 40, "ok")
    assert [a.pk for a in page.context["alerts"]] == [newer.pk, older.pk]
    assert b"$4.00" in page.content
    assert b"$123,456.00" not in page.content


def test_alert_history_pages_by_fifty(client, tenant):
    login(client, tenant, MemberRole.VIEWER)
    monthly = budget(tenant)
    BudgetAlert.objects.bulk_create(
        BudgetAlert(
            tenant=tenant,
            budget=monthly,
            period_start=datetime(2026, 1, 1, tzinfo=UTC),
            subject_id=i,
            level="warn",
            spent_nanos=i,
            limit_nanos=100,
        )
        for i in range(51)
    )

    first = client.get(url(tenant, "budgets/"))
    second = client.get(url(tenant, "budgets/?page=2"))

    assert len(first.context["alerts"].object_list) == 50
    assert len(second.context["alerts"].object_list) == 1


def test_budgets_page_empty_states(client, tenant):
    login(client, tenant, MemberRole.ADMIN)

    page = client.get(url(tenant, "budgets/"))

    assert b"No budgets yet" in page.content
    assert b"No alerts so far" in page.content


# --- end-user tiers --------------------------------------------------------------------


def test_set_an_end_users_tier(client, tenant):
    user = login(client, tenant, MemberRole.ADMIN)
    end_user = EndUserFactory(tenant=tenant, external_id="bob")
    pro = EndUserTier.objects.create(tenant=tenant, slug="pro", name="Pro")

    response = client.post(url(tenant, f"end-users/{end_user.pk}/tier/"), {"tier": pro.pk})

    assert response.status_code == 302
    assert response["Location"] == url(tenant, "end-users/")
    end_user.refresh_from_db()
    assert end_user.tier == pro
    event = AuditEvent.objects.get(tenant=tenant, action="end_user.tier")
    assert (event.actor, event.target, event.data) == (user, "bob", {"from": None, "to": "pro"})

    client.post(url(tenant, f"end-users/{end_user.pk}/tier/"), {"tier": ""})

    end_user.refresh_from_db()
    assert end_user.tier is None


def test_end_user_tier_of_another_tenant_is_404(client, tenant, other_tenant):
    login(client, tenant, MemberRole.ADMIN)
    mine = EndUserFactory(tenant=tenant)
    theirs = EndUserFactory(tenant=other_tenant)
    my_tier = EndUserTier.objects.create(tenant=tenant, slug="pro", name="Pro")
    their_tier = EndUserTier.objects.create(tenant=other_tenant, slug="pro", name="Pro")

    assert (
        client.post(url(tenant, f"end-users/{theirs.pk}/tier/"), {"tier": my_tier.pk}).status_code
        == 404
    )
    assert (
        client.post(url(tenant, f"end-users/{mine.pk}/tier/"), {"tier": their_tier.pk}).status_code
        == 404
    )
    mine.refresh_from_db()
    theirs.refresh_from_db()
    assert (mine.tier, theirs.tier) == (None, None)


def test_viewer_cannot_set_a_tier(client, tenant):
    login(client, tenant, MemberRole.VIEWER)
    end_user = EndUserFactory(tenant=tenant)
    pro = EndUserTier.objects.create(tenant=tenant, slug="pro", name="Pro")

    assert (
        client.post(url(tenant, f"end-users/{end_user.pk}/tier/"), {"tier": pro.pk}).status_code
        == 403
    )
    end_user.refresh_from_db()
    assert end_user.tier is None


# --- billing ---------------------------------------------------------------------------


def test_billing_page_is_for_owners(client, tenant):
    starter = TierFactory(slug="starter", name="Starter")
    pro = TierFactory(slug="pro", name="Pro", stripe_price_ids=["price_pro"])
    tenant.tier = starter
    tenant.save()

    login(client, tenant, MemberRole.ADMIN)
    assert client.get(url(tenant, "billing/")).status_code == 403

    login(client, tenant, MemberRole.OWNER)
    page = client.get(url(tenant, "billing/"))

    assert page.status_code == 200
    assert page.context["plan"] == starter
    assert set(page.context["plans"]) == {starter, pro}
    assert f'action="/billing/{tenant.slug}/checkout/pro/"'.encode() in page.content
    assert f"/billing/{tenant.slug}/checkout/starter/".encode() not in page.content  # current


def test_checkout_by_an_admin_is_now_forbidden(client, tenant):
    TierFactory(slug="pro", name="Pro", stripe_price_ids=["price_pro"])
    login(client, tenant, MemberRole.ADMIN)

    assert client.post(f"/billing/{tenant.slug}/checkout/pro/").status_code == 403
    assert client.post(f"/billing/{tenant.slug}/portal/").status_code == 403


# --- exports ---------------------------------------------------------------------------


def test_csv_export_streams_only_this_tenants_rows_in_its_time_zone(client, tenant, other_tenant):
    tenant.time_zone = "America/New_York"
    tenant.save()
    login(client, tenant, MemberRole.VIEWER)
    usage(tenant, "req_before", datetime(2026, 3, 1, 4, 59, tzinfo=UTC))  # Feb 28, 23:59 EST
    usage(tenant, "req_first", datetime(2026, 3, 1, 5, 0, tzinfo=UTC), cost_nanos=1_500_000_000)
    usage(tenant, "req_last", datetime(2026, 4, 1, 3, 59, tzinfo=UTC))  # Mar 31, 23:59 EDT
    usage(tenant, "req_after", datetime(2026, 4, 1, 4, 0, tzinfo=UTC))
    usage(other_tenant, "req_theirs", datetime(2026, 3, 10, tzinfo=UTC))

    response = client.get(url(tenant, "exports/usage.csv?start=2026-03-01&end=2026-03-31"))

    assert response.status_code == 200
    assert response.streaming
    assert response["Content-Type"] == "text/csv; charset=utf-8"
    assert response["Content-Disposition"].startswith("attachment; filename=")
    header, *rows = csv_rows(response)
    assert header[:2] == ["timestamp_utc", "request_id"]
    assert [r[1] for r in rows] == ["req_first", "req_last"]
    assert rows[0][header.index("cost_usd")] == "1.500000000"


def test_grouped_and_focus_exports(client, tenant):
    login(client, tenant, MemberRole.VIEWER)
    usage(tenant, "req_1", datetime(2026, 3, 2, 12, tzinfo=UTC))
    usage(tenant, "req_2", datetime(2026, 3, 2, 13, tzinfo=UTC))

    grouped = csv_rows(
        client.get(url(tenant, "exports/usage.csv?start=2026-03-01&end=2026-03-31&group_by=model"))
    )
    focus = csv_rows(
        client.get(url(tenant, "exports/usage.csv?start=2026-03-01&end=2026-03-31&focus=1"))
    )

    assert grouped[0][0] == "group"
    assert grouped[1][:3] == ["model", "demo/small", "2"]
    assert focus[0][0] == "ChargePeriodStart"
    assert len(focus) == 3


def test_grouping_by_day_uses_the_tenants_days(client, tenant):
    tenant.time_zone = "America/New_York"
    tenant.save()
    login(client, tenant, MemberRole.VIEWER)
    usage(tenant, "req_late", datetime(2026, 3, 3, 3, 30, tzinfo=UTC))  # 2 March, 22:30 EST
    usage(tenant, "req_next", datetime(2026, 3, 3, 12, tzinfo=UTC))

    grouped = csv_rows(
        client.get(url(tenant, "exports/usage.csv?start=2026-03-01&end=2026-03-31&group_by=day"))
    )

    assert [row[1:3] for row in grouped[1:]] == [["2026-03-02", "1"], ["2026-03-03", "1"]]


@pytest.mark.parametrize(
    "query",
    [
        "start=2026-03-31&end=2026-03-01",
        "start=2025-01-01&end=2026-12-31",
        "start=yesterday&end=2026-03-01",
        "start=2026-03-01&end=2026-03-02&group_by=week",
    ],
)
def test_an_invalid_export_range_shows_an_error(client, tenant, query):
    login(client, tenant, MemberRole.VIEWER)
    usage(tenant, "req_1", datetime(2026, 3, 2, tzinfo=UTC))

    response = client.get(url(tenant, f"exports/usage.csv?{query}"))

    assert response.status_code == 400
    assert not response.streaming
    assert response.context["form"].errors
    assert b'class="errorlist' in response.content


def test_export_form_posts_redirect_to_the_download_or_show_errors(client, tenant):
    login(client, tenant, MemberRole.VIEWER)

    page = client.get(url(tenant, "exports/"))
    download = client.post(
        url(tenant, "exports/"),
        {"start": "2026-03-01", "end": "2026-03-31", "action": "download"},
    )
    invalid = client.post(
        url(tenant, "exports/"),
        {"start": "2026-03-31", "end": "2026-03-01", "action": "download"},
    )

    assert page.status_code == 200
    assert page.context["form"].initial["start"].day == 1
    assert b"No background exports yet" in page.content
    assert download.status_code == 302
    assert download["Location"] == url(tenant, "exports/usage.csv?start=2026-03-01&end=2026-03-31")
    assert invalid.status_code == 200
    assert "end" in invalid.context["form"].errors
    assert b"must not be before the start date" in invalid.content


def test_background_export_job_shows_progress_then_a_signed_link(
    client, tenant, other_tenant, settings, tmp_path, django_capture_on_commit_callbacks
):
    settings.VAR_DIR = tmp_path
    login(client, tenant, MemberRole.VIEWER)
    usage(tenant, "req_1", datetime(2026, 3, 2, tzinfo=UTC))
    usage(tenant, "req_2", datetime(2026, 3, 3, tzinfo=UTC))
    usage(other_tenant, "req_theirs", datetime(2026, 3, 3, tzinfo=UTC))

    with django_capture_on_commit_callbacks(execute=False) as callbacks:
        created = client.post(
            url(tenant, "exports/"),
            {"start": "2026-03-01", "end": "2026-03-31", "action": "background"},
        )
    job = ExportJob.objects.get(tenant=tenant)
    assert created.status_code == 302
    assert created["Location"] == url(tenant, f"exports/jobs/{job.pk}/")
    queued = client.get(url(tenant, f"exports/jobs/{job.pk}/"))
    assert queued.context["job"].status == "queued"
    assert queued.context["download_url"] is None
    assert b'http-equiv="refresh"' in queued.content

    for callback in callbacks:  # the Celery task (eager in tests) runs after the commit
        callback()
    done = client.get(url(tenant, f"exports/jobs/{job.pk}/"))

    assert done.context["job"].status == "done"
    assert done.context["progress"] == 100
    assert b"2 of 2 rows" in done.content
    assert b'http-equiv="refresh"' not in done.content
    download = client.get(done.context["download_url"])
    body = b"".join(download.streaming_content).decode()
    download.close()
    assert download.status_code == 200
    assert "req_1" in body and "req_2" in body and "req_theirs" not in body


def test_background_export_rejects_grouping(client, tenant):
    login(client, tenant, MemberRole.VIEWER)

    page = client.post(
        url(tenant, "exports/"),
        {"start": "2026-03-01", "end": "2026-03-02", "group_by": "day", "action": "background"},
    )

    assert "group_by" in page.context["form"].errors
    assert not ExportJob.objects.exists()


def test_another_tenants_export_job_is_404(client, tenant, other_tenant):
    login(client, tenant, MemberRole.OWNER)
    theirs = ExportJob.objects.create(
        tenant=other_tenant,
        start=datetime(2026, 3, 1, tzinfo=UTC),
        end=datetime(2026, 3, 2, tzinfo=UTC),
    )

    assert client.get(url(tenant, f"exports/jobs/{theirs.pk}/")).status_code == 404


def test_a_large_range_becomes_a_background_job(client, tenant, settings, tmp_path):
    settings.VAR_DIR = tmp_path
    settings.CASCADEFLOW_EXPORT_SYNC_MAX_ROWS = 1
    login(client, tenant, MemberRole.VIEWER)
    usage(tenant, "req_1", datetime(2026, 3, 2, tzinfo=UTC))
    usage(tenant, "req_2", datetime(2026, 3, 3, tzinfo=UTC))

    response = client.get(url(tenant, "exports/usage.csv?start=2026-03-01&end=2026-03-31"))

    job = ExportJob.objects.get(tenant=tenant)
    assert response.status_code == 302
    assert response["Location"] == url(tenant, f"exports/jobs/{job.pk}/")
