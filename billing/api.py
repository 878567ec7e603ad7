"""Management API: CSV cost export."""

from django.conf import settings
from django.http import FileResponse, Http404, StreamingHttpResponse
from drf_spectacular.types import OpenApiTypes
from drf_spectacular.utils import OpenApiParameter, extend_schema
from rest_framework import serializers
from rest_framework.exceptions import ValidationError
from rest_framework.response import Response

from billing.exports import (
    GROUP_FIELDS,
    download_job_id,
    download_token,
    export_job_queue,
    grouped_rows,
    parse_range,
    rows,
    stream_in_batches,
)
from billing.models import ExportJob
from routing.models import UsageEvent
from tenants.api_base import TenantAPIView
from tenants.enums import Scope

LAST_DAY = "end must be before 9999-12-31."


class UsageExportCsvApi(TenantAPIView):
    model = UsageEvent
    read_scope = write_scope = Scope.USAGE_READ

    @extend_schema(
        parameters=[
            OpenApiParameter("start", str, required=True, description="YYYY-MM-DD (UTC)"),
            OpenApiParameter("end", str, required=True, description="YYYY-MM-DD (UTC), inclusive"),
            OpenApiParameter(
                "format", str, enum=["focus"], description="FinOps FOCUS column names"
            ),
        ],
        responses={(200, "text/csv"): OpenApiTypes.STR},
    )
    def get(self, request):
        try:
            start, end = parse_range(
                request.query_params.get("start"), request.query_params.get("end")
            )
        except ValueError as exc:
            raise ValidationError({"range": [str(exc)]}) from None
        except OverflowError:  # the day after 9999-12-31
            raise ValidationError({"range": [LAST_DAY]}) from None
        focus = request.query_params.get("format") == "focus"
        count = UsageEvent.objects.filter(
            tenant_id=request.auth.tenant_id, created_at__gte=start, created_at__lt=end
        ).count()
        if count > settings.CASCADEFLOW_EXPORT_SYNC_MAX_ROWS and not request.query_params.get(
            "group_by"
        ):
            job = export_job_queue(
                tenant_id=request.auth.tenant_id, start=start, end=end, focus=focus
            )
            return Response(ExportJobOutput(job).data, status=202)
        group_by = request.query_params.get("group_by")
        if group_by:
            if group_by not in GROUP_FIELDS:
                raise ValidationError({"group_by": [f"One of {', '.join(GROUP_FIELDS)}."]})
            lines = grouped_rows(
                tenant_id=request.auth.tenant_id, start=start, end=end, group_by=group_by
            )
        else:
            lines = rows(tenant_id=request.auth.tenant_id, start=start, end=end, focus=focus)
        response = StreamingHttpResponse(
            stream_in_batches(lines) if _under_asgi(request) else lines,
            content_type="text/csv; charset=utf-8",
        )
        name = f"cascadeflow-usage-{start:%Y%m%d}-{end:%Y%m%d}{'-focus' if focus else ''}.csv"
        response["Content-Disposition"] = f'attachment; filename="{name}"'
        return response


def _under_asgi(request) -> bool:
    return hasattr(request._request, "scope")  # an ASGIRequest


class ExportJobOutput(serializers.ModelSerializer):
    download_url = serializers.SerializerMethodField()

    class Meta:
        model = ExportJob
        fields = [
            "id",
            "start",
            "end",
            "focus",
            "status",
            "error",
            "total_rows",
            "rows_written",
            "created_at",
            "finished_at",
            "download_url",
        ]

    def get_download_url(self, job) -> str | None:
        if job.status != "done":
            return None
        return f"/api/v1/usage/exports/{job.pk}/download/?token={download_token(job.pk)}"


class ExportJobCreateApi(TenantAPIView):
    model = ExportJob
    serializer_class = ExportJobOutput
    read_scope = write_scope = Scope.USAGE_READ

    class InputSerializer(serializers.Serializer):
        start = serializers.DateField()
        end = serializers.DateField()
        format = serializers.ChoiceField(choices=["csv", "focus"], default="csv")

    def post(self, request):
        data = self.InputSerializer(data=request.data)
        data.is_valid(raise_exception=True)
        values = data.validated_data
        try:
            start, end = parse_range(values["start"].isoformat(), values["end"].isoformat())
        except ValueError as exc:
            raise ValidationError({"range": [str(exc)]}) from None
        except OverflowError:  # the day after 9999-12-31
            raise ValidationError({"range": [LAST_DAY]}) from None
        job = export_job_queue(
            tenant_id=request.auth.tenant_id,
            start=start,
            end=end,
            focus=values["format"] == "focus",
        )
        return Response(ExportJobOutput(job).data, status=202)


class ExportJobDetailApi(TenantAPIView):
    model = ExportJob
    serializer_class = ExportJobOutput
    read_scope = write_scope = Scope.USAGE_READ

    def get(self, request, pk):
        return Response(ExportJobOutput(self.tenant_object(pk)).data)


class ExportJobDownloadApi(TenantAPIView):
    """The signed link is the credential: it names one job and expires."""

    model = ExportJob
    authentication_classes = []
    permission_classes = []

    @extend_schema(
        parameters=[OpenApiParameter("token", str, required=True)],
        responses={(200, "text/csv"): OpenApiTypes.STR},
    )
    def get(self, request, pk):

        token = request.query_params.get("token", "")
        if download_job_id(token, max_age_s=10**9) != pk:
            raise Http404
        if download_job_id(token, max_age_s=settings.CASCADEFLOW_EXPORT_LINK_SECONDS) is None:
            return Response(
                {"error": {"code": "link_expired", "message": "This download link has expired."}},
                status=410,
            )
        job = ExportJob.objects.filter(pk=pk, status="done").first()
        if job is None:
            raise Http404
        return FileResponse(
            open(job.file_path, "rb"),
            as_attachment=True,
            filename=f"cascadeflow-export-{job.pk}.csv",
        )
