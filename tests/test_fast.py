"""The fast paths: fused projections, weight-only int8, CUDA graphs. Each against the plain path."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import qwen2
from qwen2.generate import DecodeSession
from qwen2.fast_path import FastPath
from qwen2.fast import make_fast_path
from qwen2.quant import INT4_BLOCKS_LAYOUT, Int8Linear, quantize_model, quantize_rows
from tests.helpers import float_model_holding_rounded_weights, make_checkpoint, quantized_agreement, rand_ids


def test_fused_equals_unfused(tiny_model_dir):
    plain = qwen2.load_model(tiny_model_dir, dtype="float32", fuse=False)
    fused = qwen2.load_model(tiny_model_dir, dtype="float32", fuse=True)
    assert hasattr(fused.model.layers[0].self_attn, "qkv_proj")
    assert not hasattr(plain.model.layers[0].self_attn, "qkv_proj")
    ids = rand_ids(0, (2, 16))
    torch.testing.assert_close(fused(ids), plain(ids), atol=1e-5, rtol=0)
    assert list(qwen2.generate(fused, ids[:1], max_new_tokens=12, stop_token_ids=[])) == \
        list(qwen2.generate(plain, ids[:1], max_new_tokens=12, stop_token_ids=[]))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_quantize_rows_error_is_within_half_a_step_of_the_stored_scale(dtype):
    # The scale is rounded to its storage dtype before the weights are rounded against it: with a
    # bf16 scale rounded afterwards, a whole row would be off by up to 0.4 % of its values.
    w = (torch.randn(256, 96) * torch.rand(256, 1) * 3).to(dtype)
    q, scales = quantize_rows(w)
    assert q.dtype == torch.int8 and scales.shape == (256,) and scales.dtype == dtype
    assert q.abs().amax(1).eq(127).all()  # each row's largest weight still takes the full range
    err = (q.float() * scales.float()[:, None] - w.float()).abs()
    assert (err <= scales.float()[:, None] / 2 * (1 + 1e-6)).all()


@pytest.mark.parametrize("max_fused_rows", [32, None], ids=["dequantized-above-32", "fused-always"])
@pytest.mark.parametrize("rows", [1, 15, 60], ids=["decode", "short", "prefill"])  # 60 > 32
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_int8_linear_equals_dequantized_float_linear(dtype, rows, max_fused_rows):
    lin = torch.nn.Linear(96, 40, bias=True).to(dtype)
    q8 = Int8Linear.from_linear(lin, fused_kernel=True, max_fused_rows=max_fused_rows)
    assert q8._fused(torch.zeros(rows, 1, 96)) == (max_fused_rows is None or rows <= max_fused_rows)
    x = torch.randn(rows, 1, 96).to(dtype)
    dequant = q8.weight.float() * q8.scales.float()[:, None]
    expected = F.linear(x.float(), dequant, lin.bias.float())
    tol = 1e-4 if dtype == torch.float32 else 5e-2
    torch.testing.assert_close(q8(x).float(), expected, atol=tol, rtol=tol)
    slow = Int8Linear(q8.weight, q8.scales, q8.bias, fused_kernel=False)
    torch.testing.assert_close(slow(x).float(), expected, atol=tol, rtol=tol)


def test_int8_prefill_is_fused_on_cpus_without_bf16_math(monkeypatch):
    from qwen2 import quant

    for native, expected in ((True, 32), (False, None)):
        monkeypatch.setattr(quant, "cpu_has_bfloat16_math", lambda native=native: native)
        assert quant.fused_max_rows(torch.device("cpu")) == expected
    assert quant.fused_max_rows(torch.device("cuda")) == 32


@pytest.mark.parametrize("tied", [True, False])
def test_int8_model_matches_its_dequantized_weights_and_halves_memory(tmp_path, tied):
    directory = make_checkpoint(tmp_path, with_tokenizer=False, tie_word_embeddings=tied)
    q8 = quantize_model(qwen2.load_model(directory, dtype="float32"), "int8", blocks=False)  # per channel
    # The int8-rounded weights back in the float model: the same math, so the same logits.
    ref = float_model_holding_rounded_weights(directory, quantize_rows, fuse=False)
    ids = rand_ids(1, (2, 12))
    torch.testing.assert_close(q8(ids), ref(ids), atol=1e-4, rtol=0)

    def nbytes(model):
        return sum(p.numel() * p.element_size() for p in model.parameters())

    bf16 = qwen2.load_model(directory, dtype="bfloat16")
    ratio = nbytes(quantize_model(qwen2.load_model(directory, dtype="bfloat16"), "int8", blocks=False)) / nbytes(bf16)
    assert 0.45 < ratio < 0.6, ratio  # int8 + a bf16 scale per row + float norms/biases


@pytest.mark.filterwarnings("ignore:quantize=")
@pytest.mark.parametrize("scheme", ["int8", "int4"])
def test_quantized_cached_decode_equals_full_forward(tiny_model_dir, scheme):
    model = qwen2.load_model(tiny_model_dir, dtype="float32", quantize=scheme)
    ids = rand_ids(2, (1, 14))
    full = model(ids)
    session = DecodeSession(model, 1, 14)
    cached = torch.stack([session.prefill(ids[:, :6])] + [session.step(ids[:, t]) for t in range(6, 14)], 1)
    if model.info.quant_layout == INT4_BLOCKS_LAYOUT:
        # x rounded to int8 grows last-bit differences between the prompt's and a step's attention
        # kernels (tests/test_int4_blocks.py): within what rounding x costs, where a cache gone
        # wrong moves logits by their whole spread
        assert (cached - full[:, 5:]).pow(2).mean().sqrt() < 0.02 * full.std()
    else:  # the house's 1e-4 for fp32 logits (int8 in blocks rounds x to int16: ~1e-5 apart)
        torch.testing.assert_close(cached, full[:, 5:], atol=1e-4, rtol=0)


def test_int8_top1_agreement_on_a_trained_model(trained_model):
    assert trained_model.final_loss < 1.5, f"the model did not learn (loss {trained_model.final_loss:.2f})"
    agreement, kl = quantized_agreement(trained_model, "int8")
    print(f"[int8] trained model: top-1 agreement {agreement:.2%}, KL(bf16 || int8) {kl:.2e} nats/token")
    assert agreement >= 0.98
    assert kl < 1e-2


def test_int8_agreement_on_random_weights_is_reported(tiny_model_dir):
    """Random weights give near-flat logits, where int8 rounding flips argmaxes more often: we report
    it (docs/benchmarks.md) and only check the logits stay close."""
    bf16 = qwen2.load_model(tiny_model_dir, dtype="bfloat16")
    q8 = qwen2.load_model(tiny_model_dir, dtype="bfloat16", quantize="int8")
    ids = rand_ids(3, (4, 32))
    a, b = bf16(ids), q8(ids)
    agreement = (a.argmax(-1) == b.argmax(-1)).float().mean().item()
    print(f"[int8] random tiny model: top-1 agreement {agreement:.2%}")
    assert (a - b).abs().max().item() < 0.1 * a.abs().max().item()


def test_quantize_rejects_unknown_scheme(tiny_model_dir):
    with pytest.raises(qwen2.ConfigError, match="'int3'.*int8"):
        qwen2.load_model(tiny_model_dir, quantize="int3")


def test_cuda_graphs_require_cuda(tiny_model_dir):
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA; the GPU tests below cover it")
    with pytest.raises(qwen2.ConfigError, match="CUDA"):
        make_fast_path(qwen2.load_model(tiny_model_dir), "graphs")


needs_cuda = pytest.mark.gpu  # skipped without CUDA (tests/conftest.py)


@needs_cuda
@pytest.mark.parametrize("quantize,compile", [(None, False), ("int8", False), (None, True)])
def test_cuda_graph_decode_equals_eager(tiny_model_dir, quantize, compile):
    eager = qwen2.load_model(tiny_model_dir, device="cuda", dtype="float32", quantize=quantize)
    graphed = qwen2.load_model(tiny_model_dir, device="cuda", dtype="float32", quantize=quantize)
    fast_path = make_fast_path(graphed, "compile" if compile else "graphs")
    ids = rand_ids(4, (1, 9)).cuda()
    full = eager(torch.cat([ids, rand_ids(5, (1, 10)).cuda()], 1))
    session = DecodeSession(graphed, 1, 19, fast_path=fast_path)
    assert session.fast_path is fast_path is not None
    torch.testing.assert_close(session.prefill(ids), full[:, 8], atol=1e-4, rtol=0)
    tail = rand_ids(5, (1, 10)).cuda()
    for t in range(10):
        torch.testing.assert_close(session.step(tail[:, t]), full[:, 9 + t], atol=1e-4, rtol=0)
    session.close()
    for _ in range(2):  # the pooled cache and its graph are reused by the next generations
        assert list(qwen2.generate(graphed, ids, max_new_tokens=16, stop_token_ids=[], fast_path=fast_path)) == \
            list(qwen2.generate(eager, ids, max_new_tokens=16, stop_token_ids=[]))


@needs_cuda
@pytest.mark.parametrize("backend", ["eager", "sdpa"])
def test_cuda_fp32_logits_match_reference(tiny_model_dir, backend):
    transformers = pytest.importorskip("transformers", reason="transformers is the test oracle")
    ref = transformers.Qwen2ForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).eval()
    ours = qwen2.load_model(tiny_model_dir, device="cuda", dtype="float32", attn_backend=backend)
    ids = rand_ids(6, (2, 20))
    with torch.no_grad():
        expected = ref(ids).logits
    torch.testing.assert_close(ours(ids.cuda()).cpu(), expected, atol=1e-4, rtol=0)


@pytest.mark.parametrize("masked", [False, True])
def test_single_query_attention_equals_sdpa(masked):
    from qwen2.model import sdpa_attention, single_query_attention

    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, h, t, 16, generator=gen) for h, t in ((6, 1), (2, 9), (2, 9)))
    mask = torch.rand(2, 1, 1, 9, generator=gen) > 0.3 if masked else None
    if masked:
        mask[..., 0] = True
    torch.testing.assert_close(single_query_attention(q, k, v, mask, 0.25), sdpa_attention(q, k, v, mask, 0.25),
                               atol=1e-5, rtol=0)
    from qwen2.model import CAUSAL

    one_key = k[:, :, :1], v[:, :, :1]
    torch.testing.assert_close(single_query_attention(q, *one_key, CAUSAL, 0.25),
                               sdpa_attention(q, *one_key, None, 0.25), atol=1e-5, rtol=0)
    # Longer inputs are SDPA's
    q5 = torch.randn(2, 6, 5, 16, generator=gen)
    torch.testing.assert_close(single_query_attention(q5, k, v, None, 0.25), sdpa_attention(q5, k, v, None, 0.25))


@needs_cuda
def test_cuda_graphs_switch_between_padded_and_unpadded_batches(tiny_model_dir):
    eager = qwen2.load_model(tiny_model_dir, device="cuda", dtype="float32")
    graphed = qwen2.load_model(tiny_model_dir, device="cuda", dtype="float32")
    fast_path = make_fast_path(graphed, "graphs")
    prompts = [rand_ids(7, (1, 9))[0].tolist(), rand_ids(8, (1, 3))[0].tolist()]
    same_length = [rand_ids(9, (1, 5))[0].tolist(), rand_ids(10, (1, 5))[0].tolist()]
    for batch in (same_length, prompts, same_length):  # unpadded, padded, unpadded: re-captures
        assert qwen2.generate_batch(graphed, batch, max_new_tokens=10, stop_token_ids=[], fast_path=fast_path) == \
            qwen2.generate_batch(eager, batch, max_new_tokens=10, stop_token_ids=[])


class FullCacheDecoder(FastPath):
    """The pooled protocol with a plain forward over the whole fixed-size cache: what CUDA graphs and
    the compiled CPU step run, minus the capture. Tests the pool, the leases and the masks on CPU."""

    name = "full-cache"

    def step(self, lease, token_ids, slot, positions):
        slots = torch.tensor([slot], device=token_ids.device)
        return self.model(token_ids[:, None], cache=lease.cache, slots=slots, positions=positions,
                          kv_len=None, last_only=True)[:, -1]


def test_pooled_decoder_protocol_equals_eager(tiny_model_dir):
    eager = qwen2.load_model(tiny_model_dir, dtype="float32")
    pooled = qwen2.load_model(tiny_model_dir, dtype="float32")
    fast_path = FullCacheDecoder(pooled)
    ids = rand_ids(11, (1, 9))
    for _ in range(2):  # the second generation reuses the pooled cache
        assert list(qwen2.generate(pooled, ids, max_new_tokens=12, stop_token_ids=[], fast_path=fast_path)) == \
            list(qwen2.generate(eager, ids, max_new_tokens=12, stop_token_ids=[]))
    assert list(fast_path.pool) == [(1, 256)]  # one bucket: 9 + 12 tokens round up to 256 (the context)
    prompts = [rand_ids(12, (1, 7))[0].tolist(), rand_ids(13, (1, 3))[0].tolist()]  # padded batch
    assert qwen2.generate_batch(pooled, prompts, max_new_tokens=8, stop_token_ids=[], fast_path=fast_path) == \
        qwen2.generate_batch(eager, prompts, max_new_tokens=8, stop_token_ids=[])
    # A live session holds its cache: a second one runs eagerly on its own, and the lease comes
    # back when the first session is closed.
    first = DecodeSession(pooled, 1, 32, fast_path=fast_path)
    second = DecodeSession(pooled, 1, 32, fast_path=fast_path)
    assert first.fast_path is fast_path and second.fast_path is None
    first.close()
    with DecodeSession(pooled, 1, 32, fast_path=fast_path) as third:
        assert third.fast_path is fast_path
    assert DecodeSession(pooled, 1, 32).fast_path is None


def test_profile_times_the_fast_path_only_when_it_gets_a_cache(tiny_model_dir):
    """A profile's fast-decode figure comes from the fast path or is left out, never from an eager
    fallback under its name: in the app a kept chat can hold the bucket's only cache."""
    import profiling

    pooled = qwen2.load_model(tiny_model_dir, dtype="float32")
    fast_path = FullCacheDecoder(pooled)
    free = profiling.profile_model(pooled, prompt_tokens=6, new_tokens=3, warmup=0, fast_path=fast_path)
    assert free["fast_decode"]["decoder"] == "full-cache" and free["fast_decode"]["decode_tokens_per_s"] > 0
    with DecodeSession(pooled, 1, 32, fast_path=fast_path) as chat:  # holds the (1, 256) cache, like a kept chat
        assert chat.fast_path is not None
        busy = profiling.profile_model(pooled, prompt_tokens=6, new_tokens=3, warmup=0, fast_path=fast_path)
    assert busy["fast_decode"] is None


def test_chat_session_through_a_fast_path(tiny_model_dir):
    from qwen2.chat import ChatSession

    eager = qwen2.load_model(tiny_model_dir, dtype="float32")
    pooled = qwen2.load_model(tiny_model_dir, dtype="float32")
    chat = ChatSession(pooled, fast_path=FullCacheDecoder(pooled))
    conversation = rand_ids(14, (1, 12))[0].tolist()
    for turn in range(3):
        reply = list(chat.reply(conversation, max_new_tokens=6, stop_token_ids=[]))
        assert reply == list(qwen2.generate(eager, torch.tensor([conversation]), max_new_tokens=6,
                                            stop_token_ids=[]))
        assert chat.session.fast_path is not None
        conversation = conversation + reply + rand_ids(15 + turn, (1, 4))[0].tolist()


def test_make_fast_path_modes(tiny_model_dir):
    model = qwen2.load_model(tiny_model_dir, dtype="float32")
    assert make_fast_path(model, "off") is None
    with pytest.raises(qwen2.ConfigError, match="graphs"):
        make_fast_path(model, "graphs")
    with pytest.raises(qwen2.ConfigError, match="fast_decode"):
        make_fast_path(model, "turbo")
