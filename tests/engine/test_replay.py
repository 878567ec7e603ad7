"""The replay provider and the replay benchmark, on a small fixture the tests write."""

import json
import subprocess
import sys
from pathlib import Path

import litellm
import pytest

from routing.engine.agent import CascadeAgent
from routing.engine.resilience import Caller
from routing.providers import replay
from tests.support import replay_fixture

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture
def tiny(tmp_path):
    path = replay_fixture.write(tmp_path)
    file = replay.ReplayFile.load(path)
    replay.register(file)
    return path, file


async def test_replay_serves_recorded_text_tokens_logprob_and_cost(tiny):
    _, file = tiny
    row = file.rows[0]
    recorded = row["responses"][replay_fixture.CHEAP]

    response = await litellm.acompletion(
        model=f"replay/{replay_fixture.CHEAP}", messages=row["messages"], logprobs=True
    )

    assert response.choices[0].message.content == recorded["text"]
    assert response.usage.prompt_tokens == 40
    assert response.choices[0].logprobs["content"][0]["logprob"] == recorded["logprob"]
    # $0.1 / $0.4 per million: 40 * 100 + 6 * 400 nano-dollars
    assert response._hidden_params["cascadeflow_cost_nanos"] == 6400


async def test_replay_answers_self_verification_with_the_recorded_confidence(tiny):
    _, file = tiny
    spec = file.spec(replay_fixture.CHEAP)
    agent = CascadeAgent([spec, file.spec(replay_fixture.STRONG)], caller=Caller(retries=0))
    row = file.rows[3]

    from routing.engine.signals import Draft

    check = await agent._self_verify(
        row["messages"], Draft(content=row["responses"][replay_fixture.CHEAP]["text"])
    )

    assert check.value == pytest.approx(
        row["responses"][replay_fixture.CHEAP]["confidence"], abs=1e-6
    )
    assert check.cost_nanos == 1000  # confidence_cost_usd = $0.000001


async def test_replay_refuses_sampling(tiny):
    _, file = tiny
    with pytest.raises(litellm.BadRequestError):
        await litellm.acompletion(
            model=f"replay/{replay_fixture.CHEAP}",
            messages=file.rows[0]["messages"],
            temperature=0.8,
        )


def test_benchmark_reports_a_stable_json_shape(tiny, tmp_path):
    path, _ = tiny
    out = tmp_path / "result.json"
    chain = ",".join([replay_fixture.CHEAP, replay_fixture.MID, replay_fixture.STRONG])

    done = subprocess.run(
        [
            sys.executable,
            "bench/cascade_replay.py",
            str(path),
            "--chain",
            chain,
            "--target-retention",
            "0.9",
            "--json",
            str(out),
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )

    assert done.returncode == 0, done.stderr[-2000:]
    result = json.loads(out.read_text())
    for policy in ("engine", "always_cheap", "always_strong", "oracle"):
        # retention is a ratio to the strongest model and may pass 1 (the oracle's does)
        assert result[policy]["retention"] >= 0.0
        assert result[policy]["saving"] <= 1.0
        assert 0.0 <= result[policy]["escalation_rate"] <= 1.0
    assert set(result["engine"]) >= {"retention", "saving", "escalation_rate", "auroc", "threshold"}
    assert result["always_strong"]["retention"] == 1.0
    assert result["always_strong"]["saving"] == 0.0
    assert result["oracle"]["retention"] >= result["always_cheap"]["retention"]
    assert len(result["calibration"]["steps"]) == 2  # three models: two escalation steps
    assert result["pareto"] and all(
        {"threshold", "retention", "saving"} <= set(p) for p in result["pareto"]
    )
    assert result["engine"]["auroc"] > 0.6  # the fixture's logprob and confidence are informative
    assert "CascadeFlow engine" in done.stdout


@pytest.mark.parametrize("separator", ["\u2028", "\u2029", "\x85"], ids=repr)
def test_jsonl_records_split_on_newline_only(tmp_path, separator):
    """Characters str.splitlines() treats as line ends, and JSON allows unescaped in a
    string, stay inside their record."""
    path = replay_fixture.write(tmp_path)
    rows = [json.loads(line) for line in path.read_text(encoding="utf-8").split("\n") if line]
    text = f"first part{separator}second part"
    rows[0]["responses"][replay_fixture.CHEAP]["text"] = text
    path.write_text(
        "\n".join(json.dumps(r, ensure_ascii=False) for r in rows) + "\n", encoding="utf-8"
    )
    assert separator in path.read_text(encoding="utf-8")  # written raw, not escaped

    file = replay.ReplayFile.load(path)

    assert len(file.rows) == len(rows)
    assert file.rows[0]["responses"][replay_fixture.CHEAP]["text"] == text


def test_online_benchmark_learns_a_three_model_chain_from_zero_labels(tmp_path):
    """Live traffic for a new profile: certified from its own audits, at target on the stream."""
    path = replay_fixture.write(tmp_path, n=700)
    out = tmp_path / "online.json"
    chain = ",".join([replay_fixture.CHEAP, replay_fixture.MID, replay_fixture.STRONG])

    # The fixture's prompts are a few tokens: a judge call costs more than an answer, so the
    # audit budget is lifted here and the saving checked before audits.
    arguments = ["--chain", chain, "--seed", "3", "--warm", "300", "--audit-cap", "100"]
    arguments += ["--explain", "--json", str(out)]
    done = subprocess.run(
        [sys.executable, "bench/cascade_online.py", str(path), *arguments],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )

    assert done.returncode == 0, done.stderr[-2000:]
    result = json.loads(out.read_text())
    keys = {"retention", "saving", "steady_retention", "steady_saving", "audits"}
    assert keys | {"audit_cost_share", "routed_past_draft"} <= set(result)
    assert result["retention"] >= 0.95  # cold start included
    assert result["steady_retention"] >= 0.95
    # The fixture's logprobs are informative: drafts are served once certified.
    assert result["steady_saving"] + result["steady_audit_cost_share"] > 0.3
    assert result["promotions"], "never certified"
    first = result["promotions"][0]
    assert first["held_out_loss_upper_bound"] <= 0.05
    assert 0 < result["audits"] < result["requests"]
    # --explain: each family's candidates in testing order, strict to permissive; those the
    # fixed sequence reached are a prefix, passing up to its first failure.
    assert set(result["sequences"]) == {"prior", "fitted"}
    for rows in result["sequences"].values():
        thresholds = [r["threshold"] for r in rows]
        assert thresholds == sorted(thresholds, reverse=True)
        reached = [r for r in rows if r["reached"]]
        assert rows[: len(reached)] == reached
        assert all(r["passes"] for r in reached[:-1])
        assert all(r["p_value"] <= 1 and 0 <= r["acceptance"] <= 1 for r in rows)
    assert any(r["passes"] for rows in result["sequences"].values() for r in rows)
