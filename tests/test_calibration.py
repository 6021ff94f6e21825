"""int4 rounding weighed by each input's size on a calibration chat (qwen2/calibration.py): the
importance is the inputs' mean square, the loader quantizes with it where the checkpoint has a
tokenizer, and without one every input counts alike."""

from __future__ import annotations

import json

import pytest
import torch

import qwen2
from qwen2 import calibration, loading
from qwen2.calibration import CALIBRATION_CHAT, calibration_ids, checkpoint_importance, input_importance
from qwen2.products import decoder_products
from qwen2.quant import Int4BlockLinear, quantize_int4_blocks
from qwen2.tokenizer import Tokenizer
from qwen2.upcast import Bf16PanelLinear
from tests.helpers import make_checkpoint, needs_kernel


def test_the_calibration_chat_is_a_chat_the_template_renders(tiny_model_dir):
    messages = json.loads(CALIBRATION_CHAT.read_text(encoding="utf-8"))["messages"]
    assert [m["role"] for m in messages[:3]] == ["system", "user", "assistant"] and len(messages) >= 7
    ids = calibration_ids(Tokenizer.from_pretrained(tiny_model_dir), limit=64)
    assert ids.shape == (1, 64) and ids.dtype == torch.long


def test_importance_is_each_inputs_mean_square_plus_its_mean(tiny_model_dir):
    model = qwen2.load_model(tiny_model_dir, dtype="float32")
    ids = torch.randint(0, model.config.vocab_size, (1, 40), generator=torch.Generator().manual_seed(0))
    importance = input_importance(model, ids)
    products = decoder_products(model)
    assert set(importance) == set(products) and len(products) == 4 * model.config.num_hidden_layers
    assert all(importance[name].shape == (module.in_features,) for name, module in products.items())
    # the first product's input, computed apart: layer 0's norm of the embedding
    layer = model.model.layers[0]
    with torch.inference_mode():
        x = layer.input_layernorm(model.model.embed_tokens(ids))[0].double()
    mean_square = x.square().mean(0)
    torch.testing.assert_close(importance["model.layers.0.self_attn.qkv_proj"],
                               (mean_square + mean_square.mean()).float(), rtol=1e-5, atol=1e-7)
    assert not any(module._forward_pre_hooks for module in products.values())  # the hooks are gone


@needs_kernel
def test_a_cpu_without_bf16_math_calibrates_on_the_bf16_panels(tiny_model_dir, monkeypatch):
    monkeypatch.setattr(loading, "wants_bf16_dot", lambda model: False)  # plain nn.Linear layers, as loaded there
    plain = qwen2.load_model(tiny_model_dir, dtype="bfloat16")
    expected = checkpoint_importance(plain, tiny_model_dir)
    monkeypatch.setattr(calibration, "wants_upcast", lambda model: True)
    model = qwen2.load_model(tiny_model_dir, dtype="bfloat16")
    got = checkpoint_importance(model, tiny_model_dir)
    assert isinstance(model.model.layers[0].mlp.down_proj, Bf16PanelLinear)  # what ran the chat
    assert got.keys() == expected.keys()
    for name in got:  # float32 sums against bf16 products: close, not equal
        torch.testing.assert_close(got[name], expected[name], rtol=0.1, atol=1e-3)


@needs_kernel
def test_the_loader_weighs_int4_rounding_by_the_checkpoints_calibration(tmp_path):
    directory = make_checkpoint(tmp_path / "with", dtype=torch.bfloat16)
    reference = qwen2.load_model(directory, dtype="bfloat16")
    importance = checkpoint_importance(reference, directory)
    weights = {name: module.weight.data.clone() for name, module in decoder_products(reference).items()}
    q4 = qwen2.load_model(directory, quantize="int4", dtype="bfloat16")
    assert q4.info.quant_weighed
    for name, module in decoder_products(q4).items():
        assert isinstance(module, Int4BlockLinear)
        stored = (module.weight, module.scales, module.mins)
        assert all(torch.equal(a, b) for a, b in zip(stored, quantize_int4_blocks(weights[name], importance[name])))
    # the importance changed the rounding somewhere (else this test could not tell)
    assert any(not torch.equal(module.weight, quantize_int4_blocks(weights[name])[0])
               for name, module in decoder_products(q4).items())


@needs_kernel
@pytest.mark.parametrize("why", ["no tokenizer", "broken tokenizer", "random weights"])
def test_without_a_tokenizer_or_weights_every_input_counts_alike(tmp_path, why):
    directory = make_checkpoint(tmp_path, dtype=torch.bfloat16, with_tokenizer=why != "no tokenizer")
    random_weights = why == "random weights"
    reference = qwen2.load_model(directory, dtype="bfloat16", random_weights=random_weights)
    weights = {name: module.weight.data.clone() for name, module in decoder_products(reference).items()}
    if why == "broken tokenizer":  # the model still loads, unweighed, and says why
        (directory / "tokenizer.json").write_text("{not json")
        with pytest.warns(UserWarning, match="not weighed.*tokenizer.json"):
            q4 = qwen2.load_model(directory, quantize="int4", dtype="bfloat16")
    else:
        q4 = qwen2.load_model(directory, quantize="int4", dtype="bfloat16", random_weights=random_weights)
    assert not q4.info.quant_weighed
    for name, module in decoder_products(q4).items():
        assert torch.equal(module.weight, quantize_int4_blocks(weights[name])[0])


@needs_kernel
def test_the_app_header_says_the_int4_rounding_was_weighed(tiny_model_dir):
    from studio.hosting import LoadedModel

    summary = LoadedModel(str(tiny_model_dir), "cpu", "bfloat16", "int4", fast_decode="off").summary()
    assert "int4 (blocks of 32, x in int8, rounding weighed on a calibration chat)" in summary
