#!/usr/bin/env bash
# The paper's open questions in one GPU call (docs/results.md): retrieval without an oracle
# (experiments/mqar_no_oracle.py), single-pass budgets (experiments/lm_single_pass.py) and the
# sharing ablation (SHARING_RUNNER, skipped while that file does not exist), side by side on
# the one GPU, each fitting its step counts into its own --budget-s.
#
#   OUT=DIR bash experiments/gpu_science.sh                                   # the GPU run, ~8.5 min
#   OUT=DIR ORYX_EXP_SCALE=toy ORYX_SCIENCE_S=150 bash experiments/gpu_science.sh   # CPU pretest
#
# One part of the work per call (each runner's JSON pools with those of other calls in the report tools):
#   OUT=DIR ORYX_SCIENCE_RUNNERS=retrieval ORYX_RETRIEVAL_ARGS="--steps 4000 --workers 15 --lr-sweep without" \
#     bash experiments/gpu_science.sh
# ORYX_SCIENCE_RUNNERS (default "retrieval single_pass sharing") names the runners to start;
# ORYX_RETRIEVAL_ARGS, ORYX_SINGLE_PASS_ARGS and ORYX_SHARING_ARGS are added to their command lines
# (with --steps in them the runner gets no --budget-s, and is still killed 20 s after its budget).
#
# The language-model runners need data/cache/shards-8k, or data/cache/corpus.txt.xz to build it from (docs/data.md).
# ORYX_SCIENCE_S (default 480) is the wall time from the start of this script to the end of the
# last runner; each runner is killed 20 s after its budget, keeping the results of the jobs it
# finished (its JSON is rewritten after each). $OUT receives at most 8 files: each runner's
# JSON, the sharing runner's JSON files (at most 4) and log.txt.
set -uo pipefail
: "${OUT:?set OUT to the output directory}"
cd "$(dirname "$0")/.."
START=$(date +%s)
TOTAL=${ORYX_SCIENCE_S:-480}
SCALE=${ORYX_EXP_SCALE:-}
SCALE_ARG=${SCALE:+--scale $SCALE}
WORK=${ORYX_EXP_WORK:-/tmp/oryx-science}
SHARING_RUNNER=${SHARING_RUNNER:-experiments/sharing.py}
RUNNERS=" ${ORYX_SCIENCE_RUNNERS:-retrieval single_pass sharing} "
for name in $RUNNERS; do
  case $name in retrieval|single_pass|sharing) ;; *)
    echo "gpu_science.sh: error: ORYX_SCIENCE_RUNNERS: unknown runner '$name' (retrieval, single_pass, sharing)" >&2
    exit 2;;
  esac
done
export PYTHONUNBUFFERED=1 PYTHON=${PYTHON:-python3}
export PYTHONPATH=".:backends/cuda:backends/mlx:convert${PYTHONPATH:+:$PYTHONPATH}"
mkdir -p "$OUT" "$WORK"

left() { echo $((TOTAL - ($(date +%s) - START))); }

runner() {  # NAME BUDGET_S SCRIPT ARGS...: runs SCRIPT in the background, killed 20 s after its budget
  local name=$1 budget=$2; shift 2
  local budget_arg="--budget-s $budget"
  case " $* " in *" --steps "*) budget_arg="";; esac
  mkdir -p "$WORK/$name"
  # shellcheck disable=SC2086  # SCALE_ARG and budget_arg are empty or whole words
  timeout -k 10 $((budget + 20)) "$PYTHON" "$@" $SCALE_ARG --out "$WORK/$name" $budget_arg \
    > "$WORK/$name.log" 2>&1 &
  echo "$name: pid $! budget ${budget}s: $* $budget_arg"
}

run_all() {
  "$PYTHON" -c "import torch; print('torch', torch.__version__, 'cuda', torch.cuda.is_available(),
torch.cuda.get_device_name(0) if torch.cuda.is_available() else 'cpu')"
  date -u
  git log -1 --format='commit %H %cI' 2>/dev/null || true
  if [ "$RUNNERS" != " retrieval " ] && [ ! -f data/cache/shards-8k/meta.json ]; then  # MQAR needs no corpus
    if [ ! -f data/cache/corpus.txt.xz ]; then
      echo "gpu_science.sh: error: neither data/cache/shards-8k nor data/cache/corpus.txt.xz; make them as docs/data.md says" >&2
      return 2
    fi
    "$PYTHON" -m oryx_core data build --input data/cache/corpus.txt.xz --tokenizer data/tokenizer-8k.json \
      --out data/cache/shards-8k --quiet || return 2
    echo "built data/cache/shards-8k at $(( $(date +%s) - START )) s"
  fi
  local budget=$(( $(left) - 25 ))
  # shellcheck disable=SC2086  # the *_ARGS are word lists
  case $RUNNERS in *" retrieval "*) runner retrieval "$budget" experiments/mqar_no_oracle.py ${ORYX_RETRIEVAL_ARGS:-};; esac
  # shellcheck disable=SC2086
  case $RUNNERS in *" single_pass "*) runner single_pass "$budget" experiments/lm_single_pass.py ${ORYX_SINGLE_PASS_ARGS:-};; esac
  case $RUNNERS in *" sharing "*)
    if [ -f "$SHARING_RUNNER" ]; then
      # shellcheck disable=SC2086
      runner sharing "$budget" "$SHARING_RUNNER" ${ORYX_SHARING_ARGS:-}
    else
      echo "sharing: skipped, $SHARING_RUNNER does not exist"
    fi;;
  esac
  wait
  echo "all runners ended at $(( $(date +%s) - START )) s"
  for name in retrieval single_pass sharing; do
    [ -f "$WORK/$name.log" ] || continue
    echo "=== $name"
    grep -v "UserWarning\|_warn_once\|^ *warnings.warn\|^ *$" "$WORK/$name.log" | tail -n 60
  done
  cp "$WORK"/retrieval/mqar_no_oracle.json "$WORK"/single_pass/lm_single_pass.json "$OUT"/ 2>/dev/null
  find "$WORK/sharing" -maxdepth 2 -name '*.json' 2>/dev/null | head -n 4 | while read -r f; do
    cp "$f" "$OUT/sharing_$(basename "$f")"
  done
  ls -la "$OUT"
  date -u
}

run_all 2>&1 | tee "$OUT/log.txt"
