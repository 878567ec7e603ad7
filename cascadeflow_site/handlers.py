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

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            raise ValueError(f"The gateway handler serves HTTP only, not {scope['type']}.")
        # Django wraps each request in a ThreadSensitiveContext, which starts a
        # new thread per request for thread-sensitive sync code. Gateway views do
        # their ORM work on pooled threads (routing.gateway.db), so the only
        # thread-sensitive calls left are Django's own request signals: they run
        # on asgiref's shared thread instead, and no thread is created per request.
        await self.handle(scope, receive, send)
