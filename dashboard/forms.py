"""Input of the dashboard's admin pages: parsed and validated here, written by services.

Money is typed in dollars and becomes integer nano-dollars (``usd_to_nanos``)
before it reaches a service. Every choice of a tenant-owned object is limited
to the tenant the form was built for.
"""

from dataclasses import dataclass
from datetime import date, datetime, timedelta
from decimal import Decimal
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from django import forms
from django.utils import timezone

from billing.exports import GROUP_FIELDS
from core.money import usd_to_nanos
from routing import tenant_models
from routing.models import TenantProviderModel
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


# --- provider keys (bring your own key) -------------------------------------------------


@dataclass(frozen=True)
class Provider:
    """A choice of the provider-key form: which LiteLLM prefix it is and which fields it
    asks for. Whether the values work is the service's call (``routing.tenant_models``)."""

    label: str
    prefix: str  # LiteLLM's provider prefix; "" = the model is typed with its own
    fields: tuple[str, ...]  # the optional fields it uses; the others are ignored
    required: tuple[str, ...]
    model_hint: str


PROVIDERS: dict[str, Provider] = {
    "openai": Provider("OpenAI", "openai", ("api_key",), ("api_key",), "gpt-4o-mini"),
    "azure": Provider(
        "Azure OpenAI",
        "azure",
        ("api_key", "api_base", "api_version"),
        ("api_key", "api_base", "api_version"),
        "your deployment's name",
    ),
    "anthropic": Provider(
        "Anthropic", "anthropic", ("api_key",), ("api_key",), "claude-3-5-haiku-20241022"
    ),
    "bedrock": Provider(
        "AWS Bedrock",
        "bedrock",
        ("aws_access_key_id", "aws_secret_access_key", "aws_session_token", "aws_region_name"),
        ("aws_access_key_id", "aws_secret_access_key", "aws_region_name"),
        "anthropic.claude-3-haiku-20240307-v1:0",
    ),
    "vertex_ai": Provider(
        "Google Vertex AI",
        "vertex_ai",
        ("vertex_credentials", "vertex_project", "vertex_location"),
        ("vertex_credentials", "vertex_project"),
        "gemini-1.5-flash",
    ),
    "groq": Provider("Groq", "groq", ("api_key",), ("api_key",), "llama-3.1-8b-instant"),
    "together_ai": Provider(
        "Together AI",
        "together_ai",
        ("api_key",),
        ("api_key",),
        "meta-llama/Llama-3.3-70B-Instruct-Turbo",
    ),
    "compatible": Provider(
        "OpenAI-compatible server (vLLM, Ollama, …)",
        "openai",
        ("api_base", "api_key"),
        ("api_base", "api_key"),
        "the name the server serves, e.g. llama3.1:8b",
    ),
    "other": Provider(
        "Another LiteLLM provider",
        "",
        ("api_key", "api_base", "api_version"),
        ("api_key",),
        "<provider>/<model> as LiteLLM names it, e.g. mistral/mistral-small-latest",
    ),
}
# Each field the form can send as a credential, with the label the pages show for it.
CREDENTIAL_LABELS = {
    "api_key": "API key",
    "aws_access_key_id": "AWS access key ID",
    "aws_secret_access_key": "AWS secret access key",
    "aws_session_token": "AWS session token",
    "aws_region_name": "AWS region",
    "vertex_credentials": "Service account JSON",
    "vertex_project": "Google Cloud project",
    "vertex_location": "Vertex location",
}
SECRET_FIELDS = tuple(k for k in CREDENTIAL_LABELS if k not in tenant_models.PUBLIC_KEYS)


class SecretInput(forms.PasswordInput):
    """Write-only: never rendered with a value, even when the form is shown again."""

    def __init__(self, attrs=None):
        super().__init__({"autocomplete": "new-password", "spellcheck": "false", **(attrs or {})})


class SecretTextarea(forms.Textarea):
    """A write-only multi-line secret (a service-account JSON): never rendered with a value."""

    def format_value(self, value):
        return None


def _secret_field(name: str, **kwargs) -> forms.CharField:
    widget = SecretTextarea(attrs={"rows": 4}) if name == "vertex_credentials" else SecretInput()
    return forms.CharField(
        label=CREDENTIAL_LABELS[name],
        required=False,
        max_length=tenant_models.MAX_CREDENTIAL,
        widget=widget,
        **kwargs,
    )


def _price_field(label: str) -> forms.DecimalField:
    # Parsed as the API's serializer parses it; the range is the service's rule.
    return forms.DecimalField(
        label=label,
        required=False,
        max_digits=12,
        decimal_places=6,
    )


class ProviderErrorsMixin:
    """Puts a :class:`~routing.tenant_models.ProviderModelInvalid` on the field it names."""

    SERVICE_FIELDS = {"litellm_model": "model", "credentials": None}

    def add_service_error(self, exc: tenant_models.ProviderModelInvalid) -> None:
        field = self.SERVICE_FIELDS.get(exc.field, exc.field)
        self.add_error(field if field in self.fields else None, str(exc))


class ProviderModelForm(ProviderErrorsMixin, DashboardForm):
    """A new provider model. The page shows the fields the chosen provider uses
    (``data-provider-fields``); without JavaScript all are shown and the others ignored."""

    name = forms.CharField(
        max_length=100,
        help_text="What your requests and profiles call it, for example <code>acme/gpt-4o</code>.",
    )
    provider = forms.ChoiceField(
        choices=[(key, p.label) for key, p in PROVIDERS.items()],
        widget=forms.Select(attrs={"data-provider-select": ""}),
    )
    model = forms.CharField(
        label="Upstream model",
        max_length=150,
        help_text="The provider's name for it: a model, or an Azure deployment.",
    )
    api_key = _secret_field("api_key")
    aws_access_key_id = _secret_field("aws_access_key_id")
    aws_secret_access_key = _secret_field("aws_secret_access_key")
    aws_session_token = _secret_field("aws_session_token", help_text="Only for temporary keys.")
    aws_region_name = forms.CharField(label="AWS region", required=False, max_length=40)
    vertex_credentials = _secret_field(
        "vertex_credentials", help_text="The service account's key file, pasted whole."
    )
    vertex_project = forms.CharField(label="Google Cloud project", required=False, max_length=100)
    vertex_location = forms.CharField(
        label="Vertex location", required=False, max_length=40, help_text="e.g. us-central1"
    )
    api_base = forms.CharField(
        label="Base URL",
        required=False,
        max_length=200,
        help_text="For example <code>https://vllm.example.com/v1</code>. It must be a public "
        "address: loopback, private and metadata addresses are refused.",
    )
    api_version = forms.CharField(
        label="API version", required=False, max_length=40, help_text="e.g. 2024-10-21"
    )
    input_usd_per_mtok = _price_field("Input price (USD per M tokens)")
    output_usd_per_mtok = _price_field("Output price (USD per M tokens)")

    OPTIONAL = (
        "api_key",
        "aws_access_key_id",
        "aws_secret_access_key",
        "aws_session_token",
        "aws_region_name",
        "vertex_credentials",
        "vertex_project",
        "vertex_location",
        "api_base",
        "api_version",
    )

    def provider_fields(self):
        """(field, the provider keys that use it) for each field only some providers use."""
        return [
            (self[name], " ".join(k for k, p in PROVIDERS.items() if name in p.fields))
            for name in self.OPTIONAL
        ]

    def clean(self):
        cleaned = super().clean()
        provider = PROVIDERS.get(cleaned.get("provider", ""))
        if provider is None:
            return cleaned
        for name in self.OPTIONAL:
            if name not in provider.fields:
                cleaned[name] = ""  # another provider's field: ignored
            elif name in provider.required and not cleaned.get(name) and name not in self.errors:
                self.add_error(name, f"Required for {provider.label}.")
        return cleaned

    def litellm_model(self) -> str:
        provider = PROVIDERS[self.cleaned_data["provider"]]
        model = self.cleaned_data["model"]
        if not provider.prefix:
            return model
        if self.cleaned_data["provider"] != "compatible" and model.startswith(
            f"{provider.prefix}/"
        ):
            return model  # typed with its prefix already
        return f"{provider.prefix}/{model}"

    def values(self) -> dict:
        """The keyword arguments of ``tenant_models.provider_model_create``."""
        data = self.cleaned_data
        return {
            "name": data["name"],
            "litellm_model": self.litellm_model(),
            "credentials": {k: data[k] for k in CREDENTIAL_LABELS if data.get(k)},
            "api_base": data["api_base"],
            "api_version": data["api_version"],
            "input_usd_per_mtok": data.get("input_usd_per_mtok"),
            "output_usd_per_mtok": data.get("output_usd_per_mtok"),
        }


class ProviderKeyRotateForm(ProviderErrorsMixin, DashboardForm):
    """New secrets for a saved model: one field per secret it holds; those left empty
    are kept."""

    def __init__(self, *args, row: TenantProviderModel, **kwargs):
        super().__init__(*args, **kwargs)
        held = [k for k in SECRET_FIELDS if k in row.credentials_mask] or ["api_key"]
        for name in held:
            self.fields[name] = _secret_field(name)
        self.fields[held[0]].help_text = (
            "Leave a field empty to keep what it holds." if len(held) > 1 else ""
        )

    def clean(self):
        cleaned = super().clean()
        if not self.errors and not self.credentials():
            raise forms.ValidationError("Enter the new key.")
        return cleaned

    def credentials(self) -> dict[str, str]:
        return {k: v for k, v in self.cleaned_data.items() if v}
