"""Input of the dashboard's admin pages: parsed and validated here, written by services.

Money is typed in dollars and becomes integer nano-dollars (``usd_to_nanos``)
before it reaches a service. Every choice of a tenant-owned object is limited
to the tenant the form was built for.
"""

from datetime import date, datetime, timedelta
from decimal import Decimal
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from django import forms
from django.utils import timezone

from billing.exports import GROUP_FIELDS
from core.money import usd_to_nanos
from tenants.enums import BudgetPeriod, BudgetScope, Scope
from tenants.models import ApiToken, EndUser, EndUserTier, Tenant

MAX_EXPORT_DAYS = 366
PCT_HELP = "Percent of the limit. Empty: the end user's tier's thresholds, else 80 / 90 / 100."


def tenant_zone(tenant: Tenant) -> ZoneInfo:
    try:
        return ZoneInfo(tenant.time_zone or "UTC")
    except (ZoneInfoNotFoundError, ValueError):
        return ZoneInfo("UTC")


def local_midnight(day: date, tz: ZoneInfo) -> datetime:
    return datetime(day.year, day.month, day.day, tzinfo=tz)


def local_today(tenant: Tenant) -> date:
    return timezone.now().astimezone(tenant_zone(tenant)).date()


class DashboardForm(forms.Form):
    """Labels without a trailing colon, as the rest of the dashboard writes them."""

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("label_suffix", "")
        super().__init__(*args, **kwargs)


class TokenCreateForm(DashboardForm):
    name = forms.CharField(max_length=128)
    scopes = forms.MultipleChoiceField(
        choices=Scope.choices,
        widget=forms.CheckboxSelectMultiple,
        initial=[Scope.COMPLETIONS],
        error_messages={"required": "Pick at least one scope."},
    )
    expires_on = forms.DateField(
        required=False,
        label="Expires after (optional)",
        help_text="The token stops working at the end of this day, in the tenant's time zone.",
        widget=forms.DateInput(attrs={"type": "date"}),
    )

    def __init__(self, *args, tenant: Tenant, **kwargs):
        super().__init__(*args, **kwargs)
        self.tenant = tenant

    def clean_expires_on(self) -> date | None:
        day = self.cleaned_data.get("expires_on")
        if day is not None and day < local_today(self.tenant):
            raise forms.ValidationError("The expiry date is in the past.")
        return day

    def expires_at(self) -> datetime | None:
        day = self.cleaned_data.get("expires_on")
        if day is None:
            return None
        return local_midnight(day + timedelta(days=1), tenant_zone(self.tenant))


class ThresholdsMixin(DashboardForm):
    """Limit and thresholds; their order is checked by the budget services (one rule)."""

    limit_usd = forms.DecimalField(
        label="Limit (USD)", min_value=Decimal(0), max_digits=18, decimal_places=9
    )
    warn_pct = forms.IntegerField(required=False, min_value=1, max_value=1000, label="Warn at (%)")
    degrade_pct = forms.IntegerField(
        required=False, min_value=1, max_value=1000, label="Degrade at (%)"
    )
    block_pct = forms.IntegerField(
        required=False, min_value=1, max_value=1000, label="Block at (%)"
    )

    thresholds_help = PCT_HELP

    def values(self) -> dict:
        data = self.cleaned_data
        return {
            "limit_nanos": usd_to_nanos(data["limit_usd"]),
            "warn_pct": data.get("warn_pct"),
            "degrade_pct": data.get("degrade_pct"),
            "block_pct": data.get("block_pct"),
        }


class BudgetCreateForm(ThresholdsMixin):
    """A new budget. The page shows the one target field its scope needs
    (``data-scope-field``); without JavaScript all are shown and the others ignored."""

    scope = forms.ChoiceField(
        choices=BudgetScope.choices, widget=forms.Select(attrs={"data-scope-select": ""})
    )
    period = forms.ChoiceField(choices=BudgetPeriod.choices, initial=BudgetPeriod.MONTH)
    tier = forms.ModelChoiceField(
        queryset=EndUserTier.objects.none(),
        required=False,
        label="End-user tier",
        empty_label="Choose a tier…",
        help_text="The limit applies to each end user of the tier separately.",
    )
    end_user = forms.CharField(
        required=False,
        max_length=256,
        label="End user",
        help_text="Their id, as your requests send it in <code>user</code>.",
    )
    token = forms.ModelChoiceField(
        queryset=ApiToken.objects.none(),
        required=False,
        label="API token",
        empty_label="Choose an API token…",
    )

    field_order = ["scope", "period", "tier", "end_user", "token", "limit_usd"]
    TARGETS = {
        BudgetScope.TIER: "tier",
        BudgetScope.END_USER: "end_user",
        BudgetScope.TOKEN: "token",
    }

    def __init__(self, *args, tenant: Tenant, **kwargs):
        super().__init__(*args, **kwargs)
        self.tenant = tenant
        self.fields["tier"].queryset = EndUserTier.objects.filter(tenant=tenant).order_by("name")
        self.fields["token"].queryset = ApiToken.objects.filter(
            tenant=tenant, revoked_at__isnull=True
        ).order_by("name")

    def clean_end_user(self) -> EndUser | None:
        external_id = self.cleaned_data.get("end_user", "").strip()
        if not external_id:
            return None
        end_user = EndUser.objects.filter(tenant=self.tenant, external_id=external_id).first()
        if end_user is None:
            raise forms.ValidationError("No end user with this id has made a request yet.")
        return end_user

    def clean(self):
        cleaned = super().clean()
        scope = cleaned.get("scope")
        for target_scope, field in self.TARGETS.items():
            if scope == target_scope:
                if cleaned.get(field) is None and field not in self.errors:
                    self.add_error(field, "Required for this scope.")
            else:
                cleaned[field] = None  # only the FK matching the scope is set
        return cleaned

    def values(self) -> dict:
        data = self.cleaned_data
        return {
            **super().values(),
            "scope": data["scope"],
            "period": data["period"],
            "tier": data.get("tier"),
            "end_user": data.get("end_user"),
            "token": data.get("token"),
        }


class BudgetEditForm(ThresholdsMixin):
    pass


class EndUserTierForm(DashboardForm):
    """Only parses the id: the view resolves it within the tenant (404 otherwise)."""

    tier = forms.IntegerField(required=False, min_value=1)


GROUP_CHOICES = [("", "No grouping: one row per request")] + [
    (key, f"By {key.replace('_', ' ')}") for key in GROUP_FIELDS
]


class ExportForm(DashboardForm):
    start = forms.DateField(widget=forms.DateInput(attrs={"type": "date"}))
    end = forms.DateField(widget=forms.DateInput(attrs={"type": "date"}), help_text="Inclusive.")
    group_by = forms.ChoiceField(choices=GROUP_CHOICES, required=False, label="Group")
    focus = forms.BooleanField(
        required=False, label="FinOps FOCUS column names (per-request rows only)"
    )

    def __init__(self, *args, tenant: Tenant, **kwargs):
        super().__init__(*args, **kwargs)
        self.tenant = tenant
        if not self.is_bound:
            today = local_today(tenant)
            first = today.replace(day=1)
            last = (first + timedelta(days=32)).replace(day=1) - timedelta(days=1)
            self.initial.update({"start": first, "end": last})

    def clean(self):
        cleaned = super().clean()
        start, end = cleaned.get("start"), cleaned.get("end")
        if start and end:
            if end < start:
                self.add_error("end", "The end date must not be before the start date.")
            elif (end - start).days + 1 > MAX_EXPORT_DAYS:
                self.add_error(
                    "end", f"At most {MAX_EXPORT_DAYS} days per export; split the range."
                )
        if cleaned.get("focus") and cleaned.get("group_by"):
            self.add_error("focus", "FOCUS columns apply to per-request rows, not groups.")
        return cleaned

    def bounds(self) -> tuple[datetime, datetime]:
        """The dates as instants: local midnight of ``start`` to the midnight after ``end``."""
        tz = tenant_zone(self.tenant)
        data = self.cleaned_data
        return (
            local_midnight(data["start"], tz),
            local_midnight(data["end"] + timedelta(days=1), tz),
        )

    def query(self) -> dict:
        data = self.cleaned_data
        query = {"start": data["start"].isoformat(), "end": data["end"].isoformat()}
        if data.get("group_by"):
            query["group_by"] = data["group_by"]
        if data.get("focus"):
            query["focus"] = "1"
        return query
