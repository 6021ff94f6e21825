"""qwen2.engine: continuous batching gives every row the tokens it would get alone; rows join, leave,
stop and cancel without disturbing the others; prompts prefill in chunks between decode steps; the
per-request limits refuse or end what is over them; the compiled steps never recompile once ready."""

from __future__ import annotations

import threading
import time

import pytest
import torch

import qwen2
from qwen2 import cpu_attention
from qwen2 import steps as steps_module
from qwen2.engine import Engine, Limits
from qwen2.errors import ContextLengthError, GenerationError, LimitError
from qwen2.sampling import SamplingSettings
from qwen2.speculative import CPU_VERIFY_COST
from qwen2.steps import EagerSteps
from tests.helpers import ROOT, needs_kernel

# A penalty keeps the tiny random model from repeating one token, so the comparisons mean something.
VARIED = SamplingSettings(repetition_penalty=1.5)


@pytest.fixture(scope="module")
def model(tiny_model_dir):
    return qwen2.load_model(tiny_model_dir, dtype="float32")


def ids(seed, n, vocab=512):
    return torch.randint(0, vocab, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


def alone(model, prompt, n, settings=VARIED, stop=(), seed=None):
    return list(qwen2.generate(model, torch.tensor([prompt]), max_new_tokens=n, stop_token_ids=list(stop),
                               seed=seed, temperature=settings.temperature, top_k=settings.top_k,
                               top_p=settings.top_p, repetition_penalty=settings.repetition_penalty))


class RecordingSteps(EagerSteps):
    """Eager steps that log what each loop turn ran: ("prefill", row) or ("decode", batch size)."""

    def __init__(self, model, delay=0.0):
        super().__init__(model)
        self.log, self.delay = [], delay

    def prefill(self, cache, row, ids, start):
        self.log.append(("prefill", row))
        return super().prefill(cache, row, ids, start)

    def decode(self, cache, rows, ids, positions):
        self.log.append(("decode", len(rows)))
        time.sleep(self.delay)
        return super().decode(cache, rows, ids, positions)


def engine_with(model, steps=None, speculate=False, **kwargs):
    """An eager engine; without speculation unless asked (these tests count and compare plain steps)."""
    engine = Engine(model, fast_decode="off", speculate=speculate, **kwargs)
    if steps is not None:
        engine.steps = steps
    return engine.start()


def test_greedy_rows_batched_equal_each_row_alone(model):
    prompts = [ids(i, 3 + 9 * i) for i in range(4)]
    lengths = [16, 10, 12, 9]  # rows leave at different steps
    with engine_with(model, rows=4, prefill_chunk=8) as engine:
        with engine.exclusive():  # all four wait for the engine together, whatever the threads' timing
            replies = [engine.submit(p, VARIED, n) for p, n in zip(prompts, lengths)]
        outs = [list(r) for r in replies]
    assert max(r.stats.batch_size for r in replies) == 4  # they did decode together
    for prompt, n, out, reply in zip(prompts, lengths, outs, replies):
        assert out == alone(model, prompt, n)
        assert reply.reason == "length" and reply.stats.new_tokens == n


def test_a_row_joining_mid_way_and_one_stopping_early_leave_the_others_unchanged(model):
    first, second, third = ids(10, 12), ids(11, 30), ids(12, 7)
    expected_third = alone(model, third, 20)
    stop = expected_third[6]  # this row meets its stop token at its 7th token
    steps = RecordingSteps(model, delay=0.002)
    with engine_with(model, steps, rows=3) as engine:
        a = engine.submit(first, VARIED, 24)
        tokens_a = iter(a)
        early = [next(tokens_a) for _ in range(5)]  # `a` is decoding alone
        b = engine.submit(second, VARIED, 10)
        c = engine.submit(third, VARIED, 20, stop_ids=[stop])
        out_a = early + list(tokens_a)
        out_b, out_c = list(b), list(c)
    assert out_a == alone(model, first, 24)
    assert out_b == alone(model, second, 10)
    assert out_c == alone(model, third, 20, stop=[stop]) == expected_third[:expected_third.index(stop)]
    assert c.reason == "stop" and b.reason == "length"
    assert ("decode", 1) in steps.log and ("decode", 3) in steps.log


def test_a_seeded_sampled_row_is_reproducible_beside_others(model):
    settings = SamplingSettings(temperature=1.0, top_k=50)
    prompt = ids(20, 9)
    runs = []
    for neighbours in (0, 2):
        with engine_with(model, rows=3) as engine:
            others = [engine.submit(ids(30 + i, 5), VARIED, 12) for i in range(neighbours)]
            mine = engine.submit(prompt, settings, 12, seed=1234)
            runs.append(list(mine))
            for other in others:
                list(other)
    assert runs[0] == runs[1]
    assert runs[0] == alone(model, prompt, 12, settings, seed=1234)


def test_a_long_prompt_prefills_in_chunks_between_decode_steps(model):
    steps = RecordingSteps(model, delay=0.002)
    long_prompt = ids(40, 200)
    with engine_with(model, steps, rows=2, prefill_chunk=16) as engine:
        a = engine.submit(ids(41, 5), VARIED, 40)
        tokens_a = iter(a)
        next(tokens_a)
        b = engine.submit(long_prompt, VARIED, 4)
        out_b = list(b)
        list(tokens_a)
    assert out_b == alone(model, long_prompt, 4)
    row_b = b.row
    turns = [entry for entry in steps.log if entry == ("prefill", row_b)]
    assert len(turns) == 13  # ceil(200 / 16)
    # between two chunks of b, `a` decoded a step: no run of b's chunks back to back
    for i in range(len(steps.log) - 1):
        assert not (steps.log[i] == ("prefill", row_b) == steps.log[i + 1]), steps.log


def test_cancel_ends_one_reply_after_the_step_in_flight_and_the_others_go_on(model):
    steps = RecordingSteps(model, delay=0.005)
    with engine_with(model, steps, rows=2) as engine:
        keep = engine.submit(ids(50, 6), VARIED, 30)
        drop = engine.submit(ids(51, 6), VARIED, 200)
        tokens = iter(drop)
        seen = [next(tokens) for _ in range(3)]
        drop.cancel()
        assert drop.wait(5)
        rest = list(tokens)
        out_keep = list(keep)
    assert drop.reason == "cancelled" and drop.stats.stopped
    assert seen + rest == drop.tokens and drop.stats.new_tokens == len(drop.tokens) < 200
    assert out_keep == alone(model, ids(50, 6), 30)


def test_a_conversation_keeps_its_row_and_reuses_the_prefix(model):
    with engine_with(model, rows=2) as engine, engine.conversation() as chat:
        prompt = ids(60, 20)
        for turn in range(3):
            reply = engine.submit(prompt, VARIED, 6, conversation=chat)
            out = list(reply)
            assert out == alone(model, prompt, 6)
            assert reply.stats.reused_tokens == (0 if turn == 0 else len(prompt) - 7)
            prompt = prompt + out + ids(61 + turn, 6)
        assert chat.row is not None
    assert chat.row is None  # closed: the row is back


def test_an_idle_conversation_gives_its_row_to_a_newcomer_and_starts_over_correctly(model):
    with engine_with(model, rows=1) as engine:
        first, second = engine.conversation(), engine.conversation()
        p1, p2 = ids(70, 10), ids(71, 10)
        assert list(engine.submit(p1, VARIED, 5, conversation=first)) == alone(model, p1, 5)
        assert list(engine.submit(p2, VARIED, 5, conversation=second)) == alone(model, p2, 5)
        assert first.row is None and second.row == 0
        again = engine.submit(p1, VARIED, 5, conversation=first)
        assert list(again) == alone(model, p1, 5) and again.stats.reused_tokens == 0


def test_requests_wait_for_a_row_and_the_wait_is_reported_apart_from_ttft(model):
    steps = RecordingSteps(model, delay=0.01)
    with engine_with(model, steps, rows=1) as engine:
        a = engine.submit(ids(80, 5), VARIED, 20)
        b = engine.submit(ids(81, 5), VARIED, 3)
        list(a), list(b)
    assert b.stats.queue_wait_s >= 0.15  # 19 decode steps of `a` at >= 10 ms
    assert b.stats.ttft_s < b.stats.queue_wait_s
    assert "waited" in b.stats.line() and "waited" not in a.stats.line()


def test_limits_refuse_or_end_what_is_over_them(model):
    limits = Limits(prompt_tokens=50, new_tokens=20, wall_s=0.2, waiting=1)
    steps = RecordingSteps(model, delay=0.02)
    with engine_with(model, steps, rows=1, limits=limits) as engine:
        with pytest.raises(LimitError, match="at most 50 prompt tokens"):
            engine.submit(ids(1, 51), VARIED, 5)
        with pytest.raises(LimitError, match="max_new_tokens=21 is over this server's limit of 20"):
            engine.submit(ids(1, 5), VARIED, 21)
        slow = engine.submit(ids(2, 5), VARIED, 20)
        slow_tokens = iter(slow)
        next(slow_tokens)
        queued = engine.submit(ids(3, 5), VARIED, 2)
        with pytest.raises(LimitError, match="already waiting"):
            engine.submit(ids(4, 5), VARIED, 2)
        list(slow_tokens), list(queued)
    assert slow.reason == "time" and slow.stats.stopped and len(slow.tokens) < 20
    assert queued.reason == "length"


def test_bad_requests_raise_at_submit_and_queue_nothing(model):
    with engine_with(model, rows=1, row_tokens=64) as engine:
        with pytest.raises(ContextLengthError, match="64-token context per conversation"):
            engine.submit(ids(1, 60), VARIED, 5)
        with pytest.raises(GenerationError, match="outside the vocab"):
            engine.submit([1, 2, 9999], VARIED, 5)
        with pytest.raises(GenerationError, match="max_new_tokens=0"):
            engine.submit([1, 2], VARIED, 0)
        with pytest.raises(GenerationError, match="empty"):
            engine.submit([], VARIED, 2)
        assert engine.load["waiting"] == 0
        assert len(engine.generate([1, 2, 3], settings=VARIED, max_new_tokens=4)) == 4  # still serving


def test_a_failing_step_ends_its_replies_with_the_error_and_the_engine_goes_on(model):
    class Failing(EagerSteps):
        fail = True

        def decode(self, cache, rows, ids, positions):
            if self.fail:
                self.fail = False
                raise RuntimeError("boom")
            return super().decode(cache, rows, ids, positions)

    with engine_with(model, Failing(model), rows=2) as engine:
        reply = engine.submit(ids(5, 5), VARIED, 5)
        with pytest.raises(RuntimeError, match="boom"):
            list(reply)
        assert reply.reason == "error"
        assert list(engine.submit(ids(5, 5), VARIED, 5)) == alone(model, ids(5, 5), 5)


def test_exclusive_waits_for_live_replies_and_holds_new_ones(model):
    steps = RecordingSteps(model, delay=0.005)
    with engine_with(model, steps, rows=2) as engine:
        live = engine.submit(ids(6, 5), VARIED, 10)
        next(iter(live))
        with engine.exclusive():
            assert live.done  # it finished before the model was handed over
            held = engine.submit(ids(7, 5), VARIED, 3)
            time.sleep(0.1)
            assert not held.tokens and engine.load["waiting"] == 1
        assert len(list(held)) == 3


def test_many_threads_submitting_at_once_are_all_served(model):
    results = {}
    with engine_with(model, rows=3) as engine:
        def client(i):
            results[i] = engine.generate(ids(90 + i, 4 + i), settings=VARIED, max_new_tokens=6)

        threads = [threading.Thread(target=client, args=(i,)) for i in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    assert all(results[i] == alone(model, ids(90 + i, 4 + i), 6) for i in range(8))


@pytest.fixture(scope="module")
def compiled_engine(model):
    """An engine with compiled steps (Inductor's cheap mode), started as the app starts it: serving
    at once while its steps compile in the background. What it did before the compiles were done is
    in `engine.early`; the fixture waits for them, so each step compiles once for the module."""
    engine = Engine(model, rows=4, fast_decode="compile", compile_mode="default")
    messages = []
    with engine.start(progress=lambda fraction, message: messages.append(message)):
        state = engine.state
        out = engine.generate(ids(110, 6), settings=VARIED, max_new_tokens=5)  # eager or compiled: served now
        engine.steps._thread.join()
        engine.early = dict(state=state, out=out, messages=messages)
        yield engine


@pytest.mark.slow
def test_the_engine_serves_while_its_steps_compile_in_the_background(model, compiled_engine):
    early = compiled_engine.early
    assert early["state"].startswith("compiling") or early["state"] == "compiled"
    assert early["out"] == alone(model, ids(110, 6), 5)
    assert compiled_engine.state == "compiled" and "compiled for 1 row and 2-4 rows" in early["messages"][-1]
    assert "Inductor default" in early["messages"][0]


@pytest.mark.slow
def test_compiled_steps_are_used_once_ready_and_never_recompile(model, compiled_engine):
    """Where our kernels build, the steps' attention is our kernel reading the rows in place in the
    pool (qwen2/cpu_attention.py); their replies equal the eager model's, alone or batched."""
    engine = compiled_engine
    assert list(engine.steps.ready) == [1, 4, "verify"] and engine.state == "compiled"  # one row; 2-4 rows
    assert engine.steps.attention == cpu_attention.decode_backend(model.device)
    prompts = [ids(100 + i, 4 + 11 * i) for i in range(4)]
    with torch._dynamo.config.patch(error_on_recompile=True):
        for batch in (1, 3, 4, 2):  # one row, then 3, 4, 2 rows through one step; keys read from 5 to 50
            replies = [engine.submit(p, VARIED, 12) for p in prompts[:batch]]
            outs = [list(r) for r in replies]
            assert outs == [alone(model, p, 12) for p in prompts[:batch]]


@pytest.mark.slow
def test_compiled_steps_read_the_pool_through_our_kernel_and_equal_eager_logits(model, compiled_engine):
    """One row and three rows at different lengths, in rows 3, 0 and 2 of the pool: the compiled
    step's logits equal the eager step's, and it calls our attention kernel where the kernels build."""
    engine = compiled_engine
    with engine.exclusive(), torch.inference_mode():
        steps, cache = engine.steps, engine._pool()
        rows, lengths = [3, 0, 2], [9, 30, 17]
        for row, n in zip(rows, lengths):
            steps.prefill(cache, row, torch.tensor([ids(200 + row, n)]), 0)
        for batch in (1, 3):
            args = rows[:batch], [7, 8, 9][:batch], lengths[:batch]
            with torch._dynamo.config.patch(error_on_recompile=True), \
                    torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
                compiled = steps.decode(cache, *args)
            eager = EagerSteps.decode(steps, cache, *args)
            torch.testing.assert_close(compiled, eager, rtol=1e-4, atol=1e-4)
            called = {event.key for event in prof.key_averages()}
            assert ("qwen2::decode_attention" in called) == (steps.attention == "cpu_kernel"), batch


@pytest.mark.slow
def test_a_profile_times_and_cuts_the_engines_own_compiled_step(model, compiled_engine):
    """The dashboard's profile of the served model: the engine's compiled decode step (the one a chat
    reply runs), on the scratch row, timed and cut into blocks; nothing recompiles, and the engine
    serves on unchanged afterwards."""
    import profiling
    from profiling.steps import EngineDecode

    with pytest.raises(RuntimeError, match="exclusive"):
        compiled_engine.decode_runner()  # only while the model is held alone
    compiled_engine._cache = None  # as after an idle spell: the dashboard's thread makes the row cache anew
    with compiled_engine.exclusive(), torch._dynamo.config.patch(error_on_recompile=True):
        decode = EngineDecode(*compiled_engine.decode_runner())
        run = profiling.profile_model(model, prompt_tokens=6, new_tokens=4, warmup=0, fast_path=decode)
    assert "rows hold" in decode.why_not(decode.cache.row_len + 1)
    fast = run["fast_decode"]
    assert fast["decoder"] == "cpu-compile" and len(fast["layers"]) == model.config.num_hidden_layers, fast["note"]
    assert fast["step_ms"]["n"] == 4 and all(layer["attention_ms"] > 0 for layer in fast["layers"])
    assert compiled_engine.generate(ids(111, 5), settings=VARIED, max_new_tokens=4) == alone(model, ids(111, 5), 4)


@pytest.mark.slow
def test_the_compiled_verification_equals_the_eager_one_and_serves_speculation(model, compiled_engine):
    """The compiled 4-token verification (shorter drafts padded) gives the eager forward's logits;
    a speculating reply through it gets the plain tokens, with nothing recompiled."""
    steps, cache = compiled_engine.steps, compiled_engine._pool()
    prompt = echoing_prompt(64)
    with compiled_engine.exclusive(), torch.inference_mode():  # the model from this thread, as a profile has it
        steps.prefill(cache, cache.scratch, torch.tensor([prompt]), 0)
        for fed in (prompt[3:5], prompt[3:7]):  # padded, and the full width
            eager = EagerSteps.verify(steps, cache, cache.scratch, fed, len(prompt))
            with torch._dynamo.config.patch(error_on_recompile=True):
                compiled = steps.verify(cache, cache.scratch, fed, len(prompt))
            torch.testing.assert_close(compiled, eager, rtol=1e-4, atol=1e-4)
    cost = steps.verify_cost  # timed as the compiled steps run: one price for 2 to 4 tokens
    assert steps.max_guesses(cache, len(prompt)) == 3 and len(cost) == 4 and cost[0] == 1.0
    assert cost[1] == cost[2] == cost[3] == max(1.0, steps._verify_s[4] / steps._step_s)
    # Whether the gate finds a verification worth its price depends on this machine's timings (the
    # tiny model's steps are mostly fixed costs): start the reply at the price of one step, so that
    # it speculates here as on a real model, and the test is about the tokens.
    steps._verify_s[4] = steps._step_s
    with torch._dynamo.config.patch(error_on_recompile=True):
        reply = compiled_engine.submit(prompt, SamplingSettings(), 30)
        out = list(reply)
    assert out == alone(model, prompt, 30, SamplingSettings()) and reply.stats.accepted > 0, reply.stats


@needs_kernel
@pytest.mark.parametrize("quantize", ["int8", "int4"])
def test_the_wide_verification_is_compiled_where_our_quantized_kernels_run_on_avx512(model, tiny_model_dir, quantize):
    from qwen2 import cpu_kernels

    assert steps_module.verify_widths(model) == (4,)  # float32: torch's products, nine rows cost nine
    quantized = qwen2.load_model(tiny_model_dir, dtype="float32", quantize=quantize)
    wide = cpu_kernels.instruction_set() == "avx512-vnni"
    assert steps_module.verify_widths(quantized) == ((4, 9) if wide else (4,))
    jobs = Engine(quantized, rows=1, fast_decode="compile", compile_mode="default").steps.jobs
    assert jobs == ((1, "verify", "wide") if wide else (1, "verify"))


def test_the_wide_verification_takes_long_drafts_in_one_forward_and_equals_the_eager_one(model, monkeypatch):
    """Where nine tokens cost little more than four (qwen2.steps.verify_widths: our kernels on
    AVX-512 VNNI), a second verification is compiled for 9 tokens: drafts of 4 go through the narrow
    one, 5 to 9 through the wide one, each equal to the eager forward; near the end of the compiled
    key range only the narrow one fits; a reply speculating through it gets the plain tokens."""
    monkeypatch.setattr(steps_module, "verify_widths", lambda model: (4, 9))
    engine = Engine(model, rows=1, fast_decode="compile", compile_mode="default")
    steps, cache = engine.steps, engine._pool()
    assert steps.jobs == (1, "verify", "wide") and (steps.verify_width, steps.wide_width) == (4, 9)
    engine.compile_now()
    prompt = echoing_prompt(64)
    used = []  # the width of each compiled verification run
    for width, compiled in list(steps.verify_fns.items()):
        monkeypatch.setitem(steps.verify_fns, width,
                            lambda *args, f=compiled, width=width: used.append(width) or f(*args))
    with torch.inference_mode():
        steps.prefill(cache, cache.scratch, torch.tensor([prompt]), 0)
        for fed, width in ((prompt[3:7], 4), (prompt[3:8], 9), (prompt[3:12], 9)):
            eager = EagerSteps.verify(steps, cache, cache.scratch, fed, len(prompt))
            with torch._dynamo.config.patch(error_on_recompile=True):
                compiled = steps.verify(cache, cache.scratch, fed, len(prompt))
            torch.testing.assert_close(compiled, eager, rtol=1e-4, atol=1e-4)
            assert used[-1] == width, (len(fed), used)
    cost = steps.verify_cost  # one price for 2-4 tokens, one for 5-9
    assert len(cost) == 9 and cost[0] == 1.0 and len(set(cost[1:4])) == 1 and len(set(cost[4:])) == 1
    assert cost[4] == max(cost[1], steps._verify_s[9] / steps._step_s)
    last = steps._max_keys(cache, verify=True)
    assert steps.max_guesses(cache, len(prompt)) == 8
    assert steps.max_guesses(cache, last - 9) == 8 and steps.max_guesses(cache, last - 8) == 3
    assert steps.max_guesses(cache, last - 3) == 0
    # priced at one step each, the gate verifies every guess a draft offers (the test is about tokens)
    steps._verify_s[4] = steps._verify_s[9] = steps._step_s
    used.clear()
    with engine.start(), torch._dynamo.config.patch(error_on_recompile=True):
        reply = engine.submit(prompt, SamplingSettings(), 30)
        out = list(reply)
    assert out == alone(model, prompt, 30, SamplingSettings()) and 9 in used, (used, reply.stats)


@pytest.fixture(scope="module")
def long_model_dir(model, tmp_path_factory):
    """The tiny model's config with a context past 4096 (no weights: load it with random ones)."""
    import json
    from dataclasses import asdict

    directory = tmp_path_factory.mktemp("tiny-long")
    config = {k: v for k, v in asdict(model.config).items() if not k.startswith("_")}
    config.update(max_position_embeddings=4400, architectures=["Qwen2ForCausalLM"], model_type="qwen2")
    (directory / "config.json").write_text(json.dumps(config))
    return directory


@pytest.fixture(scope="module")
def long_model(long_model_dir):
    return qwen2.load_model(long_model_dir, dtype="float32", random_weights=True)


@pytest.fixture
def inductor_attention(monkeypatch):
    """The compiled steps' attention in Inductor's own math (as where our kernel does not build)."""
    monkeypatch.setattr(steps_module, "decode_backend", lambda device: "single_query")


def test_rows_longer_than_the_compiled_key_range_get_a_second_one_row_compile(model, long_model, inductor_attention):
    """Inductor guards a compiled step that sums the softmax itself to one side of 4096 keys
    (qwen2.steps.MAX_COMPILED_KEYS): rows longer than that get the one-row step compiled again for
    the rest ("long"), last; a batch past the line, and rows that never reach it, keep what they had."""
    assert Engine(model, fast_decode="compile", compile_mode="default").steps.jobs == (1, 4, "verify")
    assert Engine(long_model, fast_decode="compile", row_tokens=4098).steps.jobs == (1, 4, "verify")
    engine = Engine(long_model, rows=2, fast_decode="compile", compile_mode="default", row_tokens=4400)
    steps, cache = engine.steps, engine._pool()
    assert steps.attention == "single_query" and steps.jobs == (1, 2, "verify", "long")
    steps.ready.update({1: 0.0, 2: 0.0, "verify": 0.0})
    assert steps.compiled_for(cache, 1, 4096) and not steps.compiled_for(cache, 1, 4097)
    steps.ready["long"] = 0.0
    assert steps.compiled_for(cache, 1, 4097) and steps.compiled_for(cache, 1, 4399)
    assert not steps.compiled_for(cache, 2, 4097) and not steps.compiled_for(cache, 1, 4400)
    assert steps._key_range(cache, 4096) == (2, 4096) and steps._key_range(cache, 4097) == (4097, 4399)
    assert steps.max_guesses(cache, 4095) == 0  # no verification compiled past the line: no guesses
    engine.close()


@needs_kernel
def test_with_our_attention_kernel_one_compile_serves_the_whole_row(long_model):
    """Our kernel sums the softmax itself: no "long" compile, every batch size compiled at any key
    count of the row; the verification (Inductor's softmax) still stops at 4096 keys."""
    engine = Engine(long_model, rows=2, fast_decode="compile", compile_mode="default", row_tokens=4400)
    steps, cache = engine.steps, engine._pool()
    assert steps.attention == "cpu_kernel" and steps.jobs == (1, 2, "verify")
    steps.ready.update({1: 0.0, 2: 0.0, "verify": 0.0})
    assert all(steps.compiled_for(cache, batch, keys) for batch in (1, 2) for keys in (2, 4096, 4097, 4399))
    assert not steps.compiled_for(cache, 1, 4400)
    assert steps._key_range(cache, 17) == steps._key_range(cache, 4397) == (2, 4399)
    assert steps.max_guesses(cache, 4092) == 3 and steps.max_guesses(cache, 4093) == 0
    engine.close()


# Run in a process of its own, on an Inductor cache of its own: in one process, dynamo would serve
# the second engine's compile from its own cache of the first, before Inductor's is asked. In bf16:
# Inductor does not cache a float32 step (its weights prepacked by oneDNN), but it does this one.
CACHED_ELSEWHERE = """
import sys, torch, qwen2
from torch._dynamo.utils import counters
from qwen2 import steps
from qwen2.engine import Engine
from qwen2.steps import EagerSteps
import qwen2.upcast
# bf16 through our panels on every CPU: where it has bf16 math, oneDNN's packed weights would make
# Inductor bypass the cache this test is about ("mkldnn tensors unpickleable")
qwen2.upcast.cpu_has_bfloat16_math = lambda: False
model = qwen2.load_model(sys.argv[1], dtype="bfloat16", random_weights=True)
def compiled(max_keys):
    torch._dynamo.reset()
    engine = Engine(model, rows=1, fast_decode="compile", compile_mode="default", row_tokens=4400, speculate=False)
    engine.steps._max_keys = max_keys
    engine.compile_now()
    assert engine.steps.failed is None, engine.steps.failed
    return engine
split = compiled(lambda cache, verify=False: min(cache.row_len - 1, steps.MAX_COMPILED_KEYS))
assert split.steps._key_range(split._pool(), 17) == (2, 4096)
whole = compiled(lambda cache, verify=False: cache.row_len - 1)
assert whole.steps._key_range(whole._pool(), 17) == (2, 4399)
with torch.inference_mode(), torch._dynamo.config.patch(error_on_recompile=True):
    cache = whole._pool()
    a = whole.steps.decode(cache, [0], [7], [4300])
    torch.testing.assert_close(a, EagerSteps.decode(whole.steps, cache, [0], [7], [4300]), rtol=0.02, atol=0.02)
print("served 4301 keys compiled", dict(counters["inductor"]))
"""


@pytest.mark.slow
@needs_kernel
def test_a_graph_inductor_cached_for_another_key_range_is_not_taken(long_model_dir, tmp_path):
    """Inductor's cache checks a stored graph's guards against the compile's example alone; each
    compile's key range joins its cache key (qwen2.cpu_compile.CacheKeyTag), so a step stored for
    2..4096 keys (as before our kernel served whole rows) does not stand in for one compiled for
    2..4399, which then serves 4301 keys without compiling anew."""
    import os
    import subprocess
    import sys

    env = {**os.environ, "TORCHINDUCTOR_CACHE_DIR": str(tmp_path / "inductor")}
    run = subprocess.run([sys.executable, "-c", CACHED_ELSEWHERE, str(long_model_dir)], capture_output=True,
                         text=True, env=env, cwd=ROOT, timeout=600)
    assert run.returncode == 0 and "served 4301 keys compiled" in run.stdout, run.stderr[-3000:]
    assert "'fxgraph_cache_miss': 2" in run.stdout, run.stdout  # both went to Inductor's cache, neither was taken


def crossing_4096_keys(engine, prompt_seed):
    """One reply from a prompt of 4090 tokens across 4096 keys on `engine`'s compiled steps (compiled
    here), recompiling nothing; its tokens, and the key counts the compiled one-row step read. The
    compiled step equals the eager one past the line, on two rows at once too."""
    engine.compile_now()
    keys = []
    compiled = engine.steps.step_fn
    engine.steps.step_fn = lambda *args: (keys.append(args[-1].shape[0]), compiled(*args))[1]
    prompt = ids(prompt_seed, 4090)
    with engine.start(), torch._dynamo.config.patch(error_on_recompile=True):
        out = engine.generate(prompt, settings=VARIED, max_new_tokens=12)
        steps, cache = engine.steps, engine._pool()
        with torch.inference_mode():
            for rows, positions in (([0], [4101]), ([0, 1], [4101, 4050])):
                if steps.compiled_for(cache, len(rows), max(positions) + 1):
                    eager = EagerSteps.decode(steps, cache, rows, [7] * len(rows), positions)
                    torch.testing.assert_close(steps.decode(cache, rows, [7] * len(rows), positions), eager,
                                               rtol=1e-4, atol=1e-4)
    engine.steps.step_fn = compiled
    return out, prompt, keys


@pytest.mark.slow
def test_a_reply_crossing_4096_keys_stays_compiled_and_equals_the_eager_one(long_model, inductor_attention):
    engine = Engine(long_model, rows=1, fast_decode="compile", compile_mode="default", row_tokens=4400,
                    speculate=False)
    out, prompt, keys = crossing_4096_keys(engine, 120)
    assert list(engine.steps.ready) == [1, "long"]
    assert out == alone(long_model, prompt, 12)
    assert keys[:11] == list(range(4091, 4102)) and keys[-1] == 4102  # every step compiled, both sides of 4096


@pytest.mark.slow
@needs_kernel
def test_on_our_kernel_a_reply_crossing_4096_keys_needs_one_compile(long_model):
    engine = Engine(long_model, rows=2, fast_decode="compile", compile_mode="default", row_tokens=4400,
                    speculate=False)
    out, prompt, keys = crossing_4096_keys(engine, 121)
    assert engine.steps.attention == "cpu_kernel" and list(engine.steps.ready) == [1, 2]
    assert out == alone(long_model, prompt, 12)
    assert keys[:11] == list(range(4091, 4102)) and keys[-2:] == [4102, 4102]  # one row, then two


def test_compile_now_compiles_every_bucket_on_the_calling_thread(model, monkeypatch):
    """compile_now (tests, benchmarks, `python -m qwen2`) runs the background compile's loop on this
    thread: every bucket and the verification, in order, with progress. (The compiles themselves are
    compiled_engine's; here each is recorded, not run.)"""
    engine = Engine(model, rows=2, fast_decode="compile", compile_mode="default")
    threads = []
    monkeypatch.setattr(engine.steps, "_compile",
                        lambda cache, bucket: (threads.append(threading.current_thread()),
                                               engine.steps.ready.__setitem__(bucket, 0.0)))
    messages = []
    engine.compile_now(progress=lambda fraction, message: messages.append(message))
    assert list(engine.steps.ready) == [1, 2, "verify"] and threads == [threading.current_thread()] * 3
    assert engine.state == "compiled" and messages[-1].startswith(
        "decode step compiled for 1 row and 2 rows, and the 4-token verification (speculative decoding), in ")
    engine.close()
    monkeypatch.setattr(steps_module, "verify_widths", lambda model: (4, 9))  # and with the wide one
    engine = Engine(model, rows=2, fast_decode="compile", compile_mode="default")
    monkeypatch.setattr(engine.steps, "_compile", lambda cache, job: engine.steps.ready.__setitem__(job, 0.0))
    engine.compile_now(progress=lambda fraction, message: messages.append(message))
    assert messages[-1].startswith("decode step compiled for 1 row and 2 rows, the 4-token verification (speculative "
                                   "decoding), and the 9-token verification (long drafts), in "), messages[-1]
    engine.close()


def test_a_bad_seed_is_refused_at_submit_and_the_engine_keeps_serving(model):
    with engine_with(model, rows=1) as engine:
        for seed in (10**20, -1, 1.5, True):
            with pytest.raises(GenerationError, match="seed="):
                engine.submit([1, 2, 3], SamplingSettings(temperature=1.0), 3, seed=seed)
        assert len(engine.generate([1, 2, 3], settings=SamplingSettings(temperature=1.0), max_new_tokens=3,
                                   seed=2**63 - 1)) == 3


def test_a_busy_conversation_does_not_hold_up_the_queue_and_closing_cancels_its_queued_reply(model):
    steps = RecordingSteps(model, delay=0.01)
    with engine_with(model, steps, rows=3) as engine:
        chat = engine.conversation()
        first = engine.submit(ids(120, 5), VARIED, 50, conversation=chat)
        next(iter(first))
        second = engine.submit(ids(121, 5), VARIED, 5, conversation=chat)  # waits for `first`
        other = engine.submit(ids(122, 5), VARIED, 4)  # behind it in the queue, with rows free
        assert list(other) == alone(model, ids(122, 5), 4) and not first.done
        chat.close()  # cancels the live reply and the queued one
        assert first.wait(5) and second.wait(5)
        assert first.reason == second.reason == "cancelled" and not second.tokens


def test_closing_an_engine_that_never_started_ends_its_queued_replies(model):
    engine = Engine(model, fast_decode="off")
    reply = engine.submit([1, 2, 3], VARIED, 3)
    engine.close()
    assert reply.done and list(reply) == [] and reply.reason == "cancelled"


# -- speculative decoding in the engine ----------------------------------------------------------------

def echoing_prompt(seed=60):
    """A prompt that repeats itself, as a code edit repeats the code: prompt lookup finds drafts."""
    chunk = ids(seed, 10)
    return chunk + ids(seed + 1, 4) + chunk + chunk[:5]


@pytest.mark.parametrize("settings", [SamplingSettings(), VARIED], ids=["greedy", "penalty"])
def test_a_reply_decoding_alone_speculates_and_gets_the_tokens_it_would_get_without(model, settings):
    prompt = echoing_prompt()
    with engine_with(model, speculate=True) as engine:
        with engine.conversation() as conversation:
            reply = engine.submit(prompt, settings, 40, conversation=conversation)
            out = list(reply)
            # the kept chat cache: the next turn reuses the row, whatever the rejected guesses left in it
            follow = prompt + out + ids(61, 3)
            second = engine.submit(follow, settings, 12, conversation=conversation)
            out2 = list(second)
    assert out == alone(model, prompt, 40, settings) and out2 == alone(model, follow, 12, settings)
    assert reply.stats.drafted > 0 and reply.stats.accepted > 0, reply.stats
    assert second.stats.reused_tokens == len(prompt) + len(out) - 1
    assert f"{reply.stats.accepted}/{reply.stats.drafted} guessed tokens kept" in reply.stats.line()
    assert reply.stats.decode_forwards == 39 - reply.stats.accepted  # 39 tokens after the prefill's
    assert len(reply.guessed) == reply.stats.accepted and 0 not in reply.guessed  # the first is the prefill's
    # the estimated speed-up prices each forward at the step runner's cost table (eager: CPU_VERIFY_COST)
    stats = reply.stats
    assert stats.decode_forwards < stats.decode_steps <= stats.decode_forwards * max(CPU_VERIFY_COST), stats
    assert f"est. {39 / stats.decode_steps:.2f}x a plain decode" in stats.line(), stats.line()


def test_the_speed_up_estimate_prices_each_forward_at_the_step_runners_cost(model):
    """One guess a round, priced at 2.5 steps for two tokens: every forward that carried a guess costs
    2.5, the plain ones (no room left for a guess) 1; the line says tokens per step's worth."""
    from qwen2.speculative import Draft, Drafter, Speculation

    class OneGuess(Drafter):
        def propose(self, context, max_tokens):
            return Draft([(context[-1] + 1) % 512][:max_tokens])

    engine = Engine(model, fast_decode="off")
    engine.steps.__class__ = type("PricedSteps", (type(engine.steps),), {"verify_cost": (1.0, 2.5, 2.5, 2.5)})
    reply = engine.submit(ids(64, 9), SamplingSettings(), 12)
    reply.speculation = Speculation(OneGuess(), gated=False)
    with engine:
        out = list(reply)
    stats = reply.stats
    assert out == alone(model, ids(64, 9), 12, SamplingSettings()) and stats.drafted > 0
    assert stats.decode_steps == 2.5 * stats.drafted + (stats.decode_forwards - stats.drafted), stats
    assert stats.speculation_speedup == 11 / stats.decode_steps
    assert f"est. {11 / stats.decode_steps:.2f}x a plain decode" in stats.line()


def test_rejected_guesses_are_rolled_back(model):
    """Guesses that are always wrong: each round keeps none, the model's own token is emitted, and the
    reply equals the plain one (the rejected keys in the row never reach a later token)."""
    from qwen2.speculative import Draft, Drafter, Speculation

    class WrongDrafter(Drafter):
        def propose(self, context, max_tokens):
            return Draft([(context[-1] + 1 + i) % 512 for i in range(max_tokens)])

    prompt = ids(62, 9)
    engine = Engine(model, fast_decode="off")  # not started: the reply waits while its drafter is swapped
    reply = engine.submit(prompt, VARIED, 16)
    reply.speculation = Speculation(WrongDrafter(), gated=False)
    with engine:
        out = list(reply)
    expected = alone(model, prompt, 16)
    assert out == expected and reply.stats.drafted > 0
    assert reply.stats.accepted == sum(1 for a, b in zip(out, out[1:]) if b == (a + 1) % 512)
    # each kept guess is the pending token + 1: the reply knows which of its tokens they are
    assert reply.guessed == [i for i in range(1, len(out)) if out[i] == (out[i - 1] + 1) % 512], reply.guessed


def test_who_speculates(model):
    """A reply decoding beside others takes the batched step; a seeded sampled reply never
    speculates (its seed must give the same reply whoever decodes beside it); a request may opt out."""
    seeded = SamplingSettings(temperature=1.0, top_k=50)
    with engine_with(model, speculate=True, rows=2) as engine:
        assert engine.submit(ids(63, 5), seeded, 2, seed=7).speculation is None
        assert engine.submit(ids(63, 5), seeded, 2).speculation is not None
        assert engine.submit(ids(63, 5), VARIED, 2, speculate=False).speculation is None
        out = engine.generate(echoing_prompt(), settings=seeded, max_new_tokens=12, seed=7)
    assert out == alone(model, echoing_prompt(), 12, seeded, seed=7)
    with engine_with(model, speculate=False) as engine:
        assert engine.submit(ids(63, 5), VARIED, 2).speculation is None
    # an engine that never speculates compiles no verification
    assert Engine(model, fast_decode="compile", compile_mode="default", speculate=False).steps.jobs == (1, 4)
    assert Engine(model, fast_decode="compile", compile_mode="default").steps.jobs == (1, 4, "verify")


def test_engine_chat_streams_the_plain_reply_keeps_the_row_and_stops_when_closed(model):
    """EngineChat (the terminal chat on the engine): its reply is plain decoding's; closing the
    stream early cancels the reply (Stop, Ctrl-C), and the next turn reuses the kept row."""
    from qwen2.chat import EngineChat

    engine = engine_with(model, speculate=True).start()
    chat = EngineChat(engine)
    prompt = ids(130, 30)
    assert list(chat.reply(prompt, 8, repetition_penalty=1.5)) == alone(model, prompt, 8)
    assert chat.stats.end == "length" and chat.limit == engine.row_tokens
    stream = chat.reply(prompt + ids(131, 5), 50, repetition_penalty=1.5)
    first = [next(stream) for _ in range(3)]
    stream.close()
    assert chat.stats.end == "cancelled" and chat.stats.new_tokens < 50 and chat.stats.reused_tokens == 30
    follow_up = prompt + ids(131, 5) + first + ids(132, 4)
    assert list(chat.reply(follow_up, 4, repetition_penalty=1.5)) == alone(model, follow_up, 4)
    assert chat.stats.reused_tokens >= len(prompt) + 5 + len(first) - 1
    engine.close()
