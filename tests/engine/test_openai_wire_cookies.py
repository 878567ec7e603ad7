"""The OpenAI-wire client's pooled session serves every tenant: it keeps no cookies."""

import asyncio
import json

from routing.engine import openai_wire

COMPLETION = {
    "id": "chatcmpl-1",
    "object": "chat.completion",
    "created": 1,
    "model": "gpt-x",
    "choices": [
        {
            "index": 0,
            "message": {"role": "assistant", "content": "4"},
            "finish_reason": "stop",
        }
    ],
    "usage": {"prompt_tokens": 3, "completion_tokens": 1, "total_tokens": 4},
}


async def test_a_cookie_an_upstream_sets_never_goes_out_with_a_later_request():
    seen: list[dict[str, str]] = []

    async def answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while head := await reader.readuntil(b"\r\n\r\n"):
            lines = head.decode().split("\r\n")[1:]
            headers = {k.lower(): v for k, _, v in (x.partition(": ") for x in lines if x)}
            await reader.readexactly(int(headers.get("content-length", 0)))
            seen.append(headers)
            body = json.dumps(COMPLETION).encode()
            writer.write(
                b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n"
                b"Set-Cookie: session=tenant-a-secret; Path=/\r\n"
                b"Set-Cookie: other=x; Path=/v1\r\n"
                + f"Content-Length: {len(body)}\r\n\r\n".encode()
                + body
            )
            await writer.drain()

    server = await asyncio.start_server(answer, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        for key in ("sk-tenant-a", "sk-tenant-b", "sk-tenant-b"):
            response = await openai_wire.acompletion(
                "openai/gpt-x",
                {
                    "api_base": f"http://localhost:{port}/v1",  # a name: a jar ignores an IP's cookies
                    "api_key": key,
                    "messages": [{"role": "user", "content": "2+2?"}],
                },
            )
            assert response.choices[0].message.content == "4"
    finally:
        server.close()
    assert [h["authorization"] for h in seen] == [
        "Bearer sk-tenant-a",
        "Bearer sk-tenant-b",
        "Bearer sk-tenant-b",
    ]
    assert all("cookie" not in h for h in seen)
