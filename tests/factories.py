import factory
from django.contrib.auth import get_user_model
from django.utils import timezone

from tenants.enums import MemberRole
from tenants.models import EndUser, Member, Tenant, Tier


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


def member_login(client, tenant, role):
    """A new user, a member of ``tenant`` with ``role``, logged in on ``client``."""
    user = UserFactory()
    MemberFactory(tenant=tenant, user=user, role=role)
    client.force_login(user)
    return user
