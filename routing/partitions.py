"""The ledger's monthly partitions, and its retention (PostgreSQL).

On PostgreSQL ``routing_usageevent`` is partitioned by range of ``created_at``, one
partition per calendar month (UTC) named ``routing_usageevent_pYYYYMM``, plus a
default partition for rows of a month that has none yet. Every reader goes through
the parent table and needs nothing of this: a query bounded in time reads the months
it covers, the others read every month's indexes.

- ``partitions_ensure`` (beat, daily) creates the current month and the next
  ``AHEAD_MONTHS`` ahead of time, and a month for any row the default partition
  holds (its rows move into the new partition in the same transaction), so the
  default partition stays empty in steady state.
- ``retention_sweep`` (beat, daily) moves out of the database the months a tenant's
  plan no longer keeps (``Tier.ledger_retention_months``): each tenant's rows of
  the month are written to a gzip-compressed CSV file and catalogued as a
  ``LedgerArchive`` with their sums, then deleted; a month no tenant keeps is
  detached and dropped whole, which is what makes retention cheap at scale.

Invariants: a row leaves the database only in the transaction that records its
archive (the file is on disk, fsynced, before that commits), so a crash loses
nothing and archives nothing twice; the month being archived is locked against
writes meanwhile (``SHARE``), so what is dropped is exactly what was archived.
Statements that need a strong lock on the parent (attach, detach) wait at most
``LOCK_TIMEOUT`` and are retried on the next run rather than queue requests behind
them. Elsewhere (SQLite, the demo's database) the ledger is one plain table and
both tasks do nothing.
"""

from __future__ import annotations

import gzip
import hashlib
import logging
import os
import re
from dataclasses import dataclass, field
from datetime import UTC, date, datetime
from pathlib import Path

from django.conf import settings
from django.db import OperationalError, connection, transaction

from routing.models import LedgerArchive, UsageEvent
from tenants.models import LEDGER_MIN_RETENTION_MONTHS, Tenant, Tier

logger = logging.getLogger(__name__)

PARENT = UsageEvent._meta.db_table
DEFAULT_PARTITION = f"{PARENT}_default"
AHEAD_MONTHS = 2
LOCK_TIMEOUT = "2s"
_NAME = re.compile(rf"^{PARENT}_p(\d{{4}})(\d{{2}})$")


def month_of(moment: datetime) -> date:
    moment = moment.astimezone(UTC)
    return date(moment.year, moment.month, 1)


def add_months(month: date, months: int) -> date:
    index = month.year * 12 + month.month - 1 + months
    return date(index // 12, index % 12 + 1, 1)


def partition_name(month: date) -> str:
    return f"{PARENT}_p{month:%Y%m}"


def _bounds(month: date) -> tuple[datetime, datetime]:
    start = datetime(month.year, month.month, 1, tzinfo=UTC)
    following = add_months(month, 1)
    return start, datetime(following.year, following.month, 1, tzinfo=UTC)


def is_partitioned() -> bool:
    """Whether the ledger is the partitioned table (PostgreSQL, migrated)."""
    if connection.vendor != "postgresql":
        return False
    with connection.cursor() as cursor:
        cursor.execute("SELECT relkind FROM pg_class WHERE oid = to_regclass(%s)", [PARENT])
        row = cursor.fetchone()
    return bool(row) and row[0] == "p"


def partition_names() -> list[str]:
    """Every partition of the ledger, the default one included, by name."""
    with connection.cursor() as cursor:
        cursor.execute(
            "SELECT c.relname FROM pg_inherits i JOIN pg_class c ON c.oid = i.inhrelid "
            "WHERE i.inhparent = to_regclass(%s) ORDER BY c.relname",
            [PARENT],
        )
        return [name for (name,) in cursor.fetchall()]


def monthly_partitions() -> list[date]:
    """The months that have a partition, oldest first."""
    matches = (_NAME.match(name) for name in partition_names())
    return sorted(date(int(m[1]), int(m[2]), 1) for m in matches if m)


def _quote(name: str) -> str:
    return connection.ops.quote_name(name)


def _lock_timeout(cursor) -> None:
    cursor.execute(f"SET LOCAL lock_timeout = '{LOCK_TIMEOUT}'")


# --- creating months ahead -------------------------------------------------------------


def partition_create(month: date) -> None:
    """Create ``month``'s partition, moving into it any row the default partition has of it.

    The partition is built as a plain table and attached: ``ATTACH`` checks the default
    partition holds nothing of the month, which the move in the same transaction made
    true (a row inserted concurrently makes the attach fail, and nothing changes).
    """
    name, (start, end) = partition_name(month), _bounds(month)
    with transaction.atomic(), connection.cursor() as cursor:
        _lock_timeout(cursor)
        cursor.execute(
            f"CREATE TABLE {_quote(name)} "
            f"(LIKE {_quote(PARENT)} INCLUDING DEFAULTS INCLUDING CONSTRAINTS)"
        )
        cursor.execute(
            f"WITH moved AS (DELETE FROM {_quote(DEFAULT_PARTITION)} "  # noqa: S608 - identifiers
            "WHERE created_at >= %s AND created_at < %s RETURNING *) "
            f"INSERT INTO {_quote(name)} SELECT * FROM moved",
            [start, end],
        )
        cursor.execute(
            f"ALTER TABLE {_quote(PARENT)} ATTACH PARTITION {_quote(name)} "
            "FOR VALUES FROM (%s) TO (%s)",
            [start, end],
        )


def _default_months() -> list[date]:
    with connection.cursor() as cursor:
        cursor.execute(
            "SELECT DISTINCT date_trunc('month', created_at AT TIME ZONE 'UTC') "  # noqa: S608
            f"FROM {_quote(DEFAULT_PARTITION)}"
        )
        return [row[0].date() for row in cursor.fetchall()]


def partitions_ensure(*, now: datetime, ahead: int = AHEAD_MONTHS) -> list[str]:
    """Create the partitions that should exist by ``now``; return the names created."""
    if not is_partitioned():
        return []
    current = month_of(now)
    wanted = {add_months(current, n) for n in range(ahead + 1)} | set(_default_months())
    created = []
    for month in sorted(wanted - set(monthly_partitions())):
        try:
            partition_create(month)
        except OperationalError as exc:  # a lock not granted in time: the next run retries
            logger.warning("Could not create the ledger partition of %s: %r", month, exc)
            continue
        created.append(partition_name(month))
    return created


# --- retention -------------------------------------------------------------------------


@dataclass
class RetentionReport:
    archived: list[LedgerArchive] = field(default_factory=list)
    dropped: list[str] = field(default_factory=list)  # partitions detached and dropped
    deferred: list[str] = field(default_factory=list)  # months a lock timeout put off

    def as_dict(self) -> dict[str, object]:
        return {
            "archived_rows": sum(a.rows for a in self.archived),
            "archives": len(self.archived),
            "dropped": self.dropped,
            "deferred": self.deferred,
        }


def archive_dir() -> Path:
    return Path(settings.CASCADEFLOW_LEDGER_ARCHIVE_DIR)


def _retentions() -> dict[int, int | None]:
    """Each tenant's retention in months (its plan's, else the default plan's; None: all)."""
    default = Tier.objects.filter(is_default=True).values_list("ledger_retention_months").first()
    fallback = default[0] if default else None
    return {
        tenant_id: months if tier_id is not None else fallback
        for tenant_id, tier_id, months in Tenant.objects.values_list(
            "pk", "tier_id", "tier__ledger_retention_months"
        )
    }


def _tenants_in(cursor, partition: str) -> list[int]:
    """The distinct tenants of a partition, one index probe each (a loose index scan)."""
    table = _quote(partition)
    cursor.execute(
        f"WITH RECURSIVE t(id) AS ((SELECT tenant_id FROM {table} ORDER BY tenant_id LIMIT 1) "  # noqa: S608
        f"UNION ALL SELECT (SELECT tenant_id FROM {table} WHERE tenant_id > t.id "
        "ORDER BY tenant_id LIMIT 1) FROM t WHERE t.id IS NOT NULL) "
        "SELECT id FROM t WHERE id IS NOT NULL"
    )
    return [tenant_id for (tenant_id,) in cursor.fetchall()]


def _write_archive(cursor, partition: str, tenant_id: int, month: date) -> LedgerArchive:
    """Copy one tenant's rows of a month to a new gzip CSV file on disk; catalogue it.

    The file is complete and fsynced before the catalogue row is written; a later
    archive of the same tenant and month (rows that arrived late) gets its own file.
    """
    folder = archive_dir() / str(tenant_id)
    folder.mkdir(parents=True, exist_ok=True)
    earlier = LedgerArchive.objects.filter(tenant_id=tenant_id, month=month).count()
    suffix = f"-{earlier + 1}" if earlier else ""
    path = folder / f"{month:%Y-%m}{suffix}.csv.gz"
    partial = path.with_name(path.name + ".partial")
    table = _quote(partition)
    digest = hashlib.sha256()

    class Hashing:
        def __init__(self, raw) -> None:
            self.raw = raw

        def write(self, data: bytes) -> int:
            digest.update(data)
            return self.raw.write(data)

        def flush(self) -> None:
            self.raw.flush()

    with open(partial, "wb") as raw:
        with gzip.GzipFile(fileobj=Hashing(raw), mode="wb", mtime=0) as out:
            copy_sql = (
                f"COPY (SELECT * FROM {table} WHERE tenant_id = {int(tenant_id)} "  # noqa: S608
                "ORDER BY id) TO STDOUT WITH (FORMAT csv, HEADER)"
            )
            with cursor.cursor.copy(copy_sql) as copy:
                for chunk in copy:
                    out.write(chunk)
        raw.flush()
        os.fsync(raw.fileno())
    os.replace(partial, path)
    directory = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(directory)
    finally:
        os.close(directory)
    cursor.execute(
        f"SELECT count(*), coalesce(sum(cost_nanos), 0), coalesce(sum(byok_cost_nanos), 0) "  # noqa: S608
        f"FROM {table} WHERE tenant_id = %s",
        [tenant_id],
    )
    rows, cost, byok = cursor.fetchone()
    return LedgerArchive.objects.create(
        tenant_id=tenant_id,
        month=month,
        path=str(path),
        sha256=digest.hexdigest(),
        rows=rows,
        cost_nanos=cost,
        byok_cost_nanos=byok,
    )


def _expired(month: date, kept: int | None, current: date) -> bool:
    """Whether a plan keeping ``kept`` whole months before ``current`` (None: every month)
    no longer keeps ``month``."""
    if kept is None:
        return False
    # Counted in months, not dates: a plan may keep more months than the calendar has.
    behind = (current.year - month.year) * 12 + current.month - month.month
    return behind > max(kept, LEDGER_MIN_RETENTION_MONTHS)


def month_retire(
    month: date, retentions: dict[int, int | None], now: datetime
) -> tuple[list[LedgerArchive], bool]:
    """Archive and remove the rows of ``month`` their tenants' plans no longer keep.

    Returns the archives written and whether the partition was dropped (every tenant
    in it had expired). One transaction: the partition is locked against writes,
    each expired tenant's rows are archived, then deleted, or the partition is
    detached and dropped whole.
    """
    current = month_of(now)
    partition = partition_name(month)
    with transaction.atomic(), connection.cursor() as cursor:
        _lock_timeout(cursor)
        cursor.execute(f"LOCK TABLE {_quote(partition)} IN SHARE MODE")
        tenants = _tenants_in(cursor, partition)
        expired = [t for t in tenants if _expired(month, retentions.get(t), current)]
        archives = [_write_archive(cursor, partition, t, month) for t in expired]
        if len(expired) == len(tenants):
            cursor.execute(f"ALTER TABLE {_quote(PARENT)} DETACH PARTITION {_quote(partition)}")
            cursor.execute(f"DROP TABLE {_quote(partition)}")
            return archives, True
        if expired:
            cursor.execute(
                f"DELETE FROM {_quote(partition)} WHERE tenant_id = ANY(%s)",  # noqa: S608
                [expired],
            )
        return archives, False


def retention_sweep(*, now: datetime) -> RetentionReport:
    """Archive every month its tenants' plans no longer keep (see ``month_retire``)."""
    report = RetentionReport()
    if not is_partitioned():
        return report
    retentions = _retentions()
    oldest_kept = add_months(month_of(now), -LEDGER_MIN_RETENTION_MONTHS)
    for month in monthly_partitions():
        if month >= oldest_kept:
            break
        try:
            archives, dropped = month_retire(month, retentions, now)
        except OperationalError as exc:  # a lock not granted in time: the next run retries
            logger.warning("Ledger retention put off %s: %r", month, exc)
            report.deferred.append(partition_name(month))
            continue
        report.archived.extend(archives)
        if dropped:
            report.dropped.append(partition_name(month))
    return report
