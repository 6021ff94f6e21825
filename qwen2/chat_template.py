"""Chat templates: Hugging Face-compatible Jinja, sandboxed and bounded in time and size.

    template = ChatTemplate(source, origin="org/model tokenizer_config.json")
    text = template.render(messages=messages, add_generation_prompt=True, tools=None)

A chat template is code shipped inside a downloaded checkpoint, so it runs in Jinja's immutable
sandbox with the globals Hugging Face provides (`raise_exception`, `tojson`, `strftime_now`), and
any attempt to reach a private attribute fails at once. The sandbox alone stops a template from
escaping, not from exhausting the machine: `{{ 'a' * 10**9 }}` or two nested `range(100000)`
loops would hold a worker for minutes or allocate gigabytes. So every compile and render here is
bounded by `TemplateLimits`:

* a wall-clock deadline, checked at every step that can repeat: each item of every `{% for %}`
  loop (the compiled loops iterate through a guard), every call (macros, recursion, methods),
  filter and test, and inside the size estimates; compiling runs under a trace function instead,
  since Jinja's parser has no such hooks;
* a cap on the rendered text, and on every single string, list or dict the template makes: the
  operations that can amplify a value (`*`, `**`, `+`, `%`, `~`, `str.center`, `str.replace`,
  `str.join`, `str.format`, `|indent`, `|tojson(indent=...)`, ...) are checked *before* they run,
  from an estimate of what they would produce, and every result is checked after;
* a budget of `range()` items per render.

Going over a limit raises TokenizerError naming the template's origin and the limit. Jinja folds
constant expressions at compile time (`{{ 10**(10**9) }}` would hang `from_string`); the checked
operations are never folded past a limit, so a bomb in a branch that is never taken stays
harmless, and one that runs fails at render time.

Known gap: Python compares and hashes nested containers in C, where no deadline can interrupt
it; a template that builds an exponentially shared structure (`{% set x = [x, x] %}` forty times)
and then compares it with `==` can still spin. Printing or serialising such a structure is caught.

The parts, one job each: qwen2/template_budget.py (the limits and the budget of the compile or
render in progress), qwen2/template_checks.py (the pre-checks of every amplifying operation),
qwen2/template_sandbox.py (the Jinja environment that routes the template through them, and the
compile); this module renders a compiled template under a fresh budget.
"""

from __future__ import annotations

from .errors import TokenizerError
from .template_budget import DEFAULT_LIMITS, LimitHit, TemplateLimits, over_limit, running
from .template_sandbox import compile_template

__all__ = ["DEFAULT_LIMITS", "ChatTemplate", "TemplateLimits"]


class ChatTemplate:
    """One compiled chat template. `origin` names where it came from, for error messages.

    Attributes: source, origin, limits, variables (every variable name the template reads,
    e.g. {"messages", "tools", "add_generation_prompt", "loop", ...}).
    Raises TokenizerError when the source does not compile or is over a limit.
    """

    def __init__(self, source: str, origin: str, limits: TemplateLimits = DEFAULT_LIMITS):
        if not isinstance(source, str):
            raise TokenizerError(f"chat template from {origin} must be a string, "
                                 f"got {type(source).__name__}")
        if len(source) > limits.source_chars:
            raise TokenizerError(
                f"chat template from {origin} is {len(source):,} characters long, over the "
                f"limit TemplateLimits.source_chars = {limits.source_chars:,}"
            )
        self.source, self.origin, self.limits = source, origin, limits
        try:
            self.variables, self._template = compile_template(source, limits)
        except LimitHit as hit:
            raise TokenizerError(f"chat template from {origin} does not compile: {hit}") from None
        except Exception as exc:  # TemplateSyntaxError, RecursionError and friends
            raise TokenizerError(f"chat template from {origin} does not compile: {exc}") from exc

    def render(self, limits: TemplateLimits | None = None, /, **variables) -> str:
        """The template's text for `variables` (under `limits`, by default those it was compiled
        with); TokenizerError if it fails or hits a limit."""
        limits = limits or self.limits
        pieces, size = [], 0
        try:
            with running(limits, compiling=False):
                for piece in self._template.generate(**variables):
                    size += len(piece)
                    if size > limits.output_chars:
                        over_limit("the rendered text would be longer", "output_chars")
                    pieces.append(piece)
        except LimitHit as hit:
            raise TokenizerError(f"chat template from {self.origin} was stopped: {hit}") from None
        except Exception as exc:  # SecurityError, raise_exception(), TypeError, UndefinedError
            raise TokenizerError(
                f"chat template from {self.origin} failed to render "
                f"({type(exc).__name__}): {exc}"
            ) from exc
        return "".join(pieces)
