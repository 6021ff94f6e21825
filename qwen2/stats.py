"""ReplyStats: what one reply cost, for the per-reply statistics line."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class ReplyStats:
    """What one reply cost. Decode speed needs two tokens: the first one is the prefill's."""

    prompt_tokens: int = 0
    reused_tokens: int = 0  # prompt tokens served from the kept cache, not recomputed
    new_tokens: int = 0
    queue_wait_s: float = 0.0  # from the request to the start of its prefill (other replies ahead)
    ttft_s: float = 0.0  # from the start of its prefill to the first new token
    decode_s: float = 0.0  # from the first new token to the last
    device: str = ""
    dtype: str = ""
    stopped: bool = False  # cut short: Stop, or the server's time limit
    end: str = ""  # why it ended: "stop" (a stop token), "length" (max new tokens), "cancelled", "time", "error"
    context_used: int = 0
    context_limit: int = 0
    batch_size: int = 0  # the most replies that decoded beside this one in a step (itself included)
    drafted: int = 0  # speculative decoding: guessed tokens the model checked
    accepted: int = 0  # of which it kept (each one a token without a step of its own)
    decode_forwards: int = 0  # forwards after the prefill's: one per token, fewer with speculation
    decode_steps: float = 0.0  # what those forwards cost in one-token steps, as the step runner prices a verification

    @property
    def speculation_speedup(self) -> float | None:
        """Decode tokens per one-token step's worth of forwards: what speculation gained over a plain
        decode, a verification priced at the step runner's measured cost (qwen2/steps.py)."""
        if not self.drafted or self.new_tokens < 2 or self.decode_steps <= 0:
            return None
        return (self.new_tokens - 1) / self.decode_steps

    @property
    def prefilled_tokens(self) -> int:
        return self.prompt_tokens - self.reused_tokens

    @property
    def decode_tok_s(self) -> float | None:
        if self.new_tokens < 2 or self.decode_s <= 0:
            return None
        return (self.new_tokens - 1) / self.decode_s

    def line(self) -> str:
        """"42 prompt tokens (40 reused) · 17 new tokens · first token 120 ms · 23.5 tok/s · cpu
        (bfloat16) · context 59/32768". A reply that did not end by itself says why first ("stopped
        after 17 new tokens", "stopped by the time limit after ...", "length limit reached: 512 new
        tokens"), and a request that waited behind others says how long."""
        count = f"{self.new_tokens} new token{'' if self.new_tokens == 1 else 's'}"
        prompt = f"{self.prompt_tokens} prompt tokens"
        if self.reused_tokens:
            prompt += f" ({self.reused_tokens} reused)"
        if self.end == "time":
            head, parts = f"stopped by the time limit after {count}", [prompt]
        elif self.stopped:
            head, parts = f"stopped after {count}", [prompt]
        elif self.end == "length":
            head, parts = f"length limit reached: {count}", [prompt]
        else:
            head, parts = None, [prompt, count]
        if self.queue_wait_s >= 0.05:
            parts.append(f"waited {self.queue_wait_s:.1f} s")
        rate = self.decode_tok_s
        parts += [f"first token {self.ttft_s * 1000:.0f} ms",
                  f"{rate:.1f} tok/s" if rate is not None else "decode n/a (1 token)",
                  f"{self.device} ({self.dtype})"]
        if self.drafted:
            kept = f"{self.accepted}/{self.drafted} guessed tokens kept ({self.accepted / self.drafted:.0%})"
            if self.decode_forwards:
                kept += f", {(self.new_tokens - 1) / self.decode_forwards:.2f} tokens per decode forward"
            if self.speculation_speedup is not None:
                kept += f", est. {self.speculation_speedup:.2f}x a plain decode"
            parts.append(kept)
        if self.batch_size > 1:
            parts.append(f"batched with up to {self.batch_size - 1} other repl{'y' if self.batch_size == 2 else 'ies'}")
        if self.context_limit:
            parts.append(f"context {self.context_used}/{self.context_limit}")
        return " · ".join([head, *parts] if head else parts)
