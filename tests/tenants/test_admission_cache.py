"""The per-process admission cache (tenants.selectors.AdmissionCache): the token lookup,
the end user and its tier, each at most 1 s old.

Every worker keeps its own entries, so these tests play two workers with two
instances: the one that sees a change happen, and the one that cached the row
before it. Whatever the second cached, it refuses (or applies the change) within
one second.
"""

import json
import time
from datetime import timedelta

import pytest
from asgiref.sync import sync_to_async
from django.db import OperationalError, connection
from django.test import AsyncClient
from django.test.utils import CaptureQueriesContext
from django.utils import timezone

from routing.models import UsageEvent
from tenants import selectors
from tenants.models import ApiToken, Budget, BudgetCounter, EndUser, EndUserTier, Tenant, Tier
from tenants.selectors import (
    AdmissionCache,
    TokenInvalid,
    budget_lines_of,
    end_user_of,
    end_user_tier_of,
    token_context_for_raw,
    token_used,
)
from tenants.services import token_create, token_revoke

pytestmark = pytest.mark.django_db


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def clock():
    return Clock()


@pytest.fixture
def worker(settings, monkeypatch, clock):
    """This process's cache, on a clock the test moves, with the production TTL (1 s)."""
    settings.CASCADEFLOW_ADMISSION_CACHE_SECONDS = 1.0
    rows = AdmissionCache(clock=clock)
    monkeypatch.setattr(selectors, "admission_cache", rows)
    return rows


def chat_poster(api_token, **extra):
    """A coroutine function that posts one chat completion with ``api_token``."""
    client = AsyncClient()
    chat = json.dumps(
        {"model": "demo/small", "messages": [{"role": "user", "content": "Hi"}], **extra}
    )
    headers = {"Authorization": f"Bearer {api_token.raw}"}

    async def post():
        return await client.post(
            "/v1/chat/completions", data=chat, content_type="application/json", headers=headers
        )

    return post


def resolve(raw):
    return token_context_for_raw(raw=raw, now=timezone.now())


def queries(fn):
    with CaptureQueriesContext(connection) as captured:
        try:
            fn()
        except TokenInvalid:
            pass
    return len(captured)


def test_a_cached_token_is_resolved_without_a_query(worker, api_token):
    assert queries(lambda: resolve(api_token.raw)) == 1

    assert queries(lambda: resolve(api_token.raw)) == 0
    assert resolve(api_token.raw).token_id == api_token.token.pk


def test_the_row_is_read_again_once_a_second_old(worker, clock, api_token):
    resolve(api_token.raw)

    clock.now += 0.999
    assert queries(lambda: resolve(api_token.raw)) == 0
    clock.now += 0.001
    assert queries(lambda: resolve(api_token.raw)) == 1


def test_ttl_zero_reads_the_database_every_time(worker, settings, api_token):
    settings.CASCADEFLOW_ADMISSION_CACHE_SECONDS = 0

    assert [queries(lambda: resolve(api_token.raw)) for _ in range(3)] == [1, 1, 1]


def test_unknown_tokens_are_never_cached(worker):
    assert [queries(lambda: resolve("cf_not-a-real-token")) for _ in range(3)] == [1, 1, 1]
    with pytest.raises(TokenInvalid, match="Incorrect API key"):
        resolve("cf_not-a-real-token")


@pytest.mark.parametrize(
    ("change", "reason"),
    [
        (
            lambda token: token_revoke(tenant=token.tenant, token=token),
            "revoked",
        ),
        (
            lambda token: ApiToken.objects.filter(pk=token.pk).update(
                expires_at=timezone.now() - timedelta(seconds=1)
            ),
            "expired",
        ),
        (
            lambda token: Tenant.objects.filter(pk=token.tenant_id).update(is_active=False),
            "deactivated",
        ),
        (
            lambda token: Tenant.objects.filter(pk=token.tenant_id).update(email_verified_at=None),
            "Verify your email",
        ),
    ],
    ids=["revoked", "expired", "tenant-deactivated", "email-unverified"],
)
def test_another_worker_refuses_a_changed_token_within_one_second(
    settings, monkeypatch, api_token, change, reason
):
    clock = Clock()
    other_worker = AdmissionCache(clock=clock)  # cached the row before the change
    settings.CASCADEFLOW_ADMISSION_CACHE_SECONDS = 1.0
    monkeypatch.setattr(selectors, "admission_cache", other_worker)
    resolve(api_token.raw)

    change(api_token.token)  # done by this worker (the database), unseen by the other

    clock.now += 0.5
    assert resolve(api_token.raw).token_id == api_token.token.pk  # at most 1 s stale
    clock.now += 0.5
    with pytest.raises(TokenInvalid, match=reason):
        resolve(api_token.raw)


@pytest.mark.django_db(transaction=True)
def test_a_revoked_token_is_refused_within_one_second_on_the_wall_clock(settings, monkeypatch):
    """Real time, real commits: a worker that cached the token keeps polling after another
    revokes it; no request it starts one second or more after the commit is served."""
    from tests.factories import TenantFactory

    settings.CASCADEFLOW_ADMISSION_CACHE_SECONDS = 1.0
    issued = token_create(tenant=TenantFactory(slug="wall"), name="wall")
    other_worker = AdmissionCache()
    monkeypatch.setattr(selectors, "admission_cache", other_worker)
    resolve(issued.raw)

    token_revoke(tenant=issued.token.tenant, token=issued.token)  # committed (autocommit)
    revoked_at = time.monotonic()
    served_after = []
    while time.monotonic() - revoked_at < 3.0:
        started = time.monotonic() - revoked_at
        try:
            resolve(issued.raw)
        except TokenInvalid as exc:
            assert "revoked" in exc.reason
            break
        served_after.append(started)
        time.sleep(0.02)
    else:
        pytest.fail("the revoked token was still served 3 s after its revocation")
    # No request that started a second or more after the revocation was served.
    assert max(served_after, default=0.0) < 1.0


def test_expiry_is_checked_against_each_request_not_the_cached_row(worker, api_token):
    expires = timezone.now() + timedelta(minutes=5)
    ApiToken.objects.filter(pk=api_token.token.pk).update(expires_at=expires)
    resolve(api_token.raw)

    with pytest.raises(TokenInvalid, match="expired"):
        token_context_for_raw(raw=api_token.raw, now=expires)


def test_plan_limits_and_budgets_reach_another_worker_within_one_second(
    worker, clock, api_token, tenant
):
    before = resolve(api_token.raw)
    assert (before.tenant_rpm, before.has_budgets) == (None, False)
    tier = Tier.objects.create(slug="pro", name="Pro", requests_per_minute=7)
    Tenant.objects.filter(pk=tenant.pk).update(tier=tier)
    Budget.objects.create(tenant=tenant, scope="tenant", period="month", limit_nanos=10**9)

    clock.now += 1.0
    after = resolve(api_token.raw)

    assert (after.tenant_rpm, after.has_budgets) == (7, True)


def test_a_recorded_use_is_not_recorded_again_from_a_cached_row(worker, api_token):
    assert resolve(api_token.raw).last_used_at is None
    now = timezone.now()

    token_used(token_id=api_token.token.pk, at=now)

    assert resolve(api_token.raw).last_used_at == now


def test_the_cache_is_bounded(worker, tenant, monkeypatch):
    monkeypatch.setattr(AdmissionCache, "MAX_ENTRIES", 3)
    raws = [token_create(tenant=tenant, name=f"k{n}").raw for n in range(4)]
    for raw in raws:
        resolve(raw)

    assert queries(lambda: resolve(raws[-1])) == 0
    assert queries(lambda: resolve(raws[0])) == 1  # started over when full


def test_database_down_after_the_row_expired_is_an_error_not_a_stale_answer(
    worker, clock, api_token, monkeypatch
):
    resolve(api_token.raw)
    clock.now += 1.0

    def down(*args, **kwargs):
        raise OperationalError("connection refused")

    monkeypatch.setattr(selectors, "fetch_one", down)
    with pytest.raises(OperationalError):
        resolve(api_token.raw)


@pytest.mark.django_db(transaction=True)
async def test_the_gateway_refuses_a_token_revoked_by_another_worker_within_one_second(
    worker, clock, api_token
):
    post = chat_poster(api_token)

    assert (await post()).status_code == 200
    await sync_to_async(token_revoke)(tenant=api_token.token.tenant, token=api_token.token)

    clock.now += 1.0
    response = await post()

    assert response.status_code == 401
    assert "revoked" in json.loads(response.content)["error"]["message"]


def test_an_end_user_is_read_once_a_second(worker, clock, tenant):
    first = end_user_of(tenant_id=tenant.pk, external_id="alice")  # created at first sight

    assert queries(lambda: end_user_of(tenant_id=tenant.pk, external_id="alice")) == 0
    clock.now += 1.0
    assert queries(lambda: end_user_of(tenant_id=tenant.pk, external_id="alice")) == 1
    assert end_user_of(tenant_id=tenant.pk, external_id="alice").pk == first.pk
    assert EndUser.objects.filter(tenant=tenant, external_id="alice").count() == 1


def test_a_tier_change_reaches_another_worker_within_one_second(worker, clock, tenant):
    basic = EndUserTier.objects.create(
        tenant=tenant, slug="basic", name="Basic", requests_per_minute=10, is_default=True
    )
    gold = EndUserTier.objects.create(tenant=tenant, slug="gold", name="Gold")

    def tier():
        user = end_user_of(tenant_id=tenant.pk, external_id="bob")
        return end_user_tier_of(tenant_id=tenant.pk, end_user=user)

    assert tier().slug == "basic"
    EndUser.objects.filter(tenant=tenant, external_id="bob").update(tier=gold)
    EndUserTier.objects.filter(pk=basic.pk).update(requests_per_minute=99)
    clock.now += 0.5
    assert (tier().slug, tier().requests_per_minute) == ("basic", 10)  # at most 1 s stale

    clock.now += 0.5
    assert tier().slug == "gold"
    EndUser.objects.filter(tenant=tenant, external_id="bob").update(tier=None)
    clock.now += 1.0
    assert (tier().slug, tier().requests_per_minute) == ("basic", 99)


def test_no_tier_is_cached_too(worker, clock, tenant):
    assert end_user_tier_of(tenant_id=tenant.pk, end_user=None) is None

    assert queries(lambda: end_user_tier_of(tenant_id=tenant.pk, end_user=None)) == 0
    EndUserTier.objects.create(tenant=tenant, slug="basic", name="Basic", is_default=True)
    clock.now += 1.0
    assert end_user_tier_of(tenant_id=tenant.pk, end_user=None).slug == "basic"


@pytest.mark.django_db(transaction=True)
async def test_the_gateway_applies_an_end_user_tier_change_within_one_second(
    worker, clock, api_token, tenant
):
    tier = await EndUserTier.objects.acreate(
        tenant=tenant, slug="basic", name="Basic", is_default=True, allowed_models=["demo/small"]
    )
    post = chat_poster(api_token, user="carol")

    assert (await post()).status_code == 200
    await EndUserTier.objects.filter(pk=tier.pk).aupdate(allowed_models=["demo/large"])

    clock.now += 0.5
    assert (await post()).status_code == 200  # at most 1 s stale
    clock.now += 0.5
    response = await post()

    assert response.status_code == 403
    assert json.loads(response.content)["error"]["code"] == "model_not_allowed"


# --- budget lines ------------------------------------------------------------------------


def lines_of(api_token, end_user=None, tier=None, fresh=False):
    return budget_lines_of(
        tenant_id=api_token.token.tenant_id,
        token_id=api_token.token.pk,
        token_label="sk-...",
        end_user=end_user,
        tier=tier,
        fresh=fresh,
    )


def test_budget_lines_are_read_once_a_second(worker, clock, api_token, tenant):
    budget = Budget.objects.create(tenant=tenant, scope="tenant", period="month", limit_nanos=10)

    assert queries(lambda: lines_of(api_token)) == 1
    assert queries(lambda: lines_of(api_token)) == 0
    Budget.objects.filter(pk=budget.pk).update(limit_nanos=20)
    assert [line.limit_nanos for line in lines_of(api_token)] == [10]  # at most 1 s stale

    clock.now += 1.0

    assert [line.limit_nanos for line in lines_of(api_token)] == [20]


def test_budget_lines_are_cached_per_token_end_user_and_tier(worker, api_token, tenant):
    other = token_create(tenant=tenant, name="other")
    carol = EndUser.objects.create(tenant=tenant, external_id="carol")
    Budget.objects.create(tenant=tenant, scope="tenant", period="month", limit_nanos=10)
    Budget.objects.create(
        tenant=tenant, scope="token", token=api_token.token, period="day", limit_nanos=5
    )
    Budget.objects.create(
        tenant=tenant, scope="end_user", end_user=carol, period="week", limit_nanos=3
    )

    mine = lines_of(api_token)
    with_carol = lines_of(api_token, end_user=carol)
    theirs = budget_lines_of(
        tenant_id=tenant.pk,
        token_id=other.token.pk,
        token_label="sk-...",
        end_user=None,
        tier=None,
    )

    assert sorted(line.scope for line in mine) == ["tenant", "token"]
    assert sorted(line.scope for line in with_carol) == ["end_user", "tenant", "token"]
    assert [line.scope for line in theirs] == ["tenant"]


@pytest.mark.django_db(transaction=True)
async def test_a_budget_deleted_less_than_a_second_ago_does_not_fail_the_request(
    worker, clock, api_token, tenant
):
    """The cached line names a budget that is gone: its counter cannot be created (foreign
    key), and admission reads the lines again instead of failing."""
    keep = await Budget.objects.acreate(
        tenant=tenant, scope="tenant", period="month", limit_nanos=10**12
    )
    gone = await Budget.objects.acreate(
        tenant=tenant, scope="tenant", period="day", limit_nanos=10**12
    )
    post = chat_poster(api_token)

    assert (await post()).status_code == 200
    await sync_to_async(lambda: Budget.objects.filter(pk=gone.pk).delete())()
    clock.now += 0.5  # the lines are still cached
    response = await post()

    assert response.status_code == 200, response.content
    counted = await sync_to_async(
        lambda: sorted(BudgetCounter.objects.values_list("budget_id", "spent_nanos"))
    )()
    assert [budget for budget, _ in counted] == [keep.pk]
    assert counted[0][1] > 0
    assert await UsageEvent.objects.filter(tenant=tenant).acount() == 2
