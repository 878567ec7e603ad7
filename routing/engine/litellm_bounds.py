"""Provider answers read through LiteLLM are bounded like those of the OpenAI-wire client.

The OpenAI-wire client (``openai_wire``) reads at most ``max_response_bytes()`` of an
answer. Every other call goes through LiteLLM (``anthropic/…``, ``azure/…``, ``groq/…``,
any model when ``CASCADEFLOW_OPENAI_FAST_PATH=false``), and a tenant's own model may
point any of them at its own server (``api_base``), which answers what it likes: read
whole into the memory of a process that serves every tenant. LiteLLM offers no bound,
so one is put where all of its HTTP clients get their transport
(``AsyncHTTPHandler.create_async_transport``: LiteLLM's own handlers and the OpenAI and
Azure SDK clients it builds): each answer's body is counted as it is read, and reading
stops with ``AnswerTooLarge`` one chunk past the bound. LiteLLM reports it as a failed
call (a 502, retried, then the next deployment or model), as the OpenAI-wire client does.

``install()`` is called once, where the engine configures LiteLLM (``resilience``);
``tests/engine/test_upstream_limits.py`` runs its table through both transports, so a
LiteLLM upgrade that moves the transport fails there.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from typing import Any

import httpx
from litellm.llms.custom_httpx.http_handler import AsyncHTTPHandler

from routing.engine.openai_wire import max_response_bytes

logger = logging.getLogger(__name__)

EMBEDDINGS_FACTOR = 4  # as the OpenAI-wire client allows an embeddings answer
_INSTALLED = "_cascadeflow_bounded"


class AnswerTooLarge(httpx.ReadError):
    """A provider's answer past ``max_response_bytes()``: the call fails, read no further."""


class _BoundedStream(httpx.AsyncByteStream):
    def __init__(self, inner: Any, limit: int, url: str):
        self.inner, self.limit, self.url = inner, limit, url

    async def __aiter__(self) -> AsyncIterator[bytes]:
        read = 0
        async for chunk in self.inner:
            read += len(chunk)
            if read > self.limit:
                logger.warning(
                    "A provider's answer is larger than %s bytes (%s); the call fails",
                    f"{self.limit:,}",
                    self.url,
                )
                raise AnswerTooLarge(f"The provider's answer is larger than {self.limit:,} bytes.")
            yield chunk

    async def aclose(self) -> None:
        close = getattr(self.inner, "aclose", None)
        if close is not None:
            await close()


def limit_for(request: httpx.Request) -> int:
    limit = max_response_bytes()
    return limit * EMBEDDINGS_FACTOR if request.url.path.endswith("/embeddings") else limit


def bounded(transport: Any) -> Any:
    """``transport`` (an httpx async transport), its answers' bodies bounded; the same
    object, so that LiteLLM's checks of its type still hold."""
    if transport is None or getattr(transport, _INSTALLED, False):
        return transport
    send = transport.handle_async_request

    async def handle_async_request(request: httpx.Request) -> httpx.Response:
        response: httpx.Response = await send(request)
        response.stream = _BoundedStream(response.stream, limit_for(request), str(request.url))
        return response

    transport.handle_async_request = handle_async_request
    setattr(transport, _INSTALLED, True)
    return transport


def install() -> None:
    """Bound every transport LiteLLM creates from now on (idempotent)."""
    create = AsyncHTTPHandler.create_async_transport
    if getattr(create, _INSTALLED, False):
        return

    def create_async_transport(*args: Any, **kwargs: Any) -> Any:
        return bounded(create(*args, **kwargs))

    setattr(create_async_transport, _INSTALLED, True)
    AsyncHTTPHandler.create_async_transport = staticmethod(create_async_transport)  # type: ignore[method-assign]
    AsyncHTTPHandler._create_async_transport = staticmethod(create_async_transport)
