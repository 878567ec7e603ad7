from decimal import Decimal

from django import template

register = template.Library()


@register.filter
def usd(nanos: int | None) -> str:
    """Nano-dollars as money: $1,234.56, or more digits for sub-cent amounts."""
    value = Decimal(nanos or 0) / 10**9
    if value == 0:
        return "$0.00"
    if abs(value) < Decimal("0.01"):
        return f"${value:.6f}"
    return f"${value:,.2f}"
