"""Where a CUDA decode step's time goes: graph replay alone, a session step, a generated token,
and the kernels of one compiled step (from torch.profiler).

    python scripts/decode_anatomy.py --model Qwen/Qwen2-0.5B-Instruct [--compile]
"""

import argparse
import time

import torch
import torch._inductor.config

import qwen2
from qwen2.fast import make_fast_path
from qwen2.generate import DecodeSession


def per_call(fn, n=200):
    for _ in range(10):
        fn()
    torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(n):
        fn()
    torch.cuda.synchronize()
    return (time.perf_counter() - t) / n * 1e3


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--model", default="Qwen/Qwen2-0.5B-Instruct")
    p.add_argument("--compile", action="store_true")
    p.add_argument("--context", type=int, default=192)
    p.add_argument("--coordinate-descent", action="store_true")
    args = p.parse_args()
    if args.coordinate_descent:
        torch._inductor.config.coordinate_descent_tuning = True
    model = qwen2.load_model(args.model, device="cuda", dtype="bfloat16", random_weights=True)
    fast_path = make_fast_path(model, "compile" if args.compile else "graphs")
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    ids = torch.randint(0, 1000, (1, 64), device="cuda")
    session = DecodeSession(model, 1, args.context + 400, fast_path=fast_path)
    logits = session.prefill(ids)
    tok = logits.argmax(-1)
    session.step(tok)
    replay = per_call(session.lease.state["graph"].replay)
    step = per_call(lambda: session.step(tok), n=100)
    n = 128
    stream = qwen2.generate(model, ids, max_new_tokens=n, stop_token_ids=[], fast_path=fast_path)
    next(stream)
    torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in stream:
        pass
    token = (time.perf_counter() - t) / (n - 1) * 1e3
    print(f"weights {weights / 1e9:.2f} GB; roofline step {weights / 4.8e12 * 1e3:.3f} ms")
    print(f"graph replay {replay:.3f} ms | session.step {step:.3f} ms | generate per token {token:.3f} ms "
          f"({1e3 / token:.0f} tok/s)")
    eager = DecodeSession(model, 1, session.cache.max_len)  # same shapes: no recompile
    eager.prefill(ids)
    fn = fast_path.step_fn
    slot = torch.tensor([eager.length], device="cuda")
    with torch.inference_mode():
        fn(tok[:, None], cache=eager.cache, slots=slot, positions=eager.next_position[:, None],
           kv_len=None, last_only=True)
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        with torch.inference_mode():
            fn(tok[:, None], cache=eager.cache, slots=slot, positions=eager.next_position[:, None],
               kv_len=None, last_only=True)
        torch.cuda.synchronize()
    events = [e for e in prof.key_averages() if e.device_type == torch.autograd.DeviceType.CUDA]
    total = sum(e.count for e in events)
    print(f"kernels per step: {total}; top by time:")
    for e in sorted(events, key=lambda e: -e.device_time_total)[:12]:
        print(f"  {e.count:4d} x {e.device_time_total / max(e.count, 1):7.1f} us  {e.key[:90]}")


if __name__ == "__main__":
    main()
