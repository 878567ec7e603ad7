"""The demo's past (30 days of real cascades) and its present (the traffic simulator)."""

import json
import random
import threading
import time
from collections import Counter
from datetime import UTC, datetime, timedelta

import httpx
import pytest
from asgiref.sync import sync_to_async
from django.core.management import call_command
from django.db.models import Sum
from django.test import AsyncClient

from demo import history as demo_history
from demo import traffic
from routing.enums import AuditStatus, UsageKind, UsageStatus
from routing.models import (
    Audit,
    CalibrationVersion,
    ProfileLearning,
    RoutingProfile,
    UsageEvent,
)
from routing.selectors import audit_spend_total, profile_quality
from tenants.budgets import period_bounds
from tenants.enums import BudgetScope
from tenants.models import ApiToken, AuditEvent, Budget, BudgetCounter, EndUser, EndUserTier, Tenant
from tenants.services import (
    tenant_create,
    tenant_settings_update,
    tier_ensure_defaults,
    token_create,
)
from tests.support.live_server import free_port

pytestmark = pytest.mark.slow

NOW = datetime(2025, 3, 20, 15, 30, tzinfo=UTC)  # a Thursday afternoon
DAYS = 6
REQUESTS = 240


def make_tenant(slug="demo-history"):
    tier_ensure_defaults()
    return tenant_create(slug=slug, monthly_budget_nanos=250 * 10**9).tenant


@pytest.fixture
def history(db):
    tenant = make_tenant()
    report = demo_history.generate(tenant, days=DAYS, requests=REQUESTS, now=NOW)
    return tenant, report


def totals(tenant):
    rows = UsageEvent.objects.filter(tenant=tenant)
    agg = rows.aggregate(cost=Sum("cost_nanos"), baseline=Sum("baseline_cost_nanos"))
    return (
        rows.count(),
        rows.filter(escalated=True).count(),
        agg["cost"],
        agg["baseline"],
        sorted(Counter(rows.values_list("model", flat=True)).items()),
    )


def test_history_is_cascades_spread_over_the_days(history):
    tenant, report = history
    rows = UsageEvent.objects.filter(tenant=tenant, kind=UsageKind.REQUEST)
    assert rows.count() == REQUESTS == report.events
    times = list(rows.values_list("created_at", flat=True))
    assert min(times) >= NOW - timedelta(days=DAYS) and max(times) < NOW
    assert len({t.date() for t in times}) >= DAYS
    # Business hours are busier than nights.
    hours = Counter(t.hour for t in times)
    assert sum(hours[h] for h in range(9, 17)) > 3 * sum(hours[h] for h in range(0, 6))

    ok = rows.filter(status=UsageStatus.OK)
    assert ok.count() >= REQUESTS * 0.97
    escalated = ok.filter(escalated=True).count()
    assert 0.1 * ok.count() <= escalated <= 0.45 * ok.count()
    assert not ok.filter(cost_nanos__lte=0).exists()
    assert not ok.filter(latency_ms__lt=100).exists()  # the demo models' simulated latency
    assert {"demo/small", "demo/medium", "demo/large"} <= set(ok.values_list("model", flat=True))
    # The cascade explains itself: judged drafts carry their check.
    row = ok.filter(escalated=True).first()
    assert (
        row.expanded_attempts[0]["decision"] == "escalated"
        and row.expanded_attempts[0]["check"]["reasons"]
    )
    assert len(row.models_called) >= 2

    profiles = set(rows.values_list("profile", flat=True))
    assert {"cascade/support", "cascade/coding", "cascade/balanced"} <= profiles
    assert len(set(ok.exclude(domain="").values_list("domain", flat=True))) >= 3
    tiers = set(EndUser.objects.filter(usageevent__in=rows).values_list("tier__slug", flat=True))
    assert tiers == {"free", "pro"}
    assert RoutingProfile.objects.filter(tenant=tenant).count() >= 2
    assert report.escalated == escalated and report.cost_nanos == sum(
        rows.values_list("cost_nanos", flat=True)
    )


def test_history_is_deterministic_and_never_duplicated(history):
    tenant, _ = history
    first = totals(tenant)

    again = demo_history.generate(tenant, days=DAYS, requests=REQUESTS, now=NOW)
    assert again.skipped
    assert totals(tenant) == first

    # Replaced (stale, or forced): the same requests, answers and totals, not twice as many.
    demo_history.generate(tenant, days=DAYS, requests=REQUESTS, now=NOW + timedelta(days=3))
    assert totals(tenant) == first

    other = make_tenant("demo-history-2")
    demo_history.generate(other, days=DAYS, requests=REQUESTS, now=NOW, force=True)
    assert totals(other) == first


def test_live_rows_survive_a_history_refresh(history):
    tenant, _ = history
    live = UsageEvent.objects.filter(tenant=tenant).first()
    UsageEvent.objects.filter(pk=live.pk).update(request_id="req_live")
    demo_history.generate(tenant, days=DAYS, requests=REQUESTS, now=NOW, force=True)
    assert UsageEvent.objects.filter(tenant=tenant, request_id="req_live").exists()
    requests = UsageEvent.objects.filter(tenant=tenant, kind=UsageKind.REQUEST)
    assert requests.count() == REQUESTS + 1


def test_budget_counters_equal_the_ledger_for_the_current_period(history):
    tenant, report = history
    budgets = {b.scope: b for b in Budget.objects.filter(tenant=tenant)}
    assert set(budgets) == {BudgetScope.TENANT, BudgetScope.TIER, BudgetScope.END_USER}
    tenant_budget, free_budget = budgets[BudgetScope.TENANT], budgets[BudgetScope.TIER]
    assert free_budget.tier.slug == "free"
    start, end = period_bounds(tenant_budget.period, NOW, tenant.time_zone)
    in_period = UsageEvent.objects.filter(tenant=tenant, created_at__gte=start, created_at__lt=end)

    counter = BudgetCounter.objects.get(budget=tenant_budget, period_start=start)
    spent = in_period.aggregate(s=Sum("cost_nanos"))["s"]
    assert counter.spent_nanos == spent > 0 and counter.reserved_nanos == 0
    # Sized so the month is on pace for about its budget, and not blocked yet.
    assert spent < tenant_budget.limit_nanos
    assert report.tenant_budget_nanos == tenant_budget.limit_nanos

    free_users = EndUser.objects.filter(tenant=tenant, tier__slug="free")
    counters = {
        c.subject_id: c.spent_nanos
        for c in BudgetCounter.objects.filter(budget=free_budget, period_start=start)
    }
    expected = {
        u.pk: in_period.filter(end_user=u).aggregate(s=Sum("cost_nanos"))["s"] or 0
        for u in free_users
        if in_period.filter(end_user=u).exists()
    }
    assert counters == expected and expected
    assert max(expected.values()) < free_budget.limit_nanos
    assert not BudgetCounter.objects.filter(budget=free_budget).exclude(
        subject_id__in=free_users.values_list("pk", flat=True)
    )

    # A live request settled later keeps them equal; a recompute changes nothing.
    demo_history.budget_counters_recompute(tenant=tenant, now=NOW)
    assert BudgetCounter.objects.get(pk=counter.pk).spent_nanos == spent


def test_budgets_leave_the_simulator_a_month_and_give_the_trial_user_a_day(db):
    rate = 0.1
    tenant = make_tenant()
    report = demo_history.generate(tenant, days=DAYS, requests=REQUESTS, now=NOW, traffic_rate=rate)
    rows = UsageEvent.objects.filter(tenant=tenant)  # audits are spend too
    requests = rows.filter(kind=UsageKind.REQUEST)
    mean = requests.aggregate(s=Sum("cost_nanos"))["s"] / requests.count()
    simulated_day = rate * 86_400 * mean
    start, _ = period_bounds("month", NOW, tenant.time_zone)
    in_month = rows.filter(created_at__gte=start)

    # A month of the simulator, non-stop, stays under every warn threshold: the banner's
    # snippets never meet a 402 from the tenant's budget or a free end user's.
    tenant_budget = Budget.objects.get(tenant=tenant, scope=BudgetScope.TENANT)
    to_date = in_month.aggregate(s=Sum("cost_nanos"))["s"]
    assert to_date + 31 * simulated_day <= 0.8 * tenant_budget.limit_nanos
    free_budget = Budget.objects.get(tenant=tenant, scope=BudgetScope.TIER)
    for user, tier in traffic.END_USERS:
        if tier != "free" or user == traffic.TRIAL_USER:
            continue
        spent = in_month.filter(end_user__external_id=user).aggregate(s=Sum("cost_nanos"))["s"]
        month = (spent or 0) + 31 * simulated_day * traffic.user_share(user)
        assert month <= 0.8 * free_budget.limit_nanos, user
    # The trial user's own daily budget is a couple of hours of their simulated traffic.
    trial = Budget.objects.get(tenant=tenant, scope=BudgetScope.END_USER)
    assert (trial.end_user.external_id, trial.period) == (traffic.TRIAL_USER, "day")
    trial_hour = rate * 3_600 * traffic.user_share(traffic.TRIAL_USER) * mean
    assert trial_hour <= trial.limit_nanos <= 3 * trial_hour
    assert report.trial_budget_nanos == trial.limit_nanos

    # Without a simulator, the budgets fit the history alone.
    quiet = make_tenant("demo-history-quiet")
    demo_history.generate(quiet, days=DAYS, requests=REQUESTS, now=NOW)
    alone = Budget.objects.get(tenant=quiet, scope=BudgetScope.TENANT)
    assert alone.limit_nanos < tenant_budget.limit_nanos / 10


@pytest.mark.django_db(transaction=True)
async def test_the_trial_user_crosses_warn_and_degrade_then_is_refused():
    """What the live demo shows every day: the simulator's requests as the trial user
    (sent here back to back) cross the warn and degrade thresholds of their daily budget,
    each recorded once, then get 402s; the tenant's budget never objects."""
    from tenants.models import BudgetAlert

    tenant = await sync_to_async(make_tenant)()
    await sync_to_async(demo_history.generate)(tenant, days=2, requests=120, traffic_rate=0.1)
    await sync_to_async(tenant_settings_update)(tenant=tenant, audits_enabled=False)
    # Back to back here, ~40 an hour in the demo: the tier's rate limit stays out of it.
    await EndUserTier.objects.filter(tenant=tenant).aupdate(
        requests_per_minute=None, tokens_per_minute=None
    )
    issued = await sync_to_async(token_create)(tenant=tenant, name="check")
    trial = await Budget.objects.aget(tenant=tenant, scope=BudgetScope.END_USER)
    rng = random.Random(7)
    client = AsyncClient()
    statuses: list[str] = []
    for _ in range(400):
        request = traffic.sample_request(rng, users=((traffic.TRIAL_USER, "free"),))
        body = {**request.body, "stream": False}
        body.pop("stream_options", None)
        response = await client.post(
            "/v1/chat/completions",
            data=json.dumps(body),
            content_type="application/json",
            headers={"Authorization": f"Bearer {issued.raw}"},
        )
        if response.status_code == 402:
            statuses.append("402")
            break
        assert response.status_code == 200, response.content
        statuses.append(response.headers.get("x-cascade-budget", "allow"))
        message = response.headers.get("x-cascade-budget-message", "")
        assert "tenant" not in message  # only the trial user's daily budget speaks

    assert statuses[-1] == "402", statuses
    assert statuses[0] == "allow" and "warn" in statuses and "degrade" in statuses
    assert 10 <= len(statuses) <= 200
    alerts = [a async for a in BudgetAlert.objects.filter(budget=trial).order_by("pk")]
    assert [a.level for a in alerts] == ["warn", "degrade"]
    # Each recorded when spend crossed it, as the budgets table counts it.
    for alert, pct in zip(alerts, (80, 90), strict=True):
        assert alert.spent_nanos * 100 >= pct * alert.limit_nanos, alert.level


def test_seed_demo_keeps_its_token_across_runs_until_told_to_rotate(db, capsys, settings, tmp_path):
    settings.VAR_DIR = tmp_path
    args = ["--history-days", "1", "--history-requests", "20", "--keep-token"]

    def seed(*extra) -> str:
        call_command("seed_demo", *args, *extra)
        return capsys.readouterr().out.strip().splitlines()[-1]

    first = seed()
    assert first.startswith("cf_") and seed() == first
    assert (tmp_path / "demo-token").read_text().strip() == first
    assert (tmp_path / "demo-token").stat().st_mode & 0o777 == 0o600

    # Without --keep-token (or once the saved token is revoked) a new one replaces it.
    call_command("seed_demo", "--history-days", "1", "--history-requests", "20")
    rotated = capsys.readouterr().out.strip().splitlines()[-1]
    assert rotated != first
    replaced = seed()
    assert replaced not in (first, rotated)
    tenant = Tenant.objects.get(slug="demo")
    active = ApiToken.objects.filter(tenant=tenant, name="make-demo", revoked_at__isnull=True)
    assert active.count() == 1


def test_seed_demo_prints_the_token_last_and_keeps_a_fresh_history(db, capsys):
    args = ["--history-days", "2", "--history-requests", "30"]
    call_command("seed_demo", *args)
    first = capsys.readouterr().out.strip().splitlines()[-1]
    tenant = Tenant.objects.get(slug="demo")
    rows = UsageEvent.objects.filter(tenant=tenant)
    count = rows.count()  # requests and the audits of some
    assert first.startswith("cf_") and rows.filter(kind=UsageKind.REQUEST).count() == 30

    call_command("seed_demo", *args)
    assert capsys.readouterr().out.strip().splitlines()[-1] != first
    assert UsageEvent.objects.filter(tenant=tenant).count() == count


# --- audits and calibrations ----------------------------------------------------------------


def audit_state(tenant):
    """What the history's audits left: rows, ledger rows, label counts, versions."""
    audits = Audit.objects.filter(tenant=tenant).order_by("request_id")
    return (
        [  # by the request's index in the history (its id names the tenant)
            (request_id.rsplit("_", 1)[-1], *rest)
            for request_id, *rest in audits.values_list(
                "request_id", "profile", "status", "served_model", "served_loss", "cost_nanos"
            )
        ],
        sorted(
            UsageEvent.objects.filter(tenant=tenant, kind=UsageKind.AUDIT).values_list(
                "cost_nanos", flat=True
            )
        ),
        sorted(
            ProfileLearning.objects.filter(tenant=tenant).values_list(
                "profile", "uniform_labels", "chain_key"
            )
        ),
        sorted(
            CalibrationVersion.objects.filter(tenant=tenant).values_list(
                "profile", "version", "certified", "active", "uniform_labels"
            )
        ),
    )


def test_history_audits_are_what_the_audit_task_writes(history):
    tenant, report = history
    audits = Audit.objects.filter(tenant=tenant)
    requests = {
        r.request_id: r for r in UsageEvent.objects.filter(tenant=tenant, kind=UsageKind.REQUEST)
    }

    assert audits.count() == report.audits > 0
    for audit in audits:
        request = requests[audit.request_id]  # an audit is of a history request
        assert audit.profile == request.profile and audit.profile.startswith("cascade/")
        assert audit.served_model == request.model and audit.domain == request.domain
        assert audit.created_at == request.created_at < audit.finished_at <= NOW
        assert (audit.status, audit.uniform, audit.payload) == (AuditStatus.DONE, True, {})
        assert audit.observation and audit.observation["uniform"] is True
        assert audit.reference_model == audit.chain[-1]
        assert audit.chain[0] == request.models_called[0]  # the chain that ran
    # Not auditable: refused, failed, or routed by domain to another chain.
    audited = set(audits.values_list("request_id", flat=True))
    for request_id, request in requests.items():
        if request.status != UsageStatus.OK or (
            request.profile == "cascade/support" and request.domain == "medical"
        ):
            assert request_id not in audited
    # Labels: most served answers are measured against the reference.
    assert audits.exclude(served_loss=None).count() >= 0.8 * audits.count()
    assert {a.profile for a in audits} >= {"cascade/support", "cascade/balanced"}


def test_audit_ledger_rows_cost_what_the_audits_cost(history):
    tenant, report = history
    audits = {f"audit_{a.pk}": a for a in Audit.objects.filter(tenant=tenant)}
    rows = UsageEvent.objects.filter(tenant=tenant, kind=UsageKind.AUDIT)

    assert rows.count() == len(audits)
    for row in rows:
        audit = audits[row.request_id]  # audit_<id>: one row per audit, no other
        assert row.cost_nanos == audit.cost_nanos > 0
        assert row.created_at == audit.finished_at
        assert (row.token_id, row.end_user_id, row.baseline_cost_nanos) == (None, None, 0)
        assert (row.profile, row.status, row.baseline_method) == (audit.profile, "ok", "none")
        assert sum(a["cost_nanos"] for a in row.expanded_attempts) == row.cost_nanos
        assert {a["role"] for a in row.expanded_attempts} <= {"audit", "judge"}
    total = sum(a.cost_nanos for a in audits.values())
    assert total == report.audit_cost_nanos
    assert audit_spend_total(tenant_id=tenant.pk, start=None, end=None) == total
    # Budgets count audits as spend: the tenant's counter is the whole ledger's sum.
    tenant_budget = Budget.objects.get(tenant=tenant, scope=BudgetScope.TENANT)
    start, _ = period_bounds("month", NOW, tenant.time_zone)
    counter = BudgetCounter.objects.get(budget=tenant_budget, period_start=start)
    in_month = UsageEvent.objects.filter(tenant=tenant, created_at__gte=start)
    assert counter.spent_nanos == in_month.aggregate(s=Sum("cost_nanos"))["s"]
    # Labels counted on each profile's learning state, one per audit.
    counted = dict(
        ProfileLearning.objects.filter(tenant=tenant).values_list("profile", "uniform_labels")
    )
    assert counted == dict(Counter(a.profile for a in audits.values()))


def test_audits_and_calibrations_are_replaced_never_duplicated(history):
    tenant, _ = history
    first = audit_state(tenant)
    live_audit = Audit.objects.create(
        tenant=tenant, request_id="req_live", profile="cascade/balanced", chain_key="x"
    )

    assert demo_history.generate(tenant, days=DAYS, requests=REQUESTS, now=NOW).skipped
    demo_history.generate(tenant, days=DAYS, requests=REQUESTS, now=NOW, force=True)
    Audit.objects.filter(pk=live_audit.pk).delete()  # a live audit survives the refresh
    assert audit_state(tenant) == first

    other = make_tenant("demo-history-2")
    demo_history.generate(other, days=DAYS, requests=REQUESTS, now=NOW)
    assert audit_state(other) == first  # deterministic


@pytest.fixture
def long_history(db):
    tenant = make_tenant("demo-history-long")
    report = demo_history.generate(tenant, days=12, requests=1300, now=NOW)
    return tenant, report


def test_profiles_have_a_calibration_history_with_a_certified_active_version(long_history):
    tenant, report = long_history
    versions = CalibrationVersion.objects.filter(tenant=tenant).order_by("profile", "version")

    assert report.calibration_versions == versions.count()
    by_profile = Counter(versions.values_list("profile", flat=True))
    assert max(by_profile.values()) >= 2  # a history, not one fit
    active = list(versions.filter(active=True))
    assert active and all(v.certified for v in active)
    assert len({v.profile for v in active}) == len(active)  # at most one per profile
    for version in versions:
        labels = Audit.objects.filter(
            tenant=tenant, profile=version.profile, finished_at__lte=version.created_at
        ).count()
        assert version.uniform_labels == labels  # fitted on the labels before it only
        assert version.created_at <= NOW
        assert version.evidence["target_retention"] > 0
        assert version.certified == ("retention_lower_bound" in version.evidence)
    for version in active:
        state = ProfileLearning.objects.get(tenant=tenant, profile=version.profile)
        assert state.active_version_id == version.pk
        assert version.promoted_at == version.created_at  # promoted when it was fitted
        event = AuditEvent.objects.get(
            tenant=tenant,
            action="calibration.promote",
            target=version.profile,
            data__version=version.version,
        )
        assert event.created_at == version.created_at

    # The quality page's numbers: measured retention beside the engine's estimate.
    quality = profile_quality(
        tenant_id=tenant.pk,
        tenant_audits=True,
        name=active[0].profile,
        start=NOW - timedelta(days=30),
        end=NOW,
    )
    assert quality.learning.active_version == active[0].version
    assert quality.overall.measured is not None and quality.overall.audits > 0
    assert quality.overall.audit_cost_nanos > 0 and quality.overall.engine_estimate


# --- the history is what the gateway would have done -------------------------------------


@pytest.mark.django_db(transaction=True)
async def test_history_rows_match_the_same_requests_sent_live():
    tenant = await sync_to_async(make_tenant)()
    n = 80
    await sync_to_async(demo_history.generate)(tenant, days=3, requests=n)
    mix = demo_history.history_mix(n, demo_history.DEFAULT_SEED)
    issued = await sync_to_async(token_create)(tenant=tenant, name="check")
    # Budgets decide admission, not the cascade; a month-end budget could degrade a request.
    await Budget.objects.filter(tenant=tenant).adelete()
    # The history is the cascade before any audit: a tenant that does not audit runs it so.
    await sync_to_async(tenant_settings_update)(tenant=tenant, audits_enabled=False)
    rows = {
        r.request_id: r
        async for r in UsageEvent.objects.filter(
            tenant=tenant, request_id__startswith=demo_history.HISTORY_PREFIX
        )
    }
    escalated = [i for i in range(n) if rows[demo_history.history_request_id(tenant, i)].escalated]
    plain = [i for i in range(n) if i not in escalated and not mix[i][1]]
    assert escalated and plain
    client = AsyncClient()
    for i in (*escalated[:3], *plain[:2]):
        request, _ = mix[i]
        body = {**request.body, "stream": False}
        body.pop("stream_options", None)
        response = await client.post(
            "/v1/chat/completions",
            data=json.dumps(body),
            content_type="application/json",
            headers={"Authorization": f"Bearer {issued.raw}"},
        )
        assert response.status_code == 200, response.content
        live = await UsageEvent.objects.aget(request_id=response["x-request-id"])
        past = rows[demo_history.history_request_id(tenant, i)]
        assert (live.model, live.escalated, live.models_called, live.domain, live.profile) == (
            past.model,
            past.escalated,
            past.models_called,
            past.domain,
            past.profile,
        )
        assert (live.cost_nanos, live.prompt_tokens, live.completion_tokens) == (
            past.cost_nanos,
            past.prompt_tokens,
            past.completion_tokens,
        )


# --- the traffic simulator ----------------------------------------------------------------


def test_the_mix_spans_profiles_users_and_domains():
    rng = random.Random(3)
    requests = [traffic.sample_request(rng) for _ in range(400)]
    assert {r.model for r in requests} == set(traffic.PROFILE_MODELS)
    assert {r.user for r in requests} == {u for u, _ in traffic.END_USERS}
    assert any(r.stream for r in requests) and not all(r.stream for r in requests)
    only = [traffic.sample_request(rng, models=("cascade/balanced",)) for _ in range(20)]
    assert {r.model for r in only} == {"cascade/balanced"}


def test_simulator_sends_through_the_live_server(cascadeflow_server):
    count = "SELECT count(*) FROM routing_usageevent"
    before = cascadeflow_server.query(count)[0][0]
    lines = []
    stats = traffic.run(
        cascadeflow_server.base_url,
        cascadeflow_server.token,
        rate_per_s=40,
        models=("cascade/balanced", "demo/small"),
        seed=5,
        max_requests=6,
        log_every=3,
        log=lines.append,
    )
    assert stats.sent == 6 and stats.ok == 6 and stats.errors == 0, stats.by_status
    assert stats.cost_usd > 0
    assert len(lines) == 2 and "6 requests sent" in lines[-1]
    assert cascadeflow_server.query(count)[0][0] == before + 6
    users = {row[0] for row in cascadeflow_server.query("SELECT external_id FROM tenants_enduser")}
    assert users & {u for u, _ in traffic.END_USERS}


def test_simulator_survives_server_errors_and_backs_off():
    calls = []

    def handler(request: httpx.Request) -> httpx.Response:
        calls.append(time.monotonic())
        if len(calls) == 1:
            return httpx.Response(503, json={"error": {"message": "down"}})
        if len(calls) == 2:
            raise httpx.ConnectError("refused", request=request)
        return httpx.Response(
            200, json={}, headers={"x-cascade-escalated": "true", "x-cascade-cost-usd": "0.5"}
        )

    stats = traffic.run(
        "http://cascadeflow.invalid",
        "cf_test",
        rate_per_s=200,
        max_requests=4,
        max_in_flight=1,
        models=("cascade/balanced",),
        log_every=0,
        transport=httpx.MockTransport(handler),
    )
    assert (stats.sent, stats.ok, stats.errors, stats.escalated) == (4, 2, 2, 2)
    assert stats.by_status == {"503": 1, "ConnectError": 1, "200": 2}
    # After the 503 it waited (1 s), after the transport error longer (2 s).
    assert calls[1] - calls[0] >= 0.9 and calls[2] - calls[1] >= 1.9


def test_simulator_stops_promptly_on_its_event():
    port = free_port()  # nothing listens: every request fails, and it keeps trying
    thread, stop = traffic.start_in_background(
        f"http://127.0.0.1:{port}", "cf_test", rate_per_s=0.05, log_every=0
    )
    time.sleep(0.3)
    assert thread.is_alive()
    stop.set()
    thread.join(timeout=3)
    assert not thread.is_alive()


def test_simulator_refuses_a_nonsense_rate():
    with pytest.raises(ValueError):
        traffic.run("http://127.0.0.1:1", "cf_x", rate_per_s=0, stop_event=threading.Event())


def test_the_demo_has_forecasts_from_the_start(history):
    from dashboard.models import SpendForecastSnapshot

    tenant, _ = history
    free_budget = Budget.objects.get(tenant=tenant, scope=BudgetScope.TIER)
    snaps = {s.end_user_id: s for s in SpendForecastSnapshot.objects.filter(tenant=tenant)}
    free_users = set(
        EndUser.objects.filter(tenant=tenant, tier__slug="free").values_list("pk", flat=True)
    )

    assert 0 in snaps and snaps[0].method != "none"
    assert free_users & set(snaps)
    assert all(snaps[u].limit_nanos == free_budget.limit_nanos for u in free_users & set(snaps))
