"""Management API: CSV cost export."""

from itertools import islice

from asgiref.sync import sync_to_async
from django.http import StreamingHttpResponse
from drf_spectacular.types import OpenApiTypes
from drf_spectacular.utils import OpenApiParameter, extend_schema
from rest_framework.exceptions import ValidationError

from billing.exports import parse_range, rows
from routing.models import UsageEvent
from tenants.api_base import TenantAPIView
from tenants.enums import Scope


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
        focus = request.query_params.get("format") == "focus"
        lines = rows(tenant_id=request.auth.tenant_id, start=start, end=end, focus=focus)
        response = StreamingHttpResponse(
            _batches_async(lines) if _under_asgi(request) else lines,
            content_type="text/csv; charset=utf-8",
        )
        name = f"cascadeflow-usage-{start:%Y%m%d}-{end:%Y%m%d}{'-focus' if focus else ''}.csv"
        response["Content-Disposition"] = f'attachment; filename="{name}"'
        return response


def _under_asgi(request) -> bool:
    return hasattr(request._request, "scope")  # an ASGIRequest


async def _batches_async(lines, batch: int = 2000):
    """Stream a sync generator from ASGI without buffering it.

    Django serves a *sync* iterator under ASGI by reading it whole into
    memory; this reads it in batches on one thread (the database cursor's).
    """
    iterator = iter(lines)

    def next_batch() -> str:
        return "".join(islice(iterator, batch))

    while chunk := await sync_to_async(next_batch, thread_sensitive=True)():
        yield chunk
