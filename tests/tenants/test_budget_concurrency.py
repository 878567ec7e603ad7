"""Budgets hold under concurrency: two server processes, one PostgreSQL, 200 requests at once."""

import asyncio
from decimal import Decimal

import httpx
import pytest

from routing.enforcement import worst_case_nanos
from routing.providers.catalog import demo_catalog_models
from routing.schemas import parse_chat_request
from tests.support.fake_upstream import fake_models_config
from tests.support.live_server import LiveServer, postgres_available
from tests.support.services import skip_or_fail

pytestmark = pytest.mark.services

BODY = {
    "model": "demo/small",
    "messages": [{"role": "user", "content": "Tell me about lighthouses and their keepers"}],
    "max_tokens": 60,
}
FITS = 20
REQUESTS = 200


@pytest.fixture(scope="module")
def two_processes(fake_upstream):
    if not postgres_available():
        skip_or_fail("PostgreSQL is not reachable for the budget concurrency test")
    server = LiveServer(
        backend="postgresql",
        models=fake_models_config(fake_upstream.api_base),
        extra_env={"CASCADEFLOW_DEMO_LATENCY_SCALE": "0.2"},  # requests overlap for real
    )
    server.start()
    second = server.another_process()
    yield server, second
    server.stop()


def test_two_processes_never_overshoot_and_the_ledger_matches_the_counters(two_processes):
    server, second = two_processes
    import json

    small = demo_catalog_models()[0]
    worst = worst_case_nanos((small,), parse_chat_request(json.dumps(BODY).encode()), "balanced")
    limit = worst * FITS
    out = server.manage(
        "create_tenant", "budgeted", "--monthly-budget-usd", str(Decimal(limit) / 10**9)
    )
    token = out.strip().splitlines()[-1]
    bases = [server.base_url, second]

    async def fire():
        limits = httpx.Limits(max_connections=REQUESTS)
        async with httpx.AsyncClient(timeout=60, limits=limits) as client:

            async def one(i):
                response = await client.post(
                    f"{bases[i % 2]}/v1/chat/completions",
                    json=BODY,
                    headers={"Authorization": f"Bearer {token}"},
                )
                return response.status_code

            return await asyncio.gather(*(one(i) for i in range(REQUESTS)))

    statuses = asyncio.run(fire())

    assert set(statuses) <= {200, 402}, statuses
    assert statuses.count(200) >= FITS  # at least what fits at worst case was admitted
    assert statuses.count(402) > 0  # and the budget did stop the rest
    [(spent, reserved, budget_limit)] = server.query(
        "SELECT c.spent_nanos, c.reserved_nanos, b.limit_nanos FROM tenants_budgetcounter c "
        "JOIN tenants_budget b ON b.id = c.budget_id JOIN tenants_tenant t ON t.id = b.tenant_id "
        "WHERE t.slug = %s",
        ("budgeted",),
    )
    assert budget_limit == limit
    assert reserved == 0  # every reservation settled
    assert spent <= limit + worst  # never more than one request's worst case over
    [(ledger_sum, ok_rows, blocked_rows)] = server.query(
        "SELECT COALESCE(SUM(e.cost_nanos), 0), "
        "SUM(CASE WHEN e.status = 'ok' THEN 1 ELSE 0 END), "
        "SUM(CASE WHEN e.status = 'blocked' THEN 1 ELSE 0 END) "
        "FROM routing_usageevent e JOIN tenants_tenant t ON t.id = e.tenant_id WHERE t.slug = %s",
        ("budgeted",),
    )
    print(
        f"\nadmitted {statuses.count(200)}, blocked {statuses.count(402)}; settled {spent}n of "
        f"limit {limit}n (worst case per request {worst}n); ledger {ledger_sum}n"
    )
    assert ledger_sum == spent  # to the nano-dollar
    assert ok_rows == statuses.count(200)
    assert blocked_rows == statuses.count(402)
