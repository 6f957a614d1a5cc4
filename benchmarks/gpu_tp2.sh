#!/usr/bin/env bash
# Issue 18 on a two-GPU machine (kind nvidia-h200-x2), after `source .whl/setup.sh`:
#   bash benchmarks/gpu_tp2.sh 8b    # TP2 vs TP1 parity test, then the 8B shape with --tp 2 and --tp 1
#   bash benchmarks/gpu_tp2.sh 70b   # the 70B shape with --tp 2 (141 GB of bf16 weights: two GPUs)
# Each part fits one 10-minute call. Results under $OUT (see bench_http_gpu.sh).
set -uo pipefail
export NCCL_NVLS_ENABLE=0  # NVLink multicast stays off on these machines
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
tok=${TOK:-.gpu_tok}
case ${1:-8b} in
  8b)
    python3 -m pytest -q -m gpu tests/test_gpu_tp2.py -s 2>&1 | tail -5
    OUTLEN=1024 bash benchmarks/bench_http_gpu.sh tp2-8b "$tok" --tp 2
    CUDA_VISIBLE_DEVICES=0 OUTLEN=1024 bash benchmarks/bench_http_gpu.sh tp1-8b "$tok"
    ;;
  70b)
    MODEL=configs/llama-3.1-70b.json bash benchmarks/bench_http_gpu.sh tp2-70b "$tok" --tp 2
    ;;
  *) echo "usage: $0 8b|70b"; exit 2 ;;
esac
