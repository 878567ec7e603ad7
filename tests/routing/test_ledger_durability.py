"""An answer that was paid for is never lost: ledger writes that fail are spooled and replayed.

The fault is real: a trigger makes the database refuse every ledger insert
(on PostgreSQL and on SQLite alike), as a failover or a full disk would.
"""

import json

import pytest
from asgiref.sync import sync_to_async
from django.db import connection
from django.test import AsyncClient

from routing.engine.agent import CascadeAgent
from routing.models import UsageEvent
from routing.spool import ledger_spool
from routing.tasks import ledger_spool_replay as replay_task
from tenants.enums import BudgetPeriod, BudgetScope
from tenants.models import BudgetCounter, BudgetReservation
from tenants.services import budget_create

pytestmark = pytest.mark.django_db(transaction=True)

USD = 10**9
CASES = [
    pytest.param("demo/small", False, id="plain"),
    pytest.param("demo/small", True, id="plain-stream"),
    pytest.param("cascade/balanced", False, id="cascade"),
    pytest.param("cascade/balanced", True, id="cascade-stream"),
]


@pytest.fixture(autouse=True)
def spool_dir(tmp_path, settings):
    settings.CASCADEFLOW_SPOOL_DIR = str(tmp_path / "spool")
    ledger_spool.cache_clear()
    yield tmp_path / "spool"
    ledger_spool.cache_clear()


@sync_to_async
def refuse_ledger_inserts(on: bool) -> None:
    with connection.cursor() as cursor:
        if connection.vendor == "postgresql":
            if on:
                cursor.execute(
                    "CREATE OR REPLACE FUNCTION cf_refuse() RETURNS trigger AS $$ BEGIN "
                    "RAISE EXCEPTION 'ledger unavailable'; END $$ LANGUAGE plpgsql"
                )
                cursor.execute(
                    "CREATE TRIGGER cf_refuse BEFORE INSERT ON routing_usageevent "
                    "FOR EACH ROW EXECUTE FUNCTION cf_refuse()"
                )
            else:
                cursor.execute("DROP TRIGGER IF EXISTS cf_refuse ON routing_usageevent")
        elif on:
            # A failure of the database, not of the row (RAISE(ABORT) would be a constraint's
            # IntegrityError): a function SQLite does not have, called at insert time.
            cursor.execute(
                "CREATE TRIGGER cf_refuse BEFORE INSERT ON routing_usageevent "
                "BEGIN SELECT cf_ledger_unavailable(); END"
            )
        else:
            cursor.execute("DROP TRIGGER IF EXISTS cf_refuse")


async def post(token, model, stream, content="What is 12 * (3 + 4)?"):
    body = {"model": model, "messages": [{"role": "user", "content": content}], "stream": stream}
    return await AsyncClient().post(
        "/v1/chat/completions",
        data=json.dumps(body),
        content_type="application/json",
        headers={"Authorization": f"Bearer {token}"},
    )


async def read(response) -> str:
    if response.streaming:
        return b"".join([chunk async for chunk in response.streaming_content]).decode()
    return response.content.decode()


replay = sync_to_async(replay_task)


@sync_to_async
def budget_state(budget):
    counter = BudgetCounter.objects.get(budget=budget)
    states = sorted(BudgetReservation.objects.values_list("state", flat=True))
    return counter.spent_nanos, counter.reserved_nanos, states


@sync_to_async
def ledger_rows():
    return list(UsageEvent.objects.order_by("id"))


@sync_to_async
def tenant_budget(tenant):
    return budget_create(
        tenant=tenant, scope=BudgetScope.TENANT, period=BudgetPeriod.MONTH, limit_nanos=USD
    )


async def spooled(token, n: int) -> list:
    """``n`` answered requests whose ledger rows the database refused: all spooled."""
    await refuse_ledger_inserts(True)
    try:
        return [await post(token, "demo/small", False) for _ in range(n)]
    finally:
        await refuse_ledger_inserts(False)


def spool_rewritten(spool_dir, change) -> list[dict]:
    """The process's spool file, each record passed through ``change(index, record)``."""
    [path] = spool_dir.glob("ledger-*.jsonl")
    records = [json.loads(line) for line in path.read_text().splitlines()]
    for index, record in enumerate(records):
        change(index, record)
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return records


@pytest.mark.parametrize(("model", "stream"), CASES)
async def test_paid_answer_survives_a_failed_ledger_write(api_token, tenant, model, stream):
    budget = await tenant_budget(tenant)
    await refuse_ledger_inserts(True)
    try:
        response = await post(api_token.raw, model, stream)
        text = await read(response)
    finally:
        await refuse_ledger_inserts(False)

    # The client has its whole answer.
    assert response.status_code == 200
    if stream:
        assert text.rstrip().endswith("data: [DONE]")
        assert '"error"' not in text
        assert "84" in "".join(
            json.loads(line[6:])["choices"][0]["delta"].get("content") or ""
            for line in text.splitlines()
            if line.startswith("data: {") and json.loads(line[6:])["choices"]
        )
    else:
        assert "84" in json.loads(text)["choices"][0]["message"]["content"]
    # Nothing reached the ledger; the row waits in the spool, its reservation still held.
    assert await ledger_rows() == []
    [spooled] = list(ledger_spool().records())
    assert spooled["row"]["request_id"] == response["x-request-id"]
    assert (await budget_state(budget))[2] == ["held"]

    # The database takes writes again: the beat task writes the row and settles it, once.
    assert await replay() == {"applied": 1, "pending": 0, "files": 1, "rejected": 0}
    assert await replay() == {"applied": 0, "pending": 0, "files": 0, "rejected": 0}
    [event] = await ledger_rows()
    assert event.request_id == response["x-request-id"]
    assert event.cost_nanos == spooled["row"]["cost_nanos"] > 0
    assert event.status == "ok" and event.stream is stream
    assert await budget_state(budget) == (event.cost_nanos, 0, ["settled"])
    assert list(ledger_spool().records()) == []


async def test_the_next_successful_write_drains_what_this_process_spooled(api_token, tenant):
    budget = await tenant_budget(tenant)
    failed = await spooled(api_token.raw, 3)
    assert len(list(ledger_spool().records())) == 3

    ok = await post(api_token.raw, "demo/small", False)

    rows = await ledger_rows()
    assert sorted(e.request_id for e in rows) == sorted(r["x-request-id"] for r in [*failed, ok])
    spent, reserved, states = await budget_state(budget)
    assert (spent, reserved) == (sum(e.cost_nanos for e in rows), 0)
    assert states == ["settled"] * 4
    assert list(ledger_spool().records()) == []


async def test_a_replay_interrupted_half_way_applies_nothing_twice(api_token, tenant):
    budget = await tenant_budget(tenant)
    await refuse_ledger_inserts(True)
    try:
        for _ in range(2):
            await post(api_token.raw, "demo/small", False)
        from routing.services import ledger_replay

        calls = []

        def fail_second(record):
            calls.append(record)
            if len(calls) == 2:
                raise RuntimeError("database gone again")
            with connection.cursor() as cursor:  # the first one gets through
                cursor.execute(
                    "DROP TRIGGER IF EXISTS cf_refuse"
                    + (" ON routing_usageevent" if connection.vendor == "postgresql" else "")
                )
            ledger_replay(record)

        report = await sync_to_async(ledger_spool().replay)(fail_second)
    finally:
        await refuse_ledger_inserts(False)
    assert (report.applied, report.pending) == (1, 1)

    # The claimed file still holds both; the first is skipped by its request id.
    assert await replay() == {"applied": 2, "pending": 0, "files": 1, "rejected": 0}
    rows = await ledger_rows()
    assert len(rows) == 2
    assert await budget_state(budget) == (sum(e.cost_nanos for e in rows), 0, ["settled"] * 2)


async def test_an_unexpected_failure_mid_stream_ends_with_an_error_event(
    api_token, tenant, monkeypatch
):
    budget = await tenant_budget(tenant)
    from routing import gateway

    original, calls = gateway._sse, []

    def broken(data):
        calls.append(data)
        if len(calls) == 3:  # a few chunks are out when something breaks
            raise RuntimeError("boom")
        return original(data)

    monkeypatch.setattr(gateway, "_sse", broken)
    response = await post(api_token.raw, "demo/small", True)
    text = await read(response)

    assert response.status_code == 200
    last = [line for line in text.splitlines() if line.startswith("data: ")][-1]
    error = json.loads(last[6:])["error"]
    assert error["code"] == "internal_error" and error["type"] == "api_error"
    assert "Traceback" not in text and "boom" not in text
    [event] = await ledger_rows()
    assert event.status == "internal_error" and event.http_status == 500
    assert event.cost_nanos > 0  # the upstream call was paid for, and is counted
    assert await budget_state(budget) == (event.cost_nanos, 0, ["settled"])


async def test_an_unexpected_failure_after_an_upstream_call_is_recorded_and_settled(
    api_token, tenant, monkeypatch
):
    budget = await tenant_budget(tenant)
    original = CascadeAgent._result

    def broken(self, *args, **kwargs):
        raise RuntimeError("boom")

    monkeypatch.setattr(CascadeAgent, "_result", broken)
    response = await post(api_token.raw, "demo/small", False)
    monkeypatch.setattr(CascadeAgent, "_result", original)

    assert response.status_code == 500
    error = json.loads(response.content)["error"]
    assert error["code"] == "internal_error" and "boom" not in error["message"]
    [event] = await ledger_rows()
    assert event.status == "internal_error"
    assert event.cost_nanos > 0 and event.models_called == ["demo/small"]
    assert await budget_state(budget) == (event.cost_nanos, 0, ["settled"])


async def test_a_reservation_made_just_before_the_database_went_away_is_freed_when_it_is_back(
    api_token, tenant, monkeypatch
):
    """Admission committed, then the connection was lost: a 503, and no reservation left held."""
    from django.db import OperationalError

    from routing import enforcement

    budget = await tenant_budget(tenant)
    tenant.budget_callback_url = "https://decide.example/"
    await tenant.asave(update_fields=["budget_callback_url"])

    def lost(*args, **kwargs):
        raise OperationalError("server closed the connection unexpectedly")

    monkeypatch.setattr(enforcement, "_callback_question", lost)
    response = await post(api_token.raw, "demo/small", False)

    assert response.status_code == 503
    assert json.loads(response.content)["error"]["code"] == "service_unavailable"
    assert int(response["Retry-After"]) > 0
    spent, reserved, states = await budget_state(budget)
    assert (spent, states) == (0, ["held"]) and reserved > 0
    [spooled] = list(ledger_spool().records())
    assert spooled["release"]["reservation_key"] == response["x-request-id"]

    assert await replay() == {"applied": 1, "pending": 0, "files": 1, "rejected": 0}
    assert await budget_state(budget) == (0, 0, ["settled"])
    assert await ledger_rows() == []


# A spooled record the database refuses for what it holds: no retry can write it.
POISON = {
    "a negative cost": lambda row: row.update(cost_nanos=-5),
    "a negative baseline": lambda row: row.update(baseline_cost_nanos=-1),
    "no request id": lambda row: row.update(request_id=None),
    "a tenant that is gone": lambda row: row.update(tenant=987_654_321),
}


@pytest.mark.parametrize("poison", POISON.values(), ids=POISON.keys())
async def test_a_record_the_database_refuses_is_set_aside_and_the_rest_written(
    api_token, tenant, spool_dir, poison
):
    budget = await tenant_budget(tenant)
    responses = await spooled(api_token.raw, 3)
    # The middle one: one good record before it, one after.
    records = spool_rewritten(spool_dir, lambda i, r: i == 1 and poison(r["row"]))

    report = await replay()

    assert report == {"applied": 2, "pending": 0, "files": 1, "rejected": 1}
    rows = await ledger_rows()
    ids = [r["x-request-id"] for r in responses]
    assert sorted(e.request_id for e in rows) == sorted([ids[0], ids[2]])
    [aside] = list(ledger_spool().rejected())
    assert aside["record"] == records[1] and aside["error"]
    assert list(ledger_spool().records()) == []  # nothing left waiting...
    assert not ledger_spool().dirty  # ...so no later write replays anything
    # The two written are settled; the refused one's reservation waits for an operator.
    spent, _, states = await budget_state(budget)
    assert spent == sum(e.cost_nanos for e in rows) and states.count("settled") == 2
    # A replay later finds nothing to do, and sets nothing aside twice.
    assert await replay() == {"applied": 0, "pending": 0, "files": 0, "rejected": 0}
    assert len(list(ledger_spool().rejected())) == 1


async def test_a_file_stopped_by_an_outage_after_a_refused_record_sets_it_aside_once(
    api_token, tenant, spool_dir
):
    from routing.services import ledger_replay

    await spooled(api_token.raw, 3)
    records = spool_rewritten(spool_dir, lambda i, r: i == 0 and r["row"].update(cost_nanos=-1))
    calls = []

    def outage_at_the_third(record):
        calls.append(record)
        if len(calls) == 3:
            raise RuntimeError("database gone again")
        ledger_replay(record)

    first = await sync_to_async(ledger_spool().replay)(outage_at_the_third)
    again = await replay()

    assert (first.applied, first.pending, first.rejected) == (1, 1, 1)
    assert again == {"applied": 2, "pending": 0, "files": 1, "rejected": 1}  # 2: skipped, 3
    assert len(await ledger_rows()) == 2
    [aside] = list(ledger_spool().rejected())  # once, though refused twice
    assert aside["record"] == records[0]
