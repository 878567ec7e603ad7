"""The hot path's fixed statements are prepared once per connection (``core.db.statement_cursor``).

On PostgreSQL reached directly the ledger row, the budget reservation and the settlement
bind their parameters on the server and are prepared on their first run; behind a
transaction pooler nothing is prepared. Either way the cursor behaves as Django's: its
errors, ``execute_wrapper`` hooks and the query log.
"""

import pytest
from django.db import DatabaseError, IntegrityError, connection, transaction
from django.test.utils import CaptureQueriesContext, override_settings

from core.db import statement_cursor
from tests.support.services import skip_or_fail

pytestmark = pytest.mark.services

TABLE = "cf_statement_cursor_probe"
INSERT = f"INSERT INTO {TABLE} (id, amount, label) VALUES (%s, %s, %s)"


@pytest.fixture
def probe(transactional_db):
    if connection.vendor != "postgresql":
        skip_or_fail("Prepared statements are PostgreSQL's (DATABASE_URL)")
    with connection.cursor() as cursor:
        cursor.execute(f"CREATE TABLE {TABLE} (id bigint PRIMARY KEY, amount bigint, label text)")
    yield
    with connection.cursor() as cursor:
        cursor.execute(f"DROP TABLE IF EXISTS {TABLE}")
        cursor.execute("DEALLOCATE ALL")


def prepared(statement: str) -> int:
    with connection.cursor() as cursor:
        cursor.execute(
            "SELECT count(*) FROM pg_prepared_statements WHERE statement LIKE %s",
            [statement.replace("%s", "%%").split(" VALUES")[0] + "%"],
        )
        return cursor.fetchone()[0]


def rows() -> list[tuple]:
    with connection.cursor() as cursor:
        cursor.execute(f"SELECT id, amount, label FROM {TABLE} ORDER BY id")
        return cursor.fetchall()


# Integers of every size psycopg would otherwise type differently (int2, int4, int8),
# None, and text that PostgreSQL types from the column.
VALUES = [
    (1, 7, "small"),
    (2, 70_000, "int4"),
    (3, 9_000_000_000_000_000_000, "near the largest bigint"),
    (4, -32_768, None),
    (5, None, "x' OR 1=1 --"),
    (6, 0, "\u2028 é \x00"[:-1]),
]


def test_direct_postgresql_prepares_each_statement_once(probe):
    for values in VALUES:
        with statement_cursor() as cursor:
            cursor.execute(INSERT, list(values))
            assert cursor.rowcount == 1
    assert rows() == VALUES
    # The integers of every size were all sent as bigint: one prepared statement for them,
    # and one more for the row whose amount is NULL (a NULL has no type of its own).
    assert prepared(INSERT) == 2


def test_behind_a_transaction_pooler_nothing_is_prepared(probe):
    with override_settings(DATABASE_POOLER="transaction"):
        for values in VALUES:
            with statement_cursor() as cursor:
                cursor.execute(INSERT, list(values))
    assert rows() == VALUES
    assert prepared(INSERT) == 0


@pytest.mark.parametrize("pooler", ["", "transaction"])
def test_errors_hooks_and_the_query_log_are_djangos(probe, pooler):
    seen = []

    def hook(execute, sql, params, many, context):
        seen.append((sql, list(params)))
        return execute(sql, params, many, context)

    with override_settings(DATABASE_POOLER=pooler):
        with connection.execute_wrapper(hook), CaptureQueriesContext(connection) as log:
            with statement_cursor() as cursor:
                cursor.execute(INSERT, [1, 5, "a"])
            with pytest.raises(IntegrityError), transaction.atomic():
                with statement_cursor() as cursor:
                    cursor.execute(INSERT, [1, 6, "duplicate"])
            with statement_cursor() as cursor:  # the connection is usable after the error
                cursor.execute(INSERT, [2, 6, "b"])
    assert [params for _, params in seen] == [[1, 5, "a"], [1, 6, "duplicate"], [2, 6, "b"]]
    assert sum(INSERT.split(" (")[0] in q["sql"] for q in log.captured_queries) == 3
    assert rows() == [(1, 5, "a"), (2, 6, "b")]


@pytest.mark.parametrize("pooler", ["", "transaction"])
@pytest.mark.parametrize(
    "hostile",
    [2**63, -(2**63) - 1, "not a number"],
    ids=["past the largest bigint", "below the smallest", "text for a bigint"],
)
def test_a_value_the_column_refuses_is_djangos_error_and_the_connection_lives(
    probe, pooler, hostile
):
    with override_settings(DATABASE_POOLER=pooler):
        with pytest.raises(DatabaseError), transaction.atomic():
            with statement_cursor() as cursor:
                cursor.execute(INSERT, [1, hostile, "x"])
        with statement_cursor() as cursor:
            cursor.execute(INSERT, [2, 3, "after"])
    assert rows() == [(2, 3, "after")]
