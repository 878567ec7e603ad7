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

import json
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import litellm
from litellm.llms.custom_llm import CustomLLM, CustomLLMError
from litellm.types.utils import ModelResponse

from routing.engine.agent import VERIFY_SYSTEM_PROMPT
from routing.engine.complexity import query_text
from routing.engine.pricing import ModelPrice, usd_to_nanos
from routing.engine.types import Deployment, ModelSpec

PROVIDER = "replay"


@dataclass
class ReplayFile:
    rows: list[dict[str, Any]]
    prices: dict[str, dict[str, Any]]
    by_id: dict[str, dict[str, Any]]
    by_text: dict[str, list[dict[str, Any]]]

    @classmethod
    def load(cls, path: str | Path) -> ReplayFile:
        path = Path(path)
        rows = [
            json.loads(line)
            for line in path.read_text(encoding="utf-8").splitlines()
            if line.strip()
        ]
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

    def find(self, messages: list[dict], metadata: dict | None) -> dict[str, Any]:
        replay_id = (metadata or {}).get("replay_id")
        if replay_id is not None:
            if replay_id not in self.by_id:
                raise CustomLLMError(status_code=404, message=f"No recorded row '{replay_id}'.")
            return self.by_id[replay_id]
        found = self.by_text.get(_key(messages))
        if not found:
            raise CustomLLMError(status_code=404, message="No recorded answer for this prompt.")
        return found[0]


def prompt_messages(row: dict[str, Any]) -> list[dict]:
    """The row's messages; rows without recorded prompt text get a stand-in naming the row."""
    return row.get("messages") or [{"role": "user", "content": f"[replay row {row['id']}]"}]


def _key(messages: list[dict]) -> str:
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


class ReplayLLM(CustomLLM):
    def __init__(self) -> None:
        super().__init__()
        self.file: ReplayFile | None = None

    def _answer(
        self, model: str, messages: list, optional_params: dict, litellm_params: dict
    ) -> ModelResponse:
        if self.file is None:
            raise CustomLLMError(status_code=500, message="No replay file loaded.")
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
                raise CustomLLMError(status_code=400, message="Replay has no recorded samples.")
            row = self.file.find(messages, metadata)
        recorded = row["responses"].get(recorded_model)
        if recorded is None or recorded.get("text") is None:
            raise CustomLLMError(
                status_code=404, message=f"No recorded answer of {recorded_model}."
            )
        price = self.file.prices.get(recorded_model) or {}
        choice: dict[str, Any] = {"index": 0, "finish_reason": "stop"}
        if verify:
            if recorded.get("confidence") is None:
                raise CustomLLMError(status_code=404, message="No recorded confidence.")
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
        self, model, messages, *args, optional_params=None, litellm_params=None, **kwargs
    ):
        return self._answer(model, messages, optional_params or {}, litellm_params or {})

    async def acompletion(
        self, model, messages, *args, optional_params=None, litellm_params=None, **kwargs
    ):
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
        litellm.utils.custom_llm_setup()
