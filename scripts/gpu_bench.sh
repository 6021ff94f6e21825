#!/usr/bin/env bash
# The GPU checks and figures in docs/benchmarks.md, in one call on a CUDA machine:
#   bash scripts/gpu_bench.sh [OUT_DIR] [SECTIONS]    SECTIONS: any of tests,small,graphs,large,profile
# Runs the CUDA tests, then ours vs transformers on the Qwen2-0.5B and Qwen2-7B shapes (random
# weights: no download) with CUDA graphs, and one profiling run.
set -uo pipefail
out="${1:-${OUT:-gpu-out}}"
sections="${2:-tests,small,graphs,large,profile}"
mkdir -p "$out"
export PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
python3 -c "import torch, transformers; print('torch', torch.__version__, 'transformers', transformers.__version__)"
git rev-parse HEAD 2>/dev/null || true
has() { [[ ",$sections," == *",$1,"* ]]; }
compare() {  # model tag extra-flags...
  local model=$1 tag=$2; shift 2
  timeout 280 python3 -m profiling.compare --model "$model" --random-weights --device cuda --modes bfloat16 \
    --new-tokens 128 --prefill-tokens 512 --rounds 3 "$@" --out "$out/compare-$tag.json" 2>&1 | grep -v -i warn | tail -6
}
has tests && timeout 300 python3 -m pytest -q tests/test_fast.py tests/test_generate.py tests/test_profiling.py 2>&1 | tail -4
has small && compare Qwen/Qwen2-0.5B-Instruct 0.5b-compiled --compile
has graphs && compare Qwen/Qwen2-0.5B-Instruct 0.5b-graphs --cuda-graphs
has large && compare Qwen/Qwen2-7B-Instruct 7b-compiled --compile
has profile && timeout 200 python3 -m profiling.bench --model Qwen/Qwen2-0.5B-Instruct --random-weights --device cuda \
  --dtype bfloat16 --prompt-tokens 64 --new-tokens 32 --fast-decode graphs --no-progress --out "$out/run-cuda-0.5b.json" 2>&1 | tail -12
