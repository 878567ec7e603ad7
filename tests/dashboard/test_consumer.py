"""The live dashboard socket: authentication, membership, tenant isolation, batching."""

import asyncio
import os
import time
import uuid

import pytest
from asgiref.sync import sync_to_async
from channels.layers import channel_layers
from django.conf import settings as django_settings
from django.contrib.auth import BACKEND_SESSION_KEY, HASH_SESSION_KEY, SESSION_KEY
from django.contrib.sessions.backends.db import SessionStore
from django.utils import timezone

from cascadeflow_site.asgi import application
from routing import live
from routing.services import LedgerEntry
from tenants.enums import MemberRole
from tests.factories import MemberFactory, TenantFactory, UserFactory
from tests.support.services import skip_or_fail
from tests.support.ws_communicator import WebsocketCommunicator

pytestmark = [pytest.mark.django_db(transaction=True), pytest.mark.services]


@pytest.fixture(params=["memory", "redis"])
def channel_layer(request, settings):
    if request.param == "redis":
        url = os.environ.get("REDIS_URL")
        if not url:
            skip_or_fail("REDIS_URL is not set for the Redis channel layer test")
        settings.CHANNEL_LAYERS = {
            "default": {
                "BACKEND": "channels_redis.core.RedisChannelLayer",
                "CONFIG": {"hosts": [url], "prefix": f"cf:test:{uuid.uuid4().hex[:8]}"},
            }
        }
    else:
        settings.CHANNEL_LAYERS = {"default": {"BACKEND": "channels.layers.InMemoryChannelLayer"}}
    channel_layers.backends.clear()
    live.publisher.__init__()  # a fresh publisher per test: no rate-limit state carried over
    yield request.param
    channel_layers.backends.clear()


@sync_to_async
def member_session(role=MemberRole.VIEWER):
    tenant = TenantFactory()
    user = UserFactory()
    MemberFactory(tenant=tenant, user=user, role=role)
    session = SessionStore()
    session[SESSION_KEY] = str(user.pk)
    session[BACKEND_SESSION_KEY] = django_settings.AUTHENTICATION_BACKENDS[0]
    session[HASH_SESSION_KEY] = user.get_session_auth_hash()
    session.save()
    return tenant, session.session_key


def socket(tenant_slug: str, session_key: str | None) -> WebsocketCommunicator:
    headers = [(b"origin", b"http://localhost"), (b"host", b"localhost")]
    if session_key:
        headers.append((b"cookie", f"{django_settings.SESSION_COOKIE_NAME}={session_key}".encode()))
    return WebsocketCommunicator(application, f"/ws/dashboard/?tenant={tenant_slug}", headers)


def entry(tenant_id: int, cost: int) -> LedgerEntry:
    return LedgerEntry(
        tenant_id=tenant_id,
        token_id=None,
        end_user_id=None,
        request_id=uuid.uuid4().hex,
        created_at=timezone.now(),
        requested_model="cascade/balanced",
        model="demo/small",
        paid_cost_nanos=cost,
        baseline_cost_nanos=cost * 5,
        status="ok",
    )


async def test_an_unauthenticated_socket_is_refused(channel_layer):
    tenant, _ = await member_session()
    ws = socket(tenant.slug, None)

    connected, _ = await ws.connect()

    assert not connected


async def test_a_member_of_a_cannot_open_bs_socket(channel_layer):
    _, key_a = await member_session()
    tenant_b, _ = await member_session()
    ws = socket(tenant_b.slug, key_a)

    connected, _ = await ws.connect()

    assert not connected


async def test_a_socket_of_tenant_a_never_receives_tenant_bs_events(channel_layer):
    tenant_a, key_a = await member_session()
    tenant_b, key_b = await member_session()
    ws_a, ws_b = socket(tenant_a.slug, key_a), socket(tenant_b.slug, key_b)
    assert (await ws_a.connect())[0] and (await ws_b.connect())[0]

    live.publish(entry(tenant_b.pk, 222))
    live.publish(entry(tenant_a.pk, 111))

    got_a = await ws_a.receive_json_from(timeout=3)
    got_b = await ws_b.receive_json_from(timeout=3)
    assert [e["cost"] for e in got_a["events"]] == [111]
    assert [e["cost"] for e in got_b["events"]] == [222]
    assert got_a["events"][0]["baseline"] == 555 and got_a["events"][0]["ok"] is True
    assert await ws_a.receive_nothing(timeout=1.5)  # and nothing of B's, ever
    await ws_a.disconnect()
    await ws_b.disconnect()


async def test_events_are_batched_at_most_once_a_second(channel_layer):
    tenant, key = await member_session()
    ws = socket(tenant.slug, key)
    assert (await ws.connect())[0]

    started = time.monotonic()
    live.publish(entry(tenant.pk, 1))
    first = await ws.receive_json_from(timeout=3)
    first_at = time.monotonic()
    for cost in range(2, 42):  # a burst: forty requests in well under a second
        live.publish(entry(tenant.pk, cost))
        await asyncio.sleep(0.005)
    second = await ws.receive_json_from(timeout=3)
    second_at = time.monotonic()

    assert first_at - started < 1.0  # the first event is not held back
    assert [e["cost"] for e in first["events"]] == [1]
    assert [e["cost"] for e in second["events"]] == list(range(2, 42))  # one message, in order
    assert second_at - first_at >= 0.9
    assert await ws.receive_nothing(timeout=0.5)
    await ws.disconnect()


async def test_a_removed_member_loses_the_socket(channel_layer, monkeypatch):
    from dashboard import consumers
    from tenants.models import Member

    monkeypatch.setattr(consumers, "RECHECK_SECONDS", 0)
    tenant, key = await member_session()
    ws = socket(tenant.slug, key)
    assert (await ws.connect())[0]
    await sync_to_async(Member.objects.filter(tenant=tenant).delete)()

    live.publish(entry(tenant.pk, 5))

    closed = await ws.receive_output(timeout=3)
    assert closed == {"type": "websocket.close", "code": consumers.FORBIDDEN}


@pytest.mark.parametrize(
    "frame",
    [
        {"text": "not json {"},
        {"text": "[" * 100_000},  # JSON nested past the parser's depth
        {"text": ""},
        {"bytes": b"\x00\xff binary"},
        {"text": '{"type": "usage.batch", "events": []}'},  # not a way into the group
    ],
    ids=["not-json", "deep-json", "empty", "binary", "a-group-message"],
)
async def test_whatever_a_client_sends_is_ignored_and_the_socket_keeps_working(
    channel_layer, frame
):
    tenant, key = await member_session()
    ws = socket(tenant.slug, key)
    assert (await ws.connect())[0]

    await ws.send_input({"type": "websocket.receive", **frame})
    assert await ws.receive_nothing(timeout=0.3)  # no answer, no close
    live.publish(entry(tenant.pk, 7))

    got = await ws.receive_json_from(timeout=3)
    assert [e["cost"] for e in got["events"]] == [7]
    await ws.disconnect()
