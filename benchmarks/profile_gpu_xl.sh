#!/usr/bin/env bash
# Issue 7, GPU: LlamaGen-XL shapes in bf16 with random weights, batch 1 and 8 images (x2 rows for CFG):
# eager torch vs CUDA-graph torch per-step and per-image latency for ar, sjd (window 16) and, on
# ARPG-XL shapes, arpg (64 steps), with the fraction of the bandwidth floor. Run on a CUDA machine:
#   bash benchmarks/profile_gpu_xl.sh /tmp/gpu-bench
set -euo pipefail
out=${1:-/tmp/arexport-gpu}
mkdir -p "$out"
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv | tee "$out/gpu.txt"
for b in 1 8; do
  classes=$(python -c "print(','.join(str(i) for i in range($b)))")
  for graph in "" "--cuda-graph"; do
    tag="b${b}${graph:+-graph}"
    COLUMNS=200 arexport profile --model GPT-XL --random-init --precision bf16 --device cuda $graph \
      --compare torch:ar,torch:sjd:window=16 --classes "$classes" --batch-size "$b" --cfg-scale 4.0 \
      --warmup 1 --repeats 2 --json "$out/xl_${tag}.json" --plot "$out/xl_${tag}.png" | tee "$out/xl_${tag}.txt"
    COLUMNS=200 arexport profile --model arpg-XL --random-init --precision bf16 --device cuda $graph \
      --method arpg --option steps=64 --classes "$classes" --batch-size "$b" --cfg-scale 4.0 \
      --warmup 1 --repeats 2 --json "$out/arpg_xl_${tag}.json" | tee "$out/arpg_xl_${tag}.txt"
  done
done
