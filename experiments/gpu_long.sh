#!/usr/bin/env bash
# The long run (docs/results.md, section 1b and 4) over the GPUs of one machine, one job per GPU.
# A job is a ';'-separated list of steps, run one after the other on its GPU:
#   lm MODEL          experiment 1 for one model of experiments/configs/lm_budget.json, 4,000 steps
#   mqar MODEL [LR]   experiment 2 for one model, $MQAR_STEPS steps, at the config's or at LR
#   switching lm-MODEL  experiment 3 on a model an `lm` step of this run trained
#   default_model     experiments/configs/default_model.json for a time budget, its switching
#                     cost, and its export as the embedded default model
# With no arguments, the four jobs of 2026-11-27 13:20 (meant for a 4-GPU machine): Mamba-2-only
# and its MQAR baseline; Oryx-GDN and its switching cost; GDN-only and its MQAR baseline; the
# default model. With fewer GPUs than jobs, job k runs on GPU k mod N after the ones before it.
#
#   OUT=DIR bash experiments/gpu_long.sh [JOB ...]
#   OUT=DIR bash experiments/gpu_long.sh "lm oryx-mamba2; switching lm-oryx-mamba2" "lm transformer"
#   OUT=DIR ORYX_SEED=1 bash experiments/gpu_long.sh "lm gdn-only" "mqar oryx-gdn"   # a repeat with seed 1
#   OUT=DIR ORYX_EXP_SCALE=toy ORYX_LONG_STEPS=3 ORYX_MQAR_STEPS=3 ORYX_DEFAULT_STEPS=3 \
#       bash experiments/gpu_long.sh                                          # CPU pretest
#
# Needs data/cache/shards-8k, or data/cache/corpus.txt.xz to build it from (7 s on a GPU host;
# docs/data.md). Every job is stopped at ORYX_DEADLINE_S seconds (default 540) after the start,
# so that a 10-minute call still packs what finished: $OUT/results.tgz (results JSON, logs) and,
# when the default model finished, its files (default_model_meta.tar and the safetensors shards).
set -uo pipefail
: "${OUT:?set OUT to the output directory}"
cd "$(dirname "$0")/.."
DEADLINE=${ORYX_DEADLINE_S:-540}
LM_STEPS=${ORYX_LONG_STEPS:-4000}
MQAR_STEPS=${ORYX_MQAR_STEPS:-4000}
if [ -n "${ORYX_DEFAULT_STEPS:-}" ]; then DEFAULT_RUN=(--steps "$ORYX_DEFAULT_STEPS")
else DEFAULT_RUN=(--budget-s "${ORYX_DEFAULT_BUDGET_S:-430}"); fi
WORK=${ORYX_EXP_WORK:-/tmp/oryx-long-rest}
SCALE=${ORYX_EXP_SCALE:-}
SCALE_ARG=${SCALE:+--scale $SCALE}
SEED_ARG=${ORYX_SEED:+--seed $ORYX_SEED}   # lm and mqar steps: the config's seed unless ORYX_SEED is set
export PYTHONUNBUFFERED=1 PYTHON=${PYTHON:-python3}
GPUS=$("$PYTHON" -c "import torch; print(max(1, torch.cuda.device_count()))")
STARTED=$(date +%s)
mkdir -p "$OUT" "$WORK"

if [ ! -f data/cache/shards-8k/meta.json ]; then
  "$PYTHON" -c "import sys; sys.path.insert(0, 'bench'); import _paths; from oryx_core import cli; sys.exit(cli.main(sys.argv[1:]))" \
    data build --input data/cache/corpus.txt.xz --tokenizer data/tokenizer-8k.json --out data/cache/shards-8k --quiet || exit 2
fi

# runs one step of a job with what is left of the deadline; its log gets the exit status
step() {
  local name=$1; shift
  local left=$((DEADLINE - ($(date +%s) - STARTED)))
  if [ "$left" -le 0 ]; then echo "$name: skipped, deadline reached" >> "$WORK/$name.log"; return 1; fi
  timeout "$left" "$@" >> "$WORK/$name.log" 2>&1
  echo "$name: exit $?" >> "$WORK/$name.log"
}
lm() { step "lm-$1" "$PYTHON" experiments/lm_budget.py $SCALE_ARG $SEED_ARG --models "$1" --steps "$LM_STEPS" --out "$WORK/lm-$1"; }
# mqar MODEL [LR]: one MQAR model, at the config's learning rate or at LR (a sweep point)
mqar() {
  local tag=$1 lr=()
  if [ $# -gt 1 ]; then tag="$1-lr$2"; lr=(--lr "$2"); fi
  step "mqar-$tag" "$PYTHON" experiments/mqar.py $SCALE_ARG $SEED_ARG --models "$1" --steps "$MQAR_STEPS" "${lr[@]}" \
    --out "$WORK/mqar-$tag"
}
switching() { step "switching-$1" "$PYTHON" experiments/switching.py $SCALE_ARG --lm-results "$WORK/$1/lm_budget.json" --out "$WORK/$1"; }
default_model() {
  step default "$PYTHON" experiments/lm_budget.py --config experiments/configs/default_model.json $SCALE_ARG \
    "${DEFAULT_RUN[@]}" --out "$WORK/default" || return
  switching default
  step export "$PYTHON" experiments/export_default.py --lm-results "$WORK/default/lm_budget.json" \
    --out "$WORK/default_model"
}
JOBS=("$@")
[ ${#JOBS[@]} -gt 0 ] || JOBS=("lm mamba2-only; mqar mamba2-only" "lm oryx-gdn; switching lm-oryx-gdn"
                              "lm gdn-only; mqar gdn-only" "default_model")
for ((gpu = 0; gpu < GPUS && gpu < ${#JOBS[@]}; gpu++)); do
  (
    export CUDA_VISIBLE_DEVICES=$gpu
    for ((j = gpu; j < ${#JOBS[@]}; j += GPUS)); do eval "${JOBS[j]}"; done
  ) &
done
wait

if [ -f "$WORK/default_model/config.json" ]; then
  tar -C "$WORK/default_model" -cf "$OUT/default_model_meta.tar" config.json model.safetensors.index.json tokenizer.json
  cp "$WORK"/default_model/*.safetensors "$OUT/"
fi
tar -C "$WORK" -czf "$OUT/results.tgz" --exclude='checkpoints' --exclude='./default_model' .
grep -h "exit\|skipped\|eval {\|Error" "$WORK"/*.log
