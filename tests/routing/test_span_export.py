"""Spans handed to the exporter process: what it rebuilds is what the SDK would have exported,
and the process lives and dies with the one that feeds it."""

import json
import os
import subprocess
import sys
import time

import pytest
from django.test import AsyncClient
from opentelemetry.exporter.otlp.proto.common.trace_encoder import encode_spans
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from routing import span_export
from routing.enums import UsageStatus

pytestmark = pytest.mark.django_db(transaction=True)


async def test_a_requests_spans_survive_the_trip_exactly(spans, api_token):
    """Flattened and rebuilt, a cascade's spans encode to the very OTLP bytes the SDK's own
    exporter would have sent: names, ids, parents, kinds, times, attributes, events, status."""
    headers = {
        "Authorization": f"Bearer {api_token.raw}",
        "traceparent": "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
        "tracestate": "vendor=value",
    }
    for model in ("cascade/balanced", "no/such-model"):  # an answer, and an error span
        body = {"model": model, "messages": [{"role": "user", "content": "What is 2 + 2?"}]}
        await AsyncClient().post(
            "/v1/chat/completions",
            data=json.dumps(body),
            content_type="application/json",
            headers=headers,
        )
    finished = spans.get_finished_spans()
    assert len(finished) >= 6
    assert any(s.status.status_code.name == "ERROR" for s in finished)
    rebuilt = span_export.rebuild(span_export.flatten(finished))
    assert encode_spans(rebuilt).SerializeToString(deterministic=True) == encode_spans(
        finished
    ).SerializeToString(deterministic=True)


def test_attribute_values_of_every_kind_survive():
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    with provider.get_tracer("t").start_as_current_span("s") as span:
        span.set_attributes(
            {
                "s": "x",
                "b": True,
                "i": 2**62,
                "f": 0.5,
                "strs": ["a", "b"],
                "ints": [1, 2],
                "choice": UsageStatus.OK,  # a str subclass: the SDK takes it as its text
                "choices": [UsageStatus.OK],
            }
        )
        span.add_event("e", {"n": 1})
        try:
            raise ValueError("boom")
        except ValueError as exc:
            span.record_exception(exc)
    [finished] = exporter.get_finished_spans()
    [rebuilt] = span_export.rebuild(span_export.flatten([finished]))
    assert dict(rebuilt.attributes) == dict(finished.attributes)
    assert type(rebuilt.attributes["choice"]) is str and rebuilt.attributes["choices"] == ("ok",)
    assert [(e.name, dict(e.attributes), e.timestamp) for e in rebuilt.events] == [
        (e.name, dict(e.attributes), e.timestamp) for e in finished.events
    ]


def frames_to(path):
    """A stand-in exporter process that appends every byte it is sent to ``path``."""
    code = (
        "import signal, sys\n"
        "signal.signal(signal.SIGTERM, signal.SIG_IGN)\n"
        f"out = open({str(path)!r}, 'ab')\n"
        "while chunk := sys.stdin.buffer.read1(1 << 16):\n"
        "    out.write(chunk); out.flush()\n"
    )
    return [sys.executable, "-c", code]


def frames_in(path) -> int:
    """How many whole frames of one span ``path`` holds (each rebuilt to check it)."""
    data = path.read_bytes() if path.exists() else b""
    count = 0
    while len(data) >= span_export._HEADER.size:
        [size] = span_export._HEADER.unpack(data[: span_export._HEADER.size])
        frame, data = data[4 : 4 + size], data[4 + size :]
        if len(frame) < size:
            break
        [span] = span_export.rebuild(frame)
        assert span.name == "s"
        count += 1
    return count


def one_span():
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    provider.get_tracer("t").start_span("s").end()
    return exporter.get_finished_spans()


def test_a_dead_exporter_process_is_replaced_and_shutdown_waits_for_the_last_frame(tmp_path):
    out = tmp_path / "frames"
    exporter = span_export.ForwardingExporter(frames_to(out))
    batch = one_span()
    assert exporter.export(batch).name == "SUCCESS"
    deadline = time.monotonic() + 30
    while frames_in(out) < 1:  # the child has read it
        assert time.monotonic() < deadline
        time.sleep(0.05)
    first = exporter._child
    first.kill()
    first.wait()
    # The batch that meets a dead child may be lost (reported failed); the next one starts
    # another child and is delivered.
    results = [exporter.export(batch).name for _ in range(2)]
    assert results[-1] == "SUCCESS"
    assert exporter._child is not first and exporter._child.poll() is None
    second = exporter._child
    exporter.shutdown()
    assert second.poll() == 0  # the pipe closed: it read everything and left
    assert exporter.export(batch).name == "FAILURE"  # after shutdown, nothing is accepted
    assert frames_in(out) == 1 + results.count("SUCCESS")


def test_the_exporter_process_sends_what_it_reads_then_leaves_at_eof(tmp_path, monkeypatch):
    """The real child: frames in, the console exporter's JSON out, exit 0 at EOF, deaf to
    SIGTERM sent to the process group meanwhile."""
    env = {"OTEL_TRACES_EXPORTER": "console", "LITELLM_LOCAL_MODEL_COST_MAP": "True"}
    batch = one_span()
    frame = span_export.flatten(batch)
    child = subprocess.Popen(
        [sys.executable, "-m", "routing.span_export"],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        env={**os.environ, **env},
    )
    header = span_export._HEADER.pack(len(frame))
    child.stdin.write(header + frame)
    child.stdin.flush()
    seen = b""
    while b'"name": "s"' not in seen:  # the first batch went out: the child is up
        line = child.stdout.readline()
        assert line, "the exporter process ended early"
        seen += line
    child.terminate()  # ignored
    child.stdin.write(header + frame)
    child.stdin.close()
    out = seen + child.stdout.read()
    child.wait(timeout=60)
    assert child.returncode == 0
    assert out.decode().count('"name": "s"') == 2


@pytest.mark.parametrize(
    ("case", "frames"),
    [
        ("collector unreachable", lambda frame: [frame, frame]),
        ("frame cut short", lambda frame: [frame[: len(frame) // 2]]),
        ("length without a frame", lambda frame: [span_export._HEADER.pack(10**6)]),
    ],
)
def test_the_exporter_process_survives_what_it_cannot_send_or_read(case, frames):
    """A collector that is down, or a pipe that ends mid-frame (a parent killed while
    writing): the child neither hangs nor crashes, and leaves with status 0."""
    batch = one_span()
    frame = span_export.flatten(batch)
    env = {
        **os.environ,
        "OTEL_EXPORTER_OTLP_ENDPOINT": "http://127.0.0.1:9",  # nothing listens on port 9
        "OTEL_EXPORTER_OTLP_TIMEOUT": "1",
    }
    child = subprocess.Popen(
        [sys.executable, "-m", "routing.span_export"],
        stdin=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=env,
    )
    for part in frames(span_export._HEADER.pack(len(frame)) + frame):
        child.stdin.write(part)
    child.stdin.close()
    started = time.monotonic()
    child.wait(timeout=60)
    assert child.returncode == 0, child.stderr.read().decode()[-2000:]
    assert time.monotonic() - started < 30, case
