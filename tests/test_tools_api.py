"""Function calling through the app: /chat_tools renders the tools with the checkpoint's template,
returns the reply's calls as structured objects, and takes the tools' results back into the same
conversation. A real Gradio server on a tiny checkpoint checks the endpoint; the real
Qwen2.5-Coder-0.5B-Instruct checks that a real call comes back structured."""

from __future__ import annotations

import json

import pytest

from qwen2.tool_calls import parse_tool_calls
from gradio_client.exceptions import AppError

from tests.helpers import App, make_checkpoint, stats_numbers
from tests.tokenizer_factory import QWEN25_TEMPLATE

WEATHER = [{"type": "function", "function": {
    "name": "get_weather", "description": "Get the current weather in a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string", "description": "the city"}},
                   "required": ["city"]}}}]


def test_a_bare_json_call_is_read_only_for_an_offered_tool():
    call = '{"name": "get_weather", "arguments": {"city": "Paris"}}'
    assert parse_tool_calls(call, names=["get_weather"])[1][0].arguments == {"city": "Paris"}
    assert parse_tool_calls(call) == (call, [])  # no tools offered: it is text
    assert parse_tool_calls(call, names=["other"]) == (call, [])
    assert parse_tool_calls("Sure: " + call, names=["get_weather"])[1] == []  # only a whole reply
    fenced = "```json\n" + call.replace(", ", ",\n    ") + "\n```"
    assert parse_tool_calls(fenced, names=["get_weather"]) == ("", parse_tool_calls(call, ["get_weather"])[1])


@pytest.fixture(scope="module")
def tiny_app(tmp_path_factory):
    """A tiny checkpoint (2k context) with Qwen2.5's chat template, which renders tools."""
    directory = make_checkpoint(tmp_path_factory.mktemp("tools-ckpt") / "qwen25-tiny", max_position_embeddings=2048)
    config = json.loads((directory / "tokenizer_config.json").read_text())
    config["chat_template"] = QWEN25_TEMPLATE
    (directory / "tokenizer_config.json").write_text(json.dumps(config))
    server = App(tmp_path_factory.mktemp("tools-app"), "--model", str(directory), "--dtype", "float32")
    yield server
    server.close()


def test_tools_are_rendered_checked_and_results_go_back(tiny_app):
    client = tiny_app.client()
    plain = stats_numbers(tiny_app.client().predict("Weather in Paris?", max_new_tokens=2, api_name="/chat")[1])
    content, calls, stats = client.predict("Weather in Paris?", WEATHER, max_new_tokens=2, api_name="/chat_tools")
    assert isinstance(content, str) and isinstance(calls, list)
    with_tools = stats_numbers(stats)
    assert with_tools["prompt tokens"] > plain["prompt tokens"] + 20  # the tool's spec is in the prompt
    _, _, stats = client.predict("", WEATHER, ["18 C and sunny"], max_new_tokens=2, api_name="/chat_tools")
    after = stats_numbers(stats)
    assert after["reused"] >= with_tools["prompt tokens"] - 1  # the same conversation, kept in the cache
    bad = [{"type": "function", "function": {"name": "get weather!", "parameters": {}}}]
    with pytest.raises(AppError, match=r"tools\[0\]"):
        client.predict("Weather?", bad, max_new_tokens=2, api_name="/chat_tools")
    with pytest.raises(AppError, match="Type a message first"):
        client.predict("", WEATHER, api_name="/chat_tools")


def test_the_terminal_chat_prints_the_call(real_model_dir, tmp_path):
    import subprocess
    import sys
    from pathlib import Path

    tools = tmp_path / "tools.json"
    tools.write_text(json.dumps(WEATHER))
    done = subprocess.run([sys.executable, "-m", "qwen2", "--model", str(real_model_dir), "--dtype", "float32",
                           "--fast-decode", "off", "--tools", str(tools), "--temperature", "0",
                           "--max-new-tokens", "40", "--prompt", "What's the weather like in Paris right now?"],
                          capture_output=True, text=True, timeout=300, cwd=Path(__file__).parents[1])
    assert done.returncode == 0, done.stderr[-2000:]
    assert '[tool call] get_weather {"city": "Paris"}' in done.stdout, done.stdout
    tools.write_text('[{"type": "function"}]')
    done = subprocess.run([sys.executable, "-m", "qwen2", "--model", str(real_model_dir), "--tools", str(tools),
                           "--prompt", "hi"], capture_output=True, text=True, timeout=300, cwd=Path(__file__).parents[1])
    assert done.returncode == 2 and "tools[0].function" in done.stderr and "Traceback" not in done.stderr


def test_the_real_model_calls_the_tool_and_reads_its_result(real_model_dir):
    """In-process (no server): the real checkpoint asked about the weather returns a structured call."""
    from qwen2.engine import Limits
    from studio.chat import Chat, history_messages, sampling_settings
    from studio.hosting import Busy, LoadedModel
    from ui.chat import make_chat_events

    class Request:
        session_hash = "tools"

    lm = LoadedModel(str(real_model_dir), "cpu", "float32", None, fast_decode="off",
                     limits=Limits(new_tokens=64)).start()
    try:
        *_, api_tools = make_chat_events(Chat(lm, Busy(lm.engine)))
        assert sampling_settings(0.0, 1.0, 0, 1.0, 48, -1)
        content, calls, stats, history = api_tools("What's the weather like in Paris right now?", WEATHER,
                                                   max_new_tokens=48, request=Request())
        assert calls == [{"type": "function", "function": {"name": "get_weather", "arguments": {"city": "Paris"}}}], \
            (content, calls)
        assert history[-1]["tool_calls"] == calls
        content, calls, stats, history = api_tools("", WEATHER, ["18 °C and sunny"], max_new_tokens=48,
                                                   history=history, request=Request())
        # What the model makes of the result is up to a 0.5B model; what it was shown is ours to check:
        # its own call in Qwen2.5's tags, then the result as a tool response, then its new turn.
        shown = lm.tokenizer.apply_chat_template(history_messages(history[:-1]), tools=WEATHER)
        assert shown.endswith('<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>'
                              '<|im_end|>\n<|im_start|>user\n<tool_response>\n18 °C and sunny\n</tool_response>'
                              '<|im_end|>\n<|im_start|>assistant\n'), shown[-300:]
        assert history[-2] == {"role": "tool", "content": "18 °C and sunny"} and stats
    finally:
        lm.engine.close()
