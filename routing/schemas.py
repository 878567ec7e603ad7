"""Parsing and validation of OpenAI chat-completion requests.

Only OpenAI's own parameters are forwarded upstream. Anything LiteLLM would
also accept (``api_base``, ``api_key``, ``metadata``, ``mock_response``…) is
dropped: a client must never be able to redirect CascadeFlow's provider keys.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

from routing.errors import bad_request

ROLES = frozenset({"system", "developer", "user", "assistant", "tool", "function"})

# OpenAI parameter -> validator returning an error message or None.
_NUMBER_RANGES = {
    "temperature": (0.0, 2.0),
    "top_p": (0.0, 1.0),
    "presence_penalty": (-2.0, 2.0),
    "frequency_penalty": (-2.0, 2.0),
}
_POSITIVE_INTS = ("max_tokens", "max_completion_tokens", "n")
_PASSTHROUGH = (
    *_NUMBER_RANGES,
    *_POSITIVE_INTS,
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
MAX_USER_LENGTH = 256


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


def parse_chat_request(body: bytes) -> ChatRequest:
    try:
        data = json.loads(body or b"")
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise bad_request(
            f"The request body is not valid JSON: {exc}", code="invalid_json"
        ) from None
    if not isinstance(data, dict):
        raise bad_request("The request body must be a JSON object.", code="invalid_json")

    model = data.get("model")
    if not isinstance(model, str) or not model.strip():
        raise bad_request("'model' is required and must be a non-empty string.", param="model")

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
    elif not isinstance(content, str | list):
        raise bad_request(
            f"'{param}.content' must be a string or an array of content parts.",
            param=f"{param}.content",
        )
    if role == "tool" and not isinstance(message.get("tool_call_id"), str):
        raise bad_request(
            f"'{param}.tool_call_id' is required for tool messages.", param=f"{param}.tool_call_id"
        )


def _validate_params(params: dict[str, Any]) -> None:
    for name, (low, high) in _NUMBER_RANGES.items():
        if name in params:
            value = params[name]
            if (
                isinstance(value, bool)
                or not isinstance(value, int | float)
                or not low <= value <= high
            ):
                raise bad_request(
                    f"'{name}' must be a number between {low} and {high}.", param=name
                )
    for name in _POSITIVE_INTS:
        if name in params:
            value = params[name]
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise bad_request(f"'{name}' must be a positive integer.", param=name)
    if "n" in params and params["n"] > 8:
        raise bad_request("'n' must be at most 8.", param="n")
    if "logprobs" in params and not isinstance(params["logprobs"], bool):
        raise bad_request("'logprobs' must be a boolean.", param="logprobs")
    if "top_logprobs" in params:
        value = params["top_logprobs"]
        if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= 20:
            raise bad_request(
                "'top_logprobs' must be an integer between 0 and 20.", param="top_logprobs"
            )
        if not params.get("logprobs"):
            raise bad_request(
                "'top_logprobs' requires 'logprobs' to be true.", param="top_logprobs"
            )
    if "tools" in params:
        tools = params["tools"]
        if not isinstance(tools, list) or not all(
            isinstance(t, dict)
            and t.get("type", "function") == "function"
            and isinstance(t.get("function"), dict)
            and isinstance(t["function"].get("name"), str)
            for t in tools
        ):
            raise bad_request(
                '\'tools\' must be an array of {"type": "function", "function": {"name": …}}.',
                param="tools",
            )
    if "response_format" in params:
        fmt = params["response_format"]
        if not isinstance(fmt, dict) or fmt.get("type") not in {
            "text",
            "json_object",
            "json_schema",
        }:
            raise bad_request(
                "'response_format.type' must be 'text', 'json_object' or 'json_schema'.",
                param="response_format",
            )
        if fmt["type"] == "json_schema" and not isinstance(fmt.get("json_schema"), dict):
            raise bad_request(
                "'response_format.json_schema' is required for type 'json_schema'.",
                param="response_format.json_schema",
            )
    if "stop" in params:
        stop = params["stop"]
        if not (
            isinstance(stop, str)
            or (isinstance(stop, list) and all(isinstance(s, str) for s in stop) and len(stop) <= 4)
        ):
            raise bad_request(
                "'stop' must be a string or an array of up to 4 strings.", param="stop"
            )
