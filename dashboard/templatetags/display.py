from datetime import datetime

from django import template
from django.utils import timezone
from django.utils.dateformat import format as date_format
from django.utils.html import format_html

register = template.Library()


@register.filter
def when(moment: datetime | None, parts: str = "Y-m-d H:i") -> str:
    """A moment as a <time> element whose date and time never break inside themselves
    ("2026-11-\\n30"): a narrow column wraps between the date and the time, or not at all."""
    if moment is None:
        return ""
    local = timezone.localtime(moment) if timezone.is_aware(moment) else moment
    day, _, clock = parts.partition(" ")
    text = format_html('<span class="nowrap">{}</span>', date_format(local, day))
    if clock:
        text = format_html('{} <span class="nowrap">{}</span>', text, date_format(local, clock))
    return format_html('<time datetime="{}">{}</time>', local.isoformat(), text)
