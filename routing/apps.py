from django.apps import AppConfig


class RoutingConfig(AppConfig):
    name = "routing"
    default_auto_field = "django.db.models.BigAutoField"

    def ready(self) -> None:
        """Register the offline demo models and follow settings changes (imports here:
        the app registry is not ready when this module is imported)."""
        from django.conf import settings  # noqa: PLC0415
        from django.core.signals import setting_changed  # noqa: PLC0415

        from routing import platform_models  # noqa: PLC0415
        from routing.providers import demo  # noqa: PLC0415

        demo.register()
        demo.latency_scale = settings.CASCADEFLOW_DEMO_LATENCY_SCALE
        setting_changed.connect(platform_models.reset_on_setting_change)
