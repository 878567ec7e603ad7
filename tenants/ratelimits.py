"""Requests and tokens per minute, per tenant, API token and end user.

Counting is a sliding-window counter (the current minute's count plus the
previous minute's, weighted by how much of it still lies in the last 60 s),
kept in Redis when ``REDIS_URL`` is set (shared by every process and machine)
and in process memory otherwise.

Invariants:

- **Check and hit are one atomic step, across every limit of the request.**
  In Redis one Lua script reads every window, and either refuses (counting
  nothing anywhere) or counts the request in all of them; in memory the same
  happens under one lock. A burst of 150 concurrent requests against 20 rpm
  lets exactly 20 through, on any number of processes. (The ``limits``
  library acquires one limit atomically, but not several together, and a
  request refused by one limit must not use up the others.)
- Windows are timed by the Redis server's clock (``TIME`` in the script), so
  application servers with skewed clocks agree.
- **Redis down fails open, never closed and never a 500**: a request that
  cannot reach Redis is counted by a per-process limiter instead (exact for
  that process, so N processes admit at most N times the limit), a warning is
  logged at most once a minute, and Redis is retried after a short pause.
  Budgets, unlike rate limits, stay exact: they live in PostgreSQL.
- Tokens are charged in two steps: the prompt at admission (checked), the
  completion once the answer is known (counted, never refused). In Redis a
  completion's tokens ride with the process's next call to the script (counted
  before that call checks anything), or a timer sends them on their own after
  ``PENDING_FLUSH_S``: one round trip a request instead of two. Other processes
  see them that much later at most.
"""

from __future__ import annotations

import logging
import math
import threading
import time
from dataclasses import dataclass
from functools import lru_cache

import redis
from django.conf import settings

logger = logging.getLogger(__name__)

WINDOW_S = 60
REDIS_PAUSE_S = 5.0  # after a Redis failure, count in memory this long before trying again
PENDING_FLUSH_S = 0.25  # completion tokens wait at most this long for the next script call


@dataclass(frozen=True)
class Limit:
    scope: str  # "tenant" | "token" | "end_user"
    key: str
    requests_per_minute: int | None
    tokens_per_minute: int | None
    label: str


class RateLimited(Exception):
    def __init__(self, limit: Limit, kind: str, retry_after: int):
        self.limit = limit
        self.kind = kind
        self.retry_after = retry_after
        what = "requests" if kind == "rpm" else "tokens"
        amount = limit.requests_per_minute if kind == "rpm" else limit.tokens_per_minute
        super().__init__(
            f"Rate limit reached for {limit.label}: {amount} {what} per minute. "
            f"Retry after {retry_after} s."
        )


@dataclass(frozen=True)
class Window:
    """One counter: ``allowance`` per ``seconds``, and what this request costs in it."""

    name: str
    allowance: int
    cost: int
    seconds: int = WINDOW_S


# What ``acquire`` does: check every window and count in all of them (or none); count
# without checking (a completion's tokens); check without counting (may I?).
CHECK_AND_COUNT, COUNT, PEEK = "check", "count", "peek"

# KEYS: window names, first the ``n`` windows ``mode`` applies to, then windows only
# counted (completion tokens of earlier requests). ARGV: the mode, ``n``, then allowance,
# cost and seconds per key. The counted-only windows are counted first (their tokens
# were spent before this request). Returns {0, 0} when allowed, else {index of the
# refusing window, seconds to wait}.
_ACQUIRE = """
local now = redis.call('TIME')
local t = tonumber(now[1]) + tonumber(now[2]) / 1000000
local mode = ARGV[1]
local n = tonumber(ARGV[2])
local function at(i)
  local seconds = tonumber(ARGV[5 + 3 * (i - 1)])
  local index = math.floor(t / seconds)
  return seconds, index, t - index * seconds
end
local function count(i)
  local seconds, index = at(i)
  local key = KEYS[i] .. ':' .. index
  redis.call('INCRBY', key, tonumber(ARGV[4 + 3 * (i - 1)]))
  redis.call('EXPIRE', key, 2 * seconds)
end
for i = n + 1, #KEYS do
  count(i)
end
if mode ~= 'count' then
  for i = 1, n do
    local seconds, index, elapsed = at(i)
    local allowance = tonumber(ARGV[3 + 3 * (i - 1)])
    local cost = tonumber(ARGV[4 + 3 * (i - 1)])
    local current = tonumber(redis.call('GET', KEYS[i] .. ':' .. index) or '0')
    local previous = tonumber(redis.call('GET', KEYS[i] .. ':' .. (index - 1)) or '0')
    if previous * (1 - elapsed / seconds) + current + cost > allowance then
      return {i, math.ceil(seconds - elapsed)}
    end
  end
end
if mode ~= 'peek' then
  for i = 1, n do
    count(i)
  end
end
return {0, 0}
"""


class RedisWindows:
    """Every process's counters, in Redis (see ``_ACQUIRE``)."""

    def __init__(self, url: str, prefix: str):
        # Threads wait briefly for a pooled connection rather than fail over to memory.
        pool = redis.BlockingConnectionPool.from_url(
            url,
            max_connections=64,
            timeout=1.0,
            socket_connect_timeout=0.25,
            socket_timeout=0.5,
            health_check_interval=30,
        )
        client = redis.Redis(connection_pool=pool)
        self._script = client.register_script(_ACQUIRE)
        self._prefix = prefix

    def acquire(
        self, windows: list[Window], *, mode: str, counted: list[Window] | None = None
    ) -> tuple[int, int]:
        """``mode`` on ``windows``; ``counted`` windows only counted, before anything else."""
        every = [*windows, *(counted or ())]
        keys = [f"{self._prefix}:{w.name}" for w in every]
        args: list[str | int] = [mode, len(windows)]
        for w in every:
            args += [w.allowance, w.cost, w.seconds]
        refused, retry_after = self._script(keys=keys, args=args)
        return int(refused), int(retry_after)


class MemoryWindows:
    """This process's counters: the same algorithm under one lock."""

    def __init__(self) -> None:
        self._counts: dict[tuple[str, int, int], int] = {}  # (name, seconds, index) -> count
        self._lock = threading.Lock()

    def acquire(self, windows: list[Window], *, mode: str) -> tuple[int, int]:
        t = time.time()
        with self._lock:
            if mode != COUNT:
                for i, w in enumerate(windows, start=1):
                    index = math.floor(t / w.seconds)
                    elapsed = t - index * w.seconds
                    current = self._counts.get((w.name, w.seconds, index), 0)
                    previous = self._counts.get((w.name, w.seconds, index - 1), 0)
                    if previous * (1 - elapsed / w.seconds) + current + w.cost > w.allowance:
                        return i, math.ceil(w.seconds - elapsed)
            if mode != PEEK:
                for w in windows:
                    key = (w.name, w.seconds, math.floor(t / w.seconds))
                    self._counts[key] = self._counts.get(key, 0) + w.cost
                if len(self._counts) > 10_000:
                    for key in [k for k in self._counts if k[2] < math.floor(t / k[1]) - 1]:
                        del self._counts[key]
        return 0, 0


class Limiter:
    """Redis when configured and reachable; this process's memory otherwise."""

    def __init__(self, url: str, prefix: str):
        self.redis = RedisWindows(url, prefix) if url else None
        self.memory = MemoryWindows()
        self._redis_paused_until = 0.0
        self._last_warning = 0.0
        # Counts waiting for the next script call: window name -> the window, costs summed.
        self._pending: dict[str, Window] = {}
        self._pending_lock = threading.Lock()
        # While counts wait, one timer is armed to send them: none waits longer than
        # PENDING_FLUSH_S, and a busy process arms at most one timer per PENDING_FLUSH_S.
        self._timer_armed = False

    def _usable_redis(self) -> RedisWindows | None:
        """Redis, unless it is not configured or paused after a failure."""
        if self.redis is not None and time.monotonic() >= self._redis_paused_until:
            return self.redis
        return None

    def _take_pending(self) -> list[Window]:
        with self._pending_lock:
            pending, self._pending = list(self._pending.values()), {}
        return pending

    def acquire(self, windows: list[Window], *, mode: str = CHECK_AND_COUNT) -> tuple[int, int]:
        """Apply ``mode`` to every window at once; ``(0, 0)``, or the refusing window (1-based)
        and the seconds until it may allow. Counts waiting to be sent go with it."""
        if (shared := self._usable_redis()) is not None:
            pending = self._take_pending()
            if not windows and not pending:
                return 0, 0
            try:
                return shared.acquire(windows, mode=mode, counted=pending)
            except redis.RedisError as exc:
                self._redis_paused_until = time.monotonic() + REDIS_PAUSE_S
                if time.monotonic() - self._last_warning > 60:
                    self._last_warning = time.monotonic()
                    logger.warning(
                        "Rate limits: Redis unreachable (%s); counting per process until it "
                        "answers again",
                        exc.__class__.__name__,
                    )
                self.memory.acquire(pending, mode=COUNT)
        return self.memory.acquire(windows, mode=mode)

    def count_later(self, windows: list[Window]) -> None:
        """Count ``windows`` (never refused) with the next script call, or on their own after
        at most ``PENDING_FLUSH_S``; at once where Redis is not in use."""
        if self._usable_redis() is None:
            self.memory.acquire(windows, mode=COUNT)
            return
        with self._pending_lock:
            for w in windows:
                waiting = self._pending.get(w.name)
                cost = w.cost + (waiting.cost if waiting else 0)
                self._pending[w.name] = Window(w.name, w.allowance, cost, w.seconds)
            arm, self._timer_armed = not self._timer_armed, True
        if arm:
            # A process that goes quiet still sends them. Under load the next request takes
            # them along and the timer finds little or nothing left to send.
            timer = threading.Timer(PENDING_FLUSH_S, self._flush_on_time)
            timer.daemon = True
            timer.start()

    def _flush_on_time(self) -> None:
        """The timer: send whatever still waits (a request may have taken it along)."""
        with self._pending_lock:
            self._timer_armed = False
        try:
            self.acquire([], mode=COUNT)
        except Exception:  # best effort, as the completion's charge always was
            logger.warning("Rate limits: could not send completion tokens", exc_info=True)


@lru_cache(maxsize=1)
def limiter() -> Limiter:
    return Limiter(settings.REDIS_URL, settings.CASCADEFLOW_RATELIMIT_PREFIX)


def _windows(limits: list[Limit], *, prompt_tokens: int) -> list[tuple[Limit, str, Window]]:
    windows = []
    for limit in limits:
        if limit.requests_per_minute:
            windows.append((limit, "rpm", Window(f"{limit.key}:rpm", limit.requests_per_minute, 1)))
        if limit.tokens_per_minute:
            cost = max(prompt_tokens, 1)
            windows.append(
                (limit, "tpm", Window(f"{limit.key}:tpm", limit.tokens_per_minute, cost))
            )
    return windows


def check_and_hit(limits: list[Limit], *, prompt_tokens: int) -> None:
    """Count this request against every limit, or refuse it (``RateLimited``) counting nothing."""
    windows = _windows(limits, prompt_tokens=prompt_tokens)
    if not windows:
        return
    refused, retry_after = limiter().acquire([w for _, _, w in windows])
    if refused:
        limit, kind, _ = windows[refused - 1]
        raise RateLimited(limit, kind, max(1, retry_after))


def charge_completion(limits: list[Limit], *, completion_tokens: int) -> None:
    """Add the answer's tokens to the per-minute token windows (never refuses)."""
    if completion_tokens <= 0:
        return
    windows = [
        Window(f"{limit.key}:tpm", limit.tokens_per_minute, completion_tokens)
        for limit in limits
        if limit.tokens_per_minute
    ]
    if windows:
        limiter().count_later(windows)
