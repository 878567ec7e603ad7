from django.apps import AppConfig


class RoutingConfig(AppConfig):
    name = "routing"
    default_auto_field = "django.db.models.BigAutoField"

    def ready(self) -> None:
        from django.conf import settings
        from django.core.signals import setting_changed

        from routing import catalog
        from routing.providers import demo

        demo.register()
        demo.latency_scale = settings.CASCADEFLOW_DEMO_LATENCY_SCALE
        setting_changed.connect(catalog.reset_on_setting_change)
