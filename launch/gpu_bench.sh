#!/usr/bin/env bash
# The GPU row of BENCHMARKS.md on one H100 (80 GB), under 5 minutes: a ~1.3B LLaDA ("m1b":
# d_model 2048, 16 layers, 16 heads, MLP 5632, LLaDA-8B's 126k vocabulary) in bfloat16 with
# cuDNN flash attention (attention_impl auto on a CUDA GPU with bf16 compute):
#   1. forward and forward + backward of the ELBO term, MFU against the measured bf16 matmul
#      peak and against the data sheet's (H100 SXM dense bf16: 989 TFLOP/s; target >= 50%);
#   2. the dual-cache sampler's tokens/s (16 rows, 64-token prompts, 256 tokens, blocks of 32,
#      128 steps, temperature 0.6);
#   3. one BGPO train step (float32 master weights, bf16 compute, AdamW; 16 sequences of 256 +
#      256 tokens, n = 2 MC samples, micro-batches of 4 rows, remat full).
#
#   bash launch/gpu_bench.sh [OUT_DIR]      # from the repository root, with bgpo_jax installed
#
# Each step writes JSON under OUT_DIR (default gpu_bench_out/); the tables go to stdout. The
# nominal peak is an H100 SXM's: pass NOMINAL_PEAK_TFLOPS=756 for an H100 PCIe.
set -euo pipefail
OUT=${1:-gpu_bench_out}
PEAK=${NOMINAL_PEAK_TFLOPS:-989}
mkdir -p "$OUT"
nvidia-smi --query-gpu=name,memory.total,clocks.max.sm --format=csv | tee "$OUT/gpu.txt"
start=$(date +%s)

timeout 150 python -m bgpo_jax.benchmarks.forward --preset m1b --batch 8 --seq 1024 --resp 512 \
  --dtypes bfloat16 --param-dtype bfloat16 --impls auto --repeats 5 --nominal-peak-tflops "$PEAK" \
  --out "$OUT/forward.json"
echo "forward: $(( $(date +%s) - start )) s"

timeout 90 python -m bgpo_jax.benchmarks.sampler --caches --models m1b --cache-modes dual \
  --gen-lengths 256 --block-length 32 --batch 16 --prompt-len 64 --repeats 2 --out "$OUT/sampler.json"
echo "sampler: $(( $(date +%s) - start )) s"

timeout 120 python -m bgpo_jax.benchmarks.train_step --model m1b --batch 16 --n 2 --prompt-len 256 \
  --gen-len 256 --micro 4 --unroll 1 --remat full --compute-dtype bfloat16 --repeats 2 \
  --out "$OUT/train_step.json"
echo "total: $(( $(date +%s) - start )) s"
