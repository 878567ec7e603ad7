"""Loopback TCP proxies that can fail on command, and a tenant's budget-callback server.

    python bench/fault_proxy.py --target db=127.0.0.1:5432 --target redis=127.0.0.1:6379 \
        --callback-secret SECRET

Run by ``bench/faults.py`` as a child process (its own event loop, so forwarding
every database packet of the servers under test takes no time from the load
generator). Prints one JSON line with its ports, then obeys one command per line
on stdin and answers each with one JSON line:

- ``<target> up``: forward to the real service again;
- ``<target> refuse``: cut every proxied connection (reset) and stop listening:
  new connections are refused, as from a stopped server;
- ``<target> blackhole``: cut every proxied connection and accept new ones that
  never get an answer, as from a host gone silent (only timeouts end the wait);
- ``callback answer`` / ``callback drip``: the callback server answers at once,
  signed, or sends its status line and then one byte every 200 ms;
- ``stats``: connections and callback calls so far.

The real services are never touched: an outage is this process closing sockets.
End of stdin ends the process.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import hashlib
import hmac
import json
import sys
import time

DRIP_INTERVAL_S = 0.2
SIGNATURE_HEADER = b"x-cascadeflow-signature"
TIMESTAMP_HEADER = b"x-cascadeflow-timestamp"


def sign(secret: str, timestamp: str, body: bytes) -> str:
    """Signed as ``tenants.callbacks.sign`` signs (HMAC-SHA256 over ``<timestamp>.<body>``)."""
    digest = hmac.new(secret.encode(), timestamp.encode() + b"." + body, hashlib.sha256)
    return f"v1={digest.hexdigest()}"


class Proxy:
    def __init__(self, name: str, host: str, port: int):
        self.name, self.host, self.upstream_port = name, host, port
        self.port = 0
        self.state = "up"
        self.server: asyncio.AbstractServer | None = None
        self.links: set[asyncio.StreamWriter] = set()  # both ends of every proxied link
        self.held: set[asyncio.StreamWriter] = set()  # black-holed clients
        self.accepted = self.cut = 0

    async def listen(self) -> None:
        self.server = await asyncio.start_server(
            self._accept, "127.0.0.1", self.port, reuse_address=True
        )
        self.port = self.server.sockets[0].getsockname()[1]

    async def set(self, state: str) -> None:
        if state not in ("up", "refuse", "blackhole"):
            raise ValueError(state)
        self.state = state
        if state == "up":
            self._abort(self.held)
        else:
            self.cut += len(self.links) // 2
            self._abort(self.links)
        if state == "refuse" and self.server is not None:
            self.server.close()
            self.server = None
        elif state != "refuse" and self.server is None:
            await self.listen()

    @staticmethod
    def _abort(writers: set[asyncio.StreamWriter]) -> None:
        for writer in list(writers):
            writer.transport.abort()  # a reset, not a polite close
        writers.clear()

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.accepted += 1
        if self.state == "blackhole":
            self.held.add(writer)
            with contextlib.suppress(ConnectionError, OSError):
                while await reader.read(65536):
                    pass  # swallow the client's bytes, answer nothing
            self.held.discard(writer)
            writer.transport.abort()
            return
        if self.state != "up":
            writer.transport.abort()
            return
        try:
            up_reader, up_writer = await asyncio.open_connection(self.host, self.upstream_port)
        except OSError:
            writer.transport.abort()
            return
        pair = {writer, up_writer}
        self.links |= pair
        try:
            _, pending = await asyncio.wait(
                [
                    asyncio.create_task(_pipe(reader, up_writer)),
                    asyncio.create_task(_pipe(up_reader, writer)),
                ],
                return_when=asyncio.FIRST_COMPLETED,
            )
            for task in pending:
                task.cancel()
        finally:
            self.links -= pair
            for end in pair:
                end.transport.abort()


async def _pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    with contextlib.suppress(ConnectionError, OSError):
        while data := await reader.read(65536):
            writer.write(data)
            await writer.drain()


class CallbackServer:
    """A tenant's budget-decision endpoint: checks our signature, answers ``allow`` signed."""

    def __init__(self, secret: str):
        self.secret = secret
        self.drip = False
        self.port = 0
        self.calls = self.dripped = self.bad_signatures = 0

    async def listen(self) -> None:
        server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        self.port = server.sockets[0].getsockname()[1]

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:  # keep-alive: one request after another on the connection
                head = await reader.readuntil(b"\r\n\r\n")
                headers = {}
                for line in head.split(b"\r\n")[1:]:
                    name, _, value = line.partition(b":")
                    headers[name.strip().lower()] = value.strip()
                body = await reader.readexactly(int(headers.get(b"content-length", b"0")))
                self.calls += 1
                timestamp = headers.get(TIMESTAMP_HEADER, b"").decode()
                signature = headers.get(SIGNATURE_HEADER, b"").decode()
                if not hmac.compare_digest(sign(self.secret, timestamp, body), signature):
                    self.bad_signatures += 1
                answer = b'{"decision": "allow", "message": ""}'
                now = str(int(time.time()))
                start = (
                    f"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\n"
                    f"content-length: {len(answer)}\r\n"
                    f"x-cascadeflow-timestamp: {now}\r\n"
                    f"x-cascadeflow-signature: {sign(self.secret, now, answer)}\r\n\r\n"
                ).encode()
                if not self.drip:
                    writer.write(start + answer)
                    await writer.drain()
                    continue
                self.dripped += 1
                writer.write(start)
                for byte in answer:
                    await writer.drain()
                    await asyncio.sleep(DRIP_INTERVAL_S)
                    writer.write(bytes([byte]))
                await writer.drain()
        except (asyncio.IncompleteReadError, asyncio.LimitOverrunError, ConnectionError, OSError):
            pass
        finally:
            writer.transport.abort()


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--target", action="append", default=[], metavar="NAME=HOST:PORT")
    parser.add_argument("--callback-secret", required=True)
    args = parser.parse_args()

    proxies: dict[str, Proxy] = {}
    for spec in args.target:
        name, _, address = spec.partition("=")
        host, _, port = address.rpartition(":")
        proxies[name] = Proxy(name, host, int(port))
        await proxies[name].listen()
    callback = CallbackServer(args.callback_secret)
    await callback.listen()
    out = sys.stdout
    out.write(json.dumps({**{n: p.port for n, p in proxies.items()}, "callback": callback.port}))
    out.write("\n")
    out.flush()

    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader()
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
    while line := (await reader.readline()).decode().strip():
        name, _, state = line.partition(" ")
        answer: dict = {"ok": True}
        try:
            if name == "callback":
                callback.drip = {"drip": True, "answer": False}[state]
            elif name == "stats":
                answer["proxies"] = {
                    n: {"state": p.state, "accepted": p.accepted, "cut": p.cut}
                    for n, p in proxies.items()
                }
                answer["callback"] = {
                    "calls": callback.calls,
                    "dripped": callback.dripped,
                    "bad_signatures": callback.bad_signatures,
                }
            else:
                await proxies[name].set(state)
        except (KeyError, ValueError) as exc:
            answer = {"ok": False, "error": f"{exc.__class__.__name__}: {exc}"}
        out.write(json.dumps(answer) + "\n")
        out.flush()


if __name__ == "__main__":
    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(main())
