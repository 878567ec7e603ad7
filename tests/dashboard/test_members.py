"""The owner-only Members page: list, add or invite, change roles, remove."""

import re

import pytest
from django.contrib.auth import SESSION_KEY, get_user_model
from django.contrib.messages import get_messages

from tenants.enums import MemberRole
from tenants.models import AuditEvent, Member
from tests.factories import MemberFactory, UserFactory
from tests.factories import member_login as login

pytestmark = pytest.mark.django_db


def url(tenant, path=""):
    return f"/dashboard/t/{tenant.slug}/members/{path}"


def member_of(tenant, role=MemberRole.VIEWER, **user_fields):
    return MemberFactory(tenant=tenant, user=UserFactory(**user_fields), role=role)


def message_texts(response):
    return [str(m) for m in get_messages(response.wsgi_request)]


@pytest.mark.parametrize("role", [MemberRole.ADMIN, MemberRole.VIEWER])
def test_admins_and_viewers_are_forbidden(client, tenant, role):
    login(client, tenant, role)
    target = member_of(tenant)
    before = set(Member.objects.values_list("pk", "role"))

    assert client.get(url(tenant)).status_code == 403
    assert client.post(url(tenant), {"email": "new@example.test", "role": "owner"}).status_code == (
        403
    )
    assert client.post(url(tenant, f"{target.pk}/role/"), {"role": "owner"}).status_code == 403
    assert client.post(url(tenant, f"{target.pk}/remove/")).status_code == 403

    assert set(Member.objects.values_list("pk", "role")) == before
    assert not get_user_model().objects.filter(username="new@example.test").exists()
    # ... and the tab is not offered to them.
    page = client.get(f"/dashboard/t/{tenant.slug}/")
    assert page.status_code == 200
    assert url(tenant).encode() not in page.content


def test_owner_sees_members_with_you_marked(client, tenant, other_tenant):
    owner = login(client, tenant, MemberRole.OWNER)
    admin = member_of(tenant, MemberRole.ADMIN, username="ada@example.test")
    member_of(other_tenant, MemberRole.OWNER, username="stranger@example.test")

    page = client.get(url(tenant))

    assert page.status_code == 200
    html = page.content.decode()
    assert f'href="{url(tenant)}" aria-current="page">Members</a>' in html
    assert "ada@example.test" in html
    assert "stranger@example.test" not in html
    own_row = re.search(rf'data-testid="member-{owner.memberships.get().pk}".*?</tr>', html, re.S)
    assert own_row and ">you<" in own_row.group(0)
    admin_row = re.search(rf'data-testid="member-{admin.pk}".*?</tr>', html, re.S)
    assert admin_row and ">you<" not in admin_row.group(0)


def test_owner_adds_an_existing_user(client, tenant, mailoutbox):
    owner = login(client, tenant, MemberRole.OWNER)
    existing = UserFactory(username="bob@example.test", email="bob@example.test")
    password_hash = existing.password

    response = client.post(url(tenant), {"email": "  Bob@Example.TEST ", "role": "admin"})

    assert response.status_code == 302
    assert response["Location"] == url(tenant)
    member = Member.objects.get(tenant=tenant, user=existing)
    assert member.role == MemberRole.ADMIN
    assert get_user_model().objects.filter(username__iexact="bob@example.test").count() == 1
    existing.refresh_from_db()
    assert existing.password == password_hash  # the account is not touched
    assert mailoutbox == []
    event = AuditEvent.objects.get(tenant=tenant, action="member.add")
    assert (event.target, event.actor, event.data["role"]) == ("bob@example.test", owner, "admin")
    assert event.data["new_user"] is False
    # The new admin can now see the tenant.
    client.force_login(existing)
    assert client.get(f"/dashboard/t/{tenant.slug}/").status_code == 200


def test_owner_adds_an_existing_user_found_by_email_only(client, tenant):
    login(client, tenant, MemberRole.OWNER)
    legacy = UserFactory(username="legacy", email="Carol@Example.test")

    client.post(url(tenant), {"email": "carol@example.test", "role": "viewer"})

    assert Member.objects.filter(tenant=tenant, user=legacy, role=MemberRole.VIEWER).exists()
    assert not get_user_model().objects.filter(username="carol@example.test").exists()


def test_owner_invites_a_new_email_who_sets_a_password_and_logs_in(client, tenant, mailoutbox):
    login(client, tenant, MemberRole.OWNER)

    response = client.post(url(tenant), {"email": "New.Person@Example.test", "role": "viewer"})

    assert response.status_code == 302
    user = get_user_model().objects.get(username="new.person@example.test")
    assert user.email == "new.person@example.test"
    assert not user.has_usable_password()
    assert Member.objects.get(tenant=tenant, user=user).role == MemberRole.VIEWER
    assert AuditEvent.objects.get(tenant=tenant, action="member.add").data["new_user"] is True
    assert len(mailoutbox) == 1
    message = mailoutbox[0]
    assert message.to == ["new.person@example.test"]
    assert message.subject == f"You're invited to {tenant.name} on CascadeFlow"
    link = re.search(r"http://testserver(/accounts/reset/\S+/)", message.body).group(1)

    client.logout()
    form_page = client.get(link, follow=True)
    assert b'name="new_password1"' in form_page.content
    set_password_url = form_page.redirect_chain[-1][0]
    new_password = "granite-kettle-42-orbit"
    done = client.post(
        set_password_url, {"new_password1": new_password, "new_password2": new_password}
    )
    assert done["Location"] == "/accounts/reset/done/"
    user.refresh_from_db()
    assert user.has_usable_password()

    logged_in = client.post(
        "/accounts/login/", {"username": "new.person@example.test", "password": new_password}
    )
    assert logged_in.status_code == 302
    assert int(client.session[SESSION_KEY]) == user.pk
    assert client.get(f"/dashboard/t/{tenant.slug}/").status_code == 200


def test_adding_a_member_twice_is_rejected(client, tenant, mailoutbox):
    login(client, tenant, MemberRole.OWNER)
    member = member_of(tenant, MemberRole.VIEWER, username="dup@example.test")

    response = client.post(url(tenant), {"email": "DUP@example.test", "role": "owner"})

    assert response.status_code == 200
    assert "already a member" in response.content.decode()
    member.refresh_from_db()
    assert member.role == MemberRole.VIEWER
    assert Member.objects.filter(tenant=tenant, user=member.user).count() == 1
    assert not AuditEvent.objects.filter(action="member.add").exists()
    assert mailoutbox == []


def test_an_invalid_role_or_email_is_rejected(client, tenant):
    login(client, tenant, MemberRole.OWNER)
    before = Member.objects.count()

    bad_role = client.post(url(tenant), {"email": "x@example.test", "role": "superuser"})
    bad_email = client.post(url(tenant), {"email": "not-an-email", "role": "viewer"})

    assert bad_role.status_code == bad_email.status_code == 200
    assert Member.objects.count() == before
    assert not get_user_model().objects.filter(username="x@example.test").exists()


def test_role_change_works_and_is_audited(client, tenant):
    owner = login(client, tenant, MemberRole.OWNER)
    member = member_of(tenant, MemberRole.VIEWER, username="vic@example.test")

    response = client.post(url(tenant, f"{member.pk}/role/"), {"role": "admin"})

    assert response.status_code == 302
    assert response["Location"] == url(tenant)
    member.refresh_from_db()
    assert member.role == MemberRole.ADMIN
    event = AuditEvent.objects.get(tenant=tenant, action="member.role")
    assert event.target == "vic@example.test"
    assert event.actor == owner
    assert event.data == {"from": "viewer", "to": "admin"}


def test_an_unknown_role_changes_nothing(client, tenant):
    login(client, tenant, MemberRole.OWNER)
    member = member_of(tenant, MemberRole.VIEWER)

    client.post(url(tenant, f"{member.pk}/role/"), {"role": "god"})

    member.refresh_from_db()
    assert member.role == MemberRole.VIEWER
    assert not AuditEvent.objects.filter(action="member.role").exists()


def test_the_last_owner_cannot_be_demoted_or_removed(client, tenant):
    owner = login(client, tenant, MemberRole.OWNER)
    me = owner.memberships.get(tenant=tenant)
    member_of(tenant, MemberRole.ADMIN)

    demote = client.post(url(tenant, f"{me.pk}/role/"), {"role": "admin"})
    assert demote.status_code == 302
    assert any("at least one owner" in text for text in message_texts(demote))
    remove = client.post(url(tenant, f"{me.pk}/remove/"))
    assert remove.status_code == 302
    assert any("at least one owner" in text for text in message_texts(remove))

    me.refresh_from_db()
    assert me.role == MemberRole.OWNER
    assert Member.objects.filter(tenant=tenant, role=MemberRole.OWNER).count() == 1
    assert not AuditEvent.objects.filter(action__in=["member.role", "member.remove"]).exists()
    assert client.get(url(tenant)).status_code == 200  # still in charge


def test_an_owner_can_be_demoted_while_another_owner_remains(client, tenant):
    owner = login(client, tenant, MemberRole.OWNER)
    me = owner.memberships.get(tenant=tenant)
    other = member_of(tenant, MemberRole.OWNER)

    response = client.post(url(tenant, f"{other.pk}/role/"), {"role": "viewer"})
    assert response.status_code == 302
    other.refresh_from_db()
    assert other.role == MemberRole.VIEWER
    # Now I am the last owner again, and that is refused.
    client.post(url(tenant, f"{me.pk}/role/"), {"role": "viewer"})
    me.refresh_from_db()
    assert me.role == MemberRole.OWNER


def test_an_owner_can_step_down_while_another_owner_remains(client, tenant):
    owner = login(client, tenant, MemberRole.OWNER)
    me = owner.memberships.get(tenant=tenant)
    member_of(tenant, MemberRole.OWNER)

    response = client.post(url(tenant, f"{me.pk}/role/"), {"role": "admin"})

    assert response["Location"] == f"/dashboard/t/{tenant.slug}/"
    me.refresh_from_db()
    assert me.role == MemberRole.ADMIN
    assert client.get(url(tenant)).status_code == 403


def test_owner_removes_a_member_who_then_gets_404(client, tenant):
    owner = login(client, tenant, MemberRole.OWNER)
    member = member_of(tenant, MemberRole.ADMIN, username="gone@example.test")
    removed_user = member.user

    response = client.post(url(tenant, f"{member.pk}/remove/"))

    assert response.status_code == 302
    assert response["Location"] == url(tenant)
    assert not Member.objects.filter(pk=member.pk).exists()
    assert get_user_model().objects.filter(pk=removed_user.pk).exists()  # only the membership
    event = AuditEvent.objects.get(tenant=tenant, action="member.remove")
    assert (event.target, event.actor, event.data) == (
        "gone@example.test",
        owner,
        {"role": "admin"},
    )

    client.force_login(removed_user)
    assert client.get(f"/dashboard/t/{tenant.slug}/").status_code == 404


def test_members_of_another_tenant_are_404(client, tenant, other_tenant):
    login(client, tenant, MemberRole.OWNER)
    theirs = member_of(other_tenant, MemberRole.OWNER)
    their_viewer = member_of(other_tenant, MemberRole.VIEWER)

    # Through my own tenant's URLs: their member ids do not exist here.
    assert client.post(url(tenant, f"{theirs.pk}/remove/")).status_code == 404
    assert client.post(url(tenant, f"{their_viewer.pk}/role/"), {"role": "owner"}).status_code == (
        404
    )
    assert client.post(url(tenant, f"{their_viewer.pk}/role/"), {"role": "bad"}).status_code == (
        404
    )
    # Through theirs: I am not a member there.
    assert client.post(url(other_tenant, f"{theirs.pk}/remove/")).status_code == 404

    assert Member.objects.filter(pk=theirs.pk).exists()
    their_viewer.refresh_from_db()
    assert their_viewer.role == MemberRole.VIEWER
    assert not AuditEvent.objects.filter(action__startswith="member.").exists()
