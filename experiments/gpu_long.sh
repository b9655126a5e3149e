#!/usr/bin/env bash
# Experiment 1 at 65.5M tokens per model (docs/results.md, section 1b), the models spread over
# the GPUs of one machine, then experiment 3 on the Oryx models and the default-model export.
#
#   OUT=DIR bash experiments/gpu_long.sh [MODEL ...]     # default: every model of the config
#   OUT=DIR ORYX_EXP_SCALE=toy ORYX_LONG_STEPS=3 bash experiments/gpu_long.sh oryx-mamba2   # CPU pretest
#
# Needs data/cache/shards-8k, or data/cache/corpus.txt.xz to build it from (7 s on a GPU host;
# docs/data.md). Model k goes to GPU k mod N; each GPU trains its models one after the other
# (about 4-6 minutes per model on an H200). $OUT receives results.tgz (every lm_budget.json,
# switching.json, the logs) and, when an Oryx model was trained, the default model's files.
set -uo pipefail
: "${OUT:?set OUT to the output directory}"
cd "$(dirname "$0")/.."
STEPS=${ORYX_LONG_STEPS:-4000}
WORK=${ORYX_EXP_WORK:-/tmp/oryx-long}
SCALE=${ORYX_EXP_SCALE:-}
SCALE_ARG=${SCALE:+--scale $SCALE}
export PYTHONUNBUFFERED=1 PYTHON=${PYTHON:-python3}
MODELS=("$@")
[ ${#MODELS[@]} -gt 0 ] || MODELS=(oryx-gdn transformer gdn-only oryx-mamba2 mamba2-only)
GPUS=$("$PYTHON" -c "import torch; print(max(1, torch.cuda.device_count()))")
mkdir -p "$OUT" "$WORK"

if [ ! -f data/cache/shards-8k/meta.json ]; then
  "$PYTHON" -c "import sys; sys.path.insert(0, 'bench'); import _paths; from oryx_core import cli; sys.exit(cli.main(sys.argv[1:]))" \
    data build --input data/cache/corpus.txt.xz --tokenizer data/tokenizer-8k.json --out data/cache/shards-8k --quiet || exit 2
fi

for ((gpu = 0; gpu < GPUS; gpu++)); do
  mine=()
  for ((i = gpu; i < ${#MODELS[@]}; i += GPUS)); do mine+=("${MODELS[i]}"); done
  [ ${#mine[@]} -gt 0 ] || continue
  # one output directory per GPU: lm_budget.json is rewritten after every model it trains
  CUDA_VISIBLE_DEVICES=$gpu "$PYTHON" experiments/lm_budget.py $SCALE_ARG --models "${mine[@]}" --steps "$STEPS" \
    --out "$WORK/gpu$gpu" > "$WORK/gpu$gpu.log" 2>&1 &
done
wait
for results in "$WORK"/gpu*/lm_budget.json; do
  "$PYTHON" experiments/switching.py $SCALE_ARG --lm-results "$results" --out "$(dirname "$results")" >> "$WORK/switching.log" 2>&1
done
if "$PYTHON" experiments/export_default.py --lm-results "$WORK"/gpu*/lm_budget.json --out "$WORK/default_model" \
     > "$WORK/default_model.json" 2>> "$WORK/switching.log"; then
  tar -C "$WORK/default_model" -cf "$OUT/default_model_meta.tar" config.json model.safetensors.index.json tokenizer.json
  cp "$WORK"/default_model/*.safetensors "$OUT/"
fi
tar -C "$WORK" -czf "$OUT/results.tgz" --exclude='*/checkpoints' --exclude='./default_model' .
grep -h "eval\|error" "$WORK"/gpu*.log "$WORK/switching.log" | grep -v "warn"
