"""Text <-> token ids for Qwen2: the `tokenizers` library, a sandboxed Jinja chat template, a
streaming detokenizer, and a byte-level fallback for when no tokenizer files exist.

    tok = Tokenizer.from_pretrained("Qwen/Qwen2-0.5B-Instruct")   # or a local directory
    ids = tok.encode_chat([{"role": "user", "content": "你好"}])
    stream = tok.detokenizer()
    for token_id in generated:
        print(stream.push(token_id), end="")
    print(stream.flush())

Qwen2 has no BOS token and marks turns with ChatML special tokens (<|im_start|>, <|im_end|>);
special-token strings typed into the text are encoded as those tokens, as Hugging Face does.

The chat template is code shipped inside a downloaded repo: it runs sandboxed and bounded in
time and size (qwen2.chat_template). `tools=[...]` renders function specs the way transformers
does; qwen2.tool_calls parses the model's <tool_call> replies.

Like transformers' Qwen2Tokenizer, text is NFC-normalised before encoding even when
tokenizer.json has no normalizer of its own (files exported from GGUF have none).
"""

from __future__ import annotations

import os
import re
from pathlib import Path

from .chat_template import DEFAULT_LIMITS, ChatTemplate, TemplateLimits
from .chatml import DEFAULT_SYSTEM_PROMPT, ENDOFTEXT, IM_END, IM_START, normalize_messages, render_chatml  # noqa: F401
from .config import read_json_object
from .errors import TokenizerError
from .hub import resolve
from .tool_calls import validate_tools

SPECIAL_TOKENS = (ENDOFTEXT, IM_START, IM_END)
# The ids these tokens have in every released Qwen2 vocabulary.
QWEN2_SPECIAL_IDS = {ENDOFTEXT: 151643, IM_START: 151644, IM_END: 151645}

_REPLACEMENT = "\ufffd"  # what a decoder yields for an incomplete or invalid UTF-8 sequence


# --------------------------------------------------------------------------------------------
# Streaming detokenizer


class IncrementalDetokenizer:
    """Turn token ids into text one at a time without ever emitting half a character.

    A byte-level BPE token can end in the middle of a multi-byte UTF-8 character; decoding it
    alone gives U+FFFD. So we decode a small window of recent tokens and hold back a trailing
    U+FFFD until the bytes that complete it arrive. The window starts one token before the last
    clean boundary (as TGI and vLLM do) so decoders that treat the first token specially still
    see it in context. Joining every push() and the final flush() gives decode(all ids).
    """

    def __init__(self, tokenizer: "Tokenizer", skip_special_tokens: bool = True):
        self._tok = tokenizer
        self._skip = skip_special_tokens
        self._window: list[int] = []  # ids since the window start (context token + pending)
        self._sent = 0  # characters of decode(window) already returned

    def push(self, token_id: int) -> str:
        """Add one token; return the text it completed ("" while a character is unfinished)."""
        self._window.append(self._tok._check_id(token_id))
        text = self._tok.decode(self._window, skip_special_tokens=self._skip)
        if text.endswith(_REPLACEMENT):
            # Only the last U+FFFD can still change (into the character its bytes begin);
            # earlier ones come from bytes that can never become valid, so send them on.
            stable = len(text) - 1
            out = text[self._sent:stable] if stable > self._sent else ""
            self._sent = max(self._sent, stable)
            return out
        out = text[self._sent:]
        # Clean boundary: restart the window at the last token, already fully sent.
        last = self._window[-1]
        self._window = [last]
        self._sent = len(self._tok.decode(self._window, skip_special_tokens=self._skip))
        return out

    def flush(self) -> str:
        """Return whatever is held back (an unfinished character decodes to U+FFFD)."""
        text = self._tok.decode(self._window, skip_special_tokens=self._skip)
        out = text[self._sent:]
        self._window, self._sent = [], 0
        return out


# --------------------------------------------------------------------------------------------
# The tokenizer


class Tokenizer:
    """Encode/decode text and render chats for one Qwen2 vocabulary.

    Build it with `Tokenizer.from_pretrained(source)` or `Tokenizer.byte_fallback(vocab_size)`.
    Attributes: vocab_size, eos_token_ids, special_token_ids, special_tokens (text -> id),
    is_fallback, chat_template (None means the built-in ChatML renderer), source,
    template_limits (qwen2.chat_template.TemplateLimits: what rendering the template may use).
    """

    def __init__(self, *, backend, vocab_size: int, special_tokens: dict[str, int],
                 eos_token_ids: list[int], chat_template: str | None, is_fallback: bool,
                 source: str, template_vars: dict | None = None):
        self._backend = backend  # a tokenizers.Tokenizer, or None for the byte fallback
        self.vocab_size = vocab_size
        self.special_tokens = dict(special_tokens)
        self.special_token_ids = set(special_tokens.values())
        self.eos_token_ids = list(eos_token_ids)
        self.chat_template = chat_template
        self.is_fallback = is_fallback
        self.source = source
        self._template_vars = dict(template_vars or {})  # bos_token, eos_token, pad_token
        self.template_limits: TemplateLimits = DEFAULT_LIMITS
        self._compiled: ChatTemplate | None = None
        self._compile_error: TokenizerError | None = None  # a template that failed stays failed
        self._special_re = (
            re.compile("|".join(re.escape(t) for t in sorted(special_tokens, key=len, reverse=True)))
            if special_tokens else None
        )
        self._id_to_special = {i: t for t, i in special_tokens.items()}

    def __repr__(self) -> str:
        kind = "byte fallback" if self.is_fallback else self.source
        return f"Tokenizer({kind}, vocab_size={self.vocab_size}, eos={self.eos_token_ids})"

    # ---- construction --------------------------------------------------------------------

    @classmethod
    def from_pretrained(cls, source: str | os.PathLike) -> "Tokenizer":
        """Load tokenizer.json (+ tokenizer_config.json, generation_config.json) from a local
        directory or a hub repo id. Raises TokenizerError naming the file at fault."""
        from tokenizers import Tokenizer as HFTokenizer

        directory = resolve(source)  # ModelNotFoundError propagates unchanged
        path = directory / "tokenizer.json"
        if not path.is_file():
            raise TokenizerError(
                f"tokenizer file not found: {path} (Qwen2 repos ship tokenizer.json; "
                f"use Tokenizer.byte_fallback(vocab_size) to run without one)"
            )
        try:
            backend = HFTokenizer.from_file(str(path))
        except Exception as exc:  # the Rust side raises a bare Exception for bad JSON
            raise TokenizerError(f"cannot read tokenizer file {path}: {exc}") from exc

        config = _read_json(directory / "tokenizer_config.json")
        _default_to_nfc(backend, config)
        gen_config = _read_json(directory / "generation_config.json")

        # Special tokens: every added token flagged special (the ChatML markers for Qwen2).
        special = {t.content: i for i, t in backend.get_added_tokens_decoder().items() if t.special}
        vocab_size = max([backend.get_vocab_size(with_added_tokens=True), *[i + 1 for i in special.values()]])

        template_vars = {}
        for key in ("bos_token", "eos_token", "pad_token", "unk_token"):
            value = config.get(key)
            if isinstance(value, dict):  # older files store AddedToken dicts
                value = value.get("content")
            if isinstance(value, str):
                template_vars[key] = value

        eos = _eos_ids(gen_config.get("eos_token_id"), directory / "generation_config.json")
        if not eos and "eos_token" in template_vars:
            eos_id = backend.token_to_id(template_vars["eos_token"])
            eos = [eos_id] if eos_id is not None else []
        if not eos:  # no config says: use the ChatML end markers that exist
            eos = [special[t] for t in (IM_END, ENDOFTEXT) if t in special]

        return cls(backend=backend, vocab_size=vocab_size, special_tokens=special,
                   eos_token_ids=eos, chat_template=_find_template(directory, config),
                   is_fallback=False, source=str(source), template_vars=template_vars)

    @classmethod
    def byte_fallback(cls, vocab_size: int) -> "Tokenizer":
        """A tokenizer needing no files: UTF-8 byte b is id b; the three ChatML special tokens
        take Qwen2's ids when the vocab is that big, else the top three ids. Ids in between
        are unused and decode to nothing. For random-weight models and tests."""
        if not isinstance(vocab_size, int) or vocab_size < 256 + len(SPECIAL_TOKENS):
            raise TokenizerError(
                f"byte_fallback needs vocab_size >= {256 + len(SPECIAL_TOKENS)} "
                f"(256 bytes + 3 special tokens), got {vocab_size!r}"
            )
        if vocab_size > max(QWEN2_SPECIAL_IDS.values()):
            special = dict(QWEN2_SPECIAL_IDS)
        else:
            top = vocab_size - len(SPECIAL_TOKENS)
            special = {t: top + k for k, t in enumerate(SPECIAL_TOKENS)}
        return cls(backend=None, vocab_size=vocab_size, special_tokens=special,
                   eos_token_ids=[special[IM_END], special[ENDOFTEXT]], chat_template=None,
                   is_fallback=True, source="byte-fallback",
                   template_vars={"eos_token": IM_END, "pad_token": ENDOFTEXT})

    # ---- encode / decode -----------------------------------------------------------------

    def encode(self, text: str) -> list[int]:
        """Token ids of `text`; special-token strings in it become their ids. No BOS."""
        if not isinstance(text, str):
            raise TokenizerError(f"encode expects a str, got {type(text).__name__}")
        if self._backend is not None:
            return self._backend.encode(text, add_special_tokens=False).ids
        ids: list[int] = []
        pos = 0
        for match in self._special_re.finditer(text):
            ids.extend(text[pos:match.start()].encode("utf-8"))
            ids.append(self.special_tokens[match.group()])
            pos = match.end()
        ids.extend(text[pos:].encode("utf-8"))
        return ids

    def decode(self, ids, skip_special_tokens: bool = True) -> str:
        """Text of `ids` (a list, tuple or 1-D tensor). Incomplete UTF-8 becomes U+FFFD."""
        if hasattr(ids, "tolist"):  # torch / numpy
            ids = ids.tolist()
        if isinstance(ids, int):
            ids = [ids]
        # Ids past the tokenizer's vocab exist in the model's padded embedding (Qwen2: 151646 tokens,
        # 151936 rows); a sampled one has no text, like HF's decode, rather than breaking a stream.
        ids = [i for i in map(self._check_id, ids) if i < self.vocab_size]
        if self._backend is not None:
            return self._backend.decode(ids, skip_special_tokens=skip_special_tokens)
        # Byte fallback: runs of byte ids are decoded together so multi-byte chars join up.
        pieces, run = [], bytearray()
        for i in ids:
            if i < 256:
                run.append(i)
            elif i in self._id_to_special and not skip_special_tokens:
                pieces.append(run.decode("utf-8", errors="replace"))
                run = bytearray()
                pieces.append(self._id_to_special[i])
            # other ids (unused, or skipped specials) have no text
        pieces.append(run.decode("utf-8", errors="replace"))
        return "".join(pieces)

    def _check_id(self, token_id) -> int:
        try:
            value = int(token_id)
        except (TypeError, ValueError):
            raise TokenizerError(f"token id must be an integer, got {token_id!r}") from None
        if value < 0:
            raise TokenizerError(f"token id {value} is negative; ids are 0..{self.vocab_size - 1}")
        return value

    def detokenizer(self, skip_special_tokens: bool = True) -> IncrementalDetokenizer:
        return IncrementalDetokenizer(self, skip_special_tokens=skip_special_tokens)

    # ---- chat ----------------------------------------------------------------------------

    def apply_chat_template(self, messages: list[dict], add_generation_prompt: bool = True,
                            tools: list[dict] | None = None) -> str:
        """The prompt text for `messages`, rendered by the repo's template (or ChatML).

        `tools` is a list of JSON function specs (see qwen2.tool_calls.validate_tools), rendered
        as transformers' apply_chat_template(..., tools=tools) does. Raises TokenizerError for
        bad messages or tools, a template that fails or goes over `template_limits`, or tools
        given to a template that never reads them.
        """
        messages = normalize_messages(messages)
        tools = validate_tools(tools)
        if self.chat_template is None:
            return render_chatml(messages, add_generation_prompt, tools=tools)
        template = self._template()
        if tools and "tools" not in template.variables:
            raise TokenizerError(
                f"chat template from {self.source} does not render tools (it never reads "
                f"'tools'); use a checkpoint whose template supports function calling"
            )
        return template.render(
            self.template_limits, messages=messages, add_generation_prompt=add_generation_prompt,
            tools=tools, documents=None, **self._template_vars,
        )

    def encode_chat(self, messages: list[dict], add_generation_prompt: bool = True,
                    tools: list[dict] | None = None) -> list[int]:
        return self.encode(self.apply_chat_template(messages, add_generation_prompt, tools=tools))

    def _template(self) -> ChatTemplate:
        """The compiled chat template (compiled once; a failure is remembered, not retried)."""
        if self._compile_error is not None:
            raise self._compile_error
        if self._compiled is None:
            try:
                self._compiled = ChatTemplate(self.chat_template, self.source, self.template_limits)
            except TokenizerError as exc:
                self._compile_error = exc
                raise
        return self._compiled


# --------------------------------------------------------------------------------------------
# File helpers


def _read_json(path: Path) -> dict:
    """The JSON object in `path`, {} if the file is absent; TokenizerError if it is broken."""
    return read_json_object(path, TokenizerError) if path.is_file() else {}


def _eos_ids(value, path: Path) -> list[int]:
    if value is None:
        return []
    values = value if isinstance(value, list) else [value]
    if not all(isinstance(v, int) and not isinstance(v, bool) for v in values):
        raise TokenizerError(f"eos_token_id in {path} must be an int or a list of ints: {value!r}")
    return list(values)


def _default_to_nfc(backend, config: dict) -> None:
    """Give `backend` the NFC normalizer transformers' Qwen2Tokenizer always uses, when
    tokenizer.json has no normalizer (files exported from GGUF have none): "e\\u0301" must
    encode as "\\u00e9" does. Set on the backend, so special tokens are still split off first
    and their neighbours normalised on their own, exactly as transformers does. A
    tokenizer_config.json naming another class gets tokenizer.json as it is, as there."""
    from tokenizers import normalizers

    tokenizer_class = config.get("tokenizer_class")
    if backend.normalizer is None and tokenizer_class in (None, "Qwen2Tokenizer", "Qwen2TokenizerFast"):
        backend.normalizer = normalizers.NFC()


def _find_template(directory: Path, config: dict) -> str | None:
    """The chat template: chat_template.jinja (transformers >= 4.43 saves it there) wins over
    tokenizer_config.json's "chat_template", which is a string or a list of named templates."""
    jinja_file = directory / "chat_template.jinja"
    if jinja_file.is_file():
        try:
            return jinja_file.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            raise TokenizerError(f"cannot read {jinja_file}: {exc}") from exc
    template = config.get("chat_template")
    if template is None or isinstance(template, str):
        return template
    if isinstance(template, list):
        named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
        if isinstance(named.get("default"), str):
            return named["default"]
    raise TokenizerError(
        f"chat_template in {directory / 'tokenizer_config.json'} must be a string "
        f"or a list with a 'default' entry"
    )
