"""qwen2.chat: the KV cache kept between turns gives the same tokens as recomputing the whole
conversation, and the statistics line says what was reused."""

from __future__ import annotations

import pytest
import torch

import qwen2
from qwen2.chat import ChatSession, ReplyStats, common_prefix, message_text
from tests.helpers import make_checkpoint


@pytest.fixture(scope="module")
def model(tiny_model_dir):
    return qwen2.load_model(tiny_model_dir, dtype="float32")


@pytest.fixture(scope="module")
def long_model(tmp_path_factory):
    """The tiny model with a 1024-token context, so a conversation can outgrow its first cache."""
    directory = make_checkpoint(tmp_path_factory.mktemp("tiny-1k"), max_position_embeddings=1024,
                                with_tokenizer=False)
    return qwen2.load_model(directory, dtype="float32")


def ids(seed, n, vocab=512):
    return torch.randint(0, vocab, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


def fresh(model, prompt, n):
    return list(qwen2.generate(model, torch.tensor([prompt]), max_new_tokens=n, stop_token_ids=[]))


def test_four_turns_reuse_the_cache_and_equal_fresh_generation(model):
    chat = ChatSession(model)
    conversation = ids(0, 20)
    prefilled = []
    for turn in range(4):
        reply = list(chat.reply(conversation, max_new_tokens=8, stop_token_ids=[]))
        assert reply == fresh(model, conversation, 8)
        stats = chat.stats
        assert stats.prompt_tokens == len(conversation) and stats.new_tokens == 8 and not stats.stopped
        prefilled.append(stats.prefilled_tokens)
        # the next turn: this reply plus a new user message, as a chat template would render it
        conversation = conversation + reply + ids(turn + 1, 6)
    assert prefilled[0] == 20
    # every later turn prefills only the last reply token (never fed back) and the new message
    assert prefilled[1:] == [7, 7, 7]
    assert chat.stats.context_used == chat.stats.prompt_tokens + 8


def test_an_edit_earlier_in_the_conversation_shortens_the_reused_prefix(model):
    chat = ChatSession(model)
    first = ids(1, 30)
    list(chat.reply(first, max_new_tokens=4, stop_token_ids=[]))
    edited = first[:10] + ids(2, 25)
    assert list(chat.reply(edited, max_new_tokens=6, stop_token_ids=[])) == fresh(model, edited, 6)
    assert chat.stats.reused_tokens == 10


def test_growing_past_the_cache_keeps_the_prefix(long_model):
    model = long_model
    chat = ChatSession(model)
    prompt = ids(3, 200)
    list(chat.reply(prompt, max_new_tokens=40, stop_token_ids=[]))  # a 256-slot cache
    longer = chat.cached + ids(4, 60)  # 300 tokens + a reply: a 512-slot cache
    assert list(chat.reply(longer, max_new_tokens=5, stop_token_ids=[])) == fresh(model, longer, 5)
    assert chat.session.cache.max_len == 512 and chat.stats.reused_tokens == 239


def test_a_reply_that_outgrows_its_cache_moves_to_a_larger_one(long_model):
    model = long_model
    chat = ChatSession(model)
    prompt = ids(13, 240)
    assert list(chat.reply(prompt, max_new_tokens=30, stop_token_ids=[])) == fresh(model, prompt, 30)
    assert chat.session.cache.max_len == 512 and chat.cached == prompt + fresh(model, prompt, 30)[:29]


def test_stop_keeps_what_was_computed(model):
    chat = ChatSession(model)
    prompt = ids(5, 12)
    stream = chat.reply(prompt, max_new_tokens=20, stop_token_ids=[])
    got = [next(stream) for _ in range(3)]
    stream.close()
    assert chat.stats.stopped and chat.stats.new_tokens == 3
    assert chat.stats.line().startswith("stopped after 3 new tokens")
    assert chat.cached == prompt + got[:2]  # the third token was streamed, not yet fed back
    follow = prompt + got + ids(6, 4)
    assert list(chat.reply(follow, max_new_tokens=5, stop_token_ids=[])) == fresh(model, follow, 5)
    assert chat.stats.reused_tokens == 14


def test_sampling_with_a_seed_is_the_same_with_and_without_reuse(model):
    chat = ChatSession(model)
    first = ids(7, 16)
    list(chat.reply(first, max_new_tokens=4, stop_token_ids=[]))
    second = chat.cached + ids(8, 5)
    kwargs = dict(max_new_tokens=10, stop_token_ids=[], temperature=0.9, top_p=0.9, seed=11)
    reused = list(chat.reply(second, **kwargs))
    assert chat.stats.reused_tokens > 0
    assert reused == list(qwen2.generate(model, torch.tensor([second]), **kwargs))


def test_bad_settings_and_overlong_prompts_raise_before_anything_changes(model):
    chat = ChatSession(model, max_len=64)
    prompt = ids(9, 10)
    list(chat.reply(prompt, max_new_tokens=3, stop_token_ids=[]))
    kept = list(chat.cached)
    with pytest.raises(qwen2.GenerationError, match="top_p"):
        chat.reply(prompt, top_p=0.0)
    with pytest.raises(qwen2.ContextLengthError, match="64"):
        chat.reply(ids(10, 60), max_new_tokens=10)
    assert chat.cached == kept


def test_stop_token_ends_the_reply(model):
    chat = ChatSession(model)
    prompt = ids(12, 8)
    expected = fresh(model, prompt, 6)
    got = list(chat.reply(prompt, max_new_tokens=6, stop_token_ids=[expected[2]]))
    assert got == expected[:expected.index(expected[2])]


def test_stats_line_never_reports_prefill_as_decode_speed():
    one = ReplyStats(prompt_tokens=5, new_tokens=1, ttft_s=0.2, decode_s=0.0, device="cpu", dtype="float32")
    assert one.decode_tok_s is None and "tok/s" not in one.line() and "1 new token ·" in one.line()
    many = ReplyStats(prompt_tokens=50, reused_tokens=40, new_tokens=11, ttft_s=0.1, decode_s=0.5,
                      device="cpu", dtype="bfloat16", context_used=61, context_limit=32768)
    assert many.decode_tok_s == pytest.approx(20.0)
    assert many.line() == ("50 prompt tokens (40 reused) · 11 new tokens · first token 100 ms · 20.0 tok/s · "
                           "cpu (bfloat16) · context 61/32768")


def test_message_text_flattens_every_content_shape():
    assert message_text(None) == "" and message_text("hi") == "hi"
    assert message_text([{"type": "text", "text": "a"}, {"type": "image", "url": "x"}, "b"]) == "ab"
    assert message_text({"text": "t", "files": ["f.png"]}) == "t"
    assert message_text(3) == ""


def test_common_prefix():
    assert common_prefix([1, 2, 3], [1, 2, 4]) == 2 and common_prefix([], [1]) == 0 and common_prefix([1], [1]) == 1
