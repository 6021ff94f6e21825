"""Real weights: Qwen2.5-Coder-0.5B-Instruct, built by `python scripts/build_real_checkpoint.py`
(CI builds it first; every test here skips, saying why, when it is absent).

Random tiny checkpoints prove the arithmetic; this proves it on a trained model, where activations
are large, logits are peaked and the tokenizer and chat template are the released ones.
Each model is loaded once per test class (fp32 pair, then bf16 + quantized), to keep memory and
time down on a 2-core machine.
"""

from __future__ import annotations

import pytest
import torch

transformers = pytest.importorskip("transformers", reason="transformers is the test oracle")
pytestmark = pytest.mark.slow  # a 0.5B model on a 2-core CPU: about two minutes for the module

import qwen2  # noqa: E402

PROMPTS = [
    "def fibonacci(n):",
    "The capital of France is",
    "量子计算的基本原理是",
]
CHAT = [{"role": "user", "content": "Write a Python function that tells whether a number is prime."}]
TEXTS = [
    "Hello, world!",
    "  leading spaces, trailing spaces  \n\n\tand a tab",
    "人工智能正在改变世界。我们今天讨论大语言模型的推理。",
    "def add(a: int, b: int) -> int:\n    return a + b  # sum\n\nprint(add(2, 3))\n",
    "Emoji: 🤖🚀👍🏽 and 👨‍👩‍👧‍👦 family, café naïve",
    "<|im_start|>user\nraw special tokens<|im_end|>\n<|endoftext|>",
    "Numbers 1234567890 and 3.14159, URLs https://example.com/a?b=c&d=e",
    "Ünïcödé: Ｆｕｌｌｗｉｄｔｈ, e\u0301 (combining accent), Ω",
]
CONVERSATIONS = {
    "no system prompt": [{"role": "user", "content": "Hi!"}],
    "system prompt": [{"role": "system", "content": "You are a terse assistant."},
                      {"role": "user", "content": "What is 2+2?"}],
    "multi-turn": [{"role": "user", "content": "Write hello world in C."},
                   {"role": "assistant", "content": '```c\n#include <stdio.h>\nint main(){puts("hello");}\n```'},
                   {"role": "user", "content": "Now in Rust, 用中文解释。"}],
    "multi-turn with system": [{"role": "system", "content": "Answer in French."},
                               {"role": "user", "content": "Hello"},
                               {"role": "assistant", "content": "Bonjour !"},
                               {"role": "user", "content": "How are you? 🙂"}],
}


@pytest.fixture(scope="module")
def tok(real_model_dir):
    return qwen2.Tokenizer.from_pretrained(real_model_dir)


@pytest.fixture(scope="module")
def hf_tok(real_model_dir):
    return transformers.AutoTokenizer.from_pretrained(str(real_model_dir))


@pytest.fixture(scope="module")
def chat_ids(tok) -> torch.Tensor:
    return torch.tensor([tok.encode_chat(CHAT)])


# ---- checkpoint as built ----------------------------------------------------------------------

def test_checkpoint_is_the_official_shape(real_model_dir):
    config = qwen2.Qwen2Config.from_file(real_model_dir / "config.json")
    assert (config.num_hidden_layers, config.hidden_size, config.num_attention_heads, config.num_key_value_heads,
            config.intermediate_size, config.vocab_size) == (24, 896, 14, 2, 4864, 151936)
    assert config.tie_word_embeddings and config.rope_theta == 1e6 and config.rms_norm_eps == 1e-6
    assert config.max_position_embeddings == 32768 and config.sliding_window is None


# ---- tokenizer and chat template ---------------------------------------------------------------

@pytest.mark.parametrize("text", TEXTS)
def test_tokenizer_encodes_and_decodes_like_transformers(tok, hf_tok, text):
    ids = tok.encode(text)
    assert ids == hf_tok.encode(text, add_special_tokens=False)
    assert tok.decode(ids, skip_special_tokens=False) == hf_tok.decode(ids, skip_special_tokens=False)
    assert tok.decode(ids) == hf_tok.decode(ids, skip_special_tokens=True)


def test_tokenizer_special_tokens_and_stop_ids(tok, hf_tok):
    for name in ("<|endoftext|>", "<|im_start|>", "<|im_end|>"):
        assert tok.special_tokens[name] == hf_tok.convert_tokens_to_ids(name)
    assert set(tok.eos_token_ids) == {151645, 151643}


@pytest.mark.parametrize("name", list(CONVERSATIONS))
@pytest.mark.parametrize("add_generation_prompt", [True, False])
def test_chat_template_renders_like_transformers(tok, hf_tok, name, add_generation_prompt):
    messages = CONVERSATIONS[name]
    ours = tok.apply_chat_template(messages, add_generation_prompt=add_generation_prompt)
    theirs = hf_tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)
    assert ours == theirs
    assert tok.encode_chat(messages, add_generation_prompt) == hf_tok.encode(theirs, add_special_tokens=False)
    default_system = "You are Qwen, created by Alibaba Cloud. You are a helpful assistant."
    assert (default_system in ours) == (messages[0]["role"] != "system")


# ---- fp32 parity with transformers -------------------------------------------------------------

class TestFloat32Parity:
    @pytest.fixture(scope="class")
    def pair(self, real_model_dir):
        ours = qwen2.load_model(real_model_dir, dtype=torch.float32)
        ref = transformers.Qwen2ForCausalLM.from_pretrained(str(real_model_dir), dtype=torch.float32).eval()
        yield ours, ref
        del ours, ref

    @pytest.mark.parametrize("prompt", PROMPTS)
    def test_logits_equal_transformers(self, pair, tok, prompt):
        ours, ref = pair
        ids = torch.tensor([tok.encode(prompt)])
        with torch.inference_mode():
            a = ours(ids)
            b = ref(ids).logits.float()
        assert a.shape == b.shape == (1, ids.shape[1], 151936)
        torch.testing.assert_close(a, b, atol=1e-4, rtol=0)
        assert torch.equal(a.argmax(-1), b.argmax(-1))

    def test_greedy_reply_equals_transformers(self, pair, tok, chat_ids):
        ours, ref = pair
        n = 24
        mine = list(qwen2.generate(ours, chat_ids, max_new_tokens=n, stop_token_ids=[]))
        # repetition_penalty=1.0 explicitly: transformers merges the checkpoint's generation_config.json
        # (repetition_penalty 1.1) into any config that leaves it at its default.
        config = transformers.GenerationConfig(max_new_tokens=n, min_new_tokens=n, do_sample=False, num_beams=1,
                                               repetition_penalty=1.0, pad_token_id=151643, eos_token_id=None)
        with torch.inference_mode():
            out = ref.generate(chat_ids, attention_mask=torch.ones_like(chat_ids), generation_config=config)
        theirs = out[0, chat_ids.shape[1]:].tolist()
        assert mine == theirs, (tok.decode(mine), tok.decode(theirs))
        assert "def" in tok.decode(mine) or "prime" in tok.decode(mine).lower()  # a trained model's answer


# ---- weight-only quantization against bf16, teacher-forced on a real reply ---------------------

class TestQuantizedAgreement:
    @pytest.fixture(scope="class")
    def bf16_reply(self, real_model_dir, chat_ids):
        """The chat prompt and our bf16 model's greedy reply to it, as one row of ids (up to 128
        reply tokens: 1 token is 0.8 %, so 98 % allows two flipped near-ties). Each reply token is
        bf16's top-1 choice at its position, so it is the reference a quantized model's top-1 choices
        are held to (no second, teacher-forced bf16 forward needed)."""
        model = qwen2.load_model(real_model_dir, dtype=torch.bfloat16)
        reply = list(qwen2.generate(model, chat_ids, max_new_tokens=128))  # stops at <|im_end|>
        assert len(reply) >= 64, "the reply is too short to measure agreement on"
        del model
        return torch.cat([chat_ids, torch.tensor([reply])], dim=1)

    def _agreement(self, real_model_dir, bf16_reply, chat_ids, scheme) -> float:
        """The share of reply positions where the quantized model's top-1 token, teacher-forced on
        the reply, is the token bf16 chose there."""
        ids, prompt_len = bf16_reply, chat_ids.shape[1]
        model = qwen2.load_model(real_model_dir, dtype=torch.bfloat16, quantize=scheme)
        assert model.info.quantization == scheme
        with torch.inference_mode():
            choices = model(ids)[0, prompt_len - 1:-1].argmax(-1)
        agreement = (choices == ids[0, prompt_len:]).float().mean().item()
        print(f"{scheme} top-1 agreement with bf16 over {ids.shape[1] - prompt_len} reply tokens: {agreement:.1%}")
        return agreement

    def test_int8_top1_agreement_with_bf16(self, real_model_dir, bf16_reply, chat_ids):
        assert self._agreement(real_model_dir, bf16_reply, chat_ids, "int8") >= 0.98

    def test_int4_top1_agreement_with_bf16(self, real_model_dir, bf16_reply, chat_ids):
        assert self._agreement(real_model_dir, bf16_reply, chat_ids, "int4") >= 0.95
