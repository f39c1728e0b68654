#!/usr/bin/env bash
# The GPU run-book (issue 19), one command on a CUDA machine:
#   bash benchmarks/gpu_all.sh /tmp/arexport-gpu
# 1. the GPU tests (tests/test_gpu.py; TensorRT tests skip with their reason where TensorRT is absent),
# 2. the GPU profile: LlamaGen-XL and ARPG-XL shapes, bf16, batch 1 and 8, eager vs CUDA graphs,
#    ar / sjd / arpg, fraction of the HBM floor -> gpu_all.json and gpu_all.md in the output folder.
# What this machine cannot run (TensorRT, onnxruntime-gpu) is listed under "skipped" in both files.
set -uo pipefail
out=${1:-/tmp/arexport-gpu}
mkdir -p "$out"
cd "$(dirname "$0")/.."
(nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv || echo "nvidia-smi not found") | tee "$out/gpu.txt"
python -m pytest -q -rs tests/test_gpu.py tests/test_engines.py -k "gpu or trt or cuda" 2>&1 | tee "$out/gpu_tests.txt"
tests=${PIPESTATUS[0]}
python benchmarks/gpu_all.py --out "$out"
profile=$?
echo "gpu tests exit $tests, profile exit $profile; results in $out (gpu_all.md, gpu_all.json, gpu_tests.txt)"
[ "$tests" -eq 0 ] && [ "$profile" -eq 0 ]
