"""An in-process HTTP server that speaks OpenAI's chat-completions and embeddings wire format.

Tests point LiteLLM at it through ``api_base`` so the real OpenAI client path
(HTTP, JSON, SSE, error mapping) runs end to end with no network. Behaviour is
set per model name: latency, an HTTP error status for the next N calls, a
malformed body, a stream that dies half-way, an answer computed from the
request (a judge that reads its prompt). ``n`` choices are answered as OpenAI
does (indexes 0..n-1; the prompt counted once, every choice's completion tokens
added up); a stream answers one (the gateway never streams several). ``POST
/embeddings`` answers one vector per input (``embedding_size`` floats, deterministic
from the input, or ``dimensions`` of them when asked), in float or base64 as asked,
with the behaviour's ``prompt_tokens`` as its usage. Every request body is kept for
assertions.

Also runs standalone for benchmarks: ``python -m tests.support.fake_upstream --port 9100``.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import hashlib
import json
import struct
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Any

import uvicorn

from tests.support.threaded_asgi import free_port, lifespan, read_body, serve


@dataclass
class Behaviour:
    content: str = "Hello from the fake upstream."
    latency_s: float = 0.0
    fail_status: int | None = None  # answer this status ...
    fail_times: int | None = None  # ... this many times (None = always)
    malformed: bool = False  # 200 with a body that is not a completion
    die_mid_stream: bool = False  # close the stream after the first chunk
    prompt_tokens: int = 12
    completion_tokens: int | None = None  # default: words in content
    tool_calls: list[dict] | None = None
    logprob: float = -0.05
    # The content as a function of the request body (a judge that reads its prompt).
    reply: Callable[[dict], str] | None = None
    # The tool calls as a function of the request body (None: answer with content), e.g. a
    # model that calls a tool, then answers once the tool's result is in the conversation.
    calls: Callable[[dict], list[dict] | None] | None = None
    embedding_size: int = 8  # floats per embedding, unless the request asks for dimensions
    report_usage: bool = True  # False: an embeddings answer without usage
    embeddings_missing: int = 0  # answer this many embeddings fewer than inputs
    chunked: bool = False  # send a completion without Content-Length, in pieces
    # A hostile or broken provider: the usage reported as it is (any JSON value) instead
    # of the counted one, or a 200 answer with this JSON body instead of a completion.
    usage: Any = None
    body: Any = None


@dataclass
class FakeUpstream:
    behaviours: dict[str, Behaviour] = field(default_factory=dict)
    default: Behaviour = field(default_factory=Behaviour)
    requests: list[dict[str, Any]] = field(default_factory=list)
    # The bearer key of each request, in order; with ``keys_accepted`` set, any other key
    # gets a 401 as a provider answers a wrong key.
    keys: list[str] = field(default_factory=list)
    keys_accepted: set[str] | None = None
    host: str = "127.0.0.1"
    port: int = 0
    _server: uvicorn.Server | None = None
    _thread: threading.Thread | None = None

    @property
    def api_base(self) -> str:
        return f"http://{self.host}:{self.port}/v1"

    def behaviour(self, model: str) -> Behaviour:
        return self.behaviours.get(model, self.default)

    def calls_for(self, model: str) -> list[dict[str, Any]]:
        return [r for r in self.requests if r.get("model") == model]

    # --- ASGI ---------------------------------------------------------------------

    async def __call__(self, scope, receive, send):
        if scope["type"] == "lifespan":
            return await lifespan(receive, send)
        body = await read_body(receive)
        path = scope["path"]
        if scope["method"] == "GET" and path.endswith("/models"):
            return await _json(send, 200, {"object": "list", "data": []})
        if scope["method"] != "POST" or not path.endswith(("/chat/completions", "/embeddings")):
            return await _json(send, 404, _error("Not found", "not_found"))
        try:
            payload = json.loads(body)
        except json.JSONDecodeError:
            return await _json(send, 400, _error("Invalid JSON", "invalid_json"))
        self.requests.append(payload)
        auth = dict(scope.get("headers") or []).get(b"authorization", b"").decode()
        key = auth.removeprefix("Bearer ").strip()
        self.keys.append(key)
        if self.keys_accepted is not None and key not in self.keys_accepted:
            return await _json(send, 401, _error("Incorrect API key provided", "invalid_api_key"))
        model = payload.get("model", "")
        b = self.behaviour(model)
        if b.latency_s:
            await asyncio.sleep(b.latency_s)
        if b.fail_status is not None and (b.fail_times is None or b.fail_times > 0):
            if b.fail_times is not None:
                b.fail_times -= 1
            headers = [(b"retry-after", b"1")] if b.fail_status == 429 else []
            return await _json(
                send, b.fail_status, _error(f"Injected {b.fail_status}", "injected"), headers
            )
        if b.malformed:
            return await _json(send, 200, {"unexpected": True})
        if b.body is not None:
            return await _json(send, 200, b.body)
        if path.endswith("/embeddings"):
            return await _json(send, 200, _embeddings(payload, b))
        if b.reply is not None:
            b = replace(b, content=b.reply(payload), reply=None)
        if b.calls is not None:
            b = replace(b, tool_calls=b.calls(payload), calls=None)
        if payload.get("stream"):
            return await self._stream(send, payload, b)
        return await _json(send, 200, _completion(payload, b), chunked=b.chunked)

    async def _stream(self, send, payload: dict, b: Behaviour) -> None:
        await send(
            {
                "type": "http.response.start",
                "status": 200,
                "headers": [(b"content-type", b"text/event-stream")],
            }
        )
        cid = f"chatcmpl-fake-{uuid.uuid4().hex[:12]}"
        base = {
            "id": cid,
            "object": "chat.completion.chunk",
            "created": int(time.time()),
            "model": payload.get("model"),
        }
        if b.tool_calls:
            await self._stream_tool_calls(send, base, b.tool_calls)
            await self._stream_end(send, payload, b, base, "tool_calls")
            return
        words = b.content.split(" ")
        for i, word in enumerate(words):
            delta = {"content": word if i == 0 else " " + word}
            if i == 0:
                delta["role"] = "assistant"
            chunk = {**base, "choices": [{"index": 0, "delta": delta, "finish_reason": None}]}
            await send({"type": "http.response.body", "body": _sse(chunk), "more_body": True})
            if b.die_mid_stream:
                # Abort the connection mid-body, as a crashing provider would.
                raise ConnectionAbortedError("fake upstream died mid-stream")
        await self._stream_end(send, payload, b, base, "stop")

    @staticmethod
    async def _stream_tool_calls(send, base: dict, calls: list[dict]) -> None:
        """Each call as OpenAI streams it: id and name first, then its arguments in two pieces."""
        for index, call in enumerate(calls):
            function = call.get("function") or {}
            arguments = function.get("arguments") or ""
            half = len(arguments) // 2
            opening = {
                "index": index,
                "id": call.get("id"),
                "type": "function",
                "function": {"name": function.get("name"), "arguments": ""},
            }
            deltas = [opening] + [
                {"index": index, "function": {"arguments": piece}}
                for piece in (arguments[:half], arguments[half:])
                if piece
            ]
            for i, delta in enumerate(deltas):
                message = {"tool_calls": [delta]}
                if index == 0 and i == 0:
                    message = {"role": "assistant", "content": None, **message}
                chunk = {**base, "choices": [{"index": 0, "delta": message, "finish_reason": None}]}
                await send({"type": "http.response.body", "body": _sse(chunk), "more_body": True})

    @staticmethod
    async def _stream_end(send, payload: dict, b: Behaviour, base: dict, finish: str) -> None:
        final = {**base, "choices": [{"index": 0, "delta": {}, "finish_reason": finish}]}
        await send({"type": "http.response.body", "body": _sse(final), "more_body": True})
        if (payload.get("stream_options") or {}).get("include_usage"):
            usage_chunk = {**base, "choices": [], "usage": _usage(b)}
            await send({"type": "http.response.body", "body": _sse(usage_chunk), "more_body": True})
        await send({"type": "http.response.body", "body": b"data: [DONE]\n\n", "more_body": False})

    # --- lifecycle ----------------------------------------------------------------

    def start(self) -> FakeUpstream:
        self.port = self.port or free_port(self.host)
        self._server, self._thread = serve(self, self.host, self.port)
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.should_exit = True
        if self._thread is not None:
            self._thread.join(timeout=10)


def _usage(b: Behaviour, n: int = 1) -> Any:
    """Usage as OpenAI reports it: the prompt once, the completion tokens of every choice."""
    if b.usage is not None:
        return b.usage
    per_choice = b.completion_tokens if b.completion_tokens is not None else len(b.content.split())
    completion = per_choice * n
    return {
        "prompt_tokens": b.prompt_tokens,
        "completion_tokens": completion,
        "total_tokens": b.prompt_tokens + completion,
    }


def _completion(payload: dict, b: Behaviour) -> dict:
    message: dict[str, Any] = {"role": "assistant", "content": b.content}
    finish = "stop"
    if b.tool_calls:
        message = {"role": "assistant", "content": None, "tool_calls": b.tool_calls}
        finish = "tool_calls"
    n = int(payload.get("n") or 1)
    choices = []
    for index in range(n):
        choice: dict[str, Any] = {"index": index, "message": message, "finish_reason": finish}
        if payload.get("logprobs"):
            choice["logprobs"] = {
                "content": [
                    {
                        "token": w,
                        "logprob": b.logprob,
                        "bytes": list(w.encode()),
                        "top_logprobs": [],
                    }
                    for w in b.content.split(" ")
                ]
            }
        choices.append(choice)
    return {
        "id": f"chatcmpl-fake-{uuid.uuid4().hex[:12]}",
        "object": "chat.completion",
        "created": int(time.time()),
        "model": payload.get("model"),
        "choices": choices,
        "usage": _usage(b, n),
    }


def fake_vector(item: Any, size: int) -> list[float]:
    """The fake's deterministic vector for one input (not normalised: a fake)."""
    seed = json.dumps(item)
    return [round(((hash_of(f"{seed}#{i}") % 2000) - 1000) / 1000, 3) for i in range(size)]


def hash_of(text: str) -> int:
    return int.from_bytes(hashlib.sha256(text.encode()).digest()[:8], "big")


def _embeddings(payload: dict, b: Behaviour) -> dict:
    raw = payload.get("input")
    inputs = [raw] if isinstance(raw, str) or (raw and isinstance(raw[0], int)) else raw
    size = int(payload.get("dimensions") or b.embedding_size)
    data = []
    for index, item in enumerate(inputs[: len(inputs) - b.embeddings_missing]):
        vector: Any = fake_vector(item, size)
        if payload.get("encoding_format") == "base64":
            vector = base64.b64encode(struct.pack(f"<{size}f", *vector)).decode()
        data.append({"object": "embedding", "index": index, "embedding": vector})
    body: dict[str, Any] = {"object": "list", "data": data, "model": payload.get("model")}
    if b.report_usage:
        body["usage"] = {"prompt_tokens": b.prompt_tokens, "total_tokens": b.prompt_tokens}
    return body


def _error(message: str, code: str) -> dict:
    return {"error": {"message": message, "type": "server_error", "param": None, "code": code}}


def _sse(data: dict) -> bytes:
    return b"data: " + json.dumps(data).encode() + b"\n\n"


async def _json(
    send, status: int, data: dict, headers: list | None = None, *, chunked: bool = False
) -> None:
    body = json.dumps(data).encode()
    length = [] if chunked else [(b"content-length", str(len(body)).encode())]
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [(b"content-type", b"application/json"), *length, *(headers or [])],
        }
    )
    if not chunked:
        await send({"type": "http.response.body", "body": body})
        return
    piece = 1 << 16
    for start in range(0, len(body), piece):
        await send(
            {
                "type": "http.response.body",
                "body": body[start : start + piece],
                "more_body": start + piece < len(body),
            }
        )


def main() -> None:
    parser = argparse.ArgumentParser(description="Fake OpenAI-compatible upstream")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=9100)
    parser.add_argument("--latency-ms", type=float, default=0.0)
    args = parser.parse_args()
    app = FakeUpstream(default=Behaviour(latency_s=args.latency_ms / 1000))
    uvicorn.run(app, host=args.host, port=args.port, log_level="warning", access_log=False)


if __name__ == "__main__":
    main()


def fake_models_config(api_base: str) -> dict:
    """Catalog entries served by the fake upstream through LiteLLM's OpenAI client."""
    entry = {"api_key": "sk-fake", "input_usd_per_mtok": 1.0, "output_usd_per_mtok": 2.0}
    return {
        "fake/gpt": {"model": "openai/gpt-fake", "api_base": api_base, **entry},
        "fake/failing": {"model": "openai/failing", "api_base": api_base, **entry},
        "fake/fallback": {
            "model": "openai/primary",
            "api_base": api_base,
            **entry,
            "deployments": [{"model": "openai/primary"}, {"model": "openai/secondary"}],
        },
        # Embedding models: one that takes 'dimensions', one that falls back, one that fails.
        "fake/embed": {
            "model": "openai/embed-fake",
            "api_base": api_base,
            "api_key": "sk-fake",
            "mode": "embedding",
            "dimensions": 8,
            "supports_dimensions": True,
            "input_usd_per_mtok": 0.1,
        },
        "fake/embed-fallback": {
            "model": "openai/embed-primary",
            "api_base": api_base,
            "api_key": "sk-fake",
            "mode": "embedding",
            "input_usd_per_mtok": 0.1,
            "deployments": [{"model": "openai/embed-primary"}, {"model": "openai/embed-secondary"}],
        },
    }
