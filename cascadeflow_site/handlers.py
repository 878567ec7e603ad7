import asyncio

from django.conf import settings
from django.core.exceptions import RequestAborted
from django.core.handlers.asgi import ASGIHandler, get_script_prefix
from django.http import HttpResponseBase
from django.urls import set_script_prefix


class GatewayASGIHandler(ASGIHandler):
    """Django's ASGI handler for the OpenAI-compatible API (``/v1/``), the hot path.

    Two differences from Django's:

    - ``CASCADEFLOW_GATEWAY_MIDDLEWARE`` instead of ``MIDDLEWARE`` (no sessions, CSRF,
      messages…);
    - no ``request_started`` / ``request_finished`` signals. Django sends each
      through a hop to asgiref's one thread for sync code, before the view and
      after the response: two thread hops a request, all requests of a worker
      queued on that one thread. Their receivers (``reset_queries``,
      ``close_old_connections``, ``close_caches``, ``reset_urlconf``) act on the
      database connections of that thread, which gateway views never use: every
      view under ``/v1/`` is async and does its ORM work on ``core.db``'s pooled
      threads, which close old connections before and after each unit of work
      themselves (``tests/test_gateway_handler.py`` checks both, and pins the
      Django code this follows).
    """

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
        # new thread per request for thread-sensitive sync code; gateway views
        # have none, so no thread is created per request.
        await self.handle(scope, receive, send)

    async def handle(self, scope, receive, send):
        """``ASGIHandler.handle`` of Django 5.2 without the two request signals."""
        try:
            body_file = await self.read_body(receive)
        except RequestAborted:
            return
        set_script_prefix(get_script_prefix(scope))
        request, error_response = self.create_request(scope, body_file)
        if request is None:
            body_file.close()
            await self.send_response(error_response, send)
            close_response(error_response)
            return

        async def process_request(request, send):
            response = await self.run_get_response(request)
            try:
                await self.send_response(response, send)
            except asyncio.CancelledError:
                pass  # the client disconnected while the response was being sent
            return response

        # Watch for the client going away while the view runs (a cancelled
        # stream stops its upstream call).
        tasks = [
            asyncio.create_task(self.listen_for_disconnect(receive)),
            asyncio.create_task(process_request(request, send)),
        ]
        await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
        for task in tasks:
            if task.done():
                try:
                    task.result()
                except RequestAborted:
                    pass
                except AssertionError:
                    body_file.close()
                    raise
            else:
                task.cancel()
                try:
                    await task
                except asyncio.CancelledError:
                    pass
        try:
            response = tasks[1].result()
        except asyncio.CancelledError:
            pass
        else:
            close_response(response)
        body_file.close()


def close_response(response: HttpResponseBase) -> None:
    """``HttpResponseBase.close`` without sending ``request_finished``."""
    closers = response._resource_closers  # type: ignore[attr-defined]  # Django's own list
    for closer in closers:
        try:
            closer()
        except Exception:  # noqa: S110 - as Django: a closer's failure must not fail the response
            pass
    closers.clear()
    response.closed = True
