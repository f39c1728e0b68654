#!/usr/bin/env bash
# Issue 7, CPU: random-init LlamaGen-B, batch 2 rows (one image with CFG): ORT decode step vs torch
# eager vs the measured bandwidth floor, from one `arexport profile` run.
set -euo pipefail
out=${1:-/tmp/arexport-bench}
mkdir -p "$out"
[ -d "$out/llamagen-b" ] || arexport build GPT-B --random-init --batch-sizes 2 --verify-len 16 --no-images --out "$out/llamagen-b"
COLUMNS=200 arexport profile "$out/llamagen-b" --compare torch:ar,ort:ar,ort:sjd:window=16 --classes 0 --batch-size 1 \
  --cfg-scale 4.0 --warmup 0 --repeats 1 --json "$out/profile_cpu_b.json" --plot "$out/profile_cpu_b.png"
