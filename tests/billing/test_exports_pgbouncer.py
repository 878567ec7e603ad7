"""CSV exports behind PgBouncer in transaction mode, the production topology.

Between two transactions of a request PgBouncer may hand its server connection
to another client, and the request's next transaction then runs on another
server. Each test forces that switch in the middle of an export: another client
takes the server the export's last query ran on (PgBouncer reuses the server
released last) and holds it in an open transaction while the export goes on.
"""

from datetime import UTC, datetime, timedelta

import psycopg
import pytest
from django.db import DatabaseError, connection

from billing.exports import EXPORT_PAGE_ROWS, GROUP_FIELDS, grouped_rows, rows
from routing.models import UsageEvent
from tests.factories import EndUserFactory, TenantFactory, UsageEventFactory

pytestmark = pytest.mark.services

START = datetime(2026, 11, 20, tzinfo=UTC)
END = START + timedelta(days=2)
# More than two pages, with timestamps shared by three rows so pages end inside a tie.
LEDGER_ROWS = 2 * EXPORT_PAGE_ROWS + 7


@pytest.fixture
def ledger(through_pgbouncer):
    tenant = TenantFactory(slug="pooled")
    users = [EndUserFactory(tenant=tenant, external_id=f"user-{i}") for i in range(3)]
    UsageEvent.objects.bulk_create(
        UsageEventFactory.build(
            tenant=tenant,
            end_user=users[i % 3],
            created_at=START + timedelta(minutes=i // 3),
            requested_model=f"demo/{('small', 'large')[i % 2]}",
            profile=f"cascade/{('balanced', 'cheap')[i % 2]}",
            cost_nanos=1_000 + i,
        )
        for i in range(LEDGER_ROWS)
    )
    return tenant


class ServerTaken:
    """Another client of the same PgBouncer, holding the server Django used last."""

    def __init__(self, bouncer):
        self.url = bouncer.url(
            f"postgresql://{connection.settings_dict['USER'] or 'postgres'}@127.0.0.1/"
            f"{connection.settings_dict['NAME']}"
        )

    def __enter__(self):
        with connection.cursor() as cursor:
            cursor.execute("SELECT pg_backend_pid()")
            (django_server,) = cursor.fetchone()
        self.other = psycopg.connect(self.url, autocommit=True)
        self.other.execute("BEGIN")
        (held,) = self.other.execute("SELECT pg_backend_pid()").fetchone()
        assert held == django_server, "the switch did not happen: the test proves nothing"
        return self

    def __exit__(self, *exc):
        self.other.execute("COMMIT")
        self.other.close()


def exports(tenant):
    """Every export of the range: plain, FOCUS and each grouping."""
    yield "plain", lambda: rows(tenant_id=tenant.pk, start=START, end=END, focus=False)
    yield "focus", lambda: rows(tenant_id=tenant.pk, start=START, end=END, focus=True)
    for group_by in GROUP_FIELDS:
        yield (
            f"group_by={group_by}",
            lambda g=group_by: grouped_rows(tenant_id=tenant.pk, start=START, end=END, group_by=g),
        )


def test_every_export_survives_a_server_switch_in_its_middle(ledger, through_pgbouncer):
    for name, export in exports(ledger):
        whole = list(export())
        lines = export()
        got = [next(lines), next(lines)]
        with ServerTaken(through_pgbouncer):
            got.extend(lines)

        assert got == whole, name
    assert len(whole) > 1
    assert len(list(rows(tenant_id=ledger.pk, start=START, end=END, focus=False))) == (
        LEDGER_ROWS + 1
    )


def test_the_export_reads_the_ledger_one_short_query_per_page(ledger, through_pgbouncer):
    """Paged, not one query holding the whole range in memory, and no cursor left open."""
    from django.test.utils import CaptureQueriesContext

    with CaptureQueriesContext(connection) as queries:
        lines = list(rows(tenant_id=ledger.pk, start=START, end=END, focus=False))

    assert len(lines) == LEDGER_ROWS + 1
    assert len(queries) == LEDGER_ROWS // EXPORT_PAGE_ROWS + 1
    assert all("LIMIT 2000" in q["sql"] for q in queries)
    with connection.cursor() as cursor:
        cursor.execute("SELECT count(*) FROM pg_cursors")
        assert cursor.fetchone() == (0,)


def test_a_server_side_cursor_outside_a_transaction_breaks_behind_the_pooler(
    ledger, through_pgbouncer
):
    """Why DATABASE_POOLER=transaction turns them off: Django's .iterator() declares a
    cursor WITH HOLD on one server and fetches it from whichever serves the next
    transaction."""
    connection.settings_dict["DISABLE_SERVER_SIDE_CURSORS"] = False
    try:
        ids = UsageEvent.objects.values_list("id", flat=True).iterator(chunk_size=10)
        next(ids)
        with ServerTaken(through_pgbouncer), pytest.raises((DatabaseError, psycopg.Error)) as err:
            list(ids)
    finally:
        connection.settings_dict["DISABLE_SERVER_SIDE_CURSORS"] = True

    assert "does not exist" in str(err.value)


def test_the_pooled_connection_prepares_no_statement(ledger, through_pgbouncer):
    """PgBouncer 1.18 (Debian 12) cannot route named prepared statements."""
    for _ in range(10):
        UsageEvent.objects.filter(tenant=ledger).count()

    assert connection.connection.prepare_threshold is None
    with connection.cursor() as cursor:
        cursor.execute("SELECT count(*) FROM pg_prepared_statements")
        assert cursor.fetchone() == (0,)
