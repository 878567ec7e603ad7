"""The live dashboard socket: /ws/dashboard/?tenant=<slug>.

The session's user must be a member of the tenant, or the handshake is refused.
The socket joins that tenant's group only, and forwards batches at most once a
second, with each event's time bucketed in the tenant's time zone so the browser
can extend the server-built charts without doing time-zone arithmetic.
"""

import asyncio
import time
from datetime import UTC, datetime
from urllib.parse import parse_qs
from zoneinfo import ZoneInfo

from channels.db import database_sync_to_async
from channels.generic.websocket import AsyncJsonWebsocketConsumer

from routing.live import INTERVAL, group_name
from tenants.selectors import membership_of

UNAUTHENTICATED, FORBIDDEN = 4401, 4403
RECHECK_SECONDS = 60  # a member removed from the tenant loses the socket within a minute


@database_sync_to_async
def _membership(user, slug: str) -> tuple[int, str] | None:
    member = membership_of(user=user, tenant_slug=slug)
    return (member.tenant_id, member.tenant.time_zone) if member else None


class DashboardConsumer(AsyncJsonWebsocketConsumer):
    group: str | None = None

    async def connect(self) -> None:
        user = self.scope.get("user")
        if user is None or not user.is_authenticated:
            await self.close(code=UNAUTHENTICATED)
            return
        query = parse_qs(self.scope.get("query_string", b"").decode())
        membership = await _membership(user, (query.get("tenant") or [""])[0])
        if membership is None:
            await self.close(code=FORBIDDEN)
            return
        tenant_id, time_zone = membership
        self.user, self.slug = user, (query.get("tenant") or [""])[0]
        self.checked_at = time.monotonic()
        self.tz = ZoneInfo(time_zone or "UTC")
        self.pending: list[dict] = []
        self.dropped = 0
        self.last_sent = 0.0
        self.flush_handle: asyncio.TimerHandle | None = None
        self.group = group_name(tenant_id)
        await self.channel_layer.group_add(self.group, self.channel_name)
        await self.accept()

    async def disconnect(self, code: int) -> None:
        if self.group:
            await self.channel_layer.group_discard(self.group, self.channel_name)
        if getattr(self, "flush_handle", None):
            self.flush_handle.cancel()

    async def receive(self, text_data=None, bytes_data=None, **kwargs) -> None:
        """The socket is read-only: whatever a client sends (JSON or not, text or binary) is
        ignored unread, and the socket stays open."""

    async def usage_batch(self, message: dict) -> None:
        for event in message["events"]:
            at = datetime.fromtimestamp(event["at"], UTC).astimezone(self.tz)
            self.pending.append(
                {
                    "minute": at.strftime("%Y-%m-%d %H:%M"),
                    "hour": at.strftime("%Y-%m-%d %H:00"),
                    "day": at.strftime("%Y-%m-%d"),
                    "cost": event["cost"],
                    "baseline": event["baseline"],
                    "escalated": event["escalated"],
                    "ok": event["ok"],
                    "model": event["model"],
                    "profile": event["profile"],
                }
            )
        self.dropped += message.get("dropped", 0)
        wait = self.last_sent + INTERVAL - time.monotonic()
        if wait <= 0:
            await self._flush()
        elif self.flush_handle is None:
            loop = asyncio.get_running_loop()
            self.flush_handle = loop.call_later(wait, lambda: loop.create_task(self._flush()))

    async def _flush(self) -> None:
        self.flush_handle = None
        if not self.pending and not self.dropped:
            return
        if time.monotonic() - self.checked_at > RECHECK_SECONDS:
            self.checked_at = time.monotonic()
            if await _membership(self.user, self.slug) is None:
                self.pending = []
                await self.close(code=FORBIDDEN)
                return
        events, self.pending = self.pending, []
        dropped, self.dropped = self.dropped, 0
        self.last_sent = time.monotonic()
        await self.send_json({"type": "usage", "events": events, "dropped": dropped})
