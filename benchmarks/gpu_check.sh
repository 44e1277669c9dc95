#!/usr/bin/env bash
# The GPU paths in one run of at most ~8 minutes on one GPU (not run yet: no GPU has been lent so far).
# Each step writes under $OUT (default /tmp/gpu-check): a few hundred bf16 steps of the autoencoder, of
# latent diffusion on its latents and of faces64, the speed benchmark's GPU column, and a two-process run.
#   bash benchmarks/gpu_check.sh ../shared/data/faces
set -euo pipefail
DATA=${1:-../shared/data/faces}
OUT=${OUT:-/tmp/gpu-check}
mkdir -p "$OUT"
PY=${PY:-python}
RUNS="--set train.out_dir=$OUT/runs --set data.cache_dir=$OUT/cache --no-progress"
nvidia-smi --query-gpu=name,memory.total --format=csv | tee "$OUT/gpu.txt"

echo "== autoencoder, 300 steps, bf16"
timeout 150 $PY -m ddpm_faces train --config ae128 --data "$DATA" $RUNS --set train.max_steps=300 \
  --set reconstruction.disc_start=150 --set train.eval_every=300 --set train.checkpoint_every=300 \
  --set train.threads=null 2>&1 | tail -4 | tee "$OUT/ae.txt"

echo "== latent diffusion on its latents, 300 steps, bf16"
timeout 150 $PY -m ddpm_faces train --config latent128 --data "$DATA" $RUNS --set codec.autoencoder="$OUT/runs/ae128" \
  --set train.max_steps=300 --set train.eval_every=300 --set train.sample_every=300 --set train.checkpoint_every=300 \
  --set train.threads=null 2>&1 | tail -4 | tee "$OUT/latent.txt"

echo "== faces64, 200 steps, bf16"
timeout 90 $PY -m ddpm_faces train --config faces64 --data "$DATA" $RUNS --set train.max_steps=200 \
  --set train.mixed_precision=bf16 --set train.eval_every=200 --set train.sample_every=200 \
  --set train.checkpoint_every=200 2>&1 | tail -3 | tee "$OUT/faces64.txt"

echo "== speed benchmark, GPU column"
timeout 60 $PY benchmarks/speed.py --device cuda --repeats 3 --out "$OUT/speed-cuda.json" 2>&1 | tail -12

echo "== two processes (accelerate), 40 steps of quickstart"
timeout 60 accelerate launch --num_processes 2 -m ddpm_faces train --config quickstart --data "$DATA" $RUNS \
  --set name=two --set train.max_steps=40 --set train.batch_size=16 2>&1 | tail -3 | tee "$OUT/two.txt"
echo "done: $OUT"
