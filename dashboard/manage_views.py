"""Admin pages of the dashboard: tokens, provider keys, budgets and alerts, end-user tiers,
billing, exports, calibration rollback.

Tenancy: every object is looked up with ``tenant=request.access.tenant``, so
another tenant's id is a 404, the same as a missing one. Roles come from
:func:`dashboard.access.tenant_view`: viewers read, admins manage, owners bill.
"""

from dataclasses import dataclass
from urllib.parse import urlencode

from django.conf import settings
from django.contrib import messages
from django.http import Http404, HttpRequest, HttpResponse, StreamingHttpResponse
from django.shortcuts import get_object_or_404, redirect
from django.urls import reverse
from django.utils import timezone
from django.utils.cache import add_never_cache_headers
from django.views.decorators.http import require_GET, require_http_methods, require_POST

from billing.exports import (
    download_token,
    export_job_queue,
    grouped_rows,
    rows,
    stream_in_batches,
)
from billing.models import ExportJob
from core.money import nanos_to_usd
from dashboard import selectors
from dashboard.access import forbidden, render_page, tenant_view
from dashboard.forms import (
    PROVIDERS,
    BudgetCreateForm,
    BudgetEditForm,
    EndUserTierForm,
    ExportForm,
    ProviderKeyRotateForm,
    ProviderModelForm,
    TokenCreateForm,
    tenant_zone,
)
from routing import calibrations, tenant_models
from routing import selectors as routing_selectors
from routing.models import CalibrationVersion, TenantProviderModel
from tenants import services
from tenants.enums import MemberRole
from tenants.models import (
    ApiToken,
    Budget,
    EndUser,
    EndUserTier,
)

NEW_TOKEN_SESSION_KEY = "dashboard_new_token"  # noqa: S105 - a session key, not a secret
MAX_VERSION = 2**31 - 1  # a version number the database can hold; beyond it, a 404


# --- API tokens ------------------------------------------------------------------------


@tenant_view(MemberRole.ADMIN)
@require_http_methods(["GET", "POST"])
def tokens(request: HttpRequest) -> HttpResponse:
    """List and create tokens. A new token's raw value is shown on the next GET only."""
    tenant = request.access.tenant
    if request.method == "POST":
        form = TokenCreateForm(request.POST, tenant=tenant)
        if form.is_valid():
            try:
                issued = services.token_create(
                    tenant=tenant,
                    name=form.cleaned_data["name"],
                    scopes=form.cleaned_data["scopes"],
                    expires_at=form.expires_at(),
                    acting_user=request.user,
                    granted_by=services.role_scopes(request.access.role),
                )
            except services.GrantExceedsHolder as exc:
                form.add_error("scopes", str(exc))
            else:
                request.session[NEW_TOKEN_SESSION_KEY] = {
                    "tenant_id": tenant.pk,
                    "token_id": issued.token.pk,
                    "raw": issued.raw,
                }
                messages.success(request, f"Token “{issued.token.name}” created.")
                return redirect("dashboard:tokens", tenant.slug)
    else:
        form = TokenCreateForm(tenant=tenant)
    # Popped whatever tenant it was made for: the raw value is never shown twice.
    new = request.session.pop(NEW_TOKEN_SESSION_KEY, None)
    if new is not None and new.get("tenant_id") != tenant.pk:
        new = None
    response = render_page(
        request,
        "tokens.html",
        "tokens",
        {
            "form": form,
            "new_token": new,
            "tokens": selectors.tokens_of(tenant=tenant),
            "now": timezone.now(),
        },
    )
    if new is not None:
        add_never_cache_headers(response)
    return response


@tenant_view(MemberRole.ADMIN)
@require_POST
def token_revoke(request: HttpRequest, token_id: int) -> HttpResponse:
    tenant = request.access.tenant
    token = get_object_or_404(ApiToken, pk=token_id, tenant=tenant)
    services.token_revoke(tenant=tenant, token=token, acting_user=request.user)
    messages.success(request, f"Token “{token.name}” ({token.mask}) revoked.")
    return redirect("dashboard:tokens", tenant.slug)


# --- provider keys (bring your own key) -------------------------------------------------

PROVIDER_LABELS: dict[str, str] = {}  # "openai" is OpenAI's (the compatible servers' comes later)
for _provider in PROVIDERS.values():
    if _provider.prefix:
        PROVIDER_LABELS.setdefault(_provider.prefix, _provider.label)


@dataclass(frozen=True)
class ProviderModelRow:
    model: TenantProviderModel

    @property
    def provider(self) -> str:
        prefix = self.model.litellm_model.split("/", 1)[0]
        if prefix == "openai" and self.model.api_base:
            return "OpenAI-compatible"
        return PROVIDER_LABELS.get(prefix, prefix)

    @property
    def upstream(self) -> str:
        return self.model.litellm_model.split("/", 1)[-1]

    @property
    def input_price(self) -> str:
        return _decimal_text(self.model.input_usd_per_mtok)

    @property
    def output_price(self) -> str:
        return _decimal_text(self.model.output_usd_per_mtok)


def _decimal_text(value) -> str:
    text = f"{value:f}"
    return text.rstrip("0").rstrip(".") if "." in text else text


def _provider_keys_page(request: HttpRequest, form: ProviderModelForm | None) -> HttpResponse:
    rows = selectors.provider_models_of(tenant=request.access.tenant)
    return render_page(
        request,
        "provider_keys.html",
        "provider_keys",
        {
            "form": form,
            "rows": [ProviderModelRow(row) for row in rows],
            "providers": PROVIDERS,
        },
    )


@tenant_view()
@require_http_methods(["GET", "POST"])
def provider_keys(request: HttpRequest) -> HttpResponse:
    """Everyone reads the tenant's own provider models and their key masks; admins and
    owners add them here (validated with one cheap call by the API's own service)."""
    access = request.access
    tenant = access.tenant
    if request.method == "GET":
        return _provider_keys_page(request, ProviderModelForm() if access.can_manage else None)
    if not access.can_manage:
        return forbidden(request, MemberRole.ADMIN)
    form = ProviderModelForm(request.POST)
    if form.is_valid():
        try:
            row = tenant_models.provider_model_create(
                tenant=tenant, acting_user=request.user, **form.values()
            )
        except tenant_models.ProviderModelInvalid as exc:
            form.add_service_error(exc)
        else:
            messages.success(
                request, f"“{row.name}” saved: the provider accepted the key. Call it by this name."
            )
            return redirect("dashboard:provider_keys", tenant.slug)
    return _provider_keys_page(request, form)


@tenant_view(MemberRole.ADMIN)
@require_http_methods(["GET", "POST"])
def provider_key_rotate(request: HttpRequest, model_id: int) -> HttpResponse:
    """Replace a model's key in place: the old key serves until the new one passes the
    validation call (``tenant_models.provider_model_rotate``)."""
    tenant = request.access.tenant
    row = get_object_or_404(TenantProviderModel, pk=model_id, tenant=tenant)
    if request.method == "POST":
        form = ProviderKeyRotateForm(request.POST, row=row)
        if form.is_valid():
            try:
                row = tenant_models.provider_model_rotate(
                    row=row, credentials=form.credentials(), acting_user=request.user
                )
            except tenant_models.ProviderModelInvalid as exc:
                form.add_service_error(exc)
            except TenantProviderModel.DoesNotExist:
                raise Http404("No such model.") from None
            else:
                messages.success(
                    request, f"“{row.name}”: new key in use; the old one is no longer used."
                )
                return redirect("dashboard:provider_keys", tenant.slug)
    else:
        form = ProviderKeyRotateForm(row=row)
    return render_page(
        request,
        "provider_key_rotate.html",
        "provider_keys",
        {"form": form, "row": ProviderModelRow(row)},
    )


@tenant_view(MemberRole.ADMIN)
@require_POST
def provider_key_delete(request: HttpRequest, model_id: int) -> HttpResponse:
    tenant = request.access.tenant
    row = get_object_or_404(TenantProviderModel, pk=model_id, tenant=tenant)
    tenant_models.provider_model_delete(row=row, acting_user=request.user)
    messages.success(request, f"“{row.name}” deleted; its key is no longer used.")
    return redirect("dashboard:provider_keys", tenant.slug)


# --- budgets and alerts ----------------------------------------------------------------


@tenant_view()
@require_http_methods(["GET", "POST"])
def budgets(request: HttpRequest) -> HttpResponse:
    """Everyone reads budgets and alerts; admins and owners also create budgets here."""
    access = request.access
    tenant = access.tenant
    form = None
    if request.method == "POST":
        if not access.can_manage:
            return forbidden(request, MemberRole.ADMIN)
        form = BudgetCreateForm(request.POST, tenant=tenant)
        if form.is_valid():
            try:
                services.budget_create(tenant=tenant, acting_user=request.user, **form.values())
            except ValueError as exc:
                form.add_error(None, str(exc))
            else:
                messages.success(request, "Budget created.")
                return redirect("dashboard:budgets", tenant.slug)
    elif access.can_manage:
        form = BudgetCreateForm(tenant=tenant)
    return render_page(
        request,
        "budgets.html",
        "budgets",
        {
            "form": form,
            "rows": selectors.budget_rows(
                tenant=tenant, now=timezone.now(), time_zone=tenant_zone(tenant).key
            ),
            "alerts": selectors.alerts_page(tenant=tenant, page_number=request.GET.get("page")),
            "time_zone": tenant_zone(tenant).key,
        },
    )


def _usd_input(nanos: int) -> str:
    text = f"{nanos_to_usd(nanos):f}"
    return text.rstrip("0").rstrip(".") if "." in text else text


@tenant_view(MemberRole.ADMIN)
@require_http_methods(["GET", "POST"])
def budget_edit(request: HttpRequest, budget_id: int) -> HttpResponse:
    """Change a budget's limit and thresholds; the change is audited in the same transaction.

    A plan's budget is kept in step with the plan by ``tenants.services.plan_apply``
    and is read-only here: raising it would lift the plan's own spending cap.
    """
    tenant = request.access.tenant
    budget = get_object_or_404(
        Budget.objects.select_related("tier", "end_user", "token"), pk=budget_id, tenant=tenant
    )
    initial = {
        "limit_usd": _usd_input(budget.limit_nanos),
        "warn_pct": budget.warn_pct,
        "degrade_pct": budget.degrade_pct,
        "block_pct": budget.block_pct,
    }
    if request.method == "POST" and budget.from_plan:
        messages.error(request, "This budget comes with the plan; change the plan instead.")
        return redirect("dashboard:budgets", tenant.slug)
    if request.method == "POST":
        form = BudgetEditForm(request.POST, initial=initial)
        if form.is_valid():
            try:
                changes = services.budget_update(
                    budget=budget, acting_user=request.user, **form.values()
                )
            except ValueError as exc:
                form.add_error(None, str(exc))
            else:
                messages.success(request, "Budget saved." if changes else "Nothing changed.")
                return redirect("dashboard:budgets", tenant.slug)
    else:
        form = BudgetEditForm(initial=initial)
    return render_page(
        request,
        "budget_edit.html",
        "budgets",
        {"form": form, "budget": budget, "subject": selectors.budget_subject(budget)},
    )


@tenant_view(MemberRole.ADMIN)
@require_POST
def budget_delete(request: HttpRequest, budget_id: int) -> HttpResponse:
    tenant = request.access.tenant
    budget = get_object_or_404(Budget, pk=budget_id, tenant=tenant)
    if budget.from_plan:
        messages.error(request, "This budget comes with the plan; change the plan instead.")
        return redirect("dashboard:budgets", tenant.slug)
    services.budget_delete(budget=budget, acting_user=request.user)
    messages.success(request, "Budget deleted.")
    return redirect("dashboard:budgets", tenant.slug)


# --- end users -------------------------------------------------------------------------


@tenant_view(MemberRole.ADMIN)
@require_POST
def end_user_set_tier(request: HttpRequest, end_user_id: int) -> HttpResponse:
    """Put an end user on one of this tenant's tiers (``tier`` = its id; empty = default)."""
    tenant = request.access.tenant
    end_user = get_object_or_404(
        EndUser.objects.select_related("tier"), pk=end_user_id, tenant=tenant
    )
    form = EndUserTierForm(request.POST)
    if not form.is_valid():
        messages.error(request, "Pick a tier.")
        return redirect("dashboard:end_users", tenant.slug)
    tier_id = form.cleaned_data["tier"]
    tier = get_object_or_404(EndUserTier, pk=tier_id, tenant=tenant) if tier_id else None
    services.end_user_tier_set(end_user=end_user, tier=tier, acting_user=request.user)
    label = f"tier “{tier.name}”" if tier else "the default tier"
    messages.success(request, f"{end_user.external_id} is now on {label}.")
    return redirect("dashboard:end_users", tenant.slug)


# --- calibrations ----------------------------------------------------------------------


@tenant_view(MemberRole.ADMIN)
@require_POST
def calibration_rollback(request: HttpRequest, name: str, version: int) -> HttpResponse:
    """Serve an earlier certified calibration again: the API's service, audited there."""
    tenant = request.access.tenant
    if version > MAX_VERSION or not routing_selectors.profile_known(tenant_id=tenant.pk, name=name):
        raise Http404("No such profile or version.")
    profile = routing_selectors.profile_full_name(name)
    try:
        promoted = calibrations.calibration_rollback(
            tenant=tenant, profile=profile, version=version, acting_user=request.user
        )
    except CalibrationVersion.DoesNotExist:
        raise Http404("No such calibration version.") from None
    except calibrations.CalibrationNotCertified as exc:
        messages.error(request, f"{exc} Only a certified calibration can serve requests.")
    else:
        messages.success(request, f"{profile} now runs calibration version {promoted.version}.")
    return redirect("dashboard:profile", tenant.slug, name)


# --- billing ---------------------------------------------------------------------------


@tenant_view(MemberRole.OWNER)
@require_GET
def billing(request: HttpRequest) -> HttpResponse:
    tenant = request.access.tenant
    outcome = request.GET.get("checkout")
    if outcome == "success":
        messages.success(request, "Thank you: the new plan applies as soon as Stripe confirms it.")
    elif outcome == "cancelled":
        messages.info(request, "Checkout cancelled; your plan is unchanged.")
    return render_page(
        request,
        "billing.html",
        "billing",
        {
            "plan": tenant.tier,
            "subscription": selectors.subscription_of(tenant=tenant),
            "plans": selectors.plans(),
        },
    )


# --- exports ---------------------------------------------------------------------------


def _exports_page(request: HttpRequest, form: ExportForm, status: int = 200) -> HttpResponse:
    jobs = selectors.export_jobs_recent(tenant=request.access.tenant)
    return render_page(
        request,
        "exports.html",
        "exports",
        {"form": form, "jobs": jobs, "time_zone": tenant_zone(request.access.tenant).key},
        status=status,
    )


@tenant_view()
@require_http_methods(["GET", "POST"])
def exports(request: HttpRequest) -> HttpResponse:
    """The export form: download now (a GET of ``export_csv``) or build the file in a job."""
    tenant = request.access.tenant
    if request.method == "GET":
        return _exports_page(request, ExportForm(tenant=tenant))
    form = ExportForm(request.POST, tenant=tenant)
    if form.is_valid():
        if request.POST.get("action") != "background":
            url = reverse("dashboard:export_csv", args=[tenant.slug])
            return redirect(f"{url}?{urlencode(form.query())}")
        if form.cleaned_data["group_by"]:
            form.add_error(
                "group_by", "Background exports are per request; download grouped ones directly."
            )
        else:
            start, end = form.bounds()
            job = export_job_queue(
                tenant_id=tenant.pk, start=start, end=end, focus=form.cleaned_data["focus"]
            )
            messages.success(request, "Export queued.")
            return redirect("dashboard:export_job", tenant.slug, job.pk)
    return _exports_page(request, form)


@tenant_view()
@require_GET
def export_csv(request: HttpRequest) -> HttpResponse:
    """Stream the CSV with the API's own row writers (``billing.exports``), in constant memory."""
    tenant = request.access.tenant
    form = ExportForm(request.GET, tenant=tenant)
    if not form.is_valid():
        return _exports_page(request, form, status=400)
    start, end = form.bounds()
    group_by, focus = form.cleaned_data["group_by"], form.cleaned_data["focus"]
    if group_by:
        lines = grouped_rows(
            tenant_id=tenant.pk,
            start=start,
            end=end,
            group_by=group_by,
            time_zone=tenant.time_zone,
        )
    else:
        count = selectors.usage_row_count(tenant=tenant, start=start, end=end)
        if count > settings.CASCADEFLOW_EXPORT_SYNC_MAX_ROWS:
            job = export_job_queue(tenant_id=tenant.pk, start=start, end=end, focus=focus)
            messages.info(
                request, f"{count:,} rows: too many to stream, so it runs in the background."
            )
            return redirect("dashboard:export_job", tenant.slug, job.pk)
        lines = rows(tenant_id=tenant.pk, start=start, end=end, focus=focus)
    under_asgi = hasattr(request, "scope")
    response = StreamingHttpResponse(
        stream_in_batches(lines) if under_asgi else lines, content_type="text/csv; charset=utf-8"
    )
    data = form.cleaned_data
    suffix = f"-by-{group_by}" if group_by else ("-focus" if focus else "")
    name = f"cascadeflow-{tenant.slug}-{data['start']:%Y%m%d}-{data['end']:%Y%m%d}{suffix}.csv"
    response["Content-Disposition"] = f'attachment; filename="{name}"'
    return response


@tenant_view()
@require_GET
def export_job(request: HttpRequest, job_id: int) -> HttpResponse:
    job = get_object_or_404(ExportJob, pk=job_id, tenant=request.access.tenant)
    download_url = None
    if job.status == "done":
        url = reverse("api-export-download", args=[job.pk])
        download_url = f"{url}?{urlencode({'token': download_token(job.pk)})}"
    if job.total_rows:
        progress = min(100, job.rows_written * 100 // job.total_rows)
    else:
        progress = 100 if job.status == "done" else 0
    return render_page(
        request,
        "export_job.html",
        "exports",
        {
            "job": job,
            "progress": progress,
            "download_url": download_url,
            "link_minutes": settings.CASCADEFLOW_EXPORT_LINK_SECONDS // 60,
            "refresh": job.status in ("queued", "running"),
        },
    )
