#!/usr/bin/env bash
# The GPU run-book (issue 19), one command on a CUDA machine:
#   bash benchmarks/gpu_all.sh /tmp/arexport-gpu [gpu_all.py options, e.g. --budget-s 300]
# 1. the GPU tests (tests/test_gpu.py, the TensorRT engine test, ONNX Runtime on CUDA with CUDA graphs;
#    each skips with its reason where TensorRT, onnxruntime-gpu or a GPU is absent),
# 2. the GPU profile: LlamaGen-XL and ARPG-XL shapes, bf16, batch 1 and 8, for torch, ONNX Runtime CUDA
#    and TensorRT, each eager and with CUDA graphs: ar / sjd / arpg wall clock, fraction of the HBM
#    floor, image decoder images/s at batch 1, 8, 32 -> gpu_all.json and gpu_all.md in the output
#    folder, rewritten after every config, so a run stopped early still leaves what it measured.
# 3. the batch sweep (benchmarks/batch_sweep.py steps) on the raster ORT engine of step 2 -> batch_sweep.md/json.
# 4. several devices in one process (issue 34, benchmarks/multi_device.py): the CFG row split and 2 replicas
#    on cuda:0,cuda:1 -> multi_device.json/.md; skipped with its reason where fewer than 2 GPUs exist.
# What this machine cannot run (TensorRT, onnxruntime-gpu, pytest) is listed as skipped, never a failure.
# The checkout need not be installed: it goes first on PYTHONPATH. PYTHON picks the interpreter
# (default python3). `bash benchmarks/gpu_all.sh DIR --device cpu --smoke` checks the script on a CPU.
set -uo pipefail
out=${1:-/tmp/arexport-gpu}
shift $(( $# > 0 ? 1 : 0 ))
mkdir -p "$out" && out=$(cd "$out" && pwd)
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
py=${PYTHON:-$(command -v python3 || command -v python)}
(nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv || echo "nvidia-smi not found") | tee "$out/gpu.txt"
if "$py" -c "import pytest" 2>/dev/null; then
  # named tests, no -k filter: a filter once deselected test_tensorrt_engine_matches_pytorch
  "$py" -m pytest -q -rs -p no:cacheprovider tests/test_gpu.py \
    tests/test_engines.py::test_tensorrt_engine_matches_pytorch \
    tests/test_gpu_path.py::test_ort_cuda_graphs_equal_the_cpu_tokens 2>&1 | tee "$out/gpu_tests.txt"
  tests=${PIPESTATUS[0]}
else
  echo "skipped: the GPU tests (pytest is not installed for $py)" | tee "$out/gpu_tests.txt"
  tests=1
fi
"$py" benchmarks/gpu_all.py --out "$out" "$@"
profile=$?
# 3. throughput across batch sizes (issue 35): decode and verify steps of the raster ONNX Runtime engine
#    the profile built, at the mean live length, for 1, 8, 32 and 128 images (CFG rows), against the floor
dev=cpu; smoke=0; prev=""
for a in "$@"; do
  [ "$prev" = "--device" ] && dev=$a
  case $a in --device=*) dev=${a#--device=};; --smoke) smoke=1;; esac
  prev=$a
done
eng=$(ls -d "$out"/engines/*-ort 2>/dev/null | grep -v arpg | head -n 1)
if [ -n "$eng" ]; then
  batches=1,8,32,128; [ "$smoke" -eq 1 ] && batches=1,2
  "$py" benchmarks/batch_sweep.py steps --engine "$eng" --device "$dev" --batches "$batches" --iters 3 \
    --json "$out/batch_sweep.json" | tee "$out/batch_sweep.md"
  sweep=${PIPESTATUS[0]}
else
  echo "skipped: the batch sweep (the profile built no ONNX Runtime raster engine)" | tee "$out/batch_sweep.md"
  sweep=0
fi
# 4. several devices in one process (issue 34)
"$py" benchmarks/multi_device.py --out "$out" 2>&1 | tee "$out/multi_device.txt"
multi=${PIPESTATUS[0]}
echo "gpu tests exit $tests, profile exit $profile, batch sweep exit $sweep, multi-device exit $multi; results in $out (gpu_all.md, gpu_all.json, batch_sweep.md, multi_device.md, gpu_tests.txt)"
[ "$tests" -eq 0 ] && [ "$profile" -eq 0 ] && [ "$sweep" -eq 0 ] && [ "$multi" -eq 0 ]
