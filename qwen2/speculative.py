"""Speculative decoding on one stream: guess several tokens cheaply, check them in one forward.

A decode step reads every weight to produce one token. A drafter proposes the next k tokens; the
target model reads them all in one forward (DecodeSession.extend: k + 1 positions, the weights read
once) and keeps the longest run it agrees with, plus one token of its own. Then the cache is rolled
back to what was kept (DecodeSession.rewind). Each forward yields between 1 and k + 1 tokens.

Drafters:
- PromptLookupDrafter: copies what followed the latest earlier occurrence of the last n tokens in
  prompt + reply (transformers' `prompt_lookup_num_tokens`, llama.cpp's lookup decoding). Free,
  and strong where the reply repeats its input (code edits, quoting, summarising a document).
- DraftModelDrafter: a smaller model with the same vocabulary, with its own KV cache kept in sync.

A verification of several tokens costs more than a step (on a 2-vCPU CPU about 2x for two tokens),
so wrong guesses make decoding slower. DraftGate verifies only as many guesses as are expected to
pay, from the hit rate each kind of draft has had so far: in open chat, where prompt lookup rarely
guesses right, it soon verifies almost nothing; in a code edit it lets long copies through.

Exactness: greedy output is the target's own greedy output, token for token (up to the float
rounding of a k-row forward against a one-row step). Sampled output follows the target's
distribution exactly by the speculative-sampling rule (Leviathan et al. 2023, Chen et al. 2023):
draft token x, drawn from the drafter's q, is kept with probability min(1, p(x) / q(x)), where p
is the target's distribution after the same processors as qwen2.sampling.process_logits (q is a
point mass for prompt lookup: keep with probability p(x)); the first rejected position draws from
normalize(max(p - q, 0)); when all are kept, one more token is drawn from p. The repetition
penalty's "seen" set at each position includes the draft tokens before it, as a token-by-token
decode would have it. The same seed gives a repeatable reply, but not generate()'s reply: the
random numbers are used differently.

    stream = speculative_generate(model, ids, PromptLookupDrafter(), max_new_tokens=256)
    for token in stream: ...
    stream.stats  # SpeculativeStats(drafted, accepted, forwards, ...)
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import torch

from .errors import GenerationError
from .generate import DecodeSession, _as_prompt, _stop_set, check_budget
from .sampling import Sampler, SamplingSettings, check_seed, process_logits
from .session import common_prefix


@dataclass
class SpeculativeStats:
    """What one speculative reply did. `forwards` counts the target's forwards, the prefill included:
    a plain decode makes one per token."""

    drafted: int = 0  # draft tokens the target checked
    accepted: int = 0  # of which it kept
    forwards: int = 0  # target forwards (prefill + one per verification)
    tokens: int = 0  # tokens yielded

    @property
    def acceptance(self) -> float | None:
        return self.accepted / self.drafted if self.drafted else None

    @property
    def tokens_per_forward(self) -> float | None:
        return self.tokens / self.forwards if self.forwards else None

    def line(self) -> str:
        """"drafted 120 · accepted 96 (80%) · 41 forwards"."""
        rate = self.acceptance
        share = f" ({rate:.0%})" if rate is not None else ""
        return f"drafted {self.drafted} · accepted {self.accepted}{share} · {self.forwards} forwards"


@dataclass
class Draft:
    """Proposed next tokens. `probs` (k, V): the distribution each token was drawn from (a sampling
    drafter); None: each token is a deterministic guess (a point mass)."""

    tokens: list[int]
    probs: torch.Tensor | None = None
    kind: int = 0  # which of the drafter's kinds of guess this is (DraftGate keeps a hit rate per kind)


class Drafter:
    """What speculative_generate asks of a drafter: start(...) once per reply, then propose(context,
    k) before every verification (context: prompt + reply so far, the last token not yet fed to the
    target), close() at the end. A drafter sees the whole context each time, so it re-syncs itself
    after a rejection (the tokens it guessed beyond the kept ones are simply no longer there)."""

    max_draft: int = 8
    free_guesses = False  # True: propose() costs next to nothing, so DraftGate may check unverified guesses

    def start(self, prompt: list[int], max_len: int, settings: SamplingSettings, generator, vocab_size: int):
        pass

    def propose(self, context: list[int], max_tokens: int) -> Draft:
        raise NotImplementedError

    def close(self):
        pass


class PromptLookupDrafter(Drafter):
    """Match the last n tokens (n = max_ngram down to min_ngram, longest first) against earlier
    tokens of prompt + reply, take the most recent match, and propose up to max_draft tokens that
    followed it. The copy may run into the tokens it is producing (as LZ77 does), so a periodic text
    gets a full-length draft. No match: no draft (the verification is then a plain step). A draft's
    kind is the length of the n-gram it matched: longer matches come true more often."""

    free_guesses = True

    def __init__(self, max_ngram: int = 3, min_ngram: int = 1, max_draft: int = 8):
        for name, value in (("max_ngram", max_ngram), ("min_ngram", min_ngram), ("max_draft", max_draft)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise GenerationError(f"{name}={value!r} is invalid; expected an integer >= 1")
        if min_ngram > max_ngram:
            raise GenerationError(f"min_ngram={min_ngram} exceeds max_ngram={max_ngram}")
        self.max_ngram, self.min_ngram, self.max_draft = max_ngram, min_ngram, max_draft
        self._index = NgramIndex(range(min_ngram, max_ngram + 1))

    def propose(self, context: list[int], max_tokens: int) -> Draft:
        ngram, tokens = self.match(context, min(max_tokens, self.max_draft))
        return Draft(tokens, kind=ngram)

    def lookup(self, tokens: list[int], max_tokens: int | None = None) -> list[int]:
        """The draft for `tokens` (prompt + reply so far): at most max_tokens (default max_draft) ids."""
        return self.match(tokens, self.max_draft if max_tokens is None else max_tokens)[1]

    def match(self, tokens: list[int], limit: int) -> tuple[int, list[int]]:
        """(length of the n-gram matched, the draft of at most `limit` ids); (0, []) without a match."""
        length = len(tokens)
        if limit <= 0:
            return 0, []
        self._index.update(tokens)
        for n in range(min(self.max_ngram, length - 1), self.min_ngram - 1, -1):
            start = self._index.last_start.get(NgramIndex.key(tokens[length - n:]))
            if start is not None:
                return n, copy_from(tokens, start + n, limit)
        return 0, []

    def close(self):
        self._index = NgramIndex(self._index.sizes)


def copy_from(tokens: list[int], start: int, limit: int) -> list[int]:
    """`limit` tokens from tokens[start:], running on into the copy itself past the end (as LZ77
    does): a periodic tail gets a full-length draft."""
    out: list[int] = []
    for i in range(limit):
        pos = start + i
        out.append(tokens[pos] if pos < len(tokens) else out[pos - len(tokens)])
    return out


class NgramIndex:
    """Where each n-gram of a token list last started, kept up to date as the list grows, so that
    finding the latest earlier occurrence of the last n tokens is a dict lookup rather than a scan
    of the context (up to 2 ms per round at 8 000 tokens in Python; 0.05 ms with the index, which
    takes 10-24 ms to build once per reply at that length, scripts/lookup_timing.py). It indexes
    the n-grams lying inside tokens[:-1]: an occurrence must start before the tail itself does. A
    list that is not the indexed one plus new tokens (another reply) is indexed afresh.

    An n-gram's key is one int, its ids + 1 as digits base 2^32 (distinct for each n; ids are below
    2^32 - 1). Tuples as keys made building the index up to 10x slower: unlike ints, the garbage
    collector tracks them."""

    def __init__(self, sizes: range):
        self.sizes = sizes
        self.indexed: list[int] = []
        self.last_start: dict[int, int] = {}

    @staticmethod
    def key(ngram: list[int]) -> int:
        key = 0
        for token in ngram:
            key = (key << 32) | (token + 1)
        return key

    def update(self, tokens: list[int]):
        known, body = len(self.indexed), len(tokens) - 1
        if body < known or tokens[:known] != self.indexed:
            self.indexed, self.last_start, known = [], {}, 0
        smallest, largest = self.sizes.start, self.sizes.stop - 1
        last_start = self.last_start
        for end in range(known, body):  # each n-gram ending at `end`, the later occurrence winning
            key = 0
            for n in range(1, min(largest, end + 1) + 1):  # grow the n-gram leftwards
                key |= (tokens[end + 1 - n] + 1) << (32 * (n - 1))
                if n >= smallest:
                    last_start[key] = end + 1 - n
        self.indexed.extend(tokens[known:body])


# What verifying T tokens in one forward costs, in one-token steps, T = 1, 2, ...: measured on a
# 2-vCPU AMD EPYC (AVX2), eager float32, Qwen2.5-Coder-0.5B, 541 tokens of context
# (docs/benchmarks.md, "verification cost"); beyond the table, its last figure. A GPU verifies a
# few tokens for about the price of one (not measured here): pass such a table there.
CPU_VERIFY_COST = (1.0, 1.84, 2.1, 2.35, 2.35, 2.35, 2.35, 2.35, 2.68)


class DraftGate:
    """How many of a draft's guesses to verify this round: as many as pay for their verification.

    Keeps a running hit rate per kind of draft (Draft.kind), from every verification (each kept guess
    a hit, the first rejected one a miss) and, for drafters whose guesses are free, from rounds it
    declined to verify (the first guess against the token that came). With hit rate a, verifying k
    guesses yields (1 - a^(k+1)) / (1 - a) tokens on average for verify_cost[k] steps; the gate takes
    the k with the most tokens per step, or 0 (a plain step) when no k beats one token per step. So
    drafts that keep failing (prompt lookup in open chat) stop costing verifications, and drafts
    that keep coming true (code copied from the prompt) run long. Drafters whose guesses cost a
    forward of their own are always asked for one guess at least, or their rate would never move.
    Given its cost table, the choice depends only on tokens: with a fixed table (speculative_generate)
    a seeded reply stays repeatable. The serving engine reprices the gate every round from timings
    (qwen2/steps.py: verify_cost), which is why its seeded sampled replies never speculate."""

    def __init__(self, verify_cost=CPU_VERIFY_COST, prior: float = 0.5, memory: float = 0.8):
        if not 0 <= prior <= 1 or not 0 <= memory < 1:
            raise GenerationError(f"DraftGate(prior={prior!r}, memory={memory!r}) is invalid; expected a prior "
                                  "in [0, 1] and a memory in [0, 1)")
        self.reprice(verify_cost)
        self.prior, self.memory = prior, memory
        self.rates: dict[int, float] = {}

    def reprice(self, verify_cost):
        """Take a new cost table (the step runner's latest timings, or its compiled table once ready)."""
        costs = tuple(float(c) for c in verify_cost)
        if not costs or any(c <= 0 for c in costs):
            raise GenerationError(f"DraftGate verify_cost={verify_cost!r} is invalid; expected positive costs")
        self.costs = costs

    def cost(self, tokens: int) -> float:
        """Verification of `tokens` tokens (the pending one and the guesses), in steps."""
        return self.costs[min(tokens, len(self.costs)) - 1] / self.costs[0]

    def length(self, kind: int, offered: int, at_least: int = 0) -> int:
        a = min(self.rates.get(kind, self.prior), 0.999)
        best, best_rate = 0, 1.0
        for k in range(1, offered + 1):
            rate = (1 - a ** (k + 1)) / (1 - a) / self.cost(k + 1)
            if rate > best_rate:
                best, best_rate = k, rate
        return max(best, min(at_least, offered))

    def observe(self, kind: int, hits: int, missed: bool):
        rate = self.rates.get(kind, self.prior)
        for outcome in [1.0] * hits + [0.0] * missed:
            rate = self.memory * rate + (1 - self.memory) * outcome
        self.rates[kind] = rate


class DraftModelDrafter(Drafter):
    """A smaller model with the same tokenizer drafts max_draft tokens, one step each: greedily for a
    greedy reply, else by sampling from its distribution after the reply's own processors (and
    returning those distributions, which the acceptance rule needs). Its DecodeSession keeps the
    tokens it has seen; each proposal rewinds it to the part of the context it still shares (what the
    target rejected is dropped) and feeds the rest."""

    def __init__(self, draft_model, max_draft: int = 4):
        if isinstance(max_draft, bool) or not isinstance(max_draft, int) or max_draft < 1:
            raise GenerationError(f"max_draft={max_draft!r} is invalid; expected an integer >= 1")
        self.model, self.max_draft = draft_model, max_draft
        self.session: DecodeSession | None = None
        self.cached: list[int] = []  # the ids whose keys/values are in the draft cache

    def start(self, prompt, max_len, settings, generator, vocab_size):
        if self.model.config.vocab_size != vocab_size:
            raise GenerationError(f"the draft model's vocab ({self.model.config.vocab_size}) differs from the "
                                  f"target's ({vocab_size}): a drafter must share the tokenizer")
        self.close()
        self.settings, self.generator = settings, generator
        self.max_len = min(max_len, self.model.config.max_position_embeddings)
        self.session, self.cached = DecodeSession(self.model, 1, self.max_len), []

    def close(self):
        if self.session is not None:
            self.session.close()
        self.session, self.cached = None, []

    @torch.inference_mode()
    def propose(self, context: list[int], max_tokens: int) -> Draft:
        if self.session is None:
            raise GenerationError("DraftModelDrafter.propose before start")
        k = min(max_tokens, self.max_draft, self.max_len - len(context) + 1)  # it feeds context + k - 1
        if k <= 0:
            return Draft([])
        device = self.model.device
        keep = min(common_prefix(self.cached, context), len(context) - 1)  # the last token's logits are needed
        self.session.rewind(keep)
        logits = self.session.prefill(torch.tensor([context[keep:]], device=device))
        self.cached = list(context)
        seen = None
        if self.settings.repetition_penalty != 1.0:
            seen = torch.zeros(1, self.model.config.vocab_size, dtype=torch.bool, device=device)
            seen[0, torch.tensor(context, device=device)] = True
        tokens, probs = [], []
        for i in range(k):
            processed = process_logits(logits.float(), self.settings, seen)
            if self.settings.greedy:
                token = processed.argmax(dim=-1)
            else:
                q = processed.softmax(dim=-1)
                token = torch.multinomial(q, 1, generator=self.generator).squeeze(-1)
                probs.append(q[0])
            tokens.append(int(token))
            if seen is not None:
                seen[0, tokens[-1]] = True
            if i + 1 < k:
                logits = self.session.step(token)
                self.cached.append(tokens[-1])
        return Draft(tokens, torch.stack(probs) if probs else None)


class SpeculativeStream:
    """The token ids of one speculative reply (an iterator), and `stats` (SpeculativeStats), filled
    in as it goes. close() (or breaking out of a for loop over it) drops its caches."""

    def __init__(self, tokens: Iterator[int], stats: SpeculativeStats):
        self._tokens, self.stats = tokens, stats

    def __iter__(self):
        return self

    def __next__(self) -> int:
        return next(self._tokens)

    def close(self):
        self._tokens.close()


def speculative_generate(model, input_ids, drafter: Drafter | None = None, max_new_tokens: int = 64,
                         temperature: float = 0.0, top_k: int = 0, top_p: float = 1.0, min_p: float = 0.0,
                         repetition_penalty: float = 1.0, stop_token_ids=None,
                         seed: int | None = None, gate: DraftGate | None = None,
                         gated: bool = True) -> SpeculativeStream:
    """qwen2.generate with speculation: the same arguments and stop / length / context rules, the
    ids of the new tokens streamed (the stop token is not yielded), plus `.stats` on the stream.
    `drafter` defaults to PromptLookupDrafter(); `gate` to a fresh DraftGate() (gated=False verifies
    every draft in full). Runs eagerly (DecodeSession without a fast path)."""
    settings = SamplingSettings(temperature, top_k, top_p, min_p, repetition_penalty)
    prompt = _as_prompt(input_ids, model.config.vocab_size).to(model.device)
    check_budget(model, prompt.shape[1], max_new_tokens)
    stop = _stop_set(model, stop_token_ids)
    check_seed(seed)
    speculation = Speculation(drafter, gate, gated)
    stream = _speculate(model, prompt, speculation, max_new_tokens, settings, stop, seed)
    return SpeculativeStream(stream, speculation.stats)


class Speculation:
    """One reply's drafting and checking, apart from how its forwards run: `plan` says which guesses
    to feed after the pending token, `settle` reads the target's logits at those positions and says
    how many guesses to keep and which token comes after them. DecodeSession.extend runs the
    forwards for speculative_generate; the serving engine's verification steps for a chat reply
    (qwen2/engine.py). Either way the caller rolls its cache back to what was kept."""

    def __init__(self, drafter: Drafter | None = None, gate: DraftGate | None = None, gated: bool = True):
        self.drafter = PromptLookupDrafter() if drafter is None else drafter
        self.gate = (gate or DraftGate()) if gated else None
        self.stats = SpeculativeStats()
        self._draft = Draft([])
        self._unverified: int | None = None

    def start(self, prompt: list[int], max_len: int, sampler: Sampler, vocab_size: int):
        self.sampler = sampler
        self.drafter.start(prompt, max_len, sampler.settings, sampler.generator, vocab_size)

    def close(self):
        self.drafter.close()

    def plan(self, context: list[int], room: int, verify_cost=None) -> list[int]:
        """The guesses to verify after context[-1] (the pending token, not yet fed): at most `room`,
        as many as the gate expects to pay (at `verify_cost`, when given: the gate's new prices);
        [] means a plain one-token step."""
        if verify_cost is not None and self.gate is not None:
            self.gate.reprice(verify_cost)
        draft = self.drafter.propose(context, room) if room > 0 else Draft([])
        guess = draft.tokens[:room]
        if self.gate is not None and guess:
            guess = guess[:self.gate.length(draft.kind, len(guess), 0 if self.drafter.free_guesses else 1)]
        self._draft = draft
        self._unverified = draft.tokens[0] if draft.tokens and not guess and room > 0 else None
        return guess

    def settle(self, logits: torch.Tensor, guess: list[int]) -> tuple[int, int]:
        """logits (k + 1, V): the target after the pending token and each guess. Returns (kept, the
        token after the kept guesses); marks nothing as seen (the caller marks what it emits)."""
        stats, gate, draft = self.stats, self.gate, self._draft
        stats.forwards += 1
        stats.drafted += len(guess)
        processed = _processed_rows(logits, guess, self.sampler.settings, self.sampler.seen)
        if self.sampler.settings.greedy:
            kept, token = verify_greedy(processed, guess)
        else:
            q = None if draft.probs is None else draft.probs[:len(guess)]
            kept, token = verify_sampled(processed.softmax(dim=-1), guess, q, self.sampler.generator)
        stats.accepted += kept
        if gate is not None and guess:
            gate.observe(draft.kind, kept, kept < len(guess))
        elif gate is not None and self._unverified is not None:
            gate.observe(draft.kind, int(self._unverified == token), self._unverified != token)
        return kept, token


def _speculate(model, prompt, speculation: Speculation, max_new_tokens, settings, stop, seed):
    vocab, stats = model.config.vocab_size, speculation.stats
    max_len = prompt.shape[1] + max_new_tokens
    with DecodeSession(model, 1, max_len) as session:
        sampler = Sampler(settings, prompt, vocab, seed)
        speculation.start(prompt[0].tolist(), max_len, sampler, vocab)
        try:
            pending = int(sampler(session.prefill(prompt)))  # the first token exactly as generate draws it
            stats.forwards += 1
            if pending in stop:
                return
            context = prompt[0].tolist() + [pending]
            stats.tokens += 1
            yield pending
            while stats.tokens < max_new_tokens:
                # the cache holds context but `pending`; a round yields at most len(guess) + 1 tokens
                guess = speculation.plan(context, max_new_tokens - stats.tokens - 1)
                fed = torch.tensor([[pending] + guess], device=model.device)
                kept, token = speculation.settle(session.extend(fed)[0], guess)  # (k + 1, V) logits
                session.rewind(session.length - (len(guess) - kept))  # keep pending and the kept guesses
                for t in guess[:kept] + [token]:
                    if t in stop:
                        return
                    sampler.mark(torch.tensor([t], device=model.device))
                    context.append(t)
                    stats.tokens += 1
                    yield t
                pending = token
        finally:
            speculation.close()


def _processed_rows(logits, guess, settings: SamplingSettings, seen):
    """process_logits for each verified position: row i's "seen" set adds guess[:i] (the tokens a
    token-by-token decode would have drawn before it)."""
    rows = None
    if seen is not None:
        rows = seen.expand(len(guess) + 1, -1).clone()
        for i, token in enumerate(guess):
            rows[i + 1:, token] = True
    return process_logits(logits.float(), settings, rows)


def verify_greedy(processed: torch.Tensor, guess: list[int]) -> tuple[int, int]:
    """(how many guesses the target's argmax agrees with, the target's token after them)."""
    choice = processed.argmax(dim=-1).tolist()
    kept = 0
    while kept < len(guess) and choice[kept] == guess[kept]:
        kept += 1
    return kept, choice[kept]


def verify_sampled(p: torch.Tensor, guess: list[int], q: torch.Tensor | None, generator) -> tuple[int, int]:
    """The speculative-sampling rule. p (k + 1, V): the target's distributions (row i for guess i,
    row k after all of them); q (k, V) the drafter's, or None for point masses. Guess i is kept with
    probability min(1, p(x) / q(x)); the first rejected one is replaced by a draw from
    normalize(max(p - q, 0)); all kept: one more from p[k]. Returns (kept, the token after them)."""
    k = len(guess)
    if k:
        index = torch.arange(k, device=p.device)
        ids = torch.tensor(guess, device=p.device)
        px = p[index, ids]
        qx = torch.ones_like(px) if q is None else q[index, ids].to(px.dtype)
        u = torch.rand(k, generator=generator, device=p.device, dtype=px.dtype)
        keep = (u * qx < px).tolist()  # u < p/q: probability min(1, p/q)
        for i, ok in enumerate(keep):
            if not ok:
                mass = torch.zeros_like(p[i]) if q is None else q[i].to(p.dtype)
                if q is None:
                    mass[guess[i]] = 1.0
                residual = (p[i] - mass).clamp(min=0)
                if float(residual.sum()) <= 0:  # p == q up to rounding: nothing to correct
                    residual = p[i]
                return i, int(torch.multinomial(residual, 1, generator=generator))
    return k, int(torch.multinomial(p[k], 1, generator=generator))
