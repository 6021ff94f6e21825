"""One default policy: the terminal chat, the app and the API read a checkpoint's generation_config.json
the same way, as transformers' generate does (greedy unless do_sample)."""

from __future__ import annotations

import argparse

import pytest

from qwen2.errors import GenerationError
from qwen2.sampling import SamplingSettings

QWEN25 = {"do_sample": True, "temperature": 0.7, "top_p": 0.8, "top_k": 20, "repetition_penalty": 1.1}


def test_do_sample_or_greedy_as_transformers_reads_it():
    assert SamplingSettings.from_generation_config(QWEN25) == SamplingSettings(0.7, 20, 0.8, 0.0, 1.1)
    greedy = SamplingSettings.from_generation_config({**QWEN25, "do_sample": False})
    assert greedy.greedy and greedy.repetition_penalty == 1.1 and (greedy.top_k, greedy.top_p) == (0, 1.0)
    assert SamplingSettings.from_generation_config(None) == SamplingSettings()
    assert SamplingSettings.from_generation_config({"do_sample": True}) == SamplingSettings(1.0, 50, 1.0)
    with pytest.raises(GenerationError, match="top_p"):
        SamplingSettings.from_generation_config({"do_sample": True, "top_p": 0})


def test_flags_win_and_a_temperature_samples():
    assert SamplingSettings.from_generation_config(QWEN25, temperature=0.0).greedy
    assert SamplingSettings.from_generation_config({}, temperature=0.9, top_k=None).temperature == 0.9
    assert SamplingSettings.from_generation_config(QWEN25, top_p=0.5, top_k=None).top_p == 0.5


def test_the_terminal_chat_and_the_app_default_alike(tiny_model_dir):
    from qwen2.__main__ import parse_args, sampling_kwargs
    from studio.hosting import LoadedModel

    lm = LoadedModel(str(tiny_model_dir), "cpu", "float32", None, fast_decode="off")
    try:
        cli = sampling_kwargs(parse_args(["--model", str(tiny_model_dir)]), lm.model.info.generation_config)
        app = lm.sampling_defaults()
        assert cli == {**vars(argparse.Namespace(**app.__dict__)), "seed": None}
    finally:
        lm.engine.close()
