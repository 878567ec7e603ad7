"""Requests and tokens per minute, per tenant, API token and end user.

Counting is the ``limits`` library's sliding-window counter, stored in Redis
when ``REDIS_URL`` is set (shared by every process and machine) and in
process memory otherwise (exact for one process). A request first *tests*
every applicable limit and only then *hits* them, so a request refused by one
limit is not counted against the others. Tokens are charged in two steps: the
prompt at admission, the completion once the answer is known.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from functools import lru_cache

from django.conf import settings
from limits import RateLimitItemPerMinute
from limits.storage import storage_from_string
from limits.strategies import SlidingWindowCounterRateLimiter


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


@lru_cache(maxsize=1)
def limiter() -> SlidingWindowCounterRateLimiter:
    uri = settings.REDIS_URL or "memory://"
    return SlidingWindowCounterRateLimiter(
        storage_from_string(uri, key_prefix=settings.CASCADEFLOW_RATELIMIT_PREFIX)
    )


def _retry_after(item: RateLimitItemPerMinute, *identifiers: str) -> int:
    stats = limiter().get_window_stats(item, *identifiers)
    return max(1, math.ceil(stats.reset_time - time.time()))


def check_and_hit(limits: list[Limit], *, prompt_tokens: int) -> None:
    """Refuse (``RateLimited``) if any limit is reached; otherwise count this request."""
    checks: list[tuple[Limit, str, RateLimitItemPerMinute, int]] = []
    for limit in limits:
        if limit.requests_per_minute:
            checks.append((limit, "rpm", RateLimitItemPerMinute(limit.requests_per_minute), 1))
        if limit.tokens_per_minute:
            checks.append(
                (
                    limit,
                    "tpm",
                    RateLimitItemPerMinute(limit.tokens_per_minute),
                    max(prompt_tokens, 1),
                )
            )
    rl = limiter()
    for limit, kind, item, cost in checks:
        if not rl.test(item, limit.key, kind, cost=cost):
            raise RateLimited(limit, kind, _retry_after(item, limit.key, kind))
    for limit, kind, item, cost in checks:
        rl.hit(item, limit.key, kind, cost=cost)


def charge_completion(limits: list[Limit], *, completion_tokens: int) -> None:
    """Add the answer's tokens to the per-minute token windows (never refuses)."""
    if completion_tokens <= 0:
        return
    rl = limiter()
    for limit in limits:
        if limit.tokens_per_minute:
            rl.hit(
                RateLimitItemPerMinute(limit.tokens_per_minute),
                limit.key,
                "tpm",
                cost=completion_tokens,
            )
