"""Money: every amount CascadeFlow stores is an ``int`` of nano-dollars (1 USD = 10**9).

The one home of the conversions to and from dollars and of how an amount is written
for people; pricing (routing.engine.pricing), the API, exports, alerts, pages and
charts all use these.
"""

from __future__ import annotations

from decimal import ROUND_HALF_UP, Decimal

NANOS_PER_USD = 10**9


def decimal_of(value: float | Decimal | str) -> Decimal:
    """Floats (LiteLLM's cost map) are read to 12 significant digits, dropping
    binary noise such as 0.15 / 1e6 == 1.4999999999999999e-07."""
    return Decimal(format(value, ".12g")) if isinstance(value, float) else Decimal(value)


def usd_to_nanos(usd: float | Decimal | str) -> int:
    """Dollars to whole nano-dollars, rounded half-up."""
    value = decimal_of(usd)
    return int((value * NANOS_PER_USD).quantize(Decimal(1), rounding=ROUND_HALF_UP))


def nanos_to_usd(nanos: int) -> Decimal:
    """Exact dollars."""
    return Decimal(nanos) / NANOS_PER_USD


def nanos_to_float_usd(nanos: int | float) -> float:
    """Dollars as a float, for charts and figures that are drawn, never stored."""
    return nanos / NANOS_PER_USD


def format_usd(nanos: int | None) -> str:
    """Nano-dollars as money: $1,234.56, or six decimals for sub-cent amounts."""
    value = nanos_to_usd(nanos or 0)
    if value == 0:
        return "$0.00"
    sign = "-" if value < 0 else ""
    if abs(value) < Decimal("0.01"):
        return f"{sign}${abs(value):.6f}"
    return f"{sign}${abs(value):,.2f}"
