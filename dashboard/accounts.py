"""Self-serve sign-up: a new user, their tenant, and the free plan.

A visitor gives an organisation name, an email and a password and leaves as the
logged-in owner of a new tenant on the free tier. A user who is already logged in
only names the organisation and becomes its owner as well.

Invariants:
- Usernames of self-serve users are their email, lower-cased; no two users share an
  email or username case-insensitively (checked here, and by the username unique
  constraint for concurrent sign-ups, since both store the lower-cased form).
- An existing account is never touched: sign-up refuses a taken email rather than
  going through ``user_get_or_create``, which would reset that user's password.
- User, tenant, owner membership, plan and audit rows commit together or not at all.
- A self-serve tenant's API tokens work only once its owner opened the verification
  link emailed to them (signed, expiring; ``tenants.selectors`` refuses the tokens
  until then). The dashboard works meanwhile.
- Sign-ups are limited per client address (``CASCADEFLOW_SIGNUP_RATE``), and the
  free tier they land on has its own limits (``CASCADEFLOW_FREE_TIER_*``).

Logins are throttled here too (django-axes; see ``LoginThrottle``).
"""

import ipaddress
import logging
import math
from dataclasses import dataclass

from axes.handlers.database import AxesDatabaseHandler
from axes.helpers import get_cool_off
from axes.models import AccessAttempt
from django import forms
from django.conf import settings
from django.contrib import messages
from django.contrib.auth import get_user_model, login
from django.contrib.auth.decorators import login_required
from django.contrib.auth.forms import AuthenticationForm
from django.contrib.auth.models import AbstractBaseUser
from django.contrib.auth.password_validation import validate_password
from django.core import signing
from django.core.exceptions import ObjectDoesNotExist
from django.core.mail import send_mail
from django.db import IntegrityError, transaction
from django.db.models import Case, Q, QuerySet, Sum, When
from django.http import HttpRequest, HttpResponse
from django.shortcuts import redirect, render
from django.template.loader import render_to_string
from django.urls import reverse
from django.utils.text import slugify
from limits import parse as parse_rate

from dashboard.manage_views import NEW_TOKEN_SESSION_KEY
from tenants.enums import MemberRole
from tenants.models import Member, Tenant
from tenants.ratelimits import COUNT, PEEK, Window, limiter
from tenants.services import (
    IssuedToken,
    audit_record,
    tenant_create,
    tenant_email_verify,
    tier_ensure_defaults,
)

SLUG_MAX_LENGTH = Tenant._meta.get_field("slug").max_length
NAME_MAX_LENGTH = Tenant._meta.get_field("name").max_length
USERNAME_MAX_LENGTH = get_user_model()._meta.get_field("username").max_length
SLUG_ATTEMPTS = 3

logger = logging.getLogger(__name__)
# Sign-up logs the new user in itself; two backends are configured (axes' and Django's).
LOGIN_BACKEND = "django.contrib.auth.backends.ModelBackend"

EMAIL_TAKEN = "An account with this email already exists. Log in to create another organisation."
NAME_UNUSABLE = "Use at least one letter or digit (a-z, 0-9) in the organisation name."
VERIFY_SALT = "cascadeflow.accounts.verify-email"


class EmailTakenError(ValueError):
    pass


@dataclass(frozen=True)
class SignedUp:
    tenant: Tenant
    user: AbstractBaseUser
    new_user: bool
    issued: IssuedToken


def users_with_email(email: str) -> QuerySet:
    """Users whose username or email is ``email`` (case-insensitive): username matches
    first, then the oldest account."""
    return (
        get_user_model()
        .objects.filter(Q(username__iexact=email) | Q(email__iexact=email))
        .order_by(Case(When(username__iexact=email, then=0), default=1), "pk")
    )


def email_taken(email: str) -> bool:
    return users_with_email(email).exists()


def slug_base(name: str) -> str:
    return slugify(name)[:SLUG_MAX_LENGTH].strip("-")


def slug_unique(base: str) -> str:
    """``base``, or ``base-2``, ``base-3``… (truncated to fit) for the first free one."""
    taken = set(
        Tenant.objects.filter(slug__startswith=base[: SLUG_MAX_LENGTH - 12]).values_list(
            "slug", flat=True
        )
    )
    candidate, n = base, 1
    while candidate in taken:
        n += 1
        suffix = f"-{n}"
        candidate = base[: SLUG_MAX_LENGTH - len(suffix)].rstrip("-") + suffix
    return candidate


@transaction.atomic
def organisation_signup(
    *,
    name: str,
    acting_user: AbstractBaseUser | None = None,
    email: str = "",
    password: str = "",
) -> SignedUp:
    """Create a tenant on the free plan owned by ``acting_user``, or by a new user.

    Without ``acting_user`` a user ``email``/``password`` is created first; a taken
    email raises :class:`EmailTakenError` and nothing is written.
    """
    base = slug_base(name)
    if not base:
        raise ValueError(NAME_UNUSABLE)
    new_user = acting_user is None
    if acting_user is None:
        email = email.strip().lower()
        if email_taken(email):
            raise EmailTakenError(EMAIL_TAKEN)
        try:
            with transaction.atomic():
                acting_user = get_user_model().objects.create_user(
                    username=email, email=email, password=password
                )
        except IntegrityError:
            raise EmailTakenError(EMAIL_TAKEN) from None
    free = tier_ensure_defaults()
    for attempt in range(SLUG_ATTEMPTS):
        # A concurrent sign-up may take the slug between the check and the insert.
        try:
            with transaction.atomic():
                created = tenant_create(
                    slug=slug_unique(base),
                    name=name,
                    tier=free,
                    acting_user=acting_user,
                    email_verified=False,
                )
                tenant = created.tenant
            break
        except IntegrityError:
            if attempt == SLUG_ATTEMPTS - 1:
                raise
    Member.objects.create(tenant=tenant, user=acting_user, role=MemberRole.OWNER)
    audit_record(
        tenant=tenant,
        action="member.add",
        target=acting_user.get_username(),
        acting_user=acting_user,
        data={"role": MemberRole.OWNER, "via": "signup", "new_user": new_user},
    )
    return SignedUp(tenant=tenant, user=acting_user, new_user=new_user, issued=created.issued)


class SignupForm(forms.Form):
    organisation = forms.CharField(label="Organisation name", max_length=NAME_MAX_LENGTH)
    email = forms.EmailField(label="Email", max_length=USERNAME_MAX_LENGTH)
    password1 = forms.CharField(
        label="Password", strip=False, widget=forms.PasswordInput({"autocomplete": "new-password"})
    )
    password2 = forms.CharField(
        label="Confirm password",
        strip=False,
        widget=forms.PasswordInput({"autocomplete": "new-password"}),
    )

    def __init__(self, *args, user: AbstractBaseUser | None = None, **kwargs):
        super().__init__(*args, **kwargs)
        self.existing_user = user if user is not None and user.is_authenticated else None
        if self.existing_user is not None:
            for field in ("email", "password1", "password2"):
                del self.fields[field]
        self.fields["organisation"].widget.attrs["autofocus"] = True

    def clean_organisation(self) -> str:
        name = self.cleaned_data["organisation"]
        if not slug_base(name):
            raise forms.ValidationError(NAME_UNUSABLE)
        return name

    def clean_email(self) -> str:
        email = self.cleaned_data["email"].lower()
        if email_taken(email):
            raise forms.ValidationError(EMAIL_TAKEN)
        return email

    def clean(self) -> dict:
        cleaned = super().clean()
        if self.existing_user is not None:
            return cleaned
        password1, password2 = cleaned.get("password1"), cleaned.get("password2")
        if password1 and password2 and password1 != password2:
            self.add_error("password2", "The two passwords don't match.")
        elif password1 and password2:
            email = cleaned.get("email", "")
            candidate = get_user_model()(username=email, email=email)
            try:
                validate_password(password1, user=candidate)
            except forms.ValidationError as error:
                self.add_error("password2", error)
        return cleaned


# --- sign-up limit and email verification -------------------------------------------------


def _signup_window(request: HttpRequest) -> Window:
    item = parse_rate(settings.CASCADEFLOW_SIGNUP_RATE)
    name = f"signup:{client_address(request)}"
    return Window(name, item.amount, 1, item.get_expiry())


def signup_wait_minutes(request: HttpRequest) -> int:
    """0 if this client address may sign up now, else the minutes until it may."""
    if not settings.CASCADEFLOW_SIGNUP_RATE:
        return 0
    refused, retry_after = limiter().acquire([_signup_window(request)], mode=PEEK)
    return max(1, math.ceil(retry_after / 60)) if refused else 0


def signup_count(request: HttpRequest) -> None:
    if settings.CASCADEFLOW_SIGNUP_RATE:
        limiter().acquire([_signup_window(request)], mode=COUNT)


def verification_token(*, tenant: Tenant, user: AbstractBaseUser) -> str:
    """Signed (SECRET_KEY) and timestamped; names the tenant, the owner and their email."""
    return signing.dumps(
        {"t": tenant.pk, "u": user.pk, "e": user.email.lower()}, salt=VERIFY_SALT, compress=True
    )


def verification_send(request: HttpRequest, *, tenant: Tenant, user: AbstractBaseUser) -> None:
    """Email the owner the link that activates the tenant's API tokens."""
    link = request.build_absolute_uri(
        reverse("verify_email", args=[verification_token(tenant=tenant, user=user)])
    )
    context = {
        "tenant": tenant,
        "link": link,
        "hours": settings.CASCADEFLOW_EMAIL_VERIFICATION_SECONDS // 3600,
    }
    send_mail(
        render_to_string("registration/verify_email_subject.txt", context).strip(),
        render_to_string("registration/verify_email_email.txt", context),
        settings.DEFAULT_FROM_EMAIL,
        [user.email],
    )


def verify_email(request: HttpRequest, token: str) -> HttpResponse:
    """The emailed link: a valid, unexpired one verifies the tenant (no login needed)."""
    try:
        claim = signing.loads(
            token, salt=VERIFY_SALT, max_age=settings.CASCADEFLOW_EMAIL_VERIFICATION_SECONDS
        )
        tenant = Tenant.objects.get(pk=claim["t"])
        user = get_user_model().objects.get(pk=claim["u"], email__iexact=claim["e"])
        if not Member.objects.filter(tenant=tenant, user=user, role=MemberRole.OWNER).exists():
            raise Member.DoesNotExist
    except (signing.BadSignature, KeyError, TypeError, ObjectDoesNotExist):
        return render(request, "registration/verify_email.html", {"invalid": True}, status=400)
    tenant_email_verify(tenant=tenant, email=claim["e"], acting_user=user)
    return render(request, "registration/verify_email.html", {"verified": tenant})


def unverified_tenants(user: AbstractBaseUser) -> QuerySet:
    return Tenant.objects.filter(
        members__user=user, members__role=MemberRole.OWNER, email_verified_at__isnull=True
    ).order_by("name")


@login_required
def verify_pending(request: HttpRequest) -> HttpResponse:
    """The owner's organisations still waiting for verification; POST sends the links again
    (counted like sign-ups, so it cannot be used to send mail in bulk)."""
    pending = list(unverified_tenants(request.user))
    if request.method == "POST" and pending:
        wait = signup_wait_minutes(request)
        if wait:
            messages.error(request, f"Too many emails sent; try again in {wait} minutes.")
        else:
            signup_count(request)
            for tenant in pending:
                verification_send(request, tenant=tenant, user=request.user)
            messages.info(request, f"We sent a new verification link to {request.user.email}.")
        return redirect("verify_pending")
    return render(request, "registration/verify_pending.html", {"pending": pending})


def signup(request: HttpRequest) -> HttpResponse:
    user = request.user if request.user.is_authenticated else None
    form = SignupForm(request.POST or None, user=user)
    if request.method == "POST" and (wait := signup_wait_minutes(request)):
        form.is_valid()
        form.add_error(None, f"Too many sign-ups from your address; try again in {wait} minutes.")
        return render(request, "registration/signup.html", {"form": form}, status=429)
    if request.method == "POST" and form.is_valid():
        data = form.cleaned_data
        try:
            done = organisation_signup(
                name=data["organisation"],
                acting_user=user,
                email=data.get("email", ""),
                password=data.get("password1", ""),
            )
        except EmailTakenError as error:
            form.add_error("email", str(error))
        else:
            signup_count(request)
            verification_send(request, tenant=done.tenant, user=done.user)
            messages.info(
                request,
                f"We sent a link to {done.user.email}: open it to activate "
                f"{done.tenant.name}'s API keys.",
            )
            if done.new_user:
                login(request, done.user, backend=LOGIN_BACKEND)
            # The tenant's first API token, shown once on the tokens page.
            request.session[NEW_TOKEN_SESSION_KEY] = {
                "tenant_id": done.tenant.pk,
                "token_id": done.issued.token.pk,
                "raw": done.issued.raw,
            }
            return redirect("dashboard:tokens", done.tenant.slug)
    return render(request, "registration/signup.html", {"form": form})


# --- login throttling (django-axes; see the AXES_* settings) -------------------------------


def client_address(request: HttpRequest) -> str:
    """The client's address, from a trusted source only (``CASCADEFLOW_TRUSTED_PROXY_COUNT``).

    ``REMOTE_ADDR`` by default. Behind N proxies that each append the address they
    saw to ``X-Forwarded-For``, the N-th entry from the right is the one the
    outermost proxy saw; entries further left are the client's own claims. A
    header too short for the configured proxies falls back to ``REMOTE_ADDR``.
    """
    remote = request.META.get("REMOTE_ADDR", "")
    count = settings.CASCADEFLOW_TRUSTED_PROXY_COUNT
    if count > 0:
        hops = [h.strip() for h in request.META.get("HTTP_X_FORWARDED_FOR", "").split(",")]
        hops = [h for h in hops if h]
        if len(hops) >= count:
            try:
                return str(ipaddress.ip_address(hops[-count]))
            except ValueError:
                pass
    return remote


def login_username(request: HttpRequest, credentials: dict | None) -> str | None:
    """The username failures are counted under: usernames are lower-cased emails, so
    ``Boss@X`` and ``boss@x`` are one account to the throttle as to the login."""
    field = settings.AXES_USERNAME_FORM_FIELD
    raw = credentials.get(field) if credentials else request.POST.get(field)
    return raw.strip().lower() if isinstance(raw, str) else raw


class LoginThrottle(AxesDatabaseHandler):
    """Two limits over the cool-off window, from the failures axes records.

    - ``AXES_FAILURE_LIMIT`` failures for one account from one client address lock
      that pair out (``AXES_LOCKOUT_PARAMETERS``): guessing one password is stopped,
      and the owner can still log in from elsewhere.
    - ``CASCADEFLOW_LOGIN_ADDRESS_FAILURE_LIMIT`` failures from one address, over any
      accounts, lock the address out: spraying many accounts is stopped too.

    Lockouts are not audit events: ``AuditEvent`` rows belong to a tenant and a login
    has none (one user may be a member of several tenants, or of none). Each failure
    is in axes' access-failure log (``AXES_ENABLE_ACCESS_FAILURE_LOG``, in the admin),
    and a lockout is logged as a warning by ``dashboard.accounts`` for alerting.
    """

    def get_failures(self, request, credentials: dict | None = None) -> int:
        account = max(
            (
                attempts.aggregate(n=Sum("failures_since_start"))["n"] or 0
                for attempts in self.get_user_attempts(request, credentials)
            ),
            default=0,
        )
        threshold = request.axes_attempt_time - get_cool_off(request)
        address = (
            AccessAttempt.objects.filter(
                ip_address=request.axes_ip_address, attempt_time__gte=threshold
            ).aggregate(n=Sum("failures_since_start"))["n"]
            or 0
        )
        if address >= settings.CASCADEFLOW_LOGIN_ADDRESS_FAILURE_LIMIT:
            return max(account, settings.AXES_FAILURE_LIMIT)
        return account

    def user_login_failed(self, sender, credentials: dict, request=None, **kwargs):
        super().user_login_failed(sender, credentials, request=request, **kwargs)
        if request is not None and getattr(request, "axes_locked_out", False):
            logger.warning(
                "Login locked out: account %r from %s after %s failures",
                login_username(request, credentials),
                request.axes_ip_address,
                getattr(request, "axes_failures_since_start", "repeated"),
            )


def lockout_message() -> str:
    minutes = math.ceil(settings.AXES_COOLOFF_TIME.total_seconds() / 60)
    return f"Too many failed attempts; try again in {minutes} minutes."


def login_locked_out(request: HttpRequest, *args: object) -> HttpResponse:
    """The login page again, saying why and for how long (HTTP 429)."""
    return render(
        request,
        "registration/login.html",
        {
            "form": AuthenticationForm(request),
            "locked_out": lockout_message(),
            "next": request.POST.get("next", "") or request.GET.get("next", ""),
        },
        status=429,
    )
