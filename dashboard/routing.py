"""WebSocket routes (the live dashboard consumer is mounted here)."""

websocket_urlpatterns: list = []
