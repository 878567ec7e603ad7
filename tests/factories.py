"""Model factories: every test builds its rows here, never by hand."""

import secrets

import factory
from django.contrib.auth import get_user_model
from django.utils import timezone

from routing.enums import UsageKind, UsageStatus
from routing.models import RoutingProfile, UsageEvent
from tenants.enums import ALL_SCOPES, BudgetPeriod, BudgetScope, MemberRole
from tenants.models import ApiToken, Budget, EndUser, Member, Tenant, Tier
from tenants.services import TOKEN_PREFIX, token_hash, token_mask


class TierFactory(factory.django.DjangoModelFactory):
    class Meta:
        model = Tier
        django_get_or_create = ("slug",)

    slug = factory.Sequence(lambda n: f"tier-{n}")
    name = factory.LazyAttribute(lambda o: o.slug.title())


class TenantFactory(factory.django.DjangoModelFactory):
    class Meta:
        model = Tenant

    slug = factory.Sequence(lambda n: f"tenant-{n}")
    name = factory.LazyAttribute(lambda o: o.slug.title())
    email_verified_at = factory.LazyFunction(timezone.now)


class UserFactory(factory.django.DjangoModelFactory):
    class Meta:
        model = get_user_model()

    username = factory.Sequence(lambda n: f"user{n}@example.test")
    email = factory.LazyAttribute(lambda o: o.username)
    password = factory.django.Password("correct-horse-battery")


class MemberFactory(factory.django.DjangoModelFactory):
    class Meta:
        model = Member

    tenant = factory.SubFactory(TenantFactory)
    user = factory.SubFactory(UserFactory)
    role = MemberRole.VIEWER


class EndUserFactory(factory.django.DjangoModelFactory):
    class Meta:
        model = EndUser

    tenant = factory.SubFactory(TenantFactory)
    external_id = factory.Sequence(lambda n: f"end-user-{n}")


class ApiTokenFactory(factory.django.DjangoModelFactory):
    """A token whose raw value is ``token.raw`` (the service hashes it; so does this)."""

    class Meta:
        model = ApiToken

    tenant = factory.SubFactory(TenantFactory)
    name = factory.Sequence(lambda n: f"token-{n}")
    raw = factory.LazyFunction(lambda: f"{TOKEN_PREFIX}{secrets.token_urlsafe(32)}")
    token_hash = factory.LazyAttribute(lambda o: token_hash(o.raw))
    mask = factory.LazyAttribute(lambda o: token_mask(o.raw))
    scopes = factory.LazyFunction(lambda: list(ALL_SCOPES))

    @classmethod
    def _create(cls, model_class, *args, **kwargs):
        raw = kwargs.pop("raw", None)
        token = super()._create(model_class, *args, **kwargs)
        token.raw = raw
        return token


class BudgetFactory(factory.django.DjangoModelFactory):
    """A tenant-wide monthly budget of $10 unless told otherwise."""

    class Meta:
        model = Budget

    tenant = factory.SubFactory(TenantFactory)
    scope = BudgetScope.TENANT
    period = BudgetPeriod.MONTH
    limit_nanos = 10 * 10**9


class RoutingProfileFactory(factory.django.DjangoModelFactory):
    class Meta:
        model = RoutingProfile

    tenant = factory.SubFactory(TenantFactory)
    name = factory.Sequence(lambda n: f"profile-{n}")
    preset = "balanced"
    chain = factory.LazyFunction(lambda: ["demo/small", "demo/large"])


class UsageEventFactory(factory.django.DjangoModelFactory):
    """A ledger row: an answered request of ``demo/small`` costing 1,000 n$ unless told."""

    class Meta:
        model = UsageEvent

    tenant = factory.SubFactory(TenantFactory)
    request_id = factory.Sequence(lambda n: f"req_{n:08d}")
    created_at = factory.LazyFunction(timezone.now)
    requested_model = "demo/small"
    model = factory.LazyAttribute(lambda o: o.requested_model)
    models_called = factory.LazyAttribute(lambda o: [o.model] if o.model else [])
    prompt_tokens = 10
    completion_tokens = 20
    cost_nanos = 1_000
    baseline_cost_nanos = factory.LazyAttribute(lambda o: o.cost_nanos)
    status = UsageStatus.OK
    kind = UsageKind.REQUEST

    class Params:
        # An audit's row: spend, not a request (no baseline, token or end user).
        audit = factory.Trait(
            kind=UsageKind.AUDIT,
            request_id=factory.Sequence(lambda n: f"audit_{n}"),
            baseline_cost_nanos=0,
        )


def member_login(client, tenant, role):
    """A new user, a member of ``tenant`` with ``role``, logged in on ``client``."""
    user = UserFactory()
    MemberFactory(tenant=tenant, user=user, role=role)
    client.force_login(user)
    return user
