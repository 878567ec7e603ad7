"""Requests to URLs tenants choose (budget callbacks, alert webhooks) reach public hosts only.

A tenant must not turn CascadeFlow into a proxy towards its own network:
loopback, private, carrier-grade NAT, link-local (the cloud metadata service at
169.254.169.254), unique-local, multicast, reserved and unspecified addresses
are refused, in every spelling (``http://2130706433/``, ``http://0x7f.1/``,
``[::ffff:127.0.0.1]``, 6to4, Teredo, NAT64) and behind any name that resolves
to them.

Two checks, one rule (:func:`address_is_public`):

- Save time: :func:`validate_public_url` (and :func:`public_url_validator`, its
  Django form of it) resolves the URL's host and refuses it with
  :class:`UnsafeURLError`, so a tenant learns at once that a URL cannot work.
- Call time: :func:`guarded_transport` / :func:`async_guarded_transport` are httpx
  transports whose network backend resolves the host itself, vets every address,
  and connects to a vetted address while TLS (SNI, certificate) and the ``Host``
  header keep the URL's name. A name that answered a public address when saved
  and a private one now (DNS rebinding) is refused here, and nothing resolves the
  name between the check and the connection.

``CASCADEFLOW_ALLOW_PRIVATE_CALLBACKS`` (development and tests only, off by
default) lifts both checks, for local fake servers.
"""

from __future__ import annotations

import ipaddress
import socket
import typing

import anyio
import httpcore
import httpx
from django.conf import settings
from django.core.exceptions import ValidationError

Address = ipaddress.IPv4Address | ipaddress.IPv6Address
NAT64_PREFIX = ipaddress.ip_network("64:ff9b::/96")
ALLOWED_SCHEMES = ("http", "https")


class UnsafeURLError(ValueError):
    """A callback or webhook URL that must not be called; the message says why."""


class BlockedAddressError(httpcore.ConnectError):
    """Refused at connection time: the host resolves to a non-public address.

    A ``ConnectError``, so callers handle it like any unreachable endpoint (httpx
    raises it as ``httpx.ConnectError``, with this message)."""


def private_allowed() -> bool:
    return bool(getattr(settings, "CASCADEFLOW_ALLOW_PRIVATE_CALLBACKS", False))


def _embedded_ipv4(address: ipaddress.IPv6Address) -> ipaddress.IPv4Address | None:
    """The IPv4 address an IPv6 one carries (mapped, 6to4, Teredo client, NAT64), if any."""
    if address.ipv4_mapped is not None:
        return address.ipv4_mapped
    if address.sixtofour is not None:
        return address.sixtofour
    if address.teredo is not None:
        return address.teredo[1]
    if address in NAT64_PREFIX:
        return ipaddress.IPv4Address(int(address) & 0xFFFFFFFF)
    return None


def address_is_public(address: Address) -> bool:
    """Whether ``address`` is a globally routable unicast address (and so is any IPv4 it wraps)."""
    if isinstance(address, ipaddress.IPv6Address):
        embedded = _embedded_ipv4(address)
        if embedded is not None and not address_is_public(embedded):
            return False
    return (
        address.is_global
        and not address.is_multicast
        and not address.is_reserved
        and not address.is_unspecified
        and not address.is_link_local
    )


def _literal(host: str) -> Address | None:
    try:
        return ipaddress.ip_address(host.strip("[]").split("%", 1)[0])
    except ValueError:
        return None


def _parse(infos: list) -> list[Address]:
    seen: list[Address] = []
    for *_, sockaddr in infos:
        address = ipaddress.ip_address(str(sockaddr[0]).split("%", 1)[0])
        if address not in seen:
            seen.append(address)
    return seen


def _vet(host: str, addresses: list[Address]) -> list[str]:
    """Every address must be public (a mixed answer is refused whole); returns them as text."""
    if not addresses:
        raise UnsafeURLError(f"The host '{host}' has no address.")
    for address in addresses:
        if not address_is_public(address):
            shown = host if str(address) == host.strip("[]") else f"{host} ({address})"
            raise UnsafeURLError(
                f"The host {shown} is not a public address: callback and webhook URLs "
                "must reach the public internet (loopback, private, link-local and "
                "metadata addresses are refused)."
            )
    return [str(address) for address in addresses]


def resolve_public(host: str, port: int) -> list[str]:
    """The host's addresses, all public, or :class:`UnsafeURLError`. Literal IPs skip DNS;
    every other spelling goes through the system resolver, as the connection would."""
    literal = _literal(host)
    if literal is not None:
        return _vet(host, [literal])
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except (socket.gaierror, UnicodeError) as exc:
        raise UnsafeURLError(f"The host '{host}' could not be resolved ({exc}).") from None
    return _vet(host, _parse(infos))


async def aresolve_public(host: str, port: int) -> list[str]:
    literal = _literal(host)
    if literal is not None:
        return _vet(host, [literal])
    try:
        infos = await anyio.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except (socket.gaierror, UnicodeError) as exc:
        raise UnsafeURLError(f"The host '{host}' could not be resolved ({exc}).") from None
    return _vet(host, _parse(infos))


def validate_public_url(url: str) -> None:
    """Refuse (:class:`UnsafeURLError`) a URL CascadeFlow must not call; return None otherwise.

    Used when a tenant saves a budget callback or alert webhook URL. The scheme
    must be HTTP(S) and, unless ``CASCADEFLOW_ALLOW_PRIVATE_CALLBACKS`` is on,
    every address the host resolves to must be public. Call time checks again.
    """
    try:
        parsed = httpx.URL(url)
    except (httpx.InvalidURL, TypeError) as exc:
        raise UnsafeURLError(f"Not a valid URL: {exc}") from None
    if parsed.scheme not in ALLOWED_SCHEMES:
        raise UnsafeURLError("Callback and webhook URLs must start with https:// (or http://).")
    if not parsed.host:
        raise UnsafeURLError("The URL has no host.")
    if private_allowed():
        return
    resolve_public(parsed.host, parsed.port or (443 if parsed.scheme == "https" else 80))


def public_url_validator(value: str) -> None:
    """:func:`validate_public_url` as a Django validator (model fields, forms, serializers)."""
    if not value:
        return
    try:
        validate_public_url(value)
    except UnsafeURLError as exc:
        raise ValidationError(str(exc), code="unsafe_url") from None


# --- call time: a network backend that connects only to vetted addresses ------------------


class GuardedBackend(httpcore.NetworkBackend):
    """Wraps httpcore's sync backend: resolve, vet, then connect to the vetted IP.

    httpcore still starts TLS with the URL's host name (SNI and certificate check),
    and httpx sends it as ``Host``: only the TCP connection goes to the address.
    """

    def __init__(self, inner: httpcore.NetworkBackend) -> None:
        self._inner = inner

    def connect_tcp(
        self,
        host: str,
        port: int,
        timeout: float | None = None,
        local_address: str | None = None,
        socket_options: typing.Iterable[typing.Any] | None = None,
    ) -> httpcore.NetworkStream:
        if private_allowed():
            addresses = [host]
        else:
            try:
                addresses = resolve_public(host, port)
            except UnsafeURLError as exc:
                raise BlockedAddressError(str(exc)) from None
        error: Exception | None = None
        for address in addresses:
            try:
                return self._inner.connect_tcp(
                    address, port, timeout, local_address, socket_options
                )
            except (httpcore.ConnectError, httpcore.ConnectTimeout) as exc:
                error = exc
        assert error is not None
        raise error

    def connect_unix_socket(self, *args: typing.Any, **kwargs: typing.Any) -> typing.NoReturn:
        raise BlockedAddressError("Unix sockets are not callback targets.")

    def sleep(self, seconds: float) -> None:
        self._inner.sleep(seconds)


class AsyncGuardedBackend(httpcore.AsyncNetworkBackend):
    """The async twin of :class:`GuardedBackend` (asyncio or trio, through anyio)."""

    def __init__(self, inner: httpcore.AsyncNetworkBackend) -> None:
        self._inner = inner

    async def connect_tcp(
        self,
        host: str,
        port: int,
        timeout: float | None = None,
        local_address: str | None = None,
        socket_options: typing.Iterable[typing.Any] | None = None,
    ) -> httpcore.AsyncNetworkStream:
        if private_allowed():
            addresses = [host]
        else:
            try:
                with anyio.fail_after(timeout):
                    addresses = await aresolve_public(host, port)
            except TimeoutError:
                raise httpcore.ConnectTimeout(f"Resolving '{host}' timed out.") from None
            except UnsafeURLError as exc:
                raise BlockedAddressError(str(exc)) from None
        error: Exception | None = None
        for address in addresses:
            try:
                return await self._inner.connect_tcp(
                    address, port, timeout, local_address, socket_options
                )
            except (httpcore.ConnectError, httpcore.ConnectTimeout) as exc:
                error = exc
        assert error is not None
        raise error

    async def connect_unix_socket(self, *args: typing.Any, **kwargs: typing.Any) -> typing.NoReturn:
        raise BlockedAddressError("Unix sockets are not callback targets.")

    async def sleep(self, seconds: float) -> None:
        await self._inner.sleep(seconds)


def guarded_transport(**kwargs: typing.Any) -> httpx.HTTPTransport:
    """An ``httpx.HTTPTransport`` that connects to public addresses only (see the module).

    Use it with ``trust_env=False`` (or :func:`guarded_client`): a proxy taken from
    the environment would resolve the host itself, out of this check's reach.
    ``kwargs`` go to ``httpx.HTTPTransport`` (``verify``, ``retries``…; not ``proxy``).
    """
    transport = httpx.HTTPTransport(**kwargs)
    pool = transport._pool
    pool._network_backend = GuardedBackend(pool._network_backend)
    return transport


def async_guarded_transport(**kwargs: typing.Any) -> httpx.AsyncHTTPTransport:
    """An ``httpx.AsyncHTTPTransport`` that connects to public addresses only (see the module).

    For ``httpx.AsyncClient(transport=async_guarded_transport(), trust_env=False)``:
    the host is resolved (without blocking the event loop) and vetted on every new
    connection, and the connection goes to the vetted address; TLS and ``Host``
    keep the URL's name. A refused address raises ``httpx.ConnectError`` whose
    message says why. ``kwargs`` go to ``httpx.AsyncHTTPTransport`` (not ``proxy``).
    """
    transport = httpx.AsyncHTTPTransport(**kwargs)
    pool = transport._pool
    pool._network_backend = AsyncGuardedBackend(pool._network_backend)
    return transport


def guarded_client(**kwargs: typing.Any) -> httpx.Client:
    """An ``httpx.Client`` on :func:`guarded_transport`, ignoring proxy variables."""
    return httpx.Client(transport=guarded_transport(), trust_env=False, **kwargs)


def async_guarded_client(**kwargs: typing.Any) -> httpx.AsyncClient:
    """An ``httpx.AsyncClient`` on :func:`async_guarded_transport`, ignoring proxy variables."""
    return httpx.AsyncClient(transport=async_guarded_transport(), trust_env=False, **kwargs)
