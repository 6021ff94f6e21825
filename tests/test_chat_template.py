"""qwen2.chat_template and qwen2.tool_calls: chat templates bounded in time and size, function
calling rendered exactly as transformers renders it, and parsing the model's <tool_call> replies.

transformers is the oracle where it is installed; the real checkpoint (tests/conftest.py's
real_model_dir) is used where it exists, and those tests skip, saying why, where it does not.
"""

from __future__ import annotations

import copy
import json
import re
import shutil
import threading
import time
from pathlib import Path

import pytest

from qwen2.chat_template import ChatTemplate, TemplateLimits
from qwen2.errors import TokenizerError
from qwen2.tokenizer import DEFAULT_SYSTEM_PROMPT, Tokenizer, normalize_messages, render_chatml
from qwen2.tool_calls import (
    MAX_TOOL_CALL_CHARS,
    MAX_TOOL_CALLS,
    ToolCall,
    format_tool_call,
    parse_tool_calls,
    validate_tools,
)
from tests.tokenizer_factory import QWEN25_TEMPLATE, save_tiny_tokenizer

# QWEN25_TEMPLATE and this are verbatim from Qwen/Qwen2.5-*-Instruct tokenizer_config.json (checked
# against the real checkpoint below, where it is built).
QWEN25_SYSTEM = "You are Qwen, created by Alibaba Cloud. You are a helpful assistant."

TOOLS = [
    {"type": "function", "function": {
        "name": "get_weather",
        "description": "The current weather in a city, «quoted» \"like this\".",
        "parameters": {"type": "object",
                       "properties": {"city": {"type": "string", "description": "城市"},
                                      "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]}},
                       "required": ["city"]}}},
    # The bare form transformers also accepts.
    {"name": "search", "description": "Search the web",
     "parameters": {"type": "object", "properties": {"query": {"type": "string"}},
                    "required": ["query"]}},
]

TOOL_CHAT = [
    {"role": "system", "content": "You are a terse assistant."},
    {"role": "user", "content": "Weather in Paris, and any news about it? 你好"},
    {"role": "assistant", "content": "Let me check.", "tool_calls": [
        {"type": "function", "function": {"name": "get_weather",
                                          "arguments": {"city": "Paris", "unit": "celsius"}}},
        {"type": "function", "function": {"name": "search", "arguments": {"query": "Paris 新闻"}}},
    ]},
    {"role": "tool", "content": "{\"temperature\": 21}"},
    {"role": "tool", "content": "Nothing new."},
    {"role": "assistant", "content": "21 °C, nothing new."},
    {"role": "user", "content": "And in Rome?"},
    {"role": "assistant", "content": None,
     "tool_calls": [{"name": "get_weather", "arguments": {"city": "Rome"}}]},
    {"role": "tool", "content": "{\"temperature\": 25}"},
]

FAST = 2.0  # seconds: every bomb must end well inside this, at the default limits


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory) -> Path:
    directory = tmp_path_factory.mktemp("tiny-tok")
    save_tiny_tokenizer(directory)
    return directory


def _with_template(src: Path, dst: Path, template: str) -> Path:
    shutil.copytree(src, dst)
    config = json.loads((dst / "tokenizer_config.json").read_text())
    config["chat_template"] = template
    (dst / "tokenizer_config.json").write_text(json.dumps(config))
    return dst


@pytest.fixture(scope="module")
def qwen25_dir(tiny_dir, tmp_path_factory) -> Path:
    """The tiny vocabulary with Qwen2.5-Instruct's tool-aware template."""
    return _with_template(tiny_dir, tmp_path_factory.mktemp("q25") / "t", QWEN25_TEMPLATE)


def _render(source: str, limits: TemplateLimits = TemplateLimits(), **variables) -> str:
    return ChatTemplate(source, "bomb.jinja", limits).render(messages=[], **variables)


def _timed_error(source: str, limits: TemplateLimits = TemplateLimits()) -> tuple[str, float]:
    start = time.perf_counter()
    with pytest.raises(TokenizerError) as info:
        _render(source, limits)
    return str(info.value), time.perf_counter() - start


# ---- template bombs -------------------------------------------------------------------------

BOMBS = {
    # loops: the range() budget stops them (or the deadline, on a machine slow enough)
    "nested loops with output":
        ("{% for i in range(100000) %}{% for j in range(100000) %}x{% endfor %}{% endfor %}",
         "range_items|seconds|output_chars"),
    "nested loops without output":
        ("{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}{% endfor %}",
         "range_items|seconds"),
    # huge numbers: `**` is never folded at compile time, and is checked before it runs
    "huge power": ("{{ 10**(10**9) }}", "int_bits"),
    "huge power in a taken branch": ("{% if true %}{{ 10**(10**9) }}{% endif %}", "int_bits"),
    "squaring in a loop": ("{% set ns = namespace(x=3) %}{% for i in range(40) %}"
                           "{% set ns.x = ns.x * ns.x %}{% endfor %}", "int_bits"),
    # values amplified by one operation
    "string repeat": ("{{ 'a' * 10**8 }}", "value_len"),
    "list repeat": ("{{ [1] * 10**9 }}", "value_len"),
    "ljust": ("{{ 'a'.ljust(10**9) }}", "value_len"),
    "zfill": ("{{ 'a'.zfill(10**9) }}", "value_len"),
    "center filter": ("{{ 'a'|center(10**9) }}", "value_len"),
    "printf width": ("{{ '%1000000000d' % 1 }}", "value_len"),
    "printf star width": ("{{ '%*d' % (10**9, 1) }}", "value_len"),
    "format filter width": ("{{ '%1000000000d'|format(1) }}", "value_len"),
    "format width": ("{{ '{:>1000000000}'.format(1) }}", "value_len"),
    "format nested width": ("{{ '{:{}}'.format(1, 10**9) }}", "value_len"),
    "format precision": ("{{ '{:.1000000000f}'.format(1.5) }}", "value_len"),
    "format repeats a field": ("{% set s = 'x' * 100000 %}{{ ('{0}' * 1000).format(s) }}",
                               "value_len"),
    "indent": ("{{ 'ab'|indent(10**9) }}", "value_len"),
    "indent string": ("{{ ('a\n' * 1000)|indent('x' * 100000) }}", "value_len"),
    "expandtabs": ("{{ ('\t' * 1000).expandtabs(10**6) }}", "value_len"),
    "replace": ("{% set s = 'a' * 2000 %}{{ s.replace('a', s) }}", "value_len"),
    "replace filter": ("{% set s = 'a' * 2000 %}{{ s|replace('a', s) }}", "value_len"),
    "join": ("{{ ('x' * 100000).join(['a'] * 1000) }}", "value_len"),
    "join filter": ("{{ (['a'] * 1000)|join('x' * 100000) }}", "value_len"),
    "translate": ("{{ 'abc'.translate({97: 'z' * 1000000}) }}", "value_len"),
    "to_bytes": ("{{ (1).to_bytes(10**9, 'big') }}", "value_len"),
    "batch padding": ("{{ [1]|batch(10**9, 0)|list }}", "value_len"),
    "slice count": ("{{ [1]|slice(10**9)|list }}", "value_len"),
    "tojson indent": ("{{ {'a': 1}|tojson(indent=10**9) }}", "value_len"),
    "wordwrap": ("{{ 'ab'|wordwrap(1, wrapstring='x' * 1000000) }}", "value_len"),
    "lipsum": ("{{ lipsum(10**6, max=1000) }}", "value_len"),
    "sum of lists": ("{{ ([[1] * 1000] * 2000)|sum(start=[]) }}", "value_len"),
    # values doubled step by step
    "doubling with +": ("{% set ns = namespace(s='ab') %}{% for i in range(40) %}"
                        "{% set ns.s = ns.s + ns.s %}{% endfor %}", "value_len"),
    "doubling with ~": ("{% set ns = namespace(s='ab') %}{% for i in range(40) %}"
                        "{% set ns.s = ns.s ~ ns.s %}{% endfor %}", "value_len"),
    "doubling in macros": ("{% macro f(n) %}{% if n %}{% set s = f(n - 1) %}{{ s }}{{ s }}"
                           "{% else %}x{% endif %}{% endmacro %}{{ f(40) }}", "value_len"),
}

# {% set ns.x = [ns.x, ns.x] %} forty times: a list of 2**40 items when printed, in 40 objects.
SHARED = ("{% set ns = namespace(x=['leaf']) %}{% for i in range(40) %}"
          "{% set ns.x = [ns.x, ns.x] %}{% endfor %}")


@pytest.mark.parametrize("name", list(BOMBS))
def test_bombs_end_quickly_naming_the_limit(name):
    source, limit = BOMBS[name]
    message, elapsed = _timed_error(source)
    assert elapsed < FAST, f"{name} took {elapsed:.2f} s"
    assert "bomb.jinja" in message
    assert re.search(f"TemplateLimits\\.({limit})", message), message


@pytest.mark.parametrize("use", [
    "{{ ns.x }}", "{{ ns.x|string }}", "{{ ns.x|tojson }}", "{{ '%s' % [ns.x] }}",
    "{{ ns.x ~ '' }}", "{{ '{}'.format(ns.x) }}", "{{ [ns.x]|join }}", "{{ ns }}",
    "{{ ns.x|pprint }}",
])
def test_exponentially_shared_structures_are_never_printed(use):
    message, elapsed = _timed_error(SHARED + use)
    assert elapsed < FAST and "TemplateLimits." in message


@pytest.mark.parametrize("source", [
    "{% for x in 'a' * 100000 %}{% for y in 'a' * 100000 %}{% endfor %}{% endfor %}",
    "{% macro f(n) %}{% if n %}{{ f(n - 1) }}{{ f(n - 1) }}{% endif %}{% endmacro %}{{ f(60) }}",
    "{% for x in 'a' * 100000 recursive %}{{ loop('a' * 100000) }}{% endfor %}",
    "{{ ('a' * 100000)|list|map('upper')|map('lower')|map('upper')|map('lower')|join }}" * 30,
])
def test_the_deadline_stops_work_that_stays_small(source):
    limits = TemplateLimits(seconds=0.25)
    message, elapsed = _timed_error(source, limits)
    assert "TemplateLimits.seconds" in message or "RecursionError" in message
    assert elapsed < 0.25 + 1.0


@pytest.mark.parametrize("source", [
    "{% if false %}{{ 10**(10**9) }}{% endif %}ok",
    "{% if false %}{{ 'a' * 10**9 }}{% endif %}ok",
    "{% if false %}{{ 'a'|center(10**9) }}{% endif %}ok",
    "{% if false %}{{ '%1000000000d'|format(1) }}{% endif %}ok",
])
def test_constant_folding_never_evaluates_a_bomb(source):
    # Jinja folds constants while compiling: without the checks `from_string` never returns.
    start = time.perf_counter()
    assert _render(source) == "ok"
    assert time.perf_counter() - start < FAST


def test_limits_are_exact_and_configurable():
    limits = TemplateLimits(value_len=1000, output_chars=1500, range_items=310)
    assert _render("{{ 'a' * 1000 }}", limits) == "a" * 1000
    with pytest.raises(TokenizerError, match="value_len = 1,000"):
        _render("{{ 'a' * 1001 }}", limits)
    assert len(_render("{% for i in range(3) %}{{ 'x' * 500 }}{% endfor %}", limits)) == 1500
    with pytest.raises(TokenizerError, match="output_chars = 1,500"):
        _render("{% for i in range(4) %}{{ 'x' * 500 }}{% endfor %}", limits)
    assert _render("{% for i in range(3) %}{% for j in range(100) %}{% endfor %}{% endfor %}x",
                   limits) == "x"
    with pytest.raises(TokenizerError, match="range_items = 310"):
        _render("{% for i in range(4) %}{% for j in range(100) %}{% endfor %}{% endfor %}", limits)
    with pytest.raises(TokenizerError, match="source_chars = 10"):
        ChatTemplate("{{ 'a long template' }}", "t", TemplateLimits(source_chars=10))


def test_each_render_gets_a_fresh_budget():
    template = ChatTemplate("{% for i in range(60000) %}{% endfor %}ok", "t",
                            TemplateLimits(range_items=100000))
    assert [template.render() for _ in range(3)] == ["ok"] * 3


def test_concurrent_renders_keep_their_own_budgets():
    # One compiled template serves every worker thread of the app; each render has its own budget.
    template = ChatTemplate("{% for i in range(60000) %}{% endfor %}{{ x }}", "t",
                            TemplateLimits(range_items=100000))
    bomb = ChatTemplate("{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}"
                        "{% endfor %}", "bomb.jinja")
    results, errors = [], []

    def work(n):
        for _ in range(5):
            results.append(template.render(x=n))

    def explode():
        with pytest.raises(TokenizerError, match="bomb.jinja") as info:
            bomb.render()
        errors.append(str(info.value))

    threads = [threading.Thread(target=work, args=(n,)) for n in range(3)]
    threads.append(threading.Thread(target=explode))
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(results) == sorted(["0", "1", "2"] * 5) and len(errors) == 1


def test_compiling_has_a_deadline():
    source = "{{ a }}" * 40000  # under the size cap, seconds to compile
    start = time.perf_counter()
    with pytest.raises(TokenizerError, match="does not compile.*TemplateLimits.seconds"):
        ChatTemplate(source, "big.jinja", TemplateLimits(seconds=0.2))
    assert time.perf_counter() - start < 1.5


def test_a_bomb_from_a_checkpoint_names_its_file_and_the_process_carries_on(tiny_dir, tmp_path):
    bomb = Tokenizer.from_pretrained(_with_template(tiny_dir, tmp_path / "bomb", "{{ 'a' * 10**8 }}"))
    for _ in range(2):  # and again: a failed render leaves nothing behind
        with pytest.raises(TokenizerError, match=f"{tmp_path / 'bomb'}.*value_len"):
            bomb.apply_chat_template([{"role": "user", "content": "hi"}])
    good = Tokenizer.from_pretrained(tiny_dir)
    chat = [{"role": "user", "content": "hi"}]
    assert good.apply_chat_template(chat) == render_chatml(chat)


def test_a_template_that_does_not_compile_fails_fast_every_time(tiny_dir, tmp_path):
    tok = Tokenizer.from_pretrained(_with_template(tiny_dir, tmp_path / "t", "{{ a }}" * 40000))
    tok.template_limits = TemplateLimits(seconds=0.2)
    for _ in range(2):
        start = time.perf_counter()
        with pytest.raises(TokenizerError, match="does not compile"):
            tok.apply_chat_template([{"role": "user", "content": "hi"}])
    assert time.perf_counter() - start < 0.1  # the second time, the remembered error


def test_a_callback_that_runs_during_a_compile_cannot_switch_the_deadline_off(tiny_dir, tmp_path, monkeypatch):
    """Python drops a trace function that raises, and an exception raised inside a weakref callback
    or a __del__ (garbage collection can run either in the middle of a compile) is printed and
    swallowed: once the deadline had passed, the first such call ended the deadline for the rest of
    that compile, and a template over its time limit compiled (seen in CI, a dynamo weakref callback)."""
    import gc
    import weakref

    from qwen2 import template_sandbox

    class Freed:
        pass

    limits = TemplateLimits(seconds=0.2)
    guard_loops = template_sandbox._guard_loops

    def guard_loops_after_a_callback(ast, env):
        time.sleep(limits.seconds * 1.5)  # past the deadline (a C call: no trace event)
        freed = Freed()
        ref = weakref.ref(freed, lambda _: gc.collect)  # a Python frame, traced, that swallows errors
        del freed
        assert ref() is None
        return guard_loops(ast, env)

    monkeypatch.setattr(template_sandbox, "_guard_loops", guard_loops_after_a_callback)
    tok = Tokenizer.from_pretrained(_with_template(tiny_dir, tmp_path / "t", "{{ messages[0].content }}"))
    tok.template_limits = limits
    with pytest.raises(TokenizerError, match="does not compile"):
        tok.apply_chat_template([{"role": "user", "content": "hi"}])


@pytest.mark.parametrize("template", [
    "{{ guard_loop }}{{ environment }}{{ concat }}",  # the checks' hooks are not reachable by name
    "{{ range.__globals__ }}",
    "{{ ''.format.__globals__ }}",
    "{{ (1).to_bytes.__self__.__class__ }}",
])
def test_hooks_are_not_a_way_out_of_the_sandbox(template):
    try:
        assert _render(template) == ""
    except TokenizerError as exc:
        assert "unsafe" in str(exc)


@pytest.mark.parametrize("source", [
    "{% set ns = namespace(n=0) %}{% for m in messages %}{% set ns.n = ns.n + 1 %}"
    "{{ m.role|upper|center(9) ~ '|' }}{{ '%-5s|%3d' % (m.content, loop.index) }}"
    "{{ '{:>4}'.format(ns.n) }}{{ (m.content * 2).replace('i', 'I') }}{% endfor %}"
    "{{ messages|tojson(indent=2) }}{{ [1, 2] + [3] }}{{ 2 ** 10 }}{{ messages|length }}",
    # loops go through the deadline guard: everything `loop` offers must still work
    "{% for m in messages if m.content %}{{ loop.index }}/{{ loop.length }}{{ loop.revindex }}"
    "{{ loop.last }}{{ loop.previtem.role if loop.previtem }}{{ loop.nextitem.role if loop.nextitem }}"
    "{{ loop.cycle('a', 'b') }}{{ loop.changed(m.role) }}{% else %}none{% endfor %}"
    "{% for x in [] %}x{% else %}empty{% endfor %}"
    "{% for k, v in {'a': 1, 'b': 2}.items() %}{{ k }}={{ v }};{% endfor %}"
    "{% for x in [[1, [2]], [3]] recursive %}[{% if x is iterable %}{{ loop(x) }}{% else %}{{ x }}"
    "{% endif %}]{% endfor %}{% for i in range(5) %}{% if i == 3 %}{% break %}{% endif %}{{ i }}"
    "{% endfor %}",
])
def test_normal_templates_render_as_jinja_does(source):
    # The checks change nothing below the limits.
    messages = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": ""},
                {"role": "user", "content": "x"}]
    sandbox = pytest.importorskip("jinja2.sandbox")
    plain = sandbox.ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                                  extensions=["jinja2.ext.loopcontrols"])
    plain.filters["tojson"] = lambda x, indent=None: json.dumps(x, ensure_ascii=False, indent=indent)
    expected = plain.from_string(source).render(messages=messages)
    assert ChatTemplate(source, "t").render(messages=messages) == expected


# ---- tools: rendering -----------------------------------------------------------------------


def test_embedded_qwen25_template_is_the_released_one(real_model_dir):
    config = json.loads((real_model_dir / "tokenizer_config.json").read_text())
    assert config["chat_template"] == QWEN25_TEMPLATE


@pytest.mark.parametrize("gen", [True, False])
@pytest.mark.parametrize("with_system", [True, False])
def test_tools_render_like_transformers(qwen25_dir, gen, with_system):
    transformers = pytest.importorskip("transformers", reason="transformers is the test oracle")
    hf = transformers.AutoTokenizer.from_pretrained(str(qwen25_dir))
    tok = Tokenizer.from_pretrained(qwen25_dir)
    chat = TOOL_CHAT if with_system else TOOL_CHAT[1:]
    ours = tok.apply_chat_template(chat, add_generation_prompt=gen, tools=TOOLS)
    theirs = hf.apply_chat_template(copy.deepcopy(chat), tools=TOOLS, tokenize=False,
                                    add_generation_prompt=gen)
    assert ours == theirs
    assert tok.encode_chat(chat, gen, tools=TOOLS) == hf(theirs, add_special_tokens=False)["input_ids"]
    assert '"name": "search"' in ours and "<tool_call>" in ours and "<tool_response>" in ours


def test_chatml_fallback_renders_tools_as_qwen25():
    template = ChatTemplate(QWEN25_TEMPLATE, "qwen2.5")
    for chat in (TOOL_CHAT, TOOL_CHAT[1:]):
        for gen in (True, False):
            for tools in (TOOLS, None):
                expected = template.render(messages=normalize_messages(chat),
                                           add_generation_prompt=gen, tools=tools)
                ours = render_chatml(chat, gen, tools=tools)
                if chat[0]["role"] != "system":  # Qwen2's default system prompt, not Qwen2.5's
                    expected = expected.replace(QWEN25_SYSTEM, DEFAULT_SYSTEM_PROMPT)
                assert ours == expected
    byte = Tokenizer.byte_fallback(151936)
    assert byte.apply_chat_template(TOOL_CHAT, tools=TOOLS) == render_chatml(TOOL_CHAT, tools=TOOLS)


def test_a_template_without_tool_support_says_so(tiny_dir):
    tok = Tokenizer.from_pretrained(tiny_dir)  # Qwen2-Instruct's template: no tools
    with pytest.raises(TokenizerError, match="does not render tools"):
        tok.apply_chat_template(TOOL_CHAT, tools=TOOLS)
    assert tok.apply_chat_template(TOOL_CHAT[:2], tools=[]) == tok.apply_chat_template(TOOL_CHAT[:2])


def test_tool_call_arguments_may_be_a_json_string(qwen25_dir):
    tok = Tokenizer.from_pretrained(qwen25_dir)
    as_string = copy.deepcopy(TOOL_CHAT)
    as_string[2]["tool_calls"][0]["function"]["arguments"] = json.dumps(
        TOOL_CHAT[2]["tool_calls"][0]["function"]["arguments"])
    assert tok.apply_chat_template(as_string, tools=TOOLS) == tok.apply_chat_template(TOOL_CHAT, tools=TOOLS)
    assert render_chatml(as_string, tools=TOOLS) == render_chatml(TOOL_CHAT, tools=TOOLS)


@pytest.mark.parametrize("tool_calls, match", [
    ("get_weather", "tool_calls must be a list"),
    (["get_weather"], r"tool_calls\[0\] must be a dict"),
    ([{"function": "get_weather"}], r"tool_calls\[0\].function must be a dict"),
    ([{"function": {"arguments": {}}}], "no function name"),
    ([{"function": {"name": "f"}}], r"\(f\) has no 'arguments'"),
    ([{"function": {"name": "f", "arguments": "{not json"}}], "string but not JSON"),
    ([{"function": {"name": "f", "arguments": "[1, 2]"}}], "must be a dict"),
    ([{"function": {"name": "f", "arguments": {"x": {1, 2}}}}], "JSON-serialisable"),
])
def test_bad_tool_calls_name_the_message_and_the_call(tool_calls, match):
    chat = [{"role": "user", "content": "hi"}, {"role": "assistant", "tool_calls": tool_calls}]
    with pytest.raises(TokenizerError, match=f"message 1 .*{match}"):
        render_chatml(chat)


@pytest.mark.parametrize("tools, match", [
    ({"name": "f"}, "tools must be a list"),
    (["f"], r"tools\[0\] must be a dict"),
    ([{"type": "retrieval"}], r"tools\[0\].type must be 'function'"),
    ([{"type": "function", "function": "f"}], r"tools\[0\].function must be a dict"),
    ([{"type": "function", "function": {"description": "no name"}}], r"tools\[0\].function.name"),
    ([{"name": 'say "hi"'}], r"tools\[0\].name must be"),
    ([{"name": "f"}, {"name": "g", "description": 3}], r"tools\[1\].description must be a string"),
    ([{"name": "f", "parameters": []}], r"tools\[0\].parameters must be a JSON schema"),
    ([{"name": "f", "parameters": {"type": "string"}}], r"parameters.type must be 'object'"),
    ([{"name": "f", "parameters": {"properties": {"x": "string"}}}], r"parameters.properties.x"),
    ([{"name": "f", "parameters": {"properties": {}, "required": ["x"]}}], r"required names \['x'\]"),
    ([{"name": "f"}, {"type": "function", "function": {"name": "f"}}], r"tools\[0\]"),
    ([{"name": "f", "parameters": {"properties": {"x": {"default": {1}}}}}], "JSON-serialisable"),
])
def test_bad_tools_name_the_tool_and_the_field(tools, match):
    with pytest.raises(TokenizerError, match=match):
        validate_tools(tools)
    with pytest.raises(TokenizerError, match=match):
        Tokenizer.byte_fallback(512).encode_chat([{"role": "user", "content": "hi"}], tools=tools)


def test_validated_tools_are_plain_json_copies():
    tools = [{"name": "f", "parameters": {"type": "object", "properties": {"x": {"enum": (1, 2)}}}}]
    out = validate_tools(tools)
    assert out == [{"name": "f", "parameters": {"type": "object", "properties": {"x": {"enum": [1, 2]}}}}]
    assert out[0] is not tools[0]
    assert validate_tools(None) is None and validate_tools([]) == []


def test_none_valued_keys_are_dropped_as_transformers_does(qwen25_dir):
    tok = Tokenizer.from_pretrained(qwen25_dir)
    chat = [{"role": "user", "content": "hi", "tool_calls": None},
            {"role": "assistant", "content": "yo", "tool_calls": None}]
    assert tok.apply_chat_template(chat) == tok.apply_chat_template(
        [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}])


# ---- tools: the real checkpoint -------------------------------------------------------------


@pytest.fixture(scope="module")
def real_pair(real_model_dir):
    transformers = pytest.importorskip("transformers", reason="transformers is the test oracle")
    return (Tokenizer.from_pretrained(real_model_dir),
            transformers.AutoTokenizer.from_pretrained(str(real_model_dir)))


@pytest.mark.parametrize("gen", [True, False])
def test_real_checkpoint_tool_conversation_token_ids_equal_transformers(real_pair, gen):
    tok, hf = real_pair
    for chat in (TOOL_CHAT, TOOL_CHAT[1:], TOOL_CHAT[:2]):
        theirs = hf.apply_chat_template(copy.deepcopy(chat), tools=TOOLS, tokenize=True,
                                        add_generation_prompt=gen, return_dict=True)["input_ids"]
        assert tok.encode_chat(chat, gen, tools=TOOLS) == list(theirs)
        text = hf.apply_chat_template(copy.deepcopy(chat), tools=TOOLS, tokenize=False,
                                      add_generation_prompt=gen)
        assert tok.apply_chat_template(chat, gen, tools=TOOLS) == text
    ids = tok.encode_chat(TOOL_CHAT, gen, tools=TOOLS)
    assert ids.count(tok.encode("<tool_call>")[0]) == 2 + 3  # twice in the tools prompt, 3 calls


def test_real_checkpoint_reply_round_trips_through_the_parser(real_pair):
    tok, _ = real_pair
    calls = TOOL_CHAT[2]["tool_calls"]
    reply = "Let me check.\n" + "\n".join(format_tool_call(c) for c in calls)
    ids = tok.encode(reply + "<|im_end|>")
    content, parsed = parse_tool_calls(tok.decode(ids))  # special tokens skipped, <tool_call> kept
    assert content == "Let me check."
    assert [c.to_dict() for c in parsed] == calls


# ---- parsing replies ------------------------------------------------------------------------


def test_parse_tool_calls_well_formed():
    text = ('I will look both up.\n<tool_call>\n{"name": "get_weather", "arguments": '
            '{"city": "Paris"}}\n</tool_call>\n<tool_call>\n{"name": "search", "arguments": '
            '"{\\"query\\": \\"news\\"}"}\n</tool_call>')
    content, calls = parse_tool_calls(text)
    assert content == "I will look both up."
    assert calls == [ToolCall("get_weather", {"city": "Paris"}), ToolCall("search", {"query": "news"})]
    assert parse_tool_calls('<tool_call>{"name": "now"}</tool_call>') == ("", [ToolCall("now", {})])


@pytest.mark.parametrize("text", [
    "No calls here.\n",
    "<tool_call>\n{not json}\n</tool_call>",
    '<tool_call>\n{"arguments": {}}\n</tool_call>',  # no name
    '<tool_call>\n{"name": "f", "arguments": [1]}\n</tool_call>',
    '<tool_call>\n["f"]\n</tool_call>',
    '<tool_call>\n{"name": "f", "arguments": {}}',  # cut off before the closing tag
    '</tool_call> stray close',
    '<tool_call>\n{"name": "f", "arguments": {"x": "' + "y" * MAX_TOOL_CALL_CHARS + '"}}\n</tool_call>',
])
def test_malformed_blocks_stay_in_the_content(text):
    assert parse_tool_calls(text) == (text, [])


def test_malformed_blocks_are_kept_beside_good_ones():
    bad = "<tool_call>\n{oops}\n</tool_call>"
    good = '<tool_call>\n{"name": "f", "arguments": {"a": 1}}\n</tool_call>'
    content, calls = parse_tool_calls(f"{bad}\n{good}\n<tool_call> junk {good}")
    assert calls == [ToolCall("f", {"a": 1})] * 2
    assert content == f"{bad}\n\n<tool_call> junk"


def test_parsing_is_bounded():
    good = '<tool_call>{"name": "f", "arguments": {}}</tool_call>'
    content, calls = parse_tool_calls(good * (MAX_TOOL_CALLS + 5))
    assert len(calls) == MAX_TOOL_CALLS and content == good * 5
    start = time.perf_counter()
    assert parse_tool_calls("<tool_call>" * 200_000 + "</tool_call>" * 3)[1] == []
    assert time.perf_counter() - start < FAST
    with pytest.raises(TokenizerError, match="expects a str"):
        parse_tool_calls(b"<tool_call>")
