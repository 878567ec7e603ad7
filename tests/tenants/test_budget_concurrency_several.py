"""Several budgets at once, several server processes, a mixed burst: no deadlock, nothing lost.

Every request of the burst is counted against up to four budgets (tenant, API
token, the end user's own or its tier's), in plain, cascade and streaming
flavours, fired 50 at a time at three uvicorn processes sharing one
PostgreSQL. Afterwards: no 5xx, no reservation still held, no counter over its
cap, and every counter equal to the sum of the ledger rows it counts.
"""

import asyncio
import json
import textwrap

import httpx
import pytest

from tests.support.fake_upstream import fake_models_config
from tests.support.live_server import LiveServer, postgres_available
from tests.support.services import skip_or_fail

pytestmark = [pytest.mark.services, pytest.mark.slow]

REQUESTS = 200
CONCURRENCY = 50
USERS = ["own-1", "own-2", "tiered-1", "tiered-2", None]
KINDS = [
    ("demo/small", False),
    ("cascade/balanced", False),
    ("demo/small", True),
    ("cascade/balanced", True),
]

SETUP = textwrap.dedent(
    """
    from tenants.models import ApiToken, EndUser, EndUserTier, Tenant
    from tenants.services import budget_create, end_user_get_or_create
    tenant = Tenant.objects.get(slug="several")
    token = ApiToken.objects.get(tenant=tenant)
    tier = EndUserTier.objects.create(tenant=tenant, slug="team", name="Team", is_default=True)
    budget_create(tenant=tenant, scope="token", period="month", limit_nanos={token_limit},
                  token=token)
    budget_create(tenant=tenant, scope="tier", period="day", limit_nanos={tier}, tier=tier)
    for external_id in ("own-1", "own-2"):
        user = end_user_get_or_create(tenant=tenant, external_id=external_id)
        budget_create(tenant=tenant, scope="end_user", period="day", limit_nanos={own},
                      end_user=user)
    for external_id in ("tiered-1", "tiered-2"):
        end_user_get_or_create(tenant=tenant, external_id=external_id)
    """
)


@pytest.fixture(scope="module")
def three_processes(fake_upstream):
    if not postgres_available():
        skip_or_fail("PostgreSQL is not reachable for the budget concurrency test")
    server = LiveServer(
        backend="postgresql",
        models=fake_models_config(fake_upstream.api_base),
        extra_env={"CASCADEFLOW_DEMO_LATENCY_SCALE": "0.05"},  # requests overlap for real
    )
    server.start()
    bases = [server.base_url, server.another_process(), server.another_process()]
    yield server, bases
    server.stop()


def _body(i: int) -> dict:
    model, stream = KINDS[i % len(KINDS)]
    body = {
        "model": model,
        "messages": [{"role": "user", "content": f"Explain how a lighthouse works ({i})"}],
        "max_tokens": 80,
        "stream": stream,
    }
    user = USERS[(i // len(KINDS)) % len(USERS)]
    if user:
        body["user"] = user
    return body


async def _one(client: httpx.AsyncClient, base: str, token: str, body: dict) -> tuple[int, str]:
    headers = {"Authorization": f"Bearer {token}"}
    try:
        async with client.stream(
            "POST", f"{base}/v1/chat/completions", json=body, headers=headers
        ) as response:
            text = (await response.aread()).decode()
            return response.status_code, text
    except httpx.HTTPError as exc:  # a body cut short counts as a server failure
        return 599, repr(exc)


def test_several_budgets_never_deadlock_and_the_ledger_matches_every_counter(three_processes):
    server, bases = three_processes
    # Limits sized so that a good share of the burst is refused by each budget.
    out = server.manage("create_tenant", "several", "--monthly-budget-usd", "0.02")
    token = out.strip().splitlines()[-1]
    server.manage(
        "shell", "-c", SETUP.format(token_limit=15_000_000, tier=3_000_000, own=3_500_000)
    )

    async def fire():
        semaphore = asyncio.Semaphore(CONCURRENCY)
        limits = httpx.Limits(max_connections=CONCURRENCY)
        async with httpx.AsyncClient(timeout=120, limits=limits) as client:

            async def guarded(i):
                async with semaphore:
                    return await _one(client, bases[i % len(bases)], token, _body(i))

            return await asyncio.gather(*(guarded(i) for i in range(REQUESTS)))

    results = asyncio.run(fire())
    statuses = [status for status, _ in results]
    failures = [(s, t[:300]) for s, t in results if s >= 500]
    errors = sorted(
        {line for line in server.log().splitlines() if line.split(":")[0].endswith("Error")}
    )
    assert not failures, (len(failures), failures[:3], errors[:20])
    assert set(statuses) <= {200, 402}, statuses
    assert statuses.count(200) > 0 and statuses.count(402) > 0
    for status, text in results:
        if status == 200 and text.startswith("data:"):
            assert text.rstrip().endswith("data: [DONE]"), text[-300:]
            assert '"error"' not in text

    def rows(sql, params=()):
        return server.query(sql, params)

    [(tenant_id,)] = rows("SELECT id FROM tenants_tenant WHERE slug = %s", ("several",))
    assert rows(
        "SELECT count(*) FROM tenants_budgetreservation WHERE tenant_id = %s AND state = 'held'",
        (tenant_id,),
    ) == [(0,)]
    counters = rows(
        "SELECT b.scope, b.token_id, b.end_user_id, c.subject_id, c.spent_nanos, "
        "c.reserved_nanos, b.limit_nanos * COALESCE(b.block_pct, 100) / 100, c.period_start "
        "FROM tenants_budgetcounter c JOIN tenants_budget b ON b.id = c.budget_id "
        "WHERE c.tenant_id = %s",
        (tenant_id,),
    )
    assert {c[0] for c in counters} == {"tenant", "token", "end_user", "tier"}
    for scope, token_id, end_user_id, subject_id, spent, reserved, cap, period_start in counters:
        assert reserved == 0, (scope, subject_id)
        assert spent <= cap, (scope, subject_id, spent, cap)
        where, params = "tenant_id = %s AND created_at >= %s", [tenant_id, period_start]
        if scope == "token":
            where, params = where + " AND token_id = %s", [*params, token_id]
        elif scope == "end_user":
            where, params = where + " AND end_user_id = %s", [*params, end_user_id]
        elif scope == "tier":
            where, params = where + " AND end_user_id = %s", [*params, subject_id]
        [(ledger,)] = rows(
            f"SELECT COALESCE(SUM(cost_nanos), 0) FROM routing_usageevent WHERE {where}",
            tuple(params),
        )
        assert ledger == spent, (scope, subject_id, ledger, spent)
    [(ledger_rows,)] = rows(
        "SELECT count(*) FROM routing_usageevent WHERE tenant_id = %s", (tenant_id,)
    )
    assert ledger_rows == REQUESTS
    assert "deadlock" not in server.log().lower()
    print(
        f"\n{statuses.count(200)} served, {statuses.count(402)} refused by a budget; "
        f"{len(counters)} counters, all equal to the ledger: "
        + json.dumps({c[0] + str(c[3]): c[4] for c in counters})
    )
