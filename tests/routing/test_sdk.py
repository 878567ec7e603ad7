"""The official OpenAI SDK against CascadeFlow running under uvicorn.

Runs once against a server on SQLite and once on PostgreSQL; each call's
ledger row is read back from that server's database.
"""

import openai
import pytest

from tests.support.fake_upstream import Behaviour


@pytest.fixture
def client(cascadeflow_server):
    return cascadeflow_server.openai_client()


def ledger_row(cascadeflow_server, request_id):
    rows = cascadeflow_server.query(
        "SELECT status, http_status, stream, prompt_tokens, completion_tokens, cost_nanos, model "
        "FROM routing_usageevent WHERE request_id = %s",
        (request_id,),
    )
    assert len(rows) == 1, rows
    return rows[0]


def test_sdk_completion_is_answered_and_recorded(cascadeflow_server, client):
    raw = client.chat.completions.with_raw_response.create(
        model="demo/large",
        messages=[{"role": "user", "content": "What is 7 * 6?"}],
        user="sdk-user",
    )
    completion = raw.parse()

    assert completion.choices[0].message.content.endswith("The answer is 42.")
    assert completion.model == "demo/large"
    request_id = raw.headers["x-request-id"]
    assert raw.headers["x-cascade-model"] == "demo/large"
    status, http_status, stream, prompt, output, cost, model = ledger_row(
        cascadeflow_server, request_id
    )
    assert (status, http_status, model) == ("ok", 200, "demo/large")
    assert not stream
    assert (prompt, output) == (completion.usage.prompt_tokens, completion.usage.completion_tokens)
    assert cost == prompt * 5_000 + output * 15_000  # $5 / $15 per million tokens


def test_sdk_stream_is_relayed_and_recorded(cascadeflow_server, client):
    with client.chat.completions.with_streaming_response.create(
        model="demo/small",
        messages=[{"role": "user", "content": "Tell me about lighthouses"}],
        stream=True,
        stream_options={"include_usage": True},
    ) as response:
        request_id = response.headers["x-request-id"]
        chunks = list(response.parse())

    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert "lighthouses" in text
    assert chunks[-1].usage is not None
    status, _, stream, prompt, output, _, _ = ledger_row(cascadeflow_server, request_id)
    assert status == "ok" and stream
    assert (prompt, output) == (chunks[-1].usage.prompt_tokens, chunks[-1].usage.completion_tokens)


def test_sdk_bad_token_is_an_authentication_error(cascadeflow_server):
    client = openai.OpenAI(
        base_url=f"{cascadeflow_server.base_url}/v1", api_key="cf_nope", max_retries=0
    )

    with pytest.raises(openai.AuthenticationError) as caught:
        client.chat.completions.create(
            model="demo/small", messages=[{"role": "user", "content": "hi"}]
        )

    assert caught.value.status_code == 401
    assert caught.value.code == "invalid_api_key"
    assert caught.value.response.headers["x-request-id"].startswith("req_")


def test_sdk_upstream_failure_is_a_502_and_recorded(cascadeflow_server, client, upstream):
    upstream.behaviours["failing"] = Behaviour(fail_status=500)

    with pytest.raises(openai.APIStatusError) as caught:
        client.chat.completions.create(
            model="fake/failing", messages=[{"role": "user", "content": "hi"}]
        )

    assert caught.value.status_code == 502
    request_id = caught.value.response.headers["x-request-id"]
    status, http_status, *_ = ledger_row(cascadeflow_server, request_id)
    assert (status, http_status) == ("upstream_error", 502)


def test_sdk_models_lists_the_demo_models(client):
    ids = [m.id for m in client.models.list()]

    assert "cascade/balanced" in ids
    assert {"demo/small", "demo/medium", "demo/large"} <= set(ids)


def test_oversized_body_is_refused_by_the_server(cascadeflow_server):
    import httpx

    response = httpx.post(
        f"{cascadeflow_server.base_url}/v1/chat/completions",
        content=b"x" * (4 * 1024 * 1024 + 1),
        headers={
            "Authorization": f"Bearer {cascadeflow_server.token}",
            "Content-Type": "application/json",
        },
        timeout=30,
    )

    assert response.status_code == 413
    assert response.json()["error"]["code"] == "request_too_large"
    assert response.headers["x-request-id"].startswith("req_")
