"""Database helpers for the request hot path.

Compiling an ORM query costs about 0.4 ms of CPU, several times what the
round trip to PostgreSQL costs; the gateway makes two queries per request.
These helpers keep the ORM's own column names and per-backend value
adaptation (``Field.get_db_prep_save``) but build each statement once.
"""

from __future__ import annotations

import json
import random
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from datetime import UTC, datetime
from functools import lru_cache, partial
from typing import Any, ParamSpec, TypeVar

from asgiref.sync import sync_to_async
from django.conf import settings
from django.db import OperationalError, close_old_connections, connections, models
from django.db.backends.postgresql.base import ServerBindingCursor
from django.db.backends.utils import CursorDebugWrapper, CursorWrapper
from django.utils.dateparse import parse_datetime
from psycopg.types.numeric import Int8

P = ParamSpec("P")
R = TypeVar("R")


# A connection that answered a query this recently is not pinged again (CONN_HEALTH_CHECKS).
HEALTHY_FOR_S = 1.0


def db(fn: Callable[P, R]) -> Callable[P, Any]:
    """Run ORM work off the event loop on a pooled thread.

    The connection lifecycle is the one Django gives a request: connections
    that are broken or past CONN_MAX_AGE are dropped before and after the work.
    One difference: with CONN_HEALTH_CHECKS, Django pings a persistent connection
    (``SELECT 1``) before its first query in every unit of work, which on the
    gateway is twice a request; here a connection that completed work without a
    database error less than ``HEALTHY_FOR_S`` ago is trusted without the ping.
    A connection that died in that second fails its next query with the
    ``OperationalError`` the gateway already answers (503, ledger row spooled), and
    Django then drops it.
    """

    def run(*args: P.args, **kwargs: P.kwargs) -> R:
        close_old_connections()
        connection = connections["default"]
        answered_at = getattr(connection, "cf_answered_at", None)
        if (
            connection.connection is not None
            and answered_at is not None
            and time.monotonic() - answered_at < HEALTHY_FOR_S
        ):
            connection.health_check_done = True
        try:
            result = fn(*args, **kwargs)
        except BaseException:
            connection.cf_answered_at = None
            raise
        finally:
            close_old_connections()
        ok = connection.connection is not None and not connection.errors_occurred
        connection.cf_answered_at = time.monotonic() if ok else None
        return result

    return sync_to_async(run, thread_sensitive=False)


@lru_cache(maxsize=64)
def _insert_sql(
    model: type[models.Model], names: tuple[str, ...], vendor: str, ignore_conflicts: bool
) -> str:
    connection = connections["default"]
    quote = connection.ops.quote_name
    columns = ", ".join(quote(model._meta.get_field(n).column) for n in names)
    placeholders = ", ".join(["%s"] * len(names))
    tail = " ON CONFLICT DO NOTHING" if ignore_conflicts else ""
    return f"INSERT INTO {quote(model._meta.db_table)} ({columns}) VALUES ({placeholders}){tail}"  # noqa: S608 - identifiers from model metadata


def insert_statement(
    model: type[models.Model],
    values: dict[str, Any],
    using: str = "default",
    *,
    ignore_conflicts: bool = False,
) -> tuple[str, list[Any]]:
    """The INSERT of one row and its parameters, each adapted by its field."""
    connection = connections[using]
    names = tuple(values)
    sql = _insert_sql(model, names, connection.vendor, ignore_conflicts)
    params = [
        model._meta.get_field(name).get_db_prep_save(value, connection)
        for name, value in values.items()
    ]
    return sql, params


def insert_row(
    model: type[models.Model],
    values: dict[str, Any],
    using: str = "default",
    *,
    ignore_conflicts: bool = False,
) -> bool:
    """INSERT one row (no RETURNING, no model instance); False if a unique key already had it."""
    sql, params = insert_statement(model, values, using, ignore_conflicts=ignore_conflicts)
    with statement_cursor(using) as cursor:
        cursor.execute(sql, params)
        return cursor.rowcount != 0


@contextmanager
def statement_cursor(using: str = "default") -> Iterator[CursorWrapper]:
    """A cursor for the hot path's few fixed statements: prepared once per connection.

    Django's PostgreSQL cursors bind parameters on the client: psycopg quotes every
    parameter into the statement's text, and PostgreSQL parses and plans the whole text
    on every run (the ledger row with its settlement: ~3.4 kB and 37 parameters, about
    0.3 ms to plan). On PostgreSQL reached directly, this cursor binds on the server and
    prepares each statement on its first run on a connection (psycopg keeps the last
    100 per connection); later runs send only the parameters. Python integers are sent
    as ``bigint``, whatever their value, so that one statement stays one prepared
    statement (psycopg otherwise types each by its size).

    Behind a transaction pooler (``DATABASE_POOLER``) nothing is prepared: a prepared
    statement lives on one server connection, and the next transaction may run on
    another. Elsewhere (SQLite) this is Django's cursor. Either way errors are Django's
    (``IntegrityError``…), ``connection.execute_wrapper`` sees every statement, and
    with ``DEBUG`` they are logged as any other query.
    """
    connection = connections[using]
    if connection.vendor != "postgresql" or settings.DATABASE_POOLER:
        with connection.cursor() as cursor:
            yield cursor
        return
    # As ``connection.cursor()`` does, with a server-binding cursor.
    connection.close_if_health_check_failed()
    connection.ensure_connection()
    raw = connection.connection
    if raw.prepare_threshold is None:  # Django's default: psycopg then prepares nothing
        raw.prepare_threshold = PREPARE_THRESHOLD
    with connection.wrap_database_errors:
        cursor = connection._prepare_cursor(ServerBindingCursor(raw))
    wrapped = _Prepared(cursor)
    try:
        yield wrapped
    finally:
        cursor.close()


# Only ``statement_cursor`` makes server-binding cursors, and it asks for preparation
# explicitly: the threshold (psycopg prepares a query run this often) is not reached by
# anything else.
PREPARE_THRESHOLD = 5
_BIGINT_MIN, _BIGINT_MAX = -(2**63), 2**63 - 1


class _Prepared:
    """A Django cursor whose ``execute`` prepares its statement (the rest is the cursor's)."""

    def __init__(self, cursor: CursorWrapper) -> None:
        self._cursor = cursor

    def __getattr__(self, name: str) -> Any:
        return getattr(self._cursor, name)

    def execute(self, sql: str, params: Sequence[Any] | None = None) -> Any:
        cursor = self._cursor
        # Out of bigint's range an integer stays as it is (psycopg sends it as numeric and
        # PostgreSQL refuses it with Django's DataError, as through Django's cursor);
        # ``Int8`` would raise OverflowError in the client instead.
        typed = [
            Int8(p) if type(p) is int and _BIGINT_MIN <= p <= _BIGINT_MAX else p
            for p in params or ()
        ]
        run = partial(_execute_prepared, cursor)
        if isinstance(cursor, CursorDebugWrapper):  # DEBUG, or a test capturing queries
            # Logged as written, its parameters beside it (Django's own log composes them
            # into the text; that costs a client-side quoting of every parameter).
            with cursor.debug_sql(sql, typed):
                return cursor._execute_with_wrappers(sql, typed, False, run)
        return cursor._execute_with_wrappers(sql, typed, False, run)


def _execute_prepared(
    cursor: CursorWrapper, sql: str, params: list[Any], many: bool, context: dict
) -> Any:
    cursor.db.validate_no_broken_transaction()
    with cursor.db.wrap_database_errors:
        return cursor.cursor.execute(sql, params, prepare=True)


def select_sql(queryset: models.QuerySet, placeholder: Any) -> tuple[str, int]:
    """The SQL of a ``values_list`` queryset and the index of ``placeholder`` in its params."""
    sql, params = queryset.query.sql_with_params()
    return sql, list(params).index(placeholder)


def fetch_one(sql: str, params: Sequence[Any], using: str = "default") -> tuple | None:
    with connections[using].cursor() as cursor:
        cursor.execute(sql, list(params))
        return cursor.fetchone()


def as_json(value: Any) -> Any:
    """A JSON column as read by a raw cursor: text on SQLite and PostgreSQL (Django's loader)."""
    return json.loads(value) if isinstance(value, str | bytes) else value


def as_datetime(value: Any) -> datetime | None:
    """A timestamp as read by a raw cursor: aware on PostgreSQL, naive UTC text on SQLite."""
    if value is None or (isinstance(value, datetime) and value.tzinfo is not None):
        return value
    parsed = parse_datetime(value) if isinstance(value, str) else value
    return parsed.replace(tzinfo=UTC) if parsed.tzinfo is None else parsed


# SQLSTATEs of a transaction that lost a race and may simply run again.
_TRANSIENT_SQLSTATES = frozenset({"40P01", "40001"})  # deadlock_detected, serialization_failure


def is_transient(exc: BaseException) -> bool:
    """A deadlock, a serialization failure or SQLite's busy lock: safe to retry whole."""
    if not isinstance(exc, OperationalError):
        return False
    cause = exc.__cause__
    return getattr(cause, "sqlstate", None) in _TRANSIENT_SQLSTATES or "database is locked" in str(
        exc
    )


def retry_transient(fn: Callable[[], R], *, attempts: int = 4, using: str = "default") -> R:
    """Run ``fn`` (one whole transaction) again, a bounded number of times, if it fails transiently.

    Only a transaction that starts and ends inside ``fn`` can be retried: inside
    an outer ``atomic`` the failed statement has already doomed the caller's
    transaction, so the error is raised as it is.
    """
    for attempt in range(1, attempts + 1):
        try:
            return fn()
        except OperationalError as exc:
            if attempt == attempts or not is_transient(exc) or connections[using].in_atomic_block:
                raise
            time.sleep(random.uniform(0, 0.01 * 2**attempt))  # noqa: S311 - jitter, not secrets
    raise AssertionError("unreachable")
