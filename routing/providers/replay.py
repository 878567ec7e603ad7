"""Replay provider: recorded LLM answers served through LiteLLM like any provider.

Files follow the replay format (one JSON line per query with every model's
recorded answer; a ``.models.json`` price sidecar). ``replay/<model>`` answers
a request with that model's recorded ``text`` and token counts:

- the row is found by ``metadata={"replay_id": ...}`` when given, else by the
  text of the last user message;
- with ``logprobs`` requested and a recorded ``logprob``, the answer carries it
  (as the log-probability of the answer);
- a self-verification request (the engine's ``VERIFY_SYSTEM_PROMPT``) is
  answered with the recorded ``confidence`` and charged ``confidence_cost_usd``;
- a recorded ``cost_usd`` is charged exactly (minus the confidence part, which
  only the verification call pays); otherwise tokens x the sidecar price.

Sampling requests (temperature > 0, for agreement checks) are refused: one
recorded answer per model cannot stand in for k independent samples.

No Django imports: the benchmark and tests use it alone.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import time
import uuid
from collections.abc import Awaitable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import litellm
from litellm.llms.custom_llm import CustomLLM, CustomLLMError
from litellm.types.utils import ModelResponse

from core.money import usd_to_nanos
from routing.engine.agent import VERIFY_SYSTEM_PROMPT, CascadeAgent
from routing.engine.agent import _draft_of as draft_of
from routing.engine.calibrate import RowObservation, StepObservation, calibrate_chain
from routing.engine.complexity import query_text
from routing.engine.jsonl import read_jsonl
from routing.engine.policy import Calibration, Policy
from routing.engine.pricing import ModelPrice
from routing.engine.resilience import Caller
from routing.engine.signals import extract
from routing.engine.types import Deployment, Message, ModelSpec

PROVIDER = "replay"
_T = TypeVar("_T")


@dataclass
class ReplayFile:
    rows: list[dict[str, Any]]
    prices: dict[str, dict[str, Any]]
    by_id: dict[str, dict[str, Any]]
    by_text: dict[str, list[dict[str, Any]]]

    @classmethod
    def load(cls, path: str | Path) -> ReplayFile:
        path = Path(path)
        rows = read_jsonl(path)
        sidecar = path.with_name(path.name.removesuffix(".jsonl") + ".models.json")
        prices = json.loads(sidecar.read_text(encoding="utf-8")) if sidecar.exists() else {}
        by_text: dict[str, list[dict[str, Any]]] = {}
        for row in rows:
            by_text.setdefault(_key(prompt_messages(row)), []).append(row)
        return cls(rows, prices, {r["id"]: r for r in rows}, by_text)

    def spec(self, model: str) -> ModelSpec:
        price = self.prices.get(model) or {}
        has_logprob = any(
            (r["responses"].get(model) or {}).get("logprob") is not None for r in self.rows
        )
        return ModelSpec(
            name=model,
            deployments=(Deployment(f"{PROVIDER}/{model}"),),
            price=ModelPrice.per_million_usd(
                str(price.get("input_usd_per_mtok", 0)), str(price.get("output_usd_per_mtok", 0))
            ),
            supports_logprobs=has_logprob,
        )

    def find(self, messages: list[Message], metadata: dict[str, Any] | None) -> dict[str, Any]:
        replay_id = (metadata or {}).get("replay_id")
        if replay_id is not None:
            if replay_id not in self.by_id:
                raise _llm_error(404, f"No recorded row '{replay_id}'.")
            return self.by_id[replay_id]
        found = self.by_text.get(_key(messages))
        if not found:
            raise _llm_error(404, "No recorded answer for this prompt.")
        return found[0]


def prompt_messages(row: dict[str, Any]) -> list[Message]:
    """The row's messages; rows without recorded prompt text get a stand-in naming the row."""
    return row.get("messages") or [{"role": "user", "content": f"[replay row {row['id']}]"}]


def _key(messages: list[Message]) -> str:
    return " ".join(query_text(messages).split())


def answer_cost_nanos(recorded: dict[str, Any], price: dict[str, Any]) -> int:
    """Cost of the answer alone (without the self-check), per the replay format's rules."""
    if recorded.get("cost_usd") is not None:
        return usd_to_nanos(str(recorded["cost_usd"])) - usd_to_nanos(
            str(recorded.get("confidence_cost_usd") or 0)
        )
    spec = ModelPrice.per_million_usd(
        str(price.get("input_usd_per_mtok", 0)), str(price.get("output_usd_per_mtok", 0))
    )
    return spec.cost_nanos(
        recorded.get("prompt_tokens") or 0, recorded.get("completion_tokens") or 0
    )


def _llm_error(status_code: int, message: str) -> CustomLLMError:
    # LiteLLM's CustomLLMError.__init__ is not annotated.
    return CustomLLMError(status_code=status_code, message=message)  # type: ignore[no-untyped-call]


class ReplayLLM(CustomLLM):
    def __init__(self) -> None:
        super().__init__()
        self.file: ReplayFile | None = None

    def _answer(
        self,
        model: str,
        messages: list[Message],
        optional_params: dict[str, Any],
        litellm_params: dict[str, Any],
    ) -> ModelResponse:
        if self.file is None:
            raise _llm_error(500, "No replay file loaded.")
        recorded_model = model.removeprefix(f"{PROVIDER}/")
        metadata = (litellm_params or {}).get("metadata") or {}
        params = optional_params or {}
        verify = (
            bool(messages)
            and messages[0].get("role") == "system"
            and (messages[0].get("content") == VERIFY_SYSTEM_PROMPT)
        )
        if verify:
            question = query_text(messages).split("Question:\n", 1)[-1].split("\n\nAnswer:\n", 1)[0]
            row = self.file.find([{"role": "user", "content": question}], metadata)
        else:
            if (params.get("temperature") or 0) > 0:
                raise _llm_error(400, "Replay has no recorded samples.")
            row = self.file.find(messages, metadata)
        recorded = row["responses"].get(recorded_model)
        if recorded is None or recorded.get("text") is None:
            raise _llm_error(404, f"No recorded answer of {recorded_model}.")
        price = self.file.prices.get(recorded_model) or {}
        choice: dict[str, Any] = {"index": 0, "finish_reason": "stop"}
        if verify:
            if recorded.get("confidence") is None:
                raise _llm_error(404, "No recorded confidence.")
            choice["message"] = {"role": "assistant", "content": f"{recorded['confidence']:.6f}"}
            usage = {"prompt_tokens": 0, "completion_tokens": 0, "total_tokens": 0}
            cost = usd_to_nanos(str(recorded.get("confidence_cost_usd") or 0))
        else:
            choice["message"] = {"role": "assistant", "content": recorded["text"]}
            if params.get("logprobs") and recorded.get("logprob") is not None:
                choice["logprobs"] = {
                    "content": [
                        {
                            "token": recorded["text"],
                            "logprob": recorded["logprob"],
                            "bytes": None,
                            "top_logprobs": [],
                        }
                    ]
                }
            prompt = recorded.get("prompt_tokens") or 0
            completion = recorded.get("completion_tokens") or 0
            usage = {
                "prompt_tokens": prompt,
                "completion_tokens": completion,
                "total_tokens": prompt + completion,
            }
            cost = answer_cost_nanos(recorded, price)
        response = ModelResponse(
            id=f"chatcmpl-replay-{uuid.uuid4().hex[:16]}",
            created=int(time.time()),
            model=model,
            choices=[choice],
            usage=usage,
        )
        response._hidden_params["cascadeflow_cost_nanos"] = cost
        return response

    def completion(
        self,
        model: str,
        messages: list[Message],
        *args: Any,
        optional_params: dict[str, Any] | None = None,
        litellm_params: dict[str, Any] | None = None,
        **kwargs: Any,
    ) -> ModelResponse:
        return self._answer(model, messages, optional_params or {}, litellm_params or {})

    async def acompletion(
        self,
        model: str,
        messages: list[Message],
        *args: Any,
        optional_params: dict[str, Any] | None = None,
        litellm_params: dict[str, Any] | None = None,
        **kwargs: Any,
    ) -> ModelResponse:
        return self._answer(model, messages, optional_params or {}, litellm_params or {})


handler = ReplayLLM()


def register(file: ReplayFile) -> None:
    """Serve ``file`` as ``replay/<model>`` through LiteLLM (replaces any earlier file)."""
    handler.file = file
    if not any(item.get("provider") == PROVIDER for item in litellm.custom_provider_map):
        litellm.custom_provider_map = [
            *litellm.custom_provider_map,
            {"provider": PROVIDER, "custom_handler": handler},
        ]
        litellm.utils.custom_llm_setup()  # type: ignore[no-untyped-call]  # untyped in litellm


# --- observing a chain on recorded data (for calibration) -------------------------------


@dataclass
class Row:
    raw: dict[str, Any]
    split: str
    messages: list[Message]

    @property
    def id(self) -> str:
        row_id: str = self.raw["id"]
        return row_id

    def quality(self, recorded_model: str) -> float:
        return float(self.raw["responses"][recorded_model]["correct"])


def split_of(row_id: str) -> str:
    """The replay format's deterministic 60/40 split, for files with one split only."""
    return (
        "train" if int(hashlib.sha256(row_id.encode()).hexdigest()[:8], 16) % 100 < 60 else "test"
    )


def load_rows(file: ReplayFile, recorded: list[str]) -> tuple[list[Row], bool]:
    """Rows where every chain model has an answer; (rows, whether they were re-split)."""
    rows = [
        r
        for r in file.rows
        if all((r["responses"].get(m) or {}).get("text") is not None for m in recorded)
    ]
    resplit = len({r.get("split") for r in rows}) < 2
    return [
        Row(r, split_of(r["id"]) if resplit else r["split"], prompt_messages(r)) for r in rows
    ], resplit


async def gather_limited(coros: Iterable[Awaitable[_T]], limit: int = 32) -> list[_T]:
    semaphore = asyncio.Semaphore(limit)

    async def run(coro: Awaitable[_T]) -> _T:
        async with semaphore:
            return await coro

    return await asyncio.gather(*(run(c) for c in coros))


async def observe(
    agent: CascadeAgent,
    row: Row,
    specs: list[ModelSpec],
    recorded: list[str],
    verify_models: set[str],
) -> RowObservation:
    """Every chain model's answer to one row, with the engine's signals on each draft.

    ``specs[i]`` is called through its deployments (``replay/<recorded[i]>``);
    ``verify_models`` are the recorded models whose self-check is replayed.
    """
    params = {"metadata": {"replay_id": row.id}}
    plan = agent.plan(row.messages, params)
    steps = []
    for index, (spec, name) in enumerate(zip(specs, recorded, strict=True)):
        kwargs: dict[str, Any] = {**params, "messages": row.messages}
        if spec.supports_logprobs:
            kwargs["logprobs"] = True
        response, attempt = await agent.caller.complete(spec, kwargs, [], role="draft")
        step = StepObservation(quality=row.quality(name), cost_nanos=attempt.cost_nanos)
        if index < len(specs) - 1:
            draft = draft_of(response)
            report = extract(draft, plan.query, params)
            step.features = dict(report.features)
            step.hard_fail = report.hard_fail is not None
            step.margin = agent.policy.margin(plan.query.domain)
            if name in verify_models:
                agent.verifier = spec
                check = await agent._self_verify(row.messages, draft)
                if check.value is not None:
                    step.paid_features = {
                        **step.features,
                        "has_verify": 1.0,
                        "verify_p": check.value,
                    }
                    step.paid_cost_nanos = check.cost_nanos
        steps.append(step)
    return RowObservation(steps=steps)


async def calibrate_on_file(
    file: ReplayFile,
    specs: list[ModelSpec],
    recorded: list[str],
    *,
    policy: Policy,
    target_retention: float,
    confidence: float = 0.9,
    allow_paid: bool = True,
) -> tuple[Calibration, list[Row], dict[str, RowObservation], bool]:
    """Observe every row, calibrate on the train split; also return the observations."""
    register(file)
    rows, _ = load_rows(file, recorded)
    graded = any(0 < r.quality(m) < 1 for r in rows for m in recorded)
    verify_models = (
        {
            m
            for m in recorded[:-1]
            if all(r.raw["responses"][m].get("confidence") is not None for r in rows)
        }
        if allow_paid
        else set()
    )
    probe = CascadeAgent(specs, policy=policy, caller=Caller(retries=0))
    observations = await gather_limited(
        observe(probe, r, specs, recorded, verify_models) for r in rows
    )
    by_id = {r.id: o for r, o in zip(rows, observations, strict=True)}
    calibration = calibrate_chain(
        [by_id[r.id] for r in rows if r.split == "train"],
        target_retention=target_retention,
        graded=graded,
        confidence=confidence,
        allow_paid=allow_paid,
    )
    return calibration, rows, by_id, graded
