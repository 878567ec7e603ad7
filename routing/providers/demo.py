"""Offline demo models: ``demo/small``, ``demo/medium``, ``demo/large``, and ``demo/embed``.

A LiteLLM custom provider, so the gateway and the engine call them exactly as
they call a real provider (``litellm.acompletion(model="demo/small", ...)``).

Each model has a price, simulated latency, and a *quality profile*: whether it
answers a prompt correctly is a deterministic function of the model's skill and
the prompt's difficulty. The small model is right on easy prompts and, on hard
ones, often hedges, errs, breaks the requested JSON or drops a required tool
argument, and its token log-probabilities drop when it is wrong. That gives a
cascade something real to catch without any network.

``demo/embed`` is an embedding model: a deterministic unit vector per input, made by
feature hashing its words (``demo_vector``), so texts that share words are close
(cosine similarity) and the same text always gets the same vector.

No Django imports: the engine, the tests and the benchmarks use it alone.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import math
import re
import time
import uuid
from collections.abc import AsyncIterator, Iterator, Mapping
from dataclasses import dataclass
from functools import lru_cache
from typing import Any, TypeVar

import litellm
from litellm.llms.custom_llm import CustomLLM, CustomLLMError
from litellm.types.llms.openai import ChatCompletionUsageBlock
from litellm.types.utils import EmbeddingResponse, GenericStreamingChunk, ModelResponse

from routing.engine.complexity import line_start_matches
from routing.engine.signals import arithmetic
from routing.engine.types import Message

PROVIDER = "demo"


@dataclass(frozen=True)
class DemoModel:
    name: str
    input_usd_per_mtok: float
    output_usd_per_mtok: float
    skill: float  # 0..1: how hard a prompt it still answers correctly
    first_token_ms: float
    per_token_ms: float
    max_output_tokens: int = 4096
    context_window: int = 128_000

    @property
    def litellm_name(self) -> str:
        return f"{PROVIDER}/{self.name}"


DEMO_MODELS: dict[str, DemoModel] = {
    m.name: m
    for m in (
        DemoModel("small", 0.15, 0.60, skill=0.45, first_token_ms=120, per_token_ms=4),
        DemoModel("medium", 1.00, 4.00, skill=0.75, first_token_ms=250, per_token_ms=8),
        DemoModel("large", 5.00, 15.00, skill=0.97, first_token_ms=450, per_token_ms=14),
    )
}


@dataclass(frozen=True)
class DemoEmbeddingModel:
    name: str
    input_usd_per_mtok: float
    dimensions: int  # the vectors' size; a request may ask for fewer
    latency_ms: float
    max_input_tokens: int = 8192  # per input, as OpenAI's embedding models

    @property
    def litellm_name(self) -> str:
        return f"{PROVIDER}/{self.name}"


DEMO_EMBEDDING_MODELS: dict[str, DemoEmbeddingModel] = {
    m.name: m for m in (DemoEmbeddingModel("embed", 0.02, dimensions=256, latency_ms=30),)
}

# Seconds of simulated latency are multiplied by this (0 in tests).
latency_scale: float = 1.0

_HARD_WORDS = re.compile(
    r"\b(prove|derive|why|explain|step[- ]by[- ]step|optimi[sz]e|compare|trade-?offs?|"
    r"analy[sz]e|design|architecture|theorem|integral|probability|diagnos\w*|"
    r"differential|contract|liabilit\w*|regulat\w*|concurren\w*|complexity)\b",
    re.IGNORECASE,
)
# An arithmetic expression: ``(-?N(?:\s*OP\s*\(?\s*-?N\s*\)?)+)`` (N a number), written
# without two runs of spaces side by side (each split of a long run would be tried in
# turn): the same matches, in linear time.
_ARITH = re.compile(
    r"(-?\d+(?:\.\d+)?(?:\s*[-+*/^x\u00d7\u00f7]\s*(?:\(\s*)?-?\d+(?:\.\d+)?(?:\s*\))?)+"
    r"(?:(?<!\))\s*)?)"
)
# An option, ``(?m)^\s*\(?([A-E])[).:]\s+\S``, at line starts (``line_start_matches``).
_CHOICE = re.compile(r"\s*\(?([A-E])[).:]\s+\S")
_HEDGES = (
    "I'm not entirely sure, but ",
    "I might be wrong here, but I think ",
    "It's hard to say for certain; possibly ",
)
_SENTENCES = (
    "The key point is that {topic} depends on a few well-understood factors.",
    "In practice, {topic} is usually handled by breaking the problem into smaller steps.",
    "A common approach to {topic} is to start from the definitions and check each assumption.",
    "For {topic}, the trade-off is between simplicity and completeness.",
    "Most references describe {topic} in terms of its inputs, its constraints and its result.",
    "When applying this to {topic}, verify the result against a simple example.",
    "The details of {topic} vary, but the underlying principle stays the same.",
    "To summarise {topic}: define the goal, apply the method, and check the outcome.",
)
_STOP = frozenset(
    "the a an of to in on for and or is are was were be what how why which who with that this "
    "it its as by at from do does can could should would please me my you your i we our".split()
)


def _unit(*parts: str) -> float:
    """A deterministic number in [0, 1) from the given strings."""
    digest = hashlib.sha256("\x1f".join(parts).encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64


def prompt_text(messages: list[Message]) -> str:
    chunks = []
    for message in messages:
        content = message.get("content")
        if isinstance(content, str):
            chunks.append(content)
        elif isinstance(content, list):
            chunks.extend(p.get("text", "") for p in content if isinstance(p, dict))
    return "\n".join(chunks)


def last_user_text(messages: list[Message]) -> str:
    for message in reversed(messages):
        if message.get("role") == "user":
            return prompt_text([message])
    return prompt_text(messages)


def difficulty(text: str) -> float:
    """A rough 0..1 difficulty: long, multi-step, technical prompts are hard."""
    words = len(text.split())
    score = min(words / 120, 1.0) * 0.35
    score += min(len(_HARD_WORDS.findall(text)) * 0.2, 0.45)
    operators = len(re.findall(r"[-+*/^\u00d7\u00f7]", text)) + len(re.findall(r"\d+", text)) / 3
    score += min(operators * 0.05, 0.3)
    if "```" in text or re.search(r"\bdef |\bclass |function\s*\(|SELECT\b", text):
        score += 0.2
    return max(0.0, min(score, 1.0))


def answers_correctly(model: DemoModel, text: str) -> bool:
    d = difficulty(text)
    # Probability of a correct answer falls off once difficulty passes skill.
    p = 1 / (1 + math.exp((d - model.skill) * 12))
    return _unit(model.name, "correct", text) < p


# --- answer builders ------------------------------------------------------------


def _eval_arith(expr: str) -> float | None:
    expr = expr.replace("\u00d7", "*").replace("\u00f7", "/").replace("^", "**")
    expr = re.sub(r"(?<=\d)\s*x\s*(?=[\d(])", "*", expr)
    return arithmetic(expr)


def _fmt_number(value: float) -> str:
    if abs(value - round(value)) < 1e-9:
        return str(round(value))
    return f"{value:.4f}".rstrip("0").rstrip(".")


def _topic(text: str) -> str:
    words = [w for w in re.findall(r"[A-Za-z][A-Za-z'-]+", text) if w.lower() not in _STOP]
    return " ".join(words[:4]).lower() or "this question"


def _general_answer(model: DemoModel, text: str, correct: bool, max_words: int) -> str:
    topic = _topic(text)
    n = 2 + int(_unit(model.name, "len", text) * 3) + (2 if model.skill > 0.7 else 0)
    start = int(_unit("start", text) * len(_SENTENCES))
    sentences = [_SENTENCES[(start + i) % len(_SENTENCES)].format(topic=topic) for i in range(n)]
    if not correct:
        sentences = sentences[:2]
        sentences[-1] = sentences[-1].rstrip(".") + ", although this may not cover every case."
    words = " ".join(sentences).split()
    return " ".join(words[:max_words])


def _options(text: str) -> set[str]:
    return {m.group(1) for m in line_start_matches(_CHOICE, text)}


def _choice_answer(model: DemoModel, text: str, correct: bool) -> str:
    letters = sorted(_options(text))
    truth = letters[int(_unit("truth", text) * len(letters))]
    if correct:
        return f"The answer is ({truth})."
    others = [letter for letter in letters if letter != truth] or letters
    return f"The answer is ({others[int(_unit(model.name, 'wrong', text) * len(others))]})."


def _arith_answer(
    model: DemoModel, expr: str, value: float, text: str, correct: bool, sample: str = ""
) -> str:
    shown = value
    if not correct:
        # A wrong answer is not stable across samples (temperature > 0); a right one is.
        delta = 1 + int(_unit(model.name, "delta", text, sample) * 9)
        shown = value + (delta if _unit(model.name, "sign", text, sample) < 0.5 else -delta)
    clean = " ".join(expr.split())
    return f"{clean} = {_fmt_number(shown)}. The answer is {_fmt_number(shown)}."


def _value_for_schema(schema: dict[str, Any], key: str, text: str, depth: int = 0) -> Any:
    kind = schema.get("type")
    if isinstance(kind, list):
        kind = next((k for k in kind if k != "null"), "string")
    if schema.get("enum"):
        return schema["enum"][int(_unit("enum", key, text) * len(schema["enum"]))]
    if kind == "object" or "properties" in schema:
        if depth > 4:
            return {}
        props = schema.get("properties", {})
        return {k: _value_for_schema(v, k, text, depth + 1) for k, v in props.items()}
    if kind == "array":
        return [_value_for_schema(schema.get("items", {}), key, text, depth + 1)]
    if kind == "integer":
        return 1 + int(_unit("int", key, text) * 99)
    if kind == "number":
        return round(1 + _unit("num", key, text) * 99, 2)
    if kind == "boolean":
        return _unit("bool", key, text) < 0.5
    return _topic(text) if key in {"query", "topic", "q", "text"} else f"{key} value"


def _json_answer(response_format: dict[str, Any], text: str, correct: bool) -> str:
    schema: dict[str, Any] = {}
    if response_format.get("type") == "json_schema":
        schema = (response_format.get("json_schema") or {}).get("schema") or {}
    payload = (
        _value_for_schema(schema, "root", text)
        if schema
        else {"answer": _topic(text), "confidence": "high" if correct else "low"}
    )
    if not isinstance(payload, dict):
        payload = {"value": payload}
    body = json.dumps(payload)
    if not correct:
        required = schema.get("required") or list(payload)[:1]
        if required and required[0] in payload and len(payload) > 1:
            payload.pop(required[0])
            body = json.dumps(payload)
        else:
            body = body[:-1]  # truncated object: invalid JSON
    return body


def _pick_tool(tools: list[dict[str, Any]], tool_choice: Any, text: str) -> dict[str, Any] | None:
    functions: list[dict[str, Any]] = [
        t.get("function", {}) for t in tools if t.get("type", "function") == "function"
    ]
    if not functions or tool_choice == "none":
        return None
    if isinstance(tool_choice, dict):
        wanted = (tool_choice.get("function") or {}).get("name")
        return next((f for f in functions if f.get("name") == wanted), functions[0])
    words = set(re.findall(r"[a-z]+", text.lower()))

    def overlap(f: dict[str, Any]) -> int:
        desc = f"{f.get('name', '')} {f.get('description', '')}".lower().replace("_", " ")
        return len(words & set(re.findall(r"[a-z]+", desc)))

    best = max(functions, key=overlap)
    if tool_choice != "required" and overlap(best) == 0:
        return None
    return best


@dataclass
class DemoAnswer:
    content: str | None
    tool_calls: list[dict[str, Any]]
    finish_reason: str
    correct: bool
    logprobs: list[dict[str, Any]]


def demo_answer(
    model: DemoModel,
    messages: list[Message],
    optional_params: dict[str, Any] | None = None,
    choice: int = 0,
) -> DemoAnswer:
    """The model's deterministic answer to ``messages`` (``choice``: which of ``n``)."""
    params = optional_params or {}
    text = last_user_text(messages)
    correct = answers_correctly(model, prompt_text(messages))
    max_tokens = params.get("max_completion_tokens") or params.get("max_tokens")
    tool_calls: list[dict[str, Any]] = []
    content: str | None

    tool = _pick_tool(params.get("tools") or [], params.get("tool_choice"), text)
    response_format = params.get("response_format") or {}
    arith = _ARITH.search(text)
    value = _eval_arith(arith.group(1)) if arith else None
    if tool is not None:
        schema = tool.get("parameters") or {}
        arguments = _value_for_schema(schema, "root", text) if schema else {}
        if not correct and isinstance(arguments, dict) and arguments:
            required = schema.get("required") or list(arguments)
            arguments.pop(required[0], None)
        tool_calls.append(
            {
                "id": "call_" + hashlib.sha256((model.name + text).encode()).hexdigest()[:24],
                "type": "function",
                "function": {"name": tool.get("name", ""), "arguments": json.dumps(arguments)},
            }
        )
        content = None
    elif response_format.get("type") in {"json_object", "json_schema"}:
        content = _json_answer(response_format, text, correct)
    elif len(_options(text)) >= 2:
        content = _choice_answer(model, text, correct)
    elif arith and value is not None:
        sample = str(params.get("seed", "")) if (params.get("temperature") or 0) > 0 else ""
        if sample and choice:
            sample += f"#{choice}"  # several choices at a temperature are several samples
        content = _arith_answer(model, arith.group(1), value, text, correct, sample)
    else:
        content = _general_answer(model, text, correct, max_words=400)
    if content is not None and not correct and model.skill < 0.9:
        roll = _unit(model.name, "style", text)
        if roll < 0.35 and response_format.get("type") is None:
            content = _HEDGES[int(roll * 100) % len(_HEDGES)] + content[0].lower() + content[1:]
        elif roll > 0.9 and response_format.get("type") is None:
            content = "I'm sorry, but I can't help with that request."

    finish_reason = "tool_calls" if tool_calls else "stop"
    if content is not None and max_tokens:
        # Truncate in the tokens usage is counted in, as a real provider does.
        ids = litellm.encode(model=model.litellm_name, text=content)
        if len(ids) > max_tokens:
            content = litellm.decode(model=model.litellm_name, tokens=ids[:max_tokens])
            finish_reason = "length"
    logprobs = _logprobs(model, content or "", correct, text)
    return DemoAnswer(content, tool_calls, finish_reason, correct, logprobs)


def _tokenize(text: str) -> list[str]:
    return re.findall(r"\s*\S+", text) or [text]


def _logprobs(model: DemoModel, content: str, correct: bool, text: str) -> list[dict[str, Any]]:
    items = []
    base = -0.04 if correct else -0.9
    for i, token in enumerate(_tokenize(content)):
        noise = _unit(model.name, "lp", text, str(i))
        logprob = base * (0.5 + noise) if correct else base * (0.3 + 1.6 * noise)
        items.append(
            {
                "token": token,
                "logprob": round(logprob, 5),
                "bytes": list(token.encode()),
                "top_logprobs": [],
            }
        )
    return items


def _count_tokens(
    model: str, messages: list[Message] | None = None, text: str | None = None
) -> int:
    count: int
    if messages is not None:
        count = litellm.token_counter(model=model, messages=messages)
    else:
        count = litellm.token_counter(model=model, text=text or "") if text else 0
    return count


_Spec = TypeVar("_Spec")


def _named(catalog: Mapping[str, _Spec], model: str, unknown: str) -> _Spec:
    """The entry of ``catalog`` LiteLLM's ``demo/<name>`` names, or the provider's 404."""
    try:
        return catalog[model.split("/", 1)[-1]]
    except KeyError:
        raise CustomLLMError(  # type: ignore[no-untyped-call]  # litellm's __init__ is untyped
            status_code=404, message=unknown
        ) from None


def _resolve(model: str) -> DemoModel:
    return _named(DEMO_MODELS, model, f"Unknown demo model '{model}'.")


def _latency(model: DemoModel, completion_tokens: int) -> tuple[float, float]:
    return (
        model.first_token_ms / 1000 * latency_scale,
        model.per_token_ms / 1000 * latency_scale,
    )


def _completion_tokens(spec: DemoModel, answer: DemoAnswer) -> int:
    text = answer.content or "".join(
        c["function"]["name"] + c["function"]["arguments"] for c in answer.tool_calls
    )
    return max(1, _count_tokens(spec.litellm_name, text=text))


# --- embeddings -------------------------------------------------------------------

_WORDS = re.compile(r"\w+")
# Above this many characters (or token ids) a request is embedded on a worker thread, so
# that a large batch does not hold the event loop.
THREAD_ABOVE = 20_000


@lru_cache(maxsize=65_536)
def _feature(word: str) -> int:
    """A word's 64-bit hash: its bucket (mod the size) and its sign (the top bit)."""
    return int.from_bytes(hashlib.blake2b(word.encode(), digest_size=8).digest(), "big")


def demo_vector(item: str | list[int], dimensions: int) -> list[float]:
    """A deterministic unit vector of ``dimensions`` floats for one input (feature hashing:
    each word adds ±1 to the bucket its hash names; token ids are words too)."""
    words = (
        _WORDS.findall(item.lower()) or [item]
        if isinstance(item, str)
        else [f"#{token}" for token in item]
    )
    buckets: dict[int, float] = {}
    for word in words:
        value = _feature(word)
        bucket = value % dimensions
        buckets[bucket] = buckets.get(bucket, 0.0) + (1.0 if value >> 63 else -1.0)
    norm = math.sqrt(sum(x * x for x in buckets.values()))
    if norm == 0.0:  # the words cancelled out: one bucket of the whole text instead
        buckets, norm = {_feature(repr(item)) % dimensions: 1.0}, 1.0
    vector = [0.0] * dimensions
    for bucket, x in buckets.items():
        vector[bucket] = round(x / norm, 8)  # float32's precision, as providers send them
    return vector


def _embed(
    spec: DemoEmbeddingModel, inputs: list[str | list[int]], optional_params: dict[str, Any]
) -> tuple[list[list[float]], int]:
    # ``output_dimensions``: how the gateway's caller passes OpenAI's ``dimensions`` to a
    # custom provider (LiteLLM forwards that name only to the providers it knows).
    dimensions = int(
        optional_params.get("dimensions")
        or optional_params.get("output_dimensions")
        or spec.dimensions
    )
    if not 1 <= dimensions <= spec.dimensions:
        raise CustomLLMError(  # type: ignore[no-untyped-call]  # litellm's __init__ is untyped
            status_code=400,
            message=f"'dimensions' must be between 1 and {spec.dimensions} for "
            f"{spec.litellm_name}.",
        )
    tokens = 0
    for index, item in enumerate(inputs):
        count = (
            len(litellm.encode(model=spec.litellm_name, text=item))
            if isinstance(item, str)
            else len(item)
        )
        if count > spec.max_input_tokens:
            raise CustomLLMError(  # type: ignore[no-untyped-call]  # litellm's __init__ is untyped
                status_code=400,
                message=f"Input {index} has {count} tokens; {spec.litellm_name} takes at most "
                f"{spec.max_input_tokens} per input.",
            )
        tokens += count
    return [demo_vector(item, dimensions) for item in inputs], tokens


def _embedding_response(
    spec: DemoEmbeddingModel, vectors: list[list[float]], tokens: int, response: EmbeddingResponse
) -> EmbeddingResponse:
    response.model = spec.litellm_name
    response.object = "list"
    response.data = [
        {"object": "embedding", "index": index, "embedding": vector}
        for index, vector in enumerate(vectors)
    ]
    response.usage = litellm.Usage(prompt_tokens=tokens, completion_tokens=0, total_tokens=tokens)
    return response


def _resolve_embedding(model: str) -> DemoEmbeddingModel:
    return _named(DEMO_EMBEDDING_MODELS, model, f"'{model}' is not a demo embedding model.")


def _size(inputs: list[str | list[int]]) -> int:
    return sum(len(item) for item in inputs)


class DemoLLM(CustomLLM):
    """The LiteLLM handler behind the ``demo/`` provider.

    ``n`` choices are ``n`` answers; as with OpenAI, the prompt is counted once and
    the completion tokens of every choice are added up.
    """

    def _build(
        self,
        model: str,
        messages: list[Message],
        optional_params: dict[str, Any],
        *,
        streaming: bool = False,
    ) -> tuple[DemoModel, list[DemoAnswer], ChatCompletionUsageBlock]:
        spec = _resolve(model)
        n = int(optional_params.get("n") or 1)
        if streaming and n > 1:
            raise CustomLLMError(  # type: ignore[no-untyped-call]  # litellm's __init__ is untyped
                status_code=400, message="Demo models stream one choice (n=1)."
            )
        answers = [demo_answer(spec, messages, optional_params, choice=i) for i in range(n)]
        prompt_tokens = _count_tokens(spec.litellm_name, messages=messages)
        completion_tokens = sum(_completion_tokens(spec, answer) for answer in answers)
        usage: ChatCompletionUsageBlock = {
            "prompt_tokens": prompt_tokens,
            "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens,
        }
        return spec, answers, usage

    def _response(
        self,
        spec: DemoModel,
        answers: list[DemoAnswer],
        usage: ChatCompletionUsageBlock,
        params: dict[str, Any],
    ) -> ModelResponse:
        choices = []
        for index, answer in enumerate(answers):
            message: dict[str, Any] = {"role": "assistant", "content": answer.content}
            if answer.tool_calls:
                message["tool_calls"] = answer.tool_calls
            choice: dict[str, Any] = {
                "index": index,
                "message": message,
                "finish_reason": answer.finish_reason,
            }
            if params.get("logprobs"):
                choice["logprobs"] = {"content": answer.logprobs}
            choices.append(choice)
        return ModelResponse(
            id=f"chatcmpl-demo-{uuid.uuid4().hex[:20]}",
            created=int(time.time()),
            model=spec.litellm_name,
            object="chat.completion",
            choices=choices,
            usage=usage,
        )

    def completion(
        self,
        model: str,
        messages: list[Message],
        *args: Any,
        optional_params: dict[str, Any] | None = None,
        **kwargs: Any,
    ) -> ModelResponse:
        spec, answers, usage = self._build(model, messages, optional_params or {})
        first, per = _latency(spec, usage["completion_tokens"])
        time.sleep(first + per * usage["completion_tokens"])
        return self._response(spec, answers, usage, optional_params or {})

    async def acompletion(
        self,
        model: str,
        messages: list[Message],
        *args: Any,
        optional_params: dict[str, Any] | None = None,
        **kwargs: Any,
    ) -> ModelResponse:
        spec, answers, usage = self._build(model, messages, optional_params or {})
        first, per = _latency(spec, usage["completion_tokens"])
        await asyncio.sleep(first + per * usage["completion_tokens"])
        return self._response(spec, answers, usage, optional_params or {})

    def _chunks(
        self, answer: DemoAnswer, usage: ChatCompletionUsageBlock
    ) -> list[GenericStreamingChunk]:
        chunks: list[GenericStreamingChunk] = []
        if answer.tool_calls:
            for index, call in enumerate(answer.tool_calls):
                chunks.append(
                    GenericStreamingChunk(
                        text="",
                        tool_use={
                            "id": call["id"],
                            "type": "function",
                            "function": call["function"],
                            "index": index,
                        },
                        is_finished=False,
                        finish_reason="",
                        usage=None,
                        index=0,
                    )
                )
        else:
            for piece in _tokenize(answer.content or ""):
                chunks.append(
                    GenericStreamingChunk(
                        text=piece,
                        tool_use=None,
                        is_finished=False,
                        finish_reason="",
                        usage=None,
                        index=0,
                    )
                )
        chunks.append(
            GenericStreamingChunk(
                text="",
                tool_use=None,
                is_finished=True,
                finish_reason=answer.finish_reason,
                usage=usage,
                index=0,
            )
        )
        return chunks

    def streaming(
        self,
        model: str,
        messages: list[Message],
        *args: Any,
        optional_params: dict[str, Any] | None = None,
        **kwargs: Any,
    ) -> Iterator[GenericStreamingChunk]:
        spec, answers, usage = self._build(model, messages, optional_params or {}, streaming=True)
        first, per = _latency(spec, usage["completion_tokens"])
        time.sleep(first)
        for chunk in self._chunks(answers[0], usage):
            time.sleep(per)
            yield chunk

    # LiteLLM iterates what astreaming returns, but declares it a coroutine: an async
    # generator (what it needs) cannot match that declaration.
    async def astreaming(  # type: ignore[override]
        self,
        model: str,
        messages: list[Message],
        *args: Any,
        optional_params: dict[str, Any] | None = None,
        **kwargs: Any,
    ) -> AsyncIterator[GenericStreamingChunk]:
        spec, answers, usage = self._build(model, messages, optional_params or {}, streaming=True)
        first, per = _latency(spec, usage["completion_tokens"])
        await asyncio.sleep(first)
        for chunk in self._chunks(answers[0], usage):
            if per:
                await asyncio.sleep(per)
            yield chunk

    def embedding(
        self,
        model: str,
        input: list[str | list[int]],
        model_response: EmbeddingResponse,
        *args: Any,
        optional_params: dict[str, Any] | None = None,
        **kwargs: Any,
    ) -> EmbeddingResponse:
        spec = _resolve_embedding(model)
        vectors, tokens = _embed(spec, list(input), optional_params or {})
        time.sleep(spec.latency_ms / 1000 * latency_scale)
        return _embedding_response(spec, vectors, tokens, model_response)

    async def aembedding(
        self,
        model: str,
        input: list[str | list[int]],
        model_response: EmbeddingResponse,
        *args: Any,
        optional_params: dict[str, Any] | None = None,
        **kwargs: Any,
    ) -> EmbeddingResponse:
        spec = _resolve_embedding(model)
        inputs, params = list(input), optional_params or {}
        if _size(inputs) > THREAD_ABOVE:
            vectors, tokens = await asyncio.to_thread(_embed, spec, inputs, params)
        else:
            vectors, tokens = _embed(spec, inputs, params)
        await asyncio.sleep(spec.latency_ms / 1000 * latency_scale)
        return _embedding_response(spec, vectors, tokens, model_response)


_handler = DemoLLM()


def register() -> None:
    """Make ``demo/*`` callable through LiteLLM and priced in its cost map. Idempotent."""
    if not any(item.get("provider") == PROVIDER for item in litellm.custom_provider_map):
        litellm.custom_provider_map = [
            *litellm.custom_provider_map,
            {"provider": PROVIDER, "custom_handler": _handler},
        ]
        litellm.utils.custom_llm_setup()  # type: ignore[no-untyped-call]  # untyped in litellm
    litellm.register_model(
        {
            spec.litellm_name: {
                "input_cost_per_token": spec.input_usd_per_mtok / 1e6,
                "output_cost_per_token": spec.output_usd_per_mtok / 1e6,
                "cache_creation_input_token_cost": 0.0,
                "cache_read_input_token_cost": 0.0,
                "max_tokens": spec.max_output_tokens,
                "max_input_tokens": spec.context_window,
                "max_output_tokens": spec.max_output_tokens,
                "litellm_provider": PROVIDER,
                "mode": "chat",
                "supports_function_calling": True,
                "supports_response_schema": True,
            }
            for spec in DEMO_MODELS.values()
        }
        | {
            spec.litellm_name: {
                "input_cost_per_token": spec.input_usd_per_mtok / 1e6,
                "output_cost_per_token": 0.0,
                "cache_creation_input_token_cost": 0.0,
                "cache_read_input_token_cost": 0.0,
                "max_tokens": spec.max_input_tokens,
                "max_input_tokens": spec.max_input_tokens,
                "output_vector_size": spec.dimensions,
                "litellm_provider": PROVIDER,
                "mode": "embedding",
            }
            for spec in DEMO_EMBEDDING_MODELS.values()
        }
    )
