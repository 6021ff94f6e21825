"""What finding a prompt-lookup draft costs per round: PromptLookupDrafter's n-gram index
(qwen2.speculative.NgramIndex) against the backwards scan of the context it replaced.

    python scripts/lookup_timing.py [--contexts 500,8000] [--rounds 63]

Two contexts: the words of this repository's own sources as ids (repeats everywhere) and random ids (no
match: the scan's worst case). Each round the context grows by one token, as a reply does; 3/2/1-grams,
8-token drafts. The index is built once per reply (timed apart), the scan holds no state. Pure
Python, one thread: only the ratio means anything on a shared machine.
"""

from __future__ import annotations

import argparse
import random
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from qwen2.speculative import PromptLookupDrafter, copy_from  # noqa: E402


def scan(tokens: list[int], max_ngram: int = 3, min_ngram: int = 1, limit: int = 8) -> tuple[int, list[int]]:
    """PromptLookupDrafter.match before the index (commit 9003751): the same answer, by scanning
    (the copy after the match is the drafter's own, copy_from)."""
    length = len(tokens)
    for n in range(min(max_ngram, length - 1), min_ngram - 1, -1):
        tail = tokens[length - n:]
        last = tail[-1]
        for start in range(length - n - 1, -1, -1):
            if tokens[start + n - 1] == last and tokens[start:start + n] == tail:
                return n, copy_from(tokens, start + n, limit)
    return 0, []


def source_ids(count: int) -> list[int]:
    """The words of qwen2/*.py, one id per distinct word (the lookup only compares ids)."""
    text = "".join(p.read_text() for p in sorted((ROOT / "qwen2").glob("*.py")))
    words = text.split()
    vocab: dict[str, int] = {}
    ids = [vocab.setdefault(w, len(vocab)) for w in words]
    if len(ids) < count:
        raise SystemExit(f"only {len(ids)} words in qwen2/*.py; ask for fewer than {count}")
    return ids[:count]


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--contexts", default="500,8000", help="context lengths, comma-separated")
    p.add_argument("--rounds", type=int, default=63)
    args = p.parse_args()
    rng = random.Random(0)
    print(f"{'':<24}{'context':>8}  {'scan':>9}  {'index':>9}  index built once per reply")
    for label in ("our sources (matches)", "random ids (no match)"):
        for length in (int(x) for x in args.contexts.split(",")):
            total = length + args.rounds
            ids = source_ids(total) if label.startswith("our") else [rng.randrange(150_000) for _ in range(total)]
            contexts = [ids[:length + k] for k in range(1, args.rounds + 1)]
            start = time.perf_counter()
            expected = [scan(c) for c in contexts]
            scan_ms = (time.perf_counter() - start) / args.rounds * 1e3
            drafter = PromptLookupDrafter()
            start = time.perf_counter()
            drafter.match(ids[:length], 8)
            build_ms = (time.perf_counter() - start) * 1e3
            start = time.perf_counter()
            got = [drafter.match(c, 8) for c in contexts]
            index_ms = (time.perf_counter() - start) / args.rounds * 1e3
            if got != expected:
                raise SystemExit(f"{label}, {length} tokens: the index and the scan disagree")
            print(f"{label:<24}{length:>8}  {scan_ms:>6.3f} ms  {index_ms:>6.3f} ms  {build_ms:.1f} ms")


if __name__ == "__main__":
    main()
