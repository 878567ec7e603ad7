"""Finished spans encoded and sent by an exporter process, not by the process that serves.

The OpenTelemetry SDK encodes spans to OTLP protobuf in pure Python (about as much
CPU as creating them) on its batch processor's thread, which holds the GIL the
event loop needs to serve the next request. :class:`ForwardingExporter` takes the
batch processor's place of exporter: it flattens each batch to plain values
(``marshal``: builtins only, nothing an unmarshal can execute) and writes one frame
to the stdin of a child process, ``python -m routing.span_export``, which rebuilds
the spans and hands them to the exporter the ``OTEL_*`` variables name (OTLP over
HTTP or gRPC, or the console), unchanged.

What holds:

- the batch processor keeps its semantics and its ``OTEL_BSP_*`` settings: batches,
  its bounded queue, and its drops when the exporter cannot keep up. A slow
  collector fills the pipe; the write then blocks the processor's thread (outside
  the GIL) and the processor's queue, not the requests, takes the back-pressure;
- one child per process that exports: a process forked after start-up (Celery's
  prefork pool, a pre-forking server) starts its own child, so frames of two
  processes never interleave on one pipe;
- a child that died is started again at the next batch; the batch that found it
  dead is reported failed to the processor (and logged), not retried;
- shutdown (the tracer provider's, at exit) closes the pipe: the child exports
  what it has read, shuts its exporter down and exits. The child ignores SIGINT and
  SIGTERM, which a terminal or a service manager sends to the whole process group,
  and leaves when its parent's pipe closes, so the parent's last batch is not lost;
  a parent killed outright closes the pipe too.

This module imports no Django: the child loads only OpenTelemetry and
``routing.telemetry``'s choice of exporter.
"""

from __future__ import annotations

import logging
import marshal
import os
import signal
import struct
import subprocess
import sys
import threading
from collections.abc import Mapping, Sequence
from typing import IO, Any

from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import Event, ReadableSpan
from opentelemetry.sdk.trace.export import SpanExporter, SpanExportResult
from opentelemetry.sdk.util.instrumentation import InstrumentationScope
from opentelemetry.trace import Link, SpanContext, SpanKind, Status, StatusCode, TraceFlags
from opentelemetry.trace.span import TraceState

logger = logging.getLogger(__name__)

_HEADER = struct.Struct(">I")  # the length of the frame that follows
_MARSHAL_VERSION = 4


def _context(ctx: SpanContext | None) -> tuple[int, int, bool, int, list[tuple[str, str]]] | None:
    if ctx is None:
        return None
    return (
        ctx.trace_id,
        ctx.span_id,
        ctx.is_remote,
        int(ctx.trace_flags),
        list(ctx.trace_state.items()) if ctx.trace_state else [],
    )


_PLAIN = (str, bool, int, float, bytes)


def _value(value: Any) -> Any:
    """An attribute value as marshal keeps it. The SDK's cleaning lets through str, bool,
    bytes, int and float *subclasses* (a choices enum), tuples of them and mappings:
    exported, they are their text or number, so that is what is sent."""
    kind = type(value)
    if kind in _PLAIN:
        return value
    if isinstance(value, Mapping):
        return _attributes(value)
    if isinstance(value, tuple | list):
        return tuple(_value(v) for v in value)
    if isinstance(value, str):
        return str.__str__(value)
    if isinstance(value, bytes):
        return bytes.__bytes__(value)
    for number in (bool, int, float):  # bool before int: a bool is an int
        if isinstance(value, number):
            return number(value)
    return value  # None, or what the SDK would have refused anyway


def _attributes(attributes: Any) -> dict[str, Any]:
    if not attributes:
        return {}
    plain = dict(attributes)
    for key, value in plain.items():
        if type(value) not in _PLAIN:  # most values are: they are copied as they are
            plain[key] = _value(value)
    return plain


def flatten(spans: Sequence[ReadableSpan]) -> bytes:
    """A frame of ``spans``: plain values only, in the order the SDK handed them over."""
    resources: dict[int, int] = {}
    resource_rows: list[tuple[dict[str, Any], str]] = []
    rows = []
    for span in spans:
        resource = span.resource
        index = resources.get(id(resource))
        if index is None:
            index = resources[id(resource)] = len(resource_rows)
            resource_rows.append((_attributes(resource.attributes), resource.schema_url))
        scope = span.instrumentation_scope
        rows.append(
            (
                span.name,
                _context(span.context),
                _context(span.parent),
                span.kind.value,
                span.start_time,
                span.end_time,
                _attributes(span.attributes),
                [(e.name, e.timestamp, _attributes(e.attributes)) for e in span.events],
                [(_context(link.context), _attributes(link.attributes)) for link in span.links],
                span.status.status_code.value,
                span.status.description,
                index,
                (scope.name, scope.version, scope.schema_url) if scope else None,
            )
        )
    return marshal.dumps((resource_rows, rows), _MARSHAL_VERSION)


def _span_context(row: tuple[Any, ...] | None) -> SpanContext | None:
    if row is None:
        return None
    trace_id, span_id, is_remote, flags, state = row
    return SpanContext(
        trace_id,
        span_id,
        is_remote=is_remote,
        trace_flags=TraceFlags(flags),
        trace_state=TraceState(state),
    )


def rebuild(frame: bytes) -> list[ReadableSpan]:
    """The spans of a frame written by :func:`flatten`, as the SDK's exporters take them."""
    resource_rows, rows = marshal.loads(frame)  # noqa: S302 - frames come only from the parent process's pipe
    resources = [Resource(attributes, schema_url) for attributes, schema_url in resource_rows]
    spans = []
    for (
        name,
        context,
        parent,
        kind,
        start,
        end,
        attributes,
        events,
        links,
        status_code,
        description,
        resource,
        scope,
    ) in rows:
        spans.append(
            ReadableSpan(
                name=name,
                context=_span_context(context),
                parent=_span_context(parent),
                resource=resources[resource],
                attributes=attributes,
                events=[Event(n, a, timestamp=t) for n, t, a in events],
                links=[Link(_span_context(c), a) for c, a in links],  # type: ignore[arg-type]
                kind=SpanKind(kind),
                status=Status(StatusCode(status_code), description),
                start_time=start,
                end_time=end,
                instrumentation_scope=InstrumentationScope(*scope) if scope else None,
            )
        )
    return spans


class ForwardingExporter(SpanExporter):
    """The serving process's exporter: each batch written to the exporter process."""

    def __init__(self, command: Sequence[str] | None = None):
        self._command = list(command or [sys.executable, "-m", "routing.span_export"])
        self._lock = threading.Lock()
        self._child: subprocess.Popen[bytes] | None = None
        self._pid = 0  # the process that started the child
        self._closed = False

    def _pipe(self) -> IO[bytes]:
        child = self._child
        if child is None or self._pid != os.getpid() or child.poll() is not None:
            if child is not None and self._pid == os.getpid():
                logger.warning(
                    "The span exporter process ended (%s); starting another", child.returncode
                )
            self._child = child = subprocess.Popen(self._command, stdin=subprocess.PIPE)
            self._pid = os.getpid()
        assert child.stdin is not None
        return child.stdin

    def export(self, spans: Sequence[ReadableSpan]) -> SpanExportResult:
        if self._closed:
            return SpanExportResult.FAILURE
        frame = flatten(spans)
        with self._lock:
            try:
                pipe = self._pipe()
                pipe.write(_HEADER.pack(len(frame)) + frame)
                pipe.flush()
            except (OSError, ValueError) as exc:  # the child died while we wrote
                logger.warning(
                    "%d spans not exported: the exporter process is gone (%s)", len(spans), exc
                )
                return SpanExportResult.FAILURE
        return SpanExportResult.SUCCESS

    def force_flush(self, timeout_millis: int = 30000) -> bool:
        return True  # every frame is written before export() returns; the child sends it

    def shutdown(self, timeout_seconds: float = 10.0) -> None:
        with self._lock:
            self._closed = True
            child, self._child = self._child, None
            if child is None or self._pid != os.getpid():
                return
            try:
                assert child.stdin is not None
                child.stdin.close()
            except OSError:
                pass
            try:
                child.wait(timeout=timeout_seconds)
            except subprocess.TimeoutExpired:
                logger.warning(
                    "The span exporter process did not finish in %ss; killed", timeout_seconds
                )
                child.kill()


def _read_exactly(stream: IO[bytes], size: int) -> bytes | None:
    data = stream.read(size)
    return data if data is not None and len(data) == size else None


def main() -> int:
    """The exporter process: frames from stdin to the configured exporter, until EOF."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    logging.basicConfig(level=logging.WARNING)
    from routing import telemetry  # noqa: PLC0415 - the child alone needs the configured exporter

    exporter = telemetry.otlp_exporter()
    stream = sys.stdin.buffer
    try:
        while True:
            header = _read_exactly(stream, _HEADER.size)
            if header is None:
                break
            frame = _read_exactly(stream, _HEADER.unpack(header)[0])
            if frame is None:
                break
            try:
                exporter.export(rebuild(frame))
            except Exception:
                logger.exception("A batch of spans could not be exported")
    finally:
        exporter.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
