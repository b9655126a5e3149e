#!/usr/bin/env bash
# Generation speed on one GPU in one call, results under $OUT (at most 7 files), each step capped by the time left,
# the server first: the OpenAI server under 1/4/16 streaming clients after its start-up warm-up (bench_serve.py),
# the gpu-marked tests of batching and its warm-up, compiled decode, the sharing variants and mixed attention,
# batched decode against transformers' batched generate (bench_batch.py: attention, prefill-attention and recurrent
# plans in bf16, the attention plan also run ahead and step by step, then greedy tokens against transformers' with
# both in fp32), `oryx generate`'s loop at batch 1 (bench_generate_loop.py), then, in the time left, decode with
# the eager and the compiled step (bench_model.py) and the training step's profile per plan (profile_model.py).
#
#   OUT=DIR [TOTAL=SECONDS] bash bench/gpu_generation.sh
#
# The weights are random, SmolLM2-135M-Instruct's shape and tokenizer (bench/random_llama.py), so that hosts
# that cannot receive the 98 MB GGUF measure the real sizes. Needs, carried: SERVER_WHEELS (a folder of wheels
# for what the serve extra adds to the image: starlette, uvicorn, pydantic and theirs, gguf) and TOKENIZER_FROM
# (a folder with SmolLM2's tokenizer.json and tokenizer_config.json, e.g. the default model's cache folder).
# Make them where the registries are reachable, for the GPU image's Python (3.12 here):
#   python -m pip download -d .whl_serve --only-binary=:all: --python-version 3.12 \
#       --platform manylinux2014_x86_64 starlette uvicorn pydantic gguf
#   mkdir -p runs/smollm2_tok && cp ~/.cache/oryx/smollm2-135m-instruct/tokenizer*.json runs/smollm2_tok/
set -u
: "${OUT:?set OUT to the output directory}"
cd "$(dirname "$0")/.."
START=$(date +%s); TOTAL=${TOTAL:-560}
WHEELS=${SERVER_WHEELS:-.whl_serve}; TOKENIZER_FROM=${TOKENIZER_FROM:-runs/smollm2_tok}
left() { echo $((TOTAL - ($(date +%s) - START))); }
cap() { local want=$1 l; l=$(left); [ "$l" -lt 20 ] && echo 1 && return; [ "$want" -lt "$l" ] && echo "$want" || echo "$l"; }
mkdir -p "$OUT"
if ! python3 -c "import starlette, uvicorn, pydantic" 2>/dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site "$WHEELS"/*.whl || exit 2
fi
export PYTHONPATH=/tmp/site:.:backends/cuda:backends/mlx:convert PYTHONUNBUFFERED=1
timeout "$(cap 60)" python3 bench/random_llama.py --tokenizer-from "$TOKENIZER_FROM" --out /tmp/rl > /dev/null &&
  timeout "$(cap 60)" python3 -m oryx_core convert /tmp/rl /tmp/smollm2-shape > /tmp/convert.log 2>&1
echo "convert rc=$? at $(( $(date +%s) - START )) s"
timeout "$(cap 200)" python3 bench/bench_serve.py /tmp/smollm2-shape --backends torch --device cuda \
  --dtype bfloat16 --clients 1 4 16 --requests 4 --max-tokens 64 --no-client-warm-up --out "$OUT/bench_serve.json" \
  > /tmp/bench_serve.log 2>&1
echo "serve rc=$? at $(( $(date +%s) - START )) s"; tail -5 /tmp/bench_serve.log | cut -c1-600
# one process per file: a CUDA fault poisons its process's context, so it must not fail the files after it;
# compiled decode runs with launches synchronous, so a fault names its kernel
: > /tmp/gpu_tests.log
for f in test_batch_warm_up test_batch test_decode_step_kernels test_compiled_decode test_sharing test_mixed_attention; do
  [ "$f" = test_compiled_decode ] && sync_launch=1 || sync_launch=0
  # the fused decode kernels (the CUDA default) under the batched generator and CUDA graphs, not the compiled step
  [ "$f" = test_decode_step_kernels ] && only=(-k "not compiled_step") || only=()
  CUDA_LAUNCH_BLOCKING=$sync_launch timeout "$(cap 90)" python3 -m pytest -q -p no:cacheprovider -m gpu -rf \
    "${only[@]}" "tests/torch/$f.py" >> /tmp/gpu_tests.log 2>&1
  echo "tests $f rc=$? at $(( $(date +%s) - START )) s"
done
grep -E "^(FAILED|ERROR)|passed|failed" /tmp/gpu_tests.log | tail -12 | cut -c1-300
# eager steps under CUDA graphs per bucket (the default); the compiled step is timed by bench_model below
timeout "$(cap 160)" python3 bench/bench_batch.py /tmp/smollm2-shape --hf /tmp/rl --device cuda \
  --dtype bfloat16 --check-dtype float32 --batches 1 8 32 --new-tokens 64 --repeats 3 --compare-run-ahead \
  --out "$OUT/bench_batch.json" \
  > /tmp/bench_batch.log 2>&1
echo "batch rc=$? at $(( $(date +%s) - START )) s"; grep -v -i -E "warn|it/s" /tmp/bench_batch.log | tail -7 | cut -c1-500
# `oryx generate`'s loop at batch 1, every token read back, the default model's sharing (the batch-1 target)
timeout "$(cap 90)" python3 bench/bench_generate_loop.py --device cuda --dtype bfloat16 --sharing kv-proj \
  --json "$OUT/generate_loop.json" > /tmp/generate_loop.log 2>&1
echo "generate loop rc=$?"; grep -v -i "warn" /tmp/generate_loop.log | tail -6 | cut -c1-300
timeout "$(cap 140)" python3 bench/bench_model.py --skip train --skip prefill --decode-compile both \
  --json "$OUT/bench_model_decode.json" > /tmp/bench_model_decode.log 2>&1
echo "decode rc=$?"; grep -v "USDT\|warn" /tmp/bench_model_decode.log | tail -c 3000
# where the mixed plan's training step spends its time, against the other plans (3 layers compile faster)
timeout "$(cap 100)" python3 bench/profile_model.py --layers 3 --plans llama,attention,recurrent,mixed,mixed-dense \
  --json "$OUT/profile_model.json" > /tmp/profile_model.log 2>&1
echo "profile rc=$?"; grep -v "USDT\|warn" /tmp/profile_model.log | tail -c 4000
cat /tmp/convert.log /tmp/bench_batch.log /tmp/gpu_tests.log /tmp/bench_serve.log /tmp/generate_loop.log \
  /tmp/bench_model_decode.log /tmp/profile_model.log \
  > "$OUT/log.txt" 2>/dev/null
echo "end at $(( $(date +%s) - START )) s"
