"""qwen2.tokenizer: encoding, streaming, chat templates, the sandbox, the byte fallback and hub
loading, checked against transformers' tokenizer as an oracle where it is installed."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest

from qwen2.errors import ModelNotFoundError, TokenizerError
from qwen2.tokenizer import DEFAULT_SYSTEM_PROMPT, Tokenizer, render_chatml
from tests.tokenizer_factory import QWEN2_CHAT_TEMPLATE, make_hub_cache, save_tiny_tokenizer

MIXED = "Hello 世界! 你好，机器学习 🎉🚀 café ❤️ naïve\n日本語 done."

CONVERSATION = [
    {"role": "system", "content": "You are a terse bot."},
    {"role": "user", "content": "你好! What is 2+2?"},
    {"role": "assistant", "content": "4 🎉"},
    {"role": "user", "content": "And 3+3?"},
]


@pytest.fixture(scope="module")
def tok_dir(tmp_path_factory) -> Path:
    directory = tmp_path_factory.mktemp("tiny-tok")
    save_tiny_tokenizer(directory)
    return directory


@pytest.fixture(scope="module")
def tok(tok_dir) -> Tokenizer:
    return Tokenizer.from_pretrained(tok_dir)


@pytest.fixture(scope="module")
def hf_tok(tok_dir):
    transformers = pytest.importorskip("transformers", reason="transformers is the test oracle")
    return transformers.AutoTokenizer.from_pretrained(str(tok_dir))


def _with_template(src: Path, dst: Path, template: str | None) -> Path:
    shutil.copytree(src, dst)
    config = json.loads((dst / "tokenizer_config.json").read_text())
    if template is None:
        config.pop("chat_template")
    else:
        config["chat_template"] = template
    (dst / "tokenizer_config.json").write_text(json.dumps(config))
    return dst


# ---- the factory --------------------------------------------------------------------------


def test_factory_is_deterministic_with_specials_at_the_end(tmp_path):
    a = save_tiny_tokenizer(tmp_path / "a")
    b = save_tiny_tokenizer(tmp_path / "b")
    assert a == b
    assert (tmp_path / "a" / "tokenizer.json").read_bytes() == (tmp_path / "b" / "tokenizer.json").read_bytes()
    assert a["vocab_size"] <= 400
    assert [a["endoftext"], a["im_start"], a["im_end"]] == list(range(a["vocab_size"] - 3, a["vocab_size"]))


# ---- loading and attributes ---------------------------------------------------------------


def test_attributes(tok, tok_dir):
    ids = save_tiny_tokenizer(tok_dir)  # same files again, returns the ids
    assert tok.vocab_size == ids["vocab_size"]
    assert tok.special_token_ids == {ids["endoftext"], ids["im_start"], ids["im_end"]}
    assert tok.eos_token_ids == [ids["im_end"]]  # eos_token from tokenizer_config.json
    assert tok.chat_template == QWEN2_CHAT_TEMPLATE
    assert tok.is_fallback is False


def test_eos_ids_come_from_generation_config(tok_dir, tmp_path):
    d = shutil.copytree(tok_dir, tmp_path / "t")
    (d / "generation_config.json").write_text(json.dumps({"eos_token_id": [352, 350]}))
    assert Tokenizer.from_pretrained(d).eos_token_ids == [352, 350]
    (d / "generation_config.json").write_text(json.dumps({"eos_token_id": 350}))
    assert Tokenizer.from_pretrained(d).eos_token_ids == [350]


def test_missing_tokenizer_json_names_the_path(tmp_path):
    with pytest.raises(TokenizerError, match=re.escape(str(tmp_path / "tokenizer.json"))):
        Tokenizer.from_pretrained(tmp_path)


def test_invalid_tokenizer_json_names_the_path(tmp_path):
    (tmp_path / "tokenizer.json").write_text("{not json")
    with pytest.raises(TokenizerError, match="tokenizer.json"):
        Tokenizer.from_pretrained(tmp_path)


def test_invalid_tokenizer_config_names_the_path(tok_dir, tmp_path):
    d = shutil.copytree(tok_dir, tmp_path / "t")
    (d / "tokenizer_config.json").write_text("{broken")
    with pytest.raises(TokenizerError, match="tokenizer_config.json"):
        Tokenizer.from_pretrained(d)


def test_missing_directory_is_model_not_found(tmp_path):
    with pytest.raises(ModelNotFoundError):
        Tokenizer.from_pretrained(tmp_path / "nope")


# ---- encode / decode ----------------------------------------------------------------------


def test_encode_matches_transformers_with_special_tokens(tok, hf_tok):
    text = f"<|im_start|>user\n{MIXED}<|im_end|>\n<|endoftext|>tail"
    ids = tok.encode(text)
    assert ids == hf_tok(text, add_special_tokens=False)["input_ids"]
    assert ids == hf_tok.encode(text)  # Qwen2 adds no BOS either way
    assert {351, 352, 350} <= set(ids)
    assert tok.decode(ids, skip_special_tokens=False) == text
    assert tok.decode(ids) == hf_tok.decode(ids, skip_special_tokens=True)
    assert tok.decode(ids) == text.replace("<|im_start|>", "").replace("<|im_end|>", "").replace(
        "<|endoftext|>", "")


def test_ids_past_the_vocab_have_no_text_and_negative_ids_are_named(tok):
    # The model's embedding is padded past the tokenizer's vocab; a sampled padding id has no text.
    assert tok.decode([tok.encode("a")[0], tok.vocab_size + 7]) == "a"
    assert tok.detokenizer().push(tok.vocab_size) == ""
    with pytest.raises(TokenizerError, match="-1"):
        tok.decode([-1])
    with pytest.raises(TokenizerError, match="-3"):
        tok.detokenizer().push(-3)


def test_decode_accepts_tensors(tok):
    torch = pytest.importorskip("torch")
    ids = tok.encode(MIXED)
    assert tok.decode(torch.tensor(ids)) == MIXED


# ---- streaming ----------------------------------------------------------------------------


def _splits_a_character(tok: Tokenizer, ids: list[int]) -> bool:
    """True if some token, decoded alone, holds only part of a UTF-8 character."""
    return any("\ufffd" in tok.decode([i]) for i in ids)


@pytest.mark.parametrize("skip", [True, False])
def test_detokenizer_never_emits_half_characters(tok, skip):
    text = f"{MIXED}<|im_end|>再见 👋"
    ids = tok.encode(text)
    assert _splits_a_character(tok, ids), "the test needs a token boundary inside a character"
    stream = tok.detokenizer(skip_special_tokens=skip)
    chunks = [stream.push(i) for i in ids]
    chunks.append(stream.flush())
    assert not any("\ufffd" in c for c in chunks)
    assert "".join(chunks) == tok.decode(ids, skip_special_tokens=skip)
    expected = text if not skip else text.replace("<|im_end|>", "")
    assert "".join(chunks) == expected
    assert sum(1 for c in chunks if c == "") > 0  # it did hold back while characters were open


def test_detokenizer_emits_promptly(tok):
    ids = tok.encode("hello world")
    stream = tok.detokenizer()
    assert "".join(stream.push(i) for i in ids) == "hello world"  # nothing left for flush
    assert stream.flush() == ""


def test_detokenizer_flushes_an_unfinished_character(tok):
    ids = tok.encode("ab🎉")
    assert tok.decode(ids[:-1]).endswith("\ufffd")  # the emoji's last byte is in the last token
    stream = tok.detokenizer()
    assert "".join(stream.push(i) for i in ids[:-1]) == "ab"
    assert stream.flush() == "\ufffd"
    assert stream.flush() == ""


def test_detokenizer_passes_invalid_bytes_on(tok):
    # Lone continuation bytes can never complete; they must not be held back forever.
    cont = tok.encode("\u00e9")  # é = C3 A9
    lone = [i for i in cont if tok.decode([i]) == "\ufffd"]
    assert lone
    ids = lone[-1:] * 3 + tok.encode("ok")
    stream = tok.detokenizer()
    chunks = [stream.push(i) for i in ids] + [stream.flush()]
    assert "".join(chunks) == tok.decode(ids)


# ---- chat templates -----------------------------------------------------------------------


@pytest.mark.parametrize("with_system", [True, False])
@pytest.mark.parametrize("gen", [True, False])
def test_jinja_template_matches_chatml_and_transformers(tok, tok_dir, with_system, gen):
    messages = CONVERSATION if with_system else CONVERSATION[1:]
    rendered = tok.apply_chat_template(messages, add_generation_prompt=gen)
    assert rendered == render_chatml(messages, add_generation_prompt=gen)
    assert (DEFAULT_SYSTEM_PROMPT in rendered) is (not with_system)
    assert rendered.endswith("<|im_start|>assistant\n") is gen
    transformers = pytest.importorskip("transformers")
    hf = transformers.AutoTokenizer.from_pretrained(str(tok_dir))
    assert rendered == hf.apply_chat_template(messages, tokenize=False, add_generation_prompt=gen)
    ids = hf.apply_chat_template(messages, tokenize=True, add_generation_prompt=gen)
    ids = ids["input_ids"] if isinstance(ids, dict) or hasattr(ids, "keys") else ids
    assert tok.encode_chat(messages, add_generation_prompt=gen) == list(ids)


def test_render_chatml_exact_text():
    assert render_chatml([{"role": "user", "content": "hi"}]) == (
        "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
        "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
    )
    assert render_chatml([], add_generation_prompt=True) == "<|im_start|>assistant\n"


def test_no_template_uses_chatml(tok_dir, tmp_path):
    t = Tokenizer.from_pretrained(_with_template(tok_dir, tmp_path / "t", None))
    assert t.chat_template is None
    assert t.apply_chat_template(CONVERSATION) == render_chatml(CONVERSATION)


def test_chat_template_jinja_file_wins(tok_dir, tmp_path):
    d = _with_template(tok_dir, tmp_path / "t", None)
    (d / "chat_template.jinja").write_text("{% for m in messages %}[{{ m.role }}]{% endfor %}")
    assert Tokenizer.from_pretrained(d).apply_chat_template(CONVERSATION[:2]) == "[system][user]"


def test_gradio_style_content_parts(tok):
    parts = [{"role": "user", "content": [{"type": "text", "text": "你好 "}, {"type": "text", "text": "🎉"}]}]
    plain = [{"role": "user", "content": "你好 🎉"}]
    assert tok.apply_chat_template(parts) == tok.apply_chat_template(plain)
    assert render_chatml(parts) == render_chatml(plain)
    with pytest.raises(TokenizerError, match="image"):
        tok.apply_chat_template([{"role": "user", "content": [{"type": "image", "url": "x.png"}]}])
    with pytest.raises(TokenizerError, match="role"):
        tok.apply_chat_template([{"content": "no role"}])


def test_template_globals_like_transformers(tok_dir, tmp_path):
    template = (
        "{{ messages | tojson }}|{{ eos_token }}|{% for m in messages %}{% if loop.index > 1 %}"
        "{% break %}{% endif %}{{ m.content }}{% endfor %}"
    )
    t = Tokenizer.from_pretrained(_with_template(tok_dir, tmp_path / "t", template))
    msgs = [{"role": "user", "content": "世界"}, {"role": "user", "content": "x"}]
    assert t.apply_chat_template(msgs) == f"{json.dumps(msgs, ensure_ascii=False)}|<|im_end|>|世界"


def test_raise_exception_becomes_tokenizer_error(tok_dir, tmp_path):
    t = Tokenizer.from_pretrained(_with_template(
        tok_dir, tmp_path / "t", "{{ raise_exception('roles must alternate') }}"))
    with pytest.raises(TokenizerError, match="roles must alternate"):
        t.apply_chat_template(CONVERSATION)


@pytest.mark.parametrize("template", [
    "{{ ''.__class__.__mro__ }}",
    "{{ ''.__class__ }}",
    "{{ messages.__class__.__base__.__subclasses__() }}",
    "{{ cycler.__init__.__globals__ }}",
    "{{ raise_exception.__globals__['os'].system('echo pwned') }}",
    "{{ messages.append({'role': 'x'}) }}",
    "{{ messages[0]._private() }}",
    "{% for m in messages %",  # syntax error
])
def test_unsafe_or_broken_templates_raise(tok_dir, tmp_path, template):
    t = Tokenizer.from_pretrained(_with_template(tok_dir, tmp_path / "t", template))
    with pytest.raises(TokenizerError):
        t.apply_chat_template(CONVERSATION)


# ---- byte fallback ------------------------------------------------------------------------


def test_byte_fallback_small_vocab():
    t = Tokenizer.byte_fallback(512)
    assert t.is_fallback and t.vocab_size == 512
    assert t.special_tokens == {"<|endoftext|>": 509, "<|im_start|>": 510, "<|im_end|>": 511}
    assert t.eos_token_ids == [511, 509]
    text = "naïve 世界 🎉\x00\U0010ffff e\u0301"
    ids = t.encode(text)
    assert ids == list(text.encode("utf-8"))
    assert all(0 <= i < 512 for i in ids)
    assert t.decode(ids) == text
    chat = t.encode_chat(CONVERSATION)
    assert all(0 <= i < 512 for i in chat)
    assert chat.count(510) == 5 and chat.count(511) == 4
    assert t.decode(chat, skip_special_tokens=False) == render_chatml(CONVERSATION)
    stream = t.detokenizer()
    assert "".join([stream.push(i) for i in ids] + [stream.flush()]) == text
    assert t.decode([300, 400, 512]) == ""  # unused ids, and ids past the vocab, have no text


def test_byte_fallback_qwen_vocab():
    t = Tokenizer.byte_fallback(151936)
    assert t.special_tokens == {"<|endoftext|>": 151643, "<|im_start|>": 151644, "<|im_end|>": 151645}
    ids = t.encode("<|im_start|>user\n你好<|im_end|>")
    assert ids[0] == 151644 and ids[-1] == 151645 and max(ids) < 151936
    assert t.decode(ids) == "user\n你好"


def test_byte_fallback_rejects_tiny_vocab():
    with pytest.raises(TokenizerError):
        Tokenizer.byte_fallback(100)


# ---- hub cache, offline -------------------------------------------------------------------


def test_from_pretrained_hub_id_offline(tok_dir, offline_hub):
    snapshot = make_hub_cache(offline_hub, "Org/Name", tok_dir)
    assert (snapshot / "tokenizer.json").is_file()
    t = Tokenizer.from_pretrained("Org/Name")
    assert t.vocab_size == Tokenizer.from_pretrained(tok_dir).vocab_size
    assert t.decode(t.encode(MIXED)) == MIXED


def test_uncached_hub_id_is_model_not_found(offline_hub):
    with pytest.raises(ModelNotFoundError, match="Org/Missing"):
        Tokenizer.from_pretrained("Org/Missing")


# ---- NFC, as transformers' Qwen2Tokenizer applies it ----------------------------------------

NFC_TEXTS = [
    "e\u0301",                                      # e + combining acute -> é
    "\u1100\u1161\u11a8 \u1112\u1161\u11ab\u1100\u1173\u11af",  # Hangul jamo -> 각 한글
    "café 한국어 naïve Å",                           # already NFC
    "A\u030a \u212b ﬁ ① x\u0323\u0307",            # Å two ways, compatibility forms NFC keeps
    "e\u0301<|im_end|>\u0338x<|im_start|>a\u0308",  # around special tokens
]


def _without_normalizer(src: Path, dst: Path, tokenizer_class: str | None = "Qwen2Tokenizer") -> Path:
    """A copy of a tokenizer directory whose tokenizer.json has no normalizer, as GGUF exports."""
    dst.mkdir()
    data = json.loads((src / "tokenizer.json").read_text(encoding="utf-8"))
    assert data["normalizer"] == {"type": "NFC"}
    data["normalizer"] = None
    (dst / "tokenizer.json").write_text(json.dumps(data, ensure_ascii=False), encoding="utf-8")
    config = json.loads((src / "tokenizer_config.json").read_text(encoding="utf-8"))
    config.pop("tokenizer_class", None)
    if tokenizer_class is not None:
        config["tokenizer_class"] = tokenizer_class
    (dst / "tokenizer_config.json").write_text(json.dumps(config, ensure_ascii=False), encoding="utf-8")
    return dst


def _transformers_applies_nfc() -> bool:
    """transformers 5's Qwen2Tokenizer rebuilds its pipeline with NFC whatever tokenizer.json
    says; 4.x's fast tokenizer used tokenizer.json as it is (only the slow one normalised)."""
    transformers = pytest.importorskip("transformers", reason="transformers is the test oracle")
    return int(transformers.__version__.split(".")[0]) >= 5


@pytest.mark.parametrize("tokenizer_class", ["Qwen2Tokenizer", "Qwen2TokenizerFast", None])
def test_nfc_without_a_normalizer(tok_dir, tmp_path, tokenizer_class):
    t = Tokenizer.from_pretrained(_without_normalizer(tok_dir, tmp_path / "t", tokenizer_class))
    reference = Tokenizer.from_pretrained(tok_dir)  # tokenizer.json with NFC
    assert t.encode("e\u0301") == t.encode("\u00e9") != list(b"e\xcc\x81")
    for text in NFC_TEXTS + [MIXED]:
        assert t.encode(text) == reference.encode(text)
    # Special tokens are split off first: U+0338 would otherwise fuse '>' into '≯'.
    ids = t.encode("<|im_end|>\u0338")
    assert ids[0] == t.special_tokens["<|im_end|>"] and t.decode(ids) == "\u0338"


def test_another_tokenizer_class_keeps_tokenizer_json_as_is(tok_dir, tmp_path):
    d = _without_normalizer(tok_dir, tmp_path / "t", "PreTrainedTokenizerFast")
    t = Tokenizer.from_pretrained(d)
    assert t.encode("e\u0301") != t.encode("\u00e9")
    transformers = pytest.importorskip("transformers", reason="transformers is the test oracle")
    hf = transformers.AutoTokenizer.from_pretrained(str(d))
    assert t.encode("e\u0301") == hf.encode("e\u0301", add_special_tokens=False)


def test_nfc_matches_transformers_on_the_tiny_tokenizer(tok_dir, tmp_path):
    if not _transformers_applies_nfc():
        pytest.skip("transformers < 5 does not normalise when tokenizer.json has no normalizer")
    d = _without_normalizer(tok_dir, tmp_path / "t")
    t = Tokenizer.from_pretrained(d)
    hf = pytest.importorskip("transformers").AutoTokenizer.from_pretrained(str(d))
    for text in NFC_TEXTS:
        assert t.encode(text) == hf.encode(text, add_special_tokens=False), text


def test_nfc_matches_transformers_on_the_real_checkpoint(real_model_dir, tmp_path):
    if not _transformers_applies_nfc():
        pytest.skip("transformers < 5 does not normalise when tokenizer.json has no normalizer")
    d = _without_normalizer(real_model_dir, tmp_path / "t")
    t = Tokenizer.from_pretrained(d)
    hf = pytest.importorskip("transformers").AutoTokenizer.from_pretrained(str(d))
    assert t.encode("e\u0301") == [963]  # é, one token; [68, 53839] without NFC
    for text in NFC_TEXTS + ["<tool_call>\u0338{\"name\": \"f\"}</tool_call>"]:
        assert t.encode(text) == hf.encode(text, add_special_tokens=False), text
