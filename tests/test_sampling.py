"""qwen2.sampling: each processor by hand, the order they run in, against transformers' processors,
the Sampler (seeds, greedy, the seen-token mask, draw frequencies), and bad settings -- including
through qwen2.generate, after which the model must still generate as before."""

from __future__ import annotations

import itertools
import math

import pytest
import torch

import qwen2
from qwen2.errors import ContextLengthError, GenerationError
from qwen2.sampling import (Sampler, SamplingSettings, apply_min_p, apply_repetition_penalty, apply_top_k,
                            apply_top_p, process_logits)

INF = math.inf


def logits_of(probs) -> torch.Tensor:
    """(1, V) logits whose softmax is `probs`."""
    return torch.tensor([probs], dtype=torch.float32).log()


def kept(logits: torch.Tensor) -> list[int]:
    """Indices of the tokens that survived filtering (finite logits), for a single row."""
    assert logits.shape[0] == 1
    return torch.isfinite(logits[0]).nonzero().flatten().tolist()


def settings(**kw) -> SamplingSettings:
    return SamplingSettings(**{"temperature": 1.0, **kw})


# ---- repetition penalty -------------------------------------------------------------------


def test_repetition_penalty_divides_positive_multiplies_negative_only_seen():
    logits = torch.tensor([[2.0, -1.0, 0.5, -3.0, 4.0, 0.0]])
    seen = torch.tensor([[True, True, False, True, False, True]])
    out = apply_repetition_penalty(logits, seen, 2.0)
    assert out.tolist() == [[1.0, -2.0, 0.5, -6.0, 4.0, 0.0]]
    # a penalty below 1 rewards repetition, the same arithmetic the other way
    out = apply_repetition_penalty(logits, seen, 0.5)
    assert out.tolist() == [[4.0, -0.5, 0.5, -1.5, 4.0, 0.0]]
    # 1.0 is off
    assert torch.equal(apply_repetition_penalty(logits, seen, 1.0), logits)


def test_repetition_penalty_rows_are_independent():
    logits = torch.tensor([[1.0, 1.0], [1.0, 1.0]])
    seen = torch.tensor([[True, False], [False, True]])
    assert apply_repetition_penalty(logits, seen, 4.0).tolist() == [[0.25, 1.0], [1.0, 0.25]]


# ---- temperature --------------------------------------------------------------------------


def test_temperature_divides_the_logits():
    logits = torch.tensor([[1.0, -2.0, 0.5]])
    assert process_logits(logits, settings(temperature=0.5)).tolist() == [[2.0, -4.0, 1.0]]
    assert process_logits(logits, settings(temperature=2.0)).tolist() == [[0.5, -1.0, 0.25]]
    # temperature 0 is greedy: the logits are not scaled (argmax is taken later)
    assert torch.equal(process_logits(logits, SamplingSettings(temperature=0.0)), logits)


# ---- top-k --------------------------------------------------------------------------------


def test_top_k_keeps_the_k_largest():
    logits = torch.tensor([[1.0, 4.0, 3.0, 2.0, 0.0]])
    assert kept(apply_top_k(logits, 1)) == [1]
    assert kept(apply_top_k(logits, 2)) == [1, 2]
    assert kept(apply_top_k(logits, 3)) == [1, 2, 3]
    out = apply_top_k(logits, 2)
    assert out[0, 1] == 4.0 and out[0, 2] == 3.0  # kept values unchanged
    assert out[0, 0] == -INF and out[0, 4] == -INF


def test_top_k_keeps_ties_with_the_kth():
    logits = torch.tensor([[5.0, 2.0, 2.0, 2.0, 1.0]])
    assert kept(apply_top_k(logits, 2)) == [0, 1, 2, 3]  # all three 2.0s tie for 2nd place
    assert kept(apply_top_k(logits, 4)) == [0, 1, 2, 3]
    assert kept(apply_top_k(logits, 1)) == [0]


def test_top_k_zero_or_beyond_vocab_is_off():
    logits = torch.tensor([[1.0, 4.0, 3.0]])
    assert torch.equal(apply_top_k(logits, 0), logits)
    assert torch.equal(apply_top_k(logits, 3), logits)
    assert torch.equal(apply_top_k(logits, 10), logits)


# ---- top-p --------------------------------------------------------------------------------


@pytest.mark.parametrize("p, expected", [
    (0.4, [0]),  # 0.5 alone reaches 0.4
    (0.75, [0, 1]),  # 0.5 + 0.3 = 0.8 is the smallest set reaching 0.75
    (0.85, [0, 1, 2]),  # 0.95
    (0.99, [0, 1, 2, 3]),
    (1e-9, [0]),  # at least one token, always
    (1.0, [0, 1, 2, 3]),  # off
])
def test_top_p_keeps_the_smallest_set_reaching_p(p, expected):
    # deliberately not sorted in the vocab, to check the scatter back to vocab order
    probs = [0.3, 0.05, 0.5, 0.15]
    order = {2: 0, 0: 1, 3: 2, 1: 3}  # vocab index -> rank
    got = kept(apply_top_p(logits_of(probs), p))
    assert sorted(order[i] for i in got) == expected


def test_top_p_keeps_one_token_even_when_it_is_nearly_certain():
    logits = torch.tensor([[30.0, 0.0, 0.0, 0.0]])  # top prob ~1 - 3e-13
    assert kept(apply_top_p(logits, 0.5)) == [0]
    assert kept(apply_top_p(logits, 1e-6)) == [0]


def test_top_p_ignores_already_filtered_tokens_and_works_per_row():
    logits = torch.cat([logits_of([0.5, 0.3, 0.15, 0.05]), logits_of([0.1, 0.12, 0.28, 0.5])])
    logits[0, 3] = -INF  # filtered earlier (e.g. by top-k): the rest renormalise to 0.526, 0.316, 0.158
    out = apply_top_p(logits, 0.8)
    assert torch.isfinite(out[0]).tolist() == [True, True, False, False]  # 0.526 + 0.316 = 0.84 >= 0.8
    assert torch.isfinite(out[1]).tolist() == [False, True, True, True]  # 0.5 + 0.28 < 0.8; + 0.12 = 0.9


# ---- min-p --------------------------------------------------------------------------------


def test_min_p_is_relative_to_the_top_probability():
    probs = [0.5, 0.3, 0.15, 0.05]
    assert kept(apply_min_p(logits_of(probs), 0.2)) == [0, 1, 2]  # threshold 0.1
    assert kept(apply_min_p(logits_of(probs), 0.5)) == [0, 1]  # threshold 0.25
    assert kept(apply_min_p(logits_of(probs), 0.9)) == [0]  # threshold 0.45
    # relative, not absolute: 0.7 * 0.4 = 0.28 keeps 0.35 (an absolute 0.7 would keep only the top)
    assert kept(apply_min_p(logits_of([0.4, 0.35, 0.25]), 0.7)) == [0, 1]
    assert torch.equal(apply_min_p(logits_of(probs), 0.0), logits_of(probs))


def test_min_p_never_drops_the_top_token():
    logits = torch.tensor([[0.0, 0.0, 0.0, 0.0]])  # all tie at the top
    assert kept(apply_min_p(logits, 0.99)) == [0, 1, 2, 3]


# ---- the order: penalty, temperature, top-k, top-p, min-p ---------------------------------


def reference_chain(logits, seen_ids, s: SamplingSettings, order):
    """transformers' processors applied in `order` (a permutation of the five names)."""
    from transformers import (MinPLogitsWarper, RepetitionPenaltyLogitsProcessor, TemperatureLogitsWarper,
                              TopKLogitsWarper, TopPLogitsWarper)

    steps = {
        "penalty": RepetitionPenaltyLogitsProcessor(float(s.repetition_penalty)) if s.repetition_penalty != 1 else None,
        "temperature": TemperatureLogitsWarper(float(s.temperature)) if s.temperature != 1 else None,
        "top_k": TopKLogitsWarper(s.top_k) if s.top_k > 0 else None,
        "top_p": TopPLogitsWarper(s.top_p) if s.top_p < 1 else None,
        "min_p": MinPLogitsWarper(s.min_p) if s.min_p > 0 else None,
    }
    out = logits.clone()
    for name in order:
        if steps[name] is not None:
            out = steps[name](seen_ids, out)
    return out


OURS = ("penalty", "temperature", "top_k", "top_p", "min_p")


@pytest.mark.parametrize("logits, seen, s, ours, other, other_order", [
    # penalty before top-k: the seen favourite falls below token 1
    ([3.0, 2.5, 0.0], [0], settings(repetition_penalty=2.0, top_k=1), [1], [0],
     ("top_k", "penalty", "temperature", "top_p", "min_p")),
    # temperature before top-p: at T=0.5 the top token alone has 0.87 >= 0.8
    ([2.0, 1.0, 0.0], [], settings(temperature=0.5, top_p=0.8), [0], [0, 1],
     ("top_p", "temperature", "penalty", "top_k", "min_p")),
    # top-k before top-p: after keeping 2 tokens they renormalise to 0.57 / 0.43
    (torch.tensor([0.4, 0.3, 0.2, 0.1]).log().tolist(), [], settings(top_k=2, top_p=0.55), [0], [0, 1],
     ("penalty", "temperature", "top_p", "top_k", "min_p")),
    # top-p before min-p: min-p first would renormalise 0.4/0.3/0.2 and let top-p cut 0.2 too
    (torch.tensor([0.4, 0.3, 0.2, 0.1]).log().tolist(), [], settings(top_p=0.75, min_p=0.3), [0, 1, 2], [0, 1],
     ("penalty", "temperature", "top_k", "min_p", "top_p")),
], ids=["penalty<top_k", "temperature<top_p", "top_k<top_p", "top_p<min_p"])
def test_processor_order_matters_and_ours_is_the_documented_one(logits, seen, s, ours, other, other_order):
    pytest.importorskip("transformers", reason="transformers is the test oracle")
    x = torch.tensor([logits])
    seen_mask = torch.zeros_like(x, dtype=torch.bool)
    seen_mask[0, seen] = True
    seen_ids = torch.tensor([seen or [0]])  # the reference needs some ids; [0] is harmless without a penalty
    if not seen:
        assert s.repetition_penalty == 1.0
    got = process_logits(x, s, seen_mask)
    assert kept(got) == ours  # hand-computed
    torch.testing.assert_close(got, reference_chain(x, seen_ids, s, OURS))
    assert kept(reference_chain(x, seen_ids, s, other_order)) == other  # a different order differs


@pytest.mark.parametrize("seed", range(3))
def test_process_logits_equals_transformers_processors_on_random_logits(seed):
    pytest.importorskip("transformers", reason="transformers is the test oracle")
    gen = torch.Generator().manual_seed(seed)
    B, V = 4, 64
    logits = torch.randn(B, V, generator=gen) * 3
    seen_ids = torch.randint(0, V, (B, 12), generator=gen)
    seen = torch.zeros(B, V, dtype=torch.bool).scatter_(1, seen_ids, True)
    grid = itertools.product([1.0, 1.3, 0.7], [0.4, 1.0, 1.7], [0, 5, 20], [1.0, 0.9, 0.5], [0.0, 0.05, 0.3])
    for penalty, temperature, top_k, top_p, min_p in grid:
        s = SamplingSettings(temperature, top_k, top_p, min_p, penalty)
        got = process_logits(logits, s, seen if penalty != 1 else None)
        expected = reference_chain(logits, seen_ids, s, OURS)
        torch.testing.assert_close(got, expected, msg=f"{s}")
        assert (torch.isfinite(got).sum(-1) >= 1).all()


@pytest.mark.parametrize("name, ours, reference, arg", [
    ("top_k", apply_top_k, "TopKLogitsWarper", 7),
    ("top_p", apply_top_p, "TopPLogitsWarper", 0.6),
    ("min_p", apply_min_p, "MinPLogitsWarper", 0.1),
])
def test_each_processor_equals_its_reference(name, ours, reference, arg):
    transformers = pytest.importorskip("transformers", reason="transformers is the test oracle")
    ref = getattr(transformers, reference)(arg)
    for seed in range(5):
        logits = torch.randn(3, 100, generator=torch.Generator().manual_seed(seed)) * 4
        torch.testing.assert_close(ours(logits, arg), ref(torch.zeros(3, 1, dtype=torch.long), logits))


def test_repetition_penalty_equals_its_reference():
    transformers = pytest.importorskip("transformers", reason="transformers is the test oracle")
    for seed in range(5):
        gen = torch.Generator().manual_seed(seed)
        logits = torch.randn(3, 100, generator=gen) * 4
        ids = torch.randint(0, 100, (3, 30), generator=gen)
        seen = torch.zeros(3, 100, dtype=torch.bool).scatter_(1, ids, True)
        for penalty in (0.6, 1.2, 2.5):
            ref = transformers.RepetitionPenaltyLogitsProcessor(penalty)(ids, logits.clone())
            torch.testing.assert_close(apply_repetition_penalty(logits, seen, penalty), ref)


def test_temperature_equals_its_reference():
    transformers = pytest.importorskip("transformers", reason="transformers is the test oracle")
    logits = torch.randn(3, 100, generator=torch.Generator().manual_seed(0))
    for t in (0.3, 1.0, 1.9):
        ref = transformers.TemperatureLogitsWarper(t)(torch.zeros(3, 1, dtype=torch.long), logits.clone())
        torch.testing.assert_close(process_logits(logits, SamplingSettings(temperature=t)), ref)


# ---- the Sampler --------------------------------------------------------------------------


def draws(sampler: Sampler, logits: torch.Tensor, n: int) -> list[list[int]]:
    return [sampler(logits).tolist() for _ in range(n)]


def test_seeded_sampler_is_reproducible():
    s = settings(temperature=1.0, top_k=40, repetition_penalty=1.1)
    prompt = torch.tensor([[1, 2, 3], [4, 5, 6]])
    logits = torch.randn(2, 64, generator=torch.Generator().manual_seed(0))
    a = draws(Sampler(s, prompt, 64, seed=123), logits, 30)
    b = draws(Sampler(s, prompt, 64, seed=123), logits, 30)
    c = draws(Sampler(s, prompt, 64, seed=124), logits, 30)
    assert a == b
    assert a != c
    # the seed is the sampler's own generator: touching the global RNG in between changes nothing
    sampler = Sampler(s, prompt, 64, seed=123)
    mixed = []
    for _ in range(30):
        torch.rand(5)
        mixed.append(sampler(logits).tolist())
    assert mixed == a


def test_greedy_applies_the_penalty_then_argmax_and_tracks_what_it_picked():
    logits = torch.tensor([[1.0, 0.9, 0.8, -5.0]])
    prompt = torch.tensor([[3]])
    sampler = Sampler(SamplingSettings(temperature=0.0, repetition_penalty=2.0), prompt, 4)
    # step 1: nothing positive is seen -> 0; then 0 is halved (0.5) -> 1 (0.9); then 1 (0.45) -> 2 (0.8);
    # then all three are halved: 0.5, 0.45, 0.4 -> 0
    assert [int(sampler(logits)) for _ in range(4)] == [0, 1, 2, 0]
    # penalty off: always the argmax
    plain = Sampler(SamplingSettings(temperature=0.0), prompt, 4)
    assert [int(plain(logits)) for _ in range(3)] == [0, 0, 0]


def test_greedy_penalty_uses_the_prompt():
    logits = torch.tensor([[2.0, 1.5, 0.0]])
    sampler = Sampler(SamplingSettings(temperature=0.0, repetition_penalty=2.0), torch.tensor([[0, 0]]), 3)
    assert int(sampler(logits)) == 1  # 2.0 / 2 = 1.0 < 1.5


def test_padding_in_prompt_mask_marks_nothing_as_seen():
    prompt = torch.tensor([[0, 0, 5, 6], [7, 7, 7, 0]])
    mask = torch.tensor([[0, 0, 1, 1], [1, 1, 1, 1]])  # row 0 is left-padded with id 0; row 1 has a real 0
    sampler = Sampler(settings(repetition_penalty=1.5), prompt, 10, prompt_mask=mask)
    assert sampler.seen[0].nonzero().flatten().tolist() == [5, 6]
    assert sampler.seen[1].nonzero().flatten().tolist() == [0, 7]
    # without the mask the padding id counts
    unmasked = Sampler(settings(repetition_penalty=1.5), prompt, 10)
    assert unmasked.seen[0].nonzero().flatten().tolist() == [0, 5, 6]
    # and the penalty does act on the masked row's padding id only where it is real
    logits = torch.full((2, 10), 1.0)
    out = process_logits(logits, SamplingSettings(temperature=0.0, repetition_penalty=2.0), sampler.seen)
    assert out[0, 0] == 1.0 and out[1, 0] == 0.5


def chi_square(counts: torch.Tensor, probs: torch.Tensor) -> float:
    n = counts.sum()
    expected = probs * n
    mask = probs > 0
    return float((((counts - expected) ** 2)[mask] / expected[mask]).sum())


@pytest.mark.parametrize("s, expected", [
    # plain: the softmax itself
    (settings(), [0.5, 0.25, 0.15, 0.10]),
    # top-k 3 drops the 0.10 token and renormalises
    (settings(top_k=3), [0.5 / 0.9, 0.25 / 0.9, 0.15 / 0.9, 0.0]),
    # T=2 flattens to sqrt(p) / sum = .370 .262 .203 .166; top-p 0.7 then drops the .166 token
    (settings(temperature=2.0, top_p=0.7), "sqrt-top3"),
    # min-p 0.35 of 0.5 = 0.175: keeps 0.5 and 0.25
    (settings(min_p=0.35), [0.5 / 0.75, 0.25 / 0.75, 0.0, 0.0]),
], ids=["plain", "top_k", "temperature+top_p", "min_p"])
def test_draw_frequencies_follow_the_filtered_distribution(s, expected):
    probs = torch.tensor([0.5, 0.25, 0.15, 0.10])
    if expected == "sqrt-top3":
        root = probs.sqrt()
        root[3] = 0.0
        expected = (root / root.sum()).tolist()
    expected = torch.tensor(expected)
    n = 40_000
    logits = probs.log().expand(n, 4).contiguous()  # one draw per row, all in one call
    sampler = Sampler(s, torch.zeros(n, 1, dtype=torch.long), 4, seed=7)
    ids = sampler(logits)
    counts = torch.bincount(ids, minlength=4).double()
    assert counts[expected == 0].sum() == 0  # filtered tokens are never drawn
    stat = chi_square(counts, expected.double())
    # df <= 3: P(chi2 > 25) < 2e-5 for a correct sampler; a wrong filter moves thousands of draws
    assert stat < 25, (counts.tolist(), expected.tolist(), stat)


# ---- bad settings -------------------------------------------------------------------------


BAD_SETTINGS = [
    ("temperature", -0.1), ("temperature", math.nan), ("temperature", math.inf), ("temperature", "hot"),
    ("top_p", 0.0), ("top_p", -0.5), ("top_p", 1.01), ("top_p", math.nan), ("top_p", math.inf),
    ("top_k", -1), ("top_k", 2.5), ("top_k", 3.0), ("top_k", True), ("top_k", "5"),
    ("min_p", -0.01), ("min_p", 1.0), ("min_p", 1.5), ("min_p", math.nan), ("min_p", -math.inf),
    ("repetition_penalty", 0.0), ("repetition_penalty", -1.0), ("repetition_penalty", math.nan),
    ("repetition_penalty", math.inf), ("repetition_penalty", None),
]


@pytest.mark.parametrize("name, value", BAD_SETTINGS, ids=[f"{n}={v!r}" for n, v in BAD_SETTINGS])
def test_bad_settings_raise_generation_error_naming_the_parameter(name, value):
    with pytest.raises(GenerationError, match=rf"^{name}=") as info:
        SamplingSettings(**{name: value})
    assert isinstance(info.value, ValueError)
    assert "expected" in str(info.value)


@pytest.mark.parametrize("kw", [
    dict(temperature=0.0), dict(temperature=5), dict(top_p=1.0), dict(top_p=1e-6), dict(top_k=0),
    dict(top_k=10**6), dict(min_p=0.0), dict(min_p=0.999), dict(repetition_penalty=1e-3),
    dict(repetition_penalty=3),
])
def test_edge_settings_are_accepted(kw):
    SamplingSettings(**kw)


# ---- through qwen2.generate, with a loaded model ------------------------------------------


@pytest.fixture(scope="module")
def model(tiny_model_dir):
    return qwen2.load_model(tiny_model_dir, dtype="float32")


PROMPT = torch.tensor([[5, 17, 42, 99, 3]])


def reference_runs(model):
    greedy = list(qwen2.generate(model, PROMPT, max_new_tokens=10, stop_token_ids=[]))
    sampled = list(qwen2.generate(model, PROMPT, max_new_tokens=10, temperature=0.9, top_k=50, top_p=0.95,
                                  repetition_penalty=1.1, seed=11, stop_token_ids=[]))
    batch = qwen2.generate_batch(model, [[5, 17, 42], [7]], max_new_tokens=6, stop_token_ids=[])
    return greedy, sampled, batch


@pytest.fixture(scope="module")
def before(model):
    runs = reference_runs(model)
    assert len(runs[0]) == 10 and len(runs[1]) == 10
    return runs


def bad_generate_calls(model):
    V = model.config.vocab_size
    limit = model.config.max_position_embeddings
    g = qwen2.generate
    return [
        (GenerationError, r"temperature=-1", lambda: g(model, PROMPT, temperature=-1.0)),
        (GenerationError, r"top_p=0", lambda: g(model, PROMPT, temperature=1.0, top_p=0.0)),
        (GenerationError, r"top_p=1.5", lambda: g(model, PROMPT, top_p=1.5)),
        (GenerationError, r"top_k=-3", lambda: g(model, PROMPT, top_k=-3)),
        (GenerationError, r"top_k=2.5", lambda: g(model, PROMPT, top_k=2.5)),
        (GenerationError, r"min_p=1", lambda: g(model, PROMPT, min_p=1.0)),
        (GenerationError, r"repetition_penalty=0", lambda: g(model, PROMPT, repetition_penalty=0.0)),
        (GenerationError, r"temperature=nan", lambda: g(model, PROMPT, temperature=math.nan)),
        (GenerationError, r"repetition_penalty=inf", lambda: g(model, PROMPT, repetition_penalty=math.inf)),
        (GenerationError, r"max_new_tokens=0", lambda: g(model, PROMPT, max_new_tokens=0)),
        (GenerationError, r"max_new_tokens=-5", lambda: g(model, PROMPT, max_new_tokens=-5)),
        (GenerationError, r"max_new_tokens=2.0", lambda: g(model, PROMPT, max_new_tokens=2.0)),
        (GenerationError, rf"token id {V} is outside the vocab \[0, {V}\)",
         lambda: g(model, torch.tensor([[1, 2, V]]))),
        (GenerationError, r"token id 100000 ", lambda: g(model, torch.tensor([[100000, 2]]))),
        (GenerationError, r"token id -1 ", lambda: g(model, torch.tensor([[1, -1, 2]]))),
        (ContextLengthError, rf"max_position_embeddings={limit}",
         lambda: g(model, torch.zeros(1, limit - 5, dtype=torch.long), max_new_tokens=6)),
        (ContextLengthError, rf"max_position_embeddings={limit}",
         lambda: g(model, torch.zeros(1, limit + 1, dtype=torch.long), max_new_tokens=1)),
        (GenerationError, r"shape \[1, T\].*\[2, 5\]", lambda: g(model, PROMPT.repeat(2, 1))),
        (GenerationError, r"shape \[1, T\].*\[1, 1, 5\]", lambda: g(model, PROMPT[None])),
        (GenerationError, r"shape \[1, T\].*\[1, 0\]", lambda: g(model, torch.zeros(1, 0, dtype=torch.long))),
        (GenerationError, r"integer token ids", lambda: g(model, PROMPT.float())),
        (GenerationError, rf"token id {V} ", lambda: qwen2.generate_batch(model, [[1, 2], [V]])),
        (GenerationError, r"non-empty", lambda: qwen2.generate_batch(model, [[1, 2], []])),
        (GenerationError, r"top_p=2", lambda: qwen2.generate_batch(model, [[1, 2]], top_p=2.0)),
        (ContextLengthError, rf"max_position_embeddings={limit}",
         lambda: qwen2.generate_batch(model, [[1] * limit], max_new_tokens=1)),
        # a plain forward past the position table (RoPE's cos/sin are looked up per position)
        (ContextLengthError, rf"{limit + 1} tokens do not fit .*max_position_embeddings={limit}",
         lambda: model(torch.zeros(1, limit + 1, dtype=torch.long))),
    ]


def test_bad_generate_arguments_raise_before_any_work_and_leave_the_model_intact(model, before):
    calls = bad_generate_calls(model)
    weights = {k: v.clone() for k, v in model.state_dict().items()}
    for expected_type, pattern, call in calls:
        with pytest.raises(expected_type, match=pattern) as info:
            call()  # raises at the call, not at the first next()
        assert isinstance(info.value, ValueError)
        assert reference_runs(model) == before, f"generation changed after: {info.value}"
    for k, v in model.state_dict().items():
        assert torch.equal(v, weights[k]), k


def test_context_limit_is_inclusive(model):
    limit = model.config.max_position_embeddings
    out = list(qwen2.generate(model, torch.zeros(1, limit - 2, dtype=torch.long), max_new_tokens=2,
                              stop_token_ids=[]))
    assert len(out) == 2  # exactly at the limit is allowed


def test_error_midway_through_a_stream_leaves_the_model_intact(model, before):
    """Abandoning a generator (and failing a later call) does not disturb the next generation."""
    stream = qwen2.generate(model, PROMPT, max_new_tokens=10, stop_token_ids=[])
    next(stream), next(stream)
    stream.close()
    with pytest.raises(GenerationError):
        qwen2.generate(model, PROMPT, temperature=-1.0)
    assert reference_runs(model) == before


def test_draw_picks_as_the_call_does_and_mark_counts_what_is_fed():
    """draw() is __call__ without marking; mark() marks the token a caller feeds instead (Inside's
    hand-picked token): the penalty then sees that token, as a sampler whose prompt held it."""
    logits = torch.tensor([[3.0, 2.9, 0.5, 0.1, -1.0]])
    s = SamplingSettings(temperature=0.8, repetition_penalty=1.5)
    prompt = torch.tensor([[4]])
    picked = set()
    for seed in range(8):
        draws, calls = Sampler(s, prompt, 5, seed=seed), Sampler(s, prompt, 5, seed=seed)
        token = draws.draw(logits)
        assert torch.equal(token, calls(logits))  # the same pick from the same generator
        assert draws.seen.tolist() == [[False, False, False, False, True]]  # nothing marked by draw
        assert calls.seen[0, token].item() and calls.seen.sum() == 1 + (token.item() != 4)
        picked.add(token.item())
    assert picked == {0, 1}  # both likely tokens came up: the comparison was not of one constant
    draws.mark(torch.tensor([2]))
    assert draws.seen.tolist() == [[False, False, True, False, True]]
    fed = Sampler(s, torch.tensor([[4, 2]]), 5, seed=0)
    assert torch.equal(draws.seen, fed.seen)
    greedy = Sampler(SamplingSettings(), prompt, 5)
    greedy.mark(torch.tensor([1]))  # no penalty: nothing to mark
    assert greedy.seen is None and greedy.draw(logits).tolist() == [0]
