"""Ours against transformers (or llama.cpp), side by side in one process, on the same model and prompt.

    python -m profiling.compare --model Qwen/Qwen2-0.5B-Instruct --random-weights --device cpu \
        --modes bfloat16,float32,int8 [--prompt-tokens 64] [--new-tokens 32] [--prefill-tokens 512]
    python -m profiling.compare --model .models/Qwen2.5-Coder-0.5B-Instruct --modes bfloat16 --threads 2 \
        --prompt "Write a quicksort in Python." --new-tokens 64 --against llama.cpp model-BF16.gguf

Against transformers: each mode loads our model (int8 / int4 = weight-only over bfloat16
activations) and a transformers reference holding the same weights at the reference precision
(bfloat16 for the quantized modes: the speed we must beat is what a user gets from transformers).
Both are timed the same way: a whole greedy `generate` of N tokens and of 1 token; decode
tok/s = (N - 1) / (T(N) - T(1)).

Against llama.cpp (`--against llama.cpp GGUF_FILE`, needs the optional llama-cpp-python): llama.cpp
runs the GGUF (a file of the same model: its precision is the GGUF's) on the same prompt token ids,
greedy, with the same thread count. Both are timed token by token: prefill = the prompt's forward
pass up to the first token, decode = each following token's step and greedy pick (llama.cpp:
`eval([token])` + argmax of its logits; no stop tokens on either side). `--agreement-tokens 400`
adds the quality at the same bits: both engines' top-1 agreement and KL with our model computing in
float32, teacher-forced on its 400-token greedy reply (profiling/agreement.py).

Rounds alternate ours / the other engine so drift in a shared machine's speed hits both; the
median of the rounds is reported.
"""

from __future__ import annotations

import argparse
import gc
import json
import statistics
import sys
import time
from pathlib import Path

import torch

import qwen2
from qwen2.cache import kv_bytes_per_token
from qwen2.generate import check_budget
from qwen2.options import FAST_DECODE_MODES, default_dtype, parse_dtype, resolve_device

from . import agreement
from .baseline import first_divergence, greedy_generate, load_reference
from .device import memory_bandwidth_limit, synchronize
from .environment import environment
from .memory import PeakMemory, weight_bytes

MODES = {  # name -> (our dtype, our quantization, reference dtype)
    "float32": (parse_dtype("float32"), None, parse_dtype("float32")),
    "bfloat16": (parse_dtype("bfloat16"), None, parse_dtype("bfloat16")),
    "float16": (parse_dtype("float16"), None, parse_dtype("float16")),
    "int8": (None, "int8", parse_dtype("bfloat16")),  # None: load_model's default (float32 with our blocks)
    "int4": (None, "int4", parse_dtype("bfloat16")),
}
AGAINST = ("transformers", "llama.cpp")


class MissingDependency(Exception):
    """An optional engine is not installed; the message says how to install it."""


def _timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


# ---- ours and transformers: whole greedy generates -----------------------------------------------

def ours_generate(model, ids, n, fast_path=None):
    def run():
        for _ in qwen2.generate(model, ids, max_new_tokens=n, stop_token_ids=[], fast_path=fast_path):
            pass
    return run


def reference_generate(ref, ids, n):
    def run():
        with torch.inference_mode():
            greedy_generate(ref, ids, n)
        synchronize(ids.device)
    return run


def decode_rate(make, n, rounds_log):
    """Append (N - 1) / (T(N) - T(1)) for one engine, one round, to rounds_log."""
    t_one = _timed(make(1))
    t_all = _timed(make(n))
    rounds_log.append((n - 1) / max(t_all - t_one, 1e-9))


def quant_agreement(ours_q, ours_ref, ids) -> dict:
    """Top-1 agreement and KL(ref || quantized) of next-token distributions over the prompt positions."""
    with torch.inference_mode():
        return agreement.agreement(ours_q(ids)[0], ours_ref(ids)[0])


def our_dtype(mode: str, device) -> torch.dtype:
    dtype, quantize, _ = MODES[mode]
    return dtype or default_dtype(device, None, quantize)


def load_ours(args, mode, device):
    """Our model for `mode` and its fast decode path (None: eager)."""
    from qwen2.fast import make_fast_path

    quantize = MODES[mode][1]
    model = qwen2.load_model(args.model, device=device, dtype=our_dtype(mode, device), quantize=quantize,
                             random_weights=args.random_weights)
    return model, make_fast_path(model, args.fast_decode)


def load_pair(args, mode, device, ids):
    """Our model for `mode`, transformers' reference, how the reference was built, and (quantized
    modes) the agreement of our quantized model with our unquantized one at the reference dtype."""
    base = qwen2.load_model(args.model, device=device, dtype=MODES[mode][2], fuse=False,
                            random_weights=args.random_weights)
    ref, how = load_reference(base)
    ours, fast_path = load_ours(args, mode, device)
    if base.info.random_weights:  # random init is seeded; check both really hold the same weights
        with torch.inference_mode():
            if not torch.equal(ours.model.norm.weight, base.model.norm.weight):
                raise RuntimeError("two loads of the same random weights differ: the seeded init is broken")
    extra = quant_agreement(ours, base, ids) if MODES[mode][1] else {}
    del base
    gc.collect()
    return ours, fast_path, ref, how, extra


def time_against_reference(args, ours, fast_path, ref, ids, prefill_ids, device) -> dict:
    """Alternating rounds: decode tok/s of each, and the prefill seconds when asked for."""
    n = args.new_tokens
    log = {"ours": [], "ref": [], "ours_prefill": [], "ref_prefill": []}
    # Warm up both over every length the rounds will meet (cold first calls run at half speed).
    warm = [ours_generate(ours, ids, n, fast_path), reference_generate(ref, ids, n)]
    if args.prefill_tokens:
        warm += [ours_generate(ours, prefill_ids, 1, fast_path), reference_generate(ref, prefill_ids, 1)]
    for make in warm:
        make()
    with PeakMemory(device) as peak:
        for _ in range(args.rounds):
            decode_rate(lambda k: ours_generate(ours, ids, k, fast_path), n, log["ours"])
            decode_rate(lambda k: reference_generate(ref, ids, k), n, log["ref"])
            if args.prefill_tokens:
                log["ours_prefill"].append(_timed(ours_generate(ours, prefill_ids, 1, fast_path)))
                log["ref_prefill"].append(_timed(reference_generate(ref, prefill_ids, 1)))
    log["peak_bytes"], log["peak_source"] = peak.peak_bytes, peak.source
    return log


def mean_kv_read(model, prompt_len: int, n: int) -> float:
    """KV-cache bytes a decode step reads on average over n new tokens after a prompt_len prompt."""
    return kv_bytes_per_token(model.config, model.dtype) * (prompt_len + n / 2)


def traffic(ours, ref, ids, n, ours_tps, ref_tps, bandwidth) -> dict:
    """Bytes read per decoded token (weights + the mean KV cache) and what that makes in GB/s."""
    w_ours, w_ref = weight_bytes(ours)["weights_bytes"], weight_bytes(ref)["weights_bytes"]
    kv_per_token = kv_bytes_per_token(ours.config, ours.dtype)
    kv_read = mean_kv_read(ours, ids.shape[1], n)
    return {"ours_gb_s": (w_ours + kv_read) * ours_tps / 1e9, "ref_gb_s": (w_ref + kv_read) * ref_tps / 1e9,
            "roofline_pct": 100 * (w_ours + kv_read) * ours_tps / bandwidth,
            "weights_bytes": w_ours, "ref_weights_bytes": w_ref,
            "kv_cache_bytes": int(kv_per_token * (ids.shape[1] + n))}


def greedy_match(ours, fast_path, ref, ids, n) -> dict:
    """At equal precision the greedy tokens must be the same: how many leading tokens are."""
    mine = list(qwen2.generate(ours, ids, max_new_tokens=n, stop_token_ids=[], fast_path=fast_path))
    with torch.inference_mode():
        theirs = greedy_generate(ref, ids, n)
    diverged = first_divergence(mine, theirs)
    return {"greedy_equal": diverged is None, "greedy_same_prefix": n if diverged is None else diverged}


def _free(device):
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def compare_mode(args, mode, device, ids, prefill_ids, bandwidth) -> dict:
    ours, fast_path, ref, how, extra = load_pair(args, mode, device, ids)
    log = time_against_reference(args, ours, fast_path, ref, ids, prefill_ids, device)
    ours_tps, ref_tps = statistics.median(log["ours"]), statistics.median(log["ref"])
    row = {"mode": mode, "ours_tok_s": ours_tps, "ref_tok_s": ref_tps, "ratio": ours_tps / ref_tps,
           "ours_tok_s_rounds": log["ours"], "ref_tok_s_rounds": log["ref"],
           **traffic(ours, ref, ids, args.new_tokens, ours_tps, ref_tps, bandwidth),
           "peak_bytes": log["peak_bytes"], "peak_source": log["peak_source"], "reference": how,
           "greedy_equal": None, "new_tokens": args.new_tokens, **extra}
    if args.prefill_tokens:
        ours_p, ref_p = statistics.median(log["ours_prefill"]), statistics.median(log["ref_prefill"])
        row.update(prefill_ratio=ref_p / ours_p, ours_prefill_tok_s=args.prefill_tokens / ours_p,
                   ref_prefill_tok_s=args.prefill_tokens / ref_p)
    if not MODES[mode][1]:
        row.update(greedy_match(ours, fast_path, ref, ids, args.new_tokens))
    del ours, ref
    _free(device)
    return row


# ---- llama.cpp: token by token --------------------------------------------------------------------

def require_engine(engine: str) -> None:
    """Raise MissingDependency, saying how to install it, when the engine to compare with is absent."""
    try:
        if engine == "llama.cpp":
            import llama_cpp  # noqa: F401
        else:
            import transformers  # noqa: F401
    except ImportError:
        how = ("the optional llama-cpp-python (pip install llama-cpp-python==0.3.36; it builds llama.cpp "
               "from source)" if engine == "llama.cpp" else "transformers (pip install -r requirements-dev.txt)")
        raise MissingDependency(f"--against {engine} needs {how}") from None


def load_llama(gguf_file: str, threads: int, n_ctx: int):
    require_engine("llama.cpp")
    import llama_cpp

    llm = llama_cpp.Llama(model_path=str(gguf_file), n_threads=threads, n_threads_batch=threads, n_ctx=n_ctx,
                          n_batch=max(512, n_ctx), logits_all=False, verbose=False)
    return llm, llama_cpp.__version__, llama_greedy


def llama_greedy(llm) -> int:
    """Argmax of the logits of the last evaluated token (llama.cpp keeps only that row; Llama.scores
    is filled only with logits_all, which would compute the LM head for every prompt token)."""
    import llama_cpp
    import numpy as np

    logits = np.ctypeslib.as_array(llama_cpp.llama_get_logits_ith(llm.ctx, -1), shape=(llm.n_vocab(),))
    return int(logits.argmax())


def llama_run(llm, prompt: list[int], n: int, greedy=llama_greedy) -> tuple[float, float, list[int]]:
    """(prefill seconds, decode seconds, tokens): the prompt's eval + first greedy pick, then n - 1
    single-token evals + greedy picks. llama.cpp's own stopping is never consulted."""
    llm.reset()
    start = time.perf_counter()
    llm.eval(prompt)
    tokens = [greedy(llm)]
    first = time.perf_counter()
    for _ in range(n - 1):
        llm.eval([tokens[-1]])
        tokens.append(greedy(llm))
    return first - start, time.perf_counter() - first, tokens


def ours_run(model, ids: torch.Tensor, n: int, fast_path=None) -> tuple[float, float, list[int]]:
    """(prefill seconds, decode seconds, tokens) of our greedy generate, timed the same way."""
    start = time.perf_counter()
    tokens, first = [], None
    for token in qwen2.generate(model, ids, max_new_tokens=n, stop_token_ids=[], fast_path=fast_path):
        tokens.append(token)
        if first is None:
            synchronize(model.device)
            first = time.perf_counter()
    synchronize(model.device)
    return first - start, time.perf_counter() - first, tokens


def alternate(engines: dict, rounds: int, prompt_len: int, n: int) -> tuple[dict, dict]:
    """Warm each engine up once (for a compiled decode path: its compile), then time them in turn,
    `rounds` times. Returns ({engine: {"prefill": [tok/s], "decode": [tok/s]}}, {engine: last tokens})."""
    for run in engines.values():
        run()
    log = {name: {"prefill": [], "decode": []} for name in engines}
    tokens = {}
    for _ in range(rounds):
        for name, run in engines.items():
            prefill_s, decode_s, tokens[name] = run()
            log[name]["prefill"].append(prompt_len / prefill_s)
            log[name]["decode"].append((n - 1) / decode_s)
    return log, tokens


def agreement_rows(args, ours, llm, ids) -> dict:
    """Teacher-forced on the reference's greedy reply of --agreement-tokens tokens: top-1 agreement
    and KL of ours (this mode) and of llama.cpp (this GGUF), each against the reference: our model
    holding the checkpoint's weights, computing in float32 (profiling/agreement.py)."""
    prompt = ids[0].tolist()
    reference_model = qwen2.load_model(args.model, device=ids.device, dtype=torch.float32,
                                       random_weights=args.random_weights)
    reply = agreement.saved_reply(args.agreement_reply, prompt, args.agreement_tokens,
                                  lambda: agreement.reference_reply(reference_model, ids, args.agreement_tokens))
    reference = agreement.ours_logits(reference_model, prompt, reply)
    del reference_model
    gc.collect()
    return {"tokens": len(reply), "reference": "ours, float32",
            "ours": agreement.agreement(agreement.ours_logits(ours, prompt, reply), reference),
            "llama.cpp": agreement.agreement(agreement.llama_logits(llm, prompt, reply), reference)}


def compare_llama(args, mode, device, ids, bandwidth) -> dict:
    n, prompt = args.new_tokens, ids[0].tolist()
    ours, fast_path = load_ours(args, mode, device)
    check_budget(ours, len(prompt), max(n, args.agreement_tokens))
    n_ctx = len(prompt) + max(n, args.agreement_tokens) + 8
    llm, version, greedy = load_llama(args.against[1], torch.get_num_threads(), n_ctx=n_ctx)
    engines = {"ours": lambda: ours_run(ours, ids, n, fast_path), "llama.cpp": lambda: llama_run(llm, prompt, n, greedy)}
    log, tokens = alternate(engines, args.rounds, len(prompt), n)
    med = {name: {k: statistics.median(v) for k, v in d.items()} for name, d in log.items()}
    diverged = first_divergence(tokens["ours"], tokens["llama.cpp"])
    row = {"mode": mode, "against": "llama.cpp", "gguf": str(args.against[1]), "llama_cpp_version": version,
           "prompt_tokens": len(prompt), "new_tokens": n, "threads": torch.get_num_threads(),
           "ours_tok_s": med["ours"]["decode"], "ref_tok_s": med["llama.cpp"]["decode"],
           "ratio": med["ours"]["decode"] / med["llama.cpp"]["decode"],
           "ours_prefill_tok_s": med["ours"]["prefill"], "ref_prefill_tok_s": med["llama.cpp"]["prefill"],
           "ours_tok_s_rounds": log["ours"]["decode"], "ref_tok_s_rounds": log["llama.cpp"]["decode"],
           "ours_prefill_rounds": log["ours"]["prefill"], "ref_prefill_rounds": log["llama.cpp"]["prefill"],
           "greedy_same_prefix": n if diverged is None else diverged,
           "decode_path": fast_path.name if fast_path is not None else "eager", "weights_bytes": weight_bytes(ours)["weights_bytes"],
           "gguf_bytes": Path(args.against[1]).stat().st_size}
    read = row["weights_bytes"] + mean_kv_read(ours, len(prompt), n)
    row.update(ours_gb_s=read * row["ours_tok_s"] / 1e9, roofline_pct=100 * read * row["ours_tok_s"] / bandwidth,
               bandwidth_bytes_per_s=bandwidth)
    if args.agreement_tokens:
        print(f"[compare] {mode} vs llama.cpp: agreement with our float32 on {args.agreement_tokens} reply tokens ...",
              file=sys.stderr, flush=True)
        row["agreement"] = agreement_rows(args, ours, llm, ids)
    del ours, llm
    _free(device)
    return row


def format_llama_table(rows) -> str:
    lines = []
    for r in rows:
        lines.append(f"{r['mode']} (ours, {r['decode_path']} decode) vs llama.cpp {r['llama_cpp_version']} on "
                     f"{Path(r['gguf']).name}: {r['prompt_tokens']} prompt tokens, {r['new_tokens']} new, "
                     f"{r['threads']} threads")
        head = f"{'round':<7} {'ours tok/s':>10} {'llama.cpp':>10} {'ratio':>6} {'ours prefill':>12} {'llama prefill':>13}"
        lines += [head, "-" * len(head)]
        rounds = zip(r["ours_tok_s_rounds"], r["ref_tok_s_rounds"], r["ours_prefill_rounds"], r["ref_prefill_rounds"])
        for i, (a, b, pa, pb) in enumerate(rounds, 1):
            lines.append(f"{i:<7} {a:>10.1f} {b:>10.1f} {a / b:>5.2f}x {pa:>12.1f} {pb:>13.1f}")
        lines.append(f"{'median':<7} {r['ours_tok_s']:>10.1f} {r['ref_tok_s']:>10.1f} {r['ratio']:>5.2f}x "
                     f"{r['ours_prefill_tok_s']:>12.1f} {r['ref_prefill_tok_s']:>13.1f}")
        lines.append(f"ours reads {r['ours_gb_s']:.1f} GB/s at its median decode speed: {r['roofline_pct']:.0f} % of "
                     f"the {r['bandwidth_bytes_per_s'] / 1e9:.1f} GB/s measured on this machine")
        lines.append(f"decode and prefill in tok/s; greedy tokens equal for the first {r['greedy_same_prefix']}/"
                     f"{r['new_tokens']} (different precisions and kernels may diverge); weights "
                     f"{r['weights_bytes'] / 1e6:.0f} MB ours, GGUF {r['gguf_bytes'] / 1e6:.0f} MB")
        if "agreement" in r:
            a = r["agreement"]
            for engine in ("ours", "llama.cpp"):
                lines.append(f"agreement with our float32, teacher-forced on its {a['tokens']}-token reply: {engine:<9} "
                             f"top-1 {a[engine]['top1_agreement']:.2%}, KL {a[engine]['kl_nats_per_token']:.2e} nats/token")
    return "\n".join(lines)


# ---- the command ---------------------------------------------------------------------------------

def _config(args) -> qwen2.Qwen2Config:
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
            lines.append(f"{'':<9} {r['mode']} vs our {MODES[r['mode']][2]} on the prompt: top-1 agreement "
                         f"{r['top1_agreement']:.1%}, KL {r['kl_nats_per_token']:.2e} nats/token")
    return "\n".join(lines)


def parse_args(argv):
    p = argparse.ArgumentParser(prog="python -m profiling.compare", description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="Qwen/Qwen2-0.5B-Instruct")
    p.add_argument("--random-weights", action="store_true")
    p.add_argument("--device", default="cpu")
    p.add_argument("--modes", "--dtype", dest="modes", default="bfloat16,int8",
                   help=f"comma-separated, of {', '.join(MODES)}")
    p.add_argument("--prompt", default=None,
                   help="a user message, chat-templated with the model's tokenizer (default: random token ids)")
    p.add_argument("--prompt-tokens", type=int, default=64, help="random prompt length (without --prompt)")
    p.add_argument("--new-tokens", type=int, default=32)
    p.add_argument("--prefill-tokens", type=int, default=512, help="0 to skip the prefill comparison")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--fast-decode", choices=FAST_DECODE_MODES, default=None,
                   help="our decode path (qwen2.fast.make_fast_path's mode; default off)")
    p.add_argument("--cuda-graphs", action="store_true", help="same as --fast-decode graphs (CUDA only)")
    p.add_argument("--compile", action="store_true", help="same as --fast-decode compile")
    p.add_argument("--against", nargs="+", default=["transformers"], metavar="ENGINE [GGUF_FILE]",
                   help="transformers (default) or: llama.cpp GGUF_FILE (needs llama-cpp-python)")
    p.add_argument("--agreement-tokens", type=int, default=0,
                   help="with --against llama.cpp: also the top-1 agreement and KL of both engines with our model "
                        "in float32, teacher-forced on its greedy reply of this many tokens (0: skip)")
    p.add_argument("--agreement-reply", default=None, metavar="JSON",
                   help="keep that reply here (written the first time, read after: the float32 reply takes minutes)")
    p.add_argument("--threads", type=int, default=None, help="threads for torch and llama.cpp (default: torch's)")
    p.add_argument("--out", default=None, help="also write the rows as JSON here")
    args = p.parse_args(argv)
    if args.compile or args.cuda_graphs:
        args.fast_decode = "compile" if args.compile else "graphs"
    return args


def check_args(args) -> list[str]:
    modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    bad = [m for m in modes if m not in MODES]
    if bad:
        raise ValueError(f"unknown mode(s) {bad}; expected {', '.join(MODES)}")
    if (args.new_tokens < 2 or args.prompt_tokens < 1 or args.rounds < 1 or args.prefill_tokens < 0
            or args.agreement_tokens < 0):
        raise ValueError("--new-tokens must be >= 2, --prompt-tokens and --rounds >= 1, --prefill-tokens and "
                         "--agreement-tokens >= 0")
    engine = args.against[0]
    if engine not in AGAINST or (engine == "llama.cpp") != (len(args.against) == 2) or len(args.against) > 2:
        raise ValueError("--against takes 'transformers' or 'llama.cpp GGUF_FILE'")
    if args.agreement_tokens and engine != "llama.cpp":
        raise ValueError("--agreement-tokens compares with llama.cpp: add --against llama.cpp GGUF_FILE")
    if engine == "llama.cpp" and not str(args.device).strip().lower().startswith("cpu"):
        raise ValueError("--against llama.cpp runs on the CPU: use --device cpu")
    if engine == "llama.cpp" and not Path(args.against[1]).is_file():
        raise ValueError(f"GGUF file not found: {args.against[1]}")
    return modes


def prompt_ids(args, vocab: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    if args.prompt is not None:
        tok = qwen2.Tokenizer.from_pretrained(args.model)
        ids = torch.tensor([tok.encode_chat([{"role": "user", "content": args.prompt}])])
    else:
        ids = torch.randint(0, min(vocab, 150000), (1, args.prompt_tokens), generator=gen)
    prefill = torch.randint(0, min(vocab, 150000), (1, max(args.prefill_tokens, 1)), generator=gen)
    return ids.to(device), prefill.to(device)


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        modes = check_args(args)
        llama = args.against[0] == "llama.cpp"
        require_engine(args.against[0])
        if args.threads:
            torch.set_num_threads(args.threads)
        device = resolve_device(args.device)
        ids, prefill_ids = prompt_ids(args, _config(args).vocab_size, device)
        rows = []
        bandwidth, bw_source = memory_bandwidth_limit(device)
        if llama:
            for mode in modes:
                print(f"[compare] {mode} vs llama.cpp: loading and timing ...", file=sys.stderr, flush=True)
                rows.append(compare_llama(args, mode, device, ids, bandwidth))
        else:
            for mode in modes:
                print(f"[compare] {mode}: loading and timing ...", file=sys.stderr, flush=True)
                rows.append(compare_mode(args, mode, device, ids, prefill_ids, bandwidth))
    except MissingDependency as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except (qwen2.Qwen2Error, ValueError, OSError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    env = environment(device, our_dtype(modes[0], device))
    print(f"{env.get('device_name', device)} | torch {torch.__version__} | threads {torch.get_num_threads()} | "
          f"commit {(env.get('git') or {}).get('commit', '?')} | prompt {ids.shape[1]} tokens, "
          f"{args.new_tokens} new, median of {args.rounds} alternating rounds")
    print(format_llama_table(rows) if llama else format_table(rows, bandwidth, bw_source))
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"environment": env, "rows": rows, "args": vars(args)}, f, indent=2, default=str)
    return 0


if __name__ == "__main__":
    sys.exit(main())
