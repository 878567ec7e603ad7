"""Model prices in integer nano-dollars.

Invariant: every amount CascadeFlow stores is an ``int`` of nano-dollars
(1 USD = 10**9). Prices per token are kept as exact ``Decimal`` nano-dollars
(a $0.075 per million token price is 0.075 nano-dollars a token), and a call's
cost is rounded half-up to a whole nano-dollar once, at the end.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from decimal import ROUND_HALF_UP, Decimal
from typing import Any

from core.money import NANOS_PER_USD
from core.money import decimal_of as _decimal


@dataclass(frozen=True)
class ModelPrice:
    input_nanos_per_token: Decimal
    output_nanos_per_token: Decimal

    @classmethod
    def per_token_usd(cls, input_usd: float | str, output_usd: float | str) -> ModelPrice:
        def to_nanos(usd: float | str) -> Decimal:
            return _decimal(usd) * NANOS_PER_USD

        return cls(to_nanos(input_usd), to_nanos(output_usd))

    @classmethod
    def per_million_usd(cls, input_usd: float | str, output_usd: float | str) -> ModelPrice:
        def to_nanos(usd: float | str) -> Decimal:
            return _decimal(usd) * NANOS_PER_USD / 1_000_000

        return cls(to_nanos(input_usd), to_nanos(output_usd))

    def cost_nanos(self, prompt_tokens: int, completion_tokens: int) -> int:
        exact = (
            self.input_nanos_per_token * prompt_tokens
            + self.output_nanos_per_token * completion_tokens
        )
        return int(exact.quantize(Decimal(1), rounding=ROUND_HALF_UP))


ZERO_PRICE = ModelPrice(Decimal(0), Decimal(0))

# The most tokens one call is charged for, each way: what the ledger's token columns hold
# (32-bit integers), and far beyond what any model reads or writes in one call.
MAX_TOKENS_PER_CALL = 2**31 - 1


def token_count(value: Any) -> int | None:
    """``value`` when it is a count of tokens one call can be charged (an integer from 0
    to ``MAX_TOKENS_PER_CALL``; a bool, a float, a numeral in a string are not), else None."""
    return value if type(value) is int and 0 <= value <= MAX_TOKENS_PER_CALL else None


def reported_tokens(usage: Any) -> tuple[int, int] | None:
    """The ``(prompt, completion)`` tokens of a provider's reported usage (a mapping, or an
    object such as LiteLLM's ``Usage``); None when it reports none, or counts that cannot
    be: each must be an integer from 0 to ``MAX_TOKENS_PER_CALL`` (a bool, a float, a
    numeral in a string are not). A tenant's own server reports what it likes: a negative
    count would be a negative cost, one past the bound a ledger row that cannot be written.
    """
    if usage is None:
        return None
    prompt, completion = (
        token_count(usage.get(name) if isinstance(usage, Mapping) else getattr(usage, name, None))
        for name in ("prompt_tokens", "completion_tokens")
    )
    return None if prompt is None or completion is None else (prompt, completion)


def litellm_info(model: str) -> dict[str, Any]:
    """What LiteLLM's bundled cost map says of ``model`` (empty when it knows nothing)."""
    import litellm  # noqa: PLC0415 - LiteLLM loads in seconds; only a cost-map lookup needs it

    info = litellm.model_cost.get(model)
    if info is None and "/" in model:
        info = litellm.model_cost.get(model.split("/", 1)[1])
    return info or {}


def litellm_price(model: str) -> ModelPrice | None:
    """The price LiteLLM's bundled cost map gives ``model``, or None if unknown."""
    info = litellm_info(model)
    if not info:
        return None
    input_cost = info.get("input_cost_per_token")
    output_cost = info.get("output_cost_per_token")
    if input_cost is None and output_cost is None:
        return None
    return ModelPrice.per_token_usd(input_cost or 0.0, output_cost or 0.0)
