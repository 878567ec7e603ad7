from django.contrib import admin

from tenants.models import ApiToken, AuditEvent, EndUser, Member, Tenant, Tier


@admin.register(Tier)
class TierAdmin(admin.ModelAdmin):
    list_display = ("slug", "name", "monthly_budget_nanos", "requests_per_minute", "is_default")


class MemberInline(admin.TabularInline):
    model = Member
    extra = 0
    raw_id_fields = ("user",)


@admin.register(Tenant)
class TenantAdmin(admin.ModelAdmin):
    list_display = ("slug", "name", "tier", "is_active", "created_at")
    list_filter = ("is_active", "tier")
    search_fields = ("slug", "name")
    inlines = [MemberInline]


@admin.register(EndUser)
class EndUserAdmin(admin.ModelAdmin):
    list_display = ("external_id", "tenant", "audit_excluded", "created_at")
    list_filter = ("tenant", "audit_excluded")
    search_fields = ("external_id",)


@admin.register(ApiToken)
class ApiTokenAdmin(admin.ModelAdmin):
    """Operators can see and revoke tokens; the raw value is never stored or shown."""

    list_display = (
        "mask",
        "name",
        "tenant",
        "created_at",
        "last_used_at",
        "expires_at",
        "revoked_at",
    )
    list_filter = ("tenant",)
    readonly_fields = ("token_hash", "mask", "created_at", "last_used_at", "created_by")
    search_fields = ("name", "mask")

    def has_add_permission(self, request):
        return False


@admin.register(AuditEvent)
class AuditEventAdmin(admin.ModelAdmin):
    list_display = ("created_at", "tenant", "action", "target", "actor")
    list_filter = ("tenant", "action")
    readonly_fields = [f.name for f in AuditEvent._meta.fields]
