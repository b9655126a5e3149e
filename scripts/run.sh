#!/usr/bin/env bash
# The main job on a fresh machine: set up (MLX backend; on Linux mlx[cpu]), then run the
# embedded default model (oryx_core/default_model) under three mode plans: generate, and score
# a held-out text (data/heldout.txt: tokens 100,000-101,199 of the corpus' validation split).
# Text is scored in windows of the model's context, each from an empty context; a plan's positions run over the
# whole text (A:0-128,R:128-384,A:384-: attention for tokens 0-127 and from 384 on).
set -euo pipefail
cd "$(dirname "$0")/.."
echo "run: setting up .venv with the MLX backend (on a fresh machine this downloads the dependencies first)"
ORYX_EXTRAS=${ORYX_EXTRAS:-mlx} bash scripts/setup.sh
ORYX=.venv/bin/oryx
echo "run: the default model"
$ORYX info
PROMPT="The history of the city"
for plan in attention recurrent prefill-attention; do
    echo "== generate, plan $plan: the prompt, then the model's continuation"
    printf '%s' "$PROMPT"
    $ORYX generate --backend mlx --prompt "$PROMPT" --plan "$plan" --max-tokens 60 \
        --temperature 0.7 --top-p 0.9 --seed 1
    echo
done
echo "== held-out perplexity of data/heldout.txt under three plans"
for plan in attention recurrent "A:0-128,R:128-384,A:384-"; do
    $ORYX eval --backend mlx --text data/heldout.txt --plan "$plan"
done
