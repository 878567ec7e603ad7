"""CSV exports are safe to open: no cell is a formula, FOCUS Tags is always valid JSON.

End-user ids, model names and profile names come from tenants' own callers, so
every export is fed hostile values and parsed back with the csv module.
"""

import csv
import io
import json
from datetime import UTC, datetime, timedelta
from decimal import Decimal, InvalidOperation

import pytest

from billing.exports import (
    COLUMNS,
    FOCUS_COLUMNS,
    GROUP_FIELDS,
    focus_tags,
    grouped_rows,
    rows,
    safe,
)
from routing.models import UsageEvent
from tenants.models import EndUser
from tests.factories import UsageEventFactory

pytestmark = pytest.mark.django_db

START = datetime(2026, 11, 20, tzinfo=UTC)
END = START + timedelta(days=1)

HOSTILE = [
    'u1", "cost_center": "finance',
    'u1\\", "cost_center": "finance',
    '=HYPERLINK("http://evil.example","click")',
    "+SUM(A1:A9)",
    "-2+3",
    "@SUM(A1)",
    " =1+1",
    "   -1+1",
    "\t=1+1",
    "\r=1+1",
    "\n=1+1",
    " \t\r\n@cmd",
    "\u00a0=1+1",
    "\tplain",
    "\rplain",
    '=cmd|" /C calc"!A0',
    'quote " inside',
    "back\\slash",
    "line\nbreak",
    "comma, inside",
    "ünïcödé 😀",
    '{"end_user": "x"}',
    "}",
    "",
]
FORMULA = ("=", "+", "-", "@")


def evaluated(cell: str) -> bool:
    """Whether a spreadsheet would evaluate the cell (a number is a value, not a formula)."""
    try:
        Decimal(cell)
        return False
    except InvalidOperation:
        pass
    return cell.startswith(("\t", "\r")) or cell.lstrip().startswith(FORMULA)


def unquoted(cell: str, original: str) -> bool:
    """The cell is the original text, quoted when (and only when) it was dangerous."""
    return cell == ("'" + original if evaluated(original) else original)


@pytest.fixture
def hostile_ledger(tenant):
    """One request per hostile value, used as end user, model and profile at once."""
    for i, value in enumerate(HOSTILE):
        end_user = EndUser.objects.create(tenant=tenant, external_id=value) if value else None
        UsageEventFactory(
            tenant=tenant,
            end_user=end_user,
            request_id=f"req_{i}",
            created_at=START + timedelta(minutes=i),
            requested_model=value or "demo/small",
            model=value,
            models_called=[value, "demo/large"],
            profile=value,
            cost_nanos=1_000 + i,
            baseline_cost_nanos=5_000,
            prompt_tokens=3,
            completion_tokens=4,
        )
    return tenant


def parsed(lines) -> list[list[str]]:
    return list(csv.reader(io.StringIO("".join(lines), newline="")))


@pytest.mark.parametrize("focus", [False, True], ids=["plain", "focus"])
def test_no_exported_cell_is_a_formula(hostile_ledger, focus):
    header, *body = parsed(rows(tenant_id=hostile_ledger.pk, start=START, end=END, focus=focus))

    assert header == (FOCUS_COLUMNS if focus else COLUMNS)
    assert len(body) == len(HOSTILE)
    assert all(len(row) == len(header) for row in body)
    assert [cell for row in body for cell in row if evaluated(cell)] == []


def test_plain_export_keeps_each_value_quoted_only_when_dangerous(hostile_ledger):
    header, *body = parsed(rows(tenant_id=hostile_ledger.pk, start=START, end=END, focus=False))

    for row, value in zip(body, HOSTILE, strict=True):
        record = dict(zip(header, row, strict=True))
        for column in ("end_user", "profile"):
            assert unquoted(record[column], value), (column, value, record[column])
        assert unquoted(record["requested_model"], value or "demo/small")


def test_focus_tags_are_valid_json_with_exactly_the_expected_keys(hostile_ledger):
    header, *body = parsed(rows(tenant_id=hostile_ledger.pk, start=START, end=END, focus=True))

    for row, value in zip(body, HOSTILE, strict=True):
        tags = json.loads(row[header.index("Tags")])
        assert tags == {"end_user": value, "profile": value}
        assert list(tags) == sorted(tags)


@pytest.mark.parametrize("group_by", list(GROUP_FIELDS))
def test_no_grouped_cell_is_a_formula(hostile_ledger, group_by):
    _, *body = parsed(
        grouped_rows(tenant_id=hostile_ledger.pk, start=START, end=END, group_by=group_by)
    )

    assert body
    assert [cell for row in body for cell in row if evaluated(cell)] == []


@pytest.mark.parametrize("value", HOSTILE)
def test_safe_neutralises_exactly_what_a_spreadsheet_would_evaluate(value):
    cell = safe(value)

    assert not evaluated(cell)
    assert unquoted(cell, value)


@pytest.mark.parametrize("value", HOSTILE)
def test_focus_tags_round_trip_any_value(value):
    assert json.loads(focus_tags(end_user=value, profile=value)) == {
        "end_user": value,
        "profile": value,
    }
    assert json.loads(focus_tags(end_user=None, profile=None)) == {"end_user": "", "profile": ""}


@pytest.mark.parametrize("page", [1, 2, 3, 6, 7, 8])
def test_the_export_pages_through_ties_each_row_once_in_order(tenant, monkeypatch, page):
    """Pages start after the last row read (created_at, then id): a page ending inside a
    run of equal timestamps neither skips nor repeats a row, whatever the page size."""
    from billing import exports
    from tests.factories import UsageEventFactory

    monkeypatch.setattr(exports, "EXPORT_PAGE_ROWS", page)
    UsageEventFactory(tenant=tenant, request_id="before", created_at=START - timedelta(seconds=1))
    UsageEventFactory(tenant=tenant, request_id="after", created_at=END)
    for i in (6, 0, 3, 1, 4, 2, 5):  # ids out of time order; three rows per second
        UsageEventFactory(
            tenant=tenant, request_id=f"r{i}", created_at=START + timedelta(seconds=i // 3)
        )
    expected = list(
        UsageEvent.objects.filter(request_id__startswith="r")
        .order_by("created_at", "id")
        .values_list("request_id", flat=True)
    )

    _, *body = parsed(rows(tenant_id=tenant.pk, start=START, end=END, focus=False))

    assert [row[COLUMNS.index("request_id")] for row in body] == expected
    assert sorted(expected) == [f"r{i}" for i in range(7)]
