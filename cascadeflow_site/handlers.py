from django.conf import settings
from django.core.handlers.asgi import ASGIHandler


class GatewayASGIHandler(ASGIHandler):
    """Django's ASGI handler with ``CASCADEFLOW_GATEWAY_MIDDLEWARE`` instead of ``MIDDLEWARE``."""

    def load_middleware(self, is_async: bool = False) -> None:
        # Middleware is loaded once, at start-up, before any request is served.
        full = settings.MIDDLEWARE
        settings.MIDDLEWARE = settings.CASCADEFLOW_GATEWAY_MIDDLEWARE
        try:
            super().load_middleware(is_async=is_async)
        finally:
            settings.MIDDLEWARE = full
