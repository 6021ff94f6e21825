#!/usr/bin/env python
"""Qwen2 Studio: chat with the from-scratch Qwen2 runtime and profile it, in one Gradio app.

    python app.py [--model ID_OR_DIR] [--device cpu|cuda|cuda:N|mps] [--dtype float32|bfloat16|float16]
                  [--quantize int8] [--runs-dir runs] [--host 127.0.0.1] [--port 7860]

The model loads once, at start-up. A hub id that can be neither downloaded nor found in the cache
falls back to random weights of the same official shape and a byte-level tokenizer, so the app
always starts, and the page says so. Chat and profiling share one queue: one job at a time.
"""

from __future__ import annotations

import os

# ZeroGPU Spaces: `spaces` must be imported before torch initialises CUDA; elsewhere it is not needed.
spaces = None
if os.environ.get("SPACES_ZERO_GPU"):
    try:
        import spaces
    except ImportError:
        spaces = None

import argparse  # noqa: E402
import shutil  # noqa: E402
import time  # noqa: E402
import traceback  # noqa: E402
from datetime import datetime  # noqa: E402
from pathlib import Path  # noqa: E402

import gradio as gr  # noqa: E402
import torch  # noqa: E402

import profiling  # noqa: E402
import profiling.charts  # noqa: E402
import qwen2  # noqa: E402
from qwen2.errors import ConfigError, ModelNotFoundError, Qwen2Error, TokenizerError  # noqa: E402

DEFAULT_MODEL = "Qwen/Qwen2-0.5B-Instruct"
RANDOM_NOTICE = "random weights: replies are noise; the profiling figures are real"
# Qwen2-Instruct's generation_config.json, for checkpoints that ship none.
SAMPLING_DEFAULTS = {"temperature": 0.7, "top_p": 0.8, "top_k": 20, "repetition_penalty": 1.05}
COMPUTE_QUEUE = "compute"  # the concurrency group of every event that runs the model
CSS = "#notice { border-left: 4px solid #f59e0b; padding: 0.25rem 0.75rem; background: #f59e0b14; }"


def on_gpu(fn):
    """Run `fn` under spaces.GPU on ZeroGPU hardware; leave it unchanged everywhere else."""
    return spaces.GPU(duration=120)(fn) if spaces is not None else fn


def default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def device_choices() -> list[tuple[str, str]]:
    """(label, value) for each device this machine has: CPU, every CUDA device, MPS."""
    choices = [("CPU", "cpu")]
    for i in range(torch.cuda.device_count() if torch.cuda.is_available() else 0):
        try:
            choices.append((f"CUDA {i}: {torch.cuda.get_device_name(i)}", f"cuda:{i}"))
        except RuntimeError:  # e.g. ZeroGPU before a GPU is attached
            choices.append((f"CUDA {i}", f"cuda:{i}"))
    if getattr(torch.backends, "mps", None) and torch.backends.mps.is_available():
        choices.append(("MPS", "mps"))
    return choices


def same_device(a, b) -> bool:
    a, b = torch.device(a), torch.device(b)
    return a.type == b.type and (a.index or 0) == (b.index or 0)


def slug(text: str) -> str:
    return "".join(c if c.isalnum() or c in "-." else "-" for c in str(text))


class Runtime:
    """The chat model and tokenizer (loaded once) plus models for profiling other devices/dtypes."""

    def __init__(self, source: str, device: str | None, dtype: str | None, quantize: str | None,
                 fallback_config: str | None = None, fast_decode: str = "off"):
        self.source, self.quantize = source, quantize
        device = device or default_device()
        print(f"[qwen2-studio] loading {source} on {device} (a first download shows its progress here)",
              flush=True)
        try:
            self.model = qwen2.load_model(source, device=device, dtype=dtype, quantize=quantize)
            self.shape_source = source
        except ModelNotFoundError as exc:
            print(f"[qwen2-studio] {exc}\n[qwen2-studio] starting with RANDOM WEIGHTS instead", flush=True)
            self.shape_source = fallback_config or source
            try:
                self.model = qwen2.load_model(self.shape_source, device=device, dtype=dtype,
                                              random_weights=True, quantize=quantize)
            except ConfigError:  # a hub id with no built-in shape: use the default model's
                self.shape_source = DEFAULT_MODEL
                self.model = qwen2.load_model(DEFAULT_MODEL, device=device, dtype=dtype,
                                              random_weights=True, quantize=quantize)
        try:
            self.tokenizer = qwen2.Tokenizer.from_pretrained(source)
        except (ModelNotFoundError, TokenizerError) as exc:
            print(f"[qwen2-studio] {exc}\n[qwen2-studio] using the byte-level fallback tokenizer", flush=True)
            self.tokenizer = qwen2.Tokenizer.byte_fallback(self.model.config.vocab_size)
        # Stop on the tokenizer's end tokens and on generation_config.json's / config.json's eos ids.
        eos = self.model.generation_config.get("eos_token_id",
                                               getattr(self.model.config, "eos_token_id", None))
        eos = [] if eos is None else (eos if isinstance(eos, (list, tuple)) else [eos])
        self.stop_ids = set(self.tokenizer.eos_token_ids) | {int(e) for e in eos}
        self._extra: dict = {}
        self.prepare_fast_decode(fast_decode)

    def prepare_fast_decode(self, mode: str):
        """On CUDA, replay decode steps as a CUDA graph (compiled first when mode is "compile").
        Capturing and compiling happen here, at start-up, so no chat reply pays for them."""
        if mode == "off" or self.model.device.type != "cuda":
            return
        from qwen2.fast import enable_cuda_graphs, warm_up

        print(f"[qwen2-studio] {'compiling and ' if mode == 'compile' else ''}capturing the decode step "
              "as a CUDA graph (once, at start-up; compiling takes about a minute)...", flush=True)
        try:
            enable_cuda_graphs(self.model, compile=mode == "compile")
            warm_up(self.model)
        except Exception as exc:  # e.g. no Triton for torch.compile: decode eagerly, still correct
            print(f"[qwen2-studio] fast decode unavailable ({type(exc).__name__}: {exc}); decoding eagerly",
                  flush=True)
            self.model.decode_fn = None
            self.model.set_attention_backend("sdpa")

    @property
    def device(self) -> str:
        return str(self.model.device)

    @property
    def dtype(self) -> str:
        return str(self.model.dtype).removeprefix("torch.")

    def notice(self) -> str:
        if self.model.random_weights:
            return (f"⚠ **{RANDOM_NOTICE}.** `{self.source}` could be neither downloaded nor found in "
                    f"the local cache, so the model has the same shape with random weights"
                    + (" and a byte-level fallback tokenizer." if self.tokenizer.is_fallback else "."))
        if self.tokenizer.is_fallback:
            return "⚠ No tokenizer files were found: a byte-level fallback tokenizer is used."
        return ""

    def summary(self) -> str:
        cfg = self.model.config
        params = sum(p.numel() for p in self.model.parameters())
        return (f"**Model** `{self.source}` · {params / 1e6:,.1f} M parameters · {cfg.num_hidden_layers} "
                f"layers · context {cfg.max_position_embeddings:,} · **device** {self.device} · {self.dtype}"
                + (f" · {self.quantize}" if self.quantize else ""))

    def token_text(self, decoder, token_id: int) -> str:
        """Streamed text of one token; ids with no text of their own (random weights) show as ⟨id⟩."""
        tok = self.tokenizer
        if token_id >= tok.vocab_size or (tok.is_fallback and token_id >= 256
                                          and token_id not in tok.special_token_ids):
            return decoder.flush() + f"⟨{token_id}⟩"
        return decoder.push(token_id)

    def model_for(self, device: str, dtype: str | None):
        """The chat model when device and dtype match it, else a copy loaded for profiling (one kept)."""
        dtype = None if dtype in (None, "", "auto") else dtype
        if same_device(device, self.model.device) and (dtype is None or self.dtype == dtype):
            return self.model
        key = (str(torch.device(device)), dtype)
        if key not in self._extra:
            self._extra.clear()
            self._extra[key] = qwen2.load_model(self.shape_source, device=device, dtype=dtype,
                                                random_weights=self.model.random_weights,
                                                quantize=self.quantize)
        return self._extra[key]


# ---------------------------------------------------------------------------------------------
# Chat


def message_text(content) -> str:
    """The text of a message's content: a plain string (API) or Gradio 6 content parts (UI)."""
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if isinstance(content, dict):  # {"type": "text", "text": ...}, {"text", "files"}; files have none
        return str(content.get("text") or "") if content.get("type", "text") == "text" else ""
    if isinstance(content, (list, tuple)):
        return "".join(message_text(part) for part in content)
    return ""


def history_messages(history) -> list[dict]:
    """Gradio's history as [{"role", "content": str}], skipping empty messages and non-text parts."""
    messages = []
    for item in history or []:
        if isinstance(item, (list, tuple)) and len(item) == 2:  # [user, assistant] pairs
            pairs = [("user", item[0]), ("assistant", item[1])]
        elif isinstance(item, dict):
            pairs = [(item.get("role"), item.get("content"))]
        else:
            pairs = [(getattr(item, "role", None), getattr(item, "content", None))]
        for role, content in pairs:
            text = message_text(content)
            if role in ("user", "assistant") and text.strip():
                messages.append({"role": role, "content": text})
    return messages


def fit_context(tokenizer, context: int, system: str, turns: list[dict], text: str, max_new: int):
    """Prompt ids for the chat, dropping the oldest turns until the prompt leaves room for a reply.

    Returns (ids, turns dropped, max new tokens that fit)."""
    reserve = max(1, min(int(max_new), context // 2))
    dropped = 0
    while True:
        head = [{"role": "system", "content": system}] if system and system.strip() else []
        ids = tokenizer.encode_chat(head + turns + [{"role": "user", "content": text}],
                                    add_generation_prompt=True)
        if len(ids) + reserve <= context or not turns:
            break
        turns = turns[1:]
        while turns and turns[0]["role"] != "user":  # drop a whole turn: the user message and reply
            turns = turns[1:]
        dropped += 1
    if len(ids) >= context:
        raise gr.Error(f"This message is {len(ids)} tokens with the system prompt, but the model's "
                       f"context is {context} tokens: please shorten it.")
    return ids, dropped, min(int(max_new), context - len(ids))


def make_chat(rt: Runtime):
    context = rt.model.config.max_position_embeddings

    def chat(message, history, system_prompt, temperature, top_p, top_k, repetition_penalty,
             max_new_tokens, seed):
        """Stream a reply to `message`; yields (reply so far, stats line)."""
        text = message_text(message)
        if not text.strip():
            return  # an empty message does nothing
        try:
            ids, dropped, max_new = fit_context(rt.tokenizer, context, system_prompt or "",
                                                history_messages(history), text, int(max_new_tokens))
            if dropped:
                gr.Warning(f"The conversation is longer than the {context}-token context: "
                           f"the {dropped} oldest turn(s) were left out.")
            tokens = qwen2.generate(
                rt.model, torch.tensor([ids], dtype=torch.long), max_new_tokens=max_new,
                temperature=float(temperature), top_k=int(top_k), top_p=float(top_p),
                repetition_penalty=float(repetition_penalty), stop_token_ids=rt.stop_ids,
                seed=None if seed is None or int(seed) < 0 else int(seed))
        except (ValueError, TypeError, Qwen2Error) as exc:  # bad settings: a readable message
            raise gr.Error(str(exc)) from None
        decoder = rt.tokenizer.stream_decoder()
        reply, new, started, first = "", 0, time.perf_counter(), None
        try:
            for token_id in tokens:
                first = first or time.perf_counter()
                new += 1
                piece = rt.token_text(decoder, token_id)
                if piece:
                    reply += piece
                    yield reply, f"generating… {new} new tokens"
            reply += decoder.flush()
        except Qwen2Error as exc:
            raise gr.Error(str(exc)) from None
        finally:
            tokens.close()  # Stop closes this generator at its yield: the KV cache goes here
        end = time.perf_counter()
        first = first or end
        rate = (new - 1) / (end - first) if new > 1 and end > first else new / max(end - started, 1e-9)
        stats = (f"**Stats:** {len(ids)} prompt tokens · {new} new tokens · first token "
                 f"{(first - started) * 1000:.0f} ms · {rate:.1f} tok/s · {rt.device} ({rt.dtype})")
        if dropped:
            stats += f"  \n⚠ trimmed: the {dropped} oldest turn(s) did not fit the {context}-token context"
        if max_new < int(max_new_tokens):
            stats += f"  \n⚠ max new tokens lowered to {max_new} to fit the context"
        yield reply, stats

    return chat


# ---------------------------------------------------------------------------------------------
# Dashboard


def figures(runs: list[dict]) -> list:
    """The dashboard's figures for `runs`: per-layer latency (a button switches decode/prefill),
    memory, throughput with the roofline, and the context sweep (None when not measured)."""
    charts = profiling.charts

    def draw(fn, **kwargs):
        try:
            return fn(runs, **kwargs)
        except Exception:  # one broken figure must not hide the others
            traceback.print_exc()
            return None

    has_sweep = any(run.get("sweep") for run in runs)
    return [draw(charts.layer_latency_figure, phase="decode"),
            draw(charts.memory_figure), draw(charts.throughput_figure),
            draw(charts.sweep_figure) if has_sweep else None]


def sweep_lengths(model, new_tokens: int) -> list[int]:
    limit = min(model.config.max_position_embeddings - max(int(new_tokens), 16), 1024)
    return [n for n in (16, 32, 64, 128, 256, 512, 1024) if n <= limit]


def new_stamp(runs_dir: Path) -> str:
    """A date-time prefix for this run's files that no earlier file uses."""
    base = stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
    n = 1
    while any(runs_dir.glob(f"{stamp}-*")) or any(runs_dir.glob(f"compare-{stamp}.*")):
        n += 1
        stamp = f"{base}-{n}"
    return stamp


def write_report(runs: list[dict], path: Path) -> None:
    from profiling.report import write_report as write

    write(runs, path)


def make_dashboard_fns(rt: Runtime, runs_dir: Path):
    def list_runs() -> list[str]:
        files = sorted(runs_dir.glob("*.json"), key=lambda p: p.stat().st_mtime, reverse=True)
        return [p.name for p in files]

    def profile(devices=None, dtype="auto", prompt_tokens=64, new_tokens=16, baseline=False,
                sweep=False, trace=False, progress=gr.Progress()):  # noqa: B008 (Gradio's idiom)
        """Profile the model on each device; return the figures, the runs' JSON, files and a summary."""
        devices = [devices] if isinstance(devices, str) else list(devices or [rt.device])
        stamp = new_stamp(runs_dir)
        runs, files = [], []
        trace_dir = runs_dir / "traces" / stamp if trace else None
        for i, device in enumerate(devices):
            def report(fraction, desc="", i=i, device=device):
                progress((i + float(fraction)) / len(devices), desc=f"{device}: {desc}")
            try:
                model = rt.model_for(device, dtype)
                run = profiling.profile_model(
                    model, prompt_tokens=int(prompt_tokens), new_tokens=int(new_tokens), warmup=1,
                    baseline="transformers" if baseline else None,
                    sweep=sweep_lengths(model, new_tokens) if sweep else None,
                    trace_dir=str(trace_dir) if trace_dir else None, progress=report)
            except Exception as exc:  # bad settings, a missing device, OOM: say so and keep serving
                traceback.print_exc()
                raise gr.Error(f"Profiling on {device} failed: {exc}") from None
            path = runs_dir / f"{stamp}-{slug(device)}.json"
            profiling.save_run(run, path)
            runs.append(run)
            files.append(str(path))
        traces = [str(p) for p in sorted(trace_dir.rglob("*")) if p.is_file()] if trace else []
        report_path = runs_dir / f"{stamp}-report.html"
        write_report(runs, report_path)
        status = f"Saved {', '.join(f'`{Path(f).name}`' for f in files)} in `{runs_dir}`."
        if trace:
            status += (f"  \nTrace (in the downloads): `tensorboard --logdir {trace_dir}` (needs "
                       f"`pip install tensorboard torch-tb-profiler`), or open the `.chrome_trace.json` "
                       f"file in https://ui.perfetto.dev or chrome://tracing.")
        return [*figures(runs), runs, files + [str(report_path)] + traces, status]

    def compare(selected=None, uploaded=None):
        """Load saved runs and uploaded run files (copied into the runs directory) and compare them."""
        paths = [runs_dir / Path(name).name for name in (selected or [])]
        for upload in uploaded or []:
            src = Path(upload if isinstance(upload, str) else upload.name)
            dest = runs_dir / src.name
            while dest.exists():
                dest = dest.with_name(f"{dest.stem}-copy{dest.suffix}")
            try:
                profiling.load_run(src)
            except (ValueError, OSError) as exc:
                raise gr.Error(f"{src.name} is not a run file: {exc}") from None
            shutil.copyfile(src, dest)
            paths.append(dest)
        runs = []
        for path in paths:
            try:
                runs.append(profiling.load_run(path))
            except (ValueError, OSError) as exc:
                raise gr.Error(f"cannot load {path.name}: {exc}") from None
        if not runs:
            raise gr.Error("Choose saved runs, or upload run files (.json), to compare.")
        report_path = runs_dir / f"compare-{new_stamp(runs_dir)}.html"
        write_report(runs, report_path)
        status = f"Comparing {', '.join(f'`{p.name}`' for p in paths)}."
        names = [p.name for p in paths]
        return [*figures(runs), runs, [str(report_path)], status,
                gr.update(choices=list_runs(), value=names)]

    return list_runs, profile, compare


# ---------------------------------------------------------------------------------------------
# The page


def build_demo(rt: Runtime, runs_dir: Path) -> gr.Blocks:
    gen = {**SAMPLING_DEFAULTS, **{k: v for k, v in rt.model.generation_config.items()
                                   if k in SAMPLING_DEFAULTS and v is not None}}
    context = rt.model.config.max_position_embeddings
    list_runs, profile, compare = make_dashboard_fns(rt, runs_dir)
    chat = make_chat(rt)

    with gr.Blocks(title="Qwen2 Studio", analytics_enabled=False) as demo:
        gr.Markdown(f"# Qwen2 Studio\n{rt.summary()}")
        if rt.notice():
            gr.Markdown(rt.notice(), elem_id="notice")
        with gr.Tabs():
            with gr.Tab("Chat", id="chat"):
                stats = gr.Markdown("", elem_id="chat-stats", render=False)
                chat_ui = gr.ChatInterface(
                    on_gpu(chat), api_name="chat", chatbot=gr.Chatbot(height=460, label=rt.source),
                    textbox=gr.Textbox(placeholder="Type a message…", elem_id="chat-input", label="Message",
                                       submit_btn=True, stop_btn=True, autofocus=True, scale=7),
                    validator=lambda message: gr.validate(bool(message_text(message).strip()),
                                                          "Type a message first."),
                    additional_inputs=[
                        gr.Textbox("", label="System prompt", lines=2, render=False,
                                   placeholder="e.g. You are a helpful assistant."),
                        gr.Slider(0, 2, value=float(gen["temperature"]), step=0.05, label="Temperature",
                                  render=False),
                        gr.Slider(0, 1, value=float(gen["top_p"]), step=0.01, label="Top-p", render=False),
                        gr.Slider(0, 200, value=int(gen["top_k"]), step=1, label="Top-k (0 = off)",
                                  render=False),
                        gr.Slider(0.5, 2, value=float(gen["repetition_penalty"]), step=0.01,
                                  label="Repetition penalty", render=False),
                        gr.Slider(1, min(context, 4096), value=min(512, context // 2), step=1,
                                  label="Max new tokens", render=False, elem_id="max-new-tokens"),
                        gr.Number(-1, precision=0, label="Seed (-1 = random)", render=False),
                    ],
                    additional_inputs_accordion=gr.Accordion(
                        "System prompt and sampling (defaults from generation_config.json)", open=False,
                        render=False),
                    additional_outputs=[stats],
                )
                stats.render()
                chat_ui.textbox.stop(lambda s: (s or "").replace("generating…", "Stopped after"),
                                     stats, stats, api_visibility="undocumented", queue=False)
            with gr.Tab("Dashboard", id="dashboard"):
                with gr.Row():
                    devices = gr.CheckboxGroup(device_choices(), value=[rt.device], label="Devices")
                    dtype = gr.Dropdown(["auto", "float32", "bfloat16", "float16"], value="auto",
                                        label="dtype (auto = the chat model's on its device)")
                with gr.Row():
                    prompt_tokens = gr.Slider(8, min(4096, context // 2), value=64, step=8,
                                              label="Prompt tokens")
                    new_tokens = gr.Slider(2, min(256, context // 4), value=16, step=1, label="New tokens")
                with gr.Row():
                    baseline = gr.Checkbox(False, label="transformers baseline")
                    sweep = gr.Checkbox(False, label="Context sweep")
                    trace = gr.Checkbox(False, label="Record a torch.profiler trace")
                run_btn = gr.Button("Run", variant="primary", elem_id="run-profile")
                status = gr.Markdown(
                    "Runs are saved to `%s`. A trace opens in TensorBoard with "
                    "`tensorboard --logdir %s` (`pip install tensorboard torch-tb-profiler`)."
                    % (runs_dir, runs_dir / "traces"), elem_id="profile-status")
                layer_plot = gr.Plot(label="Per-layer latency: attention vs MLP, per device")
                with gr.Row():
                    memory_plot = gr.Plot(label="Memory", scale=1)
                    throughput_plot = gr.Plot(label="Throughput and roofline", scale=2)
                sweep_plot = gr.Plot(label="Context sweep")
                downloads = gr.File(label="Run JSON, HTML report and trace", file_count="multiple",
                                    interactive=False)
                with gr.Accordion("Run JSON", open=False):
                    run_json = gr.JSON(label="Runs")
                with gr.Accordion("Compare saved or uploaded runs", open=True):
                    gr.Markdown("Compare runs from this machine with run files made elsewhere, e.g. "
                                "on a GPU box: `python -m profiling` or this tab's download.")
                    with gr.Row():
                        saved = gr.Dropdown(list_runs(), multiselect=True, label="Saved runs", scale=3,
                                            allow_custom_value=True)  # runs appear after start-up
                        refresh = gr.Button("↻ Refresh", scale=0)
                    uploads = gr.File(label="Upload run files (.json)", file_count="multiple",
                                      file_types=[".json"], type="filepath")
                    compare_btn = gr.Button("Compare", elem_id="compare-runs")

        plots = [layer_plot, memory_plot, throughput_plot, sweep_plot]
        run_btn.click(
            on_gpu(profile), [devices, dtype, prompt_tokens, new_tokens, baseline, sweep, trace],
            plots + [run_json, downloads, status], api_name="profile", show_progress_on=layer_plot,
        ).then(lambda: gr.update(choices=list_runs()), None, saved, api_visibility="undocumented")
        compare_btn.click(compare, [saved, uploads], plots + [run_json, downloads, status, saved],
                          api_name="compare", show_progress_on=layer_plot)
        refresh.click(lambda: gr.update(choices=list_runs()), None, saved, api_visibility="undocumented")

    # One model, one job at a time: chat (UI and API) and profiling share one queue.
    for fn in demo.fns.values():
        if fn.name in {"_submit_fn", "chat", "profile"}:
            fn.concurrency_id, fn.concurrency_limit = COMPUTE_QUEUE, 1
    return demo


def parse_args(argv=None):
    env = os.environ.get
    p = argparse.ArgumentParser(description="Qwen2 Studio: chat + profiling dashboard")
    p.add_argument("--model", default=env("QWEN2_STUDIO_MODEL", DEFAULT_MODEL),
                   help="hub repo id or local checkpoint directory (default: %(default)s)")
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:N or mps (default: CUDA if present)")
    p.add_argument("--dtype", default=None, choices=["float32", "bfloat16", "float16"])
    p.add_argument("--quantize", default=None, choices=["int8"], help="int8 weight-only linear layers")
    p.add_argument("--fast-decode", default="off" if os.environ.get("SPACES_ZERO_GPU") else "graphs",
                   choices=["graphs", "compile", "off"],
                   help="CUDA only: replay decode steps as a CUDA graph (default); 'compile' also fuses "
                        "kernels with torch.compile (about a minute per context-length bucket)")
    p.add_argument("--runs-dir", default=env("QWEN2_STUDIO_RUNS_DIR", "runs"), help="profiling runs")
    p.add_argument("--host", default=env("GRADIO_SERVER_NAME", "127.0.0.1"))
    p.add_argument("--port", type=int, default=int(env("GRADIO_SERVER_PORT", "7860")))
    # Testing aid: the random-weights fallback builds this config.json's shape instead of the hub id's.
    p.add_argument("--fallback-config", default=env("QWEN2_STUDIO_FALLBACK_CONFIG"), help=argparse.SUPPRESS)
    return p.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    runs_dir = Path(args.runs_dir).resolve()
    runs_dir.mkdir(parents=True, exist_ok=True)
    rt = Runtime(args.model, args.device, args.dtype, args.quantize, args.fallback_config, args.fast_decode)
    demo = build_demo(rt, runs_dir)
    demo.queue(default_concurrency_limit=1)
    demo.launch(server_name=args.host, server_port=args.port, show_error=True,
                allowed_paths=[str(runs_dir)], theme=gr.themes.Soft(), css=CSS)


if __name__ == "__main__":
    main()
