import hashlib

import pytest
from django.core.management import CommandError, call_command
from django.utils import timezone

from tenants.enums import ALL_SCOPES, BudgetPeriod, BudgetScope, MemberRole
from tenants.models import ApiToken, AuditEvent, Budget, EndUser, Member, Tenant
from tenants.selectors import TokenInvalid, token_context_for_raw
from tenants.services import (
    AuditSettingsInvalid,
    end_user_audit_exclusion_set,
    tenant_settings_update,
    token_create,
    token_revoke,
)

pytestmark = pytest.mark.django_db


def test_token_is_stored_only_as_sha256_with_a_mask(tenant):
    issued = token_create(tenant=tenant, name="ci")

    stored = ApiToken.objects.get(pk=issued.token.pk)
    assert issued.raw.startswith("cf_") and len(issued.raw) > 40
    assert stored.token_hash == hashlib.sha256(issued.raw.encode()).hexdigest()
    assert stored.mask == f"cf_…{issued.raw[-4:]}"
    assert issued.raw not in str(ApiToken.objects.filter(pk=stored.pk).values().get())
    assert stored.scopes == sorted(ALL_SCOPES)
    assert AuditEvent.objects.filter(
        tenant=tenant, action="token.create", target=stored.mask
    ).exists()


def test_each_token_is_unique(tenant):
    raws = {token_create(tenant=tenant, name=f"t{i}").raw for i in range(20)}

    assert len(raws) == 20


def test_unknown_scope_is_refused(tenant):
    with pytest.raises(ValueError, match="Unknown scopes: fly"):
        token_create(tenant=tenant, name="x", scopes=["fly"])


def test_revocation_is_immediate_and_audited(tenant):
    issued = token_create(tenant=tenant, name="x")
    assert token_context_for_raw(raw=issued.raw, now=timezone.now()).tenant_id == tenant.pk

    token_revoke(tenant=tenant, token=issued.token)

    with pytest.raises(TokenInvalid, match="revoked"):
        token_context_for_raw(raw=issued.raw, now=timezone.now())
    assert AuditEvent.objects.filter(action="token.revoke").count() == 1
    token_revoke(tenant=tenant, token=issued.token)  # idempotent
    assert AuditEvent.objects.filter(action="token.revoke").count() == 1


def test_a_tenant_cannot_revoke_another_tenants_token(tenant, other_tenant):
    other = token_create(tenant=other_tenant, name="theirs")

    with pytest.raises(ApiToken.DoesNotExist):
        token_revoke(tenant=tenant, token=other.token)

    assert ApiToken.objects.get(pk=other.token.pk).revoked_at is None


def test_token_resolves_to_its_own_tenant_only(tenant, other_tenant):
    mine = token_create(tenant=tenant, name="a")
    theirs = token_create(tenant=other_tenant, name="b")

    assert token_context_for_raw(raw=mine.raw, now=timezone.now()).tenant_id == tenant.pk
    assert token_context_for_raw(raw=theirs.raw, now=timezone.now()).tenant_id == other_tenant.pk


def test_create_tenant_prints_a_full_scope_token_last(capsys):
    call_command(
        "create_tenant",
        "initech",
        "--owner-email",
        "boss@initech.test",
        "--owner-password",
        "s3cret-pass-123",
        "--monthly-budget-usd",
        "99.5",
        "--time-zone",
        "Europe/Paris",
    )

    out = capsys.readouterr().out.strip().splitlines()
    raw = out[-1]
    context = token_context_for_raw(raw=raw, now=timezone.now())
    tenant = Tenant.objects.get(slug="initech")
    assert context.tenant_id == tenant.pk
    assert context.scopes == frozenset(ALL_SCOPES)
    assert tenant.tier.slug == "free"
    assert tenant.time_zone == "Europe/Paris"
    member = Member.objects.get(tenant=tenant)
    assert member.role == MemberRole.OWNER
    assert member.user.check_password("s3cret-pass-123")
    budget = Budget.objects.get(tenant=tenant)
    assert (budget.scope, budget.period, budget.limit_nanos) == (
        BudgetScope.TENANT,
        BudgetPeriod.MONTH,
        99_500_000_000,
    )


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["acme"], "already exists"),
        (["new1", "--plan", "platinum"], "Unknown plan 'platinum'"),
        (["new2", "--monthly-budget-usd", "lots"], "must be a number"),
        (["new3", "--monthly-budget-usd", "-5"], "cannot be negative"),
        (["new4", "--owner-password", "x"], "needs --owner-email"),
        (["new5", "--time-zone", "Mars/Olympus"], "Unknown time zone"),
        (["Not A Slug"], "slug"),
    ],
)
def test_create_tenant_refuses_bad_input(tenant, args, message):
    with pytest.raises(CommandError, match=message):
        call_command("create_tenant", *args)


def test_seed_demo_is_repeatable_and_revokes_the_previous_demo_token(capsys):
    call_command("seed_demo", "--history-requests", "50")
    first = capsys.readouterr().out.strip().splitlines()[-1]
    call_command("seed_demo", "--history-requests", "50")
    second = capsys.readouterr().out.strip().splitlines()[-1]

    assert Tenant.objects.filter(slug="demo").count() == 1
    with pytest.raises(TokenInvalid):
        token_context_for_raw(raw=first, now=timezone.now())
    assert token_context_for_raw(raw=second, now=timezone.now()).tenant_slug == "demo"


# --- audit settings --------------------------------------------------------------------


def test_a_new_tenant_audits_up_to_the_configured_cap(settings):
    settings.CASCADEFLOW_AUDIT_MONTHLY_CAP_NANOS = 7 * 10**9

    tenant = Tenant.objects.create(slug="fresh", name="Fresh")

    assert (tenant.audits_enabled, tenant.audit_monthly_cap_nanos) == (True, 7 * 10**9)


def test_the_token_context_carries_the_tenants_audit_settings(tenant):
    issued = token_create(tenant=tenant, name="ci")
    tenant_settings_update(tenant=tenant, audits_enabled=False, audit_monthly_cap_nanos=123)

    ctx = token_context_for_raw(raw=issued.raw, now=timezone.now())

    assert (ctx.audits_enabled, ctx.audit_cap_nanos) == (False, 123)


@pytest.mark.parametrize(
    ("changes", "recorded"),
    [
        ({"audits_enabled": False}, {"audits_enabled": False}),
        ({"audit_monthly_cap_nanos": 0}, {"audit_monthly_cap_nanos": 0}),
        ({"audits_enabled": True}, None),  # already on: no change, no event
        ({}, None),
    ],
)
def test_tenant_audit_settings_are_audited(tenant, changes, recorded):
    assert tenant_settings_update(tenant=tenant, **changes) == (recorded or {})

    tenant.refresh_from_db()
    for name, value in changes.items():
        assert getattr(tenant, name) == value
    events = list(
        AuditEvent.objects.filter(action="tenant.settings").values_list("data", flat=True)
    )
    assert events == ([recorded] if recorded else [])


@pytest.mark.parametrize("cap", [-1, 2**63])
def test_a_cap_out_of_range_is_refused(tenant, cap):
    with pytest.raises(AuditSettingsInvalid):
        tenant_settings_update(tenant=tenant, audit_monthly_cap_nanos=cap)


def test_excluding_an_end_user_from_audits_is_audited_once(tenant):
    end_user = EndUser.objects.create(tenant=tenant, external_id="alice")

    assert end_user_audit_exclusion_set(end_user=end_user, excluded=True) is True
    assert end_user_audit_exclusion_set(end_user=end_user, excluded=True) is False

    end_user.refresh_from_db()
    assert end_user.audit_excluded is True
    assert AuditEvent.objects.filter(action="end_user.audit_excluded").count() == 1
