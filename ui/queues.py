"""How events share the machine: the chat's replies decode together in the engine, so many run at once;
a profile or an Inside step holds the model alone, one at a time. On ZeroGPU hardware, the events that
run the model on the event's own thread ask for a GPU first."""

from __future__ import annotations

import sys

COMPUTE_QUEUE = "compute"  # the concurrency group of the events that hold the model alone (profile, Inside)
CHAT_QUEUE = "chat"        # chat replies: they decode together in the engine, so many run at once
CHAT_CONCURRENCY = 16      # replies in flight at once (the engine's rows, and a queue behind them)


def on_gpu(fn):
    """Run `fn` under spaces.GPU on ZeroGPU hardware (app.py imported `spaces` there, before torch);
    leave it unchanged everywhere else."""
    spaces = sys.modules.get("spaces")
    return spaces.GPU(duration=120)(fn) if spaces is not None else fn
