"""Function calling in Qwen2.5's format: tool specs into the prompt, <tool_call> blocks out.

    tools = [{"type": "function", "function": {
        "name": "get_weather", "description": "Current weather in a city",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}},
                       "required": ["city"]}}}]
    ids = tok.encode_chat(messages, tools=tools)
    reply = tok.decode(generated_ids)
    content, calls = parse_tool_calls(reply)
    messages.append({"role": "assistant", "content": content,
                     "tool_calls": [call.to_dict() for call in calls]})
    for call in calls:
        messages.append({"role": "tool", "content": json.dumps(run(call.name, call.arguments))})

Qwen2.5-Instruct lists the tools as JSON lines in its system turn and answers a call as
`<tool_call>\\n{"name": ..., "arguments": {...}}\\n</tool_call>`; tool results go back to it in a
user turn, each inside <tool_response></tool_response>. The Jinja template shipped with the
checkpoint does that rendering; the strings here reproduce it for tokenizers that have no
template (see qwen2.chatml.render_chatml).
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from dataclasses import dataclass, field

from .errors import TokenizerError

TOOL_CALL_OPEN = "<tool_call>"
TOOL_CALL_CLOSE = "</tool_call>"

# Verbatim from Qwen2.5-Instruct's chat template: what follows the system prompt when tools are given.
TOOLS_HEADER = (
    "\n\n# Tools\n\nYou may call one or more functions to assist with the user query.\n\n"
    "You are provided with function signatures within <tools></tools> XML tags:\n<tools>"
)
TOOLS_FOOTER = (
    "\n</tools>\n\nFor each function call, return a json object with function name and arguments "
    "within <tool_call></tool_call> XML tags:\n<tool_call>\n"
    "{\"name\": <function-name>, \"arguments\": <args-json-object>}\n</tool_call>"
)

# parse_tool_calls leaves larger blocks, and calls past this many, as text: a reply that long is
# not a call the model meant, and json.loads on it would only cost time.
MAX_TOOL_CALL_CHARS = 100_000
MAX_TOOL_CALLS = 64

# The name is written into the prompt unescaped (`{"name": "<name>", ...`), so a quote or a newline
# in it would break the JSON the model is trained on. OpenAI's rule, plus '.'.
_TOOL_NAME = re.compile(r"[A-Za-z0-9_.\-]{1,64}")


@dataclass(frozen=True)
class ToolCall:
    """One function call the model asked for."""

    name: str
    arguments: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        """The call as an assistant message's `tool_calls` entry (OpenAI's shape)."""
        return {"type": "function", "function": {"name": self.name, "arguments": self.arguments}}


# --------------------------------------------------------------------------------------------
# Tool specs


def validate_tools(tools) -> list[dict] | None:
    """Check `tools` and return a plain-JSON copy of it (None stays None).

    Each tool is OpenAI's `{"type": "function", "function": {"name", "description",
    "parameters"}}` or the bare `{"name", "description", "parameters"}` that transformers also
    accepts; it is passed to the template as given, since the template prints it as JSON.
    Raises TokenizerError naming the tool and the field at fault.
    """
    if tools is None:
        return None
    if not isinstance(tools, (list, tuple)):
        raise TokenizerError(f"tools must be a list of function specs, got {type(tools).__name__}")
    names: dict[str, int] = {}
    out = []
    for i, tool in enumerate(tools):
        spec, where = _tool_spec(tool, i)
        _check_spec(spec, where)
        if spec["name"] in names:
            raise TokenizerError(
                f"{where}.name {spec['name']!r} is already the name of tools[{names[spec['name']]}]"
            )
        names[spec["name"]] = i
        out.append(_plain_json(tool, f"tools[{i}]"))
    return out


def tool_names(tools) -> list[str]:
    """The names of the tools offered (OpenAI's {"type": "function", "function": {...}} or bare specs)."""
    specs = [t.get("function", t) if isinstance(t, Mapping) else {} for t in tools or []]
    return [s["name"] for s in specs if isinstance(s, Mapping) and isinstance(s.get("name"), str)]


def _tool_spec(tool, i: int) -> tuple[Mapping, str]:
    if not isinstance(tool, Mapping):
        raise TokenizerError(
            f"tools[{i}] must be a dict (a JSON function spec), got {type(tool).__name__}"
        )
    if "type" not in tool and "function" not in tool:
        return tool, f"tools[{i}]"
    if tool.get("type") != "function":
        raise TokenizerError(f"tools[{i}].type must be 'function', got {tool.get('type')!r}")
    spec = tool.get("function")
    if not isinstance(spec, Mapping):
        raise TokenizerError(
            f"tools[{i}].function must be a dict with name, description and parameters, "
            f"got {type(spec).__name__}"
        )
    return spec, f"tools[{i}].function"


def _check_spec(spec: Mapping, where: str) -> None:
    name = spec.get("name")
    if not isinstance(name, str) or not _TOOL_NAME.fullmatch(name):
        raise TokenizerError(
            f"{where}.name must be 1-64 letters, digits, '_', '.' or '-', got {name!r}"
        )
    description = spec.get("description")
    if description is not None and not isinstance(description, str):
        raise TokenizerError(
            f"{where}.description must be a string, got {type(description).__name__}"
        )
    if spec.get("parameters") is not None:
        _check_parameters(spec["parameters"], f"{where}.parameters")


def _check_parameters(params, where: str) -> None:
    """The parameters must be a JSON schema of an object, as OpenAI and Qwen use."""
    if not isinstance(params, Mapping):
        raise TokenizerError(f"{where} must be a JSON schema object, got {type(params).__name__}")
    if params.get("type", "object") != "object":
        raise TokenizerError(f"{where}.type must be 'object', got {params.get('type')!r}")
    properties = params.get("properties", {})
    if not isinstance(properties, Mapping):
        raise TokenizerError(
            f"{where}.properties must be a dict of JSON schemas, got {type(properties).__name__}"
        )
    for key, schema in properties.items():
        if not isinstance(schema, Mapping):
            raise TokenizerError(
                f"{where}.properties.{key} must be a JSON schema object, got {type(schema).__name__}"
            )
    required = params.get("required", [])
    if not isinstance(required, (list, tuple)) or not all(isinstance(r, str) for r in required):
        raise TokenizerError(f"{where}.required must be a list of property names, got {required!r}")
    missing = [r for r in required if r not in properties]
    if missing:
        raise TokenizerError(f"{where}.required names {missing} which are not in its properties")


def _plain_json(value, where: str):
    """A copy made only of JSON types (the template prints it with tojson anyway)."""
    try:
        return json.loads(json.dumps(value, ensure_ascii=False))
    except (TypeError, ValueError) as exc:
        raise TokenizerError(f"{where} must be JSON-serialisable: {exc}") from None


# --------------------------------------------------------------------------------------------
# Tool calls in the conversation


def normalize_tool_calls(tool_calls, index: int) -> list[dict]:
    """Check an assistant message's `tool_calls` and return a copy the templates can print.

    Each entry is OpenAI's `{"type": "function", "function": {"name", "arguments"}}` or a bare
    `{"name", "arguments"}`. `arguments` is a dict; a JSON string of an object (what OpenAI's API
    sends) is parsed into one, because Qwen's template prints the arguments with tojson and a
    string would come out quoted. Raises TokenizerError naming the message and the call.
    """
    if not isinstance(tool_calls, (list, tuple)):
        raise TokenizerError(
            f"message {index} tool_calls must be a list, got {type(tool_calls).__name__}"
        )
    out = []
    for j, call in enumerate(tool_calls):
        where = f"message {index} tool_calls[{j}]"
        if not isinstance(call, Mapping):
            raise TokenizerError(f"{where} must be a dict, got {type(call).__name__}")
        nested = "function" in call
        function = call["function"] if nested else call
        if not isinstance(function, Mapping):
            raise TokenizerError(f"{where}.function must be a dict, got {type(function).__name__}")
        name = function.get("name")
        if not isinstance(name, str) or not name:
            raise TokenizerError(f"{where} has no function name (a non-empty string): {name!r}")
        if "arguments" not in function:
            raise TokenizerError(f"{where} ({name}) has no 'arguments' (use {{}} for none)")
        arguments = _plain_json(_arguments_dict(function["arguments"], f"{where} ({name})"), where)
        function = {**function, "arguments": arguments}
        out.append({**call, "function": function} if nested else function)
    return out


def _arguments_dict(arguments, where: str) -> dict:
    if isinstance(arguments, str):
        try:
            arguments = json.loads(arguments)
        except ValueError as exc:
            raise TokenizerError(
                f"{where} arguments is a string but not JSON ({exc}); pass a dict"
            ) from None
    if not isinstance(arguments, Mapping):
        raise TokenizerError(
            f"{where} arguments must be a dict (a JSON object), got {type(arguments).__name__}"
        )
    return dict(arguments)


def tools_system_prompt(system: str, tools: list[dict]) -> str:
    """Qwen2.5's system turn text when tools are given: the system prompt, then the tools."""
    lines = "".join("\n" + json.dumps(tool, ensure_ascii=False) for tool in tools)
    return f"{system}{TOOLS_HEADER}{lines}{TOOLS_FOOTER}"


def format_tool_call(call: Mapping) -> str:
    """One call of a normalised `tool_calls` list, as Qwen2.5's template writes it."""
    function = call.get("function", call)
    arguments = json.dumps(function["arguments"], ensure_ascii=False)
    return f'{TOOL_CALL_OPEN}\n{{"name": "{function["name"]}", "arguments": {arguments}}}\n{TOOL_CALL_CLOSE}'


# --------------------------------------------------------------------------------------------
# Parsing the model's reply


def parse_tool_calls(text: str, names=None) -> tuple[str, list[ToolCall]]:
    """Split a reply into (content, calls): every well-formed <tool_call> block becomes a
    ToolCall and is cut out of the content, which is then stripped.

    `names`: the tools offered. Small models (Qwen2.5-Coder-0.5B-Instruct among them) often answer
    with the call's JSON alone, without the tags, or in a ```json fence; a reply that is exactly
    one such object naming one of `names` is read as that call too.

    A block is well formed when it holds one JSON object with a non-empty string "name" and
    an "arguments" object (or a JSON string of one; "parameters" is accepted for it, a missing
    one means {}). Anything else -- invalid JSON, an unclosed block at the end of a reply cut
    short, a block over MAX_TOOL_CALL_CHARS, calls past MAX_TOOL_CALLS -- is left in the
    content as the model wrote it, never raised: the user sees what the model attempted, and
    the caller can tell by the empty call list. Text without calls comes back unchanged.
    """
    if not isinstance(text, str):
        raise TokenizerError(f"parse_tool_calls expects a str, got {type(text).__name__}")
    kept: list[str] = []
    calls: list[ToolCall] = []
    pos = 0
    while len(calls) < MAX_TOOL_CALLS:
        close = text.find(TOOL_CALL_CLOSE, pos)
        if close < 0:
            break
        # The innermost opening tag before this close: "<tool_call> junk <tool_call>{...}</tool_call>"
        # keeps the junk as text and still parses the call.
        start = text.rfind(TOOL_CALL_OPEN, pos, close)
        end = close + len(TOOL_CALL_CLOSE)
        call = _parse_block(text[start + len(TOOL_CALL_OPEN):close]) if start >= 0 else None
        if call is None:
            kept.append(text[pos:end])
        else:
            kept.append(text[pos:start])
            calls.append(call)
        pos = end
    if not calls:
        bare = _bare_call(text) if names else None
        return ("", [bare]) if bare is not None and bare.name in set(names) else (text, [])
    kept.append(text[pos:])
    return "".join(kept).strip(), calls


def _bare_call(text: str) -> ToolCall | None:
    """The call in a reply that is nothing but its JSON object, bare or in one ``` fence."""
    body = text.strip()
    if body.startswith("```") and body.endswith("```") and len(body) > 6:
        body = body[3:-3].strip()
        body = body[4:].lstrip() if body.startswith("json") else body
    return _parse_block(body) if body.startswith("{") else None


def _parse_block(body: str) -> ToolCall | None:
    if len(body) > MAX_TOOL_CALL_CHARS:
        return None
    try:
        data = json.loads(body)
    except (ValueError, RecursionError):
        return None
    if not isinstance(data, dict):
        return None
    name = data.get("name")
    arguments = data.get("arguments", data.get("parameters", {}))
    if isinstance(arguments, str):
        try:
            arguments = json.loads(arguments)
        except (ValueError, RecursionError):
            return None
    if not isinstance(name, str) or not name.strip() or not isinstance(arguments, dict):
        return None
    return ToolCall(name, arguments)
