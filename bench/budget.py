"""What a budget check adds to a request: 0 vs 1 vs 4 applicable budgets, in one run.

    python bench/budget.py [--requests 3000] [--database-url postgres://...] [--json OUT]

Runs the gateway's real admission and settlement path in process (no HTTP
server, no upstream call): ``gateway.prepare`` (token lookup, target, end
user, rate limits, budget reservation) then ``gateway.record`` (ledger insert
and budget settlement in one transaction). Three tenants are measured
alternately, so machine noise hits them alike:

- **off**: no budgets;
- **1 budget**: a monthly tenant budget;
- **4 budgets**: monthly and daily tenant budgets, a token budget and an
  end-user budget (every request counted against all four).

Reported: p50 / p99 of prepare + record per request for each, and the time
budgets add (percentile difference against "off"). Default database: a
throwaway PostgreSQL database on 127.0.0.1 (created and dropped); pass
``--database-url`` to use another.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import secrets
import statistics
import sys
import time
from pathlib import Path

from benchenv import FREE_TIER_UNLIMITED

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
os.environ["LITELLM_LOCAL_MODEL_COST_MAP"] = "True"
PG_ADMIN = "postgresql://postgres@127.0.0.1:5432/postgres"


def percentile(values: list[float], p: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(p / 100 * len(ordered)))]


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--requests", type=int, default=3000, help="per configuration")
    parser.add_argument("--database-url")
    parser.add_argument("--json", dest="json_out")
    args = parser.parse_args()

    throwaway = None
    if not args.database_url:
        import psycopg

        throwaway = f"cf_bench_budget_{secrets.token_hex(3)}"
        with psycopg.connect(PG_ADMIN, autocommit=True) as conn:
            conn.execute(f'CREATE DATABASE "{throwaway}"')
        args.database_url = f"postgres://postgres@127.0.0.1:5432/{throwaway}"
    os.environ["DATABASE_URL"] = args.database_url
    os.environ.setdefault("DJANGO_SETTINGS_MODULE", "cascadeflow_site.settings")
    os.environ["DJANGO_DEBUG"] = "false"
    os.environ.setdefault("DJANGO_SECRET_KEY", secrets.token_urlsafe(50))
    os.environ.pop("REDIS_URL", None)
    os.environ.update(FREE_TIER_UNLIMITED)
    try:
        result = run(args)
    finally:
        if throwaway:
            import psycopg
            from django.db import connections

            connections.close_all()
            with psycopg.connect(PG_ADMIN, autocommit=True) as conn:
                conn.execute(f'DROP DATABASE IF EXISTS "{throwaway}" WITH (FORCE)')
    if args.json_out:
        Path(args.json_out).write_text(json.dumps(result, indent=2) + "\n")


def run(args) -> dict:
    import django

    django.setup()
    from django.core.management import call_command
    from django.db import connection

    from routing import gateway
    from routing.schemas import parse_chat_request
    from tenants.enums import BudgetPeriod, BudgetScope
    from tenants.models import EndUser
    from tenants.services import budget_create, tenant_create

    call_command("migrate", verbosity=0)
    usd = 10**9
    configs = {}
    for name, count in (("off", 0), ("1 budget", 1), ("4 budgets", 4)):
        created = tenant_create(slug=f"bench-{count}-{secrets.token_hex(3)}")
        tenant, token = created.tenant, created.issued
        end_user = EndUser.objects.create(tenant=tenant, external_id="alice")
        specs = [
            dict(scope=BudgetScope.TENANT, period=BudgetPeriod.MONTH),
            dict(scope=BudgetScope.TENANT, period=BudgetPeriod.DAY),
            dict(scope=BudgetScope.TOKEN, period=BudgetPeriod.MONTH, token=token.token),
            dict(scope=BudgetScope.END_USER, period=BudgetPeriod.MONTH, end_user=end_user),
        ][:count]
        for spec in specs:
            budget_create(tenant=tenant, limit_nanos=10_000 * usd, **spec)
        configs[name] = token.raw
    body = json.dumps(
        {
            "model": "demo/small",
            "user": "alice",
            "max_tokens": 64,
            "messages": [{"role": "user", "content": "What is 2 + 2?"}],
        }
    ).encode()

    async def one(raw: str, n: int) -> float:
        chat = parse_chat_request(body)
        started = time.perf_counter()
        gw = await gateway.prepare(
            request_id=f"req_bench_{n}_{secrets.token_hex(6)}",
            authorization=f"Bearer {raw}",
            request=chat,
            parse_error=None,
        )
        entry = gateway.ledger_entry(gw)
        entry.prompt_tokens, entry.completion_tokens = 12, 8
        await gateway.record(gw, entry)
        return (time.perf_counter() - started) * 1000

    async def measure() -> dict[str, list[float]]:
        samples: dict[str, list[float]] = {name: [] for name in configs}
        names = list(configs)
        for name in names:  # warm-up
            for i in range(100):
                await one(configs[name], -i)
        for i in range(args.requests):
            order = names[i % 3 :] + names[: i % 3]
            for name in order:
                samples[name].append(await one(configs[name], i))
        return samples

    started = time.time()
    samples = asyncio.run(measure())
    stats = {
        name: {
            "p50_ms": percentile(v, 50),
            "p99_ms": percentile(v, 99),
            "mean_ms": statistics.fmean(v),
        }
        for name, v in samples.items()
    }
    added = {
        name: {
            "p50_ms": stats[name]["p50_ms"] - stats["off"]["p50_ms"],
            "p99_ms": stats[name]["p99_ms"] - stats["off"]["p99_ms"],
        }
        for name in ("1 budget", "4 budgets")
    }
    print(
        f"\nbench/budget.py — {args.requests} requests per configuration, interleaved; "
        f"database: {connection.vendor} ({connection.settings_dict['NAME']})\n"
    )
    print(
        f"{'configuration':<14}{'p50 ms':>9}{'p99 ms':>9}{'added p50':>11}{'added p99':>11}{'p99 ratio':>11}"
    )
    for name, s in stats.items():
        add = added.get(name, {"p50_ms": 0.0, "p99_ms": 0.0})
        print(
            f"{name:<14}{s['p50_ms']:>9.3f}{s['p99_ms']:>9.3f}{add['p50_ms']:>11.3f}{add['p99_ms']:>11.3f}"
            f"{s['p99_ms'] / stats['off']['p99_ms']:>11.2f}"
        )
    target = max(added[n]["p99_ms"] for n in added)
    print(
        f"\nTarget p99 added <= 2 ms: {'MET' if target <= 2.0 else 'NOT MET'} (worst: {target:.3f} ms)"
    )
    return {
        "requests_per_configuration": args.requests,
        "database": connection.vendor,
        "stats": stats,
        "added": added,
        "wall_time_s": round(time.time() - started, 1),
    }


if __name__ == "__main__":
    main()
