#!/usr/bin/env bash
# The README's first command on a tiny budget, in the environment scripts/setup.sh (without
# --test) makes: it must exit 0 and write results.json, the report and its plots.
# Usage: bash scripts/smoke_run.sh [RUN_DIR]     (default: a new temporary folder)
set -euo pipefail
cd "$(dirname "$0")/.."
run="${1:-$(mktemp -d)/smoke}"
# 600 training images, one or two optimiser steps per stage, a short latency profile.
.venv/bin/instanas run --output "$run" --quiet \
  --data.limit_train 600 --data.limit_test 200 \
  --baseline.steps 2 --pretrain.steps 2 --search.steps 2 --search.recalibrate_batches 1 --search.min_pretrain_accuracy 0 \
  --finetune.steps 2 \
  --latency.repeats 30 --latency.warmup 1 --latency.calibration_children 4 --latency.eval_images 20
for file in results.json results.md report.md report.html plots/error_vs_latency.png; do
  [ -s "$run/$file" ] || { echo "smoke: $run/$file is missing" >&2; exit 1; }
done
echo "smoke: instanas run exited 0 and wrote its report: $run"
