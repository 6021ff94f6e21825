"""Generation: prefill the prompt once, then decode one token per step through the KV cache.

DecodeSession is the loop's state (the cache, the next slot, each row's next position);
`generate` streams one prompt's tokens, `generate_batch` runs several left-padded prompts at once.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence

import torch

from .cache import KVCache
from .errors import ContextLengthError, GenerationError
from .sampling import Sampler, SamplingSettings


class DecodeSession:
    """One batch's KV cache and the calls that fill it: prefill(prompt), then step(token) per token.

    With a fast decode path (`fast_path`, a qwen2.fast_path.FastPath: CUDA graphs or a compiled
    CPU step) the cache is borrowed from its pool and each step runs through it; without one, or
    when the pool has no cache free, steps are plain module calls (which the profiler's hooks see).
    `close()` (or leaving a `with` block) gives a borrowed cache back.
    """

    def __init__(self, model, batch_size: int = 1, max_len: int | None = None, fast_path=None):
        config = model.config
        max_len = max_len or config.max_position_embeddings
        if max_len > config.max_position_embeddings:
            raise ContextLengthError(
                f"{max_len} tokens exceed the model's context of max_position_embeddings="
                f"{config.max_position_embeddings}")
        self.model = model
        with torch.inference_mode():
            self.lease = fast_path.acquire(batch_size, max_len) if fast_path is not None else None
            self.fast_path = fast_path if self.lease is not None else None
            if self.lease is not None:
                self.cache = self.lease.cache
            else:
                self.cache = KVCache(config, batch_size, max_len, model.device, model.dtype)
            self.next_position = torch.zeros(batch_size, dtype=torch.long, device=model.device)

    def close(self):
        """Give a borrowed cache back to its pool (a no-op for a cache of its own, or once closed)."""
        if self.lease is not None:
            self.lease.release()
            self.lease = self.fast_path = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    @property
    def length(self) -> int:
        return self.cache.length

    def _check_room(self, n: int):
        if self.cache.length + n > self.cache.max_len:
            raise ContextLengthError(
                f"the cache holds {self.cache.max_len} tokens; {self.cache.length} are used and "
                f"{n} more do not fit")

    @torch.inference_mode()
    def prefill(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Feed (B, T) prompt tokens (left-padded when attention_mask is given); return (B, V) logits."""
        B, T = input_ids.shape
        self._check_room(T)
        device = self.cache.key_valid.device
        slots = torch.arange(self.cache.length, self.cache.length + T, device=device)
        if attention_mask is not None:
            attention_mask = attention_mask.to(device)
            if not bool(attention_mask.all()):  # before the forward: its mask reads key_valid from now on
                self.cache.mark_padded()
            positions = self.next_position[:, None] + attention_mask.long().cumsum(-1) - 1
            positions = positions.clamp(min=0)
            self.next_position += attention_mask.long().sum(-1)
        else:
            positions = self.next_position[:, None] + torch.arange(T, device=device)
            self.next_position += T
        with eager_attention_kernels(device):
            logits = self.model(input_ids.to(device), attention_mask, cache=self.cache, slots=slots,
                                positions=positions, kv_len=self.cache.length + T, last_only=True)
        self.cache.advance(T)
        return logits[:, -1]

    @torch.inference_mode()
    def step(self, token_ids: torch.Tensor) -> torch.Tensor:
        """Feed one token per row, (B,); return the next (B, V) logits."""
        self._check_room(1)
        slot = self.cache.length
        positions = self.next_position[:, None]
        if self.fast_path is not None:
            logits = self.fast_path.step(self.lease, token_ids, slot, positions)
        else:
            slots = torch.tensor([slot], device=self.cache.key_valid.device)
            with eager_attention_kernels(slots.device):
                logits = self.model(token_ids[:, None], cache=self.cache, slots=slots, positions=positions,
                                    kv_len=slot + 1, last_only=True)[:, -1]
        self.next_position += 1
        self.cache.advance(1)
        return logits

    @torch.inference_mode()
    def extend(self, token_ids: torch.Tensor) -> torch.Tensor:
        """Feed (B, T) tokens after those in the cache; return the logits at every position, float32
        (B, T, V): row t is the next-token distribution after token t. Always a plain module call
        (a fast path has one-token steps only). With rewind(length) this is verify-and-roll-back:
        speculative decoding (qwen2/speculative.py) feeds a draft, keeps what the model agrees with."""
        B, T = token_ids.shape
        self._check_room(T)
        device = self.cache.key_valid.device
        slots = torch.arange(self.cache.length, self.cache.length + T, device=device)
        positions = self.next_position[:, None] + torch.arange(T, device=device)
        with eager_attention_kernels(device):
            logits = self.model(token_ids.to(device), cache=self.cache, slots=slots, positions=positions,
                                kv_len=self.cache.length + T, last_only=False)
        self.next_position += T
        self.cache.advance(T)
        return logits

    @torch.inference_mode()
    def rewind(self, length: int):
        """Keep only the first `length` tokens (one unpadded row): a chat's next turn re-uses them."""
        _check_single_row(self.cache, "rewind")
        self.cache.rewind(length)
        self.next_position.fill_(self.cache.length)

    @torch.inference_mode()
    def copy_prefix_from(self, other: DecodeSession, length: int):
        """Start from `other`'s first `length` tokens (one unpadded row): a chat moving to a larger cache."""
        _check_single_row(other.cache, "copy_prefix_from")
        self.cache.copy_prefix_from(other.cache, length)
        self.next_position.fill_(length)  # unpadded: a token's position is its slot


def _check_single_row(cache: KVCache, what: str):
    # With padding, a row's positions lag its slots by its own padding: one length fits no batch.
    if cache.batch_size != 1 or cache.padded:
        raise GenerationError(f"{what} needs a single unpadded row")


def eager_attention_kernels(device: torch.device):
    """On CUDA, leave cuDNN attention out of eager calls: it builds a plan for every sequence length
    it meets (slow to build), and a chat meets a new length at every step. Flash / memory-efficient
    kernels need no plan. (A CUDA graph has one shape and allows it: qwen2/cuda_graphs.py.)"""
    if device.type != "cuda":
        return contextlib.nullcontext()
    from torch.nn.attention import SDPBackend, sdpa_kernel

    return sdpa_kernel([SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH])


def _as_prompt(input_ids, vocab_size: int) -> torch.Tensor:
    ids = torch.as_tensor(input_ids)
    if ids.dim() == 1:
        ids = ids[None]
    if ids.dim() != 2 or ids.shape[0] != 1 or ids.shape[1] == 0:
        raise GenerationError(f"input_ids must have shape [1, T] with T >= 1; got {list(ids.shape)}")
    if ids.dtype not in (torch.int64, torch.int32):
        raise GenerationError(f"input_ids must be integer token ids; got {ids.dtype}")
    _check_ids(ids, vocab_size)
    return ids.long()


def _check_ids(ids: torch.Tensor, vocab_size: int):
    if ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= vocab_size):
        bad = int(ids.max()) if int(ids.max()) >= vocab_size else int(ids.min())
        raise GenerationError(f"token id {bad} is outside the vocab [0, {vocab_size})")


def check_budget(model, prompt_len: int, max_new_tokens, context: int | None = None) -> None:
    """The context-length check every caller makes: max_new_tokens is a positive integer and prompt +
    reply fit in the model's context, or in `context` tokens (a serving engine's row) when smaller."""
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 1:
        raise GenerationError(f"max_new_tokens={max_new_tokens!r} is invalid; expected an integer >= 1")
    limit = model.config.max_position_embeddings
    if prompt_len + max_new_tokens > limit:
        raise ContextLengthError(
            f"prompt ({prompt_len} tokens) + max_new_tokens ({max_new_tokens}) exceeds the context "
            f"limit max_position_embeddings={limit}; shorten the prompt or lower max_new_tokens")
    if context is not None and prompt_len + max_new_tokens > context:
        raise ContextLengthError(
            f"prompt ({prompt_len} tokens) + max_new_tokens ({max_new_tokens}) exceeds this server's "
            f"{context}-token context per conversation; shorten the prompt or lower max_new_tokens")


def default_stop_ids(model, tokenizer=None) -> set[int]:
    """Where a reply ends: generation_config.json's eos ids (else config.json's), plus the
    tokenizer's end tokens when one is given (e.g. <|im_end|> and <|endoftext|> for Qwen2)."""
    eos = model.info.generation_config.get("eos_token_id", model.config.eos_token_id)
    ids = set() if eos is None else {int(e) for e in (eos if isinstance(eos, (list, tuple)) else [eos])}
    if tokenizer is not None:
        ids |= set(tokenizer.eos_token_ids)
    return ids


def _stop_set(model, stop_token_ids) -> set[int]:
    return default_stop_ids(model) if stop_token_ids is None else {int(t) for t in stop_token_ids}


def generate(model, input_ids, max_new_tokens: int = 64, temperature: float = 0.0, top_k: int = 0,
             top_p: float = 1.0, min_p: float = 0.0, repetition_penalty: float = 1.0,
             stop_token_ids=None, seed: int | None = None, fast_path=None) -> Iterator[int]:
    """Stream the ids of new tokens for one prompt (LongTensor [1, T]); the stop token is not yielded.

    Arguments are checked before the first token, so a bad setting raises at the call, and leaves the
    model as it was. Closing the generator (break) drops its cache. `fast_path`: a fast decode path
    (qwen2.fast.make_fast_path), or None for plain module calls.
    """
    settings = SamplingSettings(temperature, top_k, top_p, min_p, repetition_penalty)
    prompt = _as_prompt(input_ids, model.config.vocab_size).to(model.device)
    check_budget(model, prompt.shape[1], max_new_tokens)
    stop = _stop_set(model, stop_token_ids)
    return _generate(model, prompt, max_new_tokens, settings, stop, seed, fast_path)


def _generate(model, prompt, max_new_tokens, settings, stop, seed, fast_path):
    with DecodeSession(model, 1, prompt.shape[1] + max_new_tokens, fast_path=fast_path) as session:
        sampler = Sampler(settings, prompt, model.config.vocab_size, seed)
        yield from stream_tokens(session, sampler, session.prefill(prompt), max_new_tokens, stop)


def stream_tokens(session: DecodeSession, sampler: Sampler, logits: torch.Tensor, max_new_tokens: int,
                  stop: set[int]) -> Iterator[int]:
    """The decode loop of one row: sample a token, stream it, feed it back; the stop token is not
    yielded (nor fed). On exit the cache holds the prompt and every yielded token but the last."""
    queue_ahead = session.model.device.type == "cuda"
    for i in range(max_new_tokens):
        next_id = sampler(logits)  # (1,), on the device
        more = i + 1 < max_new_tokens
        token, logits = _read_token(session, next_id, step_first=queue_ahead and more)
        if token in stop:
            return
        yield token
        if more and logits is None:
            logits = session.step(next_id)


def _read_token(session, next_id, step_first: bool):
    """The sampled id on the host: the one sync per token (we must see it to stream and to stop).

    With step_first (on CUDA) the next step is queued before waiting, so the GPU computes it while
    the host reads and streams this token; stopping early then wastes one step. Returns the id and
    that step's logits (None when the step is left to the caller).
    """
    if not step_first:
        return int(next_id), None
    host_id = next_id.to("cpu", non_blocking=True)
    ready = torch.cuda.Event()
    ready.record()
    logits = session.step(next_id)
    ready.synchronize()  # waits for the sampled id only, not for the step queued after it
    return int(host_id), logits


def generate_batch(model, prompts: Sequence[Sequence[int]], max_new_tokens: int = 64, temperature: float = 0.0,
                   top_k: int = 0, top_p: float = 1.0, min_p: float = 0.0, repetition_penalty: float = 1.0,
                   stop_token_ids=None, seed: int | None = None, pad_token_id: int = 0,
                   fast_path=None) -> list[list[int]]:
    """Generate for several prompts at once, left-padded into one batch; one list of new ids per prompt.

    Greedy results equal generating each prompt alone. A row that meets a stop token stops growing
    while the others go on.
    """
    settings = SamplingSettings(temperature, top_k, top_p, min_p, repetition_penalty)
    if not prompts or any(len(p) == 0 for p in prompts):
        raise GenerationError("prompts must be a non-empty list of non-empty token id lists")
    longest = max(len(p) for p in prompts)
    check_budget(model, longest, max_new_tokens)
    ids = torch.full((len(prompts), longest), pad_token_id, dtype=torch.long)
    mask = torch.zeros(len(prompts), longest, dtype=torch.long)
    for row, prompt in enumerate(prompts):
        ids[row, longest - len(prompt):] = torch.as_tensor(list(prompt), dtype=torch.long)
        mask[row, longest - len(prompt):] = 1
    _check_ids(ids, model.config.vocab_size)
    stop = _stop_set(model, stop_token_ids)
    ids, mask = ids.to(model.device), mask.to(model.device)

    with DecodeSession(model, len(prompts), longest + max_new_tokens, fast_path=fast_path) as session:
        sampler = Sampler(settings, ids, model.config.vocab_size, seed, prompt_mask=mask)
        logits = session.prefill(ids, mask)
        outputs: list[list[int]] = [[] for _ in prompts]
        done = [False] * len(prompts)
        for i in range(max_new_tokens):
            next_ids = sampler(logits)
            for row, token in enumerate(next_ids.tolist()):
                if done[row]:
                    continue
                if token in stop:
                    done[row] = True
                else:
                    outputs[row].append(token)
            if all(done) or i + 1 == max_new_tokens:
                break
            logits = session.step(next_ids)
    return outputs
