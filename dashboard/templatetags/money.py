from django import template

from core.money import format_usd

register = template.Library()


@register.filter
def usd(nanos: int | None) -> str:
    """Nano-dollars as money: $1,234.56, or more digits for sub-cent amounts."""
    return format_usd(nanos)


@register.filter
def count(value: int | None) -> str:
    """A whole number with thousands separators (4,131), as the live view writes it."""
    return f"{int(value or 0):,}"


@register.filter
def latency(usage, q: float) -> float | None:
    """A latency percentile (ms) of a selectors.Usage, from its histogram."""
    return usage.latency_pct(float(q))


@register.filter
def percent(share: float | None) -> str:
    """A share (0..1) as a percentage with one decimal (97.3%), as the tables write rates;
    an en dash when there is none (or it is not a number)."""
    if not isinstance(share, int | float) or isinstance(share, bool):
        return "\u2013"
    return f"{100 * share:.1f}%"
