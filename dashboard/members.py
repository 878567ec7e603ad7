"""The owner-only Members page: who belongs to a tenant, and with which role.

Owners add members by email (a new email gets an account with no password and a
link to set one), change roles and remove members.

Invariants:
- Every member is looked up with ``tenant=request.access.tenant``: another tenant's
  member id is a 404, the same as a missing one.
- A tenant always keeps at least one owner. Demotions and removals lock the
  tenant's owner rows (``select_for_update``) and count them in the same
  transaction, so two concurrent demotions cannot both pass the check. The acting
  user must still be an owner at that point, too.
- Every change writes an audit event (``member.add``, ``member.role``,
  ``member.remove``) in the same transaction.
- Nobody gives a member more than they have: the role given, on invitation or
  change, is at most the acting member's own (``tenants.services.role_grant_check``,
  the rule API tokens follow too).
"""

from django import forms
from django.contrib import messages
from django.contrib.auth import get_user_model
from django.contrib.auth.forms import PasswordResetForm
from django.contrib.auth.models import AbstractBaseUser
from django.core.exceptions import PermissionDenied
from django.db import IntegrityError, transaction
from django.http import HttpRequest, HttpResponse
from django.shortcuts import get_object_or_404, redirect
from django.views.decorators.http import require_http_methods, require_POST

from dashboard.access import ROLE_RANK, render_page, tenant_view
from dashboard.accounts import users_with_email
from dashboard.forms import DashboardForm
from tenants.enums import MemberRole
from tenants.models import Member, Tenant
from tenants.services import GrantExceedsHolder, audit_record, role_grant_check

USERNAME_MAX_LENGTH = get_user_model()._meta.get_field("username").max_length
ALREADY_MEMBER = "This person is already a member of this tenant."
LAST_OWNER = "A tenant needs at least one owner: make someone else an owner first."


class MemberAddForm(DashboardForm):
    email = forms.EmailField(max_length=USERNAME_MAX_LENGTH)
    role = forms.ChoiceField(choices=MemberRole.choices, initial=MemberRole.VIEWER)

    def __init__(self, *args, tenant: Tenant, **kwargs):
        super().__init__(*args, **kwargs)
        self.tenant = tenant

    def clean_email(self) -> str:
        email = self.cleaned_data["email"].strip().lower()
        user = user_by_email(email)
        if user is not None and Member.objects.filter(tenant=self.tenant, user=user).exists():
            raise forms.ValidationError(ALREADY_MEMBER)
        return email


class MemberRoleForm(DashboardForm):
    role = forms.ChoiceField(choices=MemberRole.choices)


class _InviteForm(PasswordResetForm):
    """Django's reset email, for exactly one user, even one with no usable password.

    The stock ``get_users`` skips users with unusable passwords, which is every
    user invited here; this one yields the invited user only.
    """

    def __init__(self, *, user: AbstractBaseUser):
        super().__init__({"email": user.email})
        self.invited = user

    def get_users(self, email):
        yield self.invited


def user_by_email(email: str) -> AbstractBaseUser | None:
    """The user whose username or email is ``email`` (case-insensitive), username first."""
    return users_with_email(email).first()


def send_invite(request: HttpRequest, user: AbstractBaseUser) -> None:
    form = _InviteForm(user=user)
    if not form.is_valid():  # an existing user with no (valid) email address
        return
    form.save(
        request=request,
        use_https=request.is_secure(),
        subject_template_name="registration/invite_subject.txt",
        email_template_name="registration/invite_email.html",
        extra_email_context={"tenant": request.access.tenant, "inviter": request.user},
    )


def _user_get_or_create(email: str) -> tuple[AbstractBaseUser, bool]:
    user = user_by_email(email)
    if user is not None:
        return user, False
    user_model = get_user_model()
    try:
        with transaction.atomic():
            user = user_model(username=email, email=email)
            user.set_unusable_password()
            user.save()
    except IntegrityError:  # created concurrently under the same (lower-cased) username
        return user_model.objects.get(username=email), False
    return user, True


def _lock_owners(request: HttpRequest, tenant: Tenant) -> list[Member]:
    """The tenant's owner rows, locked until the transaction ends; the actor must be one."""
    owners = list(
        Member.objects.select_for_update()
        .filter(tenant=tenant, role=MemberRole.OWNER)
        .order_by("pk")
    )
    if request.user.pk not in {owner.user_id for owner in owners}:
        raise PermissionDenied("Only owners manage members.")
    return owners


def _grant_check(request: HttpRequest, tenant: Tenant, role: str) -> None:
    """The acting member's role, read under the transaction's locks, bounds the role given."""
    acting = Member.objects.get(tenant=tenant, user=request.user)
    try:
        role_grant_check(acting_role=acting.role, role=role)
    except GrantExceedsHolder as exc:
        raise PermissionDenied(str(exc)) from None


def _label(member: Member) -> str:
    return member.user.email or member.user.get_username()


@tenant_view(MemberRole.OWNER)
@require_http_methods(["GET", "POST"])
def members(request: HttpRequest) -> HttpResponse:
    """List members and add one by email."""
    tenant = request.access.tenant
    if request.method == "POST":
        form = MemberAddForm(request.POST, tenant=tenant)
        if form.is_valid():
            email, role = form.cleaned_data["email"], form.cleaned_data["role"]
            try:
                with transaction.atomic():
                    _lock_owners(request, tenant)
                    _grant_check(request, tenant, role)
                    user, created = _user_get_or_create(email)
                    with transaction.atomic():
                        Member.objects.create(tenant=tenant, user=user, role=role)
                    audit_record(
                        tenant=tenant,
                        action="member.add",
                        target=user.get_username(),
                        acting_user=request.user,
                        data={"role": role, "new_user": created},
                    )
            except IntegrityError:  # added concurrently
                form.add_error("email", ALREADY_MEMBER)
            else:
                # A new user, or one invited before who never set a password: send the link.
                invited = created or not user.has_usable_password()
                if invited:
                    send_invite(request, user)
                label = MemberRole(role).label.lower()
                if invited:
                    messages.success(
                        request,
                        f"Invited {email} as {label}: we emailed them a link to set a password.",
                    )
                else:
                    messages.success(request, f"Added {email} as {label}.")
                return redirect("dashboard:members", tenant.slug)
    else:
        form = MemberAddForm(tenant=tenant)
    rows = sorted(
        Member.objects.filter(tenant=tenant).select_related("user"),
        key=lambda m: (-ROLE_RANK[m.role], _label(m).lower()),
    )
    owner_count = sum(1 for m in rows if m.role == MemberRole.OWNER)
    return render_page(
        request,
        "members.html",
        "members",
        {
            "form": form,
            "members": rows,
            "owner_count": owner_count,
            "roles": MemberRole.choices,
        },
    )


@tenant_view(MemberRole.OWNER)
@require_POST
def member_role(request: HttpRequest, member_id: int) -> HttpResponse:
    tenant = request.access.tenant
    form = MemberRoleForm(request.POST)
    if not form.is_valid():
        get_object_or_404(Member, pk=member_id, tenant=tenant)
        messages.error(request, "Pick a role: owner, admin or viewer.")
        return redirect("dashboard:members", tenant.slug)
    role = form.cleaned_data["role"]
    with transaction.atomic():
        owners = _lock_owners(request, tenant)
        _grant_check(request, tenant, role)
        member = get_object_or_404(
            Member.objects.select_for_update().select_related("user"), pk=member_id, tenant=tenant
        )
        previous = member.role
        if previous == role:
            messages.info(request, f"{_label(member)} is already {MemberRole(role).label.lower()}.")
            return redirect("dashboard:members", tenant.slug)
        if previous == MemberRole.OWNER and [o.pk for o in owners] == [member.pk]:
            messages.error(request, LAST_OWNER)
            return redirect("dashboard:members", tenant.slug)
        member.role = role
        member.save(update_fields=["role"])
        audit_record(
            tenant=tenant,
            action="member.role",
            target=member.user.get_username(),
            acting_user=request.user,
            data={"from": previous, "to": role},
        )
    messages.success(request, f"{_label(member)} is now {MemberRole(role).label.lower()}.")
    if member.user_id == request.user.pk:  # demoted yourself: this page is owners-only
        return redirect("dashboard:overview", tenant.slug)
    return redirect("dashboard:members", tenant.slug)


@tenant_view(MemberRole.OWNER)
@require_POST
def member_remove(request: HttpRequest, member_id: int) -> HttpResponse:
    tenant = request.access.tenant
    with transaction.atomic():
        owners = _lock_owners(request, tenant)
        member = get_object_or_404(
            Member.objects.select_for_update().select_related("user"), pk=member_id, tenant=tenant
        )
        if member.role == MemberRole.OWNER and [o.pk for o in owners] == [member.pk]:
            messages.error(request, LAST_OWNER)
            return redirect("dashboard:members", tenant.slug)
        audit_record(
            tenant=tenant,
            action="member.remove",
            target=member.user.get_username(),
            acting_user=request.user,
            data={"role": member.role},
        )
        member.delete()
    messages.success(request, f"Removed {_label(member)} from {tenant.name}.")
    if member.user_id == request.user.pk:  # left the tenant: nothing of it to show any more
        return redirect("dashboard:home")
    return redirect("dashboard:members", tenant.slug)
