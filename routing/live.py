"""Ledger events to open dashboards, batched per tenant per second.

Routing owns this publisher and its channel-layer group names; the dashboard's
WebSocket consumer subscribes to them (routing never imports the dashboard).
The gateway calls :func:`publish` after each ledger row commits. Events are
buffered in-process and sent to the tenant's channel group at most once a second
(and at most ``MAX_EVENTS`` per batch; the rest are counted as ``dropped`` and
the browser resyncs), so a busy tenant costs one channel-layer message per
second per gateway process, not one per request, and cannot flood a browser.

Publishing never blocks or fails a request: buffering is an append, and the send
runs in a background task on the server's event loop. A process with no event
loop (a management command, a Celery worker) has no open dashboards to feed; its
events are dropped here and reach dashboards through the next page load.
"""

import asyncio
import logging
from collections import defaultdict

from channels.layers import get_channel_layer

from routing.enums import UsageStatus
from routing.services import LedgerEntry

logger = logging.getLogger(__name__)

INTERVAL = 1.0  # seconds between two batches of one tenant
MAX_EVENTS = 500  # per batch; more are counted, not sent


def group_name(tenant_id: int) -> str:
    return f"dashboard.tenant.{tenant_id}"


def event_of(entry: LedgerEntry) -> dict:
    return {
        "at": entry.created_at.timestamp(),
        "cost": entry.cost_nanos,
        "baseline": entry.baseline_cost_nanos,
        "escalated": entry.escalated,
        "ok": entry.status == UsageStatus.OK,
        "model": entry.model,
        "profile": entry.profile,
    }


class Publisher:
    def __init__(self) -> None:
        self._loop: asyncio.AbstractEventLoop | None = None
        self._task: asyncio.Task | None = None
        self._buffers: dict[int, list[dict]] = {}
        self._dropped: dict[int, int] = defaultdict(int)
        self._last_sent: dict[int, float] = {}

    def bind(self) -> None:
        """Remember the running event loop, so threads can publish through it."""
        self._loop = asyncio.get_running_loop()

    def publish(self, entry: LedgerEntry) -> None:
        """Queue one ledger event for its tenant's dashboards; callable from any thread."""
        event = event_of(entry)
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            loop = None
        if loop is not None:
            self._add(loop, entry.tenant_id, event)
        elif self._loop is not None and not self._loop.is_closed():
            self._loop.call_soon_threadsafe(self._add, self._loop, entry.tenant_id, event)

    def _add(self, loop: asyncio.AbstractEventLoop, tenant_id: int, event: dict) -> None:
        self._loop = loop
        buffer = self._buffers.setdefault(tenant_id, [])
        if len(buffer) < MAX_EVENTS:
            buffer.append(event)
        else:
            self._dropped[tenant_id] += 1
        if self._task is None or self._task.done() or self._task.get_loop() is not loop:
            self._task = loop.create_task(self._run())

    async def _run(self) -> None:
        layer = get_channel_layer()
        loop = asyncio.get_running_loop()
        while self._buffers:
            now = loop.time()
            for tenant_id in [
                t for t in self._buffers if self._last_sent.get(t, -INTERVAL) + INTERVAL <= now
            ]:
                events = self._buffers.pop(tenant_id)
                dropped = self._dropped.pop(tenant_id, 0)
                self._last_sent[tenant_id] = now
                try:
                    await layer.group_send(
                        group_name(tenant_id),
                        {"type": "usage.batch", "events": events, "dropped": dropped},
                    )
                except Exception:  # the dashboard is best effort; the ledger is not
                    logger.warning("Live dashboard publish failed", exc_info=True)
            if self._buffers:
                due = min(self._last_sent.get(t, 0.0) for t in self._buffers) + INTERVAL
                await asyncio.sleep(max(due - loop.time(), 0.005))


publisher = Publisher()
publish = publisher.publish
