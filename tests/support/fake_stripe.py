"""The Stripe endpoints localstripe does not serve, faked in process for tests.

Checkout sessions, billing-portal sessions and billing meter events (which
Stripe deduplicates by ``identifier``), plus customers, in Stripe's
form-encoded request and JSON response format.
"""

from __future__ import annotations

import json
import uuid
from dataclasses import dataclass, field
from urllib.parse import parse_qsl

from tests.support.threaded_asgi import free_port, lifespan, read_body, serve


def _form(body: bytes) -> dict:
    """Stripe's form encoding (a[b][0][c]=v) into nested dicts/lists."""
    out: dict = {}
    for key, value in parse_qsl(body.decode(), keep_blank_values=True):
        parts = key.replace("]", "").split("[")
        node = out
        for part in parts[:-1]:
            node = node.setdefault(part, {})
        node[parts[-1]] = value
    return out


@dataclass
class FakeStripe:
    customers: dict = field(default_factory=dict)
    checkout_sessions: list = field(default_factory=list)
    portal_sessions: list = field(default_factory=list)
    meter_events: dict = field(default_factory=dict)  # identifier -> event
    meter_posts: int = 0
    idempotency_keys: list = field(default_factory=list)
    fail_next_meter_posts: int = 0
    port: int = 0
    _server: object = None

    @property
    def base(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    async def __call__(self, scope, receive, send):
        if scope["type"] == "lifespan":
            return await lifespan(receive, send)
        body = await read_body(receive)
        headers = {k.decode().lower(): v.decode() for k, v in scope["headers"]}
        if headers.get("idempotency-key"):
            self.idempotency_keys.append(headers["idempotency-key"])
        data = _form(body) if body else {}
        path, method = scope["path"], scope["method"]
        status, payload = (
            404,
            {"error": {"type": "invalid_request_error", "message": f"No route {path}"}},
        )
        if method == "POST" and path == "/v1/customers":
            customer = {
                "id": f"cus_{uuid.uuid4().hex[:14]}",
                "object": "customer",
                "metadata": data.get("metadata", {}),
                "email": data.get("email"),
            }
            self.customers[customer["id"]] = customer
            status, payload = 200, customer
        elif method == "GET" and path.startswith("/v1/customers/"):
            customer = self.customers.get(path.rsplit("/", 1)[1])
            status, payload = (200, customer) if customer else (404, payload)
        elif method == "POST" and path == "/v1/checkout/sessions":
            session = {
                "id": f"cs_{uuid.uuid4().hex[:14]}",
                "object": "checkout.session",
                "url": f"https://checkout.stripe.test/{uuid.uuid4().hex[:8]}",
                **data,
            }
            self.checkout_sessions.append(session)
            status, payload = 200, session
        elif method == "POST" and path == "/v1/billing_portal/sessions":
            session = {
                "id": f"bps_{uuid.uuid4().hex[:14]}",
                "object": "billing_portal.session",
                "url": f"https://billing.stripe.test/{uuid.uuid4().hex[:8]}",
                **data,
            }
            self.portal_sessions.append(session)
            status, payload = 200, session
        elif method == "POST" and path == "/v1/billing/meter_events":
            self.meter_posts += 1
            if self.fail_next_meter_posts:
                self.fail_next_meter_posts -= 1
                status, payload = 500, {"error": {"type": "api_error", "message": "injected"}}
            else:
                identifier = data.get("identifier") or uuid.uuid4().hex
                event = {"object": "billing.meter_event", "identifier": identifier, **data}
                self.meter_events.setdefault(identifier, event)  # Stripe dedupes by identifier
                status, payload = 200, self.meter_events[identifier]
        raw = json.dumps(payload).encode()
        await send(
            {
                "type": "http.response.start",
                "status": status,
                "headers": [(b"content-type", b"application/json"), (b"request-id", b"req_fake")],
            }
        )
        await send({"type": "http.response.body", "body": raw})

    def billed_cents(self, customer: str) -> int:
        return sum(
            int(e["payload"]["value"])
            for e in self.meter_events.values()
            if e["payload"]["stripe_customer_id"] == customer
        )

    def start(self) -> FakeStripe:
        self.port = free_port()
        self._server, _ = serve(self, "127.0.0.1", self.port)
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.should_exit = True
