"""Management API: routing profiles and the usage ledger."""

from datetime import UTC, datetime

from django.db.models import Count, F, Q, Sum
from django.db.models.functions import TruncDay, TruncHour
from drf_spectacular.utils import OpenApiParameter, extend_schema, inline_serializer
from rest_framework import serializers, status
from rest_framework.exceptions import NotFound
from rest_framework.pagination import CursorPagination
from rest_framework.response import Response

from routing import profiles
from routing.models import RoutingProfile, UsageEvent
from tenants.api_base import BIGINT_MAX, ApiError, TenantAPIView, envelope
from tenants.enums import Scope


class ProfileSerializer(serializers.ModelSerializer):
    """A profile's fields; what makes a profile valid is ``routing.profiles``' rule."""

    class Meta:
        model = RoutingProfile
        fields = [
            "id",
            "name",
            "preset",
            "chain",
            "threshold_offset",
            "domain_routes",
            "created_at",
            "updated_at",
        ]
        read_only_fields = ["id", "created_at", "updated_at"]
        extra_kwargs = {
            "threshold_offset": {
                "min_value": -profiles.MAX_THRESHOLD_OFFSET,
                "max_value": profiles.MAX_THRESHOLD_OFFSET,
            },
            "chain": {
                "required": True,
                "help_text": f"Model names, cheapest first (at most {profiles.MAX_CHAIN_LENGTH}).",
            },
        }


class ProfileListCreateApi(TenantAPIView):
    model = RoutingProfile
    serializer_class = ProfileSerializer
    read_scope, write_scope = Scope.USAGE_READ, Scope.ROUTING_WRITE

    @extend_schema(
        responses=envelope("ProfileList", ProfileSerializer), operation_id="profiles_list"
    )
    def get(self, request):
        return Response(
            {"data": ProfileSerializer(self.tenant_queryset().order_by("name"), many=True).data}
        )

    def post(self, request):
        data = ProfileSerializer(data=request.data)
        data.is_valid(raise_exception=True)
        try:
            profile = profiles.profile_create(tenant=self.tenant, **data.validated_data)
        except profiles.ProfileInvalid as exc:
            raise serializers.ValidationError(exc.errors) from None
        return Response(ProfileSerializer(profile).data, status=status.HTTP_201_CREATED)


class ProfileDetailApi(TenantAPIView):
    model = RoutingProfile
    serializer_class = ProfileSerializer
    read_scope, write_scope = Scope.USAGE_READ, Scope.ROUTING_WRITE

    def get(self, request, pk):
        return Response(ProfileSerializer(self.tenant_object(pk)).data)

    def patch(self, request, pk):
        profile = self.tenant_object(pk)
        data = ProfileSerializer(profile, data=request.data, partial=True)
        data.is_valid(raise_exception=True)
        try:
            profiles.profile_update(profile=profile, **data.validated_data)
        except profiles.ProfileInvalid as exc:
            raise serializers.ValidationError(exc.errors) from None
        return Response(ProfileSerializer(profile).data)

    def delete(self, request, pk):
        profiles.profile_delete(profile=self.tenant_object(pk))
        return Response(status=status.HTTP_204_NO_CONTENT)


def parse_instant(name: str, value: str) -> datetime:
    """An ISO 8601 date or time as an aware UTC datetime (no offset given: UTC)."""
    try:
        moment = datetime.fromisoformat(value)
        if moment.tzinfo is None:
            return moment.replace(tzinfo=UTC)
        return moment.astimezone(UTC)
    except (ValueError, OverflowError):  # OverflowError: 9999-12-31T23:00-14:00 is past year 9999
        raise serializers.ValidationError(
            {name: ["An ISO 8601 date or time between years 1 and 9999 (UTC)."]}
        ) from None


def time_range(rows, params):
    """``start`` (inclusive) and ``end`` (exclusive) ISO 8601 filters on ``created_at``."""
    for name, field in (("start", "created_at__gte"), ("end", "created_at__lt")):
        if params.get(name):
            rows = rows.filter(**{field: parse_instant(name, params[name])})
    return rows


def id_param(params, name: str) -> int | None:
    """A query parameter naming an object id: a positive integer a bigint holds."""
    value = params.get(name)
    if not value:
        return None
    if not (value.isascii() and value.isdigit() and len(value) <= 19) or not (
        1 <= int(value) <= BIGINT_MAX
    ):
        raise serializers.ValidationError({name: ["An object id (a positive integer)."]})
    return int(value)


class UsageCursor(CursorPagination):
    ordering = "-id"  # unique, so pages never repeat or skip a row
    page_size = 100
    max_page_size = 1000
    page_size_query_param = "limit"

    def decode_cursor(self, request):
        """A cursor this API did not hand out is the client's error (400), whatever it holds."""
        invalid = ApiError(
            "Not a cursor of this list: follow the 'next' and 'previous' links.",
            code="invalid_cursor",
        )
        try:
            cursor = super().decode_cursor(request)
        except NotFound:
            raise invalid from None
        position = cursor.position if cursor else None
        if position is not None and not (
            position.isascii() and position.isdigit() and int(position[:20]) <= BIGINT_MAX
        ):
            raise invalid
        return cursor


class UsageOutput(serializers.ModelSerializer):
    class Meta:
        model = UsageEvent
        fields = [
            "id",
            "request_id",
            "created_at",
            "requested_model",
            "model",
            "models_called",
            "profile",
            "end_user",
            "token",
            "prompt_tokens",
            "completion_tokens",
            "cost_nanos",
            "baseline_cost_nanos",
            "escalated",
            "status",
            "http_status",
            "domain",
            "budget_status",
        ]


class UsageListApi(TenantAPIView):
    """The ledger, newest first, with filters; cursor-paginated (stable under inserts)."""

    model = UsageEvent
    serializer_class = UsageOutput
    read_scope = write_scope = Scope.USAGE_READ

    @extend_schema(
        parameters=[
            OpenApiParameter("start", str, description="ISO 8601"),
            OpenApiParameter("end", str, description="ISO 8601"),
            OpenApiParameter("end_user", str),
            OpenApiParameter("model", str),
            OpenApiParameter("profile", str),
            OpenApiParameter("token", int),
            OpenApiParameter("cursor", str),
            OpenApiParameter("limit", int),
        ],
        responses=inline_serializer(
            name="UsagePage",
            fields={
                "next": serializers.CharField(allow_null=True),
                "previous": serializers.CharField(allow_null=True),
                "results": UsageOutput(many=True),
            },
        ),
    )
    def get(self, request):
        rows = self.tenant_queryset()
        params = request.query_params
        rows = time_range(rows, params)
        if params.get("end_user"):
            rows = rows.filter(end_user__external_id=params["end_user"])
        for name in ("model", "profile"):
            if params.get(name):
                rows = rows.filter(**{name: params[name]})
        token_id = id_param(params, "token")
        if token_id is not None:
            rows = rows.filter(token_id=token_id)
        paginator = UsageCursor()
        page = paginator.paginate_queryset(rows, request, view=self)
        return paginator.get_paginated_response(UsageOutput(page, many=True).data)


class SummaryRow(serializers.Serializer):
    period = serializers.DateTimeField()
    key = serializers.CharField(allow_null=True)
    requests = serializers.IntegerField()
    cost_nanos = serializers.IntegerField()
    baseline_cost_nanos = serializers.IntegerField()
    escalated = serializers.IntegerField()


class UsageSummaryApi(TenantAPIView):
    """Requests, cost, baseline and escalations by hour or day, per model, end user or profile."""

    model = UsageEvent
    serializer_class = SummaryRow
    read_scope = write_scope = Scope.USAGE_READ
    GROUP_KEYS = {
        "model": "model",
        "end_user": "end_user__external_id",
        "profile": "profile",
        "none": None,
    }

    @extend_schema(
        responses=envelope(
            "UsageSummary", SummaryRow, bucket=serializers.CharField(), by=serializers.CharField()
        ),
        parameters=[
            OpenApiParameter("bucket", str, enum=["hour", "day"]),
            OpenApiParameter("by", str, enum=["model", "end_user", "profile", "none"]),
            OpenApiParameter("start", str, description="ISO 8601"),
            OpenApiParameter("end", str, description="ISO 8601"),
        ],
    )
    def get(self, request):
        params = request.query_params
        bucket = params.get("bucket", "day")
        by = params.get("by", "model")
        if bucket not in ("hour", "day") or by not in self.GROUP_KEYS:
            raise serializers.ValidationError(
                {"bucket": ["hour or day"], "by": [", ".join(self.GROUP_KEYS)]}
            )
        rows = self.tenant_queryset()
        rows = time_range(rows, params)
        trunc = (
            TruncHour("created_at", tzinfo=UTC)
            if bucket == "hour"
            else TruncDay("created_at", tzinfo=UTC)
        )
        key = self.GROUP_KEYS[by]
        fields = ["period", *(["key"] if key else [])]
        annotated = rows.annotate(period=trunc, **({"key": F(key)} if key else {}))
        summary = (
            annotated.values(*fields)
            .annotate(
                requests=Count("id"),
                cost_nanos=Sum("cost_nanos"),
                baseline_cost_nanos=Sum("baseline_cost_nanos"),
                escalated=Count("id", filter=Q(escalated=True)),
            )
            .order_by("period", *(["key"] if key else []))
        )
        data = [{"key": None, **row} for row in summary[:5000]]
        return Response({"bucket": bucket, "by": by, "data": SummaryRow(data, many=True).data})
