"""Speculative decoding (qwen2/speculative.py): DecodeSession.extend + rewind, the prompt-lookup
drafter's matching, greedy token identity with generate(), and sampled output that follows the
target's distribution (checked against exact probabilities, and shown to catch a wrong rule)."""

from __future__ import annotations

import copy
import itertools
import math

import pytest
import torch

import qwen2
from qwen2 import speculative
from qwen2.errors import ContextLengthError, GenerationError
from qwen2.generate import DecodeSession
from qwen2.sampling import SamplingSettings, process_logits
from qwen2.speculative import (Draft, Drafter, DraftGate, DraftModelDrafter, PromptLookupDrafter, speculative_generate,
                               verify_sampled)
from tests.helpers import make_checkpoint, rand_ids


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny matrices: on a busy 2-core machine two OpenMP threads wait on each other for longer than
    the products take (a 4-row forward of the tiny model went from 5 ms to 0.1 ms on one thread)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# Untied embeddings and a larger init than the shared tiny checkpoint: its greedy replies wander
# instead of repeating one token, so guesses are sometimes right and sometimes wrong.
VARIED = dict(with_tokenizer=False, tie_word_embeddings=False, initializer_range=0.1)


@pytest.fixture(scope="module")
def target(tmp_path_factory):
    return qwen2.load_model(make_checkpoint(tmp_path_factory.mktemp("spec-target"), seed=0, **VARIED),
                            dtype="float32")


@pytest.fixture(scope="module")
def other(tmp_path_factory):
    """The same shape with other weights (another seed): a draft model that is nearly always wrong."""
    return qwen2.load_model(make_checkpoint(tmp_path_factory.mktemp("spec-other"), seed=1, **VARIED),
                            dtype="float32")


@pytest.fixture(scope="module")
def noisy(target):
    """The target with its weights perturbed by ~5 %: a draft model that is right about half the time."""
    model = copy.deepcopy(target)
    generator = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for param in model.parameters():
            param.add_(torch.randn(param.shape, generator=generator) * 0.05 * param.abs().mean())
    return model


@pytest.fixture(scope="module")
def small_vocab(tmp_path_factory):
    """Two 4-token-vocab models (target, draft): a distribution small enough to count."""
    dirs = [make_checkpoint(tmp_path_factory.mktemp(f"vocab4-{s}"), seed=s, vocab_size=4, with_tokenizer=False)
            for s in (0, 1)]
    return [qwen2.load_model(d, dtype="float32") for d in dirs]


def repeated_prompt():
    chunk = rand_ids(11, (1, 12))
    return torch.cat([chunk, rand_ids(12, (1, 5)), chunk, chunk[:, :6]], dim=1)


PROMPTS = {"repeated": repeated_prompt, "random": lambda: rand_ids(13, (1, 20))}


class ReplayDrafter(Drafter):
    """Guesses a fixed script of tokens (each guess after the context's last token), right or wrong."""

    def __init__(self, script, max_draft=3):
        self.script, self.max_draft = list(script), max_draft

    def start(self, prompt, max_len, settings, generator, vocab_size):
        self.prompt_len = len(prompt)

    def propose(self, context, max_tokens):
        done = len(context) - self.prompt_len
        return Draft(self.script[done:done + min(max_tokens, self.max_draft)])


# ----------------------------------------------------------------------------- extend and rewind


def test_extend_returns_every_positions_logits_and_rewinds(target):
    ids = rand_ids(1, (1, 18))
    full = target(ids)[0]  # (18, V)
    session = DecodeSession(target, 1, 24)
    torch.testing.assert_close(session.prefill(ids[:, :6]), full[None, 5], atol=1e-4, rtol=0)
    out = session.extend(ids[:, 6:12])
    assert out.shape == (1, 6, target.config.vocab_size) and session.length == 12
    torch.testing.assert_close(out[0], full[6:12], atol=1e-4, rtol=0)
    # reject the last three: keep 9 tokens, then feed different ones and compare with a fresh run
    session.rewind(9)
    other = torch.cat([ids[:, :9], rand_ids(2, (1, 5))], dim=1)
    torch.testing.assert_close(session.extend(other[:, 9:])[0], target(other)[0, 9:], atol=1e-4, rtol=0)
    session.rewind(11)
    torch.testing.assert_close(session.step(ids[:, 0]), target(torch.cat([other[:, :11], ids[:, :1]], 1))[:, -1],
                               atol=1e-4, rtol=0)
    with pytest.raises(ContextLengthError):
        session.extend(rand_ids(3, (1, 13)))


@pytest.mark.parametrize("name", ["lookup", "draft_model", "wrong_guesses"])
def test_rolled_back_cache_equals_a_plain_runs(target, other, noisy, name):
    """After a speculative reply the cache holds exactly prompt + reply: the next logits equal a fresh
    full forward (checked by running the loop's own calls on a session we keep)."""
    prompt = PROMPTS["random"]()
    drafter = drafters(target, other, noisy)[name]()
    stream = speculative_generate(target, prompt, drafter, max_new_tokens=40, stop_token_ids=[], gated=False)
    reply = list(stream)
    assert stream.stats.drafted > stream.stats.accepted  # rejections happened, and rollbacks
    session = DecodeSession(target, 1, 80)
    session.prefill(prompt)
    drafter.start(prompt[0].tolist(), 80, SamplingSettings(), None, target.config.vocab_size)
    context, pending = prompt[0].tolist() + reply[:1], reply[0]
    while len(context) < prompt.shape[1] + len(reply):
        room = prompt.shape[1] + len(reply) - len(context) - 1
        guess = drafter.propose(context, room).tokens[:room] if room > 0 else []
        logits = session.extend(torch.tensor([[pending] + guess]))[0]
        kept = 0
        while kept < len(guess) and int(logits[kept].argmax()) == guess[kept]:
            kept += 1
        session.rewind(session.length - (len(guess) - kept))
        context += guess[:kept] + [int(logits[kept].argmax())]
        pending = context[-1]
    drafter.close()
    assert context == prompt[0].tolist() + reply
    fed = torch.tensor([context[:-1]])
    assert session.length == fed.shape[1]
    torch.testing.assert_close(session.step(torch.tensor([pending])), target(torch.tensor([context]))[:, -1],
                               atol=1e-4, rtol=0)


# ----------------------------------------------------------------------------- prompt lookup


def test_lookup_prefers_the_longest_ngram():
    tokens = [7, 2, 3, 4, 5, 8, 3, 6, 1, 2, 3]  # [2, 3] occurred at 1 (-> 4, 5, ...); [3] last at 6 (-> 6)
    assert PromptLookupDrafter(max_draft=3).lookup(tokens) == [4, 5, 8]
    assert PromptLookupDrafter(max_ngram=1, max_draft=3).lookup(tokens) == [6, 1, 2]


def test_lookup_takes_the_most_recent_match_and_caps_the_draft():
    tokens = [1, 2, 10, 11, 1, 2, 20, 21, 1, 2]
    assert PromptLookupDrafter(max_draft=2).lookup(tokens) == [20, 21]
    assert PromptLookupDrafter(max_draft=8).lookup(tokens, max_tokens=3) == [20, 21, 1]
    assert PromptLookupDrafter().propose(tokens, 1).tokens == [20]
    assert PromptLookupDrafter().lookup(tokens, max_tokens=0) == []


def test_lookup_without_a_match_or_below_min_ngram_proposes_nothing():
    assert PromptLookupDrafter().lookup([1, 2, 3, 4]) == []
    assert PromptLookupDrafter().lookup([5]) == []
    assert PromptLookupDrafter().lookup([]) == []
    tokens = [9, 4, 1, 2, 5]  # only a 1-gram ([2]? no: [5] never occurred; [2, 5] neither)
    assert PromptLookupDrafter().lookup(tokens) == []
    tokens = [9, 5, 1, 2, 5]  # [5] occurred at 1
    assert PromptLookupDrafter(max_draft=2).lookup(tokens) == [1, 2]
    assert PromptLookupDrafter(min_ngram=2).lookup(tokens) == []


def test_lookup_copies_through_a_periodic_tail():
    # the match at 1 ([6, 5, 6]) is followed by only two tokens: the copy runs on into its own output
    assert PromptLookupDrafter(max_draft=5).lookup([5, 6, 5, 6, 5, 6]) == [5, 6, 5, 6, 5]
    assert PromptLookupDrafter(max_draft=4).lookup([3, 3]) == [3, 3, 3, 3]


def scan_for_match(tokens, max_ngram, min_ngram, limit):
    """The lookup's definition, as a plain backwards scan: the longest tail n-gram with an earlier
    occurrence, its most recent one, and what followed it (copying on into the draft)."""
    length = len(tokens)
    for n in range(min(max_ngram, length - 1), min_ngram - 1, -1):
        for start in range(length - n - 1, -1, -1):
            if tokens[start:start + n] == tokens[length - n:]:
                out = []
                for i in range(limit):
                    pos = start + n + i
                    out.append(tokens[pos] if pos < length else out[pos - length])
                return n, out
    return 0, []


@pytest.mark.parametrize("max_ngram, min_ngram", [(3, 1), (4, 2), (1, 1)])
def test_lookup_index_finds_what_a_scan_of_the_context_finds(max_ngram, min_ngram):
    # One drafter through growing replies, a rewritten history, a shorter context and a new reply:
    # its index must never answer from tokens that are no longer there.
    gen = torch.Generator().manual_seed(max_ngram * 10 + min_ngram)
    drafter = PromptLookupDrafter(max_ngram=max_ngram, min_ngram=min_ngram, max_draft=6)
    tokens, checked, found = [], 0, 0
    for round_ in range(600):
        action = torch.randint(0, 20, (1,), generator=gen).item()
        if action == 0:
            tokens = torch.randint(0, 6, (int(torch.randint(0, 30, (1,), generator=gen)),), generator=gen).tolist()
        elif action == 1 and tokens:
            tokens = tokens[:int(torch.randint(0, len(tokens), (1,), generator=gen))]
        elif action == 2 and len(tokens) > 3:
            tokens = tokens[:-3] + [(tokens[-3] + 1) % 6] + tokens[-2:]  # same length, a token changed
        else:
            tokens = tokens + torch.randint(0, 6, (int(torch.randint(1, 4, (1,), generator=gen)),), generator=gen).tolist()
        limit = int(torch.randint(0, 7, (1,), generator=gen))
        expected = scan_for_match(tokens, max_ngram, min_ngram, limit) if limit > 0 else (0, [])
        assert drafter.match(list(tokens), limit) == expected, (round_, tokens, limit)
        checked, found = checked + 1, found + bool(expected[1])
    assert found > 100 and checked - found > 20  # both outcomes were exercised


def test_drafter_arguments_are_checked(other):
    for kwargs in ({"max_ngram": 0}, {"min_ngram": 3, "max_ngram": 2}, {"max_draft": 0}, {"max_draft": True}):
        with pytest.raises(GenerationError):
            PromptLookupDrafter(**kwargs)
    with pytest.raises(GenerationError):
        DraftModelDrafter(other, max_draft=0)


def test_a_draft_model_with_another_vocab_is_refused(target, small_vocab):
    with pytest.raises(GenerationError, match="vocab"):
        list(speculative_generate(target, rand_ids(0, (1, 5)), DraftModelDrafter(small_vocab[0]), max_new_tokens=4))


# ----------------------------------------------------------------------------- greedy: token identity


def drafters(target, other, noisy):
    return {"lookup": lambda: PromptLookupDrafter(),
            "lookup_long": lambda: PromptLookupDrafter(max_ngram=4, min_ngram=2, max_draft=12),
            "draft_model": lambda: DraftModelDrafter(noisy, max_draft=3),
            "other_model": lambda: DraftModelDrafter(other, max_draft=2),
            "self_draft": lambda: DraftModelDrafter(target, max_draft=5),  # every guess right
            "wrong_guesses": lambda: ReplayDrafter([(7 * i) % 512 for i in range(300)])}


@pytest.mark.parametrize("gated", [True, False], ids=["gated", "every-draft"])
@pytest.mark.parametrize("prompt_name", sorted(PROMPTS))
@pytest.mark.parametrize("drafter_name", ["lookup", "lookup_long", "draft_model", "other_model", "self_draft",
                                          "wrong_guesses"])
def test_greedy_equals_generate(target, other, noisy, prompt_name, drafter_name, gated):
    prompt = PROMPTS[prompt_name]()
    expected = list(qwen2.generate(target, prompt, max_new_tokens=48, stop_token_ids=[]))
    stream = speculative_generate(target, prompt, drafters(target, other, noisy)[drafter_name](), max_new_tokens=48,
                                  stop_token_ids=[], gated=gated)
    assert list(stream) == expected
    stats = stream.stats
    assert stats.tokens == 48 and stats.accepted <= stats.drafted
    assert stats.forwards == 48 - stats.accepted  # each forward: its kept guesses plus one token
    if drafter_name == "self_draft":
        assert stats.accepted == stats.drafted > 0


def test_greedy_with_a_repetition_penalty_equals_generate(target, noisy):
    prompt = repeated_prompt()
    for penalty in (1.3, 0.8):
        expected = list(qwen2.generate(target, prompt, max_new_tokens=40, repetition_penalty=penalty,
                                       stop_token_ids=[]))
        for drafter in (PromptLookupDrafter(), DraftModelDrafter(noisy, max_draft=3),
                        ReplayDrafter(expected)):  # the right tokens: only the penalty's seen set can stop them
            stream = speculative_generate(target, prompt, drafter, max_new_tokens=40,
                                          repetition_penalty=penalty, stop_token_ids=[], gated=False)
            assert list(stream) == expected


def test_stop_tokens_end_the_reply_inside_an_accepted_run(target):
    prompt = rand_ids(13, (1, 20))
    free = list(qwen2.generate(target, prompt, max_new_tokens=40, stop_token_ids=[]))
    for at in (0, 1, 5, 17):
        stop = [free[at]]
        expected = list(qwen2.generate(target, prompt, max_new_tokens=40, stop_token_ids=stop))
        assert len(expected) == free.index(free[at])
        for drafter in (PromptLookupDrafter(), DraftModelDrafter(target, max_draft=6), ReplayDrafter(free, 6)):
            stream = speculative_generate(target, prompt, drafter, max_new_tokens=40, stop_token_ids=stop, gated=False)
            assert list(stream) == expected


def test_default_stop_ids_are_generates(tiny_model_dir):
    """Without stop_token_ids, the model's eos ids end the reply, as in generate."""
    model = qwen2.load_model(tiny_model_dir, dtype="float32")
    for prompt in (rand_ids(13, (1, 20)), repeated_prompt()):
        expected = list(qwen2.generate(model, prompt, max_new_tokens=30))
        assert list(speculative_generate(model, prompt, max_new_tokens=30)) == expected


@pytest.mark.parametrize("max_new", [1, 2, 3, 9])
def test_max_new_tokens_is_respected(target, max_new):
    prompt = repeated_prompt()
    expected = list(qwen2.generate(target, prompt, max_new_tokens=max_new, stop_token_ids=[]))
    stream = speculative_generate(target, prompt, DraftModelDrafter(target, max_draft=8), max_new_tokens=max_new,
                                  stop_token_ids=[], gated=False)
    assert list(stream) == expected and len(expected) == max_new


def test_at_the_context_limit(target, noisy):
    limit = target.config.max_position_embeddings  # 256
    prompt = torch.cat([repeated_prompt()] * 8, dim=1)[:, :limit - 30]
    assert prompt.shape[1] + 30 == limit
    expected = list(qwen2.generate(target, prompt, max_new_tokens=30, stop_token_ids=[]))
    for drafter in (PromptLookupDrafter(max_draft=16), DraftModelDrafter(noisy, max_draft=8)):
        assert list(speculative_generate(target, prompt, drafter, max_new_tokens=30, stop_token_ids=[], gated=False)) == expected
    with pytest.raises(ContextLengthError):
        speculative_generate(target, prompt, max_new_tokens=31)
    with pytest.raises(GenerationError):
        speculative_generate(target, prompt, max_new_tokens=0)
    with pytest.raises(GenerationError):
        speculative_generate(target, prompt, max_new_tokens=4, seed=-1)


# ----------------------------------------------------------------------------- sampling: the distribution


def chi_square(counts: dict, probs: dict, n: int) -> tuple[float, int]:
    """Pearson's statistic over the cells (those expecting < 5 pooled into one) and its degrees of
    freedom; a count in a cell of probability 0 makes it infinite."""
    if any(probs.get(cell, 0.0) == 0.0 for cell in counts):
        return math.inf, 1
    stat, cells, pool_e, pool_o = 0.0, 0, 0.0, 0
    for cell, p in probs.items():
        e, o = p * n, counts.get(cell, 0)
        if e < 5:
            pool_e, pool_o = pool_e + e, pool_o + o
        else:
            stat, cells = stat + (o - e) ** 2 / e, cells + 1
    if pool_e > 0:
        stat, cells = stat + (pool_o - pool_e) ** 2 / pool_e, cells + 1
    return stat, max(cells - 1, 1)


def critical(df: int, z: float = 4.0) -> float:
    """The chi-square quantile at the normal's z (4.0: p ~ 3e-5), by Wilson and Hilferty."""
    a = 2 / (9 * df)
    return df * (1 - a + z * math.sqrt(a)) ** 3


def fails(counts, probs, n) -> bool:
    stat, df = chi_square(counts, probs, n)
    return stat > critical(df)


P = torch.tensor([[0.5, 0.25, 0.15, 0.1, 0.0], [0.05, 0.05, 0.1, 0.2, 0.6], [0.3, 0.3, 0.2, 0.1, 0.1]])
Q = torch.tensor([[0.1, 0.2, 0.3, 0.2, 0.2], [0.4, 0.0, 0.2, 0.2, 0.2]])


def always_accept(p, guess, q, generator):
    return len(guess), int(torch.multinomial(p[len(guess)], 1, generator=generator))


def resample_from_p(p, guess, q, generator):
    """Accepts right, but draws a rejected position's token from p rather than the residual."""
    kept, token = verify_sampled(p, guess, q, generator)
    if kept < len(guess):
        token = int(torch.multinomial(p[kept], 1, generator=generator))
    return kept, token


def emitted(rule, q, n, seed=0):
    """Counts of the first two tokens a verification emits, the guesses drawn from q (point masses on
    token 3 then 4 when q is None)."""
    generator = torch.Generator().manual_seed(seed)
    counts = {}
    for _ in range(n):
        guess = [3, 4] if q is None else [int(torch.multinomial(q[i], 1, generator=generator)) for i in range(2)]
        kept, token = rule(P, guess, q, generator)
        first = guess[0] if kept >= 1 else token
        counts[first] = counts.get(first, 0) + 1
        if kept >= 1:  # the second token, given the first was guess[0]
            second = guess[1] if kept >= 2 else token
            counts[(guess[0], second)] = counts.get((guess[0], second), 0) + 1
    return counts


@pytest.mark.parametrize("with_q", [False, True])
def test_verify_sampled_emits_the_targets_distribution(with_q):
    q = Q if with_q else None
    n = 4000
    counts = emitted(verify_sampled, q, n)
    first = {x: float(P[0, x]) for x in range(5)}
    assert not fails({k: v for k, v in counts.items() if isinstance(k, int)}, first, n)
    # the second token after an accepted first guess (3 for point masses) follows P[1]
    g0 = 3 if q is None else max((k for k in counts if isinstance(k, tuple)), key=counts.get)[0]
    seconds = {k[1]: v for k, v in counts.items() if isinstance(k, tuple) and k[0] == g0}
    assert not fails(seconds, {x: float(P[1, x]) for x in range(5)}, sum(seconds.values()))
    for wrong in (always_accept, resample_from_p):  # the same check catches a wrong rule
        bad = emitted(wrong, q, n)
        assert fails({k: v for k, v in bad.items() if isinstance(k, int)}, first, n)


def exact_sequence_probs(model, prompt: list[int], steps: int, settings: SamplingSettings) -> dict:
    """P(first `steps` new tokens), sequential sampling's own law: process_logits at each position
    with the penalty's seen set = prompt + the tokens before."""
    vocab = model.config.vocab_size
    probs = {}
    for seq in itertools.product(range(vocab), repeat=steps):
        ids = torch.tensor([prompt + list(seq[:-1])])
        logits = model(ids)[0, len(prompt) - 1:]  # (steps, V)
        p = 1.0
        for i, token in enumerate(seq):
            seen = torch.zeros(1, vocab, dtype=torch.bool)
            seen[0, prompt + list(seq[:i])] = True
            dist = process_logits(logits[i:i + 1], settings, seen).softmax(-1)[0]
            p *= float(dist[token])
        probs[seq] = p
    return probs


def sampled_counts(model, prompt, make_drafter, settings, n, steps):
    counts = {}
    for seed in range(n):
        stream = speculative_generate(model, torch.tensor([prompt]), make_drafter(), max_new_tokens=steps,
                                      stop_token_ids=[], seed=seed, temperature=settings.temperature, gated=False,
                                      top_k=settings.top_k, repetition_penalty=settings.repetition_penalty)
        seq = tuple(stream)
        counts[seq] = counts.get(seq, 0) + 1
    return counts


SETTINGS = SamplingSettings(temperature=0.5, top_k=3, repetition_penalty=1.3)
SMALL_PROMPT = [0, 1, 2, 3, 1, 2, 0, 1]


@pytest.mark.parametrize("drafter_name", ["lookup", "draft_model"])
def test_sampled_replies_follow_the_targets_distribution(small_vocab, drafter_name):
    """The first 3 sampled tokens (64 sequences) against their exact probabilities: the first comes
    from the prefill, the others from verifications (accepted guesses, residual draws, bonus draws)."""
    model, draft = small_vocab
    make = (lambda: PromptLookupDrafter(max_draft=2)) if drafter_name == "lookup" else \
        (lambda: DraftModelDrafter(draft, max_draft=2))
    probs = exact_sequence_probs(model, SMALL_PROMPT, 3, SETTINGS)
    n = 600
    counts = sampled_counts(model, SMALL_PROMPT, make, SETTINGS, n, 3)
    stat, df = chi_square(counts, probs, n)
    assert stat < critical(df), (stat, df)


@pytest.mark.parametrize("wrong", [always_accept, resample_from_p])
def test_the_distribution_check_catches_a_wrong_rule(small_vocab, monkeypatch, wrong):
    model, _ = small_vocab
    probs = exact_sequence_probs(model, SMALL_PROMPT, 3, SETTINGS)
    monkeypatch.setattr(speculative, "verify_sampled", wrong)
    n = 600
    counts = sampled_counts(model, SMALL_PROMPT, lambda: PromptLookupDrafter(max_draft=2), SETTINGS, n, 3)
    assert fails(counts, probs, n)


def test_sampling_is_repeatable_with_a_seed(target, noisy):
    prompt = repeated_prompt()
    runs = [list(speculative_generate(target, prompt, DraftModelDrafter(noisy, max_draft=3), max_new_tokens=24,
                                      temperature=0.9, top_p=0.9, seed=5, stop_token_ids=[])) for _ in range(2)]
    assert runs[0] == runs[1] and len(runs[0]) == 24


# ----------------------------------------------------------------------------- the draft gate


def test_gate_verifies_what_pays_and_nothing_that_does_not():
    gate = DraftGate(verify_cost=(1.0, 1.84, 2.1, 2.35, 2.35, 2.35, 2.35, 2.35, 2.68))
    gate.rates = {1: 0.05, 3: 0.95}
    assert gate.length(1, 8) == 0  # 1.05 tokens for 1.84 steps: a plain step is better
    assert gate.length(1, 8, at_least=1) == 1
    assert gate.length(3, 8) == 7  # 6.7 tokens for 2.35 steps beats 7.0 for 2.68 (the ninth row's jump)
    assert gate.length(3, 4) == 4
    assert gate.length(3, 0) == 0
    flat = DraftGate(verify_cost=(1.0,))  # a GPU-like cost: guesses are free to verify
    flat.rates = {0: 0.05}
    assert flat.length(0, 5) == 5


def test_gate_learns_from_hits_and_misses():
    gate = DraftGate(prior=0.5, memory=0.8)
    for _ in range(10):
        gate.observe(2, 0, True)
    assert gate.rates[2] < 0.1 and gate.length(2, 8) == 0
    for _ in range(4):
        gate.observe(2, 8, False)
    assert gate.rates[2] > 0.9 and gate.length(2, 8) >= 7
    assert gate.rates.get(1) is None  # kinds are apart


@pytest.mark.parametrize("bad", [dict(verify_cost=()), dict(verify_cost=(1, 0)), dict(prior=1.5), dict(memory=1.0)])
def test_gate_arguments_are_checked(bad):
    with pytest.raises(GenerationError, match="DraftGate"):
        DraftGate(**bad)


class FreeReplayDrafter(ReplayDrafter):
    free_guesses = True


def test_gated_free_drafter_stops_verifying_wrong_guesses_and_runs_long_on_right_ones(target):
    prompt = rand_ids(13, (1, 20))
    expected = list(qwen2.generate(target, prompt, max_new_tokens=64, stop_token_ids=[]))
    wrong = [(t + 1) % 512 for t in expected]
    for gated in (False, True):
        stream = speculative_generate(target, prompt, FreeReplayDrafter(wrong, max_draft=4), max_new_tokens=64,
                                      stop_token_ids=[], gated=gated)
        assert list(stream) == expected
        if gated:
            assert stream.stats.drafted <= 2  # the prior's first tries, then checked unverified
        else:
            assert stream.stats.drafted > 60
    right = speculative_generate(target, prompt, FreeReplayDrafter(expected, max_draft=8), max_new_tokens=64,
                                 stop_token_ids=[])
    assert list(right) == expected
    assert right.stats.accepted == right.stats.drafted and right.stats.forwards <= 12


# ----------------------------------------------------------------------------- python -m qwen2 --speculate


def test_cli_speculate_lookup_gives_the_same_reply_and_counts(tiny_model_dir, capsys):
    """--speculate lookup runs the chat on the serving engine (here its eager steps), whose reply
    is plain decoding's and whose statistics count the guesses kept."""
    from qwen2.__main__ import main

    base = ["--model", str(tiny_model_dir), "--prompt", "hello hello hello", "--max-new-tokens", "12",
            "--temperature", "0", "--fast-decode", "off"]
    assert main(base + ["--speculate", "off"]) == 0
    plain = capsys.readouterr().out
    assert main(base + ["--speculate", "lookup"]) == 0
    fast = capsys.readouterr().out
    assert "guessed tokens kept" not in plain and "guessed tokens kept" in fast, fast
    reply = lambda out: out.rsplit("\n[", 1)[0]  # noqa: E731  the text before the stats line
    assert reply(fast) == reply(plain)
    assert " new token" in fast.rsplit("\n[", 1)[1]


def test_the_gate_takes_new_prices_and_refuses_bad_ones():
    """The engine reprices its replies' gates every round from the step runner's timings: a cheap
    verification lets a doubtful guess through that a dear one keeps out."""
    gate = DraftGate(verify_cost=(1.0, 1.8, 1.8, 1.8))
    gate.rates[1] = 0.3
    assert gate.length(1, 3) == 0  # 1.0 + 0.3 + ... tokens for 1.8 steps: a loss
    gate.reprice((1.0, 1.1, 1.1, 1.1))
    assert gate.length(1, 3) == 3
    with pytest.raises(GenerationError, match="verify_cost"):
        gate.reprice((1.0, 0.0))
