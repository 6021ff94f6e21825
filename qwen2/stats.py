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
    stopped: bool = False
    context_used: int = 0
    context_limit: int = 0
    batch_size: int = 0  # the most replies that decoded beside this one in a step (itself included)

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
        (bfloat16) · context 59/32768"; it starts with "stopped after" when the reply was cut short,
        and says how long the request waited behind others when it did."""
        prompt = f"{self.prompt_tokens} prompt tokens"
        if self.reused_tokens:
            prompt += f" ({self.reused_tokens} reused)"
        rate = self.decode_tok_s
        parts = [prompt, f"{self.new_tokens} new tokens"]
        if self.queue_wait_s >= 0.05:
            parts.append(f"waited {self.queue_wait_s:.1f} s")
        parts += [f"first token {self.ttft_s * 1000:.0f} ms",
                  f"{rate:.1f} tok/s" if rate is not None else "decode n/a (1 token)",
                  f"{self.device} ({self.dtype})"]
        if self.batch_size > 1:
            parts.append(f"batched with up to {self.batch_size - 1} other repl{'y' if self.batch_size == 2 else 'ies'}")
        if self.context_limit:
            parts.append(f"context {self.context_used}/{self.context_limit}")
        line = " · ".join(parts)
        return f"stopped after {self.new_tokens} new tokens · {line}" if self.stopped else line
