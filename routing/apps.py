from django.apps import AppConfig


class RoutingConfig(AppConfig):
    name = "routing"
    default_auto_field = "django.db.models.BigAutoField"

    def ready(self) -> None:
        from django.conf import settings  # noqa: PLC0415 - apps are not ready at import
        from django.core.signals import setting_changed  # noqa: PLC0415 - apps are not ready at import

        from routing import catalog  # noqa: PLC0415 - apps are not ready at import
        from routing.providers import demo  # noqa: PLC0415 - apps are not ready at import

        demo.register()
        demo.latency_scale = settings.CASCADEFLOW_DEMO_LATENCY_SCALE
        setting_changed.connect(catalog.reset_on_setting_change)
