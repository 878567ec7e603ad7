"""OpenAI's Responses API (``POST /v1/responses``) on the chat-completions gateway.

A Responses request is translated into the gateway's :class:`ChatRequest` and
runs the path every chat completion runs (``gateway.prepare`` / ``complete`` /
``stream``): admission, budgets, rate limits, the cascade, the ledger, metrics
and traces are the same code. The chat answer is translated back into a
``response`` object, or into the Responses API's typed stream events.

Invariants:

- Every parameter is translated, accepted where its value is the no-op it
  names (``background: false``, ``include: []``, ``truncation: "disabled"``,
  ``null``), or refused by name with a 400 in OpenAI's error shape: nothing a
  client asked for is silently dropped. Unknown parameters are refused too.
- Nothing is stored. ``store`` is accepted and every response says
  ``"store": false``; what needs a stored response (``previous_response_id``,
  ``conversation``, ``item_reference`` items, ``GET /v1/responses/{id}``) is a
  400 (a 404 for the GET), the same for every tenant, so no tenant can learn
  anything about another's responses.
- ``usage`` is the request's ledger row: the tokens of every model the cascade
  called (an escalated request counts its draft too), which is what was paid.
- A stream ends with ``response.completed``, ``response.incomplete`` or
  ``response.failed``, never cut short.
"""

from __future__ import annotations

import json
import logging
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from typing import Any

from routing.errors import GatewayError, bad_request
from routing.schemas import (
    MAX_NAME_LENGTH,
    MAX_OUTPUT_TOKENS,
    MAX_TOOLS,
    ChatRequest,
    json_object,
    parse_chat_request,
)

logger = logging.getLogger(__name__)

# Parameters whose value is translated for the chat path, echoed, or checked below.
_TRANSLATED = frozenset(
    {
        "model",
        "input",
        "instructions",
        "tools",
        "tool_choice",
        "text",
        "max_output_tokens",
        "temperature",
        "top_p",
        "user",
        "metadata",
        "parallel_tool_calls",
        "store",
        "stream",
        "stream_options",
        "reasoning",
        "include",
        "truncation",
        "background",
        "service_tier",
        "top_logprobs",
    }
)
# Parameters CascadeFlow cannot honour: allowed only when null, refused (400) otherwise.
_NOT_STORED = (
    "CascadeFlow does not store responses: send the whole conversation in 'input' "
    "(the previous response's output items, then the new input)."
)
_NULL_ONLY = {
    "previous_response_id": _NOT_STORED,
    "conversation": _NOT_STORED,
    "prompt": "Stored prompts are not supported: send the prompt in 'instructions' and 'input'.",
    "max_tool_calls": "'max_tool_calls' is not supported (built-in tools are not supported).",
    "prompt_cache_key": "'prompt_cache_key' is not supported.",
    "prompt_cache_retention": "'prompt_cache_retention' is not supported.",
    "prompt_cache_options": "'prompt_cache_options' is not supported.",
    "safety_identifier": (
        "'safety_identifier' is not supported: name your end user with 'user' "
        "(tracked and budgeted, never sent to the provider)."
    ),
    "context_management": "'context_management' is not supported.",
    "moderation": "'moderation' is not supported.",
}
KNOWN_PARAMETERS = _TRANSLATED | frozenset(_NULL_ONLY)

MESSAGE_ROLES = ("user", "system", "developer", "assistant")
MAX_METADATA_PAIRS = 16
MAX_METADATA_KEY = 64
MAX_METADATA_VALUE = 512
MAX_SCHEMA_NAME = 64


@dataclass
class ResponsesRequest:
    """A Responses request as the gateway runs it, and what its response object echoes."""

    chat: ChatRequest
    echo: dict[str, Any] = field(default_factory=dict)


def new_id(prefix: str) -> str:
    return f"{prefix}_{uuid.uuid4().hex}"


def response_id_for(request_id: str) -> str:
    """``resp_<hex>`` for ``req_<hex>``: a response names its ledger row."""
    return "resp_" + request_id.removeprefix("req_")


# --- request --------------------------------------------------------------------------


def _unsupported(message: str, param: str, code: str = "unsupported_parameter") -> GatewayError:
    return bad_request(message, param=param, code=code)


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _name(value: Any) -> str:
    """A client's name, shortened for an error message."""
    text = value if isinstance(value, str) else json.dumps(value)[:64]
    return text if len(text) <= 64 else text[:61] + "..."


def parse_responses_request(body: bytes) -> ResponsesRequest:
    data = json_object(body)
    for key in data:
        if key not in KNOWN_PARAMETERS:
            raise bad_request(
                f"Unknown parameter: '{_name(key)}'.", param=_name(key), code="unknown_parameter"
            )
    for key, message in _NULL_ONLY.items():
        if data.get(key) is not None:
            raise _unsupported(message, key)
    _check_noops(data)

    messages, origins = _messages(data)
    tools, tools_echo = _tools(data.get("tools"))
    names = {t["function"]["name"] for t in tools}
    tool_choice, tool_choice_echo = _tool_choice(data.get("tool_choice"), names)
    response_format, format_echo = _text(data.get("text"))
    max_output = data.get("max_output_tokens")
    if max_output is not None and (
        not _is_int(max_output) or not 1 <= max_output <= MAX_OUTPUT_TOKENS
    ):
        raise bad_request(
            f"'max_output_tokens' must be an integer between 1 and {MAX_OUTPUT_TOKENS}.",
            param="max_output_tokens",
        )
    parallel = data.get("parallel_tool_calls")
    if parallel is not None and not isinstance(parallel, bool):
        raise bad_request("'parallel_tool_calls' must be a boolean.", param="parallel_tool_calls")
    effort = _reasoning_effort(data.get("reasoning"))
    metadata = _metadata(data.get("metadata"))
    stream = data.get("stream")
    if stream is not None and not isinstance(stream, bool):
        raise bad_request("'stream' must be a boolean.", param="stream")
    _stream_options(data.get("stream_options"), bool(stream))

    chat_body: dict[str, Any] = {"model": data.get("model"), "messages": messages}
    for name in ("temperature", "top_p", "user"):
        if data.get(name) is not None:
            chat_body[name] = data[name]
    if stream:
        chat_body["stream"] = True
    if max_output is not None:
        chat_body["max_completion_tokens"] = max_output
    if tools:
        chat_body["tools"] = tools
        if tool_choice is not None:
            chat_body["tool_choice"] = tool_choice
        if parallel is not None:
            chat_body["parallel_tool_calls"] = parallel
    if response_format is not None:
        chat_body["response_format"] = response_format
    if effort is not None:
        chat_body["reasoning_effort"] = effort
    try:
        chat = parse_chat_request(json.dumps(chat_body).encode())
    except GatewayError as exc:
        raise _in_responses_terms(exc, origins) from None
    # The usage chunk's cached and reasoning token counts reach the final event.
    chat.include_usage = chat.stream

    echo = {
        "instructions": data.get("instructions"),
        "max_output_tokens": max_output,
        "max_tool_calls": None,
        "metadata": metadata,
        "parallel_tool_calls": True if parallel is None else parallel,
        "previous_response_id": None,
        "reasoning": {"effort": effort, "summary": None},
        "service_tier": "default",
        "store": False,
        "temperature": data.get("temperature"),
        "text": {"format": format_echo},
        "tool_choice": tool_choice_echo,
        "tools": tools_echo,
        "top_logprobs": 0,
        "top_p": data.get("top_p"),
        "truncation": "disabled",
        "user": data.get("user"),
    }
    return ResponsesRequest(chat=chat, echo=echo)


def _check_noops(data: dict[str, Any]) -> None:
    """Parameters accepted only at the value that asks for nothing CascadeFlow lacks."""
    if data.get("background") not in (None, False):
        raise _unsupported(
            "Background responses are not supported: 'background' must be false.", "background"
        )
    if data.get("store") is not None and not isinstance(data["store"], bool):
        raise bad_request("'store' must be a boolean.", param="store")
    include = data.get("include")
    if include is not None:
        if not isinstance(include, list):
            raise bad_request("'include' must be an array.", param="include")
        if include:
            raise _unsupported(
                f"'include' is not supported (asked for {_name(include)}): CascadeFlow "
                "returns no extra output data.",
                "include",
            )
    if data.get("truncation") not in (None, "disabled"):
        raise _unsupported(
            "Only 'truncation': 'disabled' is supported: send an input that fits the model.",
            "truncation",
        )
    if data.get("service_tier") not in (None, "auto", "default"):
        raise _unsupported(
            "'service_tier' must be 'auto' or 'default' (CascadeFlow picks the model).",
            "service_tier",
        )
    if data.get("top_logprobs") not in (None, 0):
        raise _unsupported("'top_logprobs' is not supported.", "top_logprobs")
    instructions = data.get("instructions")
    if instructions is not None and not isinstance(instructions, str):
        raise bad_request(
            "'instructions' must be a string (a system message).", param="instructions"
        )


def _stream_options(options: Any, stream: bool) -> None:
    if options is None:
        return
    if not isinstance(options, dict):
        raise bad_request("'stream_options' must be an object.", param="stream_options")
    if not stream:
        raise bad_request(
            "'stream_options' is only allowed when 'stream' is true.", param="stream_options"
        )
    for key, value in options.items():
        if key != "include_obfuscation":
            raise bad_request(
                f"Unknown parameter: 'stream_options.{_name(key)}'.",
                param=f"stream_options.{_name(key)}",
                code="unknown_parameter",
            )
        if value is not None and not isinstance(value, bool):
            raise bad_request(
                "'stream_options.include_obfuscation' must be a boolean.",
                param="stream_options.include_obfuscation",
            )


def _reasoning_effort(reasoning: Any) -> str | None:
    if reasoning is None:
        return None
    if not isinstance(reasoning, dict):
        raise bad_request("'reasoning' must be an object.", param="reasoning")
    for key, value in reasoning.items():
        if key == "effort":
            if value is not None and not (isinstance(value, str) and 0 < len(value) <= 32):
                raise bad_request("'reasoning.effort' must be a string.", param="reasoning.effort")
        elif value is not None:
            raise _unsupported(
                f"'reasoning.{_name(key)}' is not supported: reasoning summaries and "
                "reasoning items are not returned.",
                f"reasoning.{_name(key)}",
            )
    return reasoning.get("effort")


def _metadata(metadata: Any) -> dict[str, str]:
    if metadata is None:
        return {}
    if (
        not isinstance(metadata, dict)
        or len(metadata) > MAX_METADATA_PAIRS
        or not all(
            len(k) <= MAX_METADATA_KEY and isinstance(v, str) and len(v) <= MAX_METADATA_VALUE
            for k, v in metadata.items()
        )
    ):
        raise bad_request(
            f"'metadata' must be an object of up to {MAX_METADATA_PAIRS} string values, keys of "
            f"at most {MAX_METADATA_KEY} characters and values of at most "
            f"{MAX_METADATA_VALUE}.",
            param="metadata",
        )
    return metadata


# --- input ----------------------------------------------------------------------------


def _messages(data: dict[str, Any]) -> tuple[list[dict[str, Any]], list[str]]:
    """The chat messages, and for each the Responses parameter it came from."""
    messages: list[dict[str, Any]] = []
    origins: list[str] = []
    instructions = data.get("instructions")
    if instructions is not None:
        messages.append({"role": "system", "content": instructions})
        origins.append("instructions")
    items = data.get("input")
    if isinstance(items, str):
        messages.append({"role": "user", "content": items})
        origins.append("input")
        return messages, origins
    if not isinstance(items, list) or not items:
        raise bad_request(
            "'input' is required: a string or a non-empty array of input items.", param="input"
        )
    calls: set[str] = set()
    for index, item in enumerate(items):
        where = f"input[{index}]"
        if not isinstance(item, dict):
            raise bad_request(f"'{where}' must be an input item object.", param=where)
        kind = item.get("type", "message" if "role" in item else None)
        if kind == "message":
            messages.append(_message(item, where))
            origins.append(where)
        elif kind == "function_call":
            call = _function_call(item, where)
            calls.add(call["id"])
            if messages and messages[-1]["role"] == "assistant":  # one turn, several calls
                messages[-1].setdefault("tool_calls", []).append(call)
                if messages[-1].get("content") == "":
                    messages[-1]["content"] = None
            else:
                messages.append({"role": "assistant", "content": None, "tool_calls": [call]})
                origins.append(where)
        elif kind == "function_call_output":
            messages.append(_function_call_output(item, where, calls))
            origins.append(where)
        elif kind in ("reasoning", "item_reference"):
            reason = (
                "reasoning items are not supported (CascadeFlow returns none)"
                if kind == "reasoning"
                else "item references need stored responses, which CascadeFlow does not keep"
            )
            raise _unsupported(
                f"'{where}': {reason}; send messages, function_call and function_call_output "
                "items.",
                f"{where}.type",
                code="unsupported_input",
            )
        else:
            raise _unsupported(
                f"'{where}.type' {_name(kind)} is not supported: input items are messages, "
                "function_call and function_call_output (built-in tool items are not "
                "supported).",
                f"{where}.type",
                code="unsupported_input",
            )
    return messages, origins


def _message(item: dict[str, Any], where: str) -> dict[str, Any]:
    role = item.get("role")
    if role not in MESSAGE_ROLES:
        raise bad_request(
            f"'{where}.role' must be one of {', '.join(MESSAGE_ROLES)}.", param=f"{where}.role"
        )
    content = item.get("content")
    if isinstance(content, str):
        return {"role": role, "content": content}
    if not isinstance(content, list):
        raise bad_request(
            f"'{where}.content' must be a string or an array of content parts.",
            param=f"{where}.content",
        )
    parts = [_part(part, role, f"{where}.content[{i}]") for i, part in enumerate(content)]
    if role == "assistant" and all(p["type"] == "text" for p in parts):
        return {"role": role, "content": "".join(p["text"] for p in parts)}
    return {"role": role, "content": parts}


def _part(part: Any, role: str, where: str) -> dict[str, Any]:
    kind = part.get("type") if isinstance(part, dict) else None
    allowed = (
        ("input_text", "output_text", "refusal")
        if role == "assistant"
        else ("input_text", "input_image", "input_file")
        if role == "user"
        else ("input_text",)
    )
    if kind not in allowed:
        raise _unsupported(
            f"'{where}' must be a content part with 'type' one of {', '.join(allowed)} "
            f"(a {role} message).",
            where,
            code="unsupported_input",
        )
    assert isinstance(part, dict)
    if kind in ("input_text", "output_text"):
        if not isinstance(part.get("text"), str):
            raise bad_request(f"'{where}.text' must be a string.", param=f"{where}.text")
        return {"type": "text", "text": part["text"]}
    if kind == "refusal":
        if not isinstance(part.get("refusal"), str):
            raise bad_request(f"'{where}.refusal' must be a string.", param=f"{where}.refusal")
        return {"type": "refusal", "refusal": part["refusal"]}
    if kind == "input_image":
        url = part.get("image_url")
        if not isinstance(url, str) or not url:
            raise _unsupported(
                f"'{where}': only images given by 'image_url' (a URL or a data URL) are "
                "supported; file ids need OpenAI's Files API.",
                f"{where}.image_url",
                code="unsupported_input",
            )
        image: dict[str, Any] = {"url": url}
        if part.get("detail") is not None:
            if part["detail"] not in ("auto", "low", "high"):
                raise bad_request(
                    f"'{where}.detail' must be 'auto', 'low' or 'high'.", param=f"{where}.detail"
                )
            image["detail"] = part["detail"]
        return {"type": "image_url", "image_url": image}
    # input_file
    if part.get("file_url") is not None:
        raise _unsupported(
            f"'{where}.file_url' is not supported: send the file in 'file_data'.",
            f"{where}.file_url",
            code="unsupported_input",
        )
    file: dict[str, Any] = {}
    for key in ("file_data", "file_id", "filename"):
        if part.get(key) is not None:
            if not isinstance(part[key], str):
                raise bad_request(f"'{where}.{key}' must be a string.", param=f"{where}.{key}")
            file[key] = part[key]
    if not (file.get("file_data") or file.get("file_id")):
        raise bad_request(f"'{where}' needs 'file_data' or 'file_id'.", param=where)
    return {"type": "file", "file": file}


def _function_call(item: dict[str, Any], where: str) -> dict[str, Any]:
    for key in ("call_id", "name"):
        value = item.get(key)
        if not isinstance(value, str) or not value or len(value) > MAX_NAME_LENGTH:
            raise bad_request(
                f"'{where}.{key}' must be a string of 1 to {MAX_NAME_LENGTH} characters.",
                param=f"{where}.{key}",
            )
    arguments = item.get("arguments", "")
    if not isinstance(arguments, str):
        raise bad_request(
            f"'{where}.arguments' must be a string (JSON text).", param=f"{where}.arguments"
        )
    return {
        "id": item["call_id"],
        "type": "function",
        "function": {"name": item["name"], "arguments": arguments},
    }


def _function_call_output(item: dict[str, Any], where: str, calls: set[str]) -> dict[str, Any]:
    call_id = item.get("call_id")
    if not isinstance(call_id, str) or call_id not in calls:
        raise bad_request(
            f"'{where}.call_id' must name a function_call item earlier in 'input'.",
            param=f"{where}.call_id",
        )
    output = item.get("output")
    if isinstance(output, list):
        texts = []
        for i, part in enumerate(output):
            if not isinstance(part, dict) or part.get("type") != "input_text":
                raise _unsupported(
                    f"'{where}.output[{i}]': only input_text parts are supported in a "
                    "function call's output.",
                    f"{where}.output[{i}]",
                    code="unsupported_input",
                )
            if not isinstance(part.get("text"), str):
                raise bad_request(
                    f"'{where}.output[{i}].text' must be a string.",
                    param=f"{where}.output[{i}].text",
                )
            texts.append({"type": "text", "text": part["text"]})
        return {"role": "tool", "tool_call_id": call_id, "content": texts}
    if not isinstance(output, str):
        raise bad_request(
            f"'{where}.output' must be a string or an array of input_text parts.",
            param=f"{where}.output",
        )
    return {"role": "tool", "tool_call_id": call_id, "content": output}


# --- tools and formats ----------------------------------------------------------------


def _tools(tools: Any) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """Responses' flat function tools as chat's nested ones, and as the response echoes them."""
    if tools is None:
        return [], []
    if not isinstance(tools, list) or len(tools) > MAX_TOOLS:
        raise bad_request(f"'tools' must be an array of up to {MAX_TOOLS} tools.", param="tools")
    chat_tools, echo = [], []
    seen: set[str] = set()
    for i, tool in enumerate(tools):
        where = f"tools[{i}]"
        if not isinstance(tool, dict):
            raise bad_request(f"'{where}' must be a tool object.", param=where)
        kind = tool.get("type")
        if kind != "function":
            raise _unsupported(
                f"Tool type {_name(kind)} is not supported: CascadeFlow runs function tools "
                "only (built-in tools such as web_search, file_search, code_interpreter, "
                "computer use, image generation and MCP are not available).",
                f"{where}.type",
                code="unsupported_tool",
            )
        name = tool.get("name")
        if not isinstance(name, str) or not name or len(name) > MAX_NAME_LENGTH:
            raise bad_request(
                f"'{where}.name' must be a string of 1 to {MAX_NAME_LENGTH} characters.",
                param=f"{where}.name",
            )
        if name in seen:
            raise bad_request(
                f"'{where}.name': two tools are named {name!r}.", param=f"{where}.name"
            )
        seen.add(name)
        for key in ("description", "parameters", "strict"):
            value = tool.get(key)
            if value is None:
                continue
            ok = {"description": str, "parameters": dict, "strict": bool}[key]
            if not isinstance(value, ok):
                kind_name = {"description": "a string", "parameters": "a JSON Schema object"}
                raise bad_request(
                    f"'{where}.{key}' must be {kind_name.get(key, 'a boolean')}.",
                    param=f"{where}.{key}",
                )
        _check_tool_extras(tool, where)
        function = {
            k: tool[k]
            for k in ("name", "description", "parameters", "strict")
            if tool.get(k) is not None
        }
        chat_tools.append({"type": "function", "function": function})
        echo.append(
            {
                "type": "function",
                "name": name,
                "description": tool.get("description"),
                "parameters": tool.get("parameters"),
                "strict": tool.get("strict"),
            }
        )
    return chat_tools, echo


# A function tool's other fields, each accepted at the value that asks for nothing more.
_TOOL_NOOPS = {"defer_loading": (False,), "allowed_callers": (["direct"],)}
_TOOL_UNSUPPORTED = ("defer_loading", "allowed_callers", "output_schema")


def _check_tool_extras(tool: dict[str, Any], where: str) -> None:
    for key, value in tool.items():
        if key in ("type", "name", "description", "parameters", "strict") or value is None:
            continue
        if value in _TOOL_NOOPS.get(key, ()):
            continue
        if key in _TOOL_UNSUPPORTED:
            raise _unsupported(f"'{where}.{key}' is not supported.", f"{where}.{key}")
        raise bad_request(
            f"Unknown parameter: '{where}.{_name(key)}'.",
            param=f"{where}.{_name(key)}",
            code="unknown_parameter",
        )


def _tool_choice(choice: Any, names: set[str]) -> tuple[Any, Any]:
    """Chat's ``tool_choice`` (None: not sent), and the response's echo of it."""
    if choice is None:
        return None, "auto"
    if choice in ("none", "auto"):
        return choice, choice
    if choice == "required":
        if not names:
            raise bad_request(
                "'tool_choice' 'required' needs at least one function tool.", param="tool_choice"
            )
        return choice, choice
    if isinstance(choice, dict) and choice.get("type") == "function":
        name = choice.get("name")
        if not isinstance(name, str) or name not in names:
            raise bad_request(
                "'tool_choice.name' must name one of the function tools in 'tools'.",
                param="tool_choice.name",
            )
        return {"type": "function", "function": {"name": name}}, {"type": "function", "name": name}
    if isinstance(choice, dict) and isinstance(choice.get("type"), str):
        raise _unsupported(
            f"'tool_choice' of type {_name(choice['type'])} is not supported: use 'none', "
            '\'auto\', \'required\' or {"type": "function", "name": …}.',
            "tool_choice",
        )
    raise bad_request(
        "'tool_choice' must be 'none', 'auto', 'required' or "
        '{"type": "function", "name": …}.',
        param="tool_choice",
    )


def _text(text: Any) -> tuple[dict[str, Any] | None, dict[str, Any]]:
    """``text.format`` as chat's ``response_format`` (None: plain text), and its echo."""
    plain = {"type": "text"}
    if text is None:
        return None, plain
    if not isinstance(text, dict):
        raise bad_request("'text' must be an object.", param="text")
    for key, value in text.items():
        if key == "format":
            continue
        if key == "verbosity" and value in (None, "medium"):
            continue
        raise _unsupported(f"'text.{_name(key)}' is not supported.", f"text.{_name(key)}")
    fmt = text.get("format")
    if fmt is None:
        return None, plain
    if not isinstance(fmt, dict) or fmt.get("type") not in ("text", "json_object", "json_schema"):
        raise bad_request(
            "'text.format.type' must be 'text', 'json_object' or 'json_schema'.",
            param="text.format",
        )
    if fmt["type"] == "text":
        return None, plain
    if fmt["type"] == "json_object":
        return {"type": "json_object"}, {"type": "json_object"}
    name = fmt.get("name")
    if not isinstance(name, str) or not name or len(name) > MAX_SCHEMA_NAME:
        raise bad_request(
            f"'text.format.name' must be a string of 1 to {MAX_SCHEMA_NAME} characters.",
            param="text.format.name",
        )
    if not isinstance(fmt.get("schema"), dict):
        raise bad_request(
            "'text.format.schema' must be a JSON Schema object.", param="text.format.schema"
        )
    if fmt.get("description") is not None and not isinstance(fmt["description"], str):
        raise bad_request(
            "'text.format.description' must be a string.", param="text.format.description"
        )
    if fmt.get("strict") is not None and not isinstance(fmt["strict"], bool):
        raise bad_request("'text.format.strict' must be a boolean.", param="text.format.strict")
    spec = {
        k: fmt[k] for k in ("name", "schema", "description", "strict") if fmt.get(k) is not None
    }
    return {"type": "json_schema", "json_schema": spec}, {"type": "json_schema", **spec}


def _in_responses_terms(exc: GatewayError, origins: list[str]) -> GatewayError:
    """A chat validation error, naming the Responses parameter it came from."""
    param = exc.param or ""
    if param.startswith("messages["):
        index = int(param[len("messages[") : param.index("]")])
        param = origins[index] if index < len(origins) else "input"
    elif param.startswith("max_completion_tokens"):
        param = "max_output_tokens"
    elif param.startswith("response_format"):
        param = "text.format"
    elif param.startswith("tools["):
        param = param.replace(".function", "", 1)
    elif param == "reasoning_effort":
        param = "reasoning.effort"
    exc.param = param or exc.param
    return exc


# --- response -------------------------------------------------------------------------


def usage(prompt_tokens: int, completion_tokens: int, chat_usage: Any = None) -> dict[str, Any]:
    """Responses' usage for the ledger row's tokens (cached and reasoning counts from the
    answering model's own usage, where it reports them)."""
    chat_usage = chat_usage if isinstance(chat_usage, dict) else {}
    prompt_details = chat_usage.get("prompt_tokens_details") or {}
    completion_details = chat_usage.get("completion_tokens_details") or {}
    cached = prompt_details.get("cached_tokens") if isinstance(prompt_details, dict) else 0
    reasoning = (
        completion_details.get("reasoning_tokens") if isinstance(completion_details, dict) else 0
    )
    return {
        "input_tokens": prompt_tokens,
        "input_tokens_details": {"cached_tokens": min(int(cached or 0), prompt_tokens)},
        "output_tokens": completion_tokens,
        "output_tokens_details": {"reasoning_tokens": min(int(reasoning or 0), completion_tokens)},
        "total_tokens": prompt_tokens + completion_tokens,
    }


def ledger_tokens(entry: Any) -> tuple[int, int] | None:
    """The (prompt, completion) tokens of a ledger row, once it is written."""
    return None if entry is None else (entry.prompt_tokens, entry.completion_tokens)


def incomplete_details(finish_reason: str | None) -> dict[str, str] | None:
    if finish_reason == "length":
        return {"reason": "max_output_tokens"}
    if finish_reason == "content_filter":
        return {"reason": "content_filter"}
    return None


def response_object(
    req: ResponsesRequest,
    *,
    response_id: str,
    created_at: int,
    model: str,
    status: str,
    output: list[dict[str, Any]],
    usage: dict[str, Any] | None,
    error: dict[str, Any] | None = None,
    incomplete: dict[str, str] | None = None,
) -> dict[str, Any]:
    return {
        "id": response_id,
        "object": "response",
        "created_at": created_at,
        "status": status,
        "background": False,
        "error": error,
        "incomplete_details": incomplete,
        **req.echo,
        "model": model,
        "output": output,
        "usage": usage,
    }


def _text_part(text: str) -> dict[str, Any]:
    return {"type": "output_text", "text": text, "annotations": [], "logprobs": []}


def _message_item(item_id: str, parts: list[dict[str, Any]], status: str) -> dict[str, Any]:
    return {
        "id": item_id,
        "type": "message",
        "status": status,
        "role": "assistant",
        "content": parts,
    }


def _call_item(item_id: str, call_id: str, name: str, arguments: str, status: str) -> dict:
    return {
        "id": item_id,
        "type": "function_call",
        "status": status,
        "call_id": call_id,
        "name": name,
        "arguments": arguments,
    }


def output_of(body: dict[str, Any]) -> tuple[list[dict[str, Any]], str | None]:
    """A chat completion's first choice as Responses output items, and its finish reason."""
    choices = body.get("choices") or [{}]
    choice = choices[0] if isinstance(choices[0], dict) else {}
    message = choice.get("message") or {}
    finish = choice.get("finish_reason")
    status = "incomplete" if incomplete_details(finish) else "completed"
    content = message.get("content")
    if isinstance(content, list):  # content parts, as some providers answer
        content = "".join(p.get("text") or "" for p in content if isinstance(p, dict))
    refusal = message.get("refusal")
    calls = [c for c in message.get("tool_calls") or [] if isinstance(c, dict)]
    parts: list[dict[str, Any]] = []
    if isinstance(content, str) and (content or not (calls or refusal)):
        parts.append(_text_part(content))
    elif content is None and not (calls or refusal):
        parts.append(_text_part(""))
    if isinstance(refusal, str) and refusal:
        parts.append({"type": "refusal", "refusal": refusal})
    output = [_message_item(new_id("msg"), parts, status)] if parts else []
    for call in calls:
        function = call.get("function") or {}
        output.append(
            _call_item(
                new_id("fc"),
                call.get("id") or new_id("call"),
                function.get("name") or "",
                function.get("arguments") or "",
                "completed",
            )
        )
    return output, finish


def response_from_completion(
    req: ResponsesRequest,
    body: dict[str, Any],
    *,
    request_id: str,
    tokens: tuple[int, int] | None,
) -> dict[str, Any]:
    """The response object of a chat completion (``tokens``: the ledger row's, when written)."""
    output, finish = output_of(body)
    chat_usage = body.get("usage") if isinstance(body.get("usage"), dict) else {}
    if tokens is None:
        tokens = (
            int(chat_usage.get("prompt_tokens") or 0),
            int(chat_usage.get("completion_tokens") or 0),
        )
    incomplete = incomplete_details(finish)
    return response_object(
        req,
        response_id=response_id_for(request_id),
        created_at=int(body.get("created") or time.time()),
        model=body.get("model") or req.chat.model,
        status="incomplete" if incomplete else "completed",
        output=output,
        usage=usage(*tokens, chat_usage),
        incomplete=incomplete,
    )


# --- streaming ------------------------------------------------------------------------


def _sse_payloads(block: str) -> Iterator[tuple[str, str]]:
    """The lines of one SSE block from the chat stream: ("data", text) or ("comment", text)."""
    data: list[str] = []
    for line in block.split("\n"):
        if line.startswith("data:"):
            data.append(line[5:].removeprefix(" "))
        elif line.startswith(":"):
            yield "comment", line
    if data:
        yield "data", "\n".join(data)


@dataclass
class _Part:
    kind: str  # "output_text" | "refusal"
    pieces: list[str] = field(default_factory=list)

    @property
    def value(self) -> str:
        return "".join(self.pieces)

    def shape(self) -> dict[str, Any]:
        if self.kind == "refusal":
            return {"type": "refusal", "refusal": self.value}
        return _text_part(self.value)


@dataclass
class _Call:
    call_id: str = ""
    name: str = ""
    fragments: list[str] = field(default_factory=list)


@dataclass
class ResponseStream:
    """Chat completion chunks in, Responses stream events out (``event:`` + ``data:``).

    Text streams as it comes; tool calls are put together from their deltas and
    sent as ``function_call`` items, with their argument deltas, once the
    model's answer is complete, so an item never has to be reopened whatever
    order a provider interleaves calls and text in.
    """

    req: ResponsesRequest
    response_id: str
    model: str
    created_at: int = field(default_factory=lambda: int(time.time()))
    sequence: int = 0
    output: list[dict[str, Any]] = field(default_factory=list)
    message_id: str | None = None
    parts: list[_Part] = field(default_factory=list)
    calls: dict[int, _Call] = field(default_factory=dict)
    finish_reason: str | None = None
    chat_usage: dict[str, Any] = field(default_factory=dict)

    def event(self, kind: str, **fields: Any) -> str:
        data = {"type": kind, "sequence_number": self.sequence, **fields}
        self.sequence += 1
        return f"event: {kind}\ndata: {json.dumps(data, separators=(',', ':'))}\n\n"

    def response(self, status: str, **extra: Any) -> dict[str, Any]:
        return response_object(
            self.req,
            response_id=self.response_id,
            created_at=self.created_at,
            model=self.model,
            status=status,
            output=list(self.output),
            usage=extra.pop("usage", None),
            **extra,
        )

    def start(self) -> Iterator[str]:
        yield self.event("response.created", response=self.response("in_progress"))
        yield self.event("response.in_progress", response=self.response("in_progress"))

    def feed(self, chunk: dict[str, Any]) -> Iterator[str]:
        self.model = chunk.get("model") or self.model
        if isinstance(chunk.get("usage"), dict):
            self.chat_usage = chunk["usage"]
        for choice in chunk.get("choices") or []:
            if not isinstance(choice, dict) or choice.get("index", 0) != 0:
                continue
            delta = choice.get("delta") or {}
            for kind, key in (("output_text", "content"), ("refusal", "refusal")):
                piece = delta.get(key)
                if isinstance(piece, str) and piece:
                    yield from self._text(kind, piece)
            for call in delta.get("tool_calls") or []:
                if not isinstance(call, dict):
                    continue
                slot = self.calls.setdefault(int(call.get("index") or 0), _Call())
                slot.call_id = call.get("id") or slot.call_id
                function = call.get("function") or {}
                slot.name += function.get("name") or ""
                if function.get("arguments"):
                    slot.fragments.append(function["arguments"])
            self.finish_reason = choice.get("finish_reason") or self.finish_reason

    @property
    def _index(self) -> int:
        return len(self.output)

    def _text(self, kind: str, piece: str) -> Iterator[str]:
        if self.message_id is None:
            self.message_id = new_id("msg")
            item = _message_item(self.message_id, [], "in_progress")
            yield self.event("response.output_item.added", output_index=self._index, item=item)
        if not self.parts or self.parts[-1].kind != kind:
            if self.parts:
                yield from self._close_part()
            self.parts.append(_Part(kind))
            yield self.event(
                "response.content_part.added",
                item_id=self.message_id,
                output_index=self._index,
                content_index=len(self.parts) - 1,
                part=_Part(kind).shape(),
            )
        self.parts[-1].pieces.append(piece)
        where = {
            "item_id": self.message_id,
            "output_index": self._index,
            "content_index": len(self.parts) - 1,
        }
        if kind == "refusal":
            yield self.event("response.refusal.delta", **where, delta=piece)
        else:
            yield self.event("response.output_text.delta", **where, delta=piece, logprobs=[])

    def _close_part(self) -> Iterator[str]:
        part = self.parts[-1]
        where = {
            "item_id": self.message_id,
            "output_index": self._index,
            "content_index": len(self.parts) - 1,
        }
        if part.kind == "refusal":
            yield self.event("response.refusal.done", **where, refusal=part.value)
        else:
            yield self.event("response.output_text.done", **where, text=part.value, logprobs=[])
        yield self.event("response.content_part.done", **where, part=part.shape())

    def _item_status(self) -> str:
        return "incomplete" if incomplete_details(self.finish_reason) else "completed"

    def _close_message(self, status: str) -> Iterator[str]:
        if self.message_id is None:
            return
        if self.parts:
            yield from self._close_part()
        item = _message_item(self.message_id, [p.shape() for p in self.parts], status)
        yield self.event("response.output_item.done", output_index=self._index, item=item)
        self.output.append(item)
        self.message_id, self.parts = None, []

    def finish(self, tokens: tuple[int, int]) -> Iterator[str]:
        status = self._item_status()
        if self.message_id is None and not self.calls:
            yield from self._text("output_text", "")  # an answer with no text is "" (as unstreamed)
        yield from self._close_message(status)
        for index in sorted(self.calls):
            call = self.calls[index]
            item = _call_item(
                new_id("fc"), call.call_id or new_id("call"), call.name, "", "in_progress"
            )
            output_index = self._index
            yield self.event("response.output_item.added", output_index=output_index, item=item)
            for fragment in call.fragments:
                yield self.event(
                    "response.function_call_arguments.delta",
                    item_id=item["id"],
                    output_index=output_index,
                    delta=fragment,
                )
            item = {**item, "arguments": "".join(call.fragments), "status": "completed"}
            yield self.event(
                "response.function_call_arguments.done",
                item_id=item["id"],
                output_index=output_index,
                name=call.name,
                arguments=item["arguments"],
            )
            yield self.event("response.output_item.done", output_index=output_index, item=item)
            self.output.append(item)
        incomplete = incomplete_details(self.finish_reason)
        final = self.response(
            "incomplete" if incomplete else "completed",
            usage=usage(*tokens, self.chat_usage),
            incomplete=incomplete,
        )
        yield self.event(
            "response.incomplete" if incomplete else "response.completed", response=final
        )

    def fail(self, error: dict[str, Any], tokens: tuple[int, int] | None) -> Iterator[str]:
        """The stream's last event when the answer could not be completed."""
        if self.message_id is not None:
            item = _message_item(self.message_id, [p.shape() for p in self.parts], "incomplete")
            self.output.append(item)
            self.message_id, self.parts = None, []
        code = str(error.get("code") or "server_error")
        message = str(error.get("message") or "The answer could not be completed.")
        failed = self.response(
            "failed",
            usage=usage(*tokens) if tokens is not None else None,
            error={
                "code": "rate_limit_exceeded" if "rate_limit" in code else "server_error",
                "message": f"{message} ({code})",
            },
        )
        yield self.event("response.failed", response=failed)


async def stream_events(
    req: ResponsesRequest,
    chunks: AsyncIterator[str],
    *,
    request_id: str,
    model: str,
    tokens: Any,
) -> AsyncIterator[str]:
    """The Responses events of one chat stream (``chunks``: the gateway's SSE text).

    ``tokens()`` gives the ledger row's tokens once the chat stream has ended
    (the gateway writes the row before its ``[DONE]``).
    """
    out = ResponseStream(req, response_id_for(request_id), model)
    done, failure = False, None
    try:
        for event in out.start():
            yield event
        async for block in chunks:
            for kind, text in _sse_payloads(block):
                if kind == "comment":
                    yield text + "\n\n"  # the gateway's ": cascade {...}" summary
                    continue
                if text == "[DONE]":
                    done = True
                    continue
                try:
                    data = json.loads(text)
                except ValueError:
                    logger.warning("Unreadable chat chunk in response %s", request_id)
                    continue
                if not isinstance(data, dict):
                    continue
                if data.get("error"):
                    failure = data["error"] if isinstance(data["error"], dict) else {}
                    continue
                for event in out.feed(data):
                    yield event
        if failure is None and not done:
            failure = {"code": "stream_ended", "message": "The answer's stream ended early."}
        if failure is not None:
            for event in out.fail(failure, tokens()):
                yield event
            return
        for event in out.finish(tokens() or (0, 0)):
            yield event
    except Exception:
        # The status line is sent: the stream ends with response.failed, never cut short.
        logger.exception("Unhandled error in the stream of %s", request_id)
        await chunks.aclose()  # type: ignore[attr-defined]
        error = {
            "code": "internal_error",
            "message": f"CascadeFlow failed to handle request {request_id}.",
        }
        for event in out.fail(error, tokens()):
            yield event
    finally:
        await chunks.aclose()  # type: ignore[attr-defined]
