"""The profiler's prompts: seeded pseudo-random token ids, so runs on any machine compare.

Speed does not depend on which tokens a prompt holds, only on how many, so a run needs no
tokenizer; the seed makes two runs of the same settings feed the same ids.
"""

from __future__ import annotations

import torch


def seeded_prompt_ids(vocab_size: int, length: int, device: torch.device,
                      seed: int = 0) -> torch.Tensor:
    """Deterministic pseudo-random prompt ids in [0, vocab_size), shape [1, length]."""
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab_size, (1, length), generator=gen).to(device)
