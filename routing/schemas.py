"""Parsing and validation of OpenAI chat-completion requests.

Only OpenAI's own parameters are forwarded upstream. Anything LiteLLM would
also accept (``api_base``, ``api_key``, ``metadata``, ``mock_response``…) is
dropped: a client must never be able to redirect CascadeFlow's provider keys.

Everything that is forwarded is checked here, in OpenAI's own shapes, so that a
malformed request is a 400 naming the parameter and never reaches a provider:
a bad request that got through would fail upstream, look like provider trouble,
and count against the deployment's circuit breaker for every tenant.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from core import strictjson
from routing.errors import bad_request

ROLES = frozenset({"system", "developer", "user", "assistant", "tool", "function"})

# OpenAI's content part types, and the object each one carries.
PART_TYPES = {
    "text": "text",
    "image_url": "image_url",
    "input_audio": "input_audio",
    "file": "file",
    "refusal": "refusal",
}

_NUMBER_RANGES = {
    "temperature": (0.0, 2.0),
    "top_p": (0.0, 1.0),
    "presence_penalty": (-2.0, 2.0),
    "frequency_penalty": (-2.0, 2.0),
}
# Output tokens one request may ask for: above every model's output window, and
# small enough that worst-case budget reservations stay far inside int64 (times
# MAX_N choices, at $1,000 per million tokens: ~1.3e14 nano-dollars).
MAX_OUTPUT_TOKENS = 1_048_576
MAX_N = 128  # OpenAI's own bound on choices per request
_POSITIVE_INTS = {"max_tokens": MAX_OUTPUT_TOKENS, "max_completion_tokens": MAX_OUTPUT_TOKENS}
INT64 = (-(2**63), 2**63 - 1)
MAX_TOOLS = 128
MAX_STOP = 4
_PASSTHROUGH = (
    *_NUMBER_RANGES,
    *_POSITIVE_INTS,
    "n",
    "stop",
    "logit_bias",
    "logprobs",
    "top_logprobs",
    "seed",
    "tools",
    "tool_choice",
    "parallel_tool_calls",
    "response_format",
    "reasoning_effort",
)
MAX_USER_LENGTH = 256  # tenants.EndUser.external_id
MAX_MODEL_LENGTH = 200  # routing.UsageEvent.requested_model
MAX_NAME_LENGTH = 256  # a tool's, a function's or a message author's name


@dataclass
class ChatRequest:
    model: str
    messages: list[dict[str, Any]]
    stream: bool = False
    include_usage: bool = False
    user: str | None = None
    params: dict[str, Any] = field(default_factory=dict)

    @property
    def max_output_tokens(self) -> int | None:
        return self.params.get("max_completion_tokens") or self.params.get("max_tokens")


def json_object(body: bytes) -> dict[str, Any]:
    """A request body that must be one JSON object (strict: no duplicate keys, no NaN)."""
    try:
        data = strictjson.loads(body)
    except strictjson.InvalidJSON as exc:
        if exc.path is not None:
            raise bad_request(exc.message, param=exc.path) from None
        raise bad_request(exc.message, code="invalid_json") from None
    if not isinstance(data, dict):
        raise bad_request("The request body must be a JSON object.", code="invalid_json")
    return data


def model_name(data: dict[str, Any]) -> str:
    """The request's ``model``: a non-empty string the ledger can hold."""
    model = data.get("model")
    if not isinstance(model, str) or not model.strip() or len(model) > MAX_MODEL_LENGTH:
        raise bad_request(
            f"'model' is required and must be a non-empty string of at most "
            f"{MAX_MODEL_LENGTH} characters.",
            param="model",
        )
    return model


def parse_chat_request(body: bytes) -> ChatRequest:
    data = json_object(body)
    model = model_name(data)

    messages = data.get("messages")
    if not isinstance(messages, list) or not messages:
        raise bad_request("'messages' must be a non-empty array.", param="messages")
    for index, message in enumerate(messages):
        _validate_message(message, index)

    stream = data.get("stream", False)
    if stream is None:
        stream = False
    if not isinstance(stream, bool):
        raise bad_request("'stream' must be a boolean.", param="stream")
    stream_options = data.get("stream_options") or {}
    if not isinstance(stream_options, dict):
        raise bad_request("'stream_options' must be an object.", param="stream_options")
    if stream_options and not stream:
        raise bad_request(
            "'stream_options' is only allowed when 'stream' is true.", param="stream_options"
        )

    user = data.get("user")
    if user is not None and (not isinstance(user, str) or len(user) > MAX_USER_LENGTH):
        raise bad_request(
            f"'user' must be a string of at most {MAX_USER_LENGTH} characters.", param="user"
        )

    params: dict[str, Any] = {}
    for name in _PASSTHROUGH:
        if name in data and data[name] is not None:
            params[name] = data[name]
    _validate_params(params)
    return ChatRequest(
        model=model.strip(),
        messages=messages,
        stream=stream,
        include_usage=bool(stream_options.get("include_usage")),
        user=user or None,
        params=params,
    )


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def _optional_str(obj: dict[str, Any], key: str, param: str) -> None:
    if key in obj and obj[key] is not None and not isinstance(obj[key], str):
        raise bad_request(f"'{param}.{key}' must be a string.", param=f"{param}.{key}")


def _validate_message(message: Any, index: int) -> None:
    param = f"messages[{index}]"
    if not isinstance(message, dict):
        raise bad_request(f"'{param}' must be an object.", param=param)
    role = message.get("role")
    if role not in ROLES:
        raise bad_request(
            f"'{param}.role' must be one of {', '.join(sorted(ROLES))}.", param=f"{param}.role"
        )
    content = message.get("content")
    if content is None:
        if role != "assistant" or not (message.get("tool_calls") or message.get("function_call")):
            raise bad_request(f"'{param}.content' is required.", param=f"{param}.content")
    elif isinstance(content, list):
        for i, part in enumerate(content):
            _validate_part(part, f"{param}.content[{i}]")
    elif not isinstance(content, str):
        raise bad_request(
            f"'{param}.content' must be a string or an array of content parts.",
            param=f"{param}.content",
        )
    name = message.get("name")
    if name is not None and (not isinstance(name, str) or len(name) > MAX_NAME_LENGTH):
        raise bad_request(
            f"'{param}.name' must be a string of at most {MAX_NAME_LENGTH} characters.",
            param=f"{param}.name",
        )
    if role == "tool" and not isinstance(message.get("tool_call_id"), str):
        raise bad_request(
            f"'{param}.tool_call_id' is required for tool messages.", param=f"{param}.tool_call_id"
        )
    tool_calls = message.get("tool_calls")
    if tool_calls is not None:
        if not isinstance(tool_calls, list):
            raise bad_request(
                f"'{param}.tool_calls' must be an array.", param=f"{param}.tool_calls"
            )
        for i, call in enumerate(tool_calls):
            where = f"{param}.tool_calls[{i}]"
            if not isinstance(call, dict) or not isinstance(call.get("id", ""), str):
                raise bad_request(f"'{where}' must be an object with a string 'id'.", param=where)
            _validate_function_call(call.get("function"), f"{where}.function")
    if message.get("function_call") is not None:
        _validate_function_call(message["function_call"], f"{param}.function_call")


def _validate_function_call(call: Any, param: str) -> None:
    if (
        not isinstance(call, dict)
        or not isinstance(call.get("name"), str)
        or not isinstance(call.get("arguments", ""), str)
    ):
        raise bad_request(
            f"'{param}' must be an object with a string 'name' and string 'arguments'.",
            param=param,
        )


def _validate_part(part: Any, param: str) -> None:
    """One content part in OpenAI's shape: ``{"type": T, T: ...}``."""
    if not isinstance(part, dict) or part.get("type") not in PART_TYPES:
        raise bad_request(
            f"'{param}' must be a content part object with 'type' one of {', '.join(PART_TYPES)}.",
            param=param,
        )
    kind = part["type"]
    value = part.get(kind)
    where = f"{param}.{kind}"
    if kind in ("text", "refusal"):
        if not isinstance(value, str):
            raise bad_request(f"'{where}' must be a string.", param=where)
        return
    if not isinstance(value, dict):
        raise bad_request(f"'{where}' must be an object.", param=where)
    if kind == "image_url":
        if not isinstance(value.get("url"), str):
            raise bad_request(f"'{where}.url' must be a string.", param=f"{where}.url")
        if value.get("detail") not in (None, "auto", "low", "high"):
            raise bad_request(
                f"'{where}.detail' must be 'auto', 'low' or 'high'.", param=f"{where}.detail"
            )
    elif kind == "input_audio":
        if not isinstance(value.get("data"), str) or not isinstance(value.get("format"), str):
            raise bad_request(
                f"'{where}' must have a string 'data' and a string 'format'.", param=where
            )
    else:  # file
        for key in ("file_data", "file_id", "filename"):
            _optional_str(value, key, where)
        if not (value.get("file_data") or value.get("file_id")):
            raise bad_request(f"'{where}' needs 'file_data' or 'file_id'.", param=where)


def _validate_params(params: dict[str, Any]) -> None:
    for name, (low, high) in _NUMBER_RANGES.items():
        if name in params:
            value = params[name]
            if not _is_number(value) or not low <= value <= high:
                raise bad_request(
                    f"'{name}' must be a number between {low} and {high}.", param=name
                )
    for name, high in _POSITIVE_INTS.items():
        if name in params:
            value = params[name]
            if not _is_int(value) or not 1 <= value <= high:
                raise bad_request(f"'{name}' must be an integer between 1 and {high}.", param=name)
    if "n" in params and (not _is_int(params["n"]) or not 1 <= params["n"] <= MAX_N):
        raise bad_request(f"'n' must be an integer between 1 and {MAX_N}.", param="n")
    if "seed" in params and (
        not _is_int(params["seed"]) or not INT64[0] <= params["seed"] <= INT64[1]
    ):
        raise bad_request("'seed' must be a 64-bit integer.", param="seed")
    if "logprobs" in params and not isinstance(params["logprobs"], bool):
        raise bad_request("'logprobs' must be a boolean.", param="logprobs")
    if "top_logprobs" in params:
        value = params["top_logprobs"]
        if not _is_int(value) or not 0 <= value <= 20:
            raise bad_request(
                "'top_logprobs' must be an integer between 0 and 20.", param="top_logprobs"
            )
        if not params.get("logprobs"):
            raise bad_request(
                "'top_logprobs' requires 'logprobs' to be true.", param="top_logprobs"
            )
    if "logit_bias" in params:
        bias = params["logit_bias"]
        if not isinstance(bias, dict) or not all(
            key.isdigit() and _is_number(v) and -100 <= v <= 100 for key, v in bias.items()
        ):
            raise bad_request(
                "'logit_bias' must map token ids to numbers between -100 and 100.",
                param="logit_bias",
            )
    if "parallel_tool_calls" in params and not isinstance(params["parallel_tool_calls"], bool):
        raise bad_request("'parallel_tool_calls' must be a boolean.", param="parallel_tool_calls")
    if "reasoning_effort" in params and not (
        isinstance(params["reasoning_effort"], str) and len(params["reasoning_effort"]) <= 32
    ):
        raise bad_request("'reasoning_effort' must be a string.", param="reasoning_effort")
    if "tools" in params:
        _validate_tools(params["tools"])
    if "tool_choice" in params:
        choice = params["tool_choice"]
        if not (
            choice in ("none", "auto", "required")
            or (
                isinstance(choice, dict)
                and choice.get("type", "function") == "function"
                and isinstance(choice.get("function"), dict)
                and isinstance(choice["function"].get("name"), str)
            )
        ):
            raise bad_request(
                "'tool_choice' must be 'none', 'auto', 'required' or "
                '{"type": "function", "function": {"name": …}}.',
                param="tool_choice",
            )
    if "response_format" in params:
        _validate_response_format(params["response_format"])
    if "stop" in params:
        stop = params["stop"]
        if not (
            isinstance(stop, str)
            or (
                isinstance(stop, list)
                and all(isinstance(s, str) for s in stop)
                and len(stop) <= MAX_STOP
            )
        ):
            raise bad_request(
                f"'stop' must be a string or an array of up to {MAX_STOP} strings.", param="stop"
            )


def _validate_tools(tools: Any) -> None:
    shape = bad_request(
        f'\'tools\' must be an array of up to {MAX_TOOLS} {{"type": "function", "function": '
        '{"name": …, "parameters": {…}}}.',
        param="tools",
    )
    if not isinstance(tools, list) or len(tools) > MAX_TOOLS:
        raise shape
    for i, tool in enumerate(tools):
        if (
            not isinstance(tool, dict)
            or tool.get("type", "function") != "function"
            or not isinstance(tool.get("function"), dict)
        ):
            raise shape
        function = tool["function"]
        where = f"tools[{i}].function"
        name = function.get("name")
        if not isinstance(name, str) or not name or len(name) > MAX_NAME_LENGTH:
            raise shape
        _optional_str(function, "description", where)
        if function.get("parameters") is not None and not isinstance(function["parameters"], dict):
            raise bad_request(
                f"'{where}.parameters' must be a JSON Schema object.", param=f"{where}.parameters"
            )
        if function.get("strict") is not None and not isinstance(function["strict"], bool):
            raise bad_request(f"'{where}.strict' must be a boolean.", param=f"{where}.strict")


def _validate_response_format(fmt: Any) -> None:
    if not isinstance(fmt, dict) or fmt.get("type") not in {"text", "json_object", "json_schema"}:
        raise bad_request(
            "'response_format.type' must be 'text', 'json_object' or 'json_schema'.",
            param="response_format",
        )
    if fmt["type"] != "json_schema":
        return
    spec = fmt.get("json_schema")
    param = "response_format.json_schema"
    if not isinstance(spec, dict):
        raise bad_request(f"'{param}' is required for type 'json_schema'.", param=param)
    name = spec.get("name")
    if not isinstance(name, str) or not name or len(name) > 64:
        raise bad_request(
            f"'{param}.name' must be a string of 1 to 64 characters.", param=f"{param}.name"
        )
    if spec.get("schema") is not None and not isinstance(spec["schema"], dict):
        raise bad_request(
            f"'{param}.schema' must be a JSON Schema object.", param=f"{param}.schema"
        )
    _optional_str(spec, "description", param)
    if spec.get("strict") is not None and not isinstance(spec["strict"], bool):
        raise bad_request(f"'{param}.strict' must be a boolean.", param=f"{param}.strict")
