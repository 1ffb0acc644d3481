#!/usr/bin/env bash
# sha256 of everything a small fixed-seed run writes: train.py (120 steps, no time budget) and the
# sample.py commands. Run it on two trees and diff the outputs to check that a change keeps
# samples and reconstructions bit for bit (config.yaml and checksums.json hold the output path).
#   benchmarks/outputs_digest.sh OUT_DIR > digest.txt
set -euo pipefail
cd "$(dirname "$0")/.."
T=${1:?usage: benchmarks/outputs_digest.sh OUT_DIR}
rm -rf "$T" && mkdir -p "$T"
python train.py configs/polygons.yaml --data.num_train=512 --data.num_test=64 --train.max_steps=120 \
  --train.max_minutes=0 --train.eval_every=60 --train.checkpoint_every=60 --train.eval_images=32 \
  --prior.fit_steps=60 --prior.autoencoder_steps=60 --refine.steps=8 \
  --run.out_dir="$T/run" --run.cache_dir="$T/cache" > "$T/train.log" 2>&1
python sample.py sample "$T/run" --n 8 --seed 3 --out "$T/s1" > "$T/sample.log" 2>&1
python sample.py reconstruct "$T/run" --split test --n 4 --out "$T/s2" >> "$T/sample.log" 2>&1
python sample.py interpolate "$T/run" --a test:0 --b test:1 --steps 4 --out "$T/s3" >> "$T/sample.log" 2>&1
python sample.py vary "$T/run" --image test:2 --strength 0.5 --n 3 --out "$T/s4" >> "$T/sample.log" 2>&1
cd "$T" && find run/images run/model s1 s2 s3 s4 -type f | sort | grep -v "config.yaml\|checksums.json" | xargs sha256sum
