#!/usr/bin/env bash
# The main job on a fresh machine: set up (MLX backend; on Linux mlx[cpu]), then run the
# embedded default model (oryx_core/default_model) under three mode plans: generate, and score
# a held-out text (data/heldout.txt: tokens 100,000-101,199 of the corpus' validation split).
# Text is scored in windows of the context the model was trained at (512 tokens).
set -euo pipefail
cd "$(dirname "$0")/.."
ORYX_EXTRAS=${ORYX_EXTRAS:-mlx} bash scripts/setup.sh
ORYX=.venv/bin/oryx
$ORYX info
for plan in attention recurrent prefill-attention; do
    echo "== generate, plan $plan"
    $ORYX generate --backend mlx --prompt "The history of the city" --plan "$plan" --max-tokens 60 \
        --temperature 0.7 --top-p 0.9 --seed 1
    echo
done
for plan in attention recurrent "A:0-128,R:128-384,A:384-"; do
    $ORYX eval --backend mlx --text data/heldout.txt --plan "$plan"
done
