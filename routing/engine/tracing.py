"""Spans, when tracing is on; nothing at all when it is off.

The gateway turns tracing on at start-up from the standard ``OTEL_*``
variables (``cascadeflow_site.telemetry``); the engine's code only opens
spans through :func:`span`, which returns a shared do-nothing object while no
tracer is set — not even the OpenTelemetry API's no-op span is created, so a
gateway with tracing off pays one global read per span site.

Span names and attributes follow the OpenTelemetry semantic conventions for
generative AI (``gen_ai.*``); CascadeFlow's own decisions are under
``cascadeflow.*``. Prompt and completion text are never put on a span here.
"""

from __future__ import annotations

from collections.abc import Mapping
from contextlib import AbstractContextManager
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from opentelemetry.trace import Tracer

_tracer: Tracer | None = None


class _Nothing:
    """Stands for a span while tracing is off: every call is ignored."""

    def __enter__(self) -> _Nothing:
        return self

    def __exit__(self, *exc: object) -> None:
        return None

    def set_attribute(self, key: str, value: Any) -> None:
        pass

    def set_attributes(self, attributes: Mapping[str, Any]) -> None:
        pass

    def add_event(self, name: str, attributes: Mapping[str, Any] | None = None) -> None:
        pass

    def record_exception(self, exception: BaseException) -> None:
        pass

    def set_status(self, *args: Any, **kwargs: Any) -> None:
        pass

    def is_recording(self) -> bool:
        return False

    def end(self) -> None:
        pass


NOTHING = _Nothing()


def enable(tracer: Tracer) -> None:
    global _tracer
    _tracer = tracer


def disable() -> None:
    global _tracer
    _tracer = None


def enabled() -> bool:
    return _tracer is not None


def span(
    name: str, attributes: Mapping[str, Any] | None = None, *, client: bool = False
) -> AbstractContextManager[Any]:
    """A child span of the current one (``client``: a call to another service)."""
    if _tracer is None:
        return NOTHING
    from opentelemetry.trace import SpanKind  # noqa: PLC0415 - the OpenTelemetry API is imported only when tracing is on

    return _tracer.start_as_current_span(
        name,
        kind=SpanKind.CLIENT if client else SpanKind.INTERNAL,
        attributes={k: v for k, v in (attributes or {}).items() if v is not None},
    )


def start(name: str, attributes: Mapping[str, Any] | None = None, *, client: bool = False) -> Any:
    """A span the caller ends itself (``span.end()``): for work that outlives a block, such as
    a stream read by someone else. Not made current."""
    if _tracer is None:
        return NOTHING
    from opentelemetry.trace import SpanKind  # noqa: PLC0415 - the OpenTelemetry API is imported only when tracing is on

    return _tracer.start_span(
        name,
        kind=SpanKind.CLIENT if client else SpanKind.INTERNAL,
        attributes={k: v for k, v in (attributes or {}).items() if v is not None},
    )


def provider_of(litellm_model: str) -> str:
    """``gen_ai.system`` from a LiteLLM model name (``anthropic/claude…`` -> ``anthropic``)."""
    prefix, _, rest = litellm_model.partition("/")
    return prefix if rest else "openai"
