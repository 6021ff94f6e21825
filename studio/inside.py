"""The Inside-the-model view's logic, apart from the page: one walk through the model per session
(inside.InsideSession), the latest few kept, each bounded in tokens so that its memory and the time
it holds the model alone stay small on a shared CPU."""

from __future__ import annotations

import inside.charts
from inside import InsideSession, InsideSettings
from qwen2.errors import Qwen2Error

from .chat import CHARS_PER_TOKEN_BOUND
from .errors import VisitorError
from .hosting import Busy, LoadedModel
from .sessions import SessionLRU
from .settings import checked_sampling, checked_seed
from .text import plain

INSIDE_MAX_TOKENS = 512  # prompt + stepped tokens: the walk's cap (its times: docs/benchmarks.md)
INSIDE_SESSIONS = 4
HOLDING = "the Inside-the-model view is running"


class Inside:
    """One InsideSession (a prompt's walk through the model, stepped a token at a time) per session."""

    def __init__(self, lm: LoadedModel, busy: Busy, keep: int = INSIDE_SESSIONS,
                 max_tokens: int = INSIDE_MAX_TOKENS):
        self.lm, self.busy, self.max_tokens = lm, busy, max_tokens
        self.sessions: SessionLRU[InsideSession] = SessionLRU(keep)

    def start(self, key: str, prompt, temperature=0.0, top_k=0, top_p=1.0, min_p=0.0, repetition_penalty=1.0,
              seed=-1, layer=0, theme="light") -> list:
        """Run `prompt` through the model; returns the views of the token it makes next."""
        prompt = str(prompt or "")
        if not prompt.strip():
            raise VisitorError("Type a prompt first, e.g. “The capital of France is”.")
        if len(prompt) > CHARS_PER_TOKEN_BOUND * self.max_tokens:
            raise VisitorError(f"This prompt is {len(prompt):,} characters; the Inside view explains at most "
                               f"{self.max_tokens} tokens: please shorten it.")
        settings = checked_sampling(temperature, top_p, top_k, repetition_penalty, min_p)
        seed = checked_seed(seed)
        try:
            session = InsideSession(self.lm.model, self.lm.tokenizer,
                                    InsideSettings(sampling=settings, seed=seed, max_tokens=self.max_tokens))
            with self.busy.hold(HOLDING):
                view = session.start(prompt)
        except (ValueError, TypeError, OverflowError, Qwen2Error) as exc:
            raise VisitorError(f"Cannot run this prompt: {exc}") from None
        self.sessions.put(key, session)
        return self.figures(view, layer, theme)

    def step(self, key: str, layer=0, theme="light") -> list:
        """Feed the chosen token through the KV cache (one decode step); returns the new views."""
        session = self.sessions.get(key)
        if session is None:
            raise VisitorError("Run a prompt first; then “Next token” advances it one decode step.")
        try:
            with self.busy.hold(HOLDING):
                view = session.step()
        except Qwen2Error as exc:
            raise VisitorError(str(exc)) from None
        return self.figures(view, layer, theme)

    @staticmethod
    def figures(view: dict, layer, theme="light") -> list:
        """[summary, path, candidates, logit lens, attention figures, the view's JSON], drawn for the
        page's theme ("dark", or light for anything else)."""
        charts, theme = inside.charts, _theme(theme)
        layer = max(0, min(int(layer or 0), view["model"]["layers"] - 1))
        return [inside_summary(view), charts.path_figure(view, theme=theme),
                charts.candidates_figure(view, theme=theme), charts.logit_lens_figure(view, theme=theme),
                charts.attention_figure(view, layer, theme=theme), view]

    @staticmethod
    def attention(view, layer, theme="light"):
        """Another layer's attention map, from the view already computed (no model run); None without one."""
        if not view:
            return None
        layer = max(0, min(int(layer), view["model"]["layers"] - 1))
        return inside.charts.attention_figure(view, layer, theme=_theme(theme))


def _theme(theme) -> str:
    return "dark" if theme == "dark" else "light"  # a value from the page: never an error


def inside_summary(view: dict) -> str:
    tokens = "".join(t["text"] for t in view["tokens"])
    chosen = view["chosen"]
    text = (f"**Step {view['step']}** ({view['phase']}) · {len(view['tokens'])} tokens · next token "
            f"{plain(repr(chosen['text']))} (id {chosen['id']}, p = {chosen['prob']:.3f}"
            f"{', a stop token' if chosen['stop'] else ''})  \n**Text so far:** {plain(repr(tokens))}")
    return (f"⚠ {plain(view['notice'])}  \n" if view.get("notice") else "") + text
