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
from qwen2.engine import Engine  # noqa: E402
from qwen2.sampling import SamplingSettings  # noqa: E402

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
EDIT = ("Rename the variable `total` to `running_sum` in this function; reply with the whole function.\n\n"
        "```python\ndef mean_of_positive(values):\n    total = 0\n    count = 0\n    for value in values:\n"
        "        if value > 0:\n            total += value\n            count += 1\n    if count == 0:\n"
        "        return 0.0\n    return total / count\n```")
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

    def test_the_engines_compiled_steps_and_speculation_give_the_eager_reply(self, pair, tok):
        """The serving engine as the app runs it on CPU (the compiled one-row step on our attention
        kernel, the compiled verification of prompt-lookup guesses) on a code edit, where guesses are
        accepted: the same greedy tokens as plain eager decoding, nothing compiled anew."""
        ours, _ = pair
        prompt = tok.encode_chat([{"role": "user", "content": EDIT}])
        n = 40
        expected = list(qwen2.generate(ours, torch.tensor([prompt]), max_new_tokens=n, stop_token_ids=[]))
        engine = Engine(ours, rows=1, fast_decode="compile", compile_mode="default")
        engine.compile_now()
        assert list(engine.steps.ready) == [1, "verify"] and engine.state == "compiled"
        with engine, torch._dynamo.config.patch(error_on_recompile=True):
            reply = engine.submit(prompt, SamplingSettings(), n)
            out = list(reply)
        assert out == expected, (tok.decode(out), tok.decode(expected))
        assert reply.stats.accepted > 0 and "running_sum" in tok.decode(out), reply.stats.line()


# ---- weight-only quantization against bf16, teacher-forced on a real reply ---------------------

# The bf16 model's own greedy reply to CHAT (the first 128 tokens, as generated by
# `qwen2.generate(bf16 model, chat_ids, max_new_tokens=128)`), kept here so the agreement test
# teacher-forces it in one forward instead of decoding it token by token (about a minute on 2 vCPUs).
BF16_REPLY = (
    "Here's a Python function to check if a number is prime:\n\n```python\ndef is_prime(number):\n"
    "    \"\"\"\n    Check if a number is prime.\n\n    Args:\n    number (int): The number to check.\n\n"
    "    Returns:\n    bool: True if the number is prime, False otherwise.\n    \"\"\"\n"
    "    if number <= 1:\n        return False\n    if number <= 3:\n        return True\n"
    "    if number % 2 == 0 or number % 3 == 0:\n        return False\n    i = 5\n"
    "    while i * i <= number:\n        if number % i == 0"
)


class TestQuantizedAgreement:
    @pytest.fixture(scope="class")
    def bf16_choices(self, real_model_dir, tok, chat_ids):
        """The chat prompt followed by the bf16 model's reply, as one row of ids, and bf16's top-1
        choice at each reply position, teacher-forced (128 reply tokens: 1 token is 0.8 %, so 98 %
        allows two flipped near-ties). The quantized models' top-1 choices are held to these."""
        ids = torch.cat([chat_ids, torch.tensor([tok.encode(BF16_REPLY)])], dim=1)
        model = qwen2.load_model(real_model_dir, dtype=torch.bfloat16)
        with torch.inference_mode():
            choices = model(ids)[0, chat_ids.shape[1] - 1:-1].argmax(-1)
        del model
        # The reply is bf16's own: teacher-forced, bf16 picks it again (a CPU with other bf16
        # kernels may flip a near-tie, hence not 100 %). A lower figure means the model changed.
        assert (choices == ids[0, chat_ids.shape[1]:]).float().mean().item() >= 0.97
        return ids, choices

    def _agreement(self, real_model_dir, bf16_choices, chat_ids, scheme) -> float:
        """The share of reply positions where the quantized model's top-1 token, teacher-forced on
        the reply, is the token bf16 chose there."""
        (ids, reference), prompt_len = bf16_choices, chat_ids.shape[1]
        model = qwen2.load_model(real_model_dir, dtype=torch.bfloat16, quantize=scheme)
        assert model.info.quantization == scheme
        with torch.inference_mode():
            choices = model(ids)[0, prompt_len - 1:-1].argmax(-1)
        agreement = (choices == reference).float().mean().item()
        print(f"{scheme} top-1 agreement with bf16 over {ids.shape[1] - prompt_len} reply tokens: {agreement:.1%}")
        return agreement

    def test_int8_top1_agreement_with_bf16(self, real_model_dir, bf16_choices, chat_ids):
        assert self._agreement(real_model_dir, bf16_choices, chat_ids, "int8") >= 0.98

    def test_int4_top1_agreement_with_bf16(self, real_model_dir, bf16_choices, chat_ids):
        assert self._agreement(real_model_dir, bf16_choices, chat_ids, "int4") >= 0.95
