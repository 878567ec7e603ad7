import logging
import re
from datetime import timedelta

import pytest
from django.contrib.auth import SESSION_KEY, get_user_model
from django.utils import timezone

from dashboard.accounts import client_address, slug_unique
from tenants.enums import MemberRole
from tenants.models import AuditEvent, Member, Tenant, Tier
from tenants.selectors import TokenInvalid, token_context_for_raw
from tests.factories import MemberFactory, TenantFactory, UserFactory

pytestmark = pytest.mark.django_db

User = get_user_model()
PASSWORD = "violet-anchor-71-drift"


def signup_data(**overrides):
    data = {
        "organisation": "Acme Rockets",
        "email": "Wile.E@Example.test",
        "password1": PASSWORD,
        "password2": PASSWORD,
    }
    return {**data, **overrides}


def test_login_page_links_to_password_reset_and_signup(client):
    page = client.get("/accounts/login/")

    assert b'href="/accounts/password_reset/"' in page.content
    assert b'href="/accounts/signup/"' in page.content


def test_signup_form_asks_anonymous_visitors_for_email_and_password(client):
    page = client.get("/accounts/signup/")

    assert page.status_code == 200
    assert b'name="organisation"' in page.content
    assert b'name="email"' in page.content
    assert b'name="password2"' in page.content


def test_signup_creates_user_tenant_owner_and_free_plan_and_logs_in(client):
    response = client.post("/accounts/signup/", signup_data())

    assert response.status_code == 302
    assert response["Location"] == "/dashboard/t/acme-rockets/tokens/"
    user = User.objects.get()
    assert user.username == "wile.e@example.test"
    assert user.email == "wile.e@example.test"
    assert user.check_password(PASSWORD)
    tenant = Tenant.objects.get()
    assert (tenant.slug, tenant.name) == ("acme-rockets", "Acme Rockets")
    assert tenant.tier == Tier.objects.get(slug="free")
    member = Member.objects.get()
    assert (member.tenant, member.user, member.role) == (tenant, user, MemberRole.OWNER)
    assert int(client.session[SESSION_KEY]) == user.pk
    actions = set(AuditEvent.objects.filter(tenant=tenant).values_list("action", flat=True))
    assert {"tenant.create", "member.add"} <= actions
    assert AuditEvent.objects.get(tenant=tenant, action="tenant.create").actor == user
    # The first API token is shown once, on the tokens page; it works once the email is verified.
    page = client.get(response["Location"]).content.decode()
    raw = re.search(r"cf_[A-Za-z0-9_\-]{20,}", page).group(0)
    assert "We sent a link to wile.e@example.test" in page
    assert raw not in client.get(response["Location"]).content.decode()
    with pytest.raises(TokenInvalid, match="Verify your email"):
        token_context_for_raw(raw=raw, now=timezone.now())


def test_signup_logs_the_new_user_in_with_their_email(client):
    client.post("/accounts/signup/", signup_data())
    client.logout()

    response = client.post(
        "/accounts/login/", {"username": "wile.e@example.test", "password": PASSWORD}
    )

    assert response.status_code == 302
    assert int(client.session[SESSION_KEY]) == User.objects.get().pk


@pytest.mark.parametrize("email", ["taken@example.test", "TAKEN@Example.TEST"])
def test_signup_rejects_a_taken_email_case_insensitively(client, email):
    UserFactory(username="Taken@Example.test", email="Taken@Example.test")

    response = client.post("/accounts/signup/", signup_data(email=email))

    assert response.status_code == 200
    assert b"An account with this email already exists" in response.content
    assert User.objects.count() == 1
    assert not Tenant.objects.exists()
    assert not Member.objects.exists()
    assert SESSION_KEY not in client.session


def test_signup_rejects_a_weak_password_and_creates_nothing(client):
    response = client.post(
        "/accounts/signup/", signup_data(password1="password", password2="password")
    )

    assert response.status_code == 200
    assert b"This password is too common." in response.content
    assert not User.objects.exists()
    assert not Tenant.objects.exists()


def test_signup_rejects_mismatched_passwords(client):
    response = client.post("/accounts/signup/", signup_data(password2=PASSWORD + "x"))

    assert response.status_code == 200
    assert b"The two passwords don&#x27;t match." in response.content
    assert not User.objects.exists()


def test_signup_rejects_a_name_without_letters_or_digits(client):
    response = client.post("/accounts/signup/", signup_data(organisation="!!! ???"))

    assert response.status_code == 200
    assert b"Use at least one letter or digit" in response.content
    assert not User.objects.exists()
    assert not Tenant.objects.exists()


def test_signup_suffixes_a_slug_that_is_taken(client):
    TenantFactory(slug="acme-rockets")
    TenantFactory(slug="acme-rockets-2")

    response = client.post("/accounts/signup/", signup_data())

    assert response["Location"] == "/dashboard/t/acme-rockets-3/tokens/"
    tenant = Tenant.objects.get(slug="acme-rockets-3")
    assert Member.objects.get(tenant=tenant, role=MemberRole.OWNER).user.username == (
        "wile.e@example.test"
    )


def test_a_suffixed_slug_still_fits_the_slug_column():
    base = "a" * 64
    TenantFactory(slug=base)

    slug = slug_unique(base)

    assert slug == "a" * 62 + "-2"


def test_a_logged_in_user_is_only_asked_for_the_organisation_name(client):
    client.force_login(UserFactory())

    page = client.get("/accounts/signup/")

    assert b'name="organisation"' in page.content
    assert b'name="email"' not in page.content
    assert b'name="password1"' not in page.content


def test_a_logged_in_user_creating_another_organisation_owns_both(client, tenant):
    user = UserFactory()
    password_hash = user.password
    MemberFactory(tenant=tenant, user=user, role=MemberRole.OWNER)
    client.force_login(user)

    response = client.post("/accounts/signup/", {"organisation": "Second Org"})

    assert response.status_code == 302
    assert response["Location"] == "/dashboard/t/second-org/tokens/"
    assert User.objects.count() == 1
    owned = Member.objects.filter(user=user, role=MemberRole.OWNER)
    assert sorted(owned.values_list("tenant__slug", flat=True)) == [tenant.slug, "second-org"]
    assert Tenant.objects.get(slug="second-org").tier.slug == "free"
    user.refresh_from_db()
    assert user.password == password_hash
    assert int(client.session[SESSION_KEY]) == user.pk


def test_password_reset_emails_a_link_that_sets_a_new_password(client, mailoutbox):
    UserFactory(username="reset@example.test", email="reset@example.test")

    response = client.post("/accounts/password_reset/", {"email": "Reset@Example.test"})

    assert response["Location"] == "/accounts/password_reset/done/"
    assert len(mailoutbox) == 1
    message = mailoutbox[0]
    assert message.to == ["reset@example.test"]
    assert message.subject == "Reset your CascadeFlow password"
    link = re.search(r"http://testserver(/accounts/reset/\S+/)", message.body).group(1)

    form_page = client.get(link, follow=True)
    assert form_page.status_code == 200
    assert b'name="new_password1"' in form_page.content
    set_password_url = form_page.redirect_chain[-1][0]
    new_password = "granite-kettle-42-orbit"
    done = client.post(
        set_password_url, {"new_password1": new_password, "new_password2": new_password}
    )
    assert done["Location"] == "/accounts/reset/done/"
    assert client.get(done["Location"]).status_code == 200

    login = client.post(
        "/accounts/login/", {"username": "reset@example.test", "password": new_password}
    )
    assert login.status_code == 302
    assert SESSION_KEY in client.session


def test_password_reset_for_an_unknown_email_sends_nothing(client, mailoutbox):
    response = client.post("/accounts/password_reset/", {"email": "nobody@example.test"})

    assert response["Location"] == "/accounts/password_reset/done/"
    assert mailoutbox == []


def test_a_used_reset_link_is_refused(client, mailoutbox):
    UserFactory(username="reset@example.test", email="reset@example.test")
    client.post("/accounts/password_reset/", {"email": "reset@example.test"})
    link = re.search(r"http://testserver(/accounts/reset/\S+/)", mailoutbox[0].body).group(1)
    set_password_url = client.get(link, follow=True).redirect_chain[-1][0]
    client.post(
        set_password_url,
        {"new_password1": "granite-kettle-42-orbit", "new_password2": "granite-kettle-42-orbit"},
    )

    page = client.get(link, follow=True)

    assert b"Link expired" in page.content
    assert b'name="new_password1"' not in page.content


def test_password_change_pages_render_for_a_logged_in_user(client):
    client.force_login(UserFactory())

    page = client.get("/accounts/password_change/")

    assert page.status_code == 200
    assert b'name="old_password"' in page.content
    assert b"Change your password" in page.content


# --- login throttling ----------------------------------------------------------------------

LOGIN = "/accounts/login/"
LOCKED = "Too many failed attempts; try again in 15 minutes."


def log_in(client, username, password, address="203.0.113.7", **extra):
    return client.post(
        LOGIN, {"username": username, "password": password}, REMOTE_ADDR=address, **extra
    )


@pytest.fixture
def owner():
    return UserFactory(username="owner@example.test", email="owner@example.test")


def test_six_wrong_passwords_then_the_right_one_is_refused(client, owner):
    answers = [log_in(client, "owner@example.test", "wrong-guess").status_code for _ in range(6)]

    response = log_in(client, "owner@example.test", "correct-horse-battery")

    assert answers == [200, 200, 200, 200, 429, 429]
    assert response.status_code == 429
    assert LOCKED in response.content.decode()
    assert SESSION_KEY not in client.session


def test_the_lockout_counts_the_account_whatever_its_case(client, owner):
    for username in ["Owner@Example.test", "OWNER@example.test", "owner@EXAMPLE.test"] * 2:
        log_in(client, username, "wrong-guess")

    assert log_in(client, "owner@example.test", "correct-horse-battery").status_code == 429


def test_another_account_from_another_address_is_unaffected(client, owner):
    other = UserFactory(username="other@example.test", email="other@example.test")
    for _ in range(6):
        log_in(client, "owner@example.test", "wrong-guess")

    response = log_in(client, "other@example.test", "correct-horse-battery", "198.51.100.9")

    assert response.status_code == 302
    assert int(client.session[SESSION_KEY]) == other.pk


def test_the_owner_can_still_log_in_from_another_address(client, owner):
    for _ in range(6):
        log_in(client, "owner@example.test", "wrong-guess")

    response = log_in(client, "owner@example.test", "correct-horse-battery", "198.51.100.9")

    assert response.status_code == 302


def test_one_address_failing_on_many_accounts_is_locked_out_for_every_account(client, settings):
    settings.CASCADEFLOW_LOGIN_ADDRESS_FAILURE_LIMIT = 8
    UserFactory(username="victim@example.test", email="victim@example.test")
    for n in range(8):  # never more than 4 per account: under the per-account limit
        log_in(client, f"user{n % 2}@example.test", "wrong-guess")

    refused = log_in(client, "victim@example.test", "correct-horse-battery")
    elsewhere = log_in(client, "victim@example.test", "correct-horse-battery", "198.51.100.9")

    assert refused.status_code == 429
    assert elsewhere.status_code == 302


def test_a_forwarded_for_header_is_not_trusted_by_default(client, owner):
    for n in range(6):
        log_in(client, "owner@example.test", "wrong-guess", HTTP_X_FORWARDED_FOR=f"192.0.2.{n}")

    response = log_in(
        client, "owner@example.test", "correct-horse-battery", HTTP_X_FORWARDED_FOR="192.0.2.99"
    )

    assert response.status_code == 429


@pytest.mark.parametrize(
    ("forwarded", "client"),
    [
        ("192.0.2.1", "192.0.2.1"),
        ("6.6.6.6, 192.0.2.1", "192.0.2.1"),  # what the client claimed is ignored
        ("", "10.0.0.2"),  # no header: the proxy itself
        ("not-an-address", "10.0.0.2"),
    ],
)
def test_behind_a_configured_proxy_the_address_it_saw_is_the_client(
    rf, settings, forwarded, client
):
    settings.CASCADEFLOW_TRUSTED_PROXY_COUNT = 1
    request = rf.post(LOGIN, REMOTE_ADDR="10.0.0.2", HTTP_X_FORWARDED_FOR=forwarded)

    assert client_address(request) == client


def test_behind_two_proxies_the_outer_one_names_the_client(rf, settings):
    settings.CASCADEFLOW_TRUSTED_PROXY_COUNT = 2
    request = rf.post(
        LOGIN, REMOTE_ADDR="10.0.0.2", HTTP_X_FORWARDED_FOR="6.6.6.6, 192.0.2.1, 10.0.0.9"
    )

    assert client_address(request) == "192.0.2.1"


def test_a_configured_proxy_header_separates_clients_behind_the_proxy(client, owner, settings):
    settings.CASCADEFLOW_TRUSTED_PROXY_COUNT = 1
    proxy = "10.0.0.2"
    for n in range(6):  # the attacker varies what it claims; the proxy appends what it saw
        log_in(
            client,
            "owner@example.test",
            "wrong-guess",
            proxy,
            HTTP_X_FORWARDED_FOR=f"6.6.6.{n}, 192.0.2.1",
        )

    locked = log_in(
        client,
        "owner@example.test",
        "correct-horse-battery",
        proxy,
        HTTP_X_FORWARDED_FOR="192.0.2.1",
    )
    other_client = log_in(
        client,
        "owner@example.test",
        "correct-horse-battery",
        proxy,
        HTTP_X_FORWARDED_FOR="198.51.100.20",
    )

    assert locked.status_code == 429
    assert other_client.status_code == 302


def test_after_the_cool_off_the_right_password_works_again(client, owner):
    from axes.models import AccessAttempt

    for _ in range(6):
        log_in(client, "owner@example.test", "wrong-guess")
    assert log_in(client, "owner@example.test", "correct-horse-battery").status_code == 429

    AccessAttempt.objects.update(attempt_time=timezone.now() - timedelta(minutes=16))
    response = log_in(client, "owner@example.test", "correct-horse-battery")

    assert response.status_code == 302
    assert int(client.session[SESSION_KEY]) == owner.pk


def test_failures_are_kept_in_the_failure_log_and_a_lockout_is_logged(client, owner, caplog):
    from axes.models import AccessFailureLog

    with caplog.at_level(logging.WARNING, logger="dashboard.accounts"):
        for _ in range(5):
            log_in(client, "owner@example.test", "wrong-guess")

    assert AccessFailureLog.objects.filter(username="owner@example.test").count() == 5
    assert AccessFailureLog.objects.filter(locked_out=True).count() == 1
    [record] = [r for r in caplog.records if r.name == "dashboard.accounts"]
    assert "locked out" in record.getMessage()
    assert "'owner@example.test' from 203.0.113.7" in record.getMessage()


def test_the_admin_login_is_throttled_too(client):
    get_user_model().objects.create_superuser(
        "root@example.test", "root@example.test", "Adm1n-pass-42"
    )
    for _ in range(6):
        client.post(
            "/admin/login/?next=/admin/",
            {"username": "root@example.test", "password": "wrong-guess"},
            REMOTE_ADDR="203.0.113.7",
        )

    response = client.post(
        "/admin/login/?next=/admin/",
        {"username": "root@example.test", "password": "Adm1n-pass-42"},
        REMOTE_ADDR="203.0.113.7",
    )

    assert response.status_code == 429
    assert LOCKED in response.content.decode()
    assert SESSION_KEY not in client.session


# --- email verification and the sign-up limit ----------------------------------------------


def verification_link(message) -> str:
    return re.search(r"http://testserver(/accounts/verify/\S+/)", message.body).group(1)


def signed_up_token(client) -> str:
    response = client.post("/accounts/signup/", signup_data())
    page = client.get(response["Location"]).content.decode()
    return re.search(r"cf_[A-Za-z0-9_\-]{20,}", page).group(0)


def test_signup_emails_a_link_that_activates_the_tenants_tokens(client, mailoutbox):
    raw = signed_up_token(client)
    tenant = Tenant.objects.get()
    assert tenant.email_verified_at is None
    [message] = mailoutbox
    assert message.to == ["wile.e@example.test"]
    assert message.subject == "Verify your email to activate CascadeFlow"
    client.logout()  # the link works from any browser

    page = client.get(verification_link(message))

    assert page.status_code == 200
    assert b"Email verified" in page.content
    tenant.refresh_from_db()
    assert tenant.email_verified_at is not None
    assert token_context_for_raw(raw=raw, now=timezone.now()).tenant_id == tenant.pk
    event = AuditEvent.objects.get(tenant=tenant, action="tenant.email_verify")
    assert (event.target, event.actor.username) == ("wile.e@example.test", "wile.e@example.test")


def test_a_verification_link_works_once_in_effect(client, mailoutbox):
    signed_up_token(client)
    link = verification_link(mailoutbox[0])
    client.get(link)

    again = client.get(link)

    assert again.status_code == 200
    assert AuditEvent.objects.filter(action="tenant.email_verify").count() == 1


def test_an_expired_or_tampered_link_verifies_nothing(client, mailoutbox, settings):
    signed_up_token(client)
    link = verification_link(mailoutbox[0])
    settings.CASCADEFLOW_EMAIL_VERIFICATION_SECONDS = -1

    expired = client.get(link)
    settings.CASCADEFLOW_EMAIL_VERIFICATION_SECONDS = 3600
    tampered = client.get(link[:-3] + "xx/")

    assert expired.status_code == tampered.status_code == 400
    assert b"invalid or has expired" in expired.content
    assert Tenant.objects.get().email_verified_at is None


def test_a_link_for_an_email_the_owner_no_longer_has_verifies_nothing(client, mailoutbox):
    signed_up_token(client)
    User.objects.update(email="someone-else@example.test")

    response = client.get(verification_link(mailoutbox[0]))

    assert response.status_code == 400
    assert Tenant.objects.get().email_verified_at is None


def test_an_owner_can_have_the_link_sent_again(client, mailoutbox):
    signed_up_token(client)

    page = client.get("/accounts/verify/")
    sent = client.post("/accounts/verify/", follow=True)

    assert b"Acme Rockets" in page.content
    assert b"We sent a new verification link to wile.e@example.test" in sent.content
    assert len(mailoutbox) == 2
    client.get(verification_link(mailoutbox[1]))
    assert client.get("/accounts/verify/").content.count(b"Acme Rockets") == 0


def test_a_logged_in_user_creating_another_organisation_verifies_it_too(client, mailoutbox):
    user = UserFactory(username="boss@example.test", email="boss@example.test")
    client.force_login(user)

    client.post("/accounts/signup/", {"organisation": "Second Org"})

    tenant = Tenant.objects.get(slug="second-org")
    assert tenant.email_verified_at is None
    assert mailoutbox[0].to == ["boss@example.test"]
    client.get(verification_link(mailoutbox[0]))
    tenant.refresh_from_db()
    assert tenant.email_verified_at is not None


def test_sign_ups_are_limited_per_client_address(client):
    for n in range(5):
        response = client.post(
            "/accounts/signup/",
            signup_data(organisation=f"Org {n}", email=f"user{n}@example.test"),
            REMOTE_ADDR="203.0.113.7",
        )
        assert response.status_code == 302, n
        client.logout()

    refused = client.post(
        "/accounts/signup/",
        signup_data(organisation="Org 5", email="user5@example.test"),
        REMOTE_ADDR="203.0.113.7",
    )
    elsewhere = client.post(
        "/accounts/signup/",
        signup_data(organisation="Org 6", email="user6@example.test"),
        REMOTE_ADDR="198.51.100.9",
    )

    assert refused.status_code == 429
    assert "Too many sign-ups from your address; try again in" in refused.content.decode()
    assert elsewhere.status_code == 302
    assert sorted(Tenant.objects.values_list("slug", flat=True)) == [
        "org-0",
        "org-1",
        "org-2",
        "org-3",
        "org-4",
        "org-6",
    ]


def test_refused_or_invalid_sign_ups_do_not_count(client, settings):
    settings.CASCADEFLOW_SIGNUP_RATE = "1/hour"
    client.post("/accounts/signup/", signup_data(password2="mismatch"))

    response = client.post("/accounts/signup/", signup_data())

    assert response.status_code == 302
