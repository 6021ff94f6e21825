"""Test fixtures for tokenizers and the hub cache, made on disk with no network.

`save_tiny_tokenizer` trains a real byte-level BPE tokenizer (the same pre-tokenizer, decoder and
special tokens as Qwen2's) on a small built-in corpus, and writes `tokenizer.json` plus a
`tokenizer_config.json` carrying Qwen2-Instruct's official chat template (QWEN2_CHAT_TEMPLATE;
Qwen2.5-Instruct's, with tools, is QWEN25_TEMPLATE). The vocab is kept small
on purpose, so Chinese characters and emoji are split across several tokens -- which is what
the streaming decoder has to cope with.

`make_hub_cache` lays out a Hugging Face cache snapshot so hub ids can be resolved offline.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

# Verbatim from Qwen/Qwen2-*-Instruct tokenizer_config.json.
QWEN2_CHAT_TEMPLATE = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n' }}{% endif %}"
    "{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

# Verbatim from Qwen/Qwen2.5-*-Instruct tokenizer_config.json (tests/test_chat_template.py checks it
# against the real checkpoint where that is built). Tool calls and results are rendered by it.
QWEN25_TEMPLATE = r'''{%- if tools %}
    {{- '<|im_start|>system\n' }}
    {%- if messages[0]['role'] == 'system' %}
        {{- messages[0]['content'] }}
    {%- else %}
        {{- 'You are Qwen, created by Alibaba Cloud. You are a helpful assistant.' }}
    {%- endif %}
    {{- "\n\n# Tools\n\nYou may call one or more functions to assist with the user query.\n\nYou are provided with function signatures within <tools></tools> XML tags:\n<tools>" }}
    {%- for tool in tools %}
        {{- "\n" }}
        {{- tool | tojson }}
    {%- endfor %}
    {{- "\n</tools>\n\nFor each function call, return a json object with function name and arguments within <tool_call></tool_call> XML tags:\n<tool_call>\n{\"name\": <function-name>, \"arguments\": <args-json-object>}\n</tool_call><|im_end|>\n" }}
{%- else %}
    {%- if messages[0]['role'] == 'system' %}
        {{- '<|im_start|>system\n' + messages[0]['content'] + '<|im_end|>\n' }}
    {%- else %}
        {{- '<|im_start|>system\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant.<|im_end|>\n' }}
    {%- endif %}
{%- endif %}
{%- for message in messages %}
    {%- if (message.role == "user") or (message.role == "system" and not loop.first) or (message.role == "assistant" and not message.tool_calls) %}
        {{- '<|im_start|>' + message.role + '\n' + message.content + '<|im_end|>' + '\n' }}
    {%- elif message.role == "assistant" %}
        {{- '<|im_start|>' + message.role }}
        {%- if message.content %}
            {{- '\n' + message.content }}
        {%- endif %}
        {%- for tool_call in message.tool_calls %}
            {%- if tool_call.function is defined %}
                {%- set tool_call = tool_call.function %}
            {%- endif %}
            {{- '\n<tool_call>\n{"name": "' }}
            {{- tool_call.name }}
            {{- '", "arguments": ' }}
            {{- tool_call.arguments | tojson }}
            {{- '}\n</tool_call>' }}
        {%- endfor %}
        {{- '<|im_end|>\n' }}
    {%- elif message.role == "tool" %}
        {%- if (loop.index0 == 0) or (messages[loop.index0 - 1].role != "tool") %}
            {{- '<|im_start|>user' }}
        {%- endif %}
        {{- '\n<tool_response>\n' }}
        {{- message.content }}
        {{- '\n</tool_response>' }}
        {%- if loop.last or (messages[loop.index0 + 1].role != "tool") %}
            {{- '<|im_end|>\n' }}
        {%- endif %}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|im_start|>assistant\n' }}
{%- endif %}
'''

SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]

# Qwen2's pre-tokenization regex (tokenizer.json of Qwen/Qwen2-0.5B-Instruct).
QWEN2_SPLIT_PATTERN = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)

CORPUS = [
    "Hello, world! This is a tiny tokenizer for testing the Qwen2 runtime.",
    "The quick brown fox jumps over the lazy dog. The dog sleeps; the fox runs.",
    "You are a helpful assistant. How can I help you today?",
    "user assistant system: the model answers the question in a short sentence.",
    "Numbers 0 1 2 3 4 5 6 7 8 9 and symbols ( ) [ ] { } < > | = + - * / \\ _ . , ; : ! ?",
    "你好，世界！今天天气很好。我们一起学习机器学习和自然语言处理。",
    "这是一个用于测试的分词器。模型会逐个生成词元。",
    "中文文本和英文文本混合在一起：Qwen2 是一个语言模型。",
    "Emoji: 😀 😃 😄 🎉 🚀 ❤️ 👍 🌍 — and accents: café, naïve, über, señor.",
    "日本語のテキストも少し。こんにちは世界。",
]


def save_tiny_tokenizer(directory: Path) -> dict:
    """Write tokenizer.json + tokenizer_config.json into `directory`; return the key ids.

    Returns {"vocab_size", "im_start", "im_end", "endoftext"}. Deterministic: the same files
    every call.
    """
    from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers
    from tokenizers.trainers import BpeTrainer

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)

    tok = Tokenizer(models.BPE(unk_token=None, fuse_unk=False, byte_fallback=False))
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(QWEN2_SPLIT_PATTERN), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=False, use_regex=False),
        ]
    )
    tok.decoder = decoders.ByteLevel(add_prefix_space=False, trim_offsets=False, use_regex=False)
    # 256 byte symbols + ~90 merges: too few merges to glue most 3-byte CJK chars or 4-byte
    # emoji into single tokens, so multi-byte characters straddle token boundaries.
    trainer = BpeTrainer(
        vocab_size=350,
        min_frequency=2,
        show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        special_tokens=[],
    )
    tok.train_from_iterator(CORPUS, trainer=trainer)
    # Added after training so they sit at the END of the vocab, as in Qwen2 (151643..151645).
    tok.add_special_tokens(SPECIAL_TOKENS)

    tok.save(str(directory / "tokenizer.json"))
    ids = {
        "vocab_size": tok.get_vocab_size(with_added_tokens=True),
        "endoftext": tok.token_to_id("<|endoftext|>"),
        "im_start": tok.token_to_id("<|im_start|>"),
        "im_end": tok.token_to_id("<|im_end|>"),
    }
    added = {
        str(ids[key]): {
            "content": text, "lstrip": False, "normalized": False, "rstrip": False,
            "single_word": False, "special": True,
        }
        for key, text in (("endoftext", "<|endoftext|>"), ("im_start", "<|im_start|>"),
                          ("im_end", "<|im_end|>"))
    }
    config = {
        "add_prefix_space": False,
        "added_tokens_decoder": added,
        "additional_special_tokens": ["<|im_start|>", "<|im_end|>"],
        "bos_token": None,
        "chat_template": QWEN2_CHAT_TEMPLATE,
        "clean_up_tokenization_spaces": False,
        "eos_token": "<|im_end|>",
        "errors": "replace",
        "model_max_length": 32768,
        "pad_token": "<|endoftext|>",
        "split_special_tokens": False,
        "tokenizer_class": "Qwen2Tokenizer",
        "unk_token": None,
    }
    (directory / "tokenizer_config.json").write_text(json.dumps(config, indent=2, ensure_ascii=False))
    return ids


def make_hub_cache(cache_root: Path, repo_id: str, files_from: Path,
                   revision: str = "0123456789abcdef0123456789abcdef01234567") -> Path:
    """Lay out `cache_root/models--Org--Name/snapshots/<rev>/` holding a copy of every file in
    `files_from`, with `refs/main` pointing at `rev`, as huggingface_hub's cache does.

    Point HF_HUB_CACHE at `cache_root` (and set HF_HUB_OFFLINE=1) to resolve `repo_id` from it.
    Returns the snapshot directory.
    """
    cache_root = Path(cache_root)
    repo_dir = cache_root / ("models--" + repo_id.replace("/", "--"))
    snapshot = repo_dir / "snapshots" / revision
    snapshot.mkdir(parents=True, exist_ok=True)
    for item in Path(files_from).iterdir():
        if item.is_file():
            shutil.copy2(item, snapshot / item.name)
    (repo_dir / "refs").mkdir(exist_ok=True)
    (repo_dir / "refs" / "main").write_text(revision)
    return snapshot
