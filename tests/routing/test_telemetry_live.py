"""Traces and metrics leaving a real server: OTLP (HTTP and gRPC) to a local receiver, and
/metrics adding up two worker processes."""

from __future__ import annotations

import threading
import time
from concurrent import futures
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import httpx
import pytest
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2, trace_service_pb2_grpc
from prometheus_client.parser import text_string_to_metric_families

from tests.support.fake_upstream import fake_models_config
from tests.support.live_server import LiveServer, free_port

CALLER_TRACE = "0af7651916cd43dd8448eb211c80319c"


class Receiver:
    """Collects the spans of every OTLP export request it is sent."""

    def __init__(self):
        self.spans: list = []
        self.lock = threading.Lock()

    def add(self, request: trace_service_pb2.ExportTraceServiceRequest) -> None:
        with self.lock:
            for resource in request.resource_spans:
                service = {a.key: a.value.string_value for a in resource.resource.attributes}.get(
                    "service.name"
                )
                for scope in resource.scope_spans:
                    for span in scope.spans:
                        self.spans.append((service, span))

    def wait_for(self, name: str, seconds: float = 15) -> list:
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            with self.lock:
                found = [(s, span) for s, span in self.spans if span.name == name]
            if found:
                return found
            time.sleep(0.1)
        raise AssertionError(f"no {name!r} span arrived; got {[s.name for _, s in self.spans]}")


def http_receiver(receiver: Receiver):
    class Handler(BaseHTTPRequestHandler):
        def do_POST(self):
            body = self.rfile.read(int(self.headers["Content-Length"]))
            if self.path == "/v1/traces":
                request = trace_service_pb2.ExportTraceServiceRequest()
                request.ParseFromString(body)
                receiver.add(request)
            self.send_response(200)
            self.send_header("Content-Type", "application/x-protobuf")
            self.end_headers()
            self.wfile.write(trace_service_pb2.ExportTraceServiceResponse().SerializeToString())

        def log_message(self, *args):
            pass

    server = ThreadingHTTPServer(("127.0.0.1", free_port()), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return f"http://127.0.0.1:{server.server_address[1]}", server.shutdown


def grpc_receiver(receiver: Receiver):
    import grpc

    class Service(trace_service_pb2_grpc.TraceServiceServicer):
        def Export(self, request, context):
            receiver.add(request)
            return trace_service_pb2.ExportTraceServiceResponse()

    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    trace_service_pb2_grpc.add_TraceServiceServicer_to_server(Service(), server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    return f"http://127.0.0.1:{port}", lambda: server.stop(0)


def attributes(span) -> dict:
    out = {}
    for a in span.attributes:
        value = a.value
        kind = value.WhichOneof("value")
        out[a.key] = getattr(value, kind) if kind != "array_value" else value.array_value
    return out


@pytest.mark.parametrize("protocol", ["http/protobuf", "grpc"])
def test_traces_reach_an_otlp_receiver(fake_upstream, tmp_path, protocol):
    receiver = Receiver()
    endpoint, stop = (http_receiver if protocol == "http/protobuf" else grpc_receiver)(receiver)
    server = LiveServer(
        backend="sqlite",
        models=fake_models_config(fake_upstream.api_base),
        extra_env={
            "OTEL_EXPORTER_OTLP_ENDPOINT": endpoint,
            "OTEL_EXPORTER_OTLP_PROTOCOL": protocol,
            "OTEL_SERVICE_NAME": "gateway-under-test",
            "OTEL_BSP_SCHEDULE_DELAY": "100",
            "PROMETHEUS_MULTIPROC_DIR": str(tmp_path),
        },
    )
    try:
        server.start()
        response = httpx.post(
            f"{server.base_url}/v1/chat/completions",
            headers={
                "Authorization": f"Bearer {server.token}",
                "traceparent": f"00-{CALLER_TRACE}-b7ad6b7169203331-01",
            },
            json={
                "model": "cascade/balanced",
                "messages": [{"role": "user", "content": "What is 7 * 6? private text"}],
            },
            timeout=30,
        )
        assert response.status_code == 200, response.text
        [(service, span)] = receiver.wait_for("chat")
        receiver.wait_for("ledger write")
        assert service == "gateway-under-test"
        assert span.trace_id.hex() == CALLER_TRACE
        assert span.parent_span_id.hex() == "b7ad6b7169203331"
        values = attributes(span)
        assert values["gen_ai.request.model"] == "cascade/balanced"
        assert values["cascadeflow.request_id"] == response.headers["x-request-id"]
        assert values["gen_ai.usage.output_tokens"] > 0
        every = " ".join(str(attributes(s)) for _, s in receiver.spans)
        assert "private text" not in every
        assert {s.trace_id.hex() for _, s in receiver.spans} == {CALLER_TRACE}
    finally:
        server.stop()
        stop()


def scrape(base_url: str, **headers) -> dict[str, float]:
    response = httpx.get(f"{base_url}/metrics", headers=headers, timeout=10)
    assert response.status_code == 200, response.text
    samples: dict[str, float] = {}
    for family in text_string_to_metric_families(response.text):
        for sample in family.samples:
            labels = ",".join(f"{k}={v}" for k, v in sorted(sample.labels.items()))
            samples[f"{sample.name}{{{labels}}}"] = sample.value
    return samples


def total(samples: dict[str, float], name: str, **labels: str) -> float:
    wanted = [f"{k}={v}" for k, v in labels.items()]
    return sum(
        value
        for key, value in samples.items()
        if key.startswith(name + "{") and all(w in key for w in wanted)
    )


def test_two_workers_add_up_on_metrics(fake_upstream, tmp_path):
    server = LiveServer(
        backend="sqlite",
        models=fake_models_config(fake_upstream.api_base),
        extra_env={"PROMETHEUS_MULTIPROC_DIR": str(tmp_path), "CASCADEFLOW_METRICS_TOKEN": "s3"},
    )
    try:
        server.start()
        second = server.another_process()
        auth = {"Authorization": f"Bearer {server.token}"}
        sent = {server.base_url: 3, second: 2}
        for base_url, count in sent.items():
            for index in range(count):
                response = httpx.post(
                    f"{base_url}/v1/chat/completions",
                    headers=auth,
                    json={
                        "model": "demo/small",
                        "messages": [{"role": "user", "content": f"What is {index} + 1?"}],
                        "stream": index == 0,  # one stream per worker
                    },
                    timeout=30,
                )
                assert response.status_code == 200
        refused = httpx.post(f"{second}/v1/chat/completions", json={}, timeout=10)
        assert refused.status_code == 401

        # The token is required (the server is on loopback, but a token is configured).
        assert httpx.get(f"{server.base_url}/metrics", timeout=10).status_code == 403
        wrong = httpx.get(
            f"{server.base_url}/metrics", headers={"Authorization": "Bearer nope"}, timeout=10
        )
        assert wrong.status_code == 403
        for base_url in sent:  # either worker reports both
            samples = scrape(base_url, Authorization="Bearer s3")
            completed = total(samples, "cascadeflow_completions_total", model="demo/small")
            assert completed == 5, samples
            assert (
                total(
                    samples,
                    "cascadeflow_http_requests_total",
                    route="chat-completions",
                    status="200",
                )
                == 5
            )
            assert total(samples, "cascadeflow_errors_total", code="invalid_api_key") == 1
            assert total(samples, "cascadeflow_cost_nanodollars_total") == sum(
                row[0] for row in server.query("SELECT cost_nanos FROM routing_usageevent")
            )
            assert total(samples, "cascadeflow_tokens_total", model="demo/small") > 0
            assert total(samples, "cascadeflow_time_to_first_token_seconds_count") == len(sent)
            assert total(samples, "cascadeflow_http_request_duration_seconds_count") >= 5
            assert "cascadeflow_celery_queue_depth{queue=celery}" in samples
    finally:
        server.stop()
