"""A tenant's budget-callback server for tests: verifies our signature, answers signed (or not)."""

from __future__ import annotations

import asyncio
import json
import time
from dataclasses import dataclass, field

import uvicorn

from tenants.callbacks import SIGNATURE_HEADER, TIMESTAMP_HEADER, sign, verify
from tests.support.threaded_asgi import free_port, lifespan, read_body, serve


@dataclass
class FakeCallback:
    secret: str
    decision: str = "allow"
    message: str = ""
    delay_s: float = 0.0
    answer_secret: str | None = None  # sign answers with another secret (a forgery)
    raw_answer: bytes | None = None  # answer these bytes (signed) instead of a decision
    received: list[dict] = field(default_factory=list)
    bad_request_signatures: int = 0
    port: int = 0
    _server: uvicorn.Server | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/budget-decision"

    async def __call__(self, scope, receive, send):
        if scope["type"] == "lifespan":
            return await lifespan(receive, send)
        body = await read_body(receive)
        headers = {k.decode().lower(): v.decode() for k, v in scope["headers"]}
        if not verify(
            self.secret,
            headers.get(TIMESTAMP_HEADER.lower()),
            headers.get(SIGNATURE_HEADER.lower()),
            body,
            time.time(),
        ):
            self.bad_request_signatures += 1
        self.received.append(json.loads(body))
        if self.delay_s:
            await asyncio.sleep(self.delay_s)
        answer = (
            self.raw_answer
            or json.dumps({"decision": self.decision, "message": self.message}).encode()
        )
        timestamp = str(int(time.time()))
        await send(
            {
                "type": "http.response.start",
                "status": 200,
                "headers": [
                    (b"content-type", b"application/json"),
                    (TIMESTAMP_HEADER.encode(), timestamp.encode()),
                    (
                        SIGNATURE_HEADER.encode(),
                        sign(self.answer_secret or self.secret, timestamp, answer).encode(),
                    ),
                ],
            }
        )
        await send({"type": "http.response.body", "body": answer})

    def start(self) -> FakeCallback:
        self.port = free_port()
        self._server, _ = serve(self, "127.0.0.1", self.port)
        return self

    def stop(self) -> None:
        if self._server:
            self._server.should_exit = True
