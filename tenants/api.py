"""Management API: API tokens, budgets, end users, alerts."""

from datetime import datetime
from decimal import Decimal

from django.shortcuts import get_object_or_404
from django.utils import timezone
from drf_spectacular.utils import extend_schema
from rest_framework import serializers, status
from rest_framework.exceptions import PermissionDenied, ValidationError
from rest_framework.response import Response

from core.money import nanos_to_usd, usd_to_nanos
from tenants import selectors, services
from tenants.api_base import BIGINT_MAX, ApiError, TenantAPIView, envelope
from tenants.enums import ALL_SCOPES, BudgetPeriod, BudgetScope, Scope
from tenants.models import ApiToken, Budget, BudgetAlert, EndUser, EndUserTier, Tenant


class TokenOutput(serializers.ModelSerializer):
    class Meta:
        model = ApiToken
        fields = [
            "id",
            "name",
            "mask",
            "scopes",
            "created_at",
            "last_used_at",
            "expires_at",
            "revoked_at",
        ]


class TokenListCreateApi(TenantAPIView):
    model = ApiToken
    serializer_class = TokenOutput
    read_scope = write_scope = Scope.TOKENS_WRITE

    class InputSerializer(serializers.Serializer):
        name = serializers.CharField(max_length=128)
        scopes = serializers.ListField(
            child=serializers.ChoiceField(choices=ALL_SCOPES), allow_empty=False
        )
        expires_at = serializers.DateTimeField(required=False, allow_null=True)

    OutputSerializer = TokenOutput

    @extend_schema(responses=envelope("TokenList", TokenOutput))
    def get(self, request):
        return Response(
            {
                "data": self.OutputSerializer(
                    self.tenant_queryset().order_by("-created_at"), many=True
                ).data
            }
        )

    def post(self, request):
        data = self.InputSerializer(data=request.data)
        data.is_valid(raise_exception=True)
        try:
            issued = services.token_create(
                tenant=self.tenant, granted_by=request.auth.scopes, **data.validated_data
            )
        except services.GrantExceedsHolder as exc:
            raise ApiError(str(exc), code="scope_not_held", status_code=403) from None
        body = self.OutputSerializer(issued.token).data
        body["token"] = issued.raw  # shown once
        return Response(body, status=status.HTTP_201_CREATED)


class TokenRevokeApi(TenantAPIView):
    model = ApiToken
    serializer_class = TokenOutput
    read_scope = write_scope = Scope.TOKENS_WRITE

    def post(self, request, pk):
        token = self.tenant_object(pk)
        services.token_revoke(tenant=self.tenant, token=token)
        return Response(TokenListCreateApi.OutputSerializer(token).data)


class BudgetOutput(serializers.ModelSerializer):
    """A budget and where it stands this period (``context["statuses"]``: id -> status)."""

    limit_usd = serializers.SerializerMethodField()
    period_start = serializers.SerializerMethodField(help_text="Start of the current period.")
    resets_at = serializers.SerializerMethodField(
        help_text="End of the current period (null: a lifetime budget never resets)."
    )
    spent_nanos = serializers.SerializerMethodField(help_text="Settled spend this period.")
    spent_usd = serializers.SerializerMethodField()
    reserved_nanos = serializers.SerializerMethodField(
        help_text="Held by requests in progress (their worst case), until they settle."
    )
    reserved_usd = serializers.SerializerMethodField()
    remaining_nanos = serializers.SerializerMethodField(
        help_text="What may still be spent before the block threshold: limit x block_pct "
        "minus spent and reserved, at least 0."
    )
    remaining_usd = serializers.SerializerMethodField()
    thresholds_pct = serializers.SerializerMethodField(
        help_text="warn, degrade and block percent in force (the budget's own, else its "
        "tier's, else 80 / 90 / 100)."
    )
    state = serializers.SerializerMethodField(
        help_text="ok, warn, degrade or block: the highest threshold this period's spend has "
        "crossed (the crossings budget alerts record)."
    )
    counted_per_end_user = serializers.SerializerMethodField(
        help_text="A tier budget counts each end user apart; its figures are those of the "
        "end user closest to the limit (end_user_counted)."
    )
    end_user_counted = serializers.SerializerMethodField()

    class Meta:
        model = Budget
        fields = [
            "id",
            "scope",
            "period",
            "limit_nanos",
            "limit_usd",
            "tier",
            "end_user",
            "token",
            "warn_pct",
            "degrade_pct",
            "block_pct",
            "from_plan",
            "created_at",
            "period_start",
            "resets_at",
            "spent_nanos",
            "spent_usd",
            "reserved_nanos",
            "reserved_usd",
            "remaining_nanos",
            "remaining_usd",
            "thresholds_pct",
            "state",
            "counted_per_end_user",
            "end_user_counted",
        ]

    def _status(self, obj) -> selectors.BudgetStatus:
        return self.context["statuses"][obj.pk]

    def get_limit_usd(self, obj) -> str:
        return str(nanos_to_usd(obj.limit_nanos))

    def get_period_start(self, obj) -> datetime:
        return self._status(obj).period_start

    def get_resets_at(self, obj) -> datetime | None:
        return self._status(obj).resets_at

    def get_spent_nanos(self, obj) -> int:
        return self._status(obj).spent_nanos

    def get_spent_usd(self, obj) -> str:
        return str(nanos_to_usd(self._status(obj).spent_nanos))

    def get_reserved_nanos(self, obj) -> int:
        return self._status(obj).reserved_nanos

    def get_reserved_usd(self, obj) -> str:
        return str(nanos_to_usd(self._status(obj).reserved_nanos))

    def get_remaining_nanos(self, obj) -> int:
        return self._status(obj).remaining_nanos

    def get_remaining_usd(self, obj) -> str:
        return str(nanos_to_usd(self._status(obj).remaining_nanos))

    def get_thresholds_pct(self, obj) -> list[int]:
        return list(self._status(obj).thresholds)

    def get_state(self, obj) -> str:
        return self._status(obj).state

    def get_counted_per_end_user(self, obj) -> bool:
        return self._status(obj).per_end_user

    def get_end_user_counted(self, obj) -> int | None:
        return self._status(obj).end_user_id


def budgets_out(request, budgets, *, many: bool = False) -> dict | list:
    """Budgets serialized with where each stands this period (one query for all)."""
    rows = list(budgets) if many else [budgets]
    statuses = selectors.budget_statuses(
        tenant_id=request.auth.tenant_id,
        time_zone=request.auth.time_zone,
        now=timezone.now(),
        budgets=rows,
    )
    data = BudgetOutput(rows, many=True, context={"statuses": statuses}).data
    return data if many else data[0]


class BudgetThresholds(serializers.Serializer):
    """Percent of the limit at which to warn, degrade and block (ordered: the services check)."""

    warn_pct = serializers.IntegerField(
        required=False, allow_null=True, min_value=1, max_value=1000
    )
    degrade_pct = serializers.IntegerField(
        required=False, allow_null=True, min_value=1, max_value=1000
    )
    block_pct = serializers.IntegerField(
        required=False, allow_null=True, min_value=1, max_value=1000
    )


def object_id(**kwargs) -> serializers.IntegerField:
    """An id field: a positive integer a BigAutoField can hold (no database error on lookup)."""
    return serializers.IntegerField(min_value=1, max_value=BIGINT_MAX, **kwargs)


def limit_nanos(**kwargs) -> serializers.IntegerField:
    """Nano-dollars as the BigIntegerField stores them: 0 to 2^63 - 1."""
    return serializers.IntegerField(min_value=0, max_value=BIGINT_MAX, **kwargs)


def limit_usd(**kwargs) -> serializers.DecimalField:
    """Dollars as a decimal string, as GET returns them ("12.5"): at most 9 decimals."""
    return serializers.DecimalField(
        max_digits=19,
        decimal_places=9,
        min_value=Decimal(0),
        max_value=nanos_to_usd(BIGINT_MAX),
        help_text="The limit in dollars (a decimal string); or give limit_nanos.",
        **kwargs,
    )


def one_limit(attrs: dict, *, required: bool) -> dict:
    """``limit_usd`` or ``limit_nanos`` (not both) becomes ``limit_nanos``."""
    usd = attrs.pop("limit_usd", None)
    if usd is not None and attrs.get("limit_nanos") is not None:
        raise serializers.ValidationError(
            {"limit_usd": ["Give limit_usd or limit_nanos, not both."]}
        )
    if usd is not None:
        attrs["limit_nanos"] = usd_to_nanos(usd)
    elif required and attrs.get("limit_nanos") is None:
        raise serializers.ValidationError({"limit_usd": ["Give limit_usd or limit_nanos."]})
    return attrs


BUDGET_TARGETS = {
    BudgetScope.TIER: "tier",
    BudgetScope.END_USER: "end_user",
    BudgetScope.TOKEN: "token",
}


class BudgetInput(BudgetThresholds):
    scope = serializers.ChoiceField(choices=BudgetScope.choices)
    period = serializers.ChoiceField(choices=BudgetPeriod.choices)
    limit_nanos = limit_nanos(required=False)
    limit_usd = limit_usd(required=False)
    tier = object_id(required=False, allow_null=True)
    end_user = object_id(required=False, allow_null=True)
    token = object_id(required=False, allow_null=True)

    def validate(self, attrs):
        """A limit, and exactly the target matching the scope (the database's rule, said in
        the API's words)."""
        attrs = one_limit(attrs, required=True)
        wanted = BUDGET_TARGETS.get(attrs["scope"])
        errors = {}
        for field in BUDGET_TARGETS.values():
            given = attrs.get(field) is not None
            if field == wanted and not given:
                errors[field] = [f"Required for scope '{attrs['scope']}'."]
            elif field != wanted and given:
                errors[field] = [f"Not allowed for scope '{attrs['scope']}'."]
        if errors:
            raise serializers.ValidationError(errors)
        return attrs


class BudgetListCreateApi(TenantAPIView):
    model = Budget
    serializer_class = BudgetOutput
    read_scope, write_scope = Scope.USAGE_READ, Scope.BUDGETS_WRITE

    @extend_schema(responses=envelope("BudgetList", BudgetOutput), operation_id="budgets_list")
    def get(self, request):
        budgets = self.tenant_queryset().select_related("tier", "end_user__tier").order_by("id")
        return Response({"data": budgets_out(request, budgets, many=True)})

    @extend_schema(request=BudgetInput, responses={201: BudgetOutput})
    def post(self, request):
        data = BudgetInput(data=request.data)
        data.is_valid(raise_exception=True)
        values = dict(data.validated_data)
        tenant_id = request.auth.tenant_id
        # Targets resolve within this tenant only: another tenant's id is "not found".
        for field, model in (("tier", EndUserTier), ("end_user", EndUser), ("token", ApiToken)):
            if values.get(field) is not None:
                values[field] = get_object_or_404(model, pk=values[field], tenant_id=tenant_id)
        try:
            budget = services.budget_create(tenant=self.tenant, **values)
        except ValueError as exc:  # the service's own checks; database errors: the handler
            raise ValidationError({"budget": [str(exc)]}) from None
        return Response(budgets_out(request, budget), status=status.HTTP_201_CREATED)


class BudgetDetailApi(TenantAPIView):
    model = Budget
    serializer_class = BudgetOutput
    read_scope, write_scope = Scope.USAGE_READ, Scope.BUDGETS_WRITE

    class PatchSerializer(BudgetThresholds):
        limit_nanos = limit_nanos(required=False)
        limit_usd = limit_usd(required=False)

        def validate(self, attrs):
            return one_limit(attrs, required=False)

    def get(self, request, pk):
        return Response(budgets_out(request, self.tenant_object(pk)))

    @extend_schema(request=PatchSerializer, responses=BudgetOutput)
    def patch(self, request, pk):
        budget = self.tenant_object(pk)
        data = self.PatchSerializer(data=request.data, partial=True)
        data.is_valid(raise_exception=True)
        try:
            services.budget_update(budget=budget, **data.validated_data)
        except services.PlanBudgetLocked as exc:
            raise PermissionDenied(str(exc)) from None
        except ValueError as exc:
            raise ValidationError({"non_field_errors": [str(exc)]}) from None
        return Response(budgets_out(request, budget))

    def delete(self, request, pk):
        budget = self.tenant_object(pk)
        try:
            services.budget_delete(budget=budget)
        except services.PlanBudgetLocked as exc:
            raise PermissionDenied(str(exc)) from None
        return Response(status=status.HTTP_204_NO_CONTENT)


class EndUserOutput(serializers.ModelSerializer):
    class Meta:
        model = EndUser
        fields = ["id", "external_id", "tier", "audit_excluded", "created_at"]


class EndUserListApi(TenantAPIView):
    model = EndUser
    serializer_class = EndUserOutput
    read_scope, write_scope = Scope.USAGE_READ, Scope.BUDGETS_WRITE

    @extend_schema(responses=envelope("EndUserList", EndUserOutput), operation_id="end_users_list")
    def get(self, request):
        return Response(
            {
                "data": EndUserOutput(
                    self.tenant_queryset().order_by("external_id")[:1000], many=True
                ).data
            }
        )


class EndUserDetailApi(TenantAPIView):
    model = EndUser
    serializer_class = EndUserOutput
    read_scope, write_scope = Scope.USAGE_READ, Scope.BUDGETS_WRITE

    class PatchSerializer(serializers.Serializer):
        tier = serializers.IntegerField(
            min_value=0, max_value=BIGINT_MAX, allow_null=True, required=False
        )
        audit_excluded = serializers.BooleanField(
            required=False, help_text="Never audit this end user's requests (privacy)."
        )

        def validate(self, attrs):
            if not attrs:
                raise serializers.ValidationError("Give tier, audit_excluded or both.")
            return attrs

    def get(self, request, pk):
        return Response(EndUserOutput(self.tenant_object(pk)).data)

    def patch(self, request, pk):
        end_user = self.tenant_object(pk)
        data = self.PatchSerializer(data=request.data)
        data.is_valid(raise_exception=True)
        if "tier" in data.validated_data:
            tier_id = data.validated_data["tier"]
            tier = (
                get_object_or_404(EndUserTier, pk=tier_id, tenant_id=request.auth.tenant_id)
                if tier_id
                else None
            )
            services.end_user_tier_set(end_user=end_user, tier=tier)
        if "audit_excluded" in data.validated_data:
            services.end_user_audit_exclusion_set(
                end_user=end_user, excluded=data.validated_data["audit_excluded"]
            )
        return Response(EndUserOutput(end_user).data)


class AlertOutput(serializers.ModelSerializer):
    class Meta:
        model = BudgetAlert
        fields = [
            "id",
            "budget",
            "subject_id",
            "period_start",
            "level",
            "spent_nanos",
            "limit_nanos",
            "created_at",
        ]


class AlertListApi(TenantAPIView):
    model = BudgetAlert
    serializer_class = AlertOutput
    read_scope = write_scope = Scope.USAGE_READ

    @extend_schema(responses=envelope("AlertList", AlertOutput))
    def get(self, request):
        alerts = self.tenant_queryset().order_by("-created_at")[:500]
        return Response({"data": AlertOutput(alerts, many=True).data})


class TenantSettingsOutput(serializers.Serializer):
    audits_enabled = serializers.BooleanField(
        help_text="Audit a share of requests to measure and calibrate the cascade."
    )
    audit_monthly_cap_nanos = serializers.IntegerField(
        help_text="What audits may spend a month (nano-dollars)."
    )
    trace_content = serializers.BooleanField(
        help_text="Export prompt text on request traces (OpenTelemetry); off by default."
    )


class TenantSettingsApi(TenantAPIView):
    """The tenant's own switches: audits and their monthly cap, content capture in traces."""

    model = Tenant
    serializer_class = TenantSettingsOutput
    read_scope, write_scope = Scope.USAGE_READ, Scope.ADMIN

    class SettingsPatchSerializer(serializers.Serializer):
        audits_enabled = serializers.BooleanField(required=False)
        audit_monthly_cap_nanos = serializers.IntegerField(
            min_value=0, max_value=BIGINT_MAX, required=False
        )
        trace_content = serializers.BooleanField(required=False)

        def validate(self, attrs):
            if not attrs:
                raise serializers.ValidationError(
                    "Give audits_enabled, audit_monthly_cap_nanos or trace_content."
                )
            return attrs

    def current(self) -> Tenant:
        return Tenant.objects.get(pk=self.request.auth.tenant_id)

    @extend_schema(responses=TenantSettingsOutput)
    def get(self, request):
        return Response(TenantSettingsOutput(self.current()).data)

    @extend_schema(request=SettingsPatchSerializer, responses=TenantSettingsOutput)
    def patch(self, request):
        data = self.SettingsPatchSerializer(data=request.data)
        data.is_valid(raise_exception=True)
        tenant = self.current()
        services.tenant_settings_update(tenant=tenant, **data.validated_data)
        return Response(TenantSettingsOutput(tenant).data)
