"""Management API: routing profiles, the usage ledger, and what audits measured and learned.

Profiles' quality and calibrations are addressed by name, as requests name them:
``/api/v1/profiles/<name>/quality/`` where ``<name>`` is a built-in preset
(``balanced``) or one of the tenant's profiles, with or without its ``cascade/``
prefix (``/api/v1/profiles/cascade/balanced/quality/`` works too).
"""

from datetime import UTC, datetime, timedelta

from django.db.models import F, Q
from django.db.models.functions import TruncDay, TruncHour
from django.http import Http404
from django.utils import timezone
from drf_spectacular.utils import OpenApiParameter, extend_schema, inline_serializer
from rest_framework import serializers, status
from rest_framework.exceptions import NotFound
from rest_framework.pagination import CursorPagination
from rest_framework.response import Response

from routing import calibrations, profiles, selectors, tenant_models
from routing.enums import AuditKind, AuditStatus, ModelMode, UsageKind
from routing.models import (
    Audit,
    CalibrationVersion,
    RoutingProfile,
    TenantProviderModel,
    UsageEvent,
)
from tenants.api_base import BIGINT_MAX, ApiError, TenantAPIView, envelope
from tenants.enums import Scope
from tenants.models import EndUser, Tenant


class ProfileNameConverter:
    """A profile's name in a URL: ``balanced``, ``support``, or with its prefix
    (``cascade/balanced``); the view gets the name without the prefix."""

    regex = r"(?:cascade/)?[-a-zA-Z0-9_]{1,64}"

    def to_python(self, value: str) -> str:
        return value.removeprefix("cascade/")

    def to_url(self, value: str) -> str:
        return value.removeprefix("cascade/")


class ProfileSerializer(serializers.ModelSerializer):
    """A profile's fields; what makes a profile valid is ``routing.profiles``' rule."""

    class Meta:
        model = RoutingProfile
        fields = ["id", *profiles.EDITABLE, "created_at", "updated_at"]
        read_only_fields = ["id", "created_at", "updated_at"]
        extra_kwargs = {
            "threshold_offset": {
                "min_value": -profiles.MAX_THRESHOLD_OFFSET,
                "max_value": profiles.MAX_THRESHOLD_OFFSET,
            },
            "audit_rate_floor": {"min_value": 0.0, "max_value": 1.0},
            "judge_model": {
                "help_text": "Empty: the chain's last model; 'none': no judge (a disagreement "
                "counts as worse); or a model of the catalog."
            },
            "reference_model": {"help_text": "Empty: the chain's last model; or a catalog model."},
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
            "kind",
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
            OpenApiParameter("kind", str, enum=UsageKind.values),
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
            # The end user's id first (one unique-index lookup): a join would let the planner
            # walk the whole ledger backwards by id looking for a quiet end user's rows.
            end_user_id = (
                EndUser.objects.filter(tenant=self.tenant, external_id=params["end_user"])
                .values_list("pk", flat=True)
                .first()
            )
            rows = rows.filter(end_user_id=end_user_id) if end_user_id else rows.none()
        for name in ("model", "profile"):
            if params.get(name):
                rows = rows.filter(**{name: params[name]})
        if params.get("kind"):
            if params["kind"] not in UsageKind.values:
                raise serializers.ValidationError({"kind": [", ".join(UsageKind.values)]})
            rows = rows.filter(kind=params["kind"])
        token_id = id_param(params, "token")
        if token_id is not None:
            rows = rows.filter(token_id=token_id)
        paginator = UsageCursor()
        page = paginator.paginate_queryset(rows, request, view=self)
        return paginator.get_paginated_response(UsageOutput(page, many=True).data)


class SummaryRow(serializers.Serializer):
    period = serializers.DateTimeField()
    key = serializers.CharField(allow_null=True)
    label = serializers.CharField(
        help_text="The key for people: the model, end user or profile, or what an empty key "
        "groups (requests refused or failed before a model answered, direct model calls, "
        "requests without an end user)."
    )
    requests = serializers.IntegerField()
    cost_nanos = serializers.IntegerField(help_text="What the requests cost.")
    baseline_cost_nanos = serializers.IntegerField()
    escalated = serializers.IntegerField()
    audit_cost_nanos = serializers.IntegerField(help_text="What auditing requests cost.")
    saved_nanos = serializers.IntegerField(
        help_text="Baseline minus the requests' cost minus the audits' cost."
    )


class UsageSummaryApi(TenantAPIView):
    """Requests, cost, baseline and escalations by hour or day, per model, end user or profile.

    Audits are spend but not requests: their cost is ``audit_cost_nanos`` (in the
    group of their profile; they have no model or end user of their own), and
    ``saved_nanos`` is net of it.
    """

    model = UsageEvent
    serializer_class = SummaryRow
    read_scope = write_scope = Scope.USAGE_READ
    GROUP_KEYS = {
        "model": "model",
        "end_user": "end_user__external_id",
        "profile": "profile",
        "none": None,
    }
    # What a row without a key holds, said in words (its key is "" or null).
    EMPTY_KEY_LABELS = {
        "model": "(no answering model: refused or failed requests, audits)",
        "end_user": "(no end user)",
        "profile": "(no profile: models called directly)",
        "none": "(all requests)",
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
        totals = selectors.usage_totals()
        summary = (
            annotated.values(*fields)
            .annotate(
                # The totals' own names: ``baseline_cost_nanos`` would shadow its column.
                sum_requests=totals["requests"],
                sum_escalated=totals["escalated"],
                sum_spend=totals["spend_nanos"],
                sum_audits=totals["audit_cost_nanos"],
                sum_baseline=totals["baseline_cost_nanos"],
            )
            .order_by("period", *(["key"] if key else []))
        )
        data = []
        for row in summary[:5000]:
            spend, audits, baseline = row["sum_spend"], row["sum_audits"], row["sum_baseline"]
            data.append(
                {
                    "period": row["period"],
                    "key": row.get("key"),
                    "label": row.get("key") or self.EMPTY_KEY_LABELS[by],
                    "requests": row["sum_requests"],
                    "escalated": row["sum_escalated"],
                    "cost_nanos": spend - audits,
                    "audit_cost_nanos": audits,
                    "baseline_cost_nanos": baseline,
                    "saved_nanos": baseline - spend,
                }
            )
        return Response({"bucket": bucket, "by": by, "data": SummaryRow(data, many=True).data})


# --- what audits measured and what profiles learned -------------------------------------


class Interval(serializers.Serializer):
    retention = serializers.FloatField()
    lower = serializers.FloatField()
    upper = serializers.FloatField()
    n = serializers.IntegerField(help_text="Uniform audits it rests on.")


class QualityRowOutput(serializers.Serializer):
    key = serializers.CharField(allow_null=True)
    requests = serializers.IntegerField()
    engine_estimate = serializers.FloatField(
        allow_null=True,
        help_text="Mean quality score of what was served (answers of the last model count as 1).",
    )
    measured_retention = Interval(
        allow_null=True,
        source="measured",
        help_text="Served answers against the reference on uniform audits (90% interval).",
    )
    audits = serializers.IntegerField()
    audit_cost_nanos = serializers.IntegerField()


class LearningOutput(serializers.Serializer):
    audits_enabled = serializers.BooleanField()
    uniform_labels = serializers.IntegerField()
    nonuniform_labels = serializers.IntegerField()
    active_version = serializers.IntegerField(allow_null=True)
    cold_start = serializers.BooleanField()
    last_refit_at = serializers.DateTimeField(allow_null=True)
    target_retention = serializers.FloatField()


class QualityOutput(serializers.Serializer):
    profile = serializers.CharField()
    start = serializers.DateTimeField()
    end = serializers.DateTimeField()
    learning = LearningOutput()
    overall = QualityRowOutput()
    by_domain = QualityRowOutput(many=True)
    by_draft_model = QualityRowOutput(many=True)


QUALITY_DAYS = 30


class ProfileApiMixin:
    """Views of one profile by name: a preset or one of the tenant's profiles; else a 404."""

    def known_profile(self, name: str) -> str:
        if not selectors.profile_known(tenant_id=self.request.auth.tenant_id, name=name):
            raise Http404
        return selectors.profile_full_name(name)


class ProfileQualityApi(ProfileApiMixin, TenantAPIView):
    """Quality of what a profile served: measured by audits, estimated by the engine."""

    model = Audit
    serializer_class = QualityOutput
    read_scope = write_scope = Scope.USAGE_READ

    @extend_schema(
        parameters=[
            OpenApiParameter("start", str, description="ISO 8601 (default: 30 days ago)"),
            OpenApiParameter("end", str, description="ISO 8601 (default: now)"),
        ],
        responses=QualityOutput,
    )
    def get(self, request, name):
        self.known_profile(name)
        params = request.query_params
        end = parse_instant("end", params["end"]) if params.get("end") else timezone.now()
        if params.get("start"):
            start = parse_instant("start", params["start"])
        else:
            try:
                start = end - timedelta(days=QUALITY_DAYS)
            except OverflowError:  # an end in the first days of year 1
                start = datetime.min.replace(tzinfo=UTC)
        quality = selectors.profile_quality(
            tenant_id=request.auth.tenant_id,
            tenant_audits=request.auth.audits_enabled,
            name=name,
            start=start,
            end=end,
        )
        state = quality.learning
        data = {
            "profile": quality.profile,
            "start": quality.start,
            "end": quality.end,
            "learning": {**state.__dict__, "cold_start": state.cold_start},
            "overall": quality.overall.__dict__,
            "by_domain": [row.__dict__ for row in quality.by_domain],
            "by_draft_model": [row.__dict__ for row in quality.by_draft_model],
        }
        return Response(QualityOutput(data).data)


class VersionOutput(serializers.ModelSerializer):
    evidence = serializers.SerializerMethodField()

    class Meta:
        model = CalibrationVersion
        fields = [
            "id",
            "profile",
            "version",
            "chain",
            "certified",
            "active",
            "uniform_labels",
            "nonuniform_labels",
            "created_at",
            "promoted_at",
            "evidence",
        ]

    def get_evidence(self, version) -> dict:
        """What the refit found; the held-out scores kept for drift are summarised."""
        evidence = dict(version.evidence or {})
        scores = evidence.pop("score_reference", None) or []
        evidence["score_reference_size"] = len(scores)
        return evidence


class VersionCursor(UsageCursor):
    ordering = "-version"  # unique per profile
    page_size = 50
    max_page_size = 500


class CalibrationListApi(ProfileApiMixin, TenantAPIView):
    """A profile's calibration versions, newest first, with the evidence of each."""

    model = CalibrationVersion
    serializer_class = VersionOutput
    read_scope = write_scope = Scope.USAGE_READ

    @extend_schema(
        parameters=[OpenApiParameter("cursor", str), OpenApiParameter("limit", int)],
        responses=inline_serializer(
            name="CalibrationPage",
            fields={
                "next": serializers.CharField(allow_null=True),
                "previous": serializers.CharField(allow_null=True),
                "results": VersionOutput(many=True),
            },
        ),
    )
    def get(self, request, name):
        profile = self.known_profile(name)
        rows = self.tenant_queryset().filter(profile=profile)
        paginator = VersionCursor()
        page = paginator.paginate_queryset(rows, request, view=self)
        return paginator.get_paginated_response(VersionOutput(page, many=True).data)


class CalibrationRollbackApi(ProfileApiMixin, TenantAPIView):
    """Serve an earlier certified version again (the next certified refit replaces it)."""

    model = CalibrationVersion
    serializer_class = VersionOutput
    read_scope, write_scope = Scope.USAGE_READ, Scope.ROUTING_WRITE

    @extend_schema(request=None, responses=VersionOutput)
    def post(self, request, name, version):
        profile = self.known_profile(name)
        if not self.tenant_queryset().filter(profile=profile, version=version).exists():
            raise Http404
        try:
            promoted = calibrations.calibration_rollback(
                tenant=self.tenant, profile=profile, version=version
            )
        except calibrations.CalibrationNotCertified as exc:
            raise ApiError(str(exc), code="not_certified") from None
        return Response(VersionOutput(promoted).data)


class AuditOutput(serializers.ModelSerializer):
    """An audit without its texts (which only a pending audit holds, and never shows)."""

    calibration_version = serializers.IntegerField(
        source="calibration_version.version", allow_null=True, default=None
    )
    uniform = serializers.BooleanField(read_only=True)  # kind "audit": the uniform sample

    class Meta:
        model = Audit
        fields = [
            "id",
            "request_id",
            "profile",
            "created_at",
            "uniform",
            "kind",
            "status",
            "skip_reason",
            "chain",
            "reference_model",
            "judge_model",
            "calibration_version",
            "domain",
            "served_model",
            "served_verdict",
            "served_loss",
            "cost_nanos",
            "finished_at",
        ]


class AuditListApi(TenantAPIView):
    """The tenant's audits, newest first; cursor-paginated."""

    model = Audit
    serializer_class = AuditOutput
    read_scope = write_scope = Scope.USAGE_READ

    @extend_schema(
        parameters=[
            OpenApiParameter("start", str, description="ISO 8601"),
            OpenApiParameter("end", str, description="ISO 8601"),
            OpenApiParameter("profile", str, description="cascade/<name>, or the name"),
            OpenApiParameter("status", str, enum=AuditStatus.values),
            OpenApiParameter("uniform", bool),
            OpenApiParameter("kind", str, enum=AuditKind.values),
            OpenApiParameter("cursor", str),
            OpenApiParameter("limit", int),
        ],
        responses=inline_serializer(
            name="AuditPage",
            fields={
                "next": serializers.CharField(allow_null=True),
                "previous": serializers.CharField(allow_null=True),
                "results": AuditOutput(many=True),
            },
        ),
    )
    def get(self, request):
        rows = time_range(self.tenant_queryset(), request.query_params)
        params = request.query_params
        if params.get("profile"):
            rows = rows.filter(profile=selectors.profile_full_name(params["profile"]))
        if params.get("status"):
            if params["status"] not in AuditStatus.values:
                raise serializers.ValidationError({"status": [", ".join(AuditStatus.values)]})
            rows = rows.filter(status=params["status"])
        if params.get("uniform"):
            if params["uniform"] not in ("true", "false"):
                raise serializers.ValidationError({"uniform": ["true or false"]})
            uniform = Q(kind=AuditKind.AUDIT)
            rows = rows.filter(uniform if params["uniform"] == "true" else ~uniform)
        if params.get("kind"):
            if params["kind"] not in AuditKind.values:
                raise serializers.ValidationError({"kind": [", ".join(AuditKind.values)]})
            rows = rows.filter(kind=params["kind"])
        paginator = UsageCursor()
        page = paginator.paginate_queryset(
            rows.select_related("calibration_version"), request, view=self
        )
        return paginator.get_paginated_response(AuditOutput(page, many=True).data)


class ProviderModelOutput(serializers.ModelSerializer):
    class Meta:
        model = TenantProviderModel
        fields = [
            "id",
            "name",
            "litellm_model",
            "api_base",
            "api_version",
            "credentials_mask",
            "input_usd_per_mtok",
            "output_usd_per_mtok",
            "mode",
            "validated_at",
            "created_at",
        ]


class ProviderModelInput(serializers.Serializer):
    name = serializers.CharField(max_length=100)
    litellm_model = serializers.CharField(max_length=200)
    credentials = serializers.DictField(
        child=serializers.CharField(max_length=tenant_models.MAX_CREDENTIAL, trim_whitespace=False),
        help_text="Write-only: api_key, or aws_* / vertex_* fields. Never shown again.",
    )
    api_base = serializers.CharField(max_length=200, required=False, allow_blank=True)
    api_version = serializers.CharField(max_length=40, required=False, allow_blank=True)
    input_usd_per_mtok = serializers.DecimalField(
        max_digits=12, decimal_places=6, required=False, allow_null=True
    )
    output_usd_per_mtok = serializers.DecimalField(
        max_digits=12, decimal_places=6, required=False, allow_null=True
    )
    mode = serializers.ChoiceField(
        choices=ModelMode.choices,
        required=False,
        default=ModelMode.CHAT,
        help_text="chat (the default), or embedding: served by /v1/embeddings only.",
    )

    def validate_credentials(self, value):
        raw = self.initial_data.get("credentials")
        if not isinstance(raw, dict) or not all(isinstance(v, str) for v in raw.values()):
            raise serializers.ValidationError("Each credential is a string.")
        return value


class ProviderModelListCreateApi(TenantAPIView):
    """The tenant's own provider models (bring your own key). Saving validates the
    credentials with one cheap call; they are encrypted and never shown again."""

    model = TenantProviderModel
    serializer_class = ProviderModelOutput
    read_scope, write_scope = Scope.USAGE_READ, Scope.ROUTING_WRITE

    @extend_schema(
        responses=envelope("ProviderModelList", ProviderModelOutput),
        operation_id="provider_models_list",
    )
    def get(self, request):
        rows = self.tenant_queryset().order_by("name")
        return Response({"data": ProviderModelOutput(rows, many=True).data})

    @extend_schema(request=ProviderModelInput, responses=ProviderModelOutput)
    def post(self, request):
        data = ProviderModelInput(data=request.data)
        data.is_valid(raise_exception=True)
        tenant = Tenant.objects.get(pk=request.auth.tenant_id)
        try:
            row = tenant_models.provider_model_create(tenant=tenant, **data.validated_data)
        except tenant_models.ProviderModelInvalid as exc:
            raise serializers.ValidationError(
                {exc.field or "non_field_errors": [str(exc)]}
            ) from None
        return Response(ProviderModelOutput(row).data, status=status.HTTP_201_CREATED)


class ProviderModelRotateInput(serializers.Serializer):
    credentials = serializers.DictField(
        child=serializers.CharField(max_length=tenant_models.MAX_CREDENTIAL, trim_whitespace=False),
        help_text="Write-only: the credentials to replace (say, only api_key); the others are "
        "kept. Validated with one cheap call before they replace the stored ones.",
    )

    def validate(self, attrs):
        extra = sorted(set(self.initial_data) - {"credentials"})
        if extra:
            raise serializers.ValidationError(
                {
                    name: ["Only credentials change in place; add another model for the rest."]
                    for name in extra
                }
            )
        return attrs

    def validate_credentials(self, value):
        raw = self.initial_data.get("credentials")
        if not isinstance(raw, dict) or not all(isinstance(v, str) for v in raw.values()):
            raise serializers.ValidationError("Each credential is a string.")
        return value


class ProviderModelDetailApi(TenantAPIView):
    model = TenantProviderModel
    serializer_class = ProviderModelOutput
    read_scope, write_scope = Scope.USAGE_READ, Scope.ROUTING_WRITE

    def get(self, request, pk):
        return Response(ProviderModelOutput(self.tenant_object(pk)).data)

    @extend_schema(request=ProviderModelRotateInput, responses=ProviderModelOutput)
    def patch(self, request, pk):
        """Rotate the credentials in place: the new ones are validated with one cheap call
        and replace the stored ones only if it passes (until then the old ones serve)."""
        row = self.tenant_object(pk)
        data = ProviderModelRotateInput(data=request.data)
        data.is_valid(raise_exception=True)
        try:
            row = tenant_models.provider_model_rotate(
                row=row, credentials=data.validated_data["credentials"]
            )
        except tenant_models.ProviderModelInvalid as exc:
            raise serializers.ValidationError(
                {exc.field or "non_field_errors": [str(exc)]}
            ) from None
        except TenantProviderModel.DoesNotExist:
            raise Http404 from None
        return Response(ProviderModelOutput(row).data)

    def delete(self, request, pk):
        tenant_models.provider_model_delete(row=self.tenant_object(pk))
        return Response(status=status.HTTP_204_NO_CONTENT)
