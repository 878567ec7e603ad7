from django.contrib import admin

from routing.models import Audit, CalibrationVersion, UsageEvent


@admin.register(UsageEvent)
class UsageEventAdmin(admin.ModelAdmin):
    list_display = ("created_at", "tenant", "requested_model", "model", "cost_nanos", "status")
    list_filter = ("tenant", "status", "model")
    search_fields = ("request_id",)
    readonly_fields = [f.name for f in UsageEvent._meta.fields]


@admin.register(CalibrationVersion)
class CalibrationVersionAdmin(admin.ModelAdmin):
    """Versions are never edited: promote or roll back through the API (audited)."""

    list_display = ("tenant", "profile", "version", "certified", "active", "created_at")
    list_filter = ("tenant", "certified", "active")
    readonly_fields = [f.name for f in CalibrationVersion._meta.fields]


@admin.register(Audit)
class AuditAdmin(admin.ModelAdmin):
    """Audits without their payload: the request's texts are the tenant's, not ours to read."""

    list_display = ("created_at", "tenant", "profile", "uniform", "status", "cost_nanos")
    list_filter = ("tenant", "status", "uniform")
    search_fields = ("request_id",)
    exclude = ("payload",)
    readonly_fields = [f.name for f in Audit._meta.fields if f.name != "payload"]
