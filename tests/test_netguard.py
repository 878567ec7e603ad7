"""Callback and webhook URLs reach public addresses only: when saved and when called."""

import socket
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import httpcore
import httpx
import pytest
from django.core.exceptions import ValidationError

from core import netguard
from core.netguard import (
    UnsafeURLError,
    async_guarded_client,
    guarded_client,
    public_url_validator,
    validate_public_url,
)

PRIVATE_URLS = [
    "http://127.0.0.1/hook",
    "https://127.0.0.1:8443/hook",
    "http://10.1.2.3/hook",
    "http://172.16.5.4/hook",
    "http://172.31.255.254/hook",
    "http://192.168.0.10/hook",
    "http://169.254.169.254/latest/meta-data/",
    "http://100.64.0.1/hook",  # carrier-grade NAT
    "http://0.0.0.0/hook",
    "http://224.0.0.1/hook",  # multicast
    "http://[::1]/hook",
    "http://[::]/hook",
    "http://[fc00::1]/hook",
    "http://[fd12:3456::1]/hook",
    "http://[fe80::1]/hook",
    "http://[::ffff:127.0.0.1]/hook",
    "http://[::ffff:169.254.169.254]/hook",
    "http://[::ffff:a00:1]/hook",  # ::ffff:10.0.0.1
    "http://[2002:7f00:1::1]/hook",  # 6to4 around 127.0.0.1
    "http://[64:ff9b::a9fe:a9fe]/hook",  # NAT64 around 169.254.169.254
    "http://2130706433/hook",  # 127.0.0.1 as one decimal number
    "http://0177.0.0.1/hook",  # octal (httpx refuses to parse it at all)
    "http://0x7f.1/hook",  # hexadecimal, short form
    "http://127.1/hook",
    "http://localhost:8000/hook",  # a name that resolves to loopback
]
REFUSED = "not a public address|Invalid IPv4 address"
PUBLIC_IP = "93.184.215.14"
PUBLIC_HOST = "hooks.tenant.example"
CALL_REFUSED = (httpx.ConnectError, httpx.InvalidURL)


@pytest.fixture
def no_private(settings):
    settings.CASCADEFLOW_ALLOW_PRIVATE_CALLBACKS = False


@pytest.fixture
def dns(monkeypatch):
    """getaddrinfo answers ``PUBLIC_HOST`` from this table (changeable), the rest for real."""
    real = socket.getaddrinfo
    table = {PUBLIC_HOST: PUBLIC_IP}

    def fake(host, port, *args, **kwargs):
        if host in table:
            family = socket.AF_INET6 if ":" in table[host] else socket.AF_INET
            return [(family, socket.SOCK_STREAM, 6, "", (table[host], port))]
        return real(host, port, *args, **kwargs)

    monkeypatch.setattr(socket, "getaddrinfo", fake)
    return table


class RecordingBackend(httpcore.NetworkBackend):
    """Stands for the network: records where it was asked to connect and what was sent."""

    def __init__(self):
        self.connected: list[tuple[str, int]] = []
        self.sent = b""

    def connect_tcp(self, host, port, timeout=None, local_address=None, socket_options=None):
        self.connected.append((host, port))
        backend = self

        class Stream(httpcore.NetworkStream):
            def read(self, max_bytes, timeout=None):
                return b"HTTP/1.1 204 No Content\r\nContent-Length: 0\r\n\r\n"

            def write(self, buffer, timeout=None):
                backend.sent += buffer

            def close(self):
                pass

        return Stream()


# --- save time ----------------------------------------------------------------------------


@pytest.mark.parametrize("url", PRIVATE_URLS)
def test_a_private_url_is_refused_when_saved(no_private, url):
    with pytest.raises(UnsafeURLError, match=REFUSED):
        validate_public_url(url)
    with pytest.raises(ValidationError, match=REFUSED):
        public_url_validator(url)


def test_a_public_url_is_accepted_when_saved(no_private, dns):
    validate_public_url(f"https://{PUBLIC_HOST}/cascadeflow/budget")
    validate_public_url("https://[2606:4700:4700::1111]/hook")
    validate_public_url("http://8.8.8.8/hook")


def test_a_name_with_one_private_address_among_public_ones_is_refused(no_private, monkeypatch):
    def answers(host, port, *args, **kwargs):
        return [
            (socket.AF_INET, socket.SOCK_STREAM, 6, "", (PUBLIC_IP, port)),
            (socket.AF_INET, socket.SOCK_STREAM, 6, "", ("10.0.0.7", port)),
        ]

    monkeypatch.setattr(socket, "getaddrinfo", answers)

    with pytest.raises(UnsafeURLError, match=r"mixed\.example \(10\.0\.0\.7\)"):
        validate_public_url("https://mixed.example/hook")


@pytest.mark.parametrize(
    ("url", "message"),
    [
        ("ftp://8.8.8.8/hook", "https://"),
        ("file:///etc/passwd", "https://"),
        ("https:///nohost", "no host"),
        ("https://no-such-host.invalid/hook", "could not be resolved"),
    ],
)
def test_other_unusable_urls_are_refused_with_a_reason(no_private, url, message):
    with pytest.raises(UnsafeURLError, match=message):
        validate_public_url(url)


@pytest.mark.django_db
def test_the_tenant_form_refuses_a_private_callback_and_webhook(no_private, tenant):
    tenant.budget_callback_url = "http://169.254.169.254/latest/meta-data/"
    tenant.alert_webhook_url = "http://localhost:9000/hook"

    with pytest.raises(ValidationError) as refused:
        tenant.full_clean()

    assert set(refused.value.message_dict) == {"budget_callback_url", "alert_webhook_url"}


@pytest.mark.parametrize("url", ["http://127.0.0.1:9000/hook", "http://localhost/hook"])
def test_the_development_setting_allows_private_urls(settings, url):
    settings.CASCADEFLOW_ALLOW_PRIVATE_CALLBACKS = True

    validate_public_url(url)


# --- call time ----------------------------------------------------------------------------


@pytest.mark.parametrize("url", PRIVATE_URLS)
def test_a_private_url_is_refused_when_called(no_private, url):
    with guarded_client(timeout=2) as client, pytest.raises(CALL_REFUSED, match=REFUSED):
        client.post(url, content=b"{}")


@pytest.mark.parametrize("url", PRIVATE_URLS)
async def test_a_private_url_is_refused_when_called_asynchronously(no_private, url):
    async with async_guarded_client(timeout=2) as client:
        with pytest.raises(CALL_REFUSED, match=REFUSED):
            await client.post(url, content=b"{}")


def test_a_public_name_is_called_at_its_vetted_address_with_its_own_host_header(no_private, dns):
    network = RecordingBackend()
    transport = netguard.guarded_transport()
    transport._pool._network_backend = netguard.GuardedBackend(network)

    with httpx.Client(transport=transport, trust_env=False) as client:
        response = client.post(f"http://{PUBLIC_HOST}:8080/hook", content=b"{}")

    assert response.status_code == 204
    assert network.connected == [(PUBLIC_IP, 8080)]
    assert f"Host: {PUBLIC_HOST}:8080".encode() in network.sent


def test_a_name_rebound_to_a_private_address_after_saving_is_refused_when_called(no_private, dns):
    url = f"https://{PUBLIC_HOST}/hook"
    validate_public_url(url)  # saved while it answered a public address
    dns[PUBLIC_HOST] = "127.0.0.1"  # then the tenant's DNS answers loopback

    with guarded_client(timeout=2) as client, pytest.raises(httpx.ConnectError, match="public"):
        client.post(url, content=b"{}")


async def test_the_async_transport_also_refuses_a_rebound_name(no_private, dns, monkeypatch):
    dns[PUBLIC_HOST] = "::1"

    async def fake_getaddrinfo(host, port, **kwargs):
        return socket.getaddrinfo(host, port)

    monkeypatch.setattr(netguard.anyio, "getaddrinfo", fake_getaddrinfo)
    async with async_guarded_client(timeout=2) as client:
        with pytest.raises(httpx.ConnectError, match="not a public address"):
            await client.post(f"https://{PUBLIC_HOST}/hook", content=b"{}")


@pytest.fixture
def local_server():
    class Handler(BaseHTTPRequestHandler):
        def do_POST(self):
            self.rfile.read(int(self.headers.get("Content-Length", 0)))
            self.send_response(200)
            self.send_header("Content-Length", "2")
            self.end_headers()
            self.wfile.write(b"ok")

        def log_message(self, *args):
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://localhost:{server.server_address[1]}/hook"
    server.shutdown()


def test_the_development_setting_lets_calls_reach_a_local_server(settings, local_server):
    settings.CASCADEFLOW_ALLOW_PRIVATE_CALLBACKS = True

    with guarded_client(timeout=5) as client:
        assert client.post(local_server, content=b"{}").text == "ok"


async def test_the_development_setting_lets_async_calls_reach_a_local_server(
    settings, local_server
):
    settings.CASCADEFLOW_ALLOW_PRIVATE_CALLBACKS = True

    async with async_guarded_client(timeout=5) as client:
        assert (await client.post(local_server, content=b"{}")).text == "ok"


def test_without_the_setting_the_same_local_server_is_out_of_reach(no_private, local_server):
    with guarded_client(timeout=5) as client, pytest.raises(httpx.ConnectError):
        client.post(local_server, content=b"{}")
