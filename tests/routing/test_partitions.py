"""The ledger's monthly partitions and its retention (PostgreSQL).

Months are created ahead and out of the default partition; a month its tenants' plans
no longer keep is archived to gzip CSV, then deleted or dropped whole; nothing is
removed that the archive does not hold, and the metered total stays what it was.
"""

import csv
import gzip
import hashlib
import io
import threading
from datetime import UTC, date, datetime, timedelta

import pytest
from django.db import IntegrityError, connection, connections, transaction
from rest_framework.test import APIClient

from billing.metering import reconcile
from routing import partitions
from routing.models import LedgerArchive, UsageEvent
from routing.partitions import add_months, month_of, partition_name
from routing.services import ledger_write
from tenants.models import Tier
from tests.factories import ApiTokenFactory, TenantFactory, TierFactory, UsageEventFactory
from tests.support.services import skip_or_fail

pytestmark = pytest.mark.services

NOW = datetime(2026, 11, 30, 12, tzinfo=UTC)
CURRENT = month_of(NOW)


@pytest.fixture(autouse=True)
def postgres(db, settings, tmp_path):
    if connection.vendor != "postgresql":
        skip_or_fail("The ledger is partitioned on PostgreSQL only (DATABASE_URL)")
    settings.CASCADEFLOW_LEDGER_ARCHIVE_DIR = str(tmp_path / "archive")


def where(row_id: int) -> str:
    with connection.cursor() as cursor:
        cursor.execute(
            "SELECT tableoid::regclass::text FROM routing_usageevent WHERE id = %s", [row_id]
        )
        return cursor.fetchone()[0]


def rows_in(
    month: date, tenant, count: int, cost: int = 1_000, byok: int = 0, *, ensure: bool = True
) -> list[int]:
    """``count`` rows of ``tenant`` in ``month``, moved into the month's partition unless
    ``ensure`` is false (the test database has months from its creation on only)."""
    start = datetime(month.year, month.month, 2, tzinfo=UTC)
    rows = [
        UsageEventFactory(
            tenant=tenant,
            created_at=start.replace(hour=i % 24),
            cost_nanos=cost + i,
            byok_cost_nanos=byok,
        )
        for i in range(count)
    ]
    # Rows committed long ago in real life: no deferred check left to hold ALTER TABLE up.
    with connection.cursor() as cursor:
        cursor.execute("SET CONSTRAINTS ALL IMMEDIATE")
    if ensure:
        partitions.partitions_ensure(now=datetime.now(UTC))
    return [r.pk for r in rows]


def archived_rows(archive: LedgerArchive) -> list[dict[str, str]]:
    with open(archive.path, "rb") as raw:
        data = raw.read()
    assert hashlib.sha256(data).hexdigest() == archive.sha256
    return list(csv.DictReader(io.StringIO(gzip.decompress(data).decode())))


# --- the table and its months ----------------------------------------------------------


def test_the_ledger_is_partitioned_by_month_with_months_ahead():
    assert partitions.is_partitioned()
    made_at = month_of(datetime.now(UTC))
    partitions.partitions_ensure(now=datetime.now(UTC))  # a suite run across a month's end
    months = partitions.monthly_partitions()
    assert made_at in months
    today = month_of(datetime.now(UTC))
    for ahead in range(partitions.AHEAD_MONTHS + 1):
        assert add_months(today, ahead) in months


def test_a_row_goes_to_its_months_partition_and_one_without_a_month_to_the_default():
    tenant = TenantFactory()
    partitions.partitions_ensure(now=datetime.now(UTC))  # a suite run across a month's end
    [recent] = rows_in(month_of(datetime.now(UTC)), tenant, 1, ensure=False)
    [ancient] = rows_in(date(2019, 3, 1), tenant, 1, ensure=False)
    assert where(recent) == partition_name(month_of(datetime.now(UTC)))
    assert where(ancient) == partitions.DEFAULT_PARTITION


def test_ensure_creates_months_ahead_and_moves_the_default_partitions_rows_into_theirs():
    tenant = TenantFactory()
    ancient = rows_in(date(2019, 3, 1), tenant, 3, ensure=False)
    before = list(UsageEvent.objects.filter(pk__in=ancient).order_by("pk").values())
    far = datetime(2031, 5, 17, tzinfo=UTC)

    created = partitions.partitions_ensure(now=far, ahead=1)

    assert created == [
        partition_name(date(2019, 3, 1)),
        "routing_usageevent_p203105",
        "routing_usageevent_p203106",
    ]
    assert {where(pk) for pk in ancient} == {partition_name(date(2019, 3, 1))}
    assert list(UsageEvent.objects.filter(pk__in=ancient).order_by("pk").values()) == before
    # Every index of the parent exists on the new partition (pagination, time ranges).
    with connection.cursor() as cursor:
        cursor.execute(
            "SELECT indexdef FROM pg_indexes WHERE tablename = %s", ["routing_usageevent_p203105"]
        )
        definitions = " ".join(d for (d,) in cursor.fetchall())
    assert "(tenant_id, id)" in definitions and "(tenant_id, created_at)" in definitions
    assert (
        "UNIQUE INDEX" in definitions
        and "(((md5((request_id)::text))::uuid), created_at)" in definitions
    )
    assert partitions.partitions_ensure(now=far, ahead=1) == []  # idempotent


def test_a_replayed_ledger_row_is_written_once_across_partitions():
    from routing.enforcement import Settlement
    from routing.services import LedgerEntry, usage_event_values

    tenant = TenantFactory()
    entry = LedgerEntry(
        tenant_id=tenant.pk,
        token_id=None,
        end_user_id=None,
        request_id="req_replayed",
        created_at=NOW,
        requested_model="demo/small",
    )
    settlement = Settlement(tenant.pk, reservation_key="req_replayed")
    for _ in range(3):
        ledger_write(values=usage_event_values(entry), settlement=settlement)
    assert UsageEvent.objects.filter(request_id="req_replayed").count() == 1
    # The key is the id's hash: another id at the same instant is another row.
    entry.request_id = "req_replayee"
    ledger_write(values=usage_event_values(entry), settlement=Settlement(tenant.pk, None))
    assert UsageEvent.objects.filter(created_at=NOW).count() == 2


def test_usage_pages_walk_every_month_newest_first_without_repeats():
    tenant = TenantFactory()
    ids = []
    for back in (0, 1, 3, 14):
        ids += rows_in(add_months(month_of(datetime.now(UTC)), -back), tenant, 7)
    rows_in(month_of(datetime.now(UTC)), TenantFactory(), 5)  # another tenant's
    client = APIClient()
    client.credentials(HTTP_AUTHORIZATION=f"Bearer {ApiTokenFactory(tenant=tenant).raw}")
    seen, url = [], "/api/v1/usage/?limit=4"
    while url:
        response = client.get(url)
        assert response.status_code == 200, response.content
        page = response.json()
        seen += [row["id"] for row in page["results"]]
        url = page["next"]
    assert seen == sorted(ids, reverse=True)


# --- retention -------------------------------------------------------------------------


def plans():
    """Three plans: two months kept, three kept, everything kept."""
    return (
        TierFactory(ledger_retention_months=2),
        TierFactory(ledger_retention_months=3),
        TierFactory(ledger_retention_months=None),
    )


def months_back(n: int) -> date:
    return add_months(CURRENT, -n)


def test_a_plan_keeps_at_least_the_month_being_invoiced():
    with pytest.raises(IntegrityError), transaction.atomic():
        TierFactory(ledger_retention_months=1)


def test_retention_archives_deletes_and_drops_by_each_tenants_plan():
    two, three, forever = plans()
    short, medium, keeper = (TenantFactory(tier=t) for t in (two, three, forever))
    # Month -5: short and keeper; -4: short only; -3: short and medium; -2: short.
    mixed = rows_in(months_back(5), short, 4, byok=10) + rows_in(months_back(5), keeper, 2)
    rows_in(months_back(4), short, 3)
    edge = rows_in(months_back(3), short, 2) + rows_in(months_back(3), medium, 2)
    kept = rows_in(months_back(2), short, 2)
    metered = {t.pk: reconcile(tenant_id=t.pk, now=NOW) for t in (short, medium, keeper)}

    report = partitions.retention_sweep(now=NOW)

    # -4 held only expired rows: dropped whole. -5 and -3 keep others' rows.
    assert partition_name(months_back(4)) in report.dropped
    assert {partition_name(months_back(m)) for m in (5, 3)}.isdisjoint(report.dropped)
    assert partition_name(months_back(4)) not in {
        partition_name(m) for m in partitions.monthly_partitions()
    }
    remaining = set(UsageEvent.objects.values_list("pk", flat=True))
    assert remaining == set(mixed[4:]) | set(edge[2:]) | set(kept)
    archives = {(a.tenant_id, a.month): a for a in report.archived}
    assert set(archives) == {(short.pk, months_back(m)) for m in (5, 4, 3)}
    # Each archive holds exactly the rows removed, with their sums.
    for (tenant_id, month), archive in archives.items():
        rows = archived_rows(archive)
        assert archive.rows == len(rows) > 0
        assert {r["tenant_id"] for r in rows} == {str(tenant_id)}
        assert all(month_of(datetime.fromisoformat(r["created_at"])) == month for r in rows)
        assert archive.cost_nanos == sum(int(r["cost_nanos"]) for r in rows)
        assert archive.byok_cost_nanos == sum(int(r["byok_cost_nanos"]) for r in rows)
    assert {int(r["id"]) for r in archived_rows(archives[(short.pk, months_back(5))])} == set(
        mixed[:4]
    )
    # What was metered is what it was: the archives' sums stand in for the rows.
    for tenant in (short, medium, keeper):
        assert reconcile(tenant_id=tenant.pk, now=NOW) == metered[tenant.pk]
    # A second run finds nothing more to do.
    again = partitions.retention_sweep(now=NOW)
    assert again.archived == [] and again.dropped == []


def test_an_archive_loads_back_with_copy():
    two, _, _ = plans()
    tenant = TenantFactory(tier=two)
    ids = rows_in(months_back(6), tenant, 5)
    before = list(UsageEvent.objects.filter(pk__in=ids).order_by("pk").values())
    [archive] = partitions.retention_sweep(now=NOW).archived
    assert not UsageEvent.objects.filter(pk__in=ids).exists()

    with connection.cursor() as cursor:
        with open(archive.path, "rb") as raw, gzip.open(raw) as data:
            with cursor.cursor.copy(
                "COPY routing_usageevent FROM STDIN WITH (FORMAT csv, HEADER)"
            ) as copy:
                copy.write(data.read())
    assert list(UsageEvent.objects.filter(pk__in=ids).order_by("pk").values()) == before


def test_a_plan_keeping_more_months_than_the_calendar_has_keeps_them():
    tenant = TenantFactory(tier=TierFactory(ledger_retention_months=32767))
    ids = rows_in(months_back(9), tenant, 2)
    report = partitions.retention_sweep(now=NOW)
    assert report.archived == [] and report.deferred == []
    assert UsageEvent.objects.filter(pk__in=ids).count() == 2


def test_tenants_without_a_plan_follow_the_default_plan_and_none_keeps_everything():
    tenant = TenantFactory(tier=None)
    ids = rows_in(months_back(8), tenant, 2)
    assert partitions.retention_sweep(now=NOW).archived == []  # no default plan: kept
    TierFactory(ledger_retention_months=3, is_default=True)
    [archive] = partitions.retention_sweep(now=NOW).archived
    assert archive.tenant_id == tenant.pk and archive.rows == 2
    assert not UsageEvent.objects.filter(pk__in=ids).exists()


def test_a_failure_half_way_removes_nothing_and_the_next_run_archives_once(monkeypatch):
    two, _, forever = plans()
    first, second = TenantFactory(tier=two), TenantFactory(tier=two)
    ids = rows_in(months_back(5), first, 3) + rows_in(months_back(5), second, 3)
    rows_in(months_back(5), TenantFactory(tier=forever), 1)
    real = partitions._write_archive
    calls = []

    def failing(cursor, partition, tenant_id, month):
        calls.append(tenant_id)
        if len(calls) == 2:
            raise OSError("disk full")
        return real(cursor, partition, tenant_id, month)

    monkeypatch.setattr(partitions, "_write_archive", failing)
    with pytest.raises(OSError):
        partitions.retention_sweep(now=NOW)
    assert UsageEvent.objects.filter(pk__in=ids).count() == 6
    assert not LedgerArchive.objects.exists()

    monkeypatch.setattr(partitions, "_write_archive", real)
    report = partitions.retention_sweep(now=NOW)
    assert sorted(a.rows for a in report.archived) == [3, 3]
    assert LedgerArchive.objects.count() == 2
    assert not UsageEvent.objects.filter(pk__in=ids).exists()


def test_rows_arriving_late_in_an_archived_month_get_an_archive_of_their_own():
    two, _, forever = plans()
    tenant = TenantFactory(tier=two)
    rows_in(months_back(5), tenant, 2)
    rows_in(months_back(5), TenantFactory(tier=forever), 1)  # keeps the partition
    [first] = partitions.retention_sweep(now=NOW).archived
    rows_in(months_back(5), tenant, 1, cost=7_000)  # a spooled row replayed late
    [late] = partitions.retention_sweep(now=NOW).archived
    assert late.path != first.path and late.rows == 1 and late.cost_nanos == 7_000
    assert len(archived_rows(first)) == 2


@pytest.mark.django_db(transaction=True)
def test_a_month_being_written_is_put_off_not_blocked_on():
    """A transaction still writing into an old month holds it: the sweep waits at most
    the lock timeout, removes nothing, and the next run archives that row too."""
    two, _, _ = plans()
    tenant = TenantFactory(tier=two)
    rows_in(months_back(5), tenant, 2)
    holding, release = threading.Event(), threading.Event()

    def late_writer():
        try:
            with transaction.atomic():
                UsageEventFactory(
                    tenant=tenant, created_at=datetime(2026, 6, 3, tzinfo=UTC), request_id="late"
                )
                holding.set()
                release.wait(10)
        finally:
            connections.close_all()

    thread = threading.Thread(target=late_writer)
    thread.start()
    assert holding.wait(10)
    try:
        report = partitions.retention_sweep(now=NOW)
    finally:
        release.set()
        thread.join()
    assert report.deferred == [partition_name(months_back(5))]
    assert report.archived == [] and UsageEvent.objects.filter(tenant=tenant).count() == 3
    [archive] = partitions.retention_sweep(now=NOW).archived
    assert archive.rows == 3
    assert UsageEvent.objects.filter(tenant=tenant).count() == 0


@pytest.mark.parametrize(
    ("metadata", "months"),
    [
        ("13", 13),
        ("2", 2),
        ("1", 2),  # never less than the month being invoiced
        ("-4", 2),
        ("", None),
        ("forever", None),  # unreadable: nothing is removed
        (None, None),
        ("32767", 32767),
        ("99999999999", None),  # past what the column holds: kept for good, not a 500
    ],
)
def test_a_stripe_products_metadata_sets_the_plans_retention(metadata, months):
    from billing.services import plan_from_product

    product = {"id": "prod_1", "name": "Pro", "metadata": {"cascadeflow_tier": "pro"}}
    if metadata is not None:
        product["metadata"]["ledger_retention_months"] = metadata
    plan_from_product(product=product)
    assert Tier.objects.get(slug="pro").ledger_retention_months == months


def test_exports_and_rollups_read_across_months(monkeypatch):
    """A range over a month boundary reads both months: the CSV export in pages (one
    page boundary falls inside a month, one on the boundary), and the hourly rollup."""
    from billing import exports
    from dashboard.rollups import hourly_rows

    tenant = TenantFactory()
    boundary = datetime(2026, 10, 1, tzinfo=UTC)
    ids = []
    for offset in (-3, -2, -1, 0, 1, 2, 3):  # hours around the boundary, two rows each
        at = boundary + timedelta(hours=offset)
        for n in range(2):
            ids.append(UsageEventFactory(tenant=tenant, created_at=at, cost_nanos=1_000 + n).pk)
    with connection.cursor() as cursor:
        cursor.execute("SET CONSTRAINTS ALL IMMEDIATE")
    partitions.partitions_ensure(now=datetime.now(UTC))
    assert {where(pk) for pk in ids} == {"routing_usageevent_p202609", "routing_usageevent_p202610"}
    monkeypatch.setattr(exports, "EXPORT_PAGE_ROWS", 3)
    start, end = boundary.replace(day=1, month=9), boundary.replace(month=11)
    exported = [row[1] for row in exports._ledger_pages(tenant_id=tenant.pk, start=start, end=end)]
    assert exported == ids
    hours = hourly_rows(tenant.pk, start, end)
    assert sum(h.requests for h in hours) == len(ids)
    assert sum(h.cost_nanos for h in hours) == sum(1_000 + n for _ in range(7) for n in range(2))


@pytest.mark.parametrize(
    ("end_user", "expected"),
    [("quiet", 2), ("busy", 5), ("nobody", 0), ("", 9)],
)
def test_usage_filtered_on_an_end_user_lists_that_end_users_rows(end_user, expected):
    """The end user is looked up first, then its rows by id (no join for the planner to
    turn into a walk of the whole ledger); an unknown one lists nothing."""
    from tests.factories import EndUserFactory

    tenant = TenantFactory()
    quiet = EndUserFactory(tenant=tenant, external_id="quiet")
    busy = EndUserFactory(tenant=tenant, external_id="busy")
    EndUserFactory(tenant=TenantFactory(), external_id="nobody")  # another tenant's
    for user, count in ((quiet, 2), (busy, 5), (None, 2)):
        for _ in range(count):
            UsageEventFactory(tenant=tenant, end_user=user)
    client = APIClient()
    client.credentials(HTTP_AUTHORIZATION=f"Bearer {ApiTokenFactory(tenant=tenant).raw}")
    response = client.get(f"/api/v1/usage/?end_user={end_user}")
    assert response.status_code == 200
    assert len(response.json()["results"]) == expected
