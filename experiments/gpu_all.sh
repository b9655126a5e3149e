#!/usr/bin/env bash
# The small-scale experiments of docs/results.md in one call: experiments 1-3 and the embedded default model, results under $OUT.
#
#   OUT=DIR bash experiments/gpu_all.sh                                  # the GPU run
#   OUT=DIR ORYX_EXP_SCALE=toy ORYX_EXP_BUDGET_S=60 bash experiments/gpu_all.sh   # CPU pretest
#
# Experiments 1 (lm_budget) and 2 (mqar) run side by side on the one device, each fitting its
# own step count into ORYX_EXP_BUDGET_S seconds; then 3 (switching) scores the Oryx models of 1,
# and export_default.py writes the best of them as the default model. $OUT receives at most
# 8 files: results.json (all numbers), log.txt, default_model_meta.tar (config, index,
# tokenizer) and the model's safetensors shards (16 MiB at most each).
set -uo pipefail
: "${OUT:?set OUT to the output directory}"
cd "$(dirname "$0")/.."
SCALE=${ORYX_EXP_SCALE:-}
BUDGET=${ORYX_EXP_BUDGET_S:-330}
WORK=${ORYX_EXP_WORK:-/tmp/oryx-exp}
SCALE_ARG=${SCALE:+--scale $SCALE}
export PYTHONUNBUFFERED=1 PYTHON=${PYTHON:-python3}
mkdir -p "$OUT" "$WORK"

run_all() {
  "$PYTHON" -c "import torch; print('torch', torch.__version__, 'cuda', torch.cuda.is_available(),
torch.cuda.get_device_name(0) if torch.cuda.is_available() else 'cpu')"
  date -u
  if [ ! -f data/cache/shards-8k/meta.json ]; then
    echo "gpu_all.sh: error: data/cache/shards-8k is missing; make it as docs/data.md says" \
         "(scripts/corpus/build_corpus.sh, then oryx data build ... --out data/cache/shards-8k) and carry it" >&2
    return 2
  fi
  timeout $((BUDGET + 60)) "$PYTHON" experiments/lm_budget.py $SCALE_ARG --out "$WORK" --budget-s "$BUDGET" \
    > "$WORK/lm_budget.log" 2>&1 &
  local lm=$!
  timeout $((BUDGET + 60)) "$PYTHON" experiments/mqar.py $SCALE_ARG --out "$WORK" --budget-s "$BUDGET" \
    > "$WORK/mqar.log" 2>&1 &
  local mqar=$!
  wait $lm; echo "lm_budget exit $?"; wait $mqar; echo "mqar exit $?"
  grep -v "UserWarning\|_warn_once\|^ *warnings.warn" "$WORK/lm_budget.log" "$WORK/mqar.log" | tail -n 60
  timeout 80 "$PYTHON" experiments/switching.py $SCALE_ARG --lm-results "$WORK/lm_budget.json" --out "$WORK"
  echo "switching exit $?"
  timeout 40 "$PYTHON" experiments/export_default.py --lm-results "$WORK/lm_budget.json" \
    --out "$WORK/default_model" > "$WORK/default_model.json"
  echo "export_default exit $?"; cat "$WORK/default_model.json"
  "$PYTHON" - "$WORK" "$OUT/results.json" <<'EOF'
import json, sys
from pathlib import Path
work, out = Path(sys.argv[1]), Path(sys.argv[2])
merged = {}
for name in ("lm_budget", "mqar", "switching", "default_model"):
    path = work / f"{name}.json"
    merged[name] = json.loads(path.read_text()) if path.exists() else None
out.write_text(json.dumps(merged, indent=1) + "\n")
EOF
  if [ -d "$WORK/default_model" ]; then
    tar -C "$WORK/default_model" -cf "$OUT/default_model_meta.tar" config.json model.safetensors.index.json tokenizer.json
    cp "$WORK"/default_model/*.safetensors "$OUT/"
  fi
  ls -la "$OUT"
  "$PYTHON" experiments/plots.py --results "$OUT/results.json" --tables
  date -u
}

run_all 2>&1 | tee "$OUT/log.txt"
