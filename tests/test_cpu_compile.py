"""The compiled CPU decode (qwen2/cpu_compile.py) against the eager path: same logits, same tokens.

Each compile of the tiny model's step takes a few seconds: every fast_path here compiles in Inductor's
cheap mode (compile mode "default"; the app's max-autotune only changes how fast the step runs), and
the float32 tests share one warmed-up fast_path (module-scoped) so each (batch, bucket, padded)
combination compiles once.
"""

from __future__ import annotations

import threading

import pytest
import torch

import qwen2
from qwen2.chat import ChatSession
from qwen2.cpu_compile import DEFAULT_MODE, CompiledCpuPath
from qwen2.fast import make_fast_path
from qwen2.generate import DecodeSession, generate, generate_batch
from qwen2.quant import INT4_BLOCKS_LAYOUT
from tests.helpers import make_checkpoint, rand_ids

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")


def _compiled(directory, quantize=None, dtype="float32"):
    """(model, its compiled decode path, in the cheap compile mode)."""
    model = qwen2.load_model(directory, dtype=dtype, quantize=quantize)
    return model, CompiledCpuPath(model, mode="default")


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    """The tiny checkpoint with a 1024-token context, so a conversation can outgrow the first bucket."""
    return make_checkpoint(tmp_path_factory.mktemp("tiny-1k"), with_tokenizer=False, max_position_embeddings=1024)


@pytest.fixture(scope="module")
def compiled_fp32(model_dir):
    """(model, fast_path) warmed up as the app does at start-up, its buckets compiled once for the module."""
    model, fast_path = _compiled(model_dir)
    messages = []
    fast_path.warm_up(progress=lambda fraction, message: messages.append((fraction, message)))
    # what the warm-up alone did, before any test adds to it
    fast_path.warm_up_record = dict(messages=messages, compiled=set(fast_path.compiled),
                                  busy=[lease.busy for leases in fast_path.pool.values() for lease in leases])
    return model, fast_path


@pytest.fixture(scope="module")
def eager_fp32(model_dir):
    return qwen2.load_model(model_dir, dtype="float32")


def _steps(model, ids, n_prompt, fast_path=None, max_len=None):
    session = DecodeSession(model, ids.shape[0], max_len or ids.shape[1], fast_path=fast_path)
    out = [session.prefill(ids[:, :n_prompt])]
    for t in range(n_prompt, ids.shape[1]):
        out.append(session.step(ids[:, t]))
    return torch.stack(out, 1), session


@pytest.mark.slow
def test_compiled_decode_logits_equal_eager(compiled_fp32, eager_fp32):
    model, fast_path = compiled_fp32
    ids = rand_ids(0, (1, 20))
    compiled, session = _steps(model, ids, 8, fast_path)
    assert session.fast_path is fast_path and session.cache.max_len == 256  # pooled bucket
    eager, eager_session = _steps(eager_fp32, ids, 8)
    assert eager_session.fast_path is None
    torch.testing.assert_close(compiled, eager, atol=1e-4, rtol=0)
    full = eager_fp32(ids)  # and both equal the plain full forward
    torch.testing.assert_close(compiled[:, 1:], full[:, 8:], atol=1e-4, rtol=0)
    assert (1, 256, False) in fast_path.compiled
    session.close()
    assert not any(lease.busy for lease in fast_path.pool[(1, 256)])  # closed: its cache is back in the pool


@pytest.mark.slow
def test_compiled_greedy_tokens_identical(compiled_fp32, eager_fp32):
    model, fast_path = compiled_fp32
    prompt = rand_ids(1, (1, 10))
    fast = list(generate(model, prompt, max_new_tokens=24, stop_token_ids=[], fast_path=fast_path))
    slow = list(generate(eager_fp32, prompt, max_new_tokens=24, stop_token_ids=[]))
    assert fast == slow and len(fast) == 24


@pytest.mark.slow
def test_compiled_decode_leaves_prefill_eager(compiled_fp32, eager_fp32):
    model, fast_path = compiled_fp32
    ids = rand_ids(2, (1, 30))
    captured = torch._dynamo.utils.counters["stats"]["calls_captured"]
    with DecodeSession(model, 1, 40, fast_path=fast_path) as session:
        a = session.prefill(ids)
    assert torch._dynamo.utils.counters["stats"]["calls_captured"] == captured  # nothing compiled
    b = DecodeSession(eager_fp32, 1, 40).prefill(ids)
    torch.testing.assert_close(a, b, atol=1e-5, rtol=0)


@pytest.mark.slow
def test_a_conversation_crossing_a_bucket_boundary(compiled_fp32, eager_fp32):
    """A cache of 300 tokens lives in the 512 bucket (the second one the warm-up compiled): the same
    logits as eager all the way past slot 256."""
    model, fast_path = compiled_fp32
    ids = rand_ids(3, (1, 262))
    compiled, session = _steps(model, ids, 250, fast_path, max_len=300)
    assert session.cache.max_len == 512
    assert (1, 512, False) in fast_path.compiled
    session.close()
    eager, _ = _steps(eager_fp32, ids, 250, max_len=300)
    torch.testing.assert_close(compiled, eager, atol=1e-4, rtol=0)


@pytest.mark.slow
def test_compiled_padded_batch_equals_eager(compiled_fp32, eager_fp32):
    model, fast_path = compiled_fp32
    prompts = [rand_ids(4, (9,)).tolist(), rand_ids(5, (4,)).tolist(), rand_ids(6, (6,)).tolist()]
    fast = generate_batch(model, prompts, max_new_tokens=10, stop_token_ids=[], fast_path=fast_path)
    slow = generate_batch(eager_fp32, prompts, max_new_tokens=10, stop_token_ids=[])
    assert fast == slow
    assert (3, 256, True) in fast_path.compiled
    alone = [list(generate(eager_fp32, torch.tensor([p]), max_new_tokens=10, stop_token_ids=[])) for p in prompts]
    assert fast == alone


@pytest.mark.slow
def test_live_sessions_share_the_compiled_step_up_to_the_pool_size(compiled_fp32):
    """Each kept conversation decodes compiled in a cache of its own, with no recompile; a session
    beyond leases_per_bucket runs eagerly. All give the same logits."""
    model, fast_path = compiled_fp32
    ids = rand_ids(7, (1, 12))
    with DecodeSession(model, 1, 20, fast_path=fast_path) as warm:  # its cache goes back to the pool
        warm.step(warm.prefill(ids).argmax(-1))  # this bucket's step is compiled (once per module)
    sessions = [DecodeSession(model, 1, 20, fast_path=fast_path) for _ in range(fast_path.leases_per_bucket + 1)]
    assert [s.fast_path is not None for s in sessions] == [True] * fast_path.leases_per_bucket + [False]
    assert len({id(s.cache) for s in sessions}) == len(sessions)
    with torch._dynamo.config.patch(error_on_recompile=True):
        logits = [s.step(s.prefill(ids).argmax(-1)) for s in sessions]
    for other in logits[1:]:
        torch.testing.assert_close(other, logits[0], atol=1e-4, rtol=0)
    for session in sessions:
        session.close()


@pytest.mark.slow
def test_warm_up_reports_progress_and_compiles_the_first_bucket(compiled_fp32):
    record = compiled_fp32[1].warm_up_record
    messages = record["messages"]
    assert messages[0][0] == 0.0 and "compiling" in messages[0][1] and "default" in messages[0][1]
    assert messages[-1][0] == 1.0 and (1, 256, False) in record["compiled"]
    assert record["busy"] and not any(record["busy"])  # all given back


@pytest.mark.slow
@pytest.mark.parametrize("quantize", ["int8", "int4"])
def test_quantized_compiled_decode_equals_eager(tiny_model_dir, quantize):
    compiled, fast_path = _compiled(tiny_model_dir, quantize=quantize)
    eager = qwen2.load_model(tiny_model_dir, dtype="float32", quantize=quantize)
    ids = rand_ids(8, (1, 16))
    fast, _ = _steps(compiled, ids, 6, fast_path)
    slow, _ = _steps(eager, ids, 6)
    if eager.info.quant_layout == INT4_BLOCKS_LAYOUT:  # x rounded to int8 grows Inductor's last bits (test_int4_blocks)
        assert (fast - slow).pow(2).mean().sqrt() < 0.02 * slow.std()
    else:
        torch.testing.assert_close(fast, slow, atol=1e-4, rtol=0)
    prompt = ids[:, :6]
    assert list(generate(compiled, prompt, max_new_tokens=12, stop_token_ids=[], fast_path=fast_path)) == \
        list(generate(eager, prompt, max_new_tokens=12, stop_token_ids=[]))


@pytest.mark.slow
def test_bfloat16_compiled_decode_stays_close(tiny_model_dir):
    compiled, fast_path = _compiled(tiny_model_dir, dtype="bfloat16")
    eager = qwen2.load_model(tiny_model_dir, dtype="bfloat16")
    ids = rand_ids(9, (1, 14))
    fast, _ = _steps(compiled, ids, 6, fast_path)
    slow, _ = _steps(eager, ids, 6)
    assert (fast - slow).abs().max().item() < 0.05 * slow.abs().max().item()


def test_make_fast_path_picks_the_compiled_cpu_decoder_and_its_mode(tiny_model_dir, monkeypatch):
    model = qwen2.load_model(tiny_model_dir, dtype="float32")
    monkeypatch.delenv("QWEN2_COMPILE_MODE", raising=False)
    fast_path = make_fast_path(model, "compile")  # nothing compiles until a step runs
    assert isinstance(fast_path, CompiledCpuPath) and fast_path.mode == DEFAULT_MODE and not fast_path.compiled
    monkeypatch.setenv("QWEN2_COMPILE_MODE", "default")  # what tests/conftest.py sets for the whole run
    assert make_fast_path(model, "compile").mode == "default"


def test_rejects_a_non_cpu_model_and_unknown_modes(tiny_model_dir):
    model = qwen2.load_model(tiny_model_dir, dtype="float32")
    with pytest.raises(qwen2.ConfigError, match="mode"):
        CompiledCpuPath(model, mode="fastest")
    elsewhere = model.to("meta")  # a device that is not the CPU, on any machine (no GPU needed)
    assert elsewhere.device.type == "meta"
    with pytest.raises(qwen2.ConfigError, match="needs a CPU model; this one is on meta"):
        CompiledCpuPath(elsewhere, mode="default")


@pytest.mark.slow
def test_warm_up_compiles_the_buckets_a_chat_grows_through(compiled_fp32):
    compiled = compiled_fp32[1].warm_up_record["compiled"]
    assert {key[1] for key in compiled} == {256, 512, 1024}  # 1024: the context of this model
    assert all(key[0] == 1 and not key[2] for key in compiled)  # one row, unpadded


@pytest.mark.slow
def test_a_reply_after_warm_up_never_compiles(tiny_model_dir):
    """The app warms up at start-up, then replies from Gradio's worker threads with the sampler under
    inference mode: that first reply must run the warmed step (it once recompiled there, 0.2 tok/s)."""
    model, fast_path = _compiled(tiny_model_dir)
    fast_path.warm_up(buckets=(256,))
    session, tokens, errors = ChatSession(model, fast_path=fast_path), [], []

    def reply():
        try:
            with torch.inference_mode(), torch._dynamo.config.patch(error_on_recompile=True):
                tokens.extend(session.reply(list(range(1, 30)), max_new_tokens=8, temperature=0.7, top_k=20,
                                            seed=1))
        except Exception as exc:
            errors.append(exc)

    thread = threading.Thread(target=reply)
    thread.start()
    thread.join()
    assert not errors and len(tokens) == 8, errors
