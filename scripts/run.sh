#!/usr/bin/env bash
# The main job on a fresh machine: set up, then run Oryx on the bundled default.
set -euo pipefail
cd "$(dirname "$0")/.."
ORYX_EXTRAS=${ORYX_EXTRAS:-dev} bash scripts/setup.sh
OUT=${OUT_DIR:-runs/demo}
.venv/bin/oryx init "$OUT/tiny-gdn" --preset tiny --mixer gdn
.venv/bin/oryx info "$OUT/tiny-gdn"
for plan in attention recurrent "A:0-200,R:200-400,A:400-"; do
    .venv/bin/oryx eval "$OUT/tiny-gdn" --text README.md --plan "$plan" --max-tokens 600
done
