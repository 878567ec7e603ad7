"""The engine's own CPU per quality check: draft -> features -> score -> decision.

Run from the repository root with the project's virtualenv::

    .venv/bin/python bench/cascade_overhead.py --json bench/results/cascade_overhead.json

What one check is: ``CascadeAgent.judge`` on one draft, as the cascade calls it
after a draft model answered (``routing/engine/agent.py``): the draft read out
of the provider's response (``_draft_of``: content, finish reason, tool calls,
token log-probabilities, usage), every free signal of ``signals.extract``
(hedges, second-guessing, refusals, the format validator for JSON / schema /
Python code, re-computed arithmetic, the final answer, the query's numbers,
length), the logistic ``Scorer`` and the threshold, and the ``Check`` record
with its reasons and per-signal contributions. The query's profile
(``CascadeAgent.plan``: domain and complexity, once per request, before the
first draft) is timed beside it, and both together as "per request".

Drafts are recorded answers, read from the replay files in ``../shared/data``
(``--data-dir``; never copied into the project): GSM8K and MT-Bench turn-1
answers of Mixtral 8x7B and GPT-4, each with the question it answered. Four
kinds of query:

- ``math``: GSM8K answers and MT-Bench's math category (111-120);
- ``code``: MT-Bench's coding category (121-130): fenced code, Python blocks
  parsed by the format validator;
- ``plain``: every other MT-Bench category except extraction (writing,
  role-play, reasoning, STEM, humanities);
- ``json``: structured output: ``response_format`` ``json_schema`` (an object
  holding an array of ``{id, question, answer}`` records), the draft a JSON
  document of recorded answers, so the check parses it and validates it
  against the schema. The query is one of MT-Bench's extraction questions
  that ask for JSON (131, 135, 137, 139).

Sizes: about 100, 500 and 2,000 tokens (cl100k, the tokenizer LiteLLM ships),
each draft within +-10 % of its size. A recorded answer of the right length is
taken as it is; otherwise recorded answers of the same kind are joined (a blank
line between them) until the size is reached, and the result is trimmed back at
a line boundary (a code fence left open is closed, and a cut that leaves a
Python block unparseable moves up a line), or, for JSON, the last record's
answer is cut at a word. ``--drafts`` drafts per kind and size (default 8).

Log-probabilities: the recorded data has none, so every draft is checked twice,
without them and with synthetic ones, in the shape an OpenAI-wire upstream
returns when the draft is asked with ``logprobs: true`` (the engine asks for
them where the model supports them): ``choices[0].logprobs.content``, one
``{token, logprob, bytes, top_logprobs: []}`` per cl100k token of the draft,
parsed into LiteLLM's ``ModelResponse`` as the gateway's OpenAI-wire client
does (``openai_wire.parse_completion``, where the engine has it). The values are
drawn from a fixed-seed generator: 85 % of tokens near certainty (-Exp(mean 0.02)),
15 % uncertain (-Exp(mean 1.5)).

The engine: a two-model chain (draft model with logprobs, strong model),
preset ``balanced``, first step scored by the shipped public prior
(``routing/engine/prior.json``, ``learning.public_prior``) with the preset's
default threshold, free signals only (paid checks call a model: network time,
not the engine's CPU). Tracing off, as deployed by default.

Timing: ``time.perf_counter_ns`` (wall time) and ``time.thread_time_ns`` (this thread's
CPU time) around each check, in this process, one sample per check; the query profile is
timed before it with ``perf_counter_ns``. On a shared machine the wall time also holds the
time the kernel gave other processes mid-check; the CPU time is the engine's own. The
coroutine of ``judge`` is driven by hand (it never waits on anything with free checks
only), so no event loop time is counted. After ``--warmup`` rounds, ``--rounds`` rounds
each time every case once (kinds, sizes, drafts, with and without logprobs) in a
shuffled order fixed by the seed, so machine noise falls on every case alike. The
garbage collector is on, with its default thresholds, as in the gateway; the
collections that ran during the measured rounds are counted in the report (``--no-gc``
turns it off for a comparison).

Target: p99 <= 1 ms per check, at every size.

Other modes:

- ``--profile``: cProfile of the checks of one size (``--profile-size``) instead
  of timing them; prints the top functions by cumulative and own time.
- ``--decisions OUT``: no timing; writes every decision (probability before and
  after rounding, threshold, accepted, hard failure, features, contributions,
  reasons, extracted answer) on every recorded answer of both files, with and
  without logprobs, plus every benchmark draft, as JSON.
- ``--ref REF``: the same timing, on the engine of git ref REF (``git archive`` of the
  project to a temporary directory): the figures before a change, from the same drafts.
- ``--compare-ref REF``: ``--decisions`` with the engine of the working tree and
  with the engine of git ref REF (``git archive`` of ``routing/`` to a temporary
  directory), then compares them; exit status 1 on any difference. The proof
  that a speed-up changed no decision and no score.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import functools
import gc
import hashlib
import io
import json
import math
import os
import platform
import random
import subprocess
import sys
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

os.environ["LITELLM_LOCAL_MODEL_COST_MAP"] = "True"

from benchenv import exported

REPO = Path(__file__).resolve().parent.parent
DEFAULT_DATA = REPO.parent / "shared" / "data"
SIZES = (100, 500, 2000)
KINDS = ("math", "code", "plain", "json")
TOLERANCE = 0.10  # a draft of size S has between 0.9 S and 1.1 S tokens
TARGET_P99_MS = 1.0
JSON_QUERIES = (131, 135, 137, 139)  # MT-Bench extraction questions that ask for JSON
JSON_SCHEMA = {
    "type": "object",
    "properties": {
        "answers": {
            "type": "array",
            "items": {
                "type": "object",
                "properties": {
                    "id": {"type": "string"},
                    "question": {"type": "string"},
                    "answer": {"type": "string"},
                },
                "required": ["id", "answer"],
                "additionalProperties": False,
            },
        }
    },
    "required": ["answers"],
}
JSON_PARAMS = {
    "max_tokens": 4096,
    "response_format": {
        "type": "json_schema",
        "json_schema": {"name": "answers", "strict": True, "schema": JSON_SCHEMA},
    },
}
TEXT_PARAMS = {"max_tokens": 4096}


def engine_root() -> Path:
    """Where ``routing`` is imported from: the working tree, or ``--engine-root``."""
    for i, arg in enumerate(sys.argv):
        if arg == "--engine-root" and i + 1 < len(sys.argv):
            return Path(sys.argv[i + 1]).resolve()
        if arg.startswith("--engine-root="):
            return Path(arg.split("=", 1)[1]).resolve()
    return REPO


sys.path.insert(0, str(engine_root()))

import litellm  # noqa: E402

from routing.engine import learning, openai_wire  # noqa: E402
from routing.engine.agent import CascadeAgent, draft_signals  # noqa: E402
from routing.engine.calibration import Scorer  # noqa: E402
from routing.engine.jsonl import read_jsonl  # noqa: E402
from routing.engine.policy import Calibration, StepCalibration  # noqa: E402
from routing.engine.types import ModelSpec  # noqa: E402

TOKENIZER_MODEL = "gpt-4"  # cl100k_base, shipped with LiteLLM (no download)


# =====================================================================================
# Drafts from the recorded answers
# =====================================================================================


@functools.lru_cache(maxsize=1)
def tokenizer() -> Any:
    """cl100k_base (tiktoken), as LiteLLM ships it for TOKENIZER_MODEL: no download."""
    from litellm.utils import select_tokenizer

    return select_tokenizer(model=TOKENIZER_MODEL)["tokenizer"]


def encode(text: str) -> list[int]:
    return list(tokenizer().encode(text, disallowed_special=()))


def n_tokens(text: str) -> int:
    return len(encode(text))


@dataclass(frozen=True)
class Answer:
    source: str  # file:row id:model
    kind: str
    query: str
    text: str
    tokens: int


@dataclass
class Case:
    kind: str
    size: int
    logprobs: bool
    name: str  # what the draft was made of
    messages: list[dict[str, Any]]
    params: dict[str, Any]
    response: Any  # litellm.ModelResponse, as the OpenAI-wire client builds it
    tokens: int
    samples_ns: list[int] = field(default_factory=list)  # wall time of each check
    cpu_ns: list[int] = field(default_factory=list)  # this thread's CPU time of each check
    plan_ns: list[int] = field(default_factory=list)


def mt_bench_kind(row_id: str) -> str:
    qid = int(row_id.split("-")[1])
    if 111 <= qid <= 120:
        return "math"
    if 121 <= qid <= 130:
        return "code"
    if 131 <= qid <= 140:
        return "extraction"
    return "plain"


def recorded_answers(data_dir: Path) -> tuple[list[Answer], dict[int, str]]:
    """Every recorded answer with its question and kind; and the JSON-asking questions."""
    answers: list[Answer] = []
    json_queries: dict[int, str] = {}
    for name in ("routellm_gsm8k.jsonl", "routellm_mt_bench.jsonl"):
        path = data_dir / name
        if not path.exists():
            raise SystemExit(f"{path} not found: pass --data-dir (see ../shared/data/README.md)")
        for row in read_jsonl(path):
            query = (row.get("messages") or [{}])[0].get("content") or ""
            kind = "math" if row["task"] == "gsm8k" else mt_bench_kind(row["id"])
            if kind == "extraction":
                qid = int(row["id"].split("-")[1])
                if qid in JSON_QUERIES:
                    json_queries[qid] = query
            for model, response in sorted(row["responses"].items()):
                text = response.get("text")
                if text:
                    answers.append(
                        Answer(f"{name}:{row['id']}:{model}", kind, query, text, n_tokens(text))
                    )
    return answers, json_queries


def in_band(tokens: int, size: int) -> bool:
    return (1 - TOLERANCE) * size <= tokens <= (1 + TOLERANCE) * size


def python_blocks_parse(text: str) -> bool:
    import ast
    import re

    for lang, code in re.findall(r"```(\w*)\n(.*?)```", text, re.DOTALL):
        if lang.lower() in {"python", "py"}:
            try:
                ast.parse(code)
            except SyntaxError:
                return False
    return True


def trim_lines(text: str, size: int) -> str | None:
    """The longest prefix of whole lines within the size band (fences closed, code parsing)."""
    lines = text.split("\n")
    # Token counts grow with the prefix: binary-search the last prefix <= the band's top.
    low, high = 1, len(lines)
    top = (1 + TOLERANCE) * size
    while low < high:
        mid = (low + high + 1) // 2
        if n_tokens("\n".join(lines[:mid])) <= top:
            low = mid
        else:
            high = mid - 1
    for end in range(low, 0, -1):
        prefix = "\n".join(lines[:end]).rstrip()
        if prefix.count("```") % 2:
            prefix += "\n```"
        tokens = n_tokens(prefix)
        if tokens < (1 - TOLERANCE) * size:
            return None
        if tokens <= top and python_blocks_parse(prefix):
            return prefix
    return None


def text_drafts(pool: list[Answer], size: int, count: int) -> list[tuple[str, str, str]]:
    """(name, query, text) drafts of ``size`` tokens: recorded answers of that length first,
    then recorded answers joined (and trimmed) to reach it."""
    out: list[tuple[str, str, str]] = []
    singles = [a for a in pool if in_band(a.tokens, size)]
    step = max(1, len(singles) // count) if singles else 1
    for a in singles[::step][:count]:
        out.append((a.source, a.query, a.text))
    order = list(range(len(pool)))
    random.Random(f"join-{size}-{pool[0].kind}").shuffle(order)
    start = 0
    while len(out) < count and start < len(order):
        parts: list[Answer] = []
        tokens = 0
        for i in order[start:] + order[:start]:
            parts.append(pool[i])
            tokens += pool[i].tokens
            if tokens >= (1 - TOLERANCE) * size:
                break
        start += 1
        text = "\n\n".join(p.text.strip() for p in parts)
        real = n_tokens(text)
        if not in_band(real, size):
            if real < (1 - TOLERANCE) * size:
                continue
            trimmed = trim_lines(text, size)
            if trimmed is None:
                continue
            text = trimmed
        name = "+".join(p.source.split(":", 1)[1] for p in parts)
        out.append((f"joined {len(parts)}: {name}", parts[0].query, text))
    return out


def json_drafts(pool: list[Answer], size: int, count: int) -> list[tuple[str, str]]:
    """(name, text) JSON documents of ``size`` tokens that match JSON_SCHEMA."""
    out: list[tuple[str, str]] = []
    order = list(range(len(pool)))
    random.Random(f"json-{size}").shuffle(order)
    start = 0
    top = (1 + TOLERANCE) * size
    while len(out) < count and start < len(order):
        records: list[dict[str, str]] = []
        for i in order[start:]:
            start += 1
            a = pool[i]
            record = {"id": a.source.split(":")[1], "question": a.query[:200], "answer": a.text}
            text = json.dumps({"answers": [*records, record]}, indent=2, ensure_ascii=False)
            if n_tokens(text) <= top:
                records.append(record)
                if n_tokens(text) >= (1 - TOLERANCE) * size:
                    break
                continue
            # Too long with this record whole: cut its answer at a word to land in the band.
            words = a.text.split(" ")
            low, high = 0, len(words)
            while low < high:
                mid = (low + high + 1) // 2
                cut = {**record, "answer": " ".join(words[:mid])}
                body = json.dumps({"answers": [*records, cut]}, indent=2, ensure_ascii=False)
                if n_tokens(body) <= top:
                    low = mid
                else:
                    high = mid - 1
            records.append({**record, "answer": " ".join(words[:low])})
            break
        text = json.dumps({"answers": records}, indent=2, ensure_ascii=False)
        if records and in_band(n_tokens(text), size):
            out.append((f"{len(records)} records", text))
    return out


def synthetic_logprobs(text: str, seed: str) -> list[dict[str, Any]]:
    """One OpenAI logprob entry per cl100k token of ``text`` (values from a fixed seed)."""
    rng = random.Random(seed)
    content = []
    for token in encode(text):
        raw = tokenizer().decode_single_token_bytes(token)
        if rng.random() < 0.85:
            lp = -rng.expovariate(1 / 0.02)
        else:
            lp = -rng.expovariate(1 / 1.5)
        content.append(
            {
                "token": raw.decode("utf-8", errors="replace"),
                "logprob": lp,
                "bytes": list(raw),
                "top_logprobs": [],
            }
        )
    return content


def model_response(text: str, *, logprobs: bool, seed: str, prompt_tokens: int) -> Any:
    """The draft as the gateway's OpenAI-wire client hands it to the engine."""
    tokens = n_tokens(text)
    choice: dict[str, Any] = {
        "index": 0,
        "message": {"role": "assistant", "content": text},
        "finish_reason": "stop",
    }
    if logprobs:
        choice["logprobs"] = {"content": synthetic_logprobs(text, seed)}
    data = {
        "id": f"chatcmpl-bench-{hashlib.sha256(seed.encode()).hexdigest()[:12]}",
        "object": "chat.completion",
        "created": 1767225600,
        "model": "bench-draft",
        "choices": [choice],
        "usage": {
            "prompt_tokens": prompt_tokens,
            "completion_tokens": tokens,
            "total_tokens": prompt_tokens + tokens,
        },
    }
    parsed = json.loads(json.dumps(data))
    # The client's own parsing where the engine has it (it keeps the log-probabilities as
    # one array of floats beside LiteLLM's objects); LiteLLM's ModelResponse before.
    parse = getattr(openai_wire, "parse_completion", None)
    return parse(parsed) if parse is not None else litellm.ModelResponse(**parsed)


def build_cases(data_dir: Path, drafts: int) -> tuple[list[Case], dict[str, Any]]:
    answers, json_queries = recorded_answers(data_dir)
    pools = {k: [a for a in answers if a.kind == k] for k in ("math", "code", "plain")}
    json_pool = [a for a in answers if a.kind in {"plain", "code", "math"}]
    queries = [json_queries[q] for q in JSON_QUERIES if q in json_queries]
    made: dict[str, list[tuple[str, str, str, dict[str, Any]]]] = {}
    for size in SIZES:
        for kind in KINDS:
            if kind == "json":
                docs = json_drafts(json_pool, size, drafts)
                items = [
                    (name, queries[i % len(queries)], text, JSON_PARAMS)
                    for i, (name, text) in enumerate(docs)
                ]
            else:
                items = [
                    (name, query, text, TEXT_PARAMS)
                    for name, query, text in text_drafts(pools[kind], size, drafts)
                ]
            if len(items) < drafts:
                print(f"note: {kind} @ {size}: {len(items)} drafts (asked for {drafts})")
            made[f"{kind}@{size}"] = items
    cases: list[Case] = []
    for key, items in made.items():
        kind, size = key.split("@")
        for name, query, text, params in items:
            messages = [{"role": "user", "content": query}]
            for with_lp in (False, True):
                seed = f"{key}:{name}"
                response = model_response(
                    text, logprobs=with_lp, seed=seed, prompt_tokens=n_tokens(query)
                )
                cases.append(
                    Case(kind, int(size), with_lp, name, messages, params, response, n_tokens(text))
                )
    sources = {"answers": len(answers), "by_kind": {k: len(v) for k, v in pools.items()}}
    return cases, sources


# =====================================================================================
# The engine as the gateway runs it
# =====================================================================================


def make_agent() -> tuple[CascadeAgent, ModelSpec]:
    draft = ModelSpec.simple(
        "bench/draft",
        input_usd_per_mtok="0.15",
        output_usd_per_mtok="0.60",
        litellm_model="openai/bench-draft",
        supports_logprobs=True,
    )
    strong = ModelSpec.simple(
        "bench/strong",
        input_usd_per_mtok="2.50",
        output_usd_per_mtok="10.00",
        litellm_model="openai/bench-strong",
    )
    prior: Scorer = learning.public_prior()[0]
    calibration = Calibration(steps=[StepCalibration(scorer=prior)])
    return CascadeAgent([draft, strong], policy="balanced", calibration=calibration), draft


def drive(coro: Any) -> Any:
    """Run a coroutine that never waits (the free check) to its end, without an event loop."""
    try:
        coro.send(None)
    except StopIteration as done:
        return done.value
    coro.close()
    raise RuntimeError("the check waited on something: not a free check")


def check_once(agent: CascadeAgent, spec: ModelSpec, case: Case) -> Any:
    plan = agent.plan(case.messages, case.params)
    return drive(
        agent.judge(
            plan=plan,
            spec=spec,
            response=case.response,
            messages=case.messages,
            params=case.params,
        )
    )


# =====================================================================================
# Timing
# =====================================================================================


def percentile(sorted_ns: list[int], q: float) -> float:
    """Nearest-rank percentile, in milliseconds."""
    if not sorted_ns:
        return float("nan")
    rank = max(1, math.ceil(q / 100 * len(sorted_ns)))
    return sorted_ns[rank - 1] / 1e6


def stats(values: Iterable[int]) -> dict[str, Any]:
    ordered = sorted(values)
    return {
        "n": len(ordered),
        "p50_ms": percentile(ordered, 50),
        "p99_ms": percentile(ordered, 99),
        "max_ms": ordered[-1] / 1e6 if ordered else float("nan"),
        "mean_ms": sum(ordered) / len(ordered) / 1e6 if ordered else float("nan"),
    }


def measure(
    agent: CascadeAgent, spec: ModelSpec, cases: list[Case], rounds: int, warmup: int, seed: int
) -> dict[str, Any]:
    order = list(range(len(cases)))
    random.Random(seed).shuffle(order)
    perf, cpu_clock = time.perf_counter_ns, time.thread_time_ns
    for _ in range(warmup):
        for i in order:
            check_once(agent, spec, cases[i])
    gc.collect()
    gc_before = [s["collections"] for s in gc.get_stats()]
    cpu0, wall0 = time.process_time_ns(), perf()
    for _ in range(rounds):
        for i in order:
            case = cases[i]
            t0 = perf()
            plan = agent.plan(case.messages, case.params)
            c1 = cpu_clock()
            t1 = perf()
            coro = agent.judge(
                plan=plan,
                spec=spec,
                response=case.response,
                messages=case.messages,
                params=case.params,
            )
            try:
                coro.send(None)
            except StopIteration:
                pass
            else:
                raise RuntimeError("the check waited on something: not a free check")
            t2 = perf()
            c2 = cpu_clock()
            case.plan_ns.append(t1 - t0)
            case.samples_ns.append(t2 - t1)
            case.cpu_ns.append(c2 - c1)
    cpu, wall = time.process_time_ns() - cpu0, perf() - wall0
    gc_after = [s["collections"] for s in gc.get_stats()]
    return {
        "process_cpu_s": cpu / 1e9,
        "wall_s": wall / 1e9,
        "gc_enabled": gc.isenabled(),
        "gc_thresholds": list(gc.get_threshold()),
        "gc_collections_during_run": [a - b for a, b in zip(gc_after, gc_before, strict=True)],
    }


def summarise(cases: list[Case]) -> dict[str, Any]:
    out: dict[str, Any] = {"by_size": {}, "by_kind": {}}
    for size in SIZES:
        of_size = [c for c in cases if c.size == size]
        row: dict[str, Any] = {}
        for label, chosen in (
            ("all", of_size),
            ("no_logprobs", [c for c in of_size if not c.logprobs]),
            ("logprobs", [c for c in of_size if c.logprobs]),
        ):
            row[label] = {
                "check": stats(v for c in chosen for v in c.samples_ns),
                "check_cpu": stats(v for c in chosen for v in c.cpu_ns),
                "plan": stats(v for c in chosen for v in c.plan_ns),
                "request": stats(
                    p + s for c in chosen for p, s in zip(c.plan_ns, c.samples_ns, strict=True)
                ),
                "drafts": len({c.name for c in chosen}),
                "tokens_min": min(c.tokens for c in chosen),
                "tokens_max": max(c.tokens for c in chosen),
            }
        out["by_size"][str(size)] = row
        for kind in KINDS:
            for lp in (False, True):
                chosen = [c for c in of_size if c.kind == kind and c.logprobs == lp]
                if chosen:
                    key = f"{kind}@{size}" + (" +lp" if lp else "")
                    out["by_kind"][key] = {
                        "wall": stats(v for c in chosen for v in c.samples_ns),
                        "cpu": stats(v for c in chosen for v in c.cpu_ns),
                    }
    return out


def profile(agent: CascadeAgent, spec: ModelSpec, cases: list[Case], rounds: int) -> str:
    import cProfile
    import pstats

    for case in cases:  # warm
        check_once(agent, spec, case)
    profiler = cProfile.Profile()
    profiler.enable()
    for _ in range(rounds):
        for case in cases:
            check_once(agent, spec, case)
    profiler.disable()
    buffer = io.StringIO()
    st = pstats.Stats(profiler, stream=buffer)
    st.sort_stats("cumulative").print_stats(30)
    st.sort_stats("tottime").print_stats(25)
    return buffer.getvalue()


# =====================================================================================
# Decisions (the equality proof)
# =====================================================================================


def decision_corpus(data_dir: Path, drafts: int) -> list[tuple[str, list[dict], dict, Any]]:
    """(name, messages, params, response): every recorded answer of both files, with and
    without logprobs, and every benchmark draft."""
    items: list[tuple[str, list[dict], dict, Any]] = []
    for name in ("routellm_gsm8k.jsonl", "routellm_mt_bench.jsonl"):
        for row in read_jsonl(data_dir / name):
            query = (row.get("messages") or [{}])[0].get("content") or ""
            messages = [{"role": "user", "content": query}]
            for model, recorded in sorted(row["responses"].items()):
                text = recorded.get("text")
                if text is None:
                    continue
                for with_lp in (False, True):
                    key = f"{name}:{row['id']}:{model}:{'lp' if with_lp else 'nolp'}"
                    response = model_response(
                        text, logprobs=with_lp, seed=key, prompt_tokens=n_tokens(query)
                    )
                    items.append((key, messages, TEXT_PARAMS, response))
    cases, _ = build_cases(data_dir, drafts)
    for i, c in enumerate(cases):
        key = f"bench:{i}:{c.kind}@{c.size}:{'lp' if c.logprobs else 'nolp'}:{c.name}"
        items.append((key, c.messages, c.params, c.response))
    return items


def decisions(data_dir: Path, drafts: int) -> dict[str, Any]:
    agent, spec = make_agent()
    out: dict[str, Any] = {}
    for key, messages, params, response in decision_corpus(data_dir, drafts):
        plan = agent.plan(messages, params)
        check = drive(
            agent.judge(plan=plan, spec=spec, response=response, messages=messages, params=params)
        )
        report = draft_signals(response, plan.query, params)
        scorer = plan.calibration.step(0).scorer
        out[key] = {
            "probability": check.probability,
            "threshold": check.threshold,
            "accepted": check.accepted,
            "hard_fail": check.hard_fail,
            "features": check.features,
            "contributions": check.contributions,
            "reasons": check.reasons,
            # Unrounded, to the last bit: the score, the features, and the extracted answer.
            "raw_probability": scorer.probability(dict(report.features)).hex(),
            "raw_features": {k: float(v).hex() for k, v in report.features.items()},
            "notes": report.notes,
            "answer": report.answer,
            "domain": plan.query.domain,
            "complexity": float(plan.query.complexity).hex(),
        }
    return out


def engine_commit() -> str:
    """The commit whose engine is timed: HEAD, or the one exported for ``--ref``."""
    if engine_root() == REPO:
        dirty = any(
            line[3:].startswith("routing/") for line in git("status", "--porcelain").splitlines()
        )
        return git("rev-parse", "HEAD") + (" + uncommitted changes" if dirty else "")
    return os.environ.get("CF_CHECKCOST_ENGINE_COMMIT", f"exported to {engine_root()}")


def git(*args: str) -> str:
    return subprocess.run(
        ["git", "-C", str(REPO), *args], capture_output=True, text=True, check=True
    ).stdout.rstrip()


def with_engine(root: Path, args: list[str]) -> int:
    """This script, run with the engine found in ``root``."""
    command = [sys.executable, str(Path(__file__).resolve()), "--engine-root", str(root), *args]
    env = {**os.environ, "CF_CHECKCOST_ENGINE_COMMIT": (root / ".commit").read_text()}
    return subprocess.run(command, cwd=REPO, check=False, env=env).returncode


def compare_ref(ref: str, data_dir: Path, drafts: int) -> int:
    with exported(ref) as (root, commit):
        theirs_path = root / "decisions.json"
        rc = with_engine(
            root,
            ["--data-dir", str(data_dir), "--drafts", str(drafts), "--decisions", str(theirs_path)],
        )
        if rc != 0:
            print(f"decisions at {ref} failed (exit {rc})", file=sys.stderr)
            return 2
        theirs = json.loads(theirs_path.read_text())
    ours = json.loads(json.dumps(decisions(data_dir, drafts)))
    differ = sorted(k for k in ours.keys() | theirs.keys() if ours.get(k) != theirs.get(k))
    accepted = sum(1 for v in ours.values() if v["accepted"])
    print(
        f"{len(ours)} checks compared (engine of the working tree vs {ref} = {commit[:12]}): "
        f"{len(differ)} differ; {accepted} accepted, {len(ours) - accepted} escalated."
    )
    digest = hashlib.sha256(json.dumps(ours, sort_keys=True).encode()).hexdigest()
    print(f"sha256 of every decision (working tree): {digest}")
    for key in differ[:10]:
        mine, other = ours.get(key) or {}, theirs.get(key) or {}
        print(f"  {key}:")
        for name in sorted(mine.keys() | other.keys()):
            if mine.get(name) != other.get(name):
                print(f"    {name}: {mine.get(name)!r} (working tree) vs {other.get(name)!r}")
    return 1 if differ else 0


# =====================================================================================
# Report
# =====================================================================================


def machine_info() -> dict[str, Any]:
    cpu_model = ""
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu_model = line.split(":", 1)[1].strip()
                break
    return {
        "cpus": os.cpu_count(),
        "cpu_model": cpu_model,
        "python": platform.python_version(),
        "loadavg_at_start": [round(x, 2) for x in os.getloadavg()],
    }


def report(data: dict[str, Any]) -> str:
    config, summary = data["config"], data["summary"]
    lines = [
        "One quality check (CascadeAgent.judge), ms: wall time (perf_counter_ns) and the "
        "thread's CPU time (thread_time_ns);",
        f"{config['rounds']} rounds x {config['cases']} cases after {config['warmup_rounds']} "
        "warm-up rounds. Query profile (plan, once per request) beside it.",
        "",
        "| size | tokens | logprobs | checks | wall p50 | wall p99 | wall max "
        "| CPU p50 | CPU p99 | CPU max | query profile p50 | request (both) p99 |",
        "|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for size, row in summary["by_size"].items():
        for label, name in (("no_logprobs", "absent"), ("logprobs", "present"), ("all", "both")):
            r = row[label]
            w, c = r["check"], r["check_cpu"]
            lines.append(
                f"| ~{size} | {r['tokens_min']}-{r['tokens_max']} | {name} | {w['n']} "
                f"| {w['p50_ms']:.3f} | {w['p99_ms']:.3f} | {w['max_ms']:.3f} "
                f"| {c['p50_ms']:.3f} | {c['p99_ms']:.3f} | {c['max_ms']:.3f} "
                f"| {r['plan']['p50_ms']:.3f} | {r['request']['p99_ms']:.3f} |"
            )
    lines += [
        "",
        "By kind (check only, ms):",
        "",
        "| kind @ size | wall p50 | wall p99 | CPU p50 | CPU p99 | CPU max |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for key, s in summary["by_kind"].items():
        w, c = s["wall"], s["cpu"]
        lines.append(
            f"| {key} | {w['p50_ms']:.3f} | {w['p99_ms']:.3f} "
            f"| {c['p50_ms']:.3f} | {c['p99_ms']:.3f} | {c['max_ms']:.3f} |"
        )
    run = data["run"]
    lines += [
        "",
        f"GC {'on' if run['gc_enabled'] else 'off'} (thresholds {run['gc_thresholds']}); "
        "collections during the measured rounds, per generation: "
        f"{run['gc_collections_during_run']}.",
        f"Process CPU {run['process_cpu_s']:.2f} s over {run['wall_s']:.2f} s wall "
        f"({run['process_cpu_s'] / run['wall_s']:.0%}: the rest is time the machine gave "
        "to other processes).",
    ]
    for clock in ("check", "check_cpu"):
        name = "wall time" if clock == "check" else "CPU time"
        per_size = "; ".join(
            f"~{size} tokens {'met' if r['all'][clock]['p99_ms'] <= TARGET_P99_MS else 'NOT met'}"
            f" ({r['all'][clock]['p99_ms']:.3f} ms, "
            f"{r['all'][clock]['p99_ms'] / TARGET_P99_MS:.2f}x the target)"
            for size, r in summary["by_size"].items()
        )
        lines.append(f"Target p99 <= {TARGET_P99_MS:g} ms per check, {name}: {per_size}.")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--data-dir", type=Path, default=DEFAULT_DATA)
    parser.add_argument("--drafts", type=int, default=8, help="drafts per kind and size")
    parser.add_argument("--rounds", type=int, default=64, help="measured rounds over every case")
    parser.add_argument("--warmup", type=int, default=3, help="warm-up rounds")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--no-gc", action="store_true", help="garbage collector off while timing")
    parser.add_argument("--json", type=Path, metavar="OUT", help="write every figure here")
    parser.add_argument("--profile", action="store_true", help="cProfile instead of timing")
    parser.add_argument("--profile-size", type=int, default=2000, choices=SIZES)
    parser.add_argument("--decisions", type=Path, metavar="OUT", help="write every decision")
    parser.add_argument("--compare-ref", metavar="REF", help="compare decisions with REF's engine")
    parser.add_argument("--ref", metavar="REF", help="time the engine of git ref REF instead")
    parser.add_argument("--engine-root", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)

    if args.compare_ref:
        return compare_ref(args.compare_ref, args.data_dir, args.drafts)
    if args.ref:  # the same measurement, on the engine of another commit
        rest = list(argv if argv is not None else sys.argv[1:])
        if "--ref" in rest:
            del rest[rest.index("--ref") : rest.index("--ref") + 2]
        rest = [a for a in rest if not a.startswith("--ref=")]
        with exported(args.ref) as (root, _):
            return with_engine(root, rest)
    if args.decisions:
        args.decisions.write_text(json.dumps(decisions(args.data_dir, args.drafts)))
        return 0

    started = time.monotonic()
    date = dt.datetime.now(dt.UTC)
    cases, sources = build_cases(args.data_dir, args.drafts)
    agent, spec = make_agent()
    if args.profile:
        chosen = [c for c in cases if c.size == args.profile_size]
        print(profile(agent, spec, chosen, max(1, args.rounds // 4)))
        return 0
    if args.no_gc:
        gc.disable()
    run = measure(agent, spec, cases, args.rounds, args.warmup, args.seed)
    gc.enable()
    summary = summarise(cases)
    target_met = {
        clock: {
            size: r["all"][clock]["p99_ms"] <= TARGET_P99_MS
            for size, r in summary["by_size"].items()
        }
        for clock in ("check", "check_cpu")
    }
    dirty = [
        line[3:]
        for line in git("status", "--porcelain").splitlines()
        if not line[3:].startswith(("bench/", "docs/"))
    ]
    data = {
        "date_utc": date.isoformat(timespec="seconds"),
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "machine": machine_info(),
        "code": {
            "commit": git("rev-parse", "HEAD"),
            "modified_files": dirty,
            "engine": str(engine_root()),
            "engine_commit": engine_commit(),
        },
        "config": {
            "rounds": args.rounds,
            "warmup_rounds": args.warmup,
            "drafts_per_kind_and_size": args.drafts,
            "cases": len(cases),
            "sizes": SIZES,
            "kinds": KINDS,
            "seed": args.seed,
            "sources": sources,
            "scorer": "public prior (routing/engine/prior.json), preset balanced, free checks",
        },
        "run": run,
        "summary": summary,
        "target_p99_ms": TARGET_P99_MS,
        "target_met": target_met,
        "wall_time_s": round(time.monotonic() - started, 1),
    }
    print(report(data))
    print(f"\nWall time: {data['wall_time_s']} s; engine: {data['code']['engine_commit']}")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(data, indent=2) + "\n")
        print(f"Figures written to {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
