import json

from django.contrib import admin
from django.utils.html import format_html

from routing.models import Audit, CalibrationVersion, UsageEvent


@admin.register(UsageEvent)
class UsageEventAdmin(admin.ModelAdmin):
    list_display = ("created_at", "tenant", "requested_model", "model", "cost_nanos", "status")
    list_filter = ("tenant", "status", "model")
    search_fields = ("request_id",)
    # The attempts as the gateway made them (a row stores them compactly).
    exclude = ("attempts",)
    readonly_fields = [
        "attempts_as_made" if f.name == "attempts" else f.name for f in UsageEvent._meta.fields
    ]

    @admin.display(description="attempts")
    def attempts_as_made(self, event: UsageEvent) -> str:
        return format_html(
            "<pre>{}</pre>", json.dumps(event.expanded_attempts, indent=2, default=str)
        )


@admin.register(CalibrationVersion)
class CalibrationVersionAdmin(admin.ModelAdmin):
    """Versions are never edited: promote or roll back through the API (audited)."""

    list_display = ("tenant", "profile", "version", "certified", "active", "created_at")
    list_filter = ("tenant", "certified", "active")
    readonly_fields = [f.name for f in CalibrationVersion._meta.fields]


@admin.register(Audit)
class AuditAdmin(admin.ModelAdmin):
    """Audits without their payload: the request's texts are the tenant's, not ours to read."""

    list_display = ("created_at", "tenant", "profile", "kind", "status", "cost_nanos")
    list_filter = ("tenant", "status", "kind")
    search_fields = ("request_id",)
    exclude = ("payload",)
    readonly_fields = [f.name for f in Audit._meta.fields if f.name != "payload"]
