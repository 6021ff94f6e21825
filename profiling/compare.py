"""Ours against transformers, side by side in one process, on the same weights and prompt.

    python -m profiling.compare --model Qwen/Qwen2-0.5B-Instruct --random-weights --device cpu \
        --modes bfloat16,float32,int8 [--prompt-tokens 64] [--new-tokens 32] [--prefill-tokens 512]

Each mode loads our model (int8 = weight-only int8 over bfloat16 activations) and a transformers
reference holding the same weights at the reference precision (bfloat16 for int8: the speed we
must beat is what a user gets from transformers). Rounds alternate ours / reference so drift in a
shared machine's speed hits both; the median of the rounds is reported. Both engines are timed the
same way: a whole greedy `generate` of N tokens and of 1 token; decode tok/s = (N - 1) / (T(N) - T(1)).
"""

from __future__ import annotations

import argparse
import gc
import json
import statistics
import sys
import time

import torch

import qwen2

from .baseline import load_reference
from .device import memory_bandwidth_limit, resolve_device, synchronize
from .environment import environment
from .memory import PeakMemory, weight_bytes

MODES = {  # name -> (our dtype, our quantization, reference dtype)
    "float32": (torch.float32, None, torch.float32),
    "bfloat16": (torch.bfloat16, None, torch.bfloat16),
    "float16": (torch.float16, None, torch.float16),
    "int8": (torch.bfloat16, "int8", torch.bfloat16),
}


def _timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def ours_generate(model, ids, n):
    def run():
        for _ in qwen2.generate(model, ids, max_new_tokens=n, stop_token_ids=[]):
            pass
    return run


def reference_generate(ref, ids, n):
    from transformers import GenerationConfig

    config = GenerationConfig(max_new_tokens=n, min_new_tokens=n, do_sample=False, num_beams=1,
                              pad_token_id=0, eos_token_id=None, bos_token_id=None)
    mask = torch.ones_like(ids)

    def run():
        with torch.inference_mode():
            ref.generate(ids, attention_mask=mask, generation_config=config)
        synchronize(ids.device)
    return run


def decode_rate(make, n, rounds_log):
    """Append (N - 1) / (T(N) - T(1)) for one engine, one round, to rounds_log."""
    t_one = _timed(make(1))
    t_all = _timed(make(n))
    rounds_log.append((n - 1) / max(t_all - t_one, 1e-9))


def int8_agreement(ours_q8, ours_bf16, ids) -> dict:
    """Top-1 agreement and KL(bf16 || int8) of next-token distributions over the prompt positions."""
    with torch.inference_mode():
        a, b = ours_bf16(ids), ours_q8(ids)
    agree = (a.argmax(-1) == b.argmax(-1)).float().mean().item()
    kl = torch.nn.functional.kl_div(b.log_softmax(-1), a.log_softmax(-1), log_target=True,
                                    reduction="sum").item() / ids.shape[1]
    return {"top1_agreement": agree, "kl_nats_per_token": kl}


def compare_mode(args, mode, device, ids, prefill_ids, bandwidth) -> dict:
    dtype, quantize, ref_dtype = MODES[mode]
    load = dict(device=device, random_weights=args.random_weights)
    base = qwen2.load_model(args.model, dtype=ref_dtype, fuse=False, **load)
    ref, how = load_reference(base)
    ours = qwen2.load_model(args.model, dtype=dtype, quantize=quantize,
                            cuda_graphs=args.cuda_graphs, compile=args.compile, **load)
    if base.random_weights:  # random init is seeded; check both really hold the same weights
        with torch.inference_mode():
            same = torch.equal(ours.model.norm.weight, base.model.norm.weight)
        if not same:
            raise RuntimeError("two loads of the same random weights differ: the seeded init is broken")
    extra = {}
    if quantize:
        extra = int8_agreement(ours, base, ids)
    del base
    gc.collect()

    n = args.new_tokens
    ours_rates, ref_rates, ours_prefill, ref_prefill = [], [], [], []
    # Warm up both over every length the rounds will meet (cold first calls run at half speed).
    warm = [ours_generate(ours, ids, n), reference_generate(ref, ids, n)]
    if args.prefill_tokens:
        warm += [ours_generate(ours, prefill_ids, 1), reference_generate(ref, prefill_ids, 1)]
    for make in warm:
        make()
    with PeakMemory(device) as peak:
        for _ in range(args.rounds):
            decode_rate(lambda k: ours_generate(ours, ids, k), n, ours_rates)
            decode_rate(lambda k: reference_generate(ref, ids, k), n, ref_rates)
            if args.prefill_tokens:
                ours_prefill.append(_timed(ours_generate(ours, prefill_ids, 1)))
                ref_prefill.append(_timed(reference_generate(ref, prefill_ids, 1)))
    ours_tps, ref_tps = statistics.median(ours_rates), statistics.median(ref_rates)
    w_ours = weight_bytes(ours)["weights_bytes"]
    w_ref = weight_bytes(ref)["weights_bytes"]
    kv_per_token = 2 * ours.config.num_hidden_layers * ours.config.num_key_value_heads * \
        ours.config.head_dim * torch.tensor([], dtype=dtype).element_size()
    mean_context = ids.shape[1] + n / 2
    bytes_ours = w_ours + kv_per_token * mean_context  # read once per decoded token
    bytes_ref = w_ref + kv_per_token * mean_context
    row = {
        "mode": mode, "ours_tok_s": ours_tps, "ref_tok_s": ref_tps, "ratio": ours_tps / ref_tps,
        "ours_tok_s_rounds": ours_rates, "ref_tok_s_rounds": ref_rates,
        "ours_gb_s": bytes_ours * ours_tps / 1e9, "ref_gb_s": bytes_ref * ref_tps / 1e9,
        "roofline_pct": 100 * bytes_ours * ours_tps / bandwidth,
        "weights_bytes": w_ours, "ref_weights_bytes": w_ref,
        "kv_cache_bytes": int(kv_per_token * (ids.shape[1] + n)), "peak_bytes": peak.peak_bytes,
        "peak_source": peak.source, "reference": how, "greedy_equal": None, "new_tokens": n, **extra,
    }
    if args.prefill_tokens:
        row["prefill_ratio"] = statistics.median(ref_prefill) / statistics.median(ours_prefill)
        row["ours_prefill_tok_s"] = args.prefill_tokens / statistics.median(ours_prefill)
        row["ref_prefill_tok_s"] = args.prefill_tokens / statistics.median(ref_prefill)
    if not quantize:  # at equal precision the greedy tokens must be the same
        ours_tokens = list(qwen2.generate(ours, ids, max_new_tokens=n, stop_token_ids=[]))
        with torch.inference_mode():
            from transformers import GenerationConfig

            out = ref.generate(ids, attention_mask=torch.ones_like(ids), generation_config=GenerationConfig(
                max_new_tokens=n, min_new_tokens=n, do_sample=False, pad_token_id=0, eos_token_id=None))
        theirs = out[0, ids.shape[1]:].tolist()
        row["greedy_equal"] = ours_tokens == theirs
        row["greedy_same_prefix"] = next((i for i, (a, b) in enumerate(zip(ours_tokens, theirs)) if a != b), n)
    del ours, ref
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return row


def _config(args) -> qwen2.Qwen2Config:
    from pathlib import Path

    if args.random_weights and not Path(args.model).is_dir():
        return qwen2.config.official_config(args.model)
    return qwen2.Qwen2Config.from_file(qwen2.hub.resolve(args.model) / "config.json")


def format_table(rows, bandwidth, bw_source) -> str:
    head = (f"{'mode':<9} {'ours tok/s':>10} {'transformers':>12} {'ratio':>6} {'ours GB/s':>9} "
            f"{'% roofline':>10} {'prefill ratio':>13} {'weights MB':>10} {'same greedy':>11}")
    lines = [f"memory bandwidth limit: {bandwidth / 1e9:.1f} GB/s ({bw_source}); 'same greedy': leading "
             "tokens equal to transformers' greedy ones (bf16 on random weights: near-flat logits, so "
             "rounding differences between kernels flip argmaxes early; fp32 must match in full)",
             head, "-" * len(head)]
    for r in rows:
        prefill = f"{r['prefill_ratio']:.2f}x" if "prefill_ratio" in r else "-"
        same = "-" if r["greedy_equal"] is None else f"{r['greedy_same_prefix']}/{r['new_tokens']}"
        lines.append(f"{r['mode']:<9} {r['ours_tok_s']:>10.1f} {r['ref_tok_s']:>12.1f} {r['ratio']:>5.2f}x "
                     f"{r['ours_gb_s']:>9.1f} {r['roofline_pct']:>9.0f}% {prefill:>13} "
                     f"{r['weights_bytes'] / 1e6:>10.0f} {same:>11}")
        if "top1_agreement" in r:
            lines.append(f"{'':<9} int8 vs our bf16 on the prompt: top-1 agreement {r['top1_agreement']:.1%}, "
                         f"KL {r['kl_nats_per_token']:.2e} nats/token")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m profiling.compare", description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="Qwen/Qwen2-0.5B-Instruct")
    p.add_argument("--random-weights", action="store_true")
    p.add_argument("--device", default="cpu")
    p.add_argument("--modes", "--dtype", dest="modes", default="bfloat16,int8",
                   help=f"comma-separated, of {', '.join(MODES)}")
    p.add_argument("--prompt-tokens", type=int, default=64)
    p.add_argument("--new-tokens", type=int, default=32)
    p.add_argument("--prefill-tokens", type=int, default=512, help="0 to skip the prefill comparison")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--cuda-graphs", action="store_true", help="replay decode steps as CUDA graphs (CUDA only)")
    p.add_argument("--compile", action="store_true", help="torch.compile the decode step, then graph it (CUDA)")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    p.add_argument("--out", default=None, help="also write the rows as JSON here")
    args = p.parse_args(argv)
    try:
        import transformers  # noqa: F401
    except ImportError:
        print("error: the comparison needs transformers (pip install -r requirements-dev.txt)", file=sys.stderr)
        return 2
    try:
        modes = [m.strip() for m in args.modes.split(",") if m.strip()]
        bad = [m for m in modes if m not in MODES]
        if bad:
            raise ValueError(f"unknown mode(s) {bad}; expected {', '.join(MODES)}")
        if args.new_tokens < 2 or args.prompt_tokens < 1 or args.rounds < 1 or args.prefill_tokens < 0:
            raise ValueError("--new-tokens must be >= 2, --prompt-tokens and --rounds >= 1, --prefill-tokens >= 0")
        if args.threads:
            torch.set_num_threads(args.threads)
        device = resolve_device(args.device)
        bandwidth, bw_source = memory_bandwidth_limit(device)
        vocab = _config(args).vocab_size
        gen = torch.Generator().manual_seed(0)
        ids = torch.randint(0, min(vocab, 150000), (1, args.prompt_tokens), generator=gen).to(device)
        prefill_ids = torch.randint(0, min(vocab, 150000), (1, max(args.prefill_tokens, 1)), generator=gen).to(device)
        rows = []
        for mode in modes:
            print(f"[compare] {mode}: loading and timing ...", file=sys.stderr, flush=True)
            rows.append(compare_mode(args, mode, device, ids, prefill_ids, bandwidth))
    except (qwen2.Qwen2Error, ValueError, OSError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    env = environment(device, MODES[modes[0]][0])
    print(f"{env.get('device_name', device)} | torch {torch.__version__} | threads {torch.get_num_threads()} | "
          f"commit {(env.get('git') or {}).get('commit', '?')} | prompt {args.prompt_tokens} tokens, "
          f"{args.new_tokens} new, median of {args.rounds} alternating rounds")
    print(format_table(rows, bandwidth, bw_source))
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"environment": env, "rows": rows, "args": vars(args)}, f, indent=2, default=str)
    return 0


if __name__ == "__main__":
    sys.exit(main())
