"""OpenTelemetry traces, configured only by the standard ``OTEL_*`` environment variables.

Tracing is off unless an exporter is named: ``OTEL_TRACES_EXPORTER=otlp`` (or
``console``), or an OTLP endpoint is set (``OTEL_EXPORTER_OTLP_ENDPOINT`` /
``OTEL_EXPORTER_OTLP_TRACES_ENDPOINT``). ``OTEL_SDK_DISABLED=true`` wins.
The protocol follows ``OTEL_EXPORTER_OTLP_TRACES_PROTOCOL`` /
``OTEL_EXPORTER_OTLP_PROTOCOL`` (``http/protobuf`` by default, or ``grpc``);
service name, resource attributes, headers, sampling and batching come from
the variables the SDK reads itself (``OTEL_SERVICE_NAME``,
``OTEL_RESOURCE_ATTRIBUTES``, ``OTEL_TRACES_SAMPLER``, ``OTEL_BSP_*``…).

Spans are encoded and sent by an exporter process (``routing.span_export``), so
the serving process only creates them; ``CASCADEFLOW_TRACES_EXPORT_PROCESS=false``
keeps the SDK's exporter thread in the serving process instead.

Off, nothing is imported and no span object is created
(``routing.engine.tracing``). On, each request is one trace: the gateway's
server span (``chat <model>``), its admission, every upstream call and quality
check, and the ledger write; an incoming ``traceparent`` makes it a part of
the caller's trace.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from contextlib import AbstractContextManager, nullcontext
from typing import Any

from routing.engine import tracing

logger = logging.getLogger(__name__)

_configured = False


def wanted() -> bool:
    env = os.environ
    if env.get("OTEL_SDK_DISABLED", "").lower() == "true":
        return False
    exporter = env.get("OTEL_TRACES_EXPORTER", "").strip().lower()
    if exporter == "none":
        return False
    return bool(
        exporter
        or env.get("OTEL_EXPORTER_OTLP_ENDPOINT")
        or env.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT")
    )


def configure() -> None:
    """Turn tracing on when the environment asks for it (idempotent)."""
    global _configured
    if _configured or not wanted():
        return
    from opentelemetry import trace  # noqa: PLC0415 - the OpenTelemetry SDK is imported only when tracing is on
    from opentelemetry.sdk.resources import Resource  # noqa: PLC0415 - the OpenTelemetry SDK is imported only when tracing is on
    from opentelemetry.sdk.trace import TracerProvider  # noqa: PLC0415 - the OpenTelemetry SDK is imported only when tracing is on
    from opentelemetry.sdk.trace.export import BatchSpanProcessor  # noqa: PLC0415 - the OpenTelemetry SDK is imported only when tracing is on

    service = os.environ.get("OTEL_SERVICE_NAME", "cascadeflow")
    provider = TracerProvider(resource=Resource.create({"service.name": service}))
    exporter: Any
    if export_in_process():
        exporter = otlp_exporter()
    else:
        from routing.span_export import ForwardingExporter  # noqa: PLC0415 - the OpenTelemetry SDK is imported only when tracing is on

        exporter = ForwardingExporter()
    provider.add_span_processor(BatchSpanProcessor(exporter))
    trace.set_tracer_provider(provider)
    tracing.enable(trace.get_tracer("cascadeflow"))
    _configured = True
    logger.info(
        "Tracing on: OpenTelemetry spans exported over %s by %s",
        _protocol(),
        "this process" if export_in_process() else "an exporter process",
    )


def export_in_process() -> bool:
    """``CASCADEFLOW_TRACES_EXPORT_PROCESS=false``: the SDK's own thread encodes and sends
    the spans (as in any OpenTelemetry application) instead of an exporter process."""
    return os.environ.get("CASCADEFLOW_TRACES_EXPORT_PROCESS", "true").strip().lower() in {
        "0",
        "false",
        "no",
        "off",
    }


def _protocol() -> str:
    env = os.environ
    return (
        env.get("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL")
        or env.get("OTEL_EXPORTER_OTLP_PROTOCOL")
        or "http/protobuf"
    ).strip()


def otlp_exporter() -> Any:
    """The exporter the ``OTEL_*`` variables name (it reads its endpoint, headers, timeout
    and compression from them itself)."""
    if os.environ.get("OTEL_TRACES_EXPORTER", "").strip().lower() == "console":
        from opentelemetry.sdk.trace.export import ConsoleSpanExporter  # noqa: PLC0415 - only the exporter configured is imported

        return ConsoleSpanExporter()
    if _protocol() == "grpc":
        from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter  # noqa: PLC0415 - only the exporter configured is imported

        return OTLPSpanExporter()
    from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter  # noqa: PLC0415 - only the exporter configured is imported

    return OTLPSpanExporter()


class RequestSpan:
    """The server span of one request: made current while the request is handled, ended once
    (by the ledger write, or by the error answer when there is no ledger row)."""

    def __init__(self, span: Any):
        self.span = span
        self.ended = False

    def activate(self) -> AbstractContextManager[Any]:
        if self.span is tracing.NOTHING:
            return nullcontext()
        from opentelemetry import trace  # noqa: PLC0415 - the OpenTelemetry API is imported only when tracing is on

        return trace.use_span(self.span, end_on_exit=False)

    def finish(self, attributes: dict[str, Any], *, error: str | None = None) -> None:
        if self.ended or self.span is tracing.NOTHING:
            return
        self.ended = True
        self.span.set_attributes({k: v for k, v in attributes.items() if v is not None})
        if error:
            from opentelemetry.trace import Status, StatusCode  # noqa: PLC0415 - the OpenTelemetry API is imported only when tracing is on

            self.span.set_attribute("error.type", error)
            self.span.set_status(Status(StatusCode.ERROR, error))
        self.span.end()


OFF = RequestSpan(tracing.NOTHING)


def request_span(name: str, headers: Mapping[str, str], attributes: dict[str, Any]) -> RequestSpan:
    """The request's span, a child of the caller's trace when ``traceparent`` says so."""
    if not tracing.enabled():
        return OFF
    from opentelemetry import trace  # noqa: PLC0415 - the OpenTelemetry API is imported only when tracing is on
    from opentelemetry.propagate import extract  # noqa: PLC0415 - the OpenTelemetry API is imported only when tracing is on

    # The W3C headers only (and only when the caller sent one): not every header copied.
    carrier = {k: headers[k] for k in ("traceparent", "tracestate", "baggage") if k in headers}
    return RequestSpan(
        tracing._tracer.start_span(
            name,
            context=extract(carrier) if "traceparent" in carrier else None,
            kind=trace.SpanKind.SERVER,
            attributes={k: v for k, v in attributes.items() if v is not None},
        )
    )
