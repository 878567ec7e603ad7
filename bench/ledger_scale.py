"""The ledger at 10 M and 100 M rows: pages, pagination, exports, rollups and bytes per row.

    .venv/bin/python bench/ledger_scale.py [--rows 1000000[,10000000,...]] [--months 4]
                                           [--repeats 20] [--page-repeats 100] [--keep]
                                           [--reuse] [--json OUT] [--db-prefix cf_ledgerbench_]

Measures whatever ``manage.py migrate`` makes of ``routing_usageevent`` (a plain
table, or a partitioned one: the output says which, and how many partitions).

Once per run, a template database is migrated and given the demo tenant's history
(``manage.py seed_demo``: real cascades through the offline demo models, written by
the gateway's own ledger code, audits included). Its ledger rows are the row
templates: every generated row is a copy of one of them (attempts with their quality
checks, models called, tokens, costs, latency, profile, domain...) with its tenant,
token, end user, request id (``req_`` + 32 hex digits, as the gateway makes them)
and time replaced; 3 % of the rows are audit rows, the production floor.

For each size N, in a database ``<prefix><N>`` copied from the template (``--db-prefix``,
``cf_ledgerbench_`` by default; the template is ``<prefix>tpl_<random>``):

- tenants: one big tenant holding 80 % of the rows (2 000 end users, 3 tokens, a
  viewer member, a monthly budget) and five others sharing the rest (100 end
  users each, other time zones);
- N ledger rows streamed with ``COPY ... FROM STDIN`` (psycopg), in time order
  (ids grow with time, as the gateway writes them) over ``--months`` months up to
  one hour ago, the volume doubling every month, busier in the day and on
  weekdays; then ``VACUUM ANALYZE`` and the rollups brought up to date;
- (a) dashboard overview of the big tenant (``/dashboard/t/<slug>/``, the whole
  Django stack in process, ``django.test.Client`` logged in as the viewer);
- (b) the usage API (``/api/v1/usage/``, cursor pagination on ``-id``, 100 rows a
  page): first, middle and last page of the big tenant, first and last page of a
  small tenant, and the first page filtered on one of the big tenant's quietest
  end users. Middle and last pages are reached with the cursor a client walking
  there would hold (DRF's own encoding of the position). ``--page-repeats`` rounds
  of one GET per page, the pages in a shuffled order each round;
- (c) CSV export (``/api/v1/usage/export.csv``, a fresh uvicorn process, as
  ``bench/export.py`` measures it) of the big tenant's newest whole days holding
  about 1 M rows (the synchronous limit is 2 M): rows per second, compared with
  the first size of the run (run with 1 000 000 first to compare against 1 M);
- (d) one new hour at 10 M events a day (416 667 rows for the big tenant) copied
  in, then ``dashboard.rollups.rollup_tenant`` for that hour: the first run, then
  the same hour rolled again ``--rollup-repeats`` times (watermark reset). The hour
  before it gets as many rows first, and is rolled: at that rate it is as busy, and
  what an advance reads again of it is part of the cost;
- (e) bytes on disk per row: ``pg_total_relation_size`` (heap + TOAST + indexes,
  summed over partitions) / rows, per index, and each column's average width
  (``pg_stats.avg_width``), against the 6.3 KB a row LiteLLM's users measured
  for its spend log (target: 5x smaller, <= 1 260 bytes).

Targets (issue 16, part 4): overview p95 <= 300 ms, any usage page p95 <= 50 ms,
export rows/s no worse than at 1 M (within 20 %: the machine is shared), new-hour
rollup <= 1 s, bytes per row <= 6.3 KB / 5.

Sizes whose estimated footprint (template row size x 1.5 for indexes, WAL and
the new hour) does not fit the free disk minus a 10 GB margin are refused, with
the estimate. Databases are dropped at the end unless ``--keep``; ``--reuse``
measures a kept ``<prefix><N>`` again without generating it.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import random
import secrets
import shutil
import subprocess
import sys
import tempfile
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

import psycopg
from benchenv import FREE_TIER_UNLIMITED, PG_ADMIN, stats_ms
from export import served, server_env, stream_export

ROOT = Path(__file__).resolve().parent.parent
TABLE = "routing_usageevent"
DB_PREFIX = "cf_ledgerbench_"
PG_URL = "postgres://postgres@127.0.0.1:5432/{}"

LITELLM_BYTES_PER_ROW = 6300
TARGETS = {
    "overview_ms": 300.0,
    "usage_page_ms": 50.0,
    "rollup_hour_s": 1.0,
    "bytes_per_row": LITELLM_BYTES_PER_ROW / 5,
    "export_ratio": 0.8,
}
EVENTS_PER_DAY = 10_000_000
BIG_SHARE = 0.8
AUDIT_SHARE = 0.03
ANONYMOUS_SHARE = 0.05
DISK_MARGIN = 10 * 2**30
EXPORT_ROWS = 1_000_000
COPY_CHUNK = 50_000
# The columns a generated row sets itself; every other column is the template's.
OWN_COLUMNS = ("tenant_id", "token_id", "end_user_id", "request_id", "created_at")

# (slug, share of the small tenants' rows, time zone, end users)
SMALL_TENANTS = (
    ("bench-beta", 0.35, "Europe/Berlin", 100),
    ("bench-gamma", 0.25, "America/New_York", 100),
    ("bench-delta", 0.2, "Asia/Tokyo", 100),
    ("bench-epsilon", 0.15, "UTC", 100),
    ("bench-zeta", 0.05, "Australia/Sydney", 100),
)
BIG_TENANT = ("bench-acme", "UTC", 2000)


# --- the parent: template, sizes, report ---------------------------------------------------


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--rows", default="1000000", help="comma-separated ledger sizes")
    parser.add_argument("--months", type=int, default=4, help="months of history")
    parser.add_argument("--repeats", type=int, default=20, help="timed overview requests")
    parser.add_argument(
        "--page-repeats", type=int, default=100, help="timed requests per usage page"
    )
    parser.add_argument("--rollup-repeats", type=int, default=5)
    parser.add_argument("--keep", action="store_true", help="keep the databases")
    parser.add_argument("--reuse", action="store_true", help="measure kept databases again")
    parser.add_argument("--seed", type=int, default=16)
    parser.add_argument("--json", dest="json_out")
    parser.add_argument(
        "--db-prefix", default=DB_PREFIX, help="the start of every database the bench makes"
    )
    parser.add_argument("--worker", help=argparse.SUPPRESS)  # one size, in a child process
    args = parser.parse_args()
    if args.worker:
        worker(args)
        return
    sizes = [int(s.replace("_", "")) for s in args.rows.split(",")]
    started = time.perf_counter()
    template = f"{args.db_prefix}tpl_{secrets.token_hex(3)}"
    results = []
    try:
        if not (args.reuse and all(database_exists(f"{args.db_prefix}{n}") for n in sizes)):
            template_create(template)
        for rows in sizes:
            results.append(run_size(rows, template, args))
    finally:
        admin(f'DROP DATABASE IF EXISTS "{template}" WITH (FORCE)')
    report(results, time.perf_counter() - started)
    if args.json_out:
        Path(args.json_out).write_text(json.dumps(results, indent=2, default=str) + "\n")


def admin(sql: str) -> None:
    with psycopg.connect(PG_ADMIN, autocommit=True) as conn:
        conn.execute(sql)


def database_exists(name: str) -> bool:
    with psycopg.connect(PG_ADMIN, autocommit=True) as conn:
        return conn.execute("SELECT 1 FROM pg_database WHERE datname = %s", [name]).fetchone()


def template_create(name: str) -> None:
    """Migrated, with the demo tenant's history: the row templates."""
    print(f"template database {name}: migrate, seed_demo", flush=True)
    admin(f'CREATE DATABASE "{name}"')
    env = {**server_env(PG_URL.format(name)), "CELERY_BROKER_URL": "memory://"}
    for command in (["migrate", "-v0"], ["seed_demo", "--history-requests", "1500"]):
        subprocess.run(
            [sys.executable, "manage.py", *command],
            cwd=ROOT,
            env=env,
            check=True,
            stdout=subprocess.DEVNULL,
        )


def template_row_bytes(database: str) -> float:
    with psycopg.connect(PG_URL.format(database)) as conn:
        return float(conn.execute(f"SELECT avg(pg_column_size(t.*)) FROM {TABLE} t").fetchone()[0])


def run_size(rows: int, template: str, args) -> dict:
    name = f"{args.db_prefix}{rows}"
    reuse = args.reuse and database_exists(name)
    if not reuse:
        estimate = rows * template_row_bytes(template) * 1.5 + 2 * 416_667 * 2000
        free = shutil.disk_usage(
            "/var/lib/postgresql" if Path("/var/lib/postgresql").exists() else "/"
        ).free
        if estimate > free - DISK_MARGIN:
            print(
                f"\n{rows:,} rows: refused, about {estimate / 2**30:.0f} GiB needed and "
                f"{free / 2**30:.0f} GiB free (minus a {DISK_MARGIN / 2**30:.0f} GiB margin)",
                flush=True,
            )
            return {"rows": rows, "refused": True, "estimate_bytes": estimate, "free_bytes": free}
        admin(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        admin(f'CREATE DATABASE "{name}" TEMPLATE "{template}"')
    print(f"\n{rows:,} rows in {name}{' (reused)' if reuse else ''}", flush=True)
    out = Path(tempfile.mkstemp(prefix="cf_ledgerbench_", suffix=".json")[1])
    try:
        command = [
            sys.executable,
            __file__,
            "--worker",
            name,
            "--rows",
            str(rows),
            "--months",
            str(args.months),
            "--repeats",
            str(args.repeats),
            "--page-repeats",
            str(args.page_repeats),
            "--rollup-repeats",
            str(args.rollup_repeats),
            "--seed",
            str(args.seed),
            "--json",
            str(out),
            *(["--reuse"] if reuse else []),
            *(["--keep"] if args.keep else []),
        ]
        subprocess.run(command, cwd=ROOT, check=True)
        return json.loads(out.read_text())
    finally:
        out.unlink(missing_ok=True)
        if not args.keep:
            admin(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def report(results: list[dict], wall_s: float) -> None:
    measured = [r for r in results if not r.get("refused")]
    base = measured[0]["export"]["rows_per_second"] if measured else None
    lines = []
    for r in results:
        if r.get("refused"):
            lines.append((f"{r['rows']:,}", "refused: not enough disk", "", "", "", ""))
            continue
        size = f"{r['rows']:,}"
        o = r["overview"]
        lines.append(
            (
                size,
                "dashboard overview",
                o["p50_ms"],
                o["p95_ms"],
                "<= 300 ms",
                o["p95_ms"] <= TARGETS["overview_ms"],
            )
        )
        for page, s in r["usage_pages"].items():
            lines.append(
                (
                    size,
                    f"usage {page}",
                    s["p50_ms"],
                    s["p95_ms"],
                    "<= 50 ms",
                    s["p95_ms"] <= TARGETS["usage_page_ms"],
                )
            )
        e = r["export"]
        ratio = e["rows_per_second"] / base
        lines.append(
            (
                size,
                f"export rows/s ({e['rows']:,} rows)",
                f"{e['rows_per_second']:,.0f}",
                f"{ratio:.2f}x first",
                ">= 0.8x first size",
                ratio >= TARGETS["export_ratio"],
            )
        )
        u = r["rollup"]
        lines.append(
            (
                size,
                f"rollup new hour ({u['rows']:,} rows), first {u['first_s']:.2f} s",
                f"{u['p50_s']:.2f} s",
                f"{u['p95_s']:.2f} s",
                "<= 1 s",
                max(u["first_s"], u["p95_s"]) <= TARGETS["rollup_hour_s"],
            )
        )
        d = r["disk"]
        lines.append((size, "bytes per row (heap+toast+indexes)", f"{d['bytes_per_row']:.0f}", f"{LITELLM_BYTES_PER_ROW / d['bytes_per_row']:.1f}x smaller", "<= 1260 B (5x)", d["bytes_per_row"] <= TARGETS["bytes_per_row"]))  # fmt: skip
    print(
        f"\nbench/ledger_scale.py, {datetime.now(UTC):%Y-%m-%d}, {os.cpu_count()} CPUs, {wall_s / 60:.1f} min\n"
    )
    header = ("rows", "metric", "p50", "p95", "target", "met?")
    print("| " + " | ".join(header) + " |")
    print("|---:|---|---:|---:|---|---|")
    for line in lines:
        *cells, met = line
        verdict = "" if met == "" else ("yes" if met else "NO")
        print("| " + " | ".join(str(c) for c in cells) + f" | {verdict} |")
    for r in measured:
        d, table = r["disk"], r["table"]
        shape = (
            f"partitioned, {len(table['partitions'])} partitions"
            if table["partitioned"]
            else "a plain table"
        )
        print(
            f"\n{r['rows']:,} rows ({r['rows_in_table']:,} in the table): {TABLE} is {shape}; "
            f"{d['total_bytes'] / 2**30:.2f} GiB, {d['bytes_per_row']:.0f} bytes a row = heap "
            f"{d['heap_bytes_per_row']:.0f} + indexes {d['index_bytes_per_row']:.0f} + TOAST "
            f"{d['toast_bytes'] / d['rows']:.0f} (a tuple {d['tuple_bytes_sampled']:.0f} bytes, "
            f"sampled); LiteLLM's spend log: {LITELLM_BYTES_PER_ROW} bytes a row"
        )
        print(
            "  indexes, bytes a row: "
            + ", ".join(f"{k} {v:.0f}" for k, v in d["per_index_bytes_per_row"].items())
        )
        print(
            "  columns, average bytes (pg_stats.avg_width): "
            + ", ".join(f"{k} {v}" for k, v in d["column_avg_width"].items())
        )
        if "generate" in r:
            g = r["generate"]
            print(
                f"  generated with COPY in {g['copy_s']:.0f} s ({g['rows_per_s']:,} rows/s), "
                f"VACUUM ANALYZE {g['vacuum_analyze_s']:.0f} s, rollup backfill "
                f"{g['rollup_backfill_s']:.0f} s; load average {r['load_average'][0]:.1f}"
            )


# --- the worker: one size, in its own process (Django bound to that database) -------------


def worker(args) -> None:
    name, args.rows = args.worker, int(args.rows)
    static_root = tempfile.mkdtemp(prefix="cf_bench_static_")
    os.environ.update(server_env(PG_URL.format(name)))
    os.environ.update(
        {
            "DJANGO_SETTINGS_MODULE": "cascadeflow_site.settings",
            "DJANGO_ALLOWED_HOSTS": "testserver,127.0.0.1",
            "DJANGO_STATIC_ROOT": static_root,
            # Pages queue forecast refreshes; keep them out of a developer's real queue.
            "CELERY_BROKER_URL": "memory://",
            **FREE_TIER_UNLIMITED,
        }
    )
    sys.path.insert(0, str(ROOT))
    try:
        result = measure(args)
    finally:
        shutil.rmtree(static_root, ignore_errors=True)
    Path(args.json_out).write_text(json.dumps(result, indent=2, default=str) + "\n")


class Bench:
    """The tenants of one bench database and what measuring them needs."""

    def __init__(self) -> None:
        self.tenants: list[dict] = []  # pk, slug, share, tokens, users

    @property
    def big(self) -> dict:
        return self.tenants[0]


def tenants_create(bench: Bench) -> None:
    from tenants.models import EndUser
    from tenants.services import tenant_create, tier_ensure_defaults, token_create

    tier_ensure_defaults()
    specs = [BIG_TENANT] + [(slug, tz, users) for slug, _, tz, users in SMALL_TENANTS]
    for slug, tz, users in specs:
        created = tenant_create(
            slug=slug, name=slug, time_zone=tz, monthly_budget_nanos=50_000 * 10**9
        )
        tenant = created.tenant
        for app in ("web", "batch"):
            token_create(tenant=tenant, name=app)
        EndUser.objects.bulk_create(
            EndUser(tenant=tenant, external_id=f"user-{i:05d}") for i in range(users)
        )
    bench_load(bench)


def bench_load(bench: Bench) -> None:
    from tenants.models import ApiToken, EndUser, Tenant

    small_total = sum(share for _, share, _, _ in SMALL_TENANTS)
    shares = {BIG_TENANT[0]: BIG_SHARE} | {
        slug: (1 - BIG_SHARE) * share / small_total for slug, share, _, _ in SMALL_TENANTS
    }
    bench.tenants = []
    for slug, share in shares.items():
        tenant = Tenant.objects.get(slug=slug)
        bench.tenants.append(
            {
                "tenant": tenant,
                "pk": tenant.pk,
                "slug": slug,
                "share": share,
                "tokens": list(
                    ApiToken.objects.filter(tenant=tenant)
                    .order_by("pk")
                    .values_list("pk", flat=True)
                ),
                # Ordered: the first end users are the busiest (see rows()).
                "users": list(
                    EndUser.objects.filter(tenant=tenant)
                    .order_by("external_id")
                    .values_list("pk", "external_id")
                ),
            }
        )


def table_shape() -> dict:
    """Plain table or partitioned, and its partitions."""
    from django.db import connection

    from routing import partitions

    with connection.cursor() as cursor:
        cursor.execute("SELECT relkind FROM pg_class WHERE oid = %s::regclass", [TABLE])
        relkind = cursor.fetchone()[0]
    names = partitions.partition_names() if relkind == "p" else []
    return {"relkind": relkind, "partitioned": relkind == "p", "partitions": names}


def partitions_ensure(start: datetime, end: datetime) -> list[str]:
    """The ledger's monthly partitions for [start, end] that are missing (the product
    creates them ahead, not behind: the history is backdated), made as beat makes them."""
    from routing import partitions

    made = []
    month = partitions.month_of(start)
    existing = set(partitions.monthly_partitions())
    while month <= partitions.month_of(end):
        if month not in existing:
            partitions.partition_create(month)
            made.append(partitions.partition_name(month))
        month = partitions.add_months(month, 1)
    return made


def template_lines(columns: list[str], tenant_slug: str = "demo") -> dict[str, list[str]]:
    """A tenant's ledger rows (the demo's) in COPY text format, without the columns rows set."""
    from django.db import connection

    connection.ensure_connection()
    pg = connection.connection  # psycopg
    lines: dict[str, list[str]] = {}
    for kind in ("request", "audit"):
        with (
            pg.cursor() as cursor,
            cursor.copy(
                f"COPY (SELECT {', '.join(columns)} FROM {TABLE} WHERE tenant_id = "
                "(SELECT id FROM tenants_tenant WHERE slug = %s) AND kind = %s ORDER BY id) "
                "TO STDOUT",
                [tenant_slug, kind],
            ) as copy,
        ):
            data = b"".join(bytes(chunk) for chunk in copy)
        lines[kind] = data.decode().splitlines()
    if not lines["request"]:
        raise SystemExit(f"no ledger rows of tenant {tenant_slug!r} to copy")
    return lines


def copy_columns() -> list[str]:
    from django.db import connection

    with connection.cursor() as cursor:
        cursor.execute(
            "SELECT column_name FROM information_schema.columns WHERE table_name = %s "
            "ORDER BY ordinal_position",
            [TABLE],
        )
        names = [r[0] for r in cursor.fetchall()]
    return [n for n in names if n != "id" and n not in OWN_COLUMNS]


def hour_counts(start: datetime, end: datetime, rows: int) -> list[tuple[datetime, int]]:
    """``rows`` spread over the hours of [start, end): doubling every 30 days, busier from
    08 to 18 UTC and on weekdays; rounded so the counts add up to ``rows``."""
    hours, weights = [], []
    at = start
    span = 30 * 86400
    while at < end:
        growth = 2 ** ((at - start).total_seconds() / span)
        day = 1.0 if 8 <= at.hour < 18 else 0.45 if 6 <= at.hour < 22 else 0.2
        week = 0.4 if at.weekday() >= 5 else 1.0
        hours.append(at)
        weights.append(growth * day * week)
        at += timedelta(hours=1)
    total = sum(weights)
    counts, carried, given = [], 0.0, 0
    for at, w in zip(hours, weights, strict=True):
        carried += w / total * rows
        n = round(carried) - given
        given += n
        counts.append((at, n))
    return counts


def rows(
    bench: Bench,
    lines: dict[str, list[str]],
    hours: list[tuple[datetime, int]],
    rng: random.Random,
    tenants: list[dict] | None = None,
):
    """COPY text lines, in time order: (tenant, token, end user, request id, time, template)."""
    tenants = tenants or bench.tenants
    cumulative, total = [], 0.0
    for t in tenants:
        total += t["share"]
        cumulative.append(total)
    requests, audits = lines["request"], lines["audit"] or lines["request"]
    for at, n in hours:
        prefix = f"{at:%Y-%m-%d %H}:"
        offsets = sorted(rng.random() * 3600 for _ in range(n))
        for offset in offsets:
            pick = rng.random() * total
            t = next(t for t, c in zip(tenants, cumulative, strict=True) if pick < c)
            seconds = int(offset)
            stamp = f"{prefix}{seconds // 60:02d}:{seconds % 60:02d}.{int(offset % 1 * 1e6):06d}+00"
            rid = f"req_{rng.getrandbits(128):032x}"
            if rng.random() < AUDIT_SHARE:  # an audit: no token, no end user
                yield f"{t['pk']}\t\\N\t\\N\taudit_{rid[4:]}\t{stamp}\t{rng.choice(audits)}\n"
                continue
            users = t["users"]
            r = rng.random()
            user = "\\N" if r < ANONYMOUS_SHARE else users[int(len(users) * rng.random() ** 2)][0]
            token = t["tokens"][int(r * 7) % len(t["tokens"])]
            yield f"{t['pk']}\t{token}\t{user}\t{rid}\t{stamp}\t{rng.choice(requests)}\n"


def copy_rows(lines_iter, columns: list[str], total: int, label: str) -> float:
    """Stream the lines into the ledger with COPY, one statement per million rows."""
    import itertools

    from django.db import connection

    connection.ensure_connection()
    pg = connection.connection
    target = f"COPY {TABLE} ({', '.join([*OWN_COLUMNS, *columns])}) FROM STDIN"
    started = time.perf_counter()
    done = 0
    # The rows are valid by construction: skip the foreign-key triggers (this session only).
    with pg.cursor() as cursor:
        cursor.execute("SET session_replication_role = replica")
    while done < total:
        with pg.cursor() as cursor, cursor.copy(target) as copy:
            statement_rows = 0
            while statement_rows < 1_000_000 and done < total:
                chunk = list(itertools.islice(lines_iter, COPY_CHUNK))
                if not chunk:
                    done = total
                    break
                copy.write("".join(chunk))
                statement_rows += len(chunk)
                done += len(chunk)
        if total > 1_000_000:
            elapsed = time.perf_counter() - started
            print(f"  {label}: {done:,} / {total:,} rows, {done / elapsed:,.0f} rows/s", flush=True)
    with pg.cursor() as cursor:
        cursor.execute("SET session_replication_role = DEFAULT")
    return time.perf_counter() - started


def timed_gets(client, url: str, repeats: int, warmups: int = 3, **headers) -> dict:
    for _ in range(warmups):
        response = client.get(url, secure=True, **headers)
        if response.status_code != 200:
            raise SystemExit(f"GET {url}: HTTP {response.status_code} {response.content[:300]!r}")
    samples = []
    for _ in range(repeats):
        started = time.perf_counter()
        response = client.get(url, secure=True, **headers)
        samples.append((time.perf_counter() - started) * 1000)
    return {"url": url, **stats_ms(samples), "response": response}


def timed_rounds(client, pages: dict[str, tuple[str, dict]], rounds: int, rng) -> dict:
    """Each page's GET timed ``rounds`` times, one GET of every page per round in a
    shuffled order: a burst of load on the machine falls on every page alike rather than
    on the one measured at that moment. A p95 needs the samples: 20 make it the mean of
    the two slowest, one pause apiece."""
    for url, headers in pages.values():
        for _ in range(3):
            response = client.get(url, secure=True, **headers)
            if response.status_code != 200:
                raise SystemExit(
                    f"GET {url}: HTTP {response.status_code} {response.content[:300]!r}"
                )
    samples: dict[str, list[float]] = {name: [] for name in pages}
    last = {}
    order = list(pages)
    for _ in range(rounds):
        rng.shuffle(order)
        for name in order:
            url, headers = pages[name]
            started = time.perf_counter()
            last[name] = client.get(url, secure=True, **headers)
            samples[name].append((time.perf_counter() - started) * 1000)
    return {
        name: {"url": pages[name][0], **stats_ms(samples[name]), "response": last[name]}
        for name in pages
    }


def disk_usage(rows_total: int) -> dict:
    """Bytes on disk of the ledger (summed over partitions), per index, per column."""
    from django.db import connection

    with connection.cursor() as cursor:
        cursor.execute(
            "WITH r AS (SELECT relid FROM pg_partition_tree(%s::regclass) "
            "UNION SELECT %s::regclass) SELECT sum(pg_total_relation_size(relid)), "
            "sum(pg_relation_size(relid)), sum(pg_indexes_size(relid)) FROM r",
            [TABLE, TABLE],
        )
        total, heap, indexes = (int(v or 0) for v in cursor.fetchone())
        cursor.execute(
            "SELECT c.relname, (SELECT sum(pg_relation_size(p.relid)) FROM "
            "(SELECT relid FROM pg_partition_tree(i.indexrelid) UNION SELECT i.indexrelid) p) "
            "FROM pg_index i JOIN pg_class c "
            "ON c.oid = i.indexrelid WHERE i.indrelid = %s::regclass ORDER BY 2 DESC",
            [TABLE],
        )
        per_index = {name: int(size or 0) for name, size in cursor.fetchall()}
        cursor.execute(
            "SELECT DISTINCT ON (attname) attname, avg_width FROM pg_stats "
            "WHERE tablename = %s ORDER BY attname, inherited DESC",
            [TABLE],
        )
        widths = dict(cursor.fetchall())
        cursor.execute(
            f"SELECT avg(pg_column_size(t.*)) FROM {TABLE} t TABLESAMPLE SYSTEM (1) REPEATABLE (1)"
        )
        tuple_bytes = float(cursor.fetchone()[0] or 0)
    return {
        "total_bytes": total,
        "heap_bytes": heap,
        "toast_bytes": total - heap - indexes,
        "index_bytes": indexes,
        "rows": rows_total,
        "bytes_per_row": total / rows_total,
        "heap_bytes_per_row": heap / rows_total,
        "index_bytes_per_row": indexes / rows_total,
        "tuple_bytes_sampled": round(tuple_bytes, 1),
        "per_index_bytes_per_row": {k: round(v / rows_total, 1) for k, v in per_index.items()},
        "column_avg_width": dict(sorted(widths.items(), key=lambda kv: -kv[1])),
    }


def usage_page_urls(bench: Bench) -> dict[str, tuple[str, int]]:
    """Pages of /api/v1/usage/ as a client reaches them: (url, tenant pk)."""
    from django.db import connection
    from rest_framework.pagination import Cursor

    from routing.api import UsageCursor

    def cursor_url(position: int, query: str = "") -> str:
        paginator = UsageCursor()
        paginator.base_url = f"http://testserver/api/v1/usage/{query}"
        return paginator.encode_cursor(Cursor(offset=0, reverse=False, position=str(position)))

    def nth_id(tenant_pk: int, offset: int, order: str) -> int:
        with connection.cursor() as cursor:
            cursor.execute(
                f"SELECT id FROM {TABLE} WHERE tenant_id = %s ORDER BY id {order} "
                "OFFSET %s LIMIT 1",
                [tenant_pk, offset],
            )
            return cursor.fetchone()[0]

    def count(tenant_pk: int) -> int:
        with connection.cursor() as cursor:
            cursor.execute(f"SELECT count(*) FROM {TABLE} WHERE tenant_id = %s", [tenant_pk])
            return cursor.fetchone()[0]

    big, small = bench.big, bench.tenants[-1]
    n_big = count(big["pk"])
    quiet_user = big["users"][-1][1]
    return {
        "big first page": ("/api/v1/usage/", big["pk"]),
        "big middle page": (cursor_url(nth_id(big["pk"], n_big // 2, "DESC")), big["pk"]),
        "big last page": (cursor_url(nth_id(big["pk"], 100, "ASC")), big["pk"]),
        "small first page": ("/api/v1/usage/", small["pk"]),
        "small last page": (cursor_url(nth_id(small["pk"], 100, "ASC")), small["pk"]),
        "big, quiet end user, first page": (f"/api/v1/usage/?end_user={quiet_user}", big["pk"]),
    }


def export_window(tenant_pk: int) -> tuple[str, str, int]:
    """The newest whole UTC days holding about EXPORT_ROWS of the tenant's rows."""
    from django.db import connection

    with connection.cursor() as cursor:
        cursor.execute(
            f"SELECT (created_at AT TIME ZONE 'UTC')::date, count(*) FROM {TABLE} "
            "WHERE tenant_id = %s GROUP BY 1 ORDER BY 1 DESC",
            [tenant_pk],
        )
        days = cursor.fetchall()
    end, total, start = days[0][0], 0, days[0][0]
    for day, n in days:
        if total >= EXPORT_ROWS or total + n > 2_000_000:
            break
        total, start = total + n, day
    return start.isoformat(), end.isoformat(), total


def measure(args) -> dict:
    from django.core.management import call_command
    from django.db import connection
    from django.test import Client
    from django.utils import timezone

    import cascadeflow_site.asgi  # noqa: F401 (the process as the ASGI server runs it)
    from dashboard.models import RollupState
    from dashboard.rollups import LATE_MARGIN, hour_floor, hourly_rows, rollup_all, rollup_tenant
    from dashboard.services import forecasts_refresh
    from tenants.enums import MemberRole
    from tenants.models import Member
    from tenants.services import token_create, user_get_or_create

    wall = time.perf_counter()
    call_command("collectstatic", interactive=False, verbosity=0)
    rng = random.Random(args.seed)
    now = timezone.now()
    new_hour = hour_floor(now) - timedelta(hours=1)
    if new_hour.hour == 23:  # the new hour must not close the (UTC) day: one hour's rollup
        new_hour -= timedelta(hours=1)
    history_start = new_hour - timedelta(days=30 * args.months)
    shape = table_shape()
    print(
        f"  {TABLE}: {'PARTITIONED' if shape['partitioned'] else 'plain table'} "
        f"(relkind {shape['relkind']!r}, {len(shape['partitions'])} partitions)",
        flush=True,
    )
    bench = Bench()
    columns = copy_columns()
    made = []
    result: dict = {"rows": args.rows, "database": args.worker, "reused": args.reuse}
    if not args.reuse:
        tenants_create(bench)
        if shape["partitioned"]:
            made = partitions_ensure(history_start, new_hour + timedelta(hours=1))
        lines = template_lines(columns)
        result["templates"] = {k: len(v) for k, v in lines.items()}
        hours = hour_counts(history_start, new_hour, args.rows)
        print(
            f"  generating {args.rows:,} rows, {history_start:%Y-%m-%d %H:%M} to "
            f"{new_hour:%Y-%m-%d %H:%M} UTC, {result['templates']['request']} request and "
            f"{result['templates']['audit']} audit row templates",
            flush=True,
        )
        copy_s = copy_rows(rows(bench, lines, hours, rng), columns, args.rows, "COPY")
        with connection.cursor() as cursor:
            started = time.perf_counter()
            cursor.execute(f"VACUUM ANALYZE {TABLE}")
            vacuum_s = time.perf_counter() - started
        started = time.perf_counter()
        rollup_all(now=new_hour + LATE_MARGIN)
        backfill_s = time.perf_counter() - started
        result["generate"] = {
            "copy_s": round(copy_s, 1),
            "rows_per_s": round(args.rows / copy_s),
            "vacuum_analyze_s": round(vacuum_s, 1),
            "rollup_backfill_s": round(backfill_s, 1),
        }
        print(
            f"  COPY {copy_s:.1f} s ({args.rows / copy_s:,.0f} rows/s), VACUUM ANALYZE "
            f"{vacuum_s:.1f} s, rollup backfill {backfill_s:.1f} s",
            flush=True,
        )
    else:
        bench_load(bench)
        lines = template_lines(columns)
        rollup_all(now=new_hour + LATE_MARGIN)  # catch up to this run's clock
    shape = table_shape()
    result["table"] = {**shape, "partitions_made_by_bench": made}
    big_tenant = bench.big["tenant"]
    forecasts_refresh(big_tenant)
    with connection.cursor() as cursor:
        cursor.execute(f"SELECT count(*) FROM {TABLE}")
        rows_total = cursor.fetchone()[0]
    result["rows_in_table"] = rows_total

    # (e) bytes per row
    disk = disk_usage(rows_total)
    result["disk"] = disk
    print(
        f"  (e) {disk['bytes_per_row']:.0f} bytes a row on disk (heap {disk['heap_bytes_per_row']:.0f}, "
        f"indexes {disk['index_bytes_per_row']:.0f}, TOAST {disk['toast_bytes'] / rows_total:.0f}); "
        f"{disk['total_bytes'] / 2**30:.2f} GiB",
        flush=True,
    )

    # The pages are timed in this process, which also holds what the bench generated:
    # out of the collector's sight, as the server's start-up objects are
    # (cascadeflow_site.asgi), so that a full collection scans what a server's would.
    gc.collect()
    gc.freeze()

    # (a) dashboard overview
    viewer = user_get_or_create(email=f"viewer-{secrets.token_hex(3)}@bench.invalid", password=None)
    Member.objects.create(tenant=big_tenant, user=viewer, role=MemberRole.VIEWER)
    client = Client()
    client.force_login(viewer)
    overview = timed_gets(client, f"/dashboard/t/{big_tenant.slug}/", args.repeats)
    overview.pop("response")
    result["overview"] = overview
    print(
        f"  (a) overview p50 {overview['p50_ms']:.0f} ms, p95 {overview['p95_ms']:.0f} ms",
        flush=True,
    )

    # (b) usage pages
    tokens = {
        t["pk"]: token_create(tenant=t["tenant"], name=f"bench-{secrets.token_hex(2)}").raw
        for t in (bench.big, bench.tenants[-1])
    }
    api = Client()
    pages = timed_rounds(
        api,
        {
            page: (url, {"HTTP_AUTHORIZATION": f"Bearer {tokens[tenant_pk]}"})
            for page, (url, tenant_pk) in usage_page_urls(bench).items()
        },
        args.page_repeats,
        rng,
    )
    for page, s in pages.items():
        s["results"] = len(s.pop("response").json()["results"])
        print(
            f"  (b) usage {page}: p50 {s['p50_ms']:.1f} ms, p95 {s['p95_ms']:.1f} ms ({s['results']} rows)",
            flush=True,
        )
    result["usage_pages"] = pages

    # (c) export
    start, end, expected = export_window(bench.big["pk"])
    with served(server_env(PG_URL.format(args.worker))) as (base, _pid):
        exported, seconds = stream_export(base, tokens[bench.big["pk"]], start, end)
    result["export"] = {
        "start": start,
        "end": end,
        "rows": exported,
        "expected_rows": expected,
        "seconds": round(seconds, 2),
        "rows_per_second": exported / seconds,
    }
    print(
        f"  (c) export {start}..{end}: {exported:,} rows in {seconds:.1f} s, {exported / seconds:,.0f} rows/s",
        flush=True,
    )

    # (d) one new hour at 10 M events a day, then its rollup. At that rate the hour
    # before is as busy (and already rolled): whatever a rollup reads again of it counts.
    hour_rows = round(EVENTS_PER_DAY / 24)
    with connection.cursor() as cursor:
        cursor.execute(f"SELECT coalesce(max(id), 0) FROM {TABLE}")
        last_id = cursor.fetchone()[0]
    previous = new_hour - timedelta(hours=1)
    copy_rows(
        rows(bench, lines, [(previous, hour_rows)], rng, tenants=[bench.big]),
        columns,
        hour_rows,
        "hour before",
    )
    RollupState.objects.filter(tenant=big_tenant).update(hourly_until=previous)
    rollup_tenant(big_tenant, now=new_hour + LATE_MARGIN)
    insert_s = copy_rows(
        rows(bench, lines, [(new_hour, hour_rows)], rng, tenants=[bench.big]),
        columns,
        hour_rows,
        "new hour",
    )
    until = new_hour + timedelta(hours=1) + LATE_MARGIN
    started = time.perf_counter()
    first = rollup_tenant(big_tenant, now=until)
    first_s = time.perf_counter() - started
    # Of which the ledger's aggregation alone (the new hour only, no writes):
    started = time.perf_counter()
    hourly_rows(big_tenant.pk, new_hour, new_hour + timedelta(hours=1))
    aggregate_s = time.perf_counter() - started
    again = []
    for _ in range(args.rollup_repeats):
        RollupState.objects.filter(tenant=big_tenant).update(hourly_until=new_hour)
        started = time.perf_counter()
        rollup_tenant(big_tenant, now=until)
        again.append(time.perf_counter() - started)
    result["rollup"] = {
        "rows": hour_rows,
        "hour": new_hour,
        "insert_s": round(insert_s, 2),
        "first_s": round(first_s, 3),
        "first_result": first.__dict__,
        "aggregate_new_hour_s": round(aggregate_s, 3),
        "p50_s": round(sorted(again)[len(again) // 2], 3),
        "p95_s": round(sorted(again)[min(len(again) - 1, int(0.95 * len(again)))], 3),
        "repeats_s": [round(s, 3) for s in again],
    }
    print(
        f"  (d) new hour: {hour_rows:,} rows copied in {insert_s:.1f} s; rollup first "
        f"{first_s:.2f} s ({first.hours} hours, {first.hourly_rows} hourly rows, {first.days} days), "
        f"again p50 {result['rollup']['p50_s']:.2f} s; the new hour's aggregation alone "
        f"{aggregate_s:.2f} s",
        flush=True,
    )
    if args.keep:  # a reused database starts from the same ledger
        with connection.cursor() as cursor:
            cursor.execute(
                f"DELETE FROM {TABLE} WHERE tenant_id = %s AND id > %s",
                [bench.big["pk"], last_id],
            )
            # Dead tuples at the newest end of the (tenant, id) index would be stepped
            # over by the next run's first page (autovacuum may be off, or late).
            cursor.execute(f"VACUUM ANALYZE {TABLE}")
    result["load_average"] = os.getloadavg()
    result["wall_s"] = round(time.perf_counter() - wall, 1)
    return result


if __name__ == "__main__":
    main()
