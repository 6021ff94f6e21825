"""The Chat tab: the conversation, the message box with Stop, the settings, and the /chat API."""

from __future__ import annotations

import traceback

import gradio as gr

from qwen2.chat import message_text
from qwen2.tool_calls import parse_tool_calls, tool_names
from studio.chat import EMPTY_HINT, Chat, ChatError
from studio.hosting import LoadedModel

from .queues import CHAT_CONCURRENCY, CHAT_QUEUE
from .refusals import api_error, checked_by_studio, refused

EXAMPLES = [
    "Explain what a KV cache is, in three sentences.",
    "用三句话介绍一下长城。",
    "Write a Python function that checks whether a string is a palindrome, with a test.",
]


def box_ready(**value):
    """The message box usable again. A reply sets it itself as it ends (not a later event, which could
    land after the next message has started and hide its Stop button)."""
    return gr.update(interactive=True, submit_btn=True, stop_btn=False, **value)


def make_chat_events(chat: Chat):
    """The page's chat events: start (instant), respond (streams, queued), stop; and the API's."""

    def start(message, chatbot, temperature, top_p, top_k, repetition_penalty, max_new_tokens, seed, min_p,
              request: gr.Request):
        """Check the message and settings before the box is cleared; returns
        (textbox, chatbot, stats, pending message or None)."""
        chat.new_turn(request.session_hash)
        text = message_text(message)
        try:
            if not text.strip():
                raise ChatError(EMPTY_HINT)
            chat.settings(temperature, top_p, top_k, repetition_penalty, max_new_tokens, seed, min_p)
        except ChatError as exc:
            gr.Warning(refused("chat", exc))
            return gr.update(), gr.skip(), f"⚠ {exc}", None
        chatbot = [*(chatbot or []), {"role": "user", "content": text}]
        waiting = chat.busy.note() or "waiting for the model…"
        return gr.update(value="", interactive=False, submit_btn=False, stop_btn=True), chatbot, waiting, text

    def respond(pending, chatbot, system_prompt, temperature, top_p, top_k, repetition_penalty,
                max_new_tokens, seed, min_p, request: gr.Request):
        """Stream the reply to `pending` (the message `start` moved into the chat); on any error, put
        the message back in the box and the chat back as it was, and say what went wrong."""
        if pending is None:
            yield gr.skip(), gr.skip(), gr.skip()
            return
        before = (chatbot or [])[:-1]
        try:
            settings = chat.settings(temperature, top_p, top_k, repetition_penalty, max_new_tokens, seed, min_p)
            for reply, stats in chat.stream(request.session_hash, pending, before, system_prompt, settings,
                                            settings["max_new_tokens"]):
                yield [*chatbot, {"role": "assistant", "content": reply}], stats, gr.skip()
        except ChatError as exc:
            gr.Warning(f"Could not reply: {refused('chat', exc)}")
            yield before, f"⚠ Could not reply: {exc}", box_ready(value=pending)
            return
        except Exception as exc:  # never leave the page stuck: report, restore
            traceback.print_exc()
            gr.Warning(f"Could not reply: {type(exc).__name__}: {exc}")
            yield before, f"⚠ Could not reply: {type(exc).__name__}: {exc}", box_ready(value=pending)
            return
        stats = chat.stats_message(request.session_hash)
        if stats is None:  # the conversation was cleared while the reply ended
            yield [*chatbot, {"role": "assistant", "content": reply}], gr.skip(), box_ready()
            return
        yield [*chatbot, {"role": "assistant", "content": reply}, stats], gr.skip(), box_ready()

    def stop(request: gr.Request):
        """Stop: the engine ends the reply after the step in flight; `respond` then shows it whole, with
        its statistics, as for any reply that ends."""
        chat.request_stop(request.session_hash)

    def clear(request: gr.Request):
        chat.conversations.drop(request.session_hash)
        return ""

    def api(message, system_prompt, temperature, top_p, top_k, repetition_penalty, max_new_tokens, seed,
            min_p, history, request: gr.Request):
        """Stream a reply to `message` in this session's conversation; yields (reply so far, stats)."""
        text = message_text(message)
        try:
            if not text.strip():
                raise ChatError(EMPTY_HINT)
            settings = chat.settings(temperature, top_p, top_k, repetition_penalty, max_new_tokens, seed, min_p)
            for reply, stats in chat.stream(request.session_hash, text, history, system_prompt, settings,
                                            settings["max_new_tokens"]):
                turn = [{"role": "user", "content": text}, {"role": "assistant", "content": reply}]
                yield reply, stats, [*(history or []), *turn]  # a cancelled reply stays in the history
        except ChatError as exc:
            raise api_error("/chat", exc) from None

    def api_tools(message, tools, tool_results=None, system_prompt="", temperature=0.0, top_p=1.0, top_k=0,
                  repetition_penalty=1.0, max_new_tokens=256, seed=-1, min_p=0.0, history=None,
                  request: gr.Request = None):
        """Function calling, in this session's conversation (the one /chat continues): a reply with
        `tools` (JSON function specs) rendered into the prompt by the checkpoint's template. Returns
        (the reply's text without its calls, the calls as [{"type": "function", "function": {"name",
        "arguments"}}], stats). To answer the calls, call again with `tool_results` (one string per
        call, in order) and an empty `message`: they go into the prompt as "tool" messages."""
        text = message_text(message)
        results = [{"role": "tool", "content": str(r)} for r in (tool_results or [])]
        new = results + ([{"role": "user", "content": text}] if text.strip() else [])
        try:
            if not new:
                raise ChatError(EMPTY_HINT)
            settings = chat.settings(temperature, top_p, top_k, repetition_penalty, max_new_tokens, seed, min_p)
            reply, stats = "", ""
            for reply, stats in chat.stream(request.session_hash, new, history, system_prompt, settings,
                                            settings["max_new_tokens"], tools=tools):
                pass
        except ChatError as exc:
            raise api_error("/chat_tools", exc) from None
        content, calls = parse_tool_calls(reply, names=tool_names(tools))
        calls = [call.to_dict() for call in calls]
        turn = [*new, {"role": "assistant", "content": content, **({"tool_calls": calls} if calls else {})}]
        return content, calls, stats, [*(history or []), *turn]

    return start, respond, stop, clear, api, api_tools


def settings_title(max_new_tokens) -> str:
    return f"System prompt and sampling · replies stop at {max_new_tokens} new tokens"


def chat_tab(lm: LoadedModel, chat: Chat):
    """The Chat tab: the conversation, the box, the settings (also the inputs of the /chat API)."""
    gen = lm.sampling_defaults()
    default_new, most_new = lm.default_max_new_tokens, min(lm.context, lm.engine.limits.new_tokens)
    chatbot = gr.Chatbot(height=460, show_label=False, elem_id="chatbot", placeholder=(
        f"Chat with `{lm.source}` running on {lm.device} ({lm.dtype}). Each reply shows its statistics "
        "under it; the conversation's KV cache is kept between turns."))
    textbox = gr.Textbox(placeholder="Type a message…", elem_id="chat-input", show_label=False,
                         submit_btn=True, stop_btn=False, autofocus=True, lines=1)
    stats = gr.Markdown("", elem_id="chat-stats")
    gr.Examples([[e] for e in EXAMPLES], inputs=[textbox], label="Examples (English, Chinese, code)")
    # The reply length is in the accordion's title, so it shows while the settings are folded away.
    with gr.Accordion(settings_title(default_new), open=False) as accordion:
        system = gr.Textbox("", label="System prompt", lines=2, placeholder="e.g. You are a helpful assistant.")
        gr.Markdown("Sampling defaults from the checkpoint's `generation_config.json`.")
        with gr.Row():
            temperature = gr.Slider(0, 2, value=gen.temperature, step=0.05, label="Temperature", info="0 = greedy")
            top_p = gr.Slider(0.01, 1, value=gen.top_p, step=0.01, label="Top-p", info="1 = off")
            top_k = gr.Slider(0, 200, value=min(gen.top_k, 200), step=1, label="Top-k (0 = off)")
            min_p = gr.Slider(0, 0.99, value=gen.min_p, step=0.01, label="Min-p", info="0 = off")
        with gr.Row():
            penalty = gr.Slider(0.5, 2, value=min(max(gen.repetition_penalty, 0.5), 2.0), step=0.01,
                                label="Repetition penalty", info="1 = off")
            max_new = gr.Slider(1, most_new, value=default_new, step=1, label="Max new tokens",
                                elem_id="max-new-tokens",
                                info=f"a reply stops here: {default_new} by default on {lm.device}, "
                                     f"at most {most_new:,}")
            seed = gr.Number(-1, precision=0, label="Seed (-1 = random)")
    # min_p last: the API's positional order (message, system prompt, ..., seed) stays as it was.
    settings = [checked_by_studio(c) for c in (temperature, top_p, top_k, penalty, max_new, seed, min_p)]
    max_new.change(lambda n: gr.update(label=settings_title(n)), max_new, accordion, queue=False,
                   api_visibility="undocumented", show_progress="hidden")

    start, respond, stop, clear, api, api_tools = make_chat_events(chat)
    pending = gr.State(None)
    started = textbox.submit(start, [textbox, chatbot, *settings], [textbox, chatbot, stats, pending],
                             queue=False, api_visibility="undocumented")
    replying = started.then(respond, [pending, chatbot, system, *settings], [chatbot, stats, textbox],
                            api_visibility="undocumented", concurrency_id=CHAT_QUEUE,
                            concurrency_limit=CHAT_CONCURRENCY,
                            show_progress="minimal", show_progress_on=chatbot)
    ready = dict(fn=box_ready, outputs=textbox, api_visibility="undocumented", queue=False)
    replying.failure(**ready)  # the reply ends by making the box usable; this covers a failure before it runs
    # Stop ends the reply on the server; its stream then ends as any reply does. (Gradio's `cancels=`
    # would also end it, but a cancel racing the stream's last message sometimes left an "Error"
    # badge over the whole chat.)
    textbox.stop(stop, None, None, queue=False, api_visibility="undocumented")
    chatbot.clear(clear, None, stats, queue=False, api_visibility="undocumented")

    # The /chat API: the same settings, the conversation kept in this API session's state.
    api_message = gr.Textbox(label="Message", visible=False)
    api_reply = gr.Textbox(label="Reply", visible=False)
    api_history = gr.State([])
    gr.Button(visible=False).click(api, [api_message, system, *settings, api_history],
                                   [api_reply, stats, api_history], api_name="chat",
                                   concurrency_id=CHAT_QUEUE, concurrency_limit=CHAT_CONCURRENCY)
    # /chat_tools: function calling in the same conversation (see api_tools).
    api_tools_in = gr.JSON(None, label="Tools", visible=False)
    api_results = gr.JSON(None, label="Tool results", visible=False)
    api_calls = gr.JSON(None, label="Tool calls", visible=False)
    gr.Button(visible=False).click(api_tools, [api_message, api_tools_in, api_results, system, *settings,
                                               api_history],
                                   [api_reply, api_calls, stats, api_history], api_name="chat_tools",
                                   concurrency_id=CHAT_QUEUE, concurrency_limit=CHAT_CONCURRENCY)
