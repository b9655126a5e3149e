#!/usr/bin/env bash
# Sets up .venv with every extra and runs the CPU test suite (slow and GPU tests skip; --runslow adds the slow ones).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/python -m pytest -q "$@"
