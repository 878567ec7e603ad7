from django.contrib import admin

from routing.models import UsageEvent


@admin.register(UsageEvent)
class UsageEventAdmin(admin.ModelAdmin):
    list_display = ("created_at", "tenant", "requested_model", "model", "cost_nanos", "status")
    list_filter = ("tenant", "status", "model")
    search_fields = ("request_id",)
    readonly_fields = [f.name for f in UsageEvent._meta.fields]
