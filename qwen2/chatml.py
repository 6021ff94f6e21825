"""Chat messages as the model reads them: `normalize_messages` (content to plain text, tool calls
checked) and `render_chatml`, the official Qwen2-Instruct template written out in Python (the
renderer of a tokenizer without a template of its own, and the tests' oracle).

ChatML marks each turn `<|im_start|>role\n...<|im_end|>\n`; Qwen2 has no BOS token.
"""

from __future__ import annotations

from typing import Iterable

from .errors import TokenizerError
from .tool_calls import format_tool_call, normalize_tool_calls, tools_system_prompt, validate_tools

ENDOFTEXT = "<|endoftext|>"
IM_START = "<|im_start|>"
IM_END = "<|im_end|>"
DEFAULT_SYSTEM_PROMPT = "You are a helpful assistant."


def normalize_messages(messages: Iterable[dict]) -> list[dict]:
    """Return copies of `messages` whose "content" is a plain string.

    Templates concatenate content with `+`, so it must be a string. Gradio hands us content as
    a string or as a list of parts ({"type": "text", "text": ...} or bare strings); text parts
    are joined, anything else (images, files) is refused because this model reads only text.
    Keys set to None are dropped, as transformers does (OpenAI's API sends `tool_calls: null`),
    and an assistant message's `tool_calls` is checked (qwen2.tool_calls.normalize_tool_calls).
    """
    if isinstance(messages, (str, bytes)) or not isinstance(messages, Iterable):
        raise TokenizerError(f"messages must be a list of dicts, got {type(messages).__name__}")
    out = []
    for i, message in enumerate(messages):
        if not isinstance(message, dict):
            raise TokenizerError(f"message {i} must be a dict, got {type(message).__name__}")
        if not isinstance(message.get("role"), str):
            raise TokenizerError(f"message {i} has no string 'role': {message!r:.200}")
        message = {k: v for k, v in message.items() if v is not None}
        message["content"] = _content_text(message.get("content"), i)
        if "tool_calls" in message:
            message["tool_calls"] = normalize_tool_calls(message["tool_calls"], i)
        out.append(message)
    return out


def _content_text(content, index: int) -> str:
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    parts = [content] if isinstance(content, dict) else content
    if not isinstance(parts, (list, tuple)):
        raise TokenizerError(
            f"message {index} content must be a string or a list of parts, "
            f"got {type(content).__name__}"
        )
    texts = []
    for part in parts:
        if isinstance(part, str):
            texts.append(part)
        elif isinstance(part, dict) and part.get("type", "text") == "text" and isinstance(
            part.get("text"), str
        ):
            texts.append(part["text"])
        elif isinstance(part, dict) and part.get("type", "text") == "text":
            raise TokenizerError(
                f"message {index} has a content part with no string 'text': {part!r:.200} "
                f"(a tool result must be a string: json.dumps it)"
            )
        else:
            kind = part.get("type", "?") if isinstance(part, dict) else type(part).__name__
            raise TokenizerError(
                f"message {index} has a content part of type {kind!r}; only text is supported"
            )
    return "".join(texts)


def render_chatml(messages: list[dict], add_generation_prompt: bool = True,
                  tools: list[dict] | None = None) -> str:
    """Render `messages` exactly as the official Qwen2-Instruct chat template does, with tool
    specs, tool calls and tool results in Qwen2.5-Instruct's format.

    Used when a tokenizer has no chat template of its own (and by the tests as an oracle):
    a default system turn when the first message is not a system one, then one ChatML block
    per message, then `<|im_start|>assistant\\n` to prompt the reply. With `tools`, the system
    turn lists them (after the first message's system prompt, or the default one); an assistant
    message's `tool_calls` become <tool_call> blocks, and consecutive "tool" messages share one
    user turn of <tool_response> blocks. For messages with a system prompt, the text is exactly
    what Qwen2.5-Instruct's template renders.
    """
    messages = normalize_messages(messages)
    tools = validate_tools(tools)
    has_system = bool(messages) and messages[0]["role"] == "system"
    text = []
    if tools:
        system = messages[0]["content"] if has_system else DEFAULT_SYSTEM_PROMPT
        text.append(f"{IM_START}system\n{tools_system_prompt(system, tools)}{IM_END}\n")
        messages = messages[1:] if has_system else messages
    elif messages and not has_system:
        text.append(f"{IM_START}system\n{DEFAULT_SYSTEM_PROMPT}{IM_END}\n")
    for i, message in enumerate(messages):
        if message["role"] == "tool":
            text.append(_tool_response(messages, i))
        elif message["role"] == "assistant" and message.get("tool_calls"):
            content = f"\n{message['content']}" if message["content"] else ""
            calls = "".join("\n" + format_tool_call(call) for call in message["tool_calls"])
            text.append(f"{IM_START}assistant{content}{calls}{IM_END}\n")
        else:
            text.append(f"{IM_START}{message['role']}\n{message['content']}{IM_END}\n")
    if add_generation_prompt:
        text.append(f"{IM_START}assistant\n")
    return "".join(text)


def _tool_response(messages: list[dict], i: int) -> str:
    """Tool results go back to the model in a user turn; consecutive ones share it."""
    text = f"\n<tool_response>\n{messages[i]['content']}\n</tool_response>"
    if i == 0 or messages[i - 1]["role"] != "tool":
        text = f"{IM_START}user{text}"
    if i == len(messages) - 1 or messages[i + 1]["role"] != "tool":
        text = f"{text}{IM_END}\n"
    return text
